//! `throughput`: N clients on M documents, each an author sending signed, encrypted updates
//! with a window of frames in flight, and each receiving the other authors' updates of its
//! document.
//!
//! Measured over `--seconds` after `--warmup-seconds`: acknowledged updates per second, the
//! acknowledgement latency (from the moment a frame was due to its `update-saved`), and the
//! delivery latency (from that moment to its arrival at every other client of the document).
//! With `--rate` the clients offer that many updates per second in total on a fixed schedule
//! (open loop, bounded by the window); latency then counts from the scheduled time, so a relay
//! that falls behind shows it. After the last acknowledgement every client must have received
//! every acknowledged update of its peers, in clock order: a missing or out-of-order delivery
//! fails the phase.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use ed25519_dalek::SigningKey;
use futures::{SinkExt as _, StreamExt as _};
use secsync_client::crypto::random_bytes;
use secsync_client::DocumentKey;
use serde_json::json;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use crate::pipeline::Pipeline;
use crate::report::{CpuWatch, PhaseReport, Progress};
use crate::setup::{build_updates, classify, create_document, Incoming, UpdateJob};
use crate::stats::Samples;
use crate::target::{open, Endpoint, Socket};

/// Parameters of the phase (see `--help`).
#[derive(Debug, Clone)]
pub struct Params {
    pub clients: usize,
    pub docs: usize,
    pub window: usize,
    pub seconds: f64,
    pub warmup_seconds: f64,
    /// Offered updates per second over all clients; `None`: as fast as acknowledgements allow.
    pub rate: Option<f64>,
    /// Most updates built in total (the phase ends early for a client that runs out).
    pub max_updates: usize,
    pub update_bytes: usize,
    pub snapshot_bytes: usize,
    /// How long replies and deliveries may take after sending stopped.
    pub drain_seconds: f64,
    /// Processes (NAME, PID) and command names whose CPU time is reported for the timed part.
    pub watch: Vec<(String, String)>,
    pub watch_comms: Vec<String>,
}

/// Updates to build per client: what the schedule can use (plus slack), within the bound.
pub fn per_client_updates(p: &Params) -> usize {
    let cap = (p.max_updates / p.clients.max(1)).max(1);
    match p.rate {
        Some(rate) => {
            let need = rate * (p.seconds + p.warmup_seconds) / p.clients.max(1) as f64;
            ((need * 1.02).ceil() as usize + 4).min(cap)
        }
        None => cap,
    }
}

struct Shared {
    origin: Instant,
    start: Instant,
    window_start: Instant,
    send_end: Instant,
    interval: Duration,
    clients: usize,
    window: usize,
    /// The clients on each client's document, itself excluded.
    peers: Vec<Vec<usize>>,
    authors: HashMap<String, usize>,
    /// Per client and clock: nanoseconds from `origin` to the moment the frame was due, plus 1
    /// (0 = not sent yet).
    sent_at: Vec<Vec<AtomicU64>>,
    acked_total: Vec<AtomicU64>,
    finished: AtomicUsize,
    all_done: watch::Sender<bool>,
    acks: AtomicU64,
    reply_timeout: Duration,
    drain: Duration,
}

impl Shared {
    fn sent_time(&self, client: usize, clock: u64) -> Option<Instant> {
        let v = self
            .sent_at
            .get(client)?
            .get(usize::try_from(clock).ok()?)?
            .load(Ordering::Acquire);
        (v != 0).then(|| self.origin + Duration::from_nanos(v - 1))
    }

    fn in_window(&self, t: Instant) -> bool {
        t >= self.window_start && t < self.send_end
    }
}

#[derive(Debug, Default)]
struct ClientResult {
    acked: usize,
    acked_in_window: u64,
    ack: Samples,
    delivery: Samples,
    received: u64,
    expected: u64,
    gaps: u64,
    duplicates: u64,
    unknown_authors: u64,
    failures: usize,
    unanswered: usize,
    unexpected_acks: usize,
    ran_out: bool,
    malformed: u64,
    error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Sending,
    Finishing,
    Waiting,
    Draining,
}

