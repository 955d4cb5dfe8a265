//! `idle`: K connections that load a small document and then stay idle; the server's resident
//! memory (VmRSS of `--server-pid`, summed over several) is read before and at each step
//! (`--idle-steps`, e.g. 5,000 / 10,000 / 15,000), giving memory per connection and the slope
//! between steps.
//!
//! The connections are held by worker processes (this binary's hidden `idle-worker`), at most
//! `--idle-per-process` each, because a process here may open at most 20,000 files. Each worker
//! binds its connections to its own loopback source addresses (127.0.0.x), so one address's
//! ephemeral port range (about 28,000 ports) is not a limit either. Workers keep reading, which
//! answers the relay's pings, and exit when their stdin closes (this process ending included).

use std::net::IpAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use futures::StreamExt as _;
use secsync_client::DocumentKey;
use serde_json::json;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, Command};

use crate::report::{rss_kib, PhaseReport, Progress};
use crate::setup::create_document;
use crate::target::{connect, next_text, parse_endpoint, source_addresses, Endpoint, Reads};

#[derive(Debug, Clone)]
pub struct Params {
    pub steps: Vec<usize>,
    pub server_pids: Vec<u32>,
    pub per_process: usize,
    /// Loopback source addresses per worker.
    pub sources_per_worker: u8,
    pub settle_seconds: f64,
    /// Connections a worker opens at once.
    pub parallel: usize,
    pub snapshot_bytes: usize,
}

/// What the worker is asked to do (the hidden `idle-worker` subcommand).
#[derive(Debug, Clone)]
pub struct WorkerParams {
    pub urls: Vec<String>,
    pub doc: String,
    pub count: usize,
    pub first_source: u8,
    pub sources: u8,
    pub parallel: usize,
}

fn sum_rss(pids: &[u32]) -> anyhow::Result<u64> {
    pids.iter().map(|p| rss_kib(*p)).sum()
}

