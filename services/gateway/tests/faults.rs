//! Gateway fault behaviour: persistence going away and coming back, and a client that does not
//! read.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{doc_id, http_status, one_gateway, Gateway, Signer, Ws, WAIT};
use secsync_protocol::ServerFrame;

async fn readiness_becomes(gateway: &Gateway, status: u16) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while http_status(gateway.port, "/readyz").await != Some(status) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz never became {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Persistence unreachable: a load closes the connection without a message (the client
/// reconnects with back-off; `document-error` would be terminal), readiness turns false, a write
/// is held and retried, and everything recovers without restarting the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistence_outage_is_survived() {
    let (mut persistence, gateway) = one_gateway(&["--write-retry-seconds", "60"]).await;
    let doc = doc_id("outage");
    let signer = Signer::new(1);
    let (mut writer, _) = Ws::open(&gateway.url(), &doc).await;
    writer.send(&signer.first_snapshot(&doc, "S1")).await;
    assert!(matches!(
        writer.next().await,
        Some(ServerFrame::SnapshotSaved(_))
    ));

    persistence.stop();
    let mut joiner = Ws::connect(&gateway.url(), &doc, "").await;
    assert_eq!(joiner.next().await, None, "no frame may precede the close");
    assert_eq!(joiner.closed, Some(1011));
    readiness_becomes(&gateway, 503).await;

    // A write while persistence is away is held, not failed...
    writer.send(&signer.update(&doc, "S1", 0)).await;
    persistence.start_again();
    // ...and acknowledged once it is back.
    assert!(matches!(
        writer.next().await,
        Some(ServerFrame::UpdateSaved { .. })
    ));
    readiness_becomes(&gateway, 200).await;
    let (_, document) = Ws::open(&gateway.url(), &doc).await;
    let ServerFrame::Document { updates, .. } = document else {
        unreachable!()
    };
    assert_eq!(updates.len(), 1);
}

/// A client that stops reading is disconnected with 1013 instead of growing the gateway's
/// memory, and the writer and other readers are not disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_disconnected() {
    let (_persistence, gateway) =
        one_gateway(&["--send-queue", "4", "--max-frame-bytes", "1048576"]).await;
    let doc = doc_id("slow");
    let signer = Signer::new(1);
    let (mut writer, _) = Ws::open(&gateway.url(), &doc).await;
    writer.send(&signer.first_snapshot(&doc, "S1")).await;
    assert!(matches!(
        writer.next().await,
        Some(ServerFrame::SnapshotSaved(_))
    ));
    let (mut slow, _) = Ws::open(&gateway.url(), &doc).await;
    let (mut reader, _) = Ws::open(&gateway.url(), &doc).await;
    // ~300 KiB per update: the slow client's socket buffers fill, then its queue of 4.
    let total = 200;
    let mut received = 0;
    for clock in 0..total {
        writer
            .send(&signer.large_update(&doc, "S1", clock, 300 * 1024))
            .await;
        assert!(matches!(
            writer.next().await,
            Some(ServerFrame::UpdateSaved { .. })
        ));
        // The healthy reader keeps up.
        assert!(matches!(reader.next().await, Some(ServerFrame::Update(_))));
        received += 1;
    }
    assert_eq!(received, total);
    // The slow client drains what was buffered, then finds the close.
    assert_eq!(slow.closed().await, Some(1013));
}
