//! The persistence core on each storage backend: every rule of PROTOCOL.md, sequencing,
//! idempotency and concurrency. Each scenario is written once, generic over the backend, and
//! run twice: `postgres::NAME` on a fresh Postgres database, `sqlite::NAME` on a fresh SQLite
//! file (see `on_each_backend!` at the end).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::too_many_lines)] // scenario tests read top to bottom

mod common;

use std::collections::BTreeMap;

use common::{seed_document, Author};
use secsync_persistence::backend::Backend;
use secsync_persistence::postgres::sql;
use secsync_persistence::{Core, CoreOptions, Kind, Outcome};
use secsync_protocol::{
    parse_client_frame, ClientFrame, DocumentId, LoadMode, LoadRequest, ParseOptions, Reason,
    SnapshotId,
};

fn doc(id: &str) -> DocumentId {
    DocumentId::parse(id).unwrap()
}

fn accepted(outcome: Outcome) -> u64 {
    match outcome {
        Outcome::Accepted { sequence } => sequence,
        Outcome::Rejected { reason, .. } => panic!("rejected: {reason}"),
    }
}

fn rejected(outcome: Outcome) -> Reason {
    match outcome {
        Outcome::Rejected { reason, .. } => reason,
        Outcome::Accepted { sequence } => panic!("accepted at {sequence}"),
    }
}

fn load_request(mode: LoadMode, known: Option<&str>, clocks: &[(&Author, u64)]) -> LoadRequest {
    LoadRequest {
        mode,
        known_snapshot_id: known.map(|k| SnapshotId::parse(k).unwrap()),
        known_clocks: clocks
            .iter()
            .map(|(a, c)| (a.pub_key.clone(), secsync_protocol::Clock::new(*c).unwrap()))
            .collect(),
    }
}

/// The clock of each update body, to compare loads by content.
fn clocks_of(bodies: &[bytes::Bytes]) -> Vec<(String, u64)> {
    bodies
        .iter()
        .map(|b| {
            match parse_client_frame(std::str::from_utf8(b).unwrap(), ParseOptions::default())
                .unwrap()
            {
                ClientFrame::Update(u) => (u.signed.pub_key().as_str().to_owned(), u.clock.get()),
                _ => panic!("not an update"),
            }
        })
        .collect()
}

async fn first_snapshot_updates_and_complete_load<B: Backend>(core: Core<B>) {
    let (a, b) = (Author::new(1), Author::new(2));
    let d = doc("doc-1");
    let empty = core.load(&d, &LoadRequest::default(), true).await.unwrap();
    assert!(empty.found);
    assert_eq!(
        (empty.sequence, empty.snapshot, empty.chain),
        (0, None, Some(vec![]))
    );
    assert!(
        !core
            .load(&doc("nope"), &LoadRequest::default(), false)
            .await
            .unwrap()
            .found
    );

    let s1 = a.snapshot("doc-1", "S1", None, &[]);
    assert_eq!(
        accepted(
            core.submit(d.clone(), Kind::Snapshot, &s1.body, None)
                .await
                .unwrap()
        ),
        1
    );
    let u = [
        a.update("doc-1", "S1", 0),
        b.update("doc-1", "S1", 0),
        a.update("doc-1", "S1", 1),
    ];
    for (i, body) in u.iter().enumerate() {
        let seq = accepted(
            core.submit(d.clone(), Kind::Update, body, None)
                .await
                .unwrap(),
        );
        assert_eq!(seq, i as u64 + 2);
    }
    let loaded = core.load(&d, &LoadRequest::default(), true).await.unwrap();
    assert_eq!(loaded.sequence, 4);
    assert_eq!(
        loaded.snapshot.as_deref(),
        Some(parse_body(&s1.body).as_bytes())
    );
    assert_eq!(
        loaded.updates,
        u.iter().map(|b| parse_body(b)).collect::<Vec<_>>()
    );
    assert_eq!(loaded.chain, Some(vec![]));
}

