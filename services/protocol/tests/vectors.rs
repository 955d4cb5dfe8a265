//! Every case of `../shared/vectors` (made by the real JavaScript libraries) checked against this
//! crate, byte for byte where the reference's bytes are defined.
//!
//! Where our server is deliberately stricter than secsync-server 0.5 (PROTOCOL.md section 7), the
//! case is still checked: [`OUR_VERDICTS`] names the reason we refuse it with, and the test fails
//! if we accept it or refuse it for another reason.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure
#![allow(clippy::disallowed_methods)] // tests read their fixtures path from the environment

use std::collections::BTreeMap;
use std::path::PathBuf;

use secsync_protocol::crypto::{self, ProofEntry};
use secsync_protocol::rules::{compare_update_clocks, is_valid_parent, proof_chain_after};
use secsync_protocol::wire;
use secsync_protocol::{
    b64, canonical, json, parse_client_frame, ClientFrame, DocumentId, DocumentState, ParseOptions,
    Reason, RuleOptions, SnapshotId,
};
use serde_json::Value;

fn vectors_dir() -> PathBuf {
    // Read at test time, never copied into the repo; a missing directory fails the test.
    std::env::var_os("SECSYNC_VECTORS_DIR").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/vectors"),
        PathBuf::from,
    )
}

fn load(name: &str) -> Value {
    let path = vectors_dir().join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn cases(file: &Value) -> &Vec<Value> {
    file["cases"].as_array().unwrap()
}

fn s(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v}"))
}

/// Cases where our verdict differs from secsync-server 0.5's on purpose, with the reason.
const OUR_VERDICTS: &[(&str, &str, Reason)] = &[
    // PROTOCOL.md 7.2: duplicate keys are malformed input (the reference keeps the last one).
    (
        "snapshots.json",
        "S1 re-encoded: duplicate key: a wrong nonce first, the right one last",
        Reason::DuplicateKey,
    ),
    // PROTOCOL.md 7.6: extra publicData fields are refused unless configured.
    (
        "snapshots.json",
        "extra publicData field, server without additional validation",
        Reason::ExtraField,
    ),
    (
        "snapshots.json",
        "extra publicData field, server with additionalAuthenticationDataValidations",
        Reason::ExtraField,
    ),
    (
        "updates.json",
        "extra publicData field, server without additional validation",
        Reason::ExtraField,
    ),
    (
        "updates.json",
        "extra publicData field, server with additionalAuthenticationDataValidations",
        Reason::ExtraField,
    ),
    (
        "ephemeral.json",
        "extra publicData field, server without additional validation",
        Reason::ExtraField,
    ),
    (
        "ephemeral.json",
        "extra publicData field, server with additionalAuthenticationDataValidations",
        Reason::ExtraField,
    ),
    // PROTOCOL.md 2.4: a ciphertext shorter than its two tags cannot be an encryption.
    (
        "snapshots.json",
        "signed ciphertext that is not an encryption",
        Reason::BadLength,
    ),
    // PROTOCOL.md 7.1: every message is bound to the connection's document.
    (
        "snapshots.json",
        "correctly signed snapshot of another document sent on this document's connection",
        Reason::WrongDocument,
    ),
    (
        "updates.json",
        "correctly signed update naming another document",
        Reason::WrongDocument,
    ),
    (
        "ephemeral.json",
        "correctly signed message naming another document",
        Reason::WrongDocument,
    ),
    // PROTOCOL.md 7.2: clocks are non-negative integers.
    (
        "updates.json",
        "correctly signed update with clock 1.5",
        Reason::BadClock,
    ),
    (
        "updates.json",
        "correctly signed update with clock -1",
        Reason::BadClock,
    ),
    (
        "updates.json",
        "correctly signed update with clock 1e+21",
        Reason::BadClock,
    ),
];

fn our_verdict(file: &str, name: &str) -> Option<Reason> {
    OUR_VERDICTS
        .iter()
        .find(|(f, n, _)| *f == file && *n == name)
        .map(|(_, _, r)| *r)
}

