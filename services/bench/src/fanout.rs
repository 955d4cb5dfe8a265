//! `fanout`: one sender, R receivers spread over the endpoints (receiver i on endpoint
//! (i + 1) mod U, so with two gateways half of them are on the other one). The sender sends its
//! updates one after another (each after the previous acknowledgement, optionally paced); each
//! receiver timestamps every arrival. Latency = arrival − send, on one clock. Every receiver
//! must get every update in clock order; anything missing fails the phase.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use ed25519_dalek::SigningKey;
use futures::{SinkExt as _, StreamExt as _};
use secsync_client::crypto::random_bytes;
use secsync_client::DocumentKey;
use serde_json::json;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::report::{PhaseReport, Progress};
use crate::setup::{build_updates, classify, create_document, hello, Incoming, UpdateJob};
use crate::stats::Samples;
use crate::target::{next_text, open, Endpoint, Socket};

#[derive(Debug, Clone)]
pub struct Params {
    pub receivers: usize,
    pub updates: usize,
    /// Updates per second at most (`None`: each right after the previous acknowledgement).
    pub rate: Option<f64>,
    /// The first updates are sent but not counted (connections and caches warming up).
    pub warmup_updates: usize,
    pub update_bytes: usize,
    pub drain_seconds: f64,
}

#[derive(Debug, Default)]
struct Arrivals {
    /// Arrival time per clock.
    at: Vec<Option<Instant>>,
    out_of_order: u64,
    error: Option<String>,
}

