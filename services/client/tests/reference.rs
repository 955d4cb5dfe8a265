//! End to end against a running secsync server (the reference in `bench/reference`, or our
//! gateway). Skipped by default; run with
//!
//!     SECSYNC_CLIENT_TEST_ENDPOINT=ws://127.0.0.1:PORT \
//!         cargo test -p secsync-client --test reference -- --ignored
//!
//! Two Rust clients create a document, exchange updates and snapshots (including a snapshot
//! refused for missing updates and retried after recovery), prove their ephemeral sessions
//! and exchange an ephemeral message, and end with equal Yjs texts; a third client loads the
//! document in `complete` mode and a reconnect resumes in `delta` mode. All waits are explicit
//! conditions with timeouts.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure
#![allow(clippy::disallowed_methods)] // the endpoint comes from the environment
#![allow(clippy::too_many_lines)]

use std::time::Duration;

use ed25519_dalek::SigningKey;
use secsync_client::crypto::random_bytes;
use secsync_client::ydoc::serialize_changes;
use secsync_client::{
    Client, ClientOptions, Clock, DocumentId, DocumentKey, Event, LoadMode, ServerFrame,
    SnapshotAck, SyncError, TextDoc, UpdateAck,
};
use secsync_protocol::b64;

const T: Duration = Duration::from_secs(10);

fn endpoint() -> String {
    std::env::var("SECSYNC_CLIENT_TEST_ENDPOINT")
        .expect("set SECSYNC_CLIENT_TEST_ENDPOINT (e.g. ws://127.0.0.1:PORT) to run this test")
}

fn options(doc: &DocumentId, key: &DocumentKey, author: &SigningKey) -> ClientOptions {
    let mut options = ClientOptions::new(
        endpoint(),
        doc.clone(),
        b64::encode(random_bytes::<24>()),
        author.clone(),
        key.clone(),
    );
    options.record_frames = true;
    options
}

/// Applies every queued snapshot and change to the document.
fn pump(client: &Client, doc: &mut TextDoc) -> usize {
    let events = client.drain_events();
    for event in &events {
        doc.apply_event(event).unwrap();
    }
    events.len()
}

async fn update(client: &Client, change: Vec<u8>) {
    match client
        .send_update(&serialize_changes(&[change]))
        .await
        .unwrap()
    {
        UpdateAck::Saved { .. } => {}
        other @ UpdateAck::Failed { .. } => panic!("update refused: {other:?}"),
    }
}

