//! NATS authentication with an NKey, with real processes: a private `nats-server` (on a free
//! port, never the shared one) whose configuration admits one NKey user, made at test time;
//! gateways with that user's seed file are ready and fan out to each other, gateways without
//! credentials or with another user's seed are refused by the server and stay unready, and the
//! seed never appears in a gateway's output.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods // temporary files, and polling /readyz
)]

mod common;
mod files;

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::{doc_id, http_status, update_clock, Gateway, Persistence, Signer, Ws, WAIT};
use files::Files;
use secsync_protocol::ServerFrame;
use secsync_testkit::process::Service;
use tokio::sync::watch;

/// A private nats-server admitting one NKey user; counts the authentication errors it logs.
struct NkeyNats {
    child: Child,
    port: u16,
    auth_errors: watch::Receiver<u64>,
}

impl NkeyNats {
    fn start(files: &Files, user_public_key: &str) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = files.write(
            "nats.conf",
            &format!(
                "listen: \"127.0.0.1:{port}\"\n\
                 authorization {{ users = [ {{ nkey: \"{user_public_key}\" }} ] }}\n"
            ),
        );
        let mut child = Command::new("nats-server")
            .args(["-c", &config])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nats-server");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (errors_tx, auth_errors) = watch::channel(0u64);
        let errors_tx = Arc::new(errors_tx);
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("Server is ready") {
                    let _ = ready_tx.send(());
                } else if line.contains("authentication error") {
                    errors_tx.send_modify(|n| *n += 1);
                }
            }
        });
        if ready_rx.recv_timeout(WAIT).is_err() {
            let _ = child.kill();
            panic!("nats-server did not start");
        }
        Self {
            child,
            port,
            auth_errors,
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn auth_errors(&self) -> u64 {
        *self.auth_errors.borrow()
    }

    /// Waits until the server has refused more than `count` connections.
    async fn refused_more_than(&mut self, count: u64) {
        tokio::time::timeout(WAIT, self.auth_errors.wait_for(|n| *n > count))
            .await
            .expect("nats-server refused no connection")
            .unwrap();
    }
}

impl Drop for NkeyNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `/readyz` on `port` answers 200.
async fn ready(port: u16) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while http_status(port, "/readyz").await != Some(200) {
        assert!(tokio::time::Instant::now() < deadline, "{port} not ready");
        tokio::time::sleep(Duration::from_millis(50)).await; // polling an HTTP endpoint
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_with_the_nkey_seed_connect_and_fan_out_others_are_refused() {
    let files = Files::new("nats-auth");
    let user = nkeys::KeyPair::new_user();
    let seed = user.seed().unwrap();
    let seed_file = files.write("gateway.nk", &format!("{seed}\n"));
    let mut nats = NkeyNats::start(&files, &user.public_key());
    let persistence = Persistence::start().await;

    // One gateway with all its output kept, to look for the seed in it.
    let first = Service::start(
        Path::new(env!("CARGO_BIN_EXE_secsync-gateway")),
        &[
            "--listen",
            "127.0.0.1:0",
            "--persistence",
            &persistence.url,
            "--nats",
            &nats.url(),
            "--auth",
            "open",
            "--nats-nkey-seed-file",
            &seed_file,
        ],
        &[("RUST_LOG", "debug,h2=info,hyper=info,tonic=info,tower=info")],
    );
    let second = Gateway::start(
        &persistence.url,
        &nats.url(),
        &["--nats-nkey-seed-file", &seed_file],
    );
    ready(first.port).await;
    second.ready().await;

    // An update written through the first gateway reaches a client of the second (the NATS
    // path; the gateways share nothing else but persistence).
    let doc = doc_id("nkey");
    let signer = Signer::new(5);
    let first_url = format!("ws://127.0.0.1:{}", first.port);
    let (mut writer, _) = Ws::open(&first_url, &doc).await;
    writer.send(&signer.first_snapshot(&doc, "S1")).await;
    assert!(matches!(
        writer.next().await,
        Some(ServerFrame::SnapshotSaved(_))
    ));
    let (mut reader, _) = Ws::open(&second.url(), &doc).await;
    writer.send(&signer.update(&doc, "S1", 0)).await;
    assert!(matches!(
        writer.next().await,
        Some(ServerFrame::UpdateSaved { .. })
    ));
    let relayed = reader.next().await.expect("the update, relayed");
    assert_eq!(
        update_clock(&relayed),
        Some((signer.pub_key.clone(), 0)),
        "{relayed:?}"
    );

    // Without credentials, and with another user's seed: refused by the server, not ready.
    let before = nats.auth_errors();
    let anonymous = Gateway::start(&persistence.url, &nats.url(), &[]);
    nats.refused_more_than(before).await;
    assert_eq!(http_status(anonymous.port, "/readyz").await, Some(503));

    let stranger = nkeys::KeyPair::new_user().seed().unwrap();
    let stranger_file = files.write("stranger.nk", &stranger);
    let before = nats.auth_errors();
    let other = Gateway::start(
        &persistence.url,
        &nats.url(),
        &["--nats-nkey-seed-file", &stranger_file],
    );
    nats.refused_more_than(before).await;
    assert_eq!(http_status(other.port, "/readyz").await, Some(503));

    // The seed is nowhere in the first gateway's output (debug logs included); its public
    // key is, so an operator sees which user it connects as.
    let output = first.output().join("\n");
    assert!(!output.contains(&seed), "the seed was logged");
    assert!(output.contains(&user.public_key()));
}

/// Bad NATS credentials configuration stops the gateway at start, naming the problem and never
/// the secret.
#[test]
fn bad_nats_credentials_are_an_error_at_start() {
    let files = Files::new("nats-auth");
    let account_seed = nkeys::KeyPair::new_account().seed().unwrap();
    let account = files.write("account.nk", &account_seed);
    let garbage = files.write("garbage", "SUNOTASEED\n");
    let user_seed = nkeys::KeyPair::new_user().seed().unwrap();
    let user = files.write("user.nk", &user_seed);
    let missing = files.0.join("missing").display().to_string();
    let cases: [(Vec<&str>, &str); 6] = [
        (
            vec!["--nats-nkey-seed-file", &missing],
            "--nats-nkey-seed-file",
        ),
        (vec!["--nats-nkey-seed-file", &garbage], "not an NKey seed"),
        (
            vec!["--nats-nkey-seed-file", &account],
            "not the seed of an NKey user",
        ),
        (vec!["--nats-creds-file", &garbage], "NATS credentials file"),
        (
            vec![
                "--nats-nkey-seed-file",
                &user,
                "--nats-creds-file",
                &garbage,
            ],
            "cannot be used with",
        ),
        (vec!["--nats-user", "u"], "--nats-password"),
    ];
    for (args, expected) in cases {
        let output = Command::new(env!("CARGO_BIN_EXE_secsync-gateway"))
            .args(["--listen", "127.0.0.1:0", "--auth", "open"])
            .args(&args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stderr).into_owned()
            + &String::from_utf8_lossy(&output.stdout);
        assert!(!output.status.success(), "{args:?} started");
        assert!(text.contains(expected), "{args:?}: {text}");
        for secret in [&account_seed, &user_seed, "SUNOTASEED"] {
            assert!(!text.contains(secret), "{args:?} printed a seed: {text}");
        }
    }
}
