//! The gateway as a real process against persistence and NATS: health, the opening sequence,
//! bad input, ordered fan-out across two gateways, gateway crashes, NATS restarts, joiners during
//! writes, and the drain.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)]

mod common;

use common::{
    doc_id, http_get, http_status, masked_frame, one_gateway, two_gateways, update_clock, Gateway,
    Persistence, PrivateNats, Signer, SilentWs, Ws,
};
use secsync_protocol::ServerFrame;

/// Opens a document and makes its first snapshot through `ws`.
async fn with_snapshot(ws: &mut Ws, signer: &Signer, doc: &str) {
    ws.send(&signer.first_snapshot(doc, "S1")).await;
    assert!(matches!(
        ws.next().await,
        Some(ServerFrame::SnapshotSaved(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_opening_sequence_and_bad_input() {
    let (_persistence, gateway) = one_gateway(&["--max-frame-bytes", "65536"]).await;
    assert_eq!(http_status(gateway.port, "/healthz").await, Some(200));
    assert_eq!(http_status(gateway.port, "/readyz").await, Some(200));

    // No session key: document-error, then close.
    let doc = doc_id("bad");
    let url = format!("ws://127.0.0.1:{}/{doc}?mode=complete", gateway.port);
    let (mut raw, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let first = futures::StreamExt::next(&mut raw).await.unwrap().unwrap();
    assert_eq!(
        first.into_text().unwrap().as_str(),
        r#"{"type":"document-error"}"#
    );

    let signer = Signer::new(1);
    let (mut listener, _) = Ws::open(&gateway.url(), &doc).await;
    let (mut sender, _) = Ws::open(&gateway.url(), &doc).await;
    with_snapshot(&mut sender, &signer, &doc).await;
    assert!(matches!(
        listener.next().await,
        Some(ServerFrame::Snapshot(_))
    ));

    let invalid = |reason: &str| ServerFrame::InvalidMessage(reason.into());
    sender.send("not json").await;
    assert_eq!(sender.next().await, Some(invalid("not-json")));
    sender.send("[1,2]").await;
    assert_eq!(sender.next().await, Some(invalid("not-object")));
    sender.send_binary(b"{}".to_vec()).await;
    assert_eq!(sender.next().await, Some(invalid("binary-frame")));
    sender.send(r#"{"publicData":5}"#).await;
    assert_eq!(sender.next().await, Some(invalid("bad-shape")));
    // Update-shaped with a wrong clock type: update-save-failed.
    sender
        .send(r#"{"nonce":"x","ciphertext":"y","signature":"z","publicData":{"refSnapshotId":"S1","docId":"d","pubKey":"k","clock":"0"}}"#)
        .await;
    assert!(matches!(
        sender.next().await,
        Some(ServerFrame::UpdateSaveFailed { .. })
    ));
    // A correctly signed update and ephemeral message for another document.
    let other = doc_id("other");
    sender.send(&signer.update(&other, "S1", 0)).await;
    assert!(matches!(
        sender.next().await,
        Some(ServerFrame::UpdateSaveFailed { .. })
    ));
    sender.send(&signer.ephemeral(&other, 1)).await;
    assert_eq!(sender.next().await, Some(invalid("wrong-document")));
    // A bad signature: the right shape signed by another key.
    let forged = Signer::new(2)
        .update(&doc, "S1", 0)
        .replace(&Signer::new(2).pub_key, &signer.pub_key);
    sender.send(&forged).await;
    assert!(matches!(
        sender.next().await,
        Some(ServerFrame::UpdateSaveFailed { .. })
    ));
    // A snapshot whose parent is not active: refused with recovery data.
    sender.send(&signer.first_snapshot(&doc, "S2")).await;
    assert!(matches!(
        sender.next().await,
        Some(ServerFrame::SnapshotSaveFailed { .. })
    ));

    // Oversized: closed with 1009, nobody else disturbed.
    let (mut big, _) = Ws::open(&gateway.url(), &doc).await;
    big.send(&"x".repeat(70_000)).await;
    assert_eq!(big.closed().await, Some(1009));

    // Barrier: the next thing the listener sees is the first valid update, nothing before it.
    sender.send(&signer.update(&doc, "S1", 0)).await;
    assert!(matches!(
        sender.next().await,
        Some(ServerFrame::UpdateSaved { .. })
    ));
    let next = listener.next().await.unwrap();
    assert_eq!(update_clock(&next), Some((signer.pub_key.clone(), 0)));
}

/// The gateway's own WebSocket layer against a raw client: handshake refusals, pings answered,
/// a fragmented message (with a ping inside it) read whole, broken framing and bad text closed
/// with their codes, a client's close answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_framing_rules() {
    let (_persistence, gateway) = one_gateway(&[]).await;
    let doc = doc_id("framing");
    let path = format!("/{doc}?sessionKey=k");
    let upgrade = [
        "Upgrade: websocket",
        "Connection: keep-alive, Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    ];
    let with = |extra: &'static str| {
        let mut headers = upgrade.to_vec();
        headers.push(extra);
        headers
    };
    let version_8 = with("Sec-WebSocket-Version: 8");
    assert_eq!(http_get(gateway.port, &path, &version_8).await, Some(426));
    let no_key = [
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Version: 13",
    ];
    assert_eq!(http_get(gateway.port, &path, &no_key).await, Some(400));
    let version_13 = with("Sec-WebSocket-Version: 13");
    assert_eq!(http_get(gateway.port, &path, &version_13).await, Some(101));
    assert_eq!(http_get(gateway.port, &path, &[]).await, Some(404));

    let document = |frame: Option<(u8, Vec<u8>)>| {
        let (opcode, text) = frame.expect("a frame");
        assert_eq!(opcode, 1);
        assert!(text.starts_with(br#"{"type":"document""#));
    };
    let closed_with = |frame: Option<(u8, Vec<u8>)>, code: u16| {
        let (opcode, payload) = frame.expect("a close");
        assert_eq!(opcode, 8);
        assert_eq!(payload[..2], code.to_be_bytes());
    };

    let mut ws = SilentWs::connect(gateway.port, &doc).await;
    document(ws.frame().await);
    ws.send_raw(&masked_frame(true, 0x9, b"are you there"))
        .await;
    assert_eq!(ws.frame().await, Some((0xA, b"are you there".to_vec())));
    // `{"publicData":5}` in three fragments with a ping between them: answered, then the
    // whole message reaches the session (and is refused for its shape).
    let fragmented = [
        masked_frame(false, 0x1, br#"{"publicD"#),
        masked_frame(true, 0x9, b"x"),
        masked_frame(false, 0x0, br#"ata":"#),
        masked_frame(true, 0x0, b"5}"),
    ]
    .concat();
    ws.send_raw(&fragmented).await;
    assert_eq!(ws.frame().await, Some((0xA, b"x".to_vec())));
    let (opcode, reply) = ws.frame().await.unwrap();
    assert_eq!(opcode, 1);
    let reply = String::from_utf8(reply).unwrap();
    assert!(
        reply.contains("invalid-message") && reply.contains("bad-shape"),
        "{reply}"
    );
    // Text that is not UTF-8: 1007, and the server ends the connection.
    ws.send_raw(&masked_frame(true, 0x1, &[b'"', 0xff, b'"']))
        .await;
    closed_with(ws.frame().await, 1007);
    assert_eq!(ws.frame().await, None);

    // An unmasked client frame: 1002.
    let mut ws = SilentWs::connect(gateway.port, &doc).await;
    document(ws.frame().await);
    ws.send_raw(&[0x81, 0x02, b'h', b'i']).await;
    closed_with(ws.frame().await, 1002);
    assert_eq!(ws.frame().await, None);

    // The client closes: answered with its code, then the end of the stream.
    let mut ws = SilentWs::connect(gateway.port, &doc).await;
    document(ws.frame().await);
    ws.send_raw(&masked_frame(
        true,
        0x8,
        &[&4000u16.to_be_bytes()[..], b"bye"].concat(),
    ))
    .await;
    closed_with(ws.frame().await, 4000);
    assert_eq!(ws.frame().await, None);
}

/// Clients of one document on two gateways: every client gets every update once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_deliver_everything_once_in_order() {
    let persistence = Persistence::start().await;
    let (a, b) = two_gateways(&persistence, &[]).await;
    let doc = doc_id("fanout");
    let signers: Vec<Signer> = (1..=4).map(Signer::new).collect();
    let (mut first, _) = Ws::open(&a.url(), &doc).await;
    with_snapshot(&mut first, &signers[0], &doc).await;
    let mut readers = Vec::new();
    for i in 0..4 {
        let base = if i % 2 == 0 { a.url() } else { b.url() };
        readers.push(Ws::open(&base, &doc).await.0);
    }
    // Four writers, two per gateway, 25 updates each, interleaved.
    let mut writers = Vec::new();
    for (i, signer) in signers.into_iter().enumerate() {
        let base = if i % 2 == 0 { a.url() } else { b.url() };
        let doc = doc.clone();
        writers.push(tokio::spawn(async move {
            let (mut ws, _) = Ws::open(&base, &doc).await;
            for clock in 0..25 {
                ws.send(&signer.update(&doc, "S1", clock)).await;
                loop {
                    match ws.next().await.unwrap() {
                        ServerFrame::UpdateSaved { .. } => break,
                        ServerFrame::Update(_) => {}
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }
            signer.pub_key
        }));
    }
    let mut authors = Vec::new();
    for w in writers {
        authors.push(w.await.unwrap());
    }
    for reader in &mut readers {
        let mut clocks: std::collections::HashMap<String, Vec<u64>> =
            std::collections::HashMap::new();
        for _ in 0..100 {
            let frame = reader.next().await.unwrap();
            let (author, clock) = update_clock(&frame).unwrap_or_else(|| panic!("{frame:?}"));
            clocks.entry(author).or_default().push(clock);
        }
        for author in &authors {
            assert_eq!(clocks[author], (0..25).collect::<Vec<_>>());
        }
    }
}

/// Writers that pipeline (eight updates in flight each, as a real client may) on one document
/// across two gateways: each also reads everyone else's updates, and none is taken for a slow
/// consumer while the session waits for its own commits. The send queue is small so a session
/// that forwarded one delivery per commit would fill it within the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_writers_keep_up_with_each_other() {
    const UPDATES: u64 = 150;
    const WINDOW: u64 = 8;
    let persistence = Persistence::start().await;
    let flags = ["--send-queue", "48"];
    let (a, b) = two_gateways(&persistence, &flags).await;
    let doc = doc_id("pipelined");
    let signers: Vec<Signer> = (1..=4).map(Signer::new).collect();
    let (mut first, _) = Ws::open(&a.url(), &doc).await;
    with_snapshot(&mut first, &signers[0], &doc).await;
    let mut sockets = Vec::new();
    for i in 0..signers.len() {
        let base = if i % 2 == 0 { a.url() } else { b.url() };
        sockets.push(Ws::open(&base, &doc).await.0);
    }
    let others = UPDATES * (signers.len() as u64 - 1);
    let mut writers = Vec::new();
    for (signer, mut ws) in signers.into_iter().zip(sockets) {
        let doc = doc.clone();
        writers.push(tokio::spawn(async move {
            let mut sent = 0;
            while sent < WINDOW {
                ws.send(&signer.update(&doc, "S1", sent)).await;
                sent += 1;
            }
            let (mut saved, mut received) = (0, std::collections::HashMap::new());
            let mut total_received = 0;
            while saved < UPDATES || total_received < others {
                let Some(frame) = ws.next().await else {
                    panic!(
                        "closed with {:?} after {saved} acks, {total_received} updates",
                        ws.closed
                    );
                };
                match frame {
                    ServerFrame::UpdateSaved { .. } => {
                        saved += 1;
                        if sent < UPDATES {
                            ws.send(&signer.update(&doc, "S1", sent)).await;
                            sent += 1;
                        }
                    }
                    other => {
                        let (author, clock) =
                            update_clock(&other).unwrap_or_else(|| panic!("{other:?}"));
                        let next: &mut u64 = received.entry(author).or_default();
                        assert_eq!(clock, *next, "updates of one author in order");
                        *next += 1;
                        total_received += 1;
                    }
                }
            }
            assert!(received.values().all(|n| *n == UPDATES), "{received:?}");
        }));
    }
    for writer in writers {
        writer.await.unwrap();
    }
}

/// A gateway killed with SIGKILL while clients write: every acknowledged update reaches every
/// surviving client, with no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_killed_while_writing_loses_no_acknowledged_update() {
    let persistence = Persistence::start().await;
    let (mut doomed, survivor) = two_gateways(&persistence, &[]).await;
    let doc = doc_id("kill");
    let signer = Signer::new(1);
    let (mut writer, _) = Ws::open(&doomed.url(), &doc).await;
    with_snapshot(&mut writer, &signer, &doc).await;
    let (mut reader, _) = Ws::open(&survivor.url(), &doc).await;
    let mut acknowledged = 0;
    for clock in 0..40 {
        if clock == 20 {
            doomed.kill9();
        }
        writer.send(&signer.update(&doc, "S1", clock)).await;
        match writer.next().await {
            Some(ServerFrame::UpdateSaved { .. }) => acknowledged += 1,
            None => break,
            Some(other) => panic!("{other:?}"),
        }
    }
    assert!(acknowledged >= 20);
    for clock in 0..acknowledged {
        let frame = reader.next().await.unwrap();
        assert_eq!(update_clock(&frame), Some((signer.pub_key.clone(), clock)));
    }
}

/// NATS restarted while a client writes: after it returns, the other gateway's client has
/// every update, in order, with no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_leaves_no_gap() {
    let persistence = Persistence::start().await;
    let mut nats = PrivateNats::start();
    let (a, b) = (
        Gateway::start(&persistence.url, &nats.url(), &[]),
        Gateway::start(&persistence.url, &nats.url(), &[]),
    );
    a.ready().await;
    b.ready().await;
    let doc = doc_id("nats");
    let signer = Signer::new(1);
    let (mut writer, _) = Ws::open(&a.url(), &doc).await;
    with_snapshot(&mut writer, &signer, &doc).await;
    let (mut reader, _) = Ws::open(&b.url(), &doc).await;
    for clock in 0..60 {
        if clock == 20 {
            nats.stop();
        }
        if clock == 40 {
            nats.start_again();
        }
        writer.send(&signer.update(&doc, "S1", clock)).await;
        assert!(matches!(
            writer.next().await,
            Some(ServerFrame::UpdateSaved { .. })
        ));
    }
    for clock in 0..60 {
        let frame = reader.next().await.unwrap();
        assert_eq!(update_clock(&frame), Some((signer.pub_key.clone(), clock)));
    }
}

/// Joiners arriving while another client writes: each gets every update exactly once, from
/// its load or live, with no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joiners_during_writes_miss_nothing() {
    let persistence = Persistence::start().await;
    let (a, b) = two_gateways(&persistence, &[]).await;
    let doc = doc_id("join");
    let signer = Signer::new(1);
    let (mut writer, _) = Ws::open(&a.url(), &doc).await;
    with_snapshot(&mut writer, &signer, &doc).await;
    let total = 120;
    let write = {
        let doc = doc.clone();
        tokio::spawn(async move {
            for clock in 0..total {
                writer.send(&signer.update(&doc, "S1", clock)).await;
                assert!(matches!(
                    writer.next().await,
                    Some(ServerFrame::UpdateSaved { .. })
                ));
            }
            signer.pub_key
        })
    };
    let mut joiners = Vec::new();
    for i in 0..12 {
        let base = if i % 2 == 0 { b.url() } else { a.url() };
        joiners.push(Ws::open(&base, &doc).await);
    }
    let author = write.await.unwrap();
    for (mut ws, first) in joiners {
        let ServerFrame::Document { updates, .. } = first else {
            unreachable!()
        };
        let mut clocks: Vec<u64> = updates
            .iter()
            .map(|u| update_clock(&ServerFrame::Update(u.clone())).unwrap().1)
            .collect();
        while clocks.len() < total as usize {
            let frame = ws.next().await.unwrap();
            let (who, clock) = update_clock(&frame).unwrap();
            assert_eq!(who, author);
            clocks.push(clock);
        }
        assert_eq!(clocks, (0..total).collect::<Vec<_>>());
    }
}

/// A snapshot and updates larger than the persistence stream's chunks (256 KiB) arrive in
/// pieces between persistence and the gateway; a fresh client gets them whole, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_larger_than_a_stream_chunk_loads_whole() {
    let (_persistence, gateway) = one_gateway(&[]).await;
    let doc = doc_id("large");
    let signer = Signer::new(3);
    let body = |frame: &str| secsync_protocol::stored_body(frame).unwrap();
    let (mut writer, _) = Ws::open(&gateway.url(), &doc).await;
    // About 800 KB of body: four pieces, cut at byte offsets and joined in order.
    let snapshot = signer.large_first_snapshot(&doc, "S1", &vec![7u8; 600_000]);
    writer.send(&snapshot).await;
    assert!(matches!(
        writer.next().await,
        Some(ServerFrame::SnapshotSaved(_))
    ));
    let mut updates = Vec::new();
    for clock in 0..3 {
        let update = signer.large_update(&doc, "S1", clock, 300 * 1024);
        writer.send(&update).await;
        assert!(matches!(
            writer.next().await,
            Some(ServerFrame::UpdateSaved { .. })
        ));
        updates.push(body(&update));
    }
    let (_, first) = Ws::open(&gateway.url(), &doc).await;
    let ServerFrame::Document {
        snapshot: Some(loaded),
        updates: loaded_updates,
        ..
    } = first
    else {
        panic!("no document with a snapshot")
    };
    assert!(loaded.len() > 3 * 256 * 1024, "{}", loaded.len());
    assert_eq!(loaded, body(&snapshot));
    assert_eq!(loaded_updates, updates);
}

/// SIGTERM: clients are closed with 1012 ("service restart") and the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_cleanly() {
    let (_persistence, mut gateway) = one_gateway(&["--drain-seconds", "5"]).await;
    let doc = doc_id("drain");
    let (mut ws, _) = Ws::open(&gateway.url(), &doc).await;
    let status = gateway.terminate();
    assert!(status.success(), "{status:?}");
    assert_eq!(ws.closed().await, Some(1012));
}