/// Parses, binds and verifies a frame as the gateway does.
fn gateway_check(
    text: &str,
    connection: &DocumentId,
    options: ParseOptions,
) -> Result<ClientFrame, secsync_protocol::FrameError> {
    let frame = parse_client_frame(text, options)?;
    frame.check_document(connection)?;
    frame.verify()?;
    Ok(frame)
}

/// Equal as JavaScript values: compared through canonical JSON, so `2.0` equals `2`.
fn json_eq(a: &str, b: &str) -> bool {
    canonical::to_canonical(&json::parse(a).unwrap())
        == canonical::to_canonical(&json::parse(b).unwrap())
}

fn check_message_file(file_name: &str) -> usize {
    let file = load(file_name);
    let ctx = &file["context"];
    let (home, other) = (s(&ctx["document_id"]), s(&ctx["other_document_id"]));
    let mut checked = 0;
    for case in cases(&file) {
        let name = s(&case["name"]);
        let text = s(&case["message_json"]);
        let valid = case["valid"].as_bool().unwrap();
        let expected = &case["expected"];

        // The connection's document: as given, else the document the message was made for.
        let parsed_doc = json::parse(text).ok().and_then(|v| {
            v.get("publicData")?
                .get("docId")?
                .as_str()
                .map(str::to_owned)
        });
        let connection = case["connection_document_id"]
            .as_str()
            .map(str::to_owned)
            .or_else(|| parsed_doc.filter(|d| d != other && d != home))
            .unwrap_or_else(|| home.to_owned());
        let connection = DocumentId::parse(&connection).unwrap();

        let result = gateway_check(text, &connection, ParseOptions::default());

        // Derived values: what a verifier rebuilds from the received text.
        if let (Ok(frame), Some(derived)) = (
            parse_client_frame(text, ParseOptions::default()),
            case["derived"].as_object(),
        ) {
            let signed = frame.signed();
            assert_eq!(
                b64::decode(signed.public_data_b64()).unwrap(),
                s(&derived["public_data_canonical"]).as_bytes(),
                "{file_name} / {name}: canonical publicData"
            );
            assert_eq!(
                signed.public_data_b64(),
                s(&derived["public_data_base64"]),
                "{name}"
            );
            assert_eq!(
                frame.domain().prefix(),
                s(&derived["signature_domain"]),
                "{name}"
            );
            assert_eq!(
                signed.signature_input(frame.domain()),
                s(&derived["signature_input"]),
                "{file_name} / {name}: signature input"
            );
            if let (ClientFrame::Snapshot(snap), Some(hash)) =
                (&frame, derived.get("ciphertext_hash"))
            {
                assert_eq!(snap.ciphertext_hash(), s(hash), "{name}: ciphertext hash");
            }
        }

        match (our_verdict(file_name, name), &result) {
            (Some(reason), Err(err)) => {
                assert_eq!(err.reason, reason, "{file_name} / {name}: wrong reason");
            }
            (Some(reason), Ok(_)) => {
                panic!("{file_name} / {name}: accepted, we refuse with {reason}")
            }
            (None, Ok(frame)) => {
                assert!(
                    valid,
                    "{file_name} / {name}: accepted but the reference refuses it"
                );
                check_accepted(frame, expected, name);
            }
            (None, Err(err)) => {
                assert!(
                    !valid,
                    "{file_name} / {name}: refused ({}) but valid",
                    err.reason
                );
                let reply = err.reply();
                match expected["server_reply"].as_array().unwrap().first() {
                    // Snapshots and updates: the reference's reply, byte for byte.
                    Some(reference) => assert_eq!(&reply, s(reference), "{file_name} / {name}"),
                    // Ephemeral messages: the reference stays silent; we answer (PROTOCOL.md 7.2).
                    None => assert_eq!(reply, wire::invalid_message(err.reason), "{name}"),
                }
            }
        }
        checked += 1;
    }
    checked
}

