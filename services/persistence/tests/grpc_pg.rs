//! The persistence service as a real process, over gRPC: two processes on one database, a
//! database outage (calls fail fast with UNAVAILABLE, the service recovers by itself) and a
//! database restart during a write loop (no acknowledged update lost).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::too_many_lines,
    clippy::unnecessary_wraps
)]

mod common;

use std::time::Duration;

use common::process::{Persistence, PrivatePostgres};
use common::{with_database, Author};
use secsync_rpc::v1 as pb;
use secsync_rpc::v1::persistence_client::PersistenceClient;
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;

type Client = PersistenceClient<Channel>;

fn request_id(connection: u64, frame: u64) -> Option<pb::RequestId> {
    Some(pb::RequestId {
        gateway: "test".into(),
        connection,
        frame,
    })
}

async fn load(client: &mut Client, doc: &str) -> (pb::LoadHeader, String, Vec<String>) {
    use pb::load_document_chunk::Part;
    let mut stream = client
        .load_document(pb::LoadDocumentRequest {
            document_id: doc.into(),
            create: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (mut header, mut snapshot, mut updates) = (None, Vec::new(), Vec::new());
    while let Some(chunk) = stream.next().await {
        match chunk.unwrap().part.unwrap() {
            Part::Header(h) => header = Some(h),
            // Pieces may end inside a character; only the whole body must be UTF-8.
            Part::SnapshotPart(p) => snapshot.extend_from_slice(&p),
            Part::Updates(u) => updates.extend(
                u.bodies
                    .into_iter()
                    .map(|b| String::from_utf8(b.to_vec()).unwrap()),
            ),
        }
    }
    (
        header.unwrap(),
        String::from_utf8(snapshot).unwrap(),
        updates,
    )
}

async fn submit(
    client: &mut Client,
    doc: &str,
    snapshot: bool,
    body: &str,
    id: Option<pb::RequestId>,
) -> Result<pb::SubmitResponse, tonic::Status> {
    let response = if snapshot {
        client
            .submit_snapshot(pb::SubmitSnapshotRequest {
                document_id: doc.into(),
                body: body.into(),
                request_id: id,
            })
            .await
    } else {
        client
            .submit_update(pb::SubmitUpdateRequest {
                document_id: doc.into(),
                body: body.into(),
                request_id: id,
            })
            .await
    };
    response.map(tonic::Response::into_inner)
}

fn accepted(response: &pb::SubmitResponse) -> u64 {
    match &response.result {
        Some(pb::submit_response::Result::Accepted(a)) => a.sequence,
        other => panic!("not accepted: {other:?}"),
    }
}

async fn events(client: &mut Client, doc: &str) -> Vec<pb::Event> {
    let mut stream = client
        .read_events(pb::ReadEventsRequest {
            document_id: doc.into(),
            after_sequence: 0,
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut all = Vec::new();
    while let Some(chunk) = stream.next().await {
        all.extend(chunk.unwrap().events);
    }
    all
}

/// Submits until the call succeeds (the gateway's retry policy), within `limit`.
async fn submit_until_answered(
    client: &mut Client,
    doc: &str,
    body: &str,
    id: Option<pb::RequestId>,
    limit: Duration,
) -> pb::SubmitResponse {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match submit(client, doc, false, body, id.clone()).await {
            Ok(response) => return response,
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
                assert!(tokio::time::Instant::now() < deadline, "never recovered");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn streamed(tag: u64, kind: pb::SubmitKind, doc: &str, body: &str, id: u64) -> pb::SubmitRequest {
    pb::SubmitRequest {
        tag,
        kind: kind as i32,
        document_id: doc.into(),
        body: body.into(),
        request_id: request_id(id, 0),
        trace_context: std::collections::HashMap::new(),
    }
}

async fn next_answer(answers: &mut tonic::Streaming<pb::SubmitResult>) -> Option<pb::SubmitResult> {
    tokio::time::timeout(Duration::from_secs(30), answers.message())
        .await
        .expect("an answer in time")
        .unwrap()
}

/// The stream gateways submit through: each request is answered by its tag, refused and
/// malformed requests fail alone and the stream goes on, a repeated request id gets its first result, and a
/// graceful shutdown ends the stream (it must not hold the process open) after answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_stream_answers_by_tag_and_ends_on_shutdown() {
    use pb::submit_result::Result as R;
    use pb::SubmitKind::{Snapshot, Unspecified, Update};
    with_database(|url| async move {
        let mut persistence = Persistence::start(&url);
        let mut client = persistence.client();
        assert!(load(&mut client, "streamed").await.0.found);
        let (requests, queued) = tokio::sync::mpsc::channel(64);
        let mut answers = client
            .submit(tokio_stream::wrappers::ReceiverStream::new(queued))
            .await
            .unwrap()
            .into_inner();

        let snapshot = Author::new(99).snapshot("streamed", "S1", None, &[]);
        requests
            .send(streamed(7, Snapshot, "streamed", &snapshot.body, 1))
            .await
            .unwrap();
        let first = next_answer(&mut answers).await.unwrap();
        assert_eq!(first.tag, 7);
        match first.result {
            Some(R::Decided(response)) => assert_eq!(accepted(&response), 1),
            other => panic!("snapshot: {other:?}"),
        }

        // Ten authors' first updates, with two bad requests among them.
        let bodies: Vec<String> = (1..=10u8)
            .map(|a| Author::new(a).update("streamed", "S1", 0))
            .collect();
        for (i, body) in bodies.iter().enumerate() {
            let tag = 100 + i as u64;
            requests
                .send(streamed(tag, Update, "streamed", body, tag))
                .await
                .unwrap();
            if i == 3 {
                let bad_doc = streamed(50, Update, "another-document", body, 50);
                requests.send(bad_doc).await.unwrap();
                let no_kind = streamed(51, Unspecified, "streamed", body, 51);
                requests.send(no_kind).await.unwrap();
            }
        }
        let mut results = std::collections::BTreeMap::new();
        for _ in 0..12 {
            let answer = next_answer(&mut answers).await.unwrap();
            assert!(results.insert(answer.tag, answer.result.unwrap()).is_none());
        }
        match &results[&50] {
            R::Decided(pb::SubmitResponse {
                result: Some(pb::submit_response::Result::Rejected(r)),
            }) => assert_eq!(r.reason, "wrong-document"),
            other => panic!("tag 50: {other:?}"),
        }
        match &results[&51] {
            R::Error(e) => assert_eq!(e.code, tonic::Code::InvalidArgument as i32, "{e:?}"),
            other @ R::Decided(_) => panic!("tag 51: {other:?}"),
        }
        let mut sequences: Vec<u64> = (100..110)
            .map(|tag| match &results[&tag] {
                R::Decided(response) => accepted(response),
                other @ R::Error(_) => panic!("tag {tag}: {other:?}"),
            })
            .collect();
        let first_of_103 = sequences[3];
        sequences.sort_unstable();
        assert_eq!(sequences, (2..=11).collect::<Vec<_>>());

        // A retry (same request id, new tag) gets the first attempt's result.
        requests
            .send(streamed(900, Update, "streamed", &bodies[3], 103))
            .await
            .unwrap();
        let retry = next_answer(&mut answers).await.unwrap();
        assert_eq!(retry.tag, 900);
        match retry.result {
            Some(R::Decided(response)) => assert_eq!(accepted(&response), first_of_103),
            other => panic!("retry: {other:?}"),
        }
        assert_eq!(events(&mut client, "streamed").await.len(), 11);

        // SIGTERM: the stream ends cleanly and the process exits although the client keeps its
        // side of the stream open.
        let exit = persistence.terminate(Duration::from_secs(30));
        assert!(exit.expect("exited after SIGTERM").success());
        assert!(next_answer(&mut answers).await.is_none());
        drop(requests);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_one_database() {
    with_database(|url| async move {
        let (one, two) = (Persistence::start(&url), Persistence::start(&url));
        let (mut c1, mut c2) = (one.client(), two.client());
        let (header, _, _) = load(&mut c1, "shared").await;
        assert!(header.found);
        let snapshot = Author::new(99).snapshot("shared", "S1", None, &[]);
        assert_eq!(
            accepted(
                &submit(&mut c1, "shared", true, &snapshot.body, None)
                    .await
                    .unwrap()
            ),
            1
        );

        let mut tasks = Vec::new();
        for writer in 0..10u8 {
            let mut client = if writer % 2 == 0 {
                c1.clone()
            } else {
                c2.clone()
            };
            tasks.push(tokio::spawn(async move {
                let author = Author::new(writer + 1);
                for clock in 0..20 {
                    let body = author.update("shared", "S1", clock);
                    let id = request_id(u64::from(writer), clock);
                    accepted(
                        &submit(&mut client, "shared", false, &body, id)
                            .await
                            .unwrap(),
                    );
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
        let all = events(&mut c2, "shared").await;
        assert_eq!(
            all.iter().map(|e| e.sequence).collect::<Vec<_>>(),
            (1..=201).collect::<Vec<_>>()
        );
        let (header, body, updates) = load(&mut c2, "shared").await;
        assert_eq!((header.sequence, updates.len()), (201, 200));
        assert_eq!(body.len() as u64, header.snapshot_len);
        // A retry through the other process returns the first result.
        let again = Author::new(1).update("shared", "S1", 0);
        let first = all
            .iter()
            .find(|e| e.body.contains(&Author::new(1).pub_key) && e.body.contains("\"clock\":0"))
            .unwrap();
        assert_eq!(
            accepted(
                &submit(&mut c2, "shared", false, &again, request_id(0, 0))
                    .await
                    .unwrap()
            ),
            first.sequence
        );

        // A malformed request is INVALID_ARGUMENT with a reason, not a crash.
        let status = submit(&mut c1, "shared", false, "not a frame", None)
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("not-json"),
            "{}",
            status.message()
        );
        let status = submit(&mut c1, "", false, &snapshot.body, None)
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);

        let mut health = tonic_health::pb::health_client::HealthClient::new(
            Channel::from_shared(one.url.clone())
                .unwrap()
                .connect_lazy(),
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let status = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: "secsync.persistence.v1.Persistence".into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status;
            if status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never reported SERVING"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

/// A gateway that retries a submission on the other replica while its first attempt is still
/// in flight (a network split) gets the first attempt's result, not a clock error: request ids
/// are looked up only once the document is locked. The test holds the document's row lock
/// itself until both attempts wait for it, so they always overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_racing_its_first_attempt_gets_the_first_result() {
    use sqlx::Connection as _;
    with_database(|url| async move {
        let (one, two) = (Persistence::start(&url), Persistence::start(&url));
        let (mut c1, c2) = (one.client(), two.client());
        let mut watcher = sqlx::PgConnection::connect(&url).await.unwrap();
        let author = Author::new(7);
        for round in 0..3u64 {
            let doc = format!("race-{round}");
            let snapshot = Author::new(99).snapshot(&doc, "S1", None, &[]);
            accepted(
                &submit(&mut c1, &doc, true, &snapshot.body, None)
                    .await
                    .unwrap(),
            );
            let mut holder = sqlx::PgConnection::connect(&url).await.unwrap();
            let mut lock = holder.begin().await.unwrap();
            sqlx::query("SELECT id FROM documents WHERE id = $1 FOR UPDATE")
                .bind(&doc)
                .fetch_one(&mut *lock)
                .await
                .unwrap();
            let body = author.update(&doc, "S1", 0);
            let attempts: Vec<_> = [c1.clone(), c2.clone()]
                .into_iter()
                .map(|mut client| {
                    let (doc, body) = (doc.clone(), body.clone());
                    tokio::spawn(async move {
                        submit(&mut client, &doc, false, &body, request_id(round, 0)).await
                    })
                })
                .collect();
            // Both attempts are inside their transactions, waiting for the document's lock.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock'",
                )
                .fetch_one(&mut watcher)
                .await
                .unwrap();
                if waiting >= 2 {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "round {round}: the attempts never waited for the lock"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            lock.commit().await.unwrap();
            let mut sequences = Vec::new();
            for attempt in attempts {
                sequences.push(accepted(&attempt.await.unwrap().unwrap()));
            }
            assert_eq!(
                sequences,
                [2, 2],
                "round {round}: both answer the one acceptance"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_and_restart_lose_nothing() {
    let pg = PrivatePostgres::start();
    let service = Persistence::start(&pg.url("postgres"));
    let mut client = service.client();
    load(&mut client, "d").await;
    let author = Author::new(1);
    let snapshot = author.snapshot("d", "S1", None, &[]);
    accepted(
        &submit(&mut client, "d", true, &snapshot.body, None)
            .await
            .unwrap(),
    );
    let mut clock = 0;
    let mut acknowledged = Vec::new();
    for _ in 0..5 {
        let body = author.update("d", "S1", clock);
        let response = submit(&mut client, "d", false, &body, request_id(1, clock))
            .await
            .unwrap();
        acknowledged.push((accepted(&response), body));
        clock += 1;
    }

    // Down: calls fail with UNAVAILABLE instead of hanging.
    pg.stop();
    let body = author.update("d", "S1", clock);
    let status = tokio::time::timeout(
        Duration::from_secs(20),
        submit(&mut client, "d", false, &body, request_id(1, clock)),
    )
    .await
    .expect("a call while the database is down must fail, not hang")
    .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");

    // Back: the same service answers again, the retried update goes in once.
    pg.start_again();
    let response = submit_until_answered(
        &mut client,
        "d",
        &body,
        request_id(1, clock),
        Duration::from_mins(1),
    )
    .await;
    acknowledged.push((accepted(&response), body));
    clock += 1;

    // A restart in the middle of a write loop: every acknowledged update survives.
    for i in 0..60 {
        if i == 20 {
            pg.stop();
            pg.start_again();
        }
        let body = author.update("d", "S1", clock);
        let response = submit_until_answered(
            &mut client,
            "d",
            &body,
            request_id(1, clock),
            Duration::from_mins(1),
        )
        .await;
        acknowledged.push((accepted(&response), body));
        clock += 1;
    }

    let stored = events(&mut client, "d").await;
    assert_eq!(stored.len(), acknowledged.len() + 1);
    for (sequence, body) in &acknowledged {
        let event = stored
            .iter()
            .find(|e| e.sequence == *sequence)
            .expect("acknowledged update stored");
        assert_eq!(event.body, secsync_protocol::stored_body(body).unwrap());
    }
    assert_eq!(
        stored.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        (1..=stored.len() as u64).collect::<Vec<_>>()
    );
}
