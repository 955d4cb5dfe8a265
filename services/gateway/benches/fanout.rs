//! Cross-gateway fan-out latency and memory per idle connection.
//!
//! Persistence runs in-process on a fresh database; real `secsync-gateway` processes share the
//! machine's NATS. `fanout`: one writer on gateway A sends updates one after another (each
//! after the previous acknowledgement); receivers on gateway B record when each arrives; the
//! latency is arrival minus send. `idle`: opens `--idle` connections to gateway A in steps of
//! `--idle-step`, from `--sources` loopback addresses (127.0.0.1, 127.0.0.2, …), each loading
//! one small document and then idling (reading only, so pings are answered); after every step
//! it reads the gateway's resident memory (VmRSS).
//!
//!     cargo bench -p secsync-gateway --bench fanout -- --updates 2000 --receivers 20 \
//!         --idle 15000 --idle-step 5000 --sources 4
//!
//! `--updates 0` skips the fan-out part. `--idle-snapshot-bytes N` gives the idle document a
//! snapshot of N bytes first, so every idle connection was sent a `document` of that size. `--gateway-env KEY=VALUE` (repeatable) sets an
//! environment variable of the gateway processes (e.g. `LD_PRELOAD` of another allocator).
//! This process holds every idle connection, and a process here may open at most 20,000 files,
//! so `--idle` is capped at 19,000.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    clippy::cast_precision_loss,
    clippy::too_many_lines // one linear script: set up, measure, report
)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use common::{doc_id, nats_url, update_clock, Gateway, Persistence, Signer, Ws};
use futures::StreamExt as _;
use secsync_protocol::ServerFrame;

/// Most idle connections this process may hold (its open-file limit is 20,000).
const MAX_IDLE: usize = 19_000;
/// Connections being opened at once.
const OPENING: usize = 64;

fn args() -> Vec<String> {
    std::env::args().collect()
}