#[allow(clippy::too_many_lines)] // one linear script: documents, frames, clients, run
pub async fn run(
    endpoints: &[Endpoint],
    p: &Params,
    progress: Progress,
) -> anyhow::Result<PhaseReport> {
    let key = DocumentKey::generate();
    let mut docs = Vec::with_capacity(p.docs);
    for d in 0..p.docs {
        docs.push(create_document(&endpoints[d % endpoints.len()], &key, p.snapshot_bytes).await?);
    }
    let per_client = per_client_updates(p);
    let bar = progress.bar((per_client * p.clients) as u64, "signing");
    let jobs: Vec<_> = (0..p.clients)
        .map(|c| UpdateJob {
            doc: &docs[c % p.docs],
            author: SigningKey::from_bytes(&random_bytes()),
            count: per_client,
        })
        .collect();
    let built = build_updates(&jobs, &key, p.update_bytes, &bar)?;
    bar.finish_and_clear();

    // Client c writes document c % M on endpoint (c / M) % U, so the authors of one document
    // sit on different gateways when there are several.
    let bar = progress.bar(p.clients as u64, "connecting");
    let mut sockets = Vec::with_capacity(p.clients);
    for c in 0..p.clients {
        let endpoint = &endpoints[(c / p.docs) % endpoints.len()];
        let doc = &docs[c % p.docs];
        let (socket, _) = open(endpoint, &endpoint.url(doc.id.as_str(), "mode=complete")).await?;
        sockets.push(socket);
        bar.inc(1);
    }
    bar.finish_and_clear();

    let authors: HashMap<String, usize> = built
        .iter()
        .enumerate()
        .map(|(c, a)| (a.pub_key.clone(), c))
        .collect();
    let peers = (0..p.clients)
        .map(|c| {
            (0..p.clients)
                .filter(|o| *o != c && o % p.docs == c % p.docs)
                .collect()
        })
        .collect();
    let origin = Instant::now();
    let start = origin + Duration::from_millis(200);
    let window_start = start + Duration::from_secs_f64(p.warmup_seconds);
    let send_end = window_start + Duration::from_secs_f64(p.seconds);
    let interval = p.rate.map_or(Duration::ZERO, |r| {
        Duration::from_secs_f64(p.clients as f64 / r)
    });
    let (all_done, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        origin,
        start,
        window_start,
        send_end,
        interval,
        clients: p.clients,
        window: p.window,
        peers,
        authors,
        sent_at: (0..p.clients)
            .map(|_| (0..per_client).map(|_| AtomicU64::new(0)).collect())
            .collect(),
        acked_total: (0..p.clients).map(|_| AtomicU64::new(0)).collect(),
        finished: AtomicUsize::new(0),
        all_done,
        acks: AtomicU64::new(0),
        reply_timeout: Duration::from_secs_f64(p.drain_seconds.max(1.0) * 3.0),
        drain: Duration::from_secs_f64(p.drain_seconds),
    });
    let load_before = crate::report::load_average();
    let cpu = CpuWatch::start(&p.watch, &p.watch_comms);
    let tasks: Vec<_> = sockets
        .into_iter()
        .zip(built)
        .enumerate()
        .map(|(c, (socket, author))| {
            let frames = author.frames.into_iter().map(Utf8Bytes::from).collect();
            tokio::spawn(client(shared.clone(), c, socket, frames))
        })
        .collect();

    let total_ms = (send_end - start).as_millis() as u64;
    let bar = progress.bar(total_ms, "running");
    let ticker = {
        let shared = shared.clone();
        let bar = bar.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let now = Instant::now();
                bar.set_position(now.saturating_duration_since(shared.start).as_millis() as u64);
                let acks = shared.acks.load(Ordering::Relaxed);
                let secs = now.saturating_duration_since(shared.start).as_secs_f64();
                if secs > 0.0 {
                    bar.set_message(format!("{acks} acked, {:.0}/s", acks as f64 / secs));
                }
                if now >= shared.send_end {
                    bar.set_message(format!("{acks} acked; waiting for replies and deliveries"));
                }
            }
        })
    };
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await.map_err(|e| anyhow!("client task: {e}"))?);
    }
    ticker.abort();
    bar.finish_and_clear();
    let load_after = crate::report::load_average();
    let mut report = summarize(p, &shared, results, per_client, load_before, load_after);
    cpu.finish(&mut report);
    Ok(report)
}

