//! One trace from a client's update to its delivery on another gateway, with real processes:
//! persistence and two gateways export to an OTLP receiver in this test. One update sent on
//! gateway A and delivered on gateway B must give one trace id with spans of gateway A,
//! persistence and gateway B; metrics must arrive, and only instruments the code defines; and
//! none of the update's secrets (ciphertext, nonce, signature) nor the session key may appear in
//! anything exported or logged, at trace level for our crates.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

mod common;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use common::{admin_url, doc_id, http_status, nats_url, Signer, WAIT};
use futures::{SinkExt as _, StreamExt as _};
use secsync_telemetry::instruments::Kind;
use secsync_testkit::otlp::{prometheus_names, MetricKind, Receiver};
use secsync_testkit::process::Service;
use sqlx::Connection as _;
use tokio_tungstenite::tungstenite::Message;

const EXPORT_WAIT: Duration = Duration::from_secs(30);

/// Metrics this scenario must produce, from both services.
const EXPECTED_METRICS: [&str; 7] = [
    "secsync.gateway.connections",
    "secsync.gateway.documents",
    "secsync.gateway.store.duration",
    "secsync.gateway.fanout.latency",
    "secsync.persistence.commit.duration",
    "secsync.persistence.submissions",
    "secsync.persistence.batch.size",
];

/// The persistence binary sits beside the gateway's in the same target directory (the test
/// command builds every binary before the tests).
fn persistence_binary() -> PathBuf {
    let path =
        PathBuf::from(env!("CARGO_BIN_EXE_secsync-gateway")).with_file_name("secsync-persistence");
    assert!(
        path.exists(),
        "{} missing: build it first (cargo build --release --bins)",
        path.display()
    );
    path
}

async fn ready(port: u16) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while http_status(port, "/readyz").await != Some(200) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "port {port} not ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await; // polling an HTTP endpoint
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_text(socket: &mut Socket) -> String {
    loop {
        let message = tokio::time::timeout(WAIT, socket.next())
            .await
            .expect("a frame in time")
            .expect("open")
            .expect("a frame");
        if let Message::Text(text) = message {
            return text.as_str().to_owned();
        }
    }
}

/// Persistence's span of one update submitted over the gateway's `Submit` stream.
fn submitted_update(span: &secsync_testkit::otlp::Span) -> bool {
    span.name == "secsync.persistence.v1.Persistence/Submit"
        && span.attribute("submit.kind") == Some("update")
}

