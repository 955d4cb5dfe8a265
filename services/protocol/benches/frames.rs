//! Frames parsed and signatures verified per second: the CPU budget of a gateway.
//!
//! `cargo bench -p secsync-protocol --bench frames`; numbers go to BENCHMARKS.md.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ed25519_dalek::SigningKey;
use secsync_protocol::message::build_frame;
use secsync_protocol::{b64, parse_client_frame, Domain, KeyCache, ParseOptions, PublicKey};

fn frames() -> Vec<(&'static str, String)> {
    let key = SigningKey::from_bytes(&[5; 32]);
    let pub_key = PublicKey::from_bytes(key.verifying_key().to_bytes());
    let nonce = b64::encode([1u8; 24]);
    // A typical Yjs keystroke update: ~40 bytes of plaintext plus the two tags.
    let small = b64::encode([2u8; 90]);
    let update_pd = format!(
        r#"{{"refSnapshotId":"Lzxi_aWlowwGKzmylFo8HJBfoBaTu3RP","docId":"pGAJ9J9GTJaRWJcaov3NF6_hJElvveqO","pubKey":"{pub_key}","clock":1234}}"#
    );
    let update = build_frame(Domain::Update, &small, &nonce, &update_pd, &key).unwrap();
    let big = b64::encode(vec![3u8; 100 * 1024]);
    let snapshot_pd = format!(
        r#"{{"snapshotId":"7x9-BnH0EJo_-UqyvGMjt5KWyD8lB7Wk","docId":"pGAJ9J9GTJaRWJcaov3NF6_hJElvveqO","pubKey":"{pub_key}","parentSnapshotId":"Lzxi_aWlowwGKzmylFo8HJBfoBaTu3RP","parentSnapshotUpdateClocks":{{"{pub_key}":1234}},"parentSnapshotProof":"vFo9n7zaZAlX2stKK_Fevigz9ZrqG77MFEaL_FRHk38"}}"#
    );
    let snapshot = build_frame(Domain::Snapshot, &big, &nonce, &snapshot_pd, &key).unwrap();
    vec![("update", update), ("snapshot-100KiB", snapshot)]
}

fn parse_and_verify(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame");
    for (name, text) in frames() {
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::new("parse", name), &text, |b, text| {
            b.iter(|| parse_client_frame(text, ParseOptions::default()).unwrap());
        });
        group.bench_with_input(BenchmarkId::new("parse+verify", name), &text, |b, text| {
            b.iter(|| {
                let frame = parse_client_frame(text, ParseOptions::default()).unwrap();
                frame.verify().unwrap();
            });
        });
        // As a gateway does: the connection's key decoded once.
        let mut keys = KeyCache::default();
        group.bench_with_input(
            BenchmarkId::new("parse+verify-kept-key", name),
            &text,
            |b, text| {
                b.iter(|| {
                    let frame = parse_client_frame(text, ParseOptions::default()).unwrap();
                    frame.verify_with(&mut keys).unwrap();
                });
            },
        );
    }
    group.finish();
}

criterion_group!(benches, parse_and_verify);
criterion_main!(benches);