#[allow(clippy::too_many_lines)] // one state machine: send, finish, wait for the others, drain
async fn client(
    shared: Arc<Shared>,
    me: usize,
    mut socket: Socket,
    frames: Vec<Utf8Bytes>,
) -> ClientResult {
    let mut r = ClientResult::default();
    let mut pipe = Pipeline::new(frames.len(), shared.window);
    let mut next_clock: HashMap<usize, u64> = HashMap::new();
    let offset = shared
        .interval
        .mul_f64(me as f64 / shared.clients.max(1) as f64);
    let due = |k: usize| shared.start + offset + shared.interval.mul_f64(k as f64);
    let mut all_done = shared.all_done.subscribe();
    let mut stage = Stage::Sending;
    let finish_by = shared.send_end + shared.reply_timeout;
    let mut drain_by = finish_by + shared.drain;
    let mut published = false;
    let publish = |pipe: &mut Pipeline, r: &mut ClientResult, published: &mut bool| {
        if std::mem::replace(published, true) {
            return;
        }
        r.unanswered = pipe.abandon_in_flight();
        shared.acked_total[me].store(pipe.acked_count() as u64, Ordering::Release);
        if shared.finished.fetch_add(1, Ordering::AcqRel) + 1 == shared.clients {
            shared.all_done.send_replace(true);
        }
    };
    loop {
        let now = Instant::now();
        let mut wake = match stage {
            Stage::Sending => shared.send_end,
            Stage::Finishing => finish_by,
            Stage::Waiting | Stage::Draining => drain_by,
        };
        if stage == Stage::Sending {
            if now >= shared.send_end || pipe.complete() {
                r.ran_out = pipe.complete() && now < shared.send_end;
                stage = Stage::Finishing;
            } else {
                while let Some(k) = pipe.ready() {
                    let resend = pipe.is_resend(k);
                    // Paced: latency counts from the scheduled moment, even when the window
                    // made the frame late. Unpaced (and resends): from the actual send.
                    let when = if resend || shared.interval.is_zero() {
                        Instant::now()
                    } else {
                        due(k)
                    };
                    if when > Instant::now() {
                        wake = wake.min(when);
                        break;
                    }
                    if !resend {
                        let nanos = u64::try_from(when.duration_since(shared.origin).as_nanos())
                            .unwrap_or(u64::MAX - 1);
                        shared.sent_at[me][k].store(nanos + 1, Ordering::Release);
                    }
                    if let Err(e) = socket.send(Message::Text(frames[k].clone())).await {
                        r.error = Some(format!("send: {e}"));
                        break;
                    }
                    pipe.sent(k);
                }
                if r.error.is_some() {
                    break;
                }
            }
        }
        if stage == Stage::Finishing && (pipe.in_flight() == 0 || now >= finish_by) {
            publish(&mut pipe, &mut r, &mut published);
            stage = Stage::Waiting;
        }
        if stage == Stage::Waiting && *all_done.borrow() {
            r.expected = shared.peers[me]
                .iter()
                .map(|o| shared.acked_total[*o].load(Ordering::Acquire))
                .sum();
            drain_by = Instant::now() + shared.drain;
            stage = Stage::Draining;
        }
        if stage == Stage::Draining && (r.received >= r.expected || Instant::now() >= drain_by) {
            break;
        }
        if stage == Stage::Waiting && Instant::now() >= drain_by {
            r.error = Some("the other clients did not finish in time".into());
            break;
        }
        let waiting = stage == Stage::Waiting;
        tokio::select! {
            msg = socket.next() => {
                let now = Instant::now();
                let text = match msg {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(frame))) => {
                        r.error = Some(format!("closed by the relay: {frame:?}"));
                        break;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        r.error = Some(format!("read: {e}"));
                        break;
                    }
                    None => {
                        r.error = Some("connection ended".into());
                        break;
                    }
                };
                match classify(text.as_str()) {
                    Incoming::UpdateSaved { clock } => {
                        if pipe.acked(clock) {
                            shared.acks.fetch_add(1, Ordering::Relaxed);
                            if shared.in_window(now) {
                                r.acked_in_window += 1;
                            }
                            if let Some(sent) = shared.sent_time(me, clock) {
                                if shared.in_window(sent) {
                                    r.ack.push(now - sent);
                                }
                            }
                        }
                    }
                    Incoming::UpdateSaveFailed { clock } => pipe.failed(clock),
                    Incoming::Update { pub_key, clock } => {
                        let Some(&author) = shared.authors.get(&pub_key) else {
                            r.unknown_authors += 1;
                            continue;
                        };
                        let expect = next_clock.entry(author).or_insert(0);
                        if clock < *expect {
                            r.duplicates += 1;
                            continue;
                        }
                        if clock > *expect {
                            r.gaps += 1;
                        }
                        *expect = clock + 1;
                        r.received += 1;
                        if let Some(sent) = shared.sent_time(author, clock) {
                            if shared.in_window(sent) {
                                r.delivery.push(now.saturating_duration_since(sent));
                            }
                        }
                    }
                    Incoming::Other(kind) => {
                        if matches!(kind.as_str(), "document-error" | "unauthorized" | "invalid-message") {
                            r.error = Some(format!("the relay sent {kind}"));
                        }
                    }
                    Incoming::Malformed => r.malformed += 1,
                }
            }
            () = tokio::time::sleep_until(wake.into()) => {}
            _ = all_done.changed(), if waiting => {}
        }
    }
    // Left the loop on an error before publishing: peers must not wait for us.
    publish(&mut pipe, &mut r, &mut published);
    r.acked = pipe.acked_count();
    r.failures = pipe.failures;
    r.unexpected_acks = pipe.unexpected_acks;
    let _ = socket.close(None).await;
    r
}