#[tokio::test]
#[ignore = "needs a running server: set SECSYNC_CLIENT_TEST_ENDPOINT"]
async fn two_clients_edit_one_document() {
    let doc_id = DocumentId::parse(&b64::encode(random_bytes::<24>())).unwrap();
    let key = DocumentKey::generate();
    let (ka, kb) = (
        SigningKey::from_bytes(&random_bytes()),
        SigningKey::from_bytes(&random_bytes()),
    );

    // Both join the new, empty document.
    let a = Client::connect(options(&doc_id, &key, &ka)).await.unwrap();
    let b = Client::connect(options(&doc_id, &key, &kb)).await.unwrap();
    let first = a.next_frame(T).await.unwrap();
    assert!(
        matches!(&first.frame, Ok(ServerFrame::Document { snapshot: None, updates, .. }) if updates.is_empty()),
        "{}",
        first.text
    );
    let (mut da, mut db) = (TextDoc::new(), TextDoc::new());

    // A's first change becomes the document's first snapshot (as the JS client does).
    da.push("hello");
    let s0 = match a.send_snapshot(&da.snapshot()).await.unwrap() {
        SnapshotAck::Saved {
            snapshot_id,
            adopted: true,
        } => snapshot_id,
        other => panic!("first snapshot refused: {other:?}"),
    };
    assert_eq!(a.state().active_snapshot_id(), Some(&s0));
    // B gets it as a live `snapshot` broadcast.
    let event = b.next_event(T).await.unwrap();
    assert!(matches!(&event, Event::Snapshot { snapshot_id, .. } if snapshot_id == &s0));
    db.apply_event(&event).unwrap();
    assert_eq!(db.text(), "hello");

    // Concurrent updates from both ends.
    let ca = da.push(" world");
    let cb = db.insert(0, "Oh, ");
    tokio::join!(update(&a, ca), update(&b, cb));
    let (pa, pb) = (a.public_key().clone(), b.public_key().clone());
    a.wait_for(T, |s| s.clock_of(&pb).is_some()).await.unwrap();
    b.wait_for(T, |s| s.clock_of(&pa).is_some()).await.unwrap();
    pump(&a, &mut da);
    pump(&b, &mut db);
    assert_eq!(da.text(), "Oh, hello world");
    assert_eq!(da.text(), db.text());

    // A pipelines two updates; B sends a snapshot as soon as it has seen the first of them:
    // depending on timing the server refuses it for missing A's second update, and the
    // recovery data lets B retry with complete clocks.
    let c1 = da.push("!");
    let c2 = da.push("?");
    let (p1, p2) = (serialize_changes(&[c1]), serialize_changes(&[c2]));
    let (r1, r2) = tokio::join!(a.send_update(&p1), a.send_update(&p2));
    assert!(matches!(r1.unwrap(), UpdateAck::Saved { .. }));
    assert!(matches!(r2.unwrap(), UpdateAck::Saved { clock, .. } if clock.get() == 2));
    b.wait_for(T, |s| s.clock_of(&pa).is_some_and(|c| c.get() >= 1))
        .await
        .unwrap();
    let mut tries = 0;
    let s1 = loop {
        tries += 1;
        assert!(tries <= 5, "B's snapshot keeps failing");
        pump(&b, &mut db);
        match b.send_snapshot(&db.snapshot()).await.unwrap() {
            SnapshotAck::Saved {
                snapshot_id,
                adopted: true,
            } => break snapshot_id,
            SnapshotAck::Failed { errors, .. } => assert!(errors.is_empty(), "{errors:?}"),
            other @ SnapshotAck::Saved { .. } => panic!("{other:?}"),
        }
    };
    println!("B's snapshot was saved after {tries} tries");
    pump(&b, &mut db);
    assert_eq!(db.text(), "Oh, hello world!?");
    // A applies B's snapshot live; it is a direct child with A's confirmed clock (2).
    a.wait_for(T, |s| s.active_snapshot_id() == Some(&s1))
        .await
        .unwrap();
    pump(&a, &mut da);
    assert_eq!(da.text(), db.text());
    assert_eq!(
        a.state().confirmed_clock,
        None,
        "clocks restart on a new snapshot"
    );

    // Edits on the new snapshot, from both.
    let ca = da.remove(0, 4);
    update(&a, ca).await;
    let cb = db.push(" (B)");
    update(&b, cb).await;
    a.wait_for(T, |s| s.clock_of(&pb).is_some()).await.unwrap();
    b.wait_for(T, |s| s.clock_of(&pa).is_some()).await.unwrap();
    pump(&a, &mut da);
    pump(&b, &mut db);
    assert_eq!(da.text(), "hello world!? (B)");
    assert_eq!(db.text(), da.text());

    // Both send a snapshot at once on the same parent: both frames are built and queued in
    // one poll, before either reply, so the server accepts one and refuses the other as
    // outdated; the loser has the winner's snapshot by then (broadcast before its reply) and
    // retries on top of it.
    let (sa, sb) = (da.snapshot(), db.snapshot());
    let (ra, rb) = tokio::join!(a.send_snapshot(&sa), b.send_snapshot(&sb));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    let (winner, loser, loser_doc) = match (&ra, &rb) {
        (SnapshotAck::Saved { .. }, SnapshotAck::Failed { .. }) => (&a, &b, &mut db),
        (SnapshotAck::Failed { .. }, SnapshotAck::Saved { .. }) => (&b, &a, &mut da),
        other => panic!("expected one saved and one refused snapshot: {other:?}"),
    };
    let s2 = winner.state().active.unwrap().info.snapshot_id;
    assert_eq!(loser.state().active_snapshot_id(), Some(&s2));
    pump(loser, loser_doc);
    let s3 = match loser.send_snapshot(&loser_doc.snapshot()).await.unwrap() {
        SnapshotAck::Saved {
            snapshot_id,
            adopted: true,
        } => snapshot_id,
        other => panic!("retry refused: {other:?}"),
    };
    winner
        .wait_for(T, |s| s.active_snapshot_id() == Some(&s3))
        .await
        .unwrap();
    pump(&a, &mut da);
    pump(&b, &mut db);
    assert_eq!(da.text(), db.text());

    // Ephemeral messages: B announced its session when it loaded... an empty document, so no
    // `initialize` was sent by anyone (the JS client behaves the same). A's first message
    // triggers the proof exchange; once both sessions are proven, messages are delivered.
    a.send_ephemeral(b"first").unwrap();
    a.wait_for(T, |s| s.ephemeral_peers.contains(&pb.to_string()))
        .await
        .unwrap();
    b.wait_for(T, |s| s.ephemeral_peers.contains(&pa.to_string()))
        .await
        .unwrap();
    a.send_ephemeral(b"cursor at 3").unwrap();
    let got = match b.next_event(T).await.unwrap() {
        Event::Ephemeral { author, content } => (author, content),
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(got, (pa.clone(), b"cursor at 3".to_vec()));

    // A third client loads everything in complete mode.
    let kc = SigningKey::from_bytes(&random_bytes());
    let c = Client::connect(options(&doc_id, &key, &kc)).await.unwrap();
    let mut dc = TextDoc::new();
    assert_eq!(
        pump(&c, &mut dc),
        1,
        "the active snapshot, no updates on it yet"
    );
    assert_eq!(dc.text(), da.text());
    assert_eq!(c.state().active_snapshot_id(), Some(&s3));
    // It announced its session (the document had a snapshot): A and B prove themselves to it.
    c.wait_for(T, |s| s.ephemeral_peers.len() == 2)
        .await
        .unwrap();

    // A resumes in delta mode: the server sends nothing it already has.
    let a2 = a.reconnect(LoadMode::Delta).await.unwrap();
    let first = a2.next_frame(T).await.unwrap();
    assert!(
        matches!(&first.frame, Ok(ServerFrame::Document { snapshot: None, updates, .. }) if updates.is_empty()),
        "{}",
        first.text
    );
    assert_eq!(a2.state().active, a.state().active);
    a.close().await.unwrap();
    // … and can keep editing with the right clock.
    let ca = da.push(".");
    match a2.send_update(&serialize_changes(&[ca])).await.unwrap() {
        UpdateAck::Saved { clock, .. } => assert_eq!(clock.get(), 0),
        other @ UpdateAck::Failed { .. } => panic!("{other:?}"),
    }
    for (client, doc) in [(&b, &mut db), (&c, &mut dc)] {
        client
            .wait_for(T, |s| s.clock_of(&pa) == Some(Clock::ZERO))
            .await
            .unwrap();
        pump(client, doc);
    }
    assert_eq!(db.text(), "hello world!? (B).");
    assert_eq!(dc.text(), db.text());
    assert_eq!(da.text(), db.text());

    for client in [&a2, &b, &c] {
        let state = client.state();
        // Only the expected one: B's "no session" for A's first ephemeral message.
        assert!(
            state
                .errors
                .iter()
                .all(|e| *e == SyncError::EphemeralNoSession),
            "{:?}",
            state.errors
        );
        assert!(state.warnings.is_empty(), "{:?}", state.warnings);
    }
    for client in [a2, b, c] {
        client.close().await.unwrap();
    }
}
