//! `docload`: documents of one snapshot and 1,000 / 10,000 updates (`--docload-sizes`); each
//! is loaded `--docload-repeats` times by a fresh connection, timed from the TCP connect to the
//! last byte of the `document` frame: `complete` (the snapshot and every update) and `delta`
//! (everything known: an empty `updates`). Each frame is checked after its timing.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use ed25519_dalek::SigningKey;
use futures::SinkExt as _;
use secsync_client::crypto::random_bytes;
use secsync_client::DocumentKey;
use secsync_protocol::{parse_server_frame, ServerFrame};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::pipeline::Pipeline;
use crate::report::{PhaseReport, Progress};
use crate::setup::{build_updates, classify, create_document, Incoming, UpdateJob};
use crate::stats::Samples;
use crate::target::{connect, next_text, open, Endpoint, Reads, Socket};

#[derive(Debug, Clone)]
pub struct Params {
    pub sizes: Vec<usize>,
    pub repeats: usize,
    pub snapshot_bytes: usize,
    pub update_bytes: usize,
    /// Updates in flight while the document is written (not measured).
    pub upload_window: usize,
}

pub async fn run(
    endpoints: &[Endpoint],
    p: &Params,
    progress: Progress,
) -> anyhow::Result<PhaseReport> {
    let key = DocumentKey::generate();
    let mut report = PhaseReport::new();
    let load_before = crate::report::load_average();
    let mut results = Vec::new();
    for &n in &p.sizes {
        let doc = create_document(&endpoints[0], &key, p.snapshot_bytes).await?;
        let bar = progress.bar(n as u64, "signing");
        let mut built = build_updates(
            &[UpdateJob {
                doc: &doc,
                author: SigningKey::from_bytes(&random_bytes()),
                count: n,
            }],
            &key,
            p.update_bytes,
            &bar,
        )?;
        bar.finish_and_clear();
        let author = built.pop().ok_or_else(|| anyhow!("no frames built"))?;
        let bar = progress.bar(n as u64, "writing");
        let url = endpoints[0].url(doc.id.as_str(), "mode=complete");
        let (mut socket, _) = open(&endpoints[0], &url).await?;
        let failures = upload(&mut socket, author.frames, p.upload_window, &bar).await?;
        let _ = socket.close(None).await;
        bar.finish_and_clear();

        let mut entry = serde_json::Map::new();
        entry.insert("updates".into(), json!(n));
        entry.insert("upload_save_failures".into(), json!(failures));
        let delta_query = format!(
            "mode=delta&knownSnapshotId={}&knownSnapshotUpdateClocks=%7B%22{}%22%3A{}%7D",
            doc.snapshot.as_str(),
            author.pub_key,
            n.saturating_sub(1)
        );
        for (mode, query) in [
            ("complete", "mode=complete".to_owned()),
            ("delta", delta_query),
        ] {
            let bar = progress.bar(p.repeats as u64, mode);
            let mut times = Samples::default();
            let mut bytes = 0;
            // One untimed load first (the relay's and the client's first touch of the document).
            for i in 0..=p.repeats {
                let endpoint = &endpoints[i % endpoints.len()];
                let url = endpoint.url(doc.id.as_str(), &query);
                let started = Instant::now();
                let mut socket = connect(endpoint, &url, None, Reads::Large).await?;
                let first = next_text(&mut socket, Duration::from_mins(1)).await?;
                let elapsed = started.elapsed();
                drop(socket);
                check(&first, mode, n)?;
                bytes = first.len();
                if i > 0 {
                    times.push(elapsed);
                    bar.inc(1);
                }
            }
            bar.finish_and_clear();
            let s = times.summary();
            report.line(format!(
                "docload: 1 snapshot + {n} updates, {mode} ({bytes} bytes): p50 {:.2} ms, p95 {:.2} ms, p99 {:.2} ms, min {:.2} ms ({} loads)",
                s.p50, s.p95, s.p99, s.min, s.count
            ));
            let mut j = s.json();
            if let Some(o) = j.as_object_mut() {
                o.insert("bytes".into(), json!(bytes));
            }
            entry.insert(mode.into(), j);
        }
        if failures > 0 {
            report.line(format!(
                "  writing the {n}-update document took {failures} resends after update-save-failed"
            ));
        }
        results.push(serde_json::Value::Object(entry));
    }
    report.set("snapshot_plaintext_bytes", p.snapshot_bytes);
    report.set("repeats", p.repeats);
    report.set("documents", results);
    report.set("load_average_before", json!(load_before));
    report.set("load_average_after", json!(crate::report::load_average()));
    Ok(report)
}

/// The `document` frame must hold the snapshot and all `n` updates (`complete`), or no
/// snapshot and no update (`delta` with everything known).
fn check(frame: &str, mode: &str, n: usize) -> anyhow::Result<()> {
    let ServerFrame::Document {
        snapshot, updates, ..
    } = parse_server_frame(frame).map_err(|e| anyhow!("{mode} load: {e}"))?
    else {
        bail!("{mode} load answered {frame:.120}");
    };
    let want = if mode == "complete" { n } else { 0 };
    if updates.len() != want || (mode == "complete") != snapshot.is_some() {
        bail!(
            "{mode} load: {} updates and {} snapshot, expected {want} and {}",
            updates.len(),
            if snapshot.is_some() { "a" } else { "no" },
            if mode == "complete" { "one" } else { "none" },
        );
    }
    Ok(())
}

/// Writes the frames in order with `window` in flight; returns the resends needed.
async fn upload(
    socket: &mut Socket,
    frames: Vec<String>,
    window: usize,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<usize> {
    let mut pipe = Pipeline::new(frames.len(), window);
    while !pipe.complete() {
        while let Some(k) = pipe.ready() {
            socket.send(Message::text(frames[k].clone())).await?;
            pipe.sent(k);
        }
        let reply = next_text(socket, Duration::from_mins(1)).await?;
        match classify(&reply) {
            Incoming::UpdateSaved { clock } if pipe.acked(clock) => bar.inc(1),
            Incoming::UpdateSaveFailed { clock } => {
                pipe.failed(clock);
                if pipe.failures > 10 * frames.len().max(100) {
                    bail!(
                        "the relay keeps refusing updates ({} failures)",
                        pipe.failures
                    );
                }
            }
            _ => {}
        }
    }
    Ok(pipe.failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_frames_are_checked() {
        let full = "{\"type\":\"document\",\"snapshot\":{\"a\":1},\"updates\":[{\"u\":1},{\"u\":2}],\"snapshotProofChain\":[]}";
        assert!(check(full, "complete", 2).is_ok());
        assert!(check(full, "complete", 3).is_err());
        assert!(check(full, "delta", 2).is_err());
        assert!(check("{\"type\":\"document\",\"updates\":[]}", "delta", 2).is_ok());
        assert!(check("{\"type\":\"document-error\"}", "delta", 0).is_err());
    }
}