/// An accepted frame: our acknowledgement equals the reference's byte for byte, our broadcast
/// equals it as JSON (we relay publicData's exact text, the reference re-serialises it).
fn check_accepted(frame: &ClientFrame, expected: &Value, name: &str) {
    let reply = expected["server_reply"].as_array().unwrap();
    let broadcast = expected["server_broadcast"].as_array().unwrap();
    let body = frame.signed().body();
    match frame {
        ClientFrame::Snapshot(snap) => {
            assert_eq!(
                wire::snapshot_saved(&snap.snapshot_id),
                s(&reply[0]),
                "{name}"
            );
            assert!(
                json_eq(&wire::snapshot_broadcast(body), s(&broadcast[0])),
                "{name}"
            );
        }
        ClientFrame::Update(update) => {
            assert_eq!(
                wire::update_saved(&update.ref_snapshot_id, update.clock),
                s(&reply[0]),
                "{name}"
            );
            assert!(
                json_eq(&wire::update_broadcast(body), s(&broadcast[0])),
                "{name}"
            );
        }
        ClientFrame::Ephemeral(_) => {
            assert!(reply.is_empty(), "{name}");
            assert!(
                json_eq(&wire::ephemeral_broadcast(body), s(&broadcast[0])),
                "{name}"
            );
        }
    }
}

#[test]
fn snapshot_vectors() {
    assert_eq!(check_message_file("snapshots.json"), 49);
}

#[test]
fn update_vectors() {
    assert_eq!(check_message_file("updates.json"), 40);
}

#[test]
fn ephemeral_vectors() {
    assert_eq!(check_message_file("ephemeral.json"), 29);
}

#[test]
fn extra_public_data_fields_verify_when_allowed() {
    let allow = ParseOptions {
        allow_extra_public_data_fields: true,
    };
    for file_name in ["snapshots.json", "updates.json", "ephemeral.json"] {
        let file = load(file_name);
        let doc = DocumentId::parse(s(&file["context"]["document_id"])).unwrap();
        for case in cases(&file) {
            let name = s(&case["name"]);
            if !name.starts_with("extra publicData field") {
                continue;
            }
            // Both cases carry the same message; only the reference's configuration differs.
            let frame = gateway_check(s(&case["message_json"]), &doc, allow)
                .unwrap_or_else(|e| panic!("{file_name} / {name}: {e}"));
            let expected = &case["expected"];
            let with_validation = name.ends_with("additionalAuthenticationDataValidations");
            if with_validation {
                check_accepted(&frame, expected, name);
            }
        }
    }
}

#[test]
fn canonicalize_vectors() {
    let file = load("canonicalize.json");
    for case in cases(&file) {
        let name = s(&case["name"]);
        let input = s(&case["input_json"]);
        let expected = s(&case["canonical"]);
        match json::parse(input) {
            Ok(value) => {
                let ours = canonical::to_canonical(&value);
                assert_eq!(ours, expected, "{name}");
                assert_eq!(
                    b64::encode(&ours),
                    s(&case["canonical_utf8_base64"]),
                    "{name}"
                );
            }
            // Our one refusal: PROTOCOL.md 7.2 makes duplicate keys malformed input.
            Err(json::JsonError::DuplicateKey(_)) => {
                assert_eq!(name, "duplicate keys: the last occurrence wins");
            }
            Err(e) => panic!("{name}: {e}"),
        }
    }
    assert_eq!(cases(&file).len(), 34);
}

#[test]
fn hash_vectors() {
    let file = load("hashes.json");
    for case in cases(&file) {
        let bytes = b64::decode(s(&case["input_base64"])).unwrap();
        if let Some(text) = case["input_utf8"].as_str() {
            assert_eq!(bytes, text.as_bytes());
        }
        assert_eq!(
            crypto::hash(&bytes),
            s(&case["expected"]["hash"]),
            "{}",
            case["name"]
        );
    }
    assert_eq!(cases(&file).len(), 12);
}

fn entry(v: &Value) -> ProofEntry {
    ProofEntry {
        snapshot_id: SnapshotId::parse(s(&v["snapshotId"])).unwrap(),
        parent_snapshot_proof: s(&v["parentSnapshotProof"]).to_owned(),
        snapshot_ciphertext_hash: s(&v["snapshotCiphertextHash"]).to_owned(),
    }
}

