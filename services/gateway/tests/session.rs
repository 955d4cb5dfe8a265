//! Session behaviours that only show over time, against a real gateway process: the ping/pong
//! keepalive and the first-delivery hold.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{doc_id, nats_url, Gateway, Persistence, Signer, SilentWs, Ws};
use secsync_protocol::ServerFrame;

const PING: u8 = 0x9;
const CLOSE: u8 = 0x8;

/// A client that answers nothing is closed with 1001 after two ping intervals; one that only
/// answers the pings stays open well past that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_closed_and_pongs_keep_a_client_open() {
    let persistence = Persistence::start().await;
    let gateway = Gateway::start(&persistence.url, &nats_url(), &["--ping-seconds", "1"]);
    gateway.ready().await;
    let doc = doc_id("keepalive");
    let (mut answering, _) = Ws::open(&gateway.url(), &doc).await;
    let mut silent = SilentWs::connect(gateway.port, &doc).await;
    let silent = tokio::spawn(async move {
        let mut pings = 0;
        while let Some((opcode, payload)) = silent.frame().await {
            match opcode {
                PING => pings += 1,
                CLOSE => return (pings, Some(u16::from_be_bytes([payload[0], payload[1]]))),
                _ => {}
            }
        }
        (pings, None)
    });
    // Three pings take longer than two silent intervals.
    answering.pings(3).await;
    answering.send("not json").await;
    assert_eq!(
        answering.next().await,
        Some(ServerFrame::InvalidMessage("not-json".into()))
    );
    let (pings, code) = silent.await.unwrap();
    assert!(pings >= 1, "no ping before the close");
    assert_eq!(code, Some(1001));
}

/// After a `document` with a snapshot, live messages wait until the client's first frame: a
/// reply to that frame comes before an update that was already waiting for the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_delivery_hold_waits_for_the_first_frame() {
    let persistence = Persistence::start().await;
    // Long enough that only the client's frame can end it.
    let held = Gateway::start(
        &persistence.url,
        &nats_url(),
        &["--first-delivery-hold-ms", "60000"],
    );
    // The default hold, which ends by itself.
    let default = Gateway::start(&persistence.url, &nats_url(), &[]);
    held.ready().await;
    default.ready().await;
    let doc = doc_id("hold");
    let signer = Signer::new(1);
    // Joins before there is a snapshot, so nothing is held for it.
    let (mut witness, _) = Ws::open(&held.url(), &doc).await;
    let (mut writer, _) = Ws::open(&held.url(), &doc).await;
    writer.send(&signer.first_snapshot(&doc, "S1")).await;
    assert!(matches!(
        writer.next().await,
        Some(ServerFrame::SnapshotSaved(_))
    ));
    assert!(matches!(
        witness.next().await,
        Some(ServerFrame::Snapshot(_))
    ));
    let (mut reader, document) = Ws::open(&held.url(), &doc).await;
    assert!(matches!(
        document,
        ServerFrame::Document {
            snapshot: Some(_),
            ..
        }
    ));
    let (mut other, _) = Ws::open(&default.url(), &doc).await;
    writer.send(&signer.update(&doc, "S1", 0)).await;
    assert!(matches!(
        writer.next().await,
        Some(ServerFrame::UpdateSaved { .. })
    ));
    // The channel hands a message to all its sessions at once: once the witness has it, the
    // held reader's inbox has it too.
    assert!(matches!(witness.next().await, Some(ServerFrame::Update(_))));
    reader.send("not json").await;
    assert_eq!(
        reader.next().await,
        Some(ServerFrame::InvalidMessage("not-json".into()))
    );
    assert!(matches!(reader.next().await, Some(ServerFrame::Update(_))));
    // Under the default hold the update arrives without any frame from the client.
    assert!(matches!(other.next().await, Some(ServerFrame::Update(_))));
}
