//! TLS, and mutual TLS, between gateways and persistence, with real processes: a CA, server and
//! client certificates made at test time, `secsync-persistence` serving with `--tls-cert` /
//! `--tls-key` (and `--tls-client-ca`), and `secsync-gateway` processes with and without the CA
//! and a client certificate.
//!
//! The server certificate names only `localhost`, no IP address, and the gateways dial the
//! addresses `localhost` resolves to: a handshake succeeds only if the server name sent and
//! checked is the URL's host name, as it must be with several addresses behind one name.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods // a temporary directory for the certificate files
)]

mod common;
mod files;

use std::path::{Path, PathBuf};

use common::{doc_id, http_status, nats_url, Database, Gateway, Signer, Ws};
use files::Files;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use secsync_protocol::ServerFrame;
use secsync_testkit::process::Service;

/// A certificate authority; its certificate is written as `{name}.pem`.
struct Authority {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pem: String,
}

impl Authority {
    fn new(files: &Files, name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let pem = files.write(&format!("{name}.pem"), &issuer.pem());
        Self { issuer, pem }
    }

    /// A certificate for `names` with `usage`, signed by this authority; the paths of the
    /// certificate and its key.
    fn issue(
        &self,
        files: &Files,
        name: &str,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (
            files.write(&format!("{name}.pem"), &cert.pem()),
            files.write(&format!("{name}.key"), &key.serialize_pem()),
        )
    }
}

/// Two unrelated authorities and a server certificate for `localhost` from the first.
struct Pki {
    files: Files,
    ca: Authority,
    other_ca: Authority,
    cert: String,
    key: String,
}

