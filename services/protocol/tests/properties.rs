//! Property tests: the parser never panics, and the rules never accept a clock that is not the
//! author's previous + 1 nor a snapshot whose parent is not the active one.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use ed25519_dalek::SigningKey;
use proptest::prelude::*;
use secsync_protocol::message::build_frame;
use secsync_protocol::{
    b64, canonical, json, parse_client_frame, ActiveSnapshot, ClientFrame, Clocks, DocumentState,
    Domain, ParseOptions, PublicKey, Reason, RuleOptions, SnapshotId,
};

const DOC: &str = "doc-1";

fn key(i: u8) -> SigningKey {
    SigningKey::from_bytes(&[i + 1; 32])
}

fn pub_key(i: u8) -> String {
    PublicKey::from_bytes(key(i).verifying_key().to_bytes())
        .as_str()
        .to_owned()
}

fn ciphertext() -> String {
    b64::encode([7u8; 64])
}

fn nonce() -> String {
    b64::encode([9u8; 24])
}

type FrameCache = HashMap<(u8, String, u64), ClientFrame>;

/// Signing is the slow part of these tests; frames for the small clock range are made once.
fn update(author: u8, snapshot: &str, clock: u64) -> ClientFrame {
    static CACHE: OnceLock<Mutex<FrameCache>> = OnceLock::new();
    let cache = CACHE.get_or_init(Mutex::default);
    let key = (author, snapshot.to_owned(), clock);
    if let Some(frame) = cache.lock().unwrap().get(&key) {
        return frame.clone();
    }
    let frame = make_update(author, snapshot, clock);
    cache.lock().unwrap().insert(key, frame.clone());
    frame
}

fn make_update(author: u8, snapshot: &str, clock: u64) -> ClientFrame {
    let pd = format!(
        r#"{{"refSnapshotId":"{snapshot}","docId":"{DOC}","pubKey":"{}","clock":{clock}}}"#,
        pub_key(author)
    );
    let text = build_frame(Domain::Update, &ciphertext(), &nonce(), &pd, &key(author)).unwrap();
    let frame = parse_client_frame(&text, ParseOptions::default()).unwrap();
    frame.verify().unwrap();
    frame
}

fn snapshot(id: &str, parent: &str, clocks: &str) -> ClientFrame {
    let pd = format!(
        r#"{{"snapshotId":"{id}","docId":"{DOC}","pubKey":"{}","parentSnapshotId":"{parent}","parentSnapshotUpdateClocks":{clocks},"parentSnapshotProof":"p"}}"#,
        pub_key(0)
    );
    let text = build_frame(Domain::Snapshot, &ciphertext(), &nonce(), &pd, &key(0)).unwrap();
    parse_client_frame(&text, ParseOptions::default()).unwrap()
}

fn active(id: &str, clocks: Clocks) -> DocumentState {
    DocumentState {
        active: Some(ActiveSnapshot {
            id: SnapshotId::parse(id).unwrap(),
            ciphertext_hash: "h".into(),
            parent_snapshot_proof: "p".into(),
            clocks,
            update_count: 0,
        }),
    }
}