#[allow(clippy::too_many_lines)] // one line and one field per measured quantity
fn summarize(
    p: &Params,
    shared: &Shared,
    results: Vec<ClientResult>,
    per_client: usize,
    load_before: Option<[f64; 3]>,
    load_after: Option<[f64; 3]>,
) -> PhaseReport {
    let mut report = PhaseReport::new();
    let mut ack = Samples::default();
    let mut delivery = Samples::default();
    let (mut acked, mut in_window, mut received, mut expected) = (0usize, 0u64, 0u64, 0u64);
    let (mut gaps, mut dups, mut unknown, mut failures, mut unanswered, mut unexpected) =
        (0u64, 0u64, 0u64, 0usize, 0usize, 0usize);
    let (mut ran_out, mut malformed) = (0usize, 0u64);
    let mut errors = Vec::new();
    for r in results {
        acked += r.acked;
        in_window += r.acked_in_window;
        received += r.received;
        expected += r.expected;
        gaps += r.gaps;
        dups += r.duplicates;
        unknown += r.unknown_authors;
        failures += r.failures;
        unanswered += r.unanswered;
        unexpected += r.unexpected_acks;
        ran_out += usize::from(r.ran_out);
        malformed += r.malformed;
        ack.extend(r.ack);
        delivery.extend(r.delivery);
        if let Some(e) = r.error {
            errors.push(e);
        }
    }
    let seconds = (shared.send_end - shared.window_start).as_secs_f64();
    let rate = in_window as f64 / seconds;
    let ack = ack.summary();
    let delivery = delivery.summary();
    let missing = expected.saturating_sub(received);
    let offered = p.rate.map_or_else(
        || "unpaced".to_owned(),
        |r| format!("{r:.0} updates/s offered"),
    );
    report.line(format!(
        "throughput: {} clients on {} documents, window {}, {offered}, {:.0} s (+{:.0} s warm-up)",
        p.clients, p.docs, p.window, p.seconds, p.warmup_seconds
    ));
    report.line(format!(
        "  {in_window} updates acknowledged in the window = {rate:.0} updates/s ({acked} in all)"
    ));
    report.line(format!("  ack latency:      {}", ack.line()));
    report.line(format!("  delivery latency: {}", delivery.line()));
    report.line(format!(
        "  deliveries: {received} of {expected} expected, {missing} missing, {gaps} out of order"
    ));
    if failures > 0 {
        report.line(format!(
            "  update-save-failed replies: {failures} (each sent again, as a client does)"
        ));
    }
    if ran_out > 0 {
        report.line(format!(
            "  note: {ran_out} clients used all {per_client} prebuilt updates before the end \
             (raise --max-updates; the rate is a lower bound)"
        ));
    }
    if missing > 0 {
        report.fail(format!("{missing} deliveries missing"));
    }
    if gaps > 0 {
        report.fail(format!("{gaps} deliveries out of clock order"));
    }
    if unanswered > 0 {
        report.fail(format!("{unanswered} updates never answered"));
    }
    if unexpected > 0 {
        report.fail(format!(
            "{unexpected} acknowledgements for nothing in flight"
        ));
    }
    if unknown > 0 || malformed > 0 {
        report.fail(format!(
            "{unknown} updates from unknown authors, {malformed} malformed frames"
        ));
    }
    if in_window == 0 {
        report.fail("nothing acknowledged in the measuring window");
    }
    for e in errors.iter().take(3) {
        report.fail(format!("client error: {e}"));
    }
    report.set("clients", p.clients);
    report.set("docs", p.docs);
    report.set("window", p.window);
    report.set("seconds", p.seconds);
    report.set("warmup_seconds", p.warmup_seconds);
    report.set(
        "offered_rate",
        p.rate.map_or(serde_json::Value::Null, |r| json!(r)),
    );
    report.set("update_plaintext_bytes", p.update_bytes);
    report.set("updates_acked_in_window", in_window);
    report.set("updates_acked_total", acked);
    report.set("updates_per_second", (rate * 10.0).round() / 10.0);
    report.set("ack_ms", ack.json());
    report.set("delivery_ms", delivery.json());
    report.set(
        "deliveries",
        json!({"expected": expected, "received": received, "missing": missing,
               "out_of_order": gaps, "duplicates": dups}),
    );
    report.set("save_failures", failures);
    report.set("unanswered", unanswered);
    report.set("clients_out_of_updates", ran_out);
    report.set("prebuilt_per_client", per_client);
    report.set("load_average_before", json!(load_before));
    report.set("load_average_after", json!(load_after));
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(rate: Option<f64>) -> Params {
        Params {
            clients: 10,
            docs: 5,
            window: 4,
            seconds: 10.0,
            warmup_seconds: 1.0,
            rate,
            max_updates: 100_000,
            update_bytes: 40,
            snapshot_bytes: 100,
            drain_seconds: 5.0,
            watch: Vec::new(),
            watch_comms: Vec::new(),
        }
    }

    #[test]
    fn prebuilt_updates_follow_the_rate_within_the_bound() {
        assert_eq!(per_client_updates(&params(None)), 10_000);
        // 1,000/s for 11 s over 10 clients: 1,100 each, plus 2 % and a few.
        assert_eq!(per_client_updates(&params(Some(1000.0))), 1126);
        assert_eq!(per_client_updates(&params(Some(1e9))), 10_000);
    }
}