#[test]
fn proof_vectors() {
    let file = load("proofs.json");
    let chain: Vec<ProofEntry> = file["context"]["chain"]
        .as_array()
        .unwrap()
        .iter()
        .map(entry)
        .collect();
    for case in cases(&file) {
        let name = s(&case["name"]);
        let expected = &case["expected"];
        match s(&case["kind"]) {
            "parentSnapshotProof" => {
                let i = &case["inputs"];
                let proof = crypto::parent_snapshot_proof(
                    s(&i["grandParentSnapshotProof"]),
                    s(&i["parentSnapshotId"]),
                    s(&i["parentSnapshotCiphertextHash"]),
                );
                assert_eq!(proof, s(&expected["parentSnapshotProof"]), "{name}");
            }
            "isValidParentSnapshot" => {
                let parent = &case["parent_info"];
                let snap = &case["snapshot"];
                let proof = s(&snap["parentSnapshotProof"]);
                let parent_entry = ProofEntry {
                    snapshot_id: SnapshotId::parse(s(&parent["snapshotId"])).unwrap(),
                    parent_snapshot_proof: s(&parent["parentSnapshotProof"]).to_owned(),
                    snapshot_ciphertext_hash: s(&parent["snapshotCiphertextHash"]).to_owned(),
                };
                assert_eq!(
                    parent_entry.child_proof(),
                    s(&expected["recomputed_proof"]),
                    "{name}"
                );
                assert_eq!(
                    is_valid_parent(proof, s(&snap["parentSnapshotId"]), &parent_entry),
                    expected["valid"].as_bool().unwrap(),
                    "{name}"
                );
            }
            "snapshotProofChain" => {
                let known = entry(&case["known_snapshot"]);
                let active = entry(&case["active_snapshot"]);
                let given: Vec<ProofEntry> = case["snapshot_proof_chain"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(entry)
                    .collect();
                let valid = expected["valid"].as_bool().unwrap();
                assert_eq!(
                    crypto::verify_proof_chain(&known, &active, &given),
                    valid,
                    "{name}"
                );
                // The chains a server sends: ours must be exactly these.
                if name.starts_with("server chain") {
                    let upto = chain.iter().position(|e| e == &active).unwrap();
                    assert_eq!(
                        proof_chain_after(&chain[..=upto], &known.snapshot_id),
                        given,
                        "{name}"
                    );
                }
            }
            other => panic!("unknown kind {other}"),
        }
    }
    assert_eq!(cases(&file).len(), 31);
}

#[test]
fn update_clock_vectors() {
    let file = load("update-clocks.json");
    for case in cases(&file) {
        let name = s(&case["name"]);
        let read = |v: &Value| {
            let text = v.to_string();
            secsync_protocol::message::clock_map(&json::parse(&text).unwrap())
        };
        match (read(&case["server_clocks"]), read(&case["client_clocks"])) {
            (Ok(server), Ok(client)) => {
                let (equal, missing) = compare_update_clocks(&server, &client);
                assert_eq!(
                    equal,
                    case["expected"]["equal"].as_bool().unwrap(),
                    "{name}"
                );
                let expected: BTreeMap<String, u64> =
                    serde_json::from_value(case["expected"]["missing"].clone()).unwrap();
                let ours: BTreeMap<String, u64> =
                    missing.into_iter().map(|(k, v)| (k, v.get())).collect();
                assert_eq!(ours, expected, "{name}");
            }
            _ => assert_eq!(case["expected"]["throws"].as_bool(), Some(true), "{name}"),
        }
    }
    assert_eq!(cases(&file).len(), 12);
}

/// The chain S0…S4 with the updates of `updates.json` goes through the rules with proof
/// verification on; the fork S3x is refused as outdated once S3 is active.
#[test]
fn rules_accept_the_vector_chain() {
    let snapshots = load("snapshots.json");
    let updates = load("updates.json");
    let doc = DocumentId::parse(s(&snapshots["context"]["document_id"])).unwrap();
    let frame = |text: &str| gateway_check(text, &doc, ParseOptions::default()).unwrap();
    let chain_case = |i: u64| {
        cases(&snapshots)
            .iter()
            .find(|c| c["chain_index"].as_u64() == Some(i))
            .map(|c| s(&c["message_json"]).to_owned())
            .unwrap()
    };
    let options = RuleOptions::default();
    let mut state = DocumentState::default();
    let accept_snapshot = |state: &mut DocumentState, text: &str| {
        let ClientFrame::Snapshot(snap) = frame(text) else {
            panic!("not a snapshot")
        };
        let hash = snap.ciphertext_hash();
        state.accept_snapshot(&snap, hash, options)
    };

    accept_snapshot(&mut state, &chain_case(0)).unwrap();
    // S1 before the updates it includes: it misses them.
    assert_eq!(
        accept_snapshot(&mut state, &chain_case(1)),
        Err(Reason::SnapshotMissesUpdates)
    );
    let valid_updates: Vec<_> = cases(&updates).iter().take(6).collect();
    for (i, case) in valid_updates.iter().enumerate() {
        let ClientFrame::Update(update) = frame(s(&case["message_json"])) else {
            panic!()
        };
        assert_eq!(
            state.accept_update(&update),
            Ok(i as u64 + 1),
            "{}",
            case["name"]
        );
        // The same update again is a wrong clock, never a second acceptance.
        assert_eq!(state.check_update(&update), Err(Reason::UpdateWrongClock));
    }
    accept_snapshot(&mut state, &chain_case(1)).unwrap();
    accept_snapshot(&mut state, &chain_case(2)).unwrap();
    for i in 3..=4 {
        // S3 and S4 include updates the vectors do not carry: give the state their clocks.
        let ClientFrame::Snapshot(snap) = frame(&chain_case(i)) else {
            panic!()
        };
        state.active.as_mut().unwrap().clocks = snap.parent_snapshot_update_clocks.clone();
        accept_snapshot(&mut state, &chain_case(i)).unwrap();
    }
    // An update on the old snapshot is refused once a newer one is active.
    let ClientFrame::Update(old) = frame(s(&valid_updates[0]["message_json"])) else {
        panic!()
    };
    assert_eq!(
        state.check_update(&old),
        Err(Reason::UpdateNotActiveSnapshot)
    );
    // S1 again (its parent is no longer active): outdated.
    assert_eq!(
        accept_snapshot(&mut state, &chain_case(1)),
        Err(Reason::SnapshotOutdated)
    );
}

/// A child whose proof is wrong is refused only when proof verification is on.
#[test]
fn rules_check_parent_proofs() {
    let snapshots = load("snapshots.json");
    let doc = DocumentId::parse(s(&snapshots["context"]["document_id"])).unwrap();
    let find = |name: &str| {
        let text = cases(&snapshots)
            .iter()
            .find(|c| c["name"] == name)
            .map(|c| s(&c["message_json"]).to_owned())
            .unwrap();
        match gateway_check(&text, &doc, ParseOptions::default()).unwrap() {
            ClientFrame::Snapshot(snap) => snap,
            _ => panic!(),
        }
    };
    let root = find("chain S0 (initial snapshot)");
    let s1 = find("chain S1 (child of S0)");
    let wrong = find("correctly signed child with a wrong parentSnapshotProof");
    assert_eq!(wrong.parent_snapshot_id.as_ref(), Some(&s1.snapshot_id));
    let mut state = DocumentState::default();
    state
        .accept_snapshot(&root, root.ciphertext_hash(), RuleOptions::default())
        .unwrap();
    // S1 includes the six updates of updates.json; give the state their clocks.
    state.active.as_mut().unwrap().clocks = s1.parent_snapshot_update_clocks.clone();
    state
        .accept_snapshot(&s1, s1.ciphertext_hash(), RuleOptions::default())
        .unwrap();
    assert_eq!(
        state.check_snapshot(&wrong, RuleOptions::default()),
        Err(Reason::SnapshotInvalidProof)
    );
    assert_eq!(
        state.check_snapshot(
            &wrong,
            RuleOptions {
                verify_parent_proof: false
            }
        ),
        Ok(())
    );
    // A first snapshot that claims a parent is refused with proof checks on.
    let orphan = find("chain S2 (child of S1)");
    assert_eq!(
        DocumentState::default().check_snapshot(&orphan, RuleOptions::default()),
        Err(Reason::SnapshotInvalidProof)
    );
}