impl Pki {
    fn new() -> Self {
        let files = Files::new("tls");
        let ca = Authority::new(&files, "ca");
        let other_ca = Authority::new(&files, "other-ca");
        let (cert, key) = ca.issue(
            &files,
            "persistence",
            &["localhost"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        Self {
            files,
            ca,
            other_ca,
            cert,
            key,
        }
    }
}

/// The persistence binary sits beside the gateway's in the same target directory.
fn persistence_binary() -> PathBuf {
    let path =
        Path::new(env!("CARGO_BIN_EXE_secsync-gateway")).with_file_name("secsync-persistence");
    assert!(
        path.exists(),
        "{} missing: build it first (cargo build --release --bins)",
        path.display()
    );
    path
}

/// `secsync-persistence` on a fresh database with `tls` flags.
fn persistence(database: &Database, tls: &[&str]) -> Service {
    let mut args = vec!["--listen", "127.0.0.1:0", "--database-url", database.url()];
    args.extend_from_slice(tls);
    Service::start(&persistence_binary(), &args, &[("RUST_LOG", "info")])
}

/// A client loads, writes a snapshot and an update, and a second client loads the update.
async fn loads_and_writes(gateway: &Gateway) {
    gateway.ready().await;
    let doc = doc_id("tls");
    let signer = Signer::new(3);
    let (mut writer, _) = Ws::open(&gateway.url(), &doc).await;
    writer.send(&signer.first_snapshot(&doc, "S1")).await;
    assert!(matches!(
        writer.next().await,
        Some(ServerFrame::SnapshotSaved(_))
    ));
    writer.send(&signer.update(&doc, "S1", 0)).await;
    assert!(matches!(
        writer.next().await,
        Some(ServerFrame::UpdateSaved { .. })
    ));
    let (_reader, document) = Ws::open(&gateway.url(), &doc).await;
    let ServerFrame::Document { updates, .. } = document else {
        unreachable!("Ws::open checks for a document")
    };
    assert_eq!(updates.len(), 1);
}

/// A load fails (closed with 1011, the client would retry) and the gateway is not ready.
async fn refused(gateway: &Gateway) {
    let mut ws = Ws::connect(&gateway.url(), &doc_id("tls"), "").await;
    let first = ws.next().await;
    assert!(
        first.is_none(),
        "a load through {}: {first:?}",
        gateway.port
    );
    assert_eq!(ws.closed, Some(1011));
    // The load above has just failed the same way readiness checks persistence.
    assert_eq!(http_status(gateway.port, "/readyz").await, Some(503));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_reach_persistence_over_tls_only_with_its_ca() {
    let Pki {
        files: _files,
        ca,
        other_ca,
        cert,
        key,
    } = Pki::new();
    let database = Database::create().await;
    let persistence = persistence(&database, &["--tls-cert", &cert, "--tls-key", &key]);
    let url = format!("https://localhost:{}", persistence.port);

    let trusting = Gateway::start(&url, &nats_url(), &["--persistence-ca", &ca.pem]);
    loads_and_writes(&trusting).await;

    // The system's roots do not know the test CA; another CA did not sign the certificate;
    // plaintext gRPC does not speak to a TLS server.
    let without_ca = Gateway::start(&url, &nats_url(), &[]);
    refused(&without_ca).await;
    let other = Gateway::start(&url, &nats_url(), &["--persistence-ca", &other_ca.pem]);
    refused(&other).await;
    let plaintext = Gateway::start(
        &format!("http://localhost:{}", persistence.port),
        &nats_url(),
        &[],
    );
    refused(&plaintext).await;

    // The trusting gateway still works after all that.
    loads_and_writes(&trusting).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistence_with_a_client_ca_serves_only_gateways_with_a_client_certificate() {
    let Pki {
        files,
        ca,
        other_ca,
        cert,
        key,
    } = Pki::new();
    let (client_cert, client_key) = ca.issue(
        &files,
        "gateway",
        &["gateway"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let (stranger_cert, stranger_key) = other_ca.issue(
        &files,
        "stranger",
        &["gateway"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let database = Database::create().await;
    let persistence = persistence(
        &database,
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca.pem,
            "--health-listen",
            "127.0.0.1:0",
        ],
    );
    let url = format!("https://localhost:{}", persistence.port);

    let with_certificate = Gateway::start(
        &url,
        &nats_url(),
        &[
            "--persistence-ca",
            &ca.pem,
            "--persistence-client-cert",
            &client_cert,
            "--persistence-client-key",
            &client_key,
        ],
    );
    loads_and_writes(&with_certificate).await;

    let without_certificate = Gateway::start(&url, &nats_url(), &["--persistence-ca", &ca.pem]);
    refused(&without_certificate).await;
    let with_a_stranger = Gateway::start(
        &url,
        &nats_url(),
        &[
            "--persistence-ca",
            &ca.pem,
            "--persistence-client-cert",
            &stranger_cert,
            "--persistence-client-key",
            &stranger_key,
        ],
    );
    refused(&with_a_stranger).await;

    // Probes without a certificate (Kubernetes' gRPC probe) read readiness from the plaintext
    // health port.
    let marker = "\"health_listen\":\"127.0.0.1:";
    let health_port: u16 = persistence
        .output()
        .iter()
        .find_map(|line| {
            let start = line.find(marker)? + marker.len();
            line[start..].split('"').next()?.parse().ok()
        })
        .expect("the health port in the log");
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{health_port}"))
            .unwrap()
            .connect_lazy();
    let mut statuses = tonic_health::pb::health_client::HealthClient::new(channel)
        .watch(tonic_health::pb::HealthCheckRequest {
            service: "secsync.persistence.v1.Persistence".into(),
        })
        .await
        .expect("the health service in plaintext")
        .into_inner();
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    let wait = tokio::time::timeout(common::WAIT, async {
        while let Some(status) = statuses.message().await.unwrap() {
            if status.status == serving {
                return;
            }
        }
        panic!("the health stream ended");
    });
    wait.await.expect("persistence never reported SERVING");
}

/// Bad TLS configuration stops either binary at start with a message naming the problem.
#[test]
fn bad_tls_configuration_is_an_error_at_start() {
    let files = Files::new("tls");
    let not_pem = files.write("garbage.pem", "not a certificate\n");
    let missing = files.0.join("missing.pem").display().to_string();
    let gateway = env!("CARGO_BIN_EXE_secsync-gateway");
    let cases: [(&Path, Vec<&str>, &str); 5] = [
        (
            Path::new(gateway),
            vec![
                "--persistence",
                "https://localhost:1",
                "--persistence-ca",
                &missing,
            ],
            "--persistence-ca",
        ),
        (
            Path::new(gateway),
            vec![
                "--persistence",
                "https://localhost:1",
                "--persistence-ca",
                &not_pem,
            ],
            "no PEM certificate",
        ),
        (
            Path::new(gateway),
            vec![
                "--persistence",
                "http://localhost:1",
                "--persistence-ca",
                &not_pem,
            ],
            "https://",
        ),
        (
            Path::new(gateway),
            vec!["--persistence-client-cert", &not_pem],
            "--persistence-client-key",
        ),
        (
            &persistence_binary(),
            vec![
                "--database-url",
                "postgres://x@127.0.0.1:1/x",
                "--tls-cert",
                &not_pem,
                "--tls-key",
                &not_pem,
            ],
            "TLS certificate or key",
        ),
    ];
    for (binary, args, expected) in cases {
        let output = std::process::Command::new(binary)
            .args(&args)
            .args(["--listen", "127.0.0.1:0"])
            .args(if binary == Path::new(gateway) {
                &["--auth", "open"][..]
            } else {
                &[]
            })
            .env("SECSYNC_LOG_FORMAT", "json")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stderr).into_owned()
            + &String::from_utf8_lossy(&output.stdout);
        assert!(!output.status.success(), "{args:?} started");
        assert!(text.contains(expected), "{args:?}: {text}");
    }
}