/// The stored body is the frame's exact signed parts (what the protocol parser builds).
fn parse_body(text: &str) -> String {
    secsync_protocol::stored_body(text).unwrap()
}

async fn clock_rules<B: Backend>(core: Core<B>) {
    let a = Author::new(1);
    let d = doc("d");
    core.load(&d, &LoadRequest::default(), true).await.unwrap();
    // No active snapshot yet.
    assert_eq!(
        rejected(
            core.submit(d.clone(), Kind::Update, &a.update("d", "S1", 0), None)
                .await
                .unwrap()
        ),
        Reason::UpdateNoActiveSnapshot
    );
    let s1 = a.snapshot("d", "S1", None, &[]);
    accepted(
        core.submit(d.clone(), Kind::Snapshot, &s1.body, None)
            .await
            .unwrap(),
    );
    // First clock must be 0.
    assert_eq!(
        rejected(
            core.submit(d.clone(), Kind::Update, &a.update("d", "S1", 1), None)
                .await
                .unwrap()
        ),
        Reason::UpdateWrongClock
    );
    accepted(
        core.submit(d.clone(), Kind::Update, &a.update("d", "S1", 0), None)
            .await
            .unwrap(),
    );
    // Repeat and gap.
    for clock in [0, 2, 5] {
        assert_eq!(
            rejected(
                core.submit(d.clone(), Kind::Update, &a.update("d", "S1", clock), None)
                    .await
                    .unwrap()
            ),
            Reason::UpdateWrongClock,
            "clock {clock}"
        );
    }
    // Unknown snapshot.
    assert_eq!(
        rejected(
            core.submit(d.clone(), Kind::Update, &a.update("d", "S9", 1), None)
                .await
                .unwrap()
        ),
        Reason::UpdateNotActiveSnapshot
    );
    // Another document's snapshot, and a body naming another document.
    let e = doc("e");
    core.load(&e, &LoadRequest::default(), true).await.unwrap();
    let t1 = a.snapshot("e", "T1", None, &[]);
    accepted(
        core.submit(e.clone(), Kind::Snapshot, &t1.body, None)
            .await
            .unwrap(),
    );
    assert_eq!(
        rejected(
            core.submit(d.clone(), Kind::Update, &a.update("d", "T1", 1), None)
                .await
                .unwrap()
        ),
        Reason::UpdateNotActiveSnapshot
    );
    assert_eq!(
        rejected(
            core.submit(d.clone(), Kind::Update, &a.update("e", "T1", 0), None)
                .await
                .unwrap()
        ),
        Reason::WrongDocument
    );
    // Nothing of that was stored.
    let loaded = core.load(&d, &LoadRequest::default(), false).await.unwrap();
    assert_eq!((loaded.sequence, loaded.updates.len()), (2, 1));
}

