//! The embedded binary's capacity: durable updates per second over WebSocket, and the time to
//! serve a large document.
//!
//! Starts a real `secsync` process on a fresh data directory (SQLite, fsync on every commit).
//! * throughput: `--writers` connections on `--docs` documents, each author sending signed,
//!   encrypted updates with `--window` frames in flight, for `--seconds`; every frame is built
//!   and signed before the clock starts. Prints updates/s and acknowledgement latency.
//! * docload: a document of one snapshot and `--load-updates` updates, then `--load-repeats`
//!   fresh connections in `complete` mode timed from the connect to the last byte of the
//!   `document` frame, and the same in `delta` mode with everything known.
//!
//! Run with:
//!
//!     cargo bench -p secsync --bench embedded -- --writers 16 --docs 16 --window 8 \
//!         --seconds 10 --load-updates 10000 --load-repeats 30

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    clippy::cast_precision_loss,
    clippy::too_many_lines // one linear script: set up, run, report
)]

use std::collections::VecDeque;
use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use futures::{SinkExt as _, StreamExt as _};
use secsync_client::crypto::random_bytes;
use secsync_client::frames::{build_snapshot, build_update, generate_snapshot_id, SnapshotSpec};
use secsync_client::{Clock, DocumentId, DocumentKey, SnapshotId};
use secsync_protocol::b64;
use tokio_tungstenite::tungstenite::Message;

struct Args {
    writers: usize,
    docs: usize,
    window: usize,
    seconds: u64,
    per_writer: usize,
    load_updates: usize,
    load_repeats: usize,
}