#[allow(clippy::too_many_lines)] // one linear script: steps of workers, memory readings
pub async fn run(
    endpoints: &[Endpoint],
    p: &Params,
    progress: Progress,
) -> anyhow::Result<PhaseReport> {
    if p.server_pids.is_empty() {
        bail!("the idle phase needs --server-pid (the relay process whose memory is measured)");
    }
    let key = DocumentKey::generate();
    let doc = create_document(&endpoints[0], &key, p.snapshot_bytes).await?;
    let exe = std::env::current_exe().context("locating this binary for the idle workers")?;
    tokio::time::sleep(Duration::from_secs_f64(p.settle_seconds)).await;
    let rss0 = sum_rss(&p.server_pids)?;
    let load_before = crate::report::load_average();
    let total = p.steps.last().copied().unwrap_or(0);
    let bar = progress.bar(total as u64, "idle");
    let mut workers: Vec<Child> = Vec::new();
    let mut open = 0usize;
    let mut failed = 0usize;
    let mut steps = Vec::new();
    let mut report = PhaseReport::new();
    let (mut prev_conns, mut prev_rss) = (0usize, rss0);
    report.line(format!(
        "idle: server RSS before: {:.1} MiB (pid {:?})",
        rss0 as f64 / 1024.0,
        p.server_pids
    ));
    for &step in &p.steps {
        while open + failed < step {
            let count = (step - open - failed).min(p.per_process);
            let first_source = 2u8.saturating_add(
                u8::try_from(workers.len())
                    .unwrap_or(u8::MAX)
                    .saturating_mul(p.sources_per_worker),
            );
            if u16::from(first_source) + u16::from(p.sources_per_worker) > 255 {
                bail!(
                    "out of loopback source addresses (lower --idle-sources or add fewer workers)"
                );
            }
            let mut child = Command::new(&exe)
                .arg("idle-worker")
                .args(
                    endpoints
                        .iter()
                        .flat_map(|e| ["--url".to_owned(), e.base.clone()]),
                )
                // `--doc=ID`: a random document id may begin with '-', which would read as a flag.
                .arg(format!("--doc={}", doc.id.as_str()))
                .args(["--count", &count.to_string()])
                .args(["--first-source", &first_source.to_string()])
                .args(["--sources", &p.sources_per_worker.to_string()])
                .args(["--parallel", &p.parallel.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .context("starting an idle worker")?;
            let stdout = child
                .stdout
                .take()
                .ok_or_else(|| anyhow!("worker without stdout"))?;
            let mut lines = BufReader::new(stdout).lines();
            let base = open + failed;
            let (opened, fails, first_error) = loop {
                let line = tokio::time::timeout(Duration::from_mins(2), lines.next_line())
                    .await
                    .map_err(|_| anyhow!("an idle worker went silent for 2 minutes"))??
                    .ok_or_else(|| anyhow!("an idle worker exited early"))?;
                let mut words = line.split_whitespace();
                match (words.next(), words.next()) {
                    (Some("progress"), Some(n)) => {
                        bar.set_position((base + n.parse::<usize>().unwrap_or(0)) as u64);
                    }
                    (Some("ready"), Some(n)) => {
                        let opened: usize = n.parse()?;
                        let fails: usize = words.nth(1).unwrap_or("0").parse()?;
                        let rest: Vec<&str> = words.collect();
                        break (opened, fails, rest.join(" "));
                    }
                    _ => {}
                }
            };
            open += opened;
            failed += fails;
            bar.set_position((open + failed) as u64);
            if fails > 0 {
                report.fail(format!("{fails} idle connections failed: {first_error}"));
            }
            workers.push(child);
        }
        // Let the server settle (allocator caches, queued frames) before reading its memory.
        tokio::time::sleep(Duration::from_secs_f64(p.settle_seconds)).await;
        let rss = sum_rss(&p.server_pids)?;
        let per_conn = (rss.saturating_sub(rss0)) as f64 / open.max(1) as f64;
        let slope =
            (rss as f64 - prev_rss as f64) / (open.saturating_sub(prev_conns)).max(1) as f64;
        bar.println(format!(
            "  {open} idle connections: server RSS {:.1} MiB, {per_conn:.2} KiB per connection, {slope:.2} KiB per connection since the last step",
            rss as f64 / 1024.0
        ));
        report.line(format!(
            "  {open} idle connections: server RSS {:.1} MiB, {per_conn:.2} KiB per connection, {slope:.2} KiB per connection since the last step",
            rss as f64 / 1024.0
        ));
        steps.push(json!({
            "connections": open, "rss_kib": rss, "kib_per_connection": (per_conn * 100.0).round() / 100.0,
            "slope_kib_per_connection": (slope * 100.0).round() / 100.0,
        }));
        prev_conns = open;
        prev_rss = rss;
    }
    bar.finish_and_clear();
    let load_after = crate::report::load_average();
    for mut w in workers {
        // Closing stdin tells the worker to close its connections and exit.
        drop(w.stdin.take());
        if tokio::time::timeout(Duration::from_secs(20), w.wait())
            .await
            .is_err()
        {
            let _ = w.kill().await;
        }
    }
    report.set("server_pids", json!(p.server_pids));
    report.set("rss_kib_before", rss0);
    report.set("steps", steps);
    report.set("failed_connections", failed);
    report.set("per_process", p.per_process);
    report.set("snapshot_plaintext_bytes", p.snapshot_bytes);
    report.set("load_average_before", json!(load_before));
    report.set("load_average_after", json!(load_after));
    Ok(report)
}

/// The worker: opens its connections, reports, then holds them until stdin closes.
pub async fn worker(p: WorkerParams) -> anyhow::Result<()> {
    let endpoints = p
        .urls
        .iter()
        .map(|u| parse_endpoint(u))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if endpoints.is_empty() {
        bail!("no --url");
    }
    let sources: Vec<IpAddr> = source_addresses(p.first_source, p.sources.max(1));
    let mut stdout = tokio::io::stdout();
    let mut opened = 0usize;
    let mut failed = 0usize;
    let mut first_error = String::new();
    let attempts = futures::stream::iter(0..p.count)
        .map(|i| {
            let endpoint = &endpoints[i % endpoints.len()];
            let source = sources[(i / endpoints.len()) % sources.len()];
            let url = endpoint.url(&p.doc, "mode=complete");
            async move {
                let mut socket = connect(endpoint, &url, Some(source), Reads::Small).await?;
                let first = next_text(&mut socket, Duration::from_mins(1)).await?;
                if !crate::target::is_type(&first, "document") {
                    bail!("connection answered with {first:.80}");
                }
                Ok::<_, anyhow::Error>(socket)
            }
        })
        .buffer_unordered(p.parallel.max(1));
    futures::pin_mut!(attempts);
    while let Some(result) = attempts.next().await {
        match result {
            Ok(mut socket) => {
                opened += 1;
                // Keep reading: tungstenite answers pings while the stream is polled.
                tokio::spawn(async move { while let Some(Ok(_)) = socket.next().await {} });
            }
            Err(e) => {
                failed += 1;
                if first_error.is_empty() {
                    first_error = format!("{e:#}");
                }
            }
        }
        if (opened + failed).is_multiple_of(500) {
            stdout
                .write_all(format!("progress {}\n", opened + failed).as_bytes())
                .await?;
            stdout.flush().await?;
        }
    }
    stdout
        .write_all(
            format!(
                "ready {opened} failed {failed} {}\n",
                first_error.replace('\n', " ")
            )
            .as_bytes(),
        )
        .await?;
    stdout.flush().await?;
    // Hold until the parent closes our stdin (or ends).
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
    Ok(())
}
