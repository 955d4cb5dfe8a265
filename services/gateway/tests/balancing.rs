//! `--persistence` balancing over a name with several addresses, with real processes: two
//! persistence processes on one database, on 127.0.0.1 and 127.0.0.2 with the same port, and a
//! gateway that reaches them under ONE host name. The name resolves to both addresses through a
//! private /etc/hosts bind-mounted in a mount namespace of the gateway's own (`unshare --mount`),
//! so the gateway's resolver path (getaddrinfo, every few seconds) is the real one and the
//! machine's /etc/hosts is untouched.
//!
//! The persistence processes are this test binary started again, running
//! [`persistence_process`]: the persistence service with a wrapper that prints a line for every
//! call it serves, so the test sees which instance served what.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    clippy::disallowed_methods // the child process reads its one setting from the environment
)]

mod common;

use std::io::{BufRead as _, BufReader};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use common::{doc_id, nats_url, update_clock, Database, Gateway, Signer, Ws, WAIT};
use secsync_persistence::grpc::PersistenceService;
use secsync_persistence::postgres::{PgBackend, PgSettings};
use secsync_persistence::{Core, CoreOptions};
use secsync_protocol::ServerFrame;
use secsync_rpc::v1 as pb;
use secsync_rpc::v1::persistence_server::{Persistence, PersistenceServer};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

/// The name both persistence instances are reached under (`.test` is reserved for testing).
const NAME: &str = "persistence.balancing.test";
/// Set in a child process: `ADDRESS DATABASE_URL` to serve, then `unary` for a process that
/// does not know the `Submit` stream (a persistence older than the gateway).
const CHILD: &str = "SECSYNC_TEST_PERSISTENCE_PROCESS";
/// The helper test the children run.
const CHILD_TEST: &str = "persistence_process";

/// Not a test of its own: the body of a persistence process (see the module's documentation).
/// Without [`CHILD`] set it returns at once.
#[test]
#[ignore = "started as a child process by the balancing test"]
fn persistence_process() {
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    let mut words = spec.split(' ');
    let (address, database) = (words.next().unwrap(), words.next().unwrap());
    let unary = words.next() == Some("unary");
    let address: SocketAddr = address.parse().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(address).await.unwrap();
        let backend = PgBackend::connect_lazy(database, &PgSettings::default()).unwrap();
        backend.migrate().await.unwrap();
        let service = Counting(
            PersistenceService::new(Core::start(backend, CoreOptions::default())),
            unary,
        );
        // On a line of its own: the test harness has just printed the test's name.
        println!("\nlistening {address}");
        tonic::transport::Server::builder()
            .add_service(PersistenceServer::new(service))
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            )
            .await
            .unwrap();
    });
}

/// The persistence service, printing `served METHOD` for every call before serving it; with
/// `.1` set, without the `Submit` stream.
struct Counting(PersistenceService<PgBackend>, bool);

fn served(method: &str) {
    println!("served {method}");
}

#[tonic::async_trait]
impl Persistence for Counting {
    type LoadDocumentStream = <PersistenceService<PgBackend> as Persistence>::LoadDocumentStream;
    type ReadEventsStream = <PersistenceService<PgBackend> as Persistence>::ReadEventsStream;
    type SubmitStream = <PersistenceService<PgBackend> as Persistence>::SubmitStream;

    async fn load_document(
        &self,
        request: Request<pb::LoadDocumentRequest>,
    ) -> Result<Response<Self::LoadDocumentStream>, Status> {
        served("load_document");
        self.0.load_document(request).await
    }

    async fn submit_snapshot(
        &self,
        request: Request<pb::SubmitSnapshotRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        served("submit_snapshot");
        self.0.submit_snapshot(request).await
    }

    async fn submit_update(
        &self,
        request: Request<pb::SubmitUpdateRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        served("submit_update");
        self.0.submit_update(request).await
    }