fn args() -> Args {
    let mut args = Args {
        writers: 16,
        docs: 16,
        window: 8,
        seconds: 10,
        per_writer: 8000,
        load_updates: 10_000,
        load_repeats: 30,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().expect("flag value").parse::<usize>().unwrap();
        match flag.as_str() {
            "--writers" => args.writers = value(),
            "--docs" => args.docs = value(),
            "--window" => args.window = value(),
            "--seconds" => args.seconds = value() as u64,
            "--per-writer" => args.per_writer = value(),
            "--load-updates" => args.load_updates = value(),
            "--load-repeats" => args.load_repeats = value(),
            _ => {} // cargo bench passes its own flags (e.g. --bench)
        }
    }
    args
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Relay {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Relay {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("secsync-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut child = Command::new(env!("CARGO_BIN_EXE_secsync"))
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&dir)
            // The load generator is the limit under test, not the per-connection rate limit.
            .args(["--rate-per-second", "1000000", "--rate-burst", "1000000"])
            .env("SECSYNC_LOG_FORMAT", "json")
            .env("RUST_LOG", "warn,secsync=info")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let marker = "\"listen\":\"127.0.0.1:";
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(start) = line.find(marker) {
                    let port = line[start + marker.len()..].split('"').next().unwrap();
                    let _ = tx.send(port.parse::<u16>().unwrap());
                }
            }
        });
        let port = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        Self { child, port, dir }
    }

    fn url(&self, doc: &DocumentId, query: &str) -> String {
        format!(
            "ws://127.0.0.1:{}/{}?sessionKey=bench&{query}",
            self.port,
            doc.as_str()
        )
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn open(url: &str) -> (Socket, String) {
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let first = next_text(&mut socket).await;
    (socket, first)
}

async fn next_text(socket: &mut Socket) -> String {
    loop {
        match socket.next().await.unwrap().unwrap() {
            Message::Text(text) => return text.as_str().to_owned(),
            Message::Close(frame) => panic!("closed: {frame:?}"),
            _ => {}
        }
    }
}

/// A document with a first snapshot; returns its id.
async fn new_document(relay: &Relay, key: &DocumentKey) -> (DocumentId, SnapshotId) {
    let doc = DocumentId::parse(&b64::encode(random_bytes::<24>())).unwrap();
    let snapshot_id = generate_snapshot_id().unwrap();
    let author = SigningKey::from_bytes(&random_bytes());
    let clocks = std::collections::BTreeMap::new();
    let spec = SnapshotSpec {
        doc_id: &doc,
        snapshot_id: &snapshot_id,
        parent: None,
        parent_snapshot_update_clocks: &clocks,
    };
    let built = build_snapshot(&spec, b"initial document state", key, &author).unwrap();
    let (mut socket, _) = open(&relay.url(&doc, "mode=complete")).await;
    socket.send(Message::text(built.text)).await.unwrap();
    let reply = next_text(&mut socket).await;
    assert!(reply.contains("snapshot-saved"), "{reply}");
    (doc, snapshot_id)
}

fn updates(doc: &DocumentId, snapshot: &SnapshotId, key: &DocumentKey, n: usize) -> Vec<String> {
    let author = SigningKey::from_bytes(&random_bytes());
    (0..n as u64)
        .map(|clock| {
            // A typical small Yjs change: a few dozen bytes of plaintext.
            let plaintext = format!("{clock:08}: one typed character and its Yjs header");
            build_update(
                doc,
                snapshot,
                Clock::new(clock).unwrap(),
                plaintext.as_bytes(),
                key,
                &author,
            )
            .unwrap()
        })
        .collect()
}

/// Sends `frames` with `window` in flight until they run out or `deadline`; returns the
/// acknowledgement latencies. Broadcasts of other writers are read and ignored.
async fn write(
    mut socket: Socket,
    frames: Vec<String>,
    window: usize,
    deadline: Option<Instant>,
) -> Vec<Duration> {
    let mut frames = frames.into_iter();
    let mut in_flight: VecDeque<Instant> = VecDeque::new();
    let mut latencies = Vec::new();
    loop {
        let open = deadline.is_none_or(|d| Instant::now() < d);
        while open && in_flight.len() < window {
            let Some(frame) = frames.next() else { break };
            in_flight.push_back(Instant::now());
            socket.send(Message::text(frame)).await.unwrap();
        }
        if in_flight.is_empty() {
            break;
        }
        let text = next_text(&mut socket).await;
        if text.starts_with("{\"type\":\"update-saved\"") {
            latencies.push(in_flight.pop_front().unwrap().elapsed());
        } else {
            // Another writer's update, relayed as stored plus its type.
            assert!(
                text.ends_with(",\"type\":\"update\"}"),
                "unexpected: {text:.200}"
            );
        }
    }
    let _ = socket.close(None).await;
    latencies
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

async fn throughput(relay: &Relay, args: &Args, key: &DocumentKey) -> serde_json::Value {
    let mut docs = Vec::new();
    for _ in 0..args.docs {
        docs.push(new_document(relay, key).await);
    }
    println!(
        "throughput: building {} x {} signed updates…",
        args.writers, args.per_writer
    );
    let mut writers = Vec::new();
    for w in 0..args.writers {
        let (doc, snapshot) = &docs[w % docs.len()];
        let frames = updates(doc, snapshot, key, args.per_writer);
        let (socket, _) = open(&relay.url(doc, "mode=complete")).await;
        writers.push((socket, frames));
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    let tasks: Vec<_> = writers
        .into_iter()
        .map(|(socket, frames)| tokio::spawn(write(socket, frames, args.window, Some(deadline))))
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let rate = latencies.len() as f64 / elapsed;
    println!(
        "throughput: {} updates in {elapsed:.1} s = {rate:.0} updates/s; ack p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0),
    );
    serde_json::json!({
        "writers": args.writers, "docs": args.docs, "window": args.window,
        "updates": latencies.len(), "updates_per_second": rate.round(),
        "ack_p50_ms": percentile(&latencies, 0.5), "ack_p99_ms": percentile(&latencies, 0.99),
    })
}

async fn docload(relay: &Relay, args: &Args, key: &DocumentKey) -> serde_json::Value {
    let (doc, snapshot) = new_document(relay, key).await;
    let frames = updates(&doc, &snapshot, key, args.load_updates);
    let author = {
        let first = secsync_protocol::parse_client_frame(
            &frames[0],
            secsync_protocol::ParseOptions::default(),
        )
        .unwrap();
        let secsync_protocol::ClientFrame::Update(update) = first else {
            panic!("not an update")
        };
        update.signed.pub_key().as_str().to_owned()
    };
    let (socket, _) = open(&relay.url(&doc, "mode=complete")).await;
    write(socket, frames, 64, None).await;

    let complete = relay.url(&doc, "mode=complete");
    let delta = relay.url(
        &doc,
        &format!(
            "mode=delta&knownSnapshotId={}&knownSnapshotUpdateClocks=%7B%22{author}%22%3A{}%7D",
            snapshot.as_str(),
            args.load_updates - 1
        ),
    );
    let mut report = serde_json::Map::new();
    for (label, url) in [("complete", complete), ("delta", delta)] {
        let mut times = Vec::new();
        let mut bytes = 0;
        for _ in 0..args.load_repeats {
            let started = Instant::now();
            let (socket, first) = open(&url).await;
            times.push(started.elapsed());
            assert!(first.starts_with("{\"type\":\"document\""), "{first:.80}");
            bytes = first.len();
            drop(socket);
        }
        times.sort();
        println!(
            "docload {label}: 1 snapshot + {} updates, document frame {bytes} bytes: p50 {:.2} ms, p99 {:.2} ms, min {:.2} ms",
            args.load_updates,
            percentile(&times, 0.5),
            percentile(&times, 0.99),
            percentile(&times, 0.0),
        );
        report.insert(
            label.into(),
            serde_json::json!({"bytes": bytes, "p50_ms": percentile(&times, 0.5),
                "p99_ms": percentile(&times, 0.99), "min_ms": percentile(&times, 0.0)}),
        );
    }
    serde_json::Value::Object(report)
}

#[tokio::main]
async fn main() {
    let args = args();
    let relay = Relay::start();
    let key = DocumentKey::generate();
    let throughput = throughput(&relay, &args, &key).await;
    let docload = docload(&relay, &args, &key).await;
    println!(
        "{}",
        serde_json::json!({"bench": "embedded", "throughput": throughput, "docload": docload})
    );
}
