//! Cross-gateway fan-out latency and memory per idle connection.
//!
//! Persistence runs in-process on a fresh database; two real `secsync-gateway` processes share
//! the machine's NATS. `fanout`: one writer on gateway A sends updates one after another (each
//! after the previous acknowledgement); receivers on gateway B record when each arrives; the
//! latency is arrival minus send. `idle`: opens `--idle` connections to gateway A and reads its
//! resident memory (VmRSS) before and after.
//!
//!     cargo bench -p secsync-gateway --bench fanout -- --updates 2000 --receivers 20 --idle 10000

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    clippy::cast_precision_loss,
    clippy::too_many_lines // one linear script: set up, measure, report
)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{doc_id, nats_url, update_clock, Gateway, Persistence, Signer, Ws};
use secsync_protocol::ServerFrame;

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
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

#[tokio::main]
async fn main() {
    let updates = arg("--updates", 2000);
    let receivers = arg("--receivers", 20);
    let idle = arg("--idle", 10_000);
    let persistence = Persistence::start().await;
    // The receivers here are raw connections that never send a frame, so the hold that protects
    // the JavaScript client's first load would delay their first half second.
    let args = ["--first-delivery-hold-ms", "0"];
    let a = Gateway::start(&persistence.url, &nats_url(), &args);
    let b = Gateway::start(&persistence.url, &nats_url(), &args);
    a.ready().await;
    b.ready().await;

    // Fan-out latency.
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

    // Memory per idle connection (each connection loads a small document, then idles).
    let idle_doc = doc_id("idle");
    let before = rss_kib(a.pid());
    let mut open = Vec::with_capacity(idle);
    for _ in 0..idle {
        open.push(Ws::open(&a.url(), &idle_doc).await.0);
    }
    // Let the gateway settle (allocator caches, queued frames) before reading its memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_kib(a.pid());
    println!(
        "idle: {idle} connections: gateway RSS {before} KiB -> {after} KiB = {:.2} KiB per connection",
        (after - before) as f64 / idle as f64
    );
    println!(
        "{{\"bench\":\"gateway\",\"fanout_p50_ms\":{:.3},\"fanout_p99_ms\":{:.3},\"idle_connections\":{idle},\"rss_kib_per_connection\":{:.3}}}",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        (after - before) as f64 / idle as f64
    );
    drop(open);
}