    async fn submit(
        &self,
        request: Request<tonic::Streaming<pb::SubmitRequest>>,
    ) -> Result<Response<Self::SubmitStream>, Status> {
        if self.1 {
            return Err(Status::unimplemented("not in this version"));
        }
        let requests = futures::StreamExt::inspect(request.into_inner(), |request| {
            if let Ok(request) = request {
                if request.kind == pb::SubmitKind::Update as i32 {
                    served("submit_update");
                } else {
                    served("submit_snapshot");
                }
            }
        });
        Ok(Response::new(self.0.submit_stream(requests)))
    }

    async fn read_events(
        &self,
        request: Request<pb::ReadEventsRequest>,
    ) -> Result<Response<Self::ReadEventsStream>, Status> {
        served("read_events");
        self.0.read_events(request).await
    }

    async fn get_heads(
        &self,
        request: Request<pb::GetHeadsRequest>,
    ) -> Result<Response<pb::GetHeadsResponse>, Status> {
        served("get_heads");
        self.0.get_heads(request).await
    }
}

/// One persistence process on a fixed address; killed on drop.
struct PersistenceProcess {
    address: SocketAddr,
    database: String,
    /// Without the `Submit` stream.
    unary: bool,
    child: Option<Child>,
    /// Updates this process (the current one, not an earlier one on the same address) served.
    updates: watch::Receiver<u64>,
    /// Loads this process served.
    loads: watch::Receiver<u64>,
}

impl PersistenceProcess {
    fn start(address: SocketAddr, database: &str) -> Self {
        Self::start_as(address, database, false)
    }

    fn start_as(address: SocketAddr, database: &str, unary: bool) -> Self {
        let mut process = Self {
            address,
            database: database.to_owned(),
            unary,
            child: None,
            updates: watch::channel(0).1,
            loads: watch::channel(0).1,
        };
        process.start_again();
        process
    }

    /// Starts a new process on the same address; returns once it listens.
    fn start_again(&mut self) {
        assert!(self.child.is_none(), "still running");
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([CHILD_TEST, "--exact", "--ignored", "--nocapture"])
            .args(["--test-threads", "1"])
            .env(
                CHILD,
                format!(
                    "{} {}{}",
                    self.address,
                    self.database,
                    if self.unary { " unary" } else { "" }
                ),
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start a persistence process");
        let stdout = child.stdout.take().unwrap();
        let (updates, counted) = watch::channel(0u64);
        let updates = Arc::new(updates);
        let (loads, loads_counted) = watch::channel(0u64);
        let (listening, is_listening) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("listening ") {
                    let _ = listening.send(());
                } else if line == "served submit_update" {
                    updates.send_modify(|n| *n += 1);
                } else if line == "served load_document" {
                    loads.send_modify(|n| *n += 1);
                }
            }
        });
        if is_listening.recv_timeout(WAIT).is_err() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("persistence on {} did not start", self.address);
        }
        self.child = Some(child);
        self.updates = counted;
        self.loads = loads_counted;
    }

    /// SIGKILL: no drain, open connections just break.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn updates(&self) -> u64 {
        *self.updates.borrow()
    }

    fn loads(&self) -> u64 {
        *self.loads.borrow()
    }

    /// Waits until this process has served at least `count` updates.
    async fn served_updates(&mut self, count: u64) {
        let address = self.address;
        tokio::time::timeout(WAIT, self.updates.wait_for(|n| *n >= count))
            .await
            .unwrap_or_else(|_| panic!("{address} served fewer than {count} updates"))
            .unwrap();
    }
}