#[allow(clippy::too_many_lines)] // one linear script: set up, send, collect, report
pub async fn run(
    endpoints: &[Endpoint],
    p: &Params,
    progress: Progress,
) -> anyhow::Result<PhaseReport> {
    let key = DocumentKey::generate();
    let doc = create_document(&endpoints[0], &key, 1024).await?;
    let author = SigningKey::from_bytes(&random_bytes());
    let bar = progress.bar(p.updates as u64, "signing");
    let mut built = build_updates(
        &[UpdateJob {
            doc: &doc,
            author,
            count: p.updates,
        }],
        &key,
        p.update_bytes,
        &bar,
    )?;
    bar.finish_and_clear();
    let sender_frames = built
        .pop()
        .ok_or_else(|| anyhow!("no frames built"))?
        .frames;

    let url = |e: &Endpoint| e.url(doc.id.as_str(), "mode=complete");
    let bar = progress.bar(p.receivers as u64, "connecting");
    let (done_tx, done_rx) = watch::channel(false);
    let mut receivers = Vec::with_capacity(p.receivers);
    let mut receiver_endpoint = Vec::with_capacity(p.receivers);
    for i in 0..p.receivers {
        let e = (i + 1) % endpoints.len();
        let (mut socket, _) = open(&endpoints[e], &url(&endpoints[e])).await?;
        // The JavaScript client's first frame after `document` (its ephemeral `initialize`);
        // our gateway holds live messages for a fresh connection until that frame.
        socket.send(Message::text(hello(&doc, &key)?)).await?;
        receiver_endpoint.push(e);
        receivers.push(tokio::spawn(receive(
            socket,
            p.updates,
            done_rx.clone(),
            Duration::from_secs_f64(p.drain_seconds),
        )));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let (mut sender, _) = open(&endpoints[0], &url(&endpoints[0])).await?;
    sender.send(Message::text(hello(&doc, &key)?)).await?;
    // Let the relay take the hellos before the clock starts.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let load_before = crate::report::load_average();
    let bar = progress.bar(p.updates as u64, "sending");
    let origin = Instant::now();
    let sent = send(&mut sender, &sender_frames, p.rate, origin, &bar).await;
    bar.finish_and_clear();
    done_tx.send_replace(true);
    let _ = sender.close(None).await;
    let mut arrivals = Vec::with_capacity(receivers.len());
    for r in receivers {
        arrivals.push(r.await.map_err(|e| anyhow!("receiver task: {e}"))?);
    }
    let load_after = crate::report::load_average();
    let sent = sent?;

    let mut report = PhaseReport::new();
    let mut all = Samples::default();
    let mut same = Samples::default();
    let mut cross = Samples::default();
    let (mut received, mut out_of_order) = (0u64, 0u64);
    for (a, e) in arrivals.into_iter().zip(&receiver_endpoint) {
        if let Some(err) = a.error {
            report.fail(format!("receiver: {err}"));
        }
        out_of_order += a.out_of_order;
        for (clock, at) in a.at.iter().enumerate() {
            let Some(at) = at else { continue };
            received += 1;
            if clock < p.warmup_updates {
                continue;
            }
            let latency = at.saturating_duration_since(sent[clock]);
            all.push(latency);
            if *e == 0 {
                same.push(latency);
            } else {
                cross.push(latency);
            }
        }
    }
    let expected = (p.updates * p.receivers) as u64;
    let missing = expected.saturating_sub(received);
    let all = all.summary();
    let same = same.summary();
    let cross = cross.summary();
    report.line(format!(
        "fanout: 1 sender on {}, {} receivers over {} endpoint(s), {} updates ({} warm-up)",
        endpoints[0],
        p.receivers,
        endpoints.len(),
        p.updates,
        p.warmup_updates
    ));
    report.line(format!("  delivery latency, all:           {}", all.line()));
    if endpoints.len() > 1 {
        report.line(format!(
            "  receivers on the sender's endpoint: {}",
            same.line()
        ));
        report.line(format!(
            "  receivers on other endpoints:   {}",
            cross.line()
        ));
    }
    report.line(format!(
        "  deliveries: {received} of {expected}, {missing} missing, {out_of_order} out of order"
    ));
    if missing > 0 {
        report.fail(format!("{missing} deliveries missing"));
    }
    if out_of_order > 0 {
        report.fail(format!("{out_of_order} deliveries out of clock order"));
    }
    report.set("receivers", p.receivers);
    report.set("updates", p.updates);
    report.set("warmup_updates", p.warmup_updates);
    report.set("rate", p.rate.map_or(serde_json::Value::Null, |r| json!(r)));
    report.set("endpoints", endpoints.len());
    report.set("delivery_ms", all.json());
    report.set("same_endpoint_ms", same.json());
    report.set("cross_endpoint_ms", cross.json());
    report.set(
        "deliveries",
        json!({"expected": expected, "received": received, "missing": missing,
               "out_of_order": out_of_order}),
    );
    report.set("load_average_before", json!(load_before));
    report.set("load_average_after", json!(load_after));
    Ok(report)
}

/// Sends every frame, each after the previous acknowledgement; returns the send times.
async fn send(
    sender: &mut Socket,
    frames: &[String],
    rate: Option<f64>,
    origin: Instant,
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<Vec<Instant>> {
    let interval = rate.map(|r| Duration::from_secs_f64(1.0 / r));
    let mut sent = Vec::with_capacity(frames.len());
    for (clock, frame) in frames.iter().enumerate() {
        if let Some(interval) = interval {
            tokio::time::sleep_until((origin + interval.mul_f64(clock as f64)).into()).await;
        }
        sent.push(Instant::now());
        sender.send(Message::text(frame.clone())).await?;
        loop {
            let reply = next_text(sender, Duration::from_secs(30)).await?;
            match classify(&reply) {
                Incoming::UpdateSaved { clock: c } if c == clock as u64 => break,
                Incoming::UpdateSaveFailed { .. } => {
                    bail!("the relay refused update {clock}: {reply:.200}")
                }
                // Other receivers' hellos, relayed.
                _ => {}
            }
        }
        bar.inc(1);
    }
    Ok(sent)
}

async fn receive(
    mut socket: Socket,
    updates: usize,
    mut done: watch::Receiver<bool>,
    drain: Duration,
) -> Arrivals {
    let mut a = Arrivals {
        at: vec![None; updates],
        ..Arrivals::default()
    };
    let mut next = 0u64;
    let mut count = 0usize;
    let mut deadline: Option<Instant> = None;
    while count < updates {
        let wake = deadline.unwrap_or_else(|| Instant::now() + Duration::from_hours(1));
        tokio::select! {
            msg = socket.next() => {
                let now = Instant::now();
                match msg {
                    Some(Ok(Message::Text(text))) => {
                        if let Incoming::Update { clock, .. } = classify(text.as_str()) {
                            if clock < next {
                                continue;
                            }
                            if clock > next {
                                a.out_of_order += 1;
                            }
                            next = clock + 1;
                            if let Some(slot) = usize::try_from(clock).ok().and_then(|c| a.at.get_mut(c)) {
                                *slot = Some(now);
                                count += 1;
                            }
                        }
                    }
                    Some(Ok(Message::Close(_))) | None => {
                        a.error = Some("connection closed".into());
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        a.error = Some(format!("read: {e}"));
                        break;
                    }
                }
            }
            _ = done.changed(), if deadline.is_none() => {
                deadline = Some(Instant::now() + drain);
            }
            () = tokio::time::sleep_until(wake.into()) => break,
        }
    }
    let _ = socket.close(None).await;
    a
}