async fn snapshot_rules_and_recovery_loads<B: Backend>(core: Core<B>) {
    let (a, b) = (Author::new(1), Author::new(2));
    let d = doc("d");
    core.load(&d, &LoadRequest::default(), true).await.unwrap();
    // A first snapshot that claims a parent is refused (proof check on).
    let orphan = a.snapshot("d", "S0", Some(&a.snapshot("d", "X", None, &[])), &[]);
    assert_eq!(
        rejected(
            core.submit(d.clone(), Kind::Snapshot, &orphan.body, None)
                .await
                .unwrap()
        ),
        Reason::SnapshotInvalidProof
    );
    let s1 = a.snapshot("d", "S1", None, &[]);
    accepted(
        core.submit(d.clone(), Kind::Snapshot, &s1.body, None)
            .await
            .unwrap(),
    );
    accepted(
        core.submit(d.clone(), Kind::Update, &a.update("d", "S1", 0), None)
            .await
            .unwrap(),
    );
    accepted(
        core.submit(d.clone(), Kind::Update, &b.update("d", "S1", 0), None)
            .await
            .unwrap(),
    );
    // Misses B's update.
    let missing = a.snapshot("d", "S2", Some(&s1), &[(&a, 0)]);
    assert_eq!(
        rejected(
            core.submit(d.clone(), Kind::Snapshot, &missing.body, None)
                .await
                .unwrap()
        ),
        Reason::SnapshotMissesUpdates
    );
    // Wrong proof: built on another parent's proof.
    let mut wrong = a.snapshot("d", "S2", Some(&s1), &[(&a, 0), (&b, 0)]);
    wrong = {
        let fake_parent = common::Snap {
            info: secsync_protocol::ProofEntry {
                parent_snapshot_proof: "bogus".into(),
                ..s1.info.clone()
            },
            ..s1.clone()
        };
        let w = a.snapshot("d", "S2", Some(&fake_parent), &[(&a, 0), (&b, 0)]);
        assert_ne!(
            w.info.parent_snapshot_proof,
            wrong.info.parent_snapshot_proof
        );
        w
    };
    assert_eq!(
        rejected(
            core.submit(d.clone(), Kind::Snapshot, &wrong.body, None)
                .await
                .unwrap()
        ),
        Reason::SnapshotInvalidProof
    );
    let s2 = a.snapshot("d", "S2", Some(&s1), &[(&a, 0), (&b, 0)]);
    assert_eq!(
        accepted(
            core.submit(d.clone(), Kind::Snapshot, &s2.body, None)
                .await
                .unwrap()
        ),
        4
    );
    // Outdated: parent S1 is no longer active.
    let late = b.snapshot("d", "S2b", Some(&s1), &[(&a, 0), (&b, 0)]);
    assert_eq!(
        rejected(
            core.submit(d.clone(), Kind::Snapshot, &late.body, None)
                .await
                .unwrap()
        ),
        Reason::SnapshotOutdated
    );
    // A snapshot id already used in this document.
    let reuse = a.snapshot("d", "S1", Some(&s2), &[]);
    assert_eq!(
        rejected(
            core.submit(d.clone(), Kind::Snapshot, &reuse.body, None)
                .await
                .unwrap()
        ),
        Reason::SnapshotIdTaken
    );
    accepted(
        core.submit(d.clone(), Kind::Update, &b.update("d", "S2", 0), None)
            .await
            .unwrap(),
    );
    let s3 = b.snapshot("d", "S3", Some(&s2), &[(&b, 0)]);
    accepted(
        core.submit(d.clone(), Kind::Snapshot, &s3.body, None)
            .await
            .unwrap(),
    );
    accepted(
        core.submit(d.clone(), Kind::Update, &a.update("d", "S3", 0), None)
            .await
            .unwrap(),
    );
    accepted(
        core.submit(d.clone(), Kind::Update, &b.update("d", "S3", 0), None)
            .await
            .unwrap(),
    );
    accepted(
        core.submit(d.clone(), Kind::Update, &a.update("d", "S3", 1), None)
            .await
            .unwrap(),
    );

    // Known S1, active S3: chain [S2, S3], all updates of S3.
    let from_s1 = core
        .load(&d, &load_request(LoadMode::Delta, Some("S1"), &[]), false)
        .await
        .unwrap();
    let chain: Vec<&str> = from_s1
        .chain
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| e.snapshot_id.as_str())
        .collect();
    assert_eq!(chain, ["S2", "S3"]);
    assert!(from_s1.snapshot.is_some());
    assert_eq!(from_s1.updates.len(), 3);
    // The chain verifies as the client checks it.
    let entry = |s: &common::Snap| s.info.clone();
    assert!(secsync_protocol::crypto::verify_proof_chain(
        &entry(&s1),
        &entry(&s3),
        from_s1.chain.as_ref().unwrap()
    ));
    // Delta with the active snapshot known: only what is missing, no snapshot, no chain.
    let delta = core
        .load(
            &d,
            &load_request(LoadMode::Delta, Some("S3"), &[(&a, 0)]),
            false,
        )
        .await
        .unwrap();
    assert_eq!(
        (delta.snapshot.is_none(), delta.chain.is_none()),
        (true, true)
    );
    assert_eq!(
        clocks_of(&delta.updates),
        vec![(b.pub_key.clone(), 0), (a.pub_key.clone(), 1)]
    );
    // Complete with the active snapshot known: everything again.
    let complete = core
        .load(
            &d,
            &load_request(LoadMode::Complete, Some("S3"), &[(&a, 1)]),
            false,
        )
        .await
        .unwrap();
    assert_eq!(
        (complete.snapshot.is_some(), complete.updates.len()),
        (true, 3)
    );
    assert_eq!(complete.chain, Some(vec![]));
    // Unknown known snapshot: empty chain.
    let unknown = core
        .load(&d, &load_request(LoadMode::Delta, Some("nope"), &[]), false)
        .await
        .unwrap();
    assert_eq!(unknown.chain, Some(vec![]));
    // Events for gap repair, in sequence order, and the head.
    let events = core.read_events(&d, 4, 100).await.unwrap();
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (5..=9).collect::<Vec<_>>()
    );
    assert_eq!(core.heads(std::slice::from_ref(&d)).await.unwrap()[&d], 9);
}

