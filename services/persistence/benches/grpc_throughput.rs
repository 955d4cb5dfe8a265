//! Durable updates per second through the persistence service's gRPC API.
//!
//! Starts the service in-process on a loopback port against a fresh database, then runs
//! `--writers` concurrent writers over `--docs` documents (each writer one author on one
//! document, sending its next update as soon as the previous one is acknowledged). Every frame is built and signed before the clock starts.
//! Each update is a unary `SubmitUpdate` call, or with `--stream` a request on one `Submit`
//! stream shared by all writers (as a gateway sends them).
//! Prints updates/s and acknowledgement latency percentiles, and a JSON line.
//!
//!     cargo bench -p secsync-persistence --bench grpc_throughput -- \
//!         --writers 64 --docs 16 --seconds 10 [--stream] [--database-url postgres://…/postgres]

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::disallowed_methods,
    clippy::cast_precision_loss,
    clippy::too_many_lines // one linear script: set up, run, report
)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use secsync_persistence::postgres::{PgBackend, PgSettings};
use secsync_persistence::CoreOptions;
use secsync_protocol::crypto::INITIAL_PARENT_SNAPSHOT_PROOF;
use secsync_protocol::message::build_frame;
use secsync_protocol::{b64, Domain, PublicKey};
use secsync_rpc::v1 as pb;
use secsync_rpc::v1::persistence_client::PersistenceClient;
use sqlx::Connection as _;
use tonic::transport::Channel;

/// Updates per writer sent before the clock starts.
const WARMUP: usize = 20;

struct Args {
    stream: bool,
    writers: usize,
    docs: usize,
    seconds: u64,
    workers: usize,
    max_batch: usize,
    admin_url: String,
}