impl Drop for PersistenceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port free on both 127.0.0.1 and 127.0.0.2, below the ephemeral range: a port from that
/// range could meanwhile become the source port of some outgoing connection (even one of the
/// gateway's own reconnect attempts), and then the killed instance could not listen again.
fn port_free_on_both() -> u16 {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let low = 10_000u16.min(ephemeral_start / 2);
    for _ in 0..200 {
        let port = low + rand::random::<u16>() % (ephemeral_start - low);
        let free = |ip: Ipv4Addr| TcpListener::bind(SocketAddrV4::new(ip, port)).is_ok();
        if free(Ipv4Addr::LOCALHOST) && free(Ipv4Addr::new(127, 0, 0, 2)) {
            return port;
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

/// A hosts file naming both instances.
fn hosts_file() -> (PathBuf, impl Drop) {
    struct Remove(PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let path = std::env::temp_dir().join(format!(
        "secsync-hosts-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::write(
        &path,
        format!("127.0.0.1 localhost\n127.0.0.1 {NAME}\n127.0.0.2 {NAME}\n"),
    )
    .unwrap();
    (path.clone(), Remove(path))
}

/// The command prefix that runs a program with `hosts` as its /etc/hosts, in a mount namespace
/// of its own (the bind mount is invisible to every other process). Checked here, so a machine
/// where it cannot work fails with the reason instead of a confusing gateway error.
fn with_private_hosts(hosts: &Path) -> Vec<String> {
    let script = r#"mount --bind "$0" /etc/hosts && exec "$@""#;
    let attempts: [&[&str]; 2] = [&["--mount"], &["--mount", "--map-root-user"]];
    let mut failures = Vec::new();
    for flags in attempts {
        let mut prefix: Vec<String> = vec!["unshare".into()];
        prefix.extend(flags.iter().map(|f| (*f).to_owned()));
        prefix.extend(["sh".into(), "-c".into(), script.into()]);
        prefix.push(hosts.display().to_string());
        let output = Command::new(&prefix[0])
            .args(&prefix[1..])
            .args(["getent", "ahostsv4", NAME])
            .output();
        match output {
            Ok(output) => {
                let text = String::from_utf8_lossy(&output.stdout);
                if text.contains("127.0.0.1") && text.contains("127.0.0.2") {
                    return prefix;
                }
                failures.push(format!(
                    "unshare {flags:?}: exit {:?}, stdout {text:?}, stderr {:?}",
                    output.status.code(),
                    String::from_utf8_lossy(&output.stderr)
                ));
            }
            Err(error) => failures.push(format!("unshare {flags:?}: {error}")),
        }
    }
    panic!("cannot give the gateway a private /etc/hosts: {failures:#?}");
}

/// Opens `doc` and saves its first snapshot ("S1").
async fn writer_on(base: &str, doc: &str, signer: &Signer) -> Ws {
    let (mut writer, _) = Ws::open(base, doc).await;
    writer.send(&signer.first_snapshot(doc, "S1")).await;
    assert!(matches!(
        writer.next().await,
        Some(ServerFrame::SnapshotSaved(_))
    ));
    writer
}

/// Sends one update; it must be acknowledged.
async fn write(writer: &mut Ws, signer: &Signer, doc: &str, clock: &mut u64) {
    writer.send(&signer.update(doc, "S1", *clock)).await;
    match writer.next().await {
        Some(ServerFrame::UpdateSaved { .. }) => *clock += 1,
        other => panic!("update {clock}: {other:?}"),
    }
}

/// Opens the document; the load must succeed at once (no close with 1011).
async fn load(base: &str, doc: &str) -> Vec<String> {
    let (_ws, first) = Ws::open(base, doc).await;
    let ServerFrame::Document { updates, .. } = first else {
        unreachable!("Ws::open checks for a document")
    };
    updates
}

/// `count` loads in a row, each succeeding at once.
async fn loads(base: &str, doc: &str, count: usize) {
    for _ in 0..count {
        load(base, doc).await;
    }
}

/// Writes until `process` has served one, within [`WAIT`]: the address was noticed to be back
/// (by the gateway's probe) and takes traffic again.
async fn write_until_served_by(
    process: &PersistenceProcess,
    writer: &mut Ws,
    signer: &Signer,
    doc: &str,
    clock: &mut u64,
) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while process.updates() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} takes no writes again",
            process.address
        );
        write(writer, signer, doc, clock).await;
    }
}

/// Writes and loads all succeed while either instance is down (the gateway neither retries
/// writes in its sessions nor lets a load fail: the store moves a failed call to the other
/// address and stops picking the dead one), both serve calls, and a restarted instance takes
/// traffic again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistence_balancing_follows_a_name_with_two_addresses() {
    let database = Database::create().await;
    let port = port_free_on_both();
    let mut first =
        PersistenceProcess::start(SocketAddr::from(([127, 0, 0, 1], port)), database.url());
    let mut second =
        PersistenceProcess::start(SocketAddr::from(([127, 0, 0, 2], port)), database.url());
    let (hosts, _remove_hosts) = hosts_file();
    let wrapper = with_private_hosts(&hosts);
    let gateway = Gateway::start_wrapped(
        &wrapper,
        &format!("http://{NAME}:{port}"),
        &nats_url(),
        // No retries in the session: a write that reaches a dead address must be saved by the
        // store's own retry on the other address, or the client sees update-save-failed.
        &["--write-retry-seconds", "0"],
    );
    gateway.ready().await;
    let base = gateway.url();

    let doc = doc_id("balance");
    let signer = Signer::new(1);
    let mut writer = writer_on(&base, &doc, &signer).await;
    let mut clock = 0;

    // Both up: the gateway spreads writes and loads over both addresses.
    while first.updates() == 0 || second.updates() == 0 {
        assert!(
            clock < 200,
            "one instance served nothing in {clock} updates"
        );
        write(&mut writer, &signer, &doc, &mut clock).await;
    }
    loads(&base, &doc, 10).await;
    assert!(first.loads() > 0 && second.loads() > 0, "loads not spread");

    // The first one killed, its address still in the name: every write and every load
    // succeeds, served by the second alone.
    first.kill();
    let (before_updates, before_loads) = (second.updates(), second.loads());
    for _ in 0..20 {
        write(&mut writer, &signer, &doc, &mut clock).await;
        loads(&base, &doc, 2).await;
    }
    loads(&base, &doc, 30).await;
    second.served_updates(before_updates + 20).await;
    assert!(
        second.loads() >= before_loads + 70,
        "loads served elsewhere"
    );

    // The first back on its address: it takes writes and loads again.
    first.start_again();
    write_until_served_by(&first, &mut writer, &signer, &doc, &mut clock).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while first.loads() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no loads again");
        load(&base, &doc).await;
    }

    // The second killed: writes and loads go on, served by the first.
    second.kill();
    let before = first.updates();
    for _ in 0..20 {
        write(&mut writer, &signer, &doc, &mut clock).await;
        loads(&base, &doc, 2).await;
    }
    first.served_updates(before + 20).await;

    // Every acknowledged update is stored once, in order: a new client loads them all.
    let clocks: Vec<u64> = load(&base, &doc)
        .await
        .iter()
        .map(|u| update_clock(&ServerFrame::Update(u.clone())).unwrap().1)
        .collect();
    assert_eq!(clocks, (0..clock).collect::<Vec<_>>());
}

/// A persistence that does not know the `Submit` stream (an older version, during a rolling
/// upgrade): the gateway notices and submits by unary calls; every write is saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_persistence_without_the_submit_stream_gets_unary_calls() {
    let database = Database::create().await;
    let port = port_free_on_both();
    let mut old = PersistenceProcess::start_as(
        SocketAddr::from(([127, 0, 0, 1], port)),
        database.url(),
        true,
    );
    let gateway = Gateway::start(&format!("http://127.0.0.1:{port}"), &nats_url(), &[]);
    gateway.ready().await;
    let base = gateway.url();
    let doc = doc_id("unary");
    let signer = Signer::new(1);
    let mut writer = writer_on(&base, &doc, &signer).await;
    let mut clock = 0;
    for _ in 0..5 {
        write(&mut writer, &signer, &doc, &mut clock).await;
    }
    old.served_updates(5).await;
    assert_eq!(load(&base, &doc).await.len(), 5);
}