async fn retried_requests_return_the_first_result<B: Backend>(core: Core<B>) {
    let a = Author::new(1);
    let d = doc("d");
    core.load(&d, &LoadRequest::default(), true).await.unwrap();
    let s1 = a.snapshot("d", "S1", None, &[]);
    let id = |n: u64| Some(format!("gw/1/{n}"));
    assert_eq!(
        accepted(
            core.submit(d.clone(), Kind::Snapshot, &s1.body, id(1))
                .await
                .unwrap()
        ),
        1
    );
    assert_eq!(
        accepted(
            core.submit(d.clone(), Kind::Snapshot, &s1.body, id(1))
                .await
                .unwrap()
        ),
        1
    );
    let u0 = a.update("d", "S1", 0);
    assert_eq!(
        accepted(
            core.submit(d.clone(), Kind::Update, &u0, id(2))
                .await
                .unwrap()
        ),
        2
    );
    // The retry of a committed update: same result, nothing stored twice.
    assert_eq!(
        accepted(
            core.submit(d.clone(), Kind::Update, &u0, id(2))
                .await
                .unwrap()
        ),
        2
    );
    // The same update in a new frame: the rejection PROTOCOL.md demands.
    assert_eq!(
        rejected(
            core.submit(d.clone(), Kind::Update, &u0, id(3))
                .await
                .unwrap()
        ),
        Reason::UpdateWrongClock
    );
    assert_eq!(core.heads(std::slice::from_ref(&d)).await.unwrap()[&d], 2);
}