fn args() -> Args {
    let mut args = Args {
        stream: false,
        writers: 64,
        docs: 16,
        seconds: 10,
        workers: CoreOptions::default().workers,
        max_batch: CoreOptions::default().max_batch,
        admin_url: std::env::var("SECSYNC_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into()),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().expect("flag value");
        match flag.as_str() {
            "--writers" => args.writers = value().parse().unwrap(),
            "--docs" => args.docs = value().parse().unwrap(),
            "--seconds" => args.seconds = value().parse().unwrap(),
            "--workers" => args.workers = value().parse().unwrap(),
            "--max-batch" => args.max_batch = value().parse().unwrap(),
            "--database-url" => args.admin_url = value(),
            "--stream" => args.stream = true,
            _ => {} // cargo bench passes its own flags (e.g. --bench)
        }
    }
    args
}

/// How writers submit: a unary call each, or tagged requests on one shared `Submit` stream.
#[derive(Clone)]
enum Submitter {
    Unary(PersistenceClient<Channel>),
    Stream(Arc<Shared>),
}

/// The shared stream: requests go out tagged, a reader task hands each answer to its writer.
struct Shared {
    requests: tokio::sync::mpsc::Sender<pb::SubmitRequest>,
    waiting: Arc<Mutex<HashMap<u64, tokio::sync::oneshot::Sender<pb::SubmitResult>>>>,
    next_tag: AtomicU64,
}

impl Submitter {
    async fn open(client: &PersistenceClient<Channel>, stream: bool) -> Self {
        if !stream {
            return Self::Unary(client.clone());
        }
        let (requests, queued) = tokio::sync::mpsc::channel(4096);
        let waiting: Arc<Mutex<HashMap<u64, _>>> = Arc::default();
        let mut answers = client
            .clone()
            .submit(tokio_stream::wrappers::ReceiverStream::new(queued))
            .await
            .unwrap()
            .into_inner();
        let dispatch = waiting.clone();
        tokio::spawn(async move {
            while let Some(answer) = answers.message().await.unwrap() {
                let sender: tokio::sync::oneshot::Sender<pb::SubmitResult> =
                    dispatch.lock().unwrap().remove(&answer.tag).unwrap();
                let _ = sender.send(answer);
            }
        });
        Self::Stream(Arc::new(Shared {
            requests,
            waiting,
            next_tag: AtomicU64::new(0),
        }))
    }

    /// Submits an update; whether it was accepted.
    async fn update(&mut self, doc: &str, body: String) -> bool {
        match self {
            Self::Unary(client) => {
                let response = client
                    .submit_update(pb::SubmitUpdateRequest {
                        document_id: doc.to_owned(),
                        body,
                        request_id: None,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                matches!(
                    response.result,
                    Some(pb::submit_response::Result::Accepted(_))
                )
            }
            Self::Stream(shared) => {
                let tag = shared.next_tag.fetch_add(1, Ordering::Relaxed);
                let (sender, answer) = tokio::sync::oneshot::channel();
                shared.waiting.lock().unwrap().insert(tag, sender);
                shared
                    .requests
                    .send(pb::SubmitRequest {
                        tag,
                        kind: pb::SubmitKind::Update as i32,
                        document_id: doc.to_owned(),
                        body,
                        request_id: None,
                        trace_context: HashMap::new(),
                    })
                    .await
                    .unwrap();
                matches!(
                    answer.await.unwrap().result,
                    Some(pb::submit_result::Result::Decided(pb::SubmitResponse {
                        result: Some(pb::submit_response::Result::Accepted(_)),
                    }))
                )
            }
        }
    }
}

fn frame(domain: Domain, key: &SigningKey, public_data: &str, n: u64) -> String {
    let ciphertext = b64::encode(format!("{n:048}-ciphertext-of-a-typical-small-yjs-update-"));
    let nonce = b64::encode([(n % 251) as u8; 24]);
    build_frame(domain, &ciphertext, &nonce, public_data, key).unwrap()
}

#[tokio::main]
async fn main() {
    let args = args();
    let db = format!("secsync_bench_{}", std::process::id());
    let mut admin = sqlx::PgConnection::connect(&args.admin_url).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let base = args.admin_url.rsplit_once('/').unwrap().0;
    let url = format!("{base}/{db}");

    let backend = PgBackend::connect_lazy(&url, &PgSettings::default()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(secsync_persistence::grpc::serve(
        listener,
        backend,
        CoreOptions {
            workers: args.workers,
            max_batch: args.max_batch,
            ..CoreOptions::default()
        },
        64 * 1024 * 1024,
        async {
            let _ = stopped.await;
        },
    ));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy();
    let client = PersistenceClient::new(channel);

    // Documents with a first snapshot each, and every update frame, before the clock starts.
    // Enough for 10 s at the stream's rate (about 20,000 updates/s here).
    let per_writer = 300_000 / args.writers.max(1);
    let snapshot_key = SigningKey::from_bytes(&[200; 32]);
    let snapshot_pub = PublicKey::from_bytes(snapshot_key.verifying_key().to_bytes());
    for d in 0..args.docs {
        let doc = format!("bench-{d}");
        let mut c = client.clone();
        let mut attempts = 0;
        loop {
            let r = c
                .load_document(pb::LoadDocumentRequest {
                    document_id: doc.clone(),
                    create: true,
                    ..Default::default()
                })
                .await;
            if r.is_ok() {
                break;
            }
            attempts += 1;
            assert!(attempts < 100, "service did not come up");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let pd = format!(
            r#"{{"snapshotId":"S-{d}","docId":"{doc}","pubKey":"{snapshot_pub}","parentSnapshotId":"","parentSnapshotUpdateClocks":{{}},"parentSnapshotProof":"{INITIAL_PARENT_SNAPSHOT_PROOF}"}}"#
        );
        let body = frame(Domain::Snapshot, &snapshot_key, &pd, 0);
        c.submit_snapshot(pb::SubmitSnapshotRequest {
            document_id: doc,
            body,
            request_id: None,
        })
        .await
        .unwrap();
    }
    let writers: Vec<(String, Vec<String>)> = (0..args.writers)
        .map(|w| {
            let key = SigningKey::from_bytes(&[(w % 200) as u8 + 1; 32]);
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&(w as u64).to_le_bytes());
            seed[8] = 7;
            let key = if w < 200 { key } else { SigningKey::from_bytes(&seed) };
            let pub_key = PublicKey::from_bytes(key.verifying_key().to_bytes());
            let d = w % args.docs;
            let doc = format!("bench-{d}");
            let frames = (0..per_writer as u64)
                .map(|clock| {
                    let pd = format!(
                        r#"{{"refSnapshotId":"S-{d}","docId":"{doc}","pubKey":"{pub_key}","clock":{clock}}}"#
                    );
                    frame(Domain::Update, &key, &pd, clock)
                })
                .collect();
            (doc, frames)
        })
        .collect();

    // Warm-up, outside the measurement: the first updates of every writer open the service's
    // database connections and load each document's state.
    let mut warm = Vec::new();
    let writers: Vec<(String, Vec<String>)> = writers
        .into_iter()
        .map(|(doc, mut frames)| {
            let rest = frames.split_off(WARMUP.min(frames.len()));
            warm.push((doc.clone(), frames));
            (doc, rest)
        })
        .collect();
    let submitter = Submitter::open(&client, args.stream).await;
    let warming: Vec<_> = warm
        .into_iter()
        .map(|(doc, frames)| {
            let mut submitter = submitter.clone();
            tokio::spawn(async move {
                for body in frames {
                    assert!(submitter.update(&doc, body).await, "warm-up update refused");
                }
            })
        })
        .collect();
    for task in warming {
        task.await.unwrap();
    }

    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (doc, frames) in writers {
        let mut submitter = submitter.clone();
        tasks.push(tokio::spawn(async move {
            // Each writer sends its next update when the previous one is acknowledged, as a
            // client does; concurrency comes from the number of writers.
            let mut latencies = Vec::with_capacity(frames.len());
            for body in frames {
                if Instant::now() >= deadline {
                    break;
                }
                let t = Instant::now();
                assert!(submitter.update(&doc, body).await, "update refused");
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.unwrap());
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let pct =
        |p: f64| latencies[((latencies.len() as f64 - 1.0) * p) as usize].as_secs_f64() * 1000.0;
    let rate = latencies.len() as f64 / elapsed.as_secs_f64();
    let mode = if args.stream { "stream" } else { "unary" };
    println!(
        "{} writers={} docs={} workers={} updates={} in {:.1}s: {:.0} updates/s, ack p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        mode,
        args.writers,
        args.docs,
        args.workers,
        latencies.len(),
        elapsed.as_secs_f64(),
        rate,
        pct(0.5),
        pct(0.99),
        pct(1.0)
    );
    println!(
        "{{\"bench\":\"persistence-grpc\",\"submit\":\"{}\",\"writers\":{},\"docs\":{},\"updates\":{},\"updates_per_s\":{:.0},\"p50_ms\":{:.3},\"p99_ms\":{:.3}}}",
        mode,
        args.writers,
        args.docs,
        latencies.len(),
        rate,
        pct(0.5),
        pct(0.99)
    );
    let _ = stop.send(());
    let _ = server.await;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .unwrap();
}