fn arg(name: &str, default: usize) -> usize {
    let args = args();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Every `--gateway-env KEY=VALUE`.
fn gateway_env() -> Vec<(String, String)> {
    let args = args();
    args.windows(2)
        .filter(|w| w[0] == "--gateway-env")
        .filter_map(|w| w[1].split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1000.0
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Opens a connection from `source`, waits for its `document`, then keeps reading it.
async fn open_idle(base: String, doc: String, source: IpAddr) -> tokio::task::JoinHandle<()> {
    let mut ws = Ws::connect_from(&base, &doc, source).await;
    let first = ws.next().await.expect("first frame");
    assert!(matches!(first, ServerFrame::Document { .. }), "{first:?}");
    tokio::spawn(async move {
        let _ = ws.hold().await;
    })
}

async fn fanout(a: &Gateway, b: &Gateway, updates: usize, receivers: usize) -> (f64, f64) {
    let doc = doc_id("bench");
    let signer = Signer::new(1);
    let frames: Vec<String> = (0..updates as u64)
        .map(|c| signer.update(&doc, "S1", c))
        .collect();
    let (mut writer, _) = Ws::open(&a.url(), &doc).await;
    writer.send(&signer.first_snapshot(&doc, "S1")).await;
    assert!(matches!(
        writer.next().await,
        Some(ServerFrame::SnapshotSaved(_))
    ));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..receivers {
        let (mut ws, _) = Ws::open(&b.url(), &doc).await;
        tasks.push(tokio::spawn(async move {
            let mut arrivals = Vec::with_capacity(updates);
            while arrivals.len() < updates {
                let frame = ws.next().await.unwrap();
                if let Some((_, clock)) = update_clock(&frame) {
                    assert_eq!(clock as usize, arrivals.len());
                    arrivals.push(start.elapsed());
                }
            }
            arrivals
        }));
    }
    let mut sent = Vec::with_capacity(updates);
    for frame in &frames {
        sent.push(start.elapsed());
        writer.send(frame).await;
        assert!(matches!(
            writer.next().await,
            Some(ServerFrame::UpdateSaved { .. })
        ));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        let arrivals = task.await.unwrap();
        latencies.extend(
            arrivals
                .iter()
                .zip(&sent)
                .map(|(arrived, sent)| arrived.saturating_sub(*sent)),
        );
    }
    latencies.sort_unstable();
    println!(
        "fanout: {updates} updates x {receivers} receivers on the other gateway: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0)
    );
    (percentile(&latencies, 0.5), percentile(&latencies, 0.99))
}

#[tokio::main]
async fn main() {
    let updates = arg("--updates", 2000);
    let receivers = arg("--receivers", 20);
    let idle = arg("--idle", 15_000);
    assert!(
        idle <= MAX_IDLE,
        "--idle {idle}: this process may hold at most {MAX_IDLE} connections"
    );
    let step = arg("--idle-step", 5_000).clamp(1, idle.max(1));
    let sources = arg("--sources", 4).clamp(1, 250) as u8;
    let env = gateway_env();
    let persistence = Persistence::start().await;
    // The receivers here are raw connections that never send a frame, so the hold that protects
    // the JavaScript client's first load would delay their first half second.
    let args = ["--first-delivery-hold-ms", "0"];
    let a = Gateway::start_with_env(&persistence.url, &nats_url(), &args, 0, &env);
    a.ready().await;

    let (mut p50, mut p99) = (0.0, 0.0);
    if updates > 0 {
        let b = Gateway::start_with_env(&persistence.url, &nats_url(), &args, 0, &env);
        b.ready().await;
        (p50, p99) = fanout(&a, &b, updates, receivers).await;
    }

    // Memory per idle connection: every connection loads the same document, then idles.
    let idle_doc = doc_id("idle");
    let snapshot_bytes = arg("--idle-snapshot-bytes", 0);
    if snapshot_bytes > 0 {
        let signer = Signer::new(2);
        let (mut writer, _) = Ws::open(&a.url(), &idle_doc).await;
        let content = vec![b's'; snapshot_bytes];
        writer
            .send(&signer.large_first_snapshot(&idle_doc, "S1", &content))
            .await;
        assert!(matches!(
            writer.next().await,
            Some(ServerFrame::SnapshotSaved(_))
        ));
    }
    // Let the gateway settle (allocator caches, queued frames) before reading its memory.
    let settle = Duration::from_secs(2);
    tokio::time::sleep(settle).await;
    let before = rss_kib(a.pid());
    println!("idle: gateway RSS {before} KiB before the idle connections");
    let mut held = Vec::with_capacity(idle);
    let mut last = before;
    let mut per_connection = 0.0;
    while held.len() < idle {
        let count = step.min(idle - held.len());
        let first = held.len();
        let started = Instant::now();
        let opened: Vec<_> = futures::stream::iter(first..first + count)
            .map(|i| {
                let source = IpAddr::V4(Ipv4Addr::new(
                    127,
                    0,
                    0,
                    1 + (i % usize::from(sources)) as u8,
                ));
                open_idle(a.url(), idle_doc.clone(), source)
            })
            .buffer_unordered(OPENING)
            .collect()
            .await;
        held.extend(opened);
        let opening = started.elapsed();
        tokio::time::sleep(settle).await;
        let rss = rss_kib(a.pid());
        per_connection = (rss - before) as f64 / held.len() as f64;
        println!(
            "idle: {:>6} connections: gateway RSS {rss} KiB = {per_connection:.2} KiB per connection overall, {:.2} KiB per connection for the last {count} (opened in {:.1} s)",
            held.len(),
            (rss.saturating_sub(last)) as f64 / count as f64,
            opening.as_secs_f64()
        );
        last = rss;
    }
    println!(
        "{{\"bench\":\"gateway\",\"fanout_p50_ms\":{p50:.3},\"fanout_p99_ms\":{p99:.3},\"idle_connections\":{idle},\"rss_kib_per_connection\":{per_connection:.3}}}"
    );
    for task in held {
        task.abort();
    }
}