/// Loads served from the load cache equal loads read from the database, while another replica
/// (a second core on the same database, with its own cache) writes the same document: updates,
/// a snapshot rotation, a retried request, delta and chain loads.
async fn cached_loads_match_the_database_beside_another_replica<B: Backend + Clone>(core: Core<B>) {
    let replica = Core::start(core.backend().clone(), CoreOptions::default());
    let reference = Core::start(
        core.backend().clone(),
        CoreOptions {
            load_cache_bytes: 0,
            ..CoreOptions::default()
        },
    );
    let (a, b) = (Author::new(1), Author::new(2));
    let d = doc("d");
    let requests = [
        LoadRequest::default(),
        load_request(LoadMode::Delta, Some("S1"), &[(&a, 1)]),
        load_request(LoadMode::Delta, Some("S2"), &[(&b, 0)]),
        load_request(LoadMode::Complete, Some("S1"), &[]),
    ];
    let same = |step: &'static str| {
        let (core, reference, d, requests) = (&core, &reference, &d, &requests);
        async move {
            for request in requests {
                // Twice: the first may fill the cache, the second is served from it.
                for _ in 0..2 {
                    assert_eq!(
                        core.load(d, request, false).await.unwrap(),
                        reference.load(d, request, false).await.unwrap(),
                        "{step}: {request:?}"
                    );
                }
            }
        }
    };
    let s1 = seed_document(&core, &a, "d", 3).await;
    same("own writes").await;
    for clock in 3..5 {
        let update = a.update("d", "S1", clock);
        accepted(
            replica
                .submit(d.clone(), Kind::Update, &update, None)
                .await
                .unwrap(),
        );
    }
    // No load in between: the next commit here starts from a head this core's cache has not
    // seen, and must not extend its stale entry.
    let update = b.update("d", "S1", 0);
    let id = Some("gw/1/1".to_owned());
    accepted(
        core.submit(d.clone(), Kind::Update, &update, id.clone())
            .await
            .unwrap(),
    );
    // A retry of a committed request adds nothing, in the cache either.
    accepted(
        core.submit(d.clone(), Kind::Update, &update, id)
            .await
            .unwrap(),
    );
    same("the replica's writes, a local write and a retry").await;
    let s2 = b.snapshot("d", "S2", Some(&s1), &[(&a, 4), (&b, 0)]);
    accepted(
        replica
            .submit(d.clone(), Kind::Snapshot, &s2.body, None)
            .await
            .unwrap(),
    );
    same("the replica's snapshot").await;
    let update = b.update("d", "S2", 0);
    accepted(
        core.submit(d.clone(), Kind::Update, &update, None)
            .await
            .unwrap(),
    );
    let s3 = a.snapshot("d", "S3", Some(&s2), &[(&b, 0)]);
    accepted(
        core.submit(d.clone(), Kind::Snapshot, &s3.body, None)
            .await
            .unwrap(),
    );
    let update = a.update("d", "S3", 0);
    accepted(
        core.submit(d.clone(), Kind::Update, &update, None)
            .await
            .unwrap(),
    );
    same("own snapshot and updates").await;
}

/// A core decides a batch from its cached rule state only while the document is where that
/// state left it: after another replica wrote, neither a refusal nor an acceptance of the stale
/// state stands. (The refused batch writes nothing, so only the head check catches it.)
async fn a_stale_cached_state_decides_nothing<B: Backend + Clone>(core: Core<B>) {
    let replica = Core::start(core.backend().clone(), CoreOptions::default());
    let a = Author::new(1);
    let d = doc("d");
    seed_document(&core, &a, "d", 2).await;
    let update = |core: &Core<B>, clock: u64| {
        let (core, d, body) = (core.clone(), d.clone(), a.update("d", "S1", clock));
        async move { core.submit(d, Kind::Update, &body, None).await.unwrap() }
    };
    // This core's cache now expects clock 2 next; the replica takes clocks 2 and 3.
    for clock in 2..4 {
        assert_eq!(accepted(update(&replica, clock).await), clock + 2);
    }
    // Clock 4 would be a gap for the cached state, and is the next clock in truth.
    assert_eq!(accepted(update(&core, 4).await), 6);
    // The replica's cache is stale now: clock 4 again is taken, clock 5 is next.
    assert_eq!(
        rejected(update(&replica, 4).await),
        Reason::UpdateWrongClock
    );
    assert_eq!(accepted(update(&replica, 5).await), 7);
    let loaded = core.load(&d, &LoadRequest::default(), false).await.unwrap();
    assert_eq!(loaded.sequence, 7);
    assert_eq!(
        clocks_of(&loaded.updates),
        (0..6).map(|c| (a.pub_key.clone(), c)).collect::<Vec<_>>()
    );
}