fn field(frame: &str, name: &str) -> String {
    let value: serde_json::Value = serde_json::from_str(frame).unwrap();
    value[name].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_sender_to_receiver_and_no_secrets() {
    let receiver = Receiver::start().await;
    let db = format!(
        "secsync_otel_{}_{}",
        std::process::id(),
        rand::random::<u32>()
    );
    let mut admin = sqlx::PgConnection::connect(&admin_url()).await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let database_url = format!("{}/{db}", admin_url().rsplit_once('/').unwrap().0);

    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.as_str()),
        ("OTEL_METRIC_EXPORT_INTERVAL", "300"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        (
            "RUST_LOG",
            "info,secsync_gateway=trace,secsync_persistence=trace,secsync_protocol=trace,secsync_telemetry=trace",
        ),
    ];
    let mut persistence_env = otel.to_vec();
    persistence_env.push(("DATABASE_URL", &database_url));
    let mut persistence = Service::start(
        &persistence_binary(),
        &["--listen", "127.0.0.1:0"],
        &persistence_env,
    );
    let persistence_url = format!("http://127.0.0.1:{}", persistence.port);
    let nats = nats_url();
    let gateway_args = [
        "--listen",
        "127.0.0.1:0",
        "--persistence",
        persistence_url.as_str(),
        "--nats",
        nats.as_str(),
        "--first-delivery-hold-ms",
        "0",
    ];
    let gateway_bin = PathBuf::from(env!("CARGO_BIN_EXE_secsync-gateway"));
    let mut a = Service::start(&gateway_bin, &gateway_args, &otel);
    let mut b = Service::start(&gateway_bin, &gateway_args, &otel);
    ready(a.port).await;
    ready(b.port).await;

    // A distinctive session key, to search for later.
    let session_key = format!("sessionkey{:032x}", rand::random::<u128>());
    let doc = doc_id("otel");
    let url = |port: u16| format!("ws://127.0.0.1:{port}/{doc}?sessionKey={session_key}");
    let (mut sender, _) = tokio_tungstenite::connect_async(url(a.port)).await.unwrap();
    assert!(next_text(&mut sender)
        .await
        .starts_with("{\"type\":\"document\""));
    let signer = Signer::new(9);
    let snapshot = signer.first_snapshot(&doc, "S1");
    sender.send(Message::text(snapshot.clone())).await.unwrap();
    assert!(next_text(&mut sender).await.contains("snapshot-saved"));

    let (mut receiving, _) = tokio_tungstenite::connect_async(url(b.port)).await.unwrap();
    assert!(next_text(&mut receiving)
        .await
        .starts_with("{\"type\":\"document\""));
    let update = signer.update(&doc, "S1", 0);
    sender.send(Message::text(update.clone())).await.unwrap();
    assert!(next_text(&mut sender).await.contains("update-saved"));
    let delivered = next_text(&mut receiving).await;
    assert_eq!(
        field(&delivered, "ciphertext"),
        field(&update, "ciphertext")
    );

    // The update's trace: a span of each process under one trace id.
    let services = ["secsync-gateway", "secsync-persistence"];
    let received = receiver
        .wait_for(EXPORT_WAIT, |received| {
            let update_traces: BTreeSet<&str> = received
                .spans
                .iter()
                .filter(|s| s.service == "secsync-persistence" && submitted_update(s))
                .map(|s| s.trace_id.as_str())
                .collect();
            update_traces.iter().any(|trace| {
                let spans: Vec<_> = received
                    .spans
                    .iter()
                    .filter(|s| s.trace_id == *trace)
                    .collect();
                let instances: BTreeSet<_> = spans
                    .iter()
                    .filter(|s| s.service == "secsync-gateway")
                    .filter_map(|s| s.attribute("gateway"))
                    .collect();
                services
                    .iter()
                    .all(|svc| spans.iter().any(|s| s.service == *svc))
                    && instances.len() >= 2
            }) && EXPECTED_METRICS
                .iter()
                .all(|name| received.metrics.iter().any(|m| m.name == *name))
        })
        .await
        .unwrap_or_else(|r| {
            let names: Vec<_> = r
                .spans
                .iter()
                .map(|s| format!("{} {} {} {:?}", s.service, s.name, s.trace_id, s.attributes))
                .collect();
            panic!("no complete trace; spans: {names:#?}")
        });

    let update_trace = received
        .spans
        .iter()
        .filter(|s| s.service == "secsync-persistence" && submitted_update(s))
        .map(|s| s.trace_id.clone())
        .find(|trace| {
            received
                .spans
                .iter()
                .any(|s| s.trace_id == *trace && s.service == "secsync-gateway")
        })
        .unwrap();

    // Metrics: only what the code defines, under the names the dashboards query.
    let defined: Vec<_> = secsync_gateway::metrics::INSTRUMENTS
        .iter()
        .chain(secsync_persistence::metrics::INSTRUMENTS.iter())
        .collect();
    for metric in &received.metrics {
        let spec = defined
            .iter()
            .find(|s| s.name == metric.name)
            .unwrap_or_else(|| panic!("exported metric {} is not defined", metric.name));
        assert_eq!(metric.unit, spec.unit, "{}", metric.name);
        let kind = match spec.kind {
            Kind::Counter => MetricKind::Counter,
            Kind::UpDownCounter => MetricKind::UpDownCounter,
            Kind::Histogram => MetricKind::Histogram,
        };
        assert_eq!(metric.kind, kind, "{}", metric.name);
        assert!(!prometheus_names(&metric.name, &metric.unit, kind).is_empty());
        for label in &metric.attribute_keys {
            assert!(
                !["doc", "document", "document_id", "session_key", "pub_key"]
                    .contains(&label.as_str()),
                "{} has label {label}",
                metric.name
            );
        }
    }

    // Flush everything, then search all that was exported or logged for the secrets.
    drop((sender, receiving));
    for service in [&mut a, &mut b, &mut persistence] {
        assert!(service.terminate().success());
    }
    let received = receiver.received();
    let mut secrets = vec![session_key.clone()];
    for frame in [&snapshot, &update] {
        for name in ["ciphertext", "nonce", "signature"] {
            secrets.push(field(frame, name));
        }
    }
    let logs: Vec<String> = [&a, &b, &persistence]
        .iter()
        .flat_map(|s| s.output())
        .collect();
    assert!(logs.len() > 10, "the processes logged");
    // Log lines lead to their trace: the update's acceptance is logged under its trace id by
    // the gateway that took it and by persistence.
    let in_trace = format!("\"trace_id\":\"{update_trace}\"");
    for (service, name) in [(&a, "gateway A"), (&persistence, "persistence")] {
        assert!(
            service
                .output()
                .iter()
                .any(|line| line.contains(&in_trace) && line.contains("\"span_id\":\"")),
            "no log line of {name} carries the update's trace id"
        );
    }
    for secret in &secrets {
        for text in received.raw.iter().chain(logs.iter()) {
            assert!(
                !text.contains(secret.as_str()),
                "a secret ({}…) appears in: {:.300}",
                &secret[..8],
                text
            );
        }
    }
    drop((a, b, persistence));
    sqlx::query(&format!("DROP DATABASE {db} WITH (FORCE)"))
        .execute(&mut admin)
        .await
        .unwrap();
}