fn no_proofs() -> RuleOptions {
    RuleOptions {
        verify_parent_proof: false,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn parser_never_panics_on_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = parse_client_frame(&text, ParseOptions::default());
        let _ = json::parse(&text);
    }

    #[test]
    fn parser_never_panics_on_json_like_text(text in r#"[\{\}\[\]":,0-9a-zA-Z\\ .eE+\-_]{0,300}"#) {
        let _ = parse_client_frame(&text, ParseOptions::default());
    }

    #[test]
    fn parser_never_panics_on_mutated_frames(
        author in 0u8..3, clock in 0u64..5, cut in any::<prop::sample::Index>(),
        insert in any::<char>(), delete in any::<bool>()
    ) {
        let text = match update(author, "S1", clock) {
            ClientFrame::Update(u) => u.signed.body().to_owned(),
            _ => unreachable!(),
        };
        let mut chars: Vec<char> = text.chars().collect();
        let at = cut.index(chars.len());
        if delete { chars.remove(at); } else { chars.insert(at, insert); }
        let mutated: String = chars.into_iter().collect();
        if let Ok(frame) = parse_client_frame(&mutated, ParseOptions::default()) {
            // Whatever still parses still round-trips through its body.
            let again = parse_client_frame(frame.signed().body(), ParseOptions::default()).unwrap();
            prop_assert_eq!(again.signed().body(), frame.signed().body());
        }
    }

    #[test]
    fn canonical_form_is_a_fixed_point(text in r#"\{("[a-z]{1,3}":(-?[0-9]{1,4}(\.[0-9]{1,3})?|"[a-zé😀\\n]{0,4}"|true|null),){0,5}"z":0\}"#) {
        if let Ok(value) = json::parse(&text) {
            let once = canonical::to_canonical(&value);
            let twice = canonical::to_canonical(&json::parse(&once).unwrap());
            prop_assert_eq!(once, twice);
        }
    }

    /// Against a model of per-author clocks, an update is accepted exactly when its clock is the
    /// author's previous + 1 (or 0 for a new author), and versions are contiguous.
    #[test]
    fn rules_accept_only_the_next_clock(steps in proptest::collection::vec((0u8..3, 0u64..6), 1..40)) {
        let mut state = active("S1", Clocks::new());
        let mut model: [Option<u64>; 3] = [None; 3];
        let mut version = 0;
        for (author, clock) in steps {
            let ClientFrame::Update(u) = update(author, "S1", clock) else { unreachable!() };
            let expected = model[author as usize].map_or(0, |c| c + 1);
            match state.accept_update(&u) {
                Ok(v) => {
                    prop_assert_eq!(clock, expected);
                    version += 1;
                    prop_assert_eq!(v, version);
                    model[author as usize] = Some(clock);
                }
                Err(reason) => {
                    prop_assert_ne!(clock, expected);
                    prop_assert_eq!(reason, Reason::UpdateWrongClock);
                }
            }
        }
    }

    /// Updates naming any snapshot but the active one are refused.
    #[test]
    fn rules_refuse_updates_on_other_snapshots(other in "[A-Za-z0-9]{1,8}") {
        prop_assume!(other != "S1");
        let state = active("S1", Clocks::new());
        let ClientFrame::Update(u) = update(0, &other, 0) else { unreachable!() };
        prop_assert_eq!(state.check_update(&u), Err(Reason::UpdateNotActiveSnapshot));
        prop_assert_eq!(DocumentState::default().check_update(&u), Err(Reason::UpdateNoActiveSnapshot));
    }

    /// A snapshot is accepted only when its parent is the active snapshot and its clocks are the
    /// active snapshot's clocks.
    #[test]
    fn rules_accept_only_children_of_the_active_snapshot(
        parent in prop_oneof!["S1", "S0", "S2", ""], a in 0u64..3, b in 0u64..3, server_b in 0u64..3,
    ) {
        let mut server = Clocks::new();
        server.insert(pub_key(0), secsync_protocol::Clock::new(a).unwrap());
        server.insert(pub_key(1), secsync_protocol::Clock::new(server_b).unwrap());
        let state = active("S1", server);
        let clocks = format!(r#"{{"{}":{a},"{}":{b}}}"#, pub_key(0), pub_key(1));
        let ClientFrame::Snapshot(snap) = snapshot("S9", &parent, &clocks) else { unreachable!() };
        let verdict = state.check_snapshot(&snap, no_proofs());
        if parent != "S1" {
            prop_assert_eq!(verdict, Err(Reason::SnapshotOutdated));
        } else if b != server_b {
            prop_assert_eq!(verdict, Err(Reason::SnapshotMissesUpdates));
        } else {
            prop_assert_eq!(verdict, Ok(()));
        }
    }
}