/// 20 writers on one document and 100 documents at once: no valid update rejected, sequence
/// numbers contiguous, per-author clocks contiguous.
async fn concurrent_writers_are_never_rejected<B: Backend>(core: Core<B>) {
    let mut docs = vec!["hot".to_owned()];
    docs.extend((0..100).map(|i| format!("doc-{i}")));
    for name in &docs {
        let d = doc(name);
        core.load(&d, &LoadRequest::default(), true).await.unwrap();
        let s = Author::new(200).snapshot(name, "S1", None, &[]);
        accepted(core.submit(d, Kind::Snapshot, &s.body, None).await.unwrap());
    }
    let mut tasks = Vec::new();
    // 20 authors on the hot document, 10 updates each.
    for w in 0..20u8 {
        let core = core.clone();
        tasks.push(tokio::spawn(async move {
            let author = Author::new(w + 1);
            for clock in 0..10 {
                let body = author.update("hot", "S1", clock);
                accepted(
                    core.submit(doc("hot"), Kind::Update, &body, None)
                        .await
                        .unwrap(),
                );
            }
        }));
    }
    // One author on each of the 100 other documents, 5 updates each.
    for name in docs.iter().skip(1) {
        let name = name.clone();
        let core = core.clone();
        tasks.push(tokio::spawn(async move {
            let author = Author::new(100);
            for clock in 0..5 {
                let body = author.update(&name, "S1", clock);
                accepted(
                    core.submit(doc(&name), Kind::Update, &body, None)
                        .await
                        .unwrap(),
                );
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let hot = core.read_events(&doc("hot"), 0, 1000).await.unwrap();
    assert_eq!(
        hot.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=201).collect::<Vec<_>>()
    );
    let loaded = core
        .load(&doc("hot"), &LoadRequest::default(), false)
        .await
        .unwrap();
    let mut per_author: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (author, clock) in clocks_of(&loaded.updates) {
        per_author.entry(author).or_default().push(clock);
    }
    assert_eq!(per_author.len(), 20);
    assert!(per_author
        .values()
        .all(|c| *c == (0..10).collect::<Vec<_>>()));
    for name in docs.iter().skip(1) {
        let events = core.read_events(&doc(name), 0, 100).await.unwrap();
        assert_eq!(
            events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (1..=6).collect::<Vec<_>>()
        );
    }
}

/// 10 clients race snapshots on one document: exactly one wins each round, the others are
/// told they are outdated.
async fn snapshot_races_have_one_winner<B: Backend>(core: Core<B>) {
    let d = doc("race");
    core.load(&d, &LoadRequest::default(), true).await.unwrap();
    let root = Author::new(50).snapshot("race", "R0", None, &[]);
    accepted(
        core.submit(d.clone(), Kind::Snapshot, &root.body, None)
            .await
            .unwrap(),
    );
    let mut parent = root;
    for round in 0..5 {
        let candidates: Vec<common::Snap> = (0..10u8)
            .map(|c| {
                Author::new(c + 1).snapshot("race", &format!("R{round}-{c}"), Some(&parent), &[])
            })
            .collect();
        let tasks: Vec<_> = candidates
            .iter()
            .map(|s| {
                let (core, d, body) = (core.clone(), d.clone(), s.body.clone());
                tokio::spawn(
                    async move { core.submit(d, Kind::Snapshot, &body, None).await.unwrap() },
                )
            })
            .collect();
        let mut winners = Vec::new();
        for (i, task) in tasks.into_iter().enumerate() {
            match task.await.unwrap() {
                Outcome::Accepted { .. } => winners.push(i),
                Outcome::Rejected { reason, .. } => {
                    assert_eq!(reason, Reason::SnapshotOutdated);
                }
            }
        }
        assert_eq!(winners.len(), 1, "round {round}");
        parent = candidates[winners[0]].clone();
    }
    let loaded = core.load(&d, &LoadRequest::default(), false).await.unwrap();
    assert_eq!(loaded.active_snapshot_id.unwrap().as_str(), parent.id);
    assert_eq!(loaded.sequence, 6);
}

/// Instantiates each scenario once per backend, with the core options that backend runs with
/// in production.
macro_rules! on_each_backend {
    ($(#[$test:meta] $name:ident),* $(,)?) => {
        mod postgres {
            use secsync_persistence::{Core, CoreOptions};
            $(
                #[$test]
                async fn $name() {
                    crate::common::with_pg_backend(|backend| {
                        super::$name(Core::start(backend, CoreOptions::default()))
                    })
                    .await;
                }
            )*
        }

        mod sqlite {
            use secsync_persistence::sqlite::recommended_core_options;
            use secsync_persistence::Core;
            $(
                #[$test]
                async fn $name() {
                    crate::common::with_sqlite_backend(|backend| {
                        super::$name(Core::start(backend, recommended_core_options()))
                    })
                    .await;
                }
            )*
        }
    };
}

on_each_backend! {
    #[tokio::test] first_snapshot_updates_and_complete_load,
    #[tokio::test] clock_rules,
    #[tokio::test] snapshot_rules_and_recovery_loads,
    #[tokio::test] retried_requests_return_the_first_result,
    #[tokio::test] cached_loads_match_the_database_beside_another_replica,
    #[tokio::test] a_stale_cached_state_decides_nothing,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)] concurrent_writers_are_never_rejected,
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)] snapshot_races_have_one_winner,
}

/// More core workers than SQLite has writers: the extra workers queue for the one write
/// connection, and nothing is rejected or reordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_with_four_workers_concurrent_writers_are_never_rejected() {
    let options = CoreOptions {
        workers: 4,
        ..secsync_persistence::sqlite::recommended_core_options()
    };
    common::with_sqlite_backend(|backend| {
        concurrent_writers_are_never_rejected(Core::start(backend, options))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_with_four_workers_snapshot_races_have_one_winner() {
    let options = CoreOptions {
        workers: 4,
        ..secsync_persistence::sqlite::recommended_core_options()
    };
    common::with_sqlite_backend(|backend| {
        snapshot_races_have_one_winner(Core::start(backend, options))
    })
    .await;
}

/// No statement of the Postgres backend reads a table whole, whatever plan a connection keeps:
/// each one's generic plan (what a connection runs after five executions) is explained on a
/// fresh database whose tables are empty and were never analysed, where a sequential scan
/// looks cheapest and, once chosen, is kept as the tables grow (see `PgBackend::connect_lazy`).
#[tokio::test]
async fn postgres_statements_read_by_index_even_when_planned_on_empty_tables() {
    common::with_pg_backend(|backend| async move {
        // A connection with the pool's settings, not handed back with the test's setting on.
        let mut conn = backend.pool().acquire().await.unwrap().detach();
        sqlx::query("SET plan_cache_mode = force_generic_plan")
            .execute(&mut conn)
            .await
            .unwrap();
        for (i, statement) in sql::PLANNED.iter().enumerate() {
            sqlx::raw_sql(&format!("PREPARE s{i} AS {statement}"))
                .execute(&mut conn)
                .await
                .unwrap();
            let params: i32 = sqlx::query_scalar(
                "SELECT cardinality(parameter_types) FROM pg_prepared_statements WHERE name = $1",
            )
            .bind(format!("s{i}"))
            .fetch_one(&mut conn)
            .await
            .unwrap();
            let args = vec!["NULL"; usize::try_from(params).unwrap()].join(", ");
            let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN EXECUTE s{i}({args})"))
                .fetch_all(&mut conn)
                .await
                .unwrap();
            let plan = plan.join("\n");
            assert!(!plan.contains("Seq Scan"), "{statement}\n{plan}");
        }
    })
    .await;
}

/// Workers commit one at a time while commits are short, but a commit that hangs (here: a
/// document row locked by another connection) holds the other worker's documents back for
/// `commit_overlap_after` only, not until it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_commit_holds_other_workers_back_only_briefly() {
    use futures::stream::{FuturesUnordered, StreamExt as _};
    use std::time::Duration;

    common::with_pg_backend(|backend| async move {
        let core = Core::start(backend.clone(), CoreOptions::default());
        let a = Author::new(1);
        let others: Vec<String> = (0..8).map(|i| format!("y-{i}")).collect();
        seed_document(&core, &a, "x", 0).await;
        for name in &others {
            seed_document(&core, &a, name, 0).await;
        }
        let mut lock = backend.pool().begin().await.unwrap();
        sqlx::query("SELECT 1 FROM documents WHERE id = 'x' FOR UPDATE")
            .execute(&mut *lock)
            .await
            .unwrap();
        let hanging = tokio::spawn({
            let (core, body) = (core.clone(), a.update("x", "S1", 0));
            async move { core.submit(doc("x"), Kind::Update, &body, None).await }
        });
        // The commit of x waits for the lock: one backend of this database waits on a lock.
        let waiting = async {
            loop {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                .fetch_one(backend.pool())
                .await
                .unwrap();
                if n > 0 {
                    break;
                }
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the commit of x never waited for the lock");
        // Documents of the other worker commit meanwhile (those of x's worker queue behind it).
        let mut updates: FuturesUnordered<_> = others
            .iter()
            .map(|name| {
                let (core, d, body) = (core.clone(), doc(name), a.update(name, "S1", 0));
                async move { core.submit(d, Kind::Update, &body, None).await.unwrap() }
            })
            .collect();
        let first = tokio::time::timeout(Duration::from_secs(10), updates.next())
            .await
            .expect("no document committed while another worker's commit hung");
        assert_eq!(accepted(first.unwrap()), 2);
        assert!(!hanging.is_finished());
        lock.rollback().await.unwrap();
        assert_eq!(accepted(hanging.await.unwrap().unwrap()), 2);
        while let Some(outcome) = updates.next().await {
            assert_eq!(accepted(outcome), 2);
        }
    })
    .await;
}

/// Single statements keep their connection out of the pool for the next one (no check on
/// release), but only after success: a kept connection the server ended fails the one call
/// that finds it so, is not kept again, and the next call runs on a fresh connection.
#[tokio::test]
async fn a_kept_connection_the_server_ended_is_dropped_after_one_failure() {
    use secsync_persistence::backend::BackendError;
    use sqlx::Connection as _;
    use std::time::{Duration, Instant};

    common::with_database(|url| async move {
        let backend = common::backend(&url).await;
        let doc = DocumentId::parse("kept-connection").unwrap();
        assert!(backend.document(&doc).await.unwrap().is_none());

        // The connection that ran it (others may be open: the migrations').
        let db = url.rsplit('/').next().unwrap().to_owned();
        let mut admin = sqlx::PgConnection::connect(&common::admin_url())
            .await
            .unwrap();
        let pid: i32 = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND query = $2",
        )
        .bind(&db)
        .bind(sql::DOCUMENT)
        .fetch_one(&mut admin)
        .await
        .unwrap();
        sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .execute(&mut admin)
            .await
            .unwrap();
        // The backend ends asynchronously: wait until it is gone.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let alive: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
                    .bind(pid)
                    .fetch_one(&mut admin)
                    .await
                    .unwrap();
            if !alive {
                break;
            }
            assert!(Instant::now() < deadline, "backend {pid} still alive");
            tokio::task::yield_now().await;
        }

        match backend.document(&doc).await {
            Err(BackendError::Unavailable(_)) => {}
            other => panic!("the ended connection answered: {other:?}"),
        }
        assert!(backend.document(&doc).await.unwrap().is_none());
        assert!(backend.document(&doc).await.unwrap().is_none());
    })
    .await;
}

/// Kept connections never take more than a quarter of the pool: with a pool of four, after
/// four single statements at once, three write transactions can still be open together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_connections_leave_the_pool_to_transactions() {
    use secsync_persistence::postgres::{PgBackend, PgSettings};
    use std::time::Duration;

    common::with_database(|url| async move {
        let settings = PgSettings {
            max_connections: 4,
            acquire_timeout: Duration::from_secs(2),
        };
        let backend = PgBackend::connect_lazy(&url, &settings).unwrap();
        backend.migrate().await.unwrap();
        let docs: Vec<DocumentId> = (0..4).map(|i| doc(&format!("quarter-{i}"))).collect();
        let reads = futures::future::join_all(docs.iter().map(|d| backend.document(d))).await;
        assert!(reads.into_iter().all(|r| r.unwrap().is_none()));

        let mut open = Vec::new();
        for _ in 0..3 {
            open.push(
                backend
                    .begin_write()
                    .await
                    .expect("a connection left for the transaction"),
            );
        }
        drop(open);
    })
    .await;
}
