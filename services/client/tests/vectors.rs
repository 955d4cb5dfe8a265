//! The client against `../shared/vectors` (made by the real JavaScript libraries).
//!
//! * Every message case with a `plaintext` and `document_key` is re-encrypted with the case's
//!   nonce and must give the case's exact ciphertext (the scheme is deterministic given the
//!   nonce), and where the frame was produced unaltered by the JS client, rebuilding it with the
//!   author's seed must give the exact frame text (Ed25519 is deterministic too).
//! * Every case's `expected.client` verdict (`verifyAndDecrypt*` of secsync 0.5) is compared
//!   with what this client's receiving code decides, error code for error code. Where this
//!   client is deliberately stricter, [`DEVIATIONS`] names the error it gives instead and the
//!   test fails if it gives anything else.
//! * The update clock verdicts (202 / 213 / 214) run through [`SyncState`], the code the client
//!   uses live; the ephemeral cases run through one [`EphemeralSessions`] per receiver in the
//!   order of the file, as the generator ran them.
//! * The `proofs.json` parent and chain verdicts run through [`SyncState`] with the real
//!   snapshots of `snapshots.json`.
//!
//! A missing vectors file fails the test.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure
#![allow(clippy::disallowed_methods)] // tests read their fixtures path from the environment
#![allow(clippy::too_many_lines)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use ed25519_dalek::SigningKey;
use secsync_client::crypto::{self, EphemeralPayload, SessionId};
use secsync_client::ephemeral::EphemeralSessions;
use secsync_client::frames::{self, SnapshotSpec};
use secsync_client::sync::{Clocks, Event, KnownSnapshot, SyncError, SyncState};
use secsync_client::DocumentKey;
use secsync_protocol::crypto::ProofEntry;
use secsync_protocol::{
    b64, canonical, json, Clock, DocumentId, LoadMode, ParseOptions, PublicKey, SnapshotId,
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

fn s(v: &Value) -> &str {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v}"))
}

/// Where this client's verdict differs from the JS client's on purpose: (file, case, the
/// `SyncError` code or name we give instead).
const DEVIATIONS: &[(&str, &str, &str)] = &[
    // PROTOCOL.md 7.2: duplicate JSON keys are malformed (JS keeps the last one). Our server
    // never relays such a frame, so the client refusing it costs nothing.
    (
        "snapshots.json",
        "S1 re-encoded: duplicate key: a wrong nonce first, the right one last",
        "SECSYNC_ERROR_110",
    ),
    // "lala" is not a ciphertext of at least 48 bytes: refused by the parser (110) before the
    // JS client's decryption failure (101). Refused either way.
    (
        "snapshots.json",
        "signed ciphertext that is not an encryption",
        "SECSYNC_ERROR_110",
    ),
    // Clocks must be non-negative safe integers: refused when parsed (211) where the JS client
    // compares the number (202 / 214). Refused either way.
    (
        "updates.json",
        "correctly signed update with clock 1.5",
        "SECSYNC_ERROR_211",
    ),
    (
        "updates.json",
        "correctly signed update with clock -1",
        "SECSYNC_ERROR_211",
    ),
    (
        "updates.json",
        "correctly signed update with clock 1e+21",
        "SECSYNC_ERROR_211",
    ),
    // PROTOCOL.md 7.1: an update must name the connection's document; the JS client does not
    // check an update's docId at all.
    (
        "updates.json",
        "correctly signed update naming another document",
        "UpdateWrongDocument",
    ),
];

fn deviation(file: &str, case: &str) -> Option<&'static str> {
    DEVIATIONS
        .iter()
        .find(|(f, c, _)| *f == file && *c == case)
        .map(|(_, _, code)| *code)
}

fn error_name(error: &SyncError) -> String {
    error
        .code()
        .map_or_else(|| format!("{error:?}"), str::to_owned)
}

/// Whether our error is an acceptable stand-in for the JS client's code: the same code, or for
/// "signature invalid" a parse refusal of the signature or key encoding (our parser checks
/// base64 and lengths before verifying) or of extra publicData fields (refused by default).
fn same_verdict(expected: &str, ours: &SyncError) -> bool {
    if ours.code() == Some(expected) {
        return true;
    }
    let encoding = |reason: &str| matches!(reason, "bad-base64" | "bad-length" | "extra-field");
    match (expected, ours) {
        ("SECSYNC_ERROR_111", SyncError::SnapshotMalformed(r))
        | ("SECSYNC_ERROR_212", SyncError::UpdateMalformed(r)) => encoding(r),
        ("SECSYNC_ERROR_308" | "schema", SyncError::EphemeralMalformed)
        | ("schema", SyncError::SnapshotMalformed(_) | SyncError::UpdateMalformed(_)) => true,
        _ => false,
    }
}

fn plaintext(case: &Value) -> Option<Vec<u8>> {
    let p = case.get("plaintext")?;
    Some(if let Some(text) = p.get("utf8") {
        s(text).as_bytes().to_vec()
    } else {
        b64::decode(s(&p["base64"])).unwrap()
    })
}

fn parse_options(case: &Value) -> ParseOptions {
    ParseOptions {
        allow_extra_public_data_fields: s(&case["name"])
            .contains("with additionalAuthenticationDataValidations"),
    }
}

/// The document the receiving client is on: the case's `connection_document_id`, else the
/// context's document, except for the case about a non-ASCII document id, which the generator
/// verified on that document.
fn doc_id(file: &Value, case: &Value) -> DocumentId {
    if let Some(id) = case.get("connection_document_id") {
        return DocumentId::parse(s(id)).unwrap();
    }
    if s(&case["name"]).contains("document whose id has non-ASCII") {
        let message: Value = serde_json::from_str(s(&case["message_json"])).unwrap();
        return DocumentId::parse(s(&message["publicData"]["docId"])).unwrap();
    }
    DocumentId::parse(s(&file["context"]["document_id"])).unwrap()
}

fn context_key(file: &Value) -> DocumentKey {
    DocumentKey::from_b64(s(&file["context"]["document_keys"]["K1"])).unwrap()
}

fn seed_of(file: &Value, author: &str) -> SigningKey {
    let seed = b64::decode_array::<32>(s(&file["context"]["authors"][author]["seed"])).unwrap();
    SigningKey::from_bytes(&seed)
}

fn public_of(file: &Value, author: &str) -> PublicKey {
    PublicKey::parse(s(&file["context"]["authors"][author]["publicKey"])).unwrap()
}

/// `b64u(canon(publicData))` of the frame's `publicData` as the client computes it.
fn pd_b64(message: &str) -> String {
    // Duplicate keys: our parser refuses them, so normalise through serde_json, which keeps the
    // last value as JavaScript does.
    let normalised;
    let text = if json::parse(message).is_ok() {
        message
    } else {
        normalised = serde_json::from_str::<Value>(message).unwrap().to_string();
        &normalised
    };
    let root = json::parse(text).unwrap();
    b64::encode(canonical::to_canonical(root.get("publicData").unwrap()))
}

fn with_plaintext(file: &Value) -> usize {
    file["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c.get("plaintext").is_some() && c.get("document_key").is_some())
        .count()
}

/// Re-encrypts the case's plaintext with its nonce and key and compares the ciphertext.
fn check_reencryption(case: &Value, plaintext: &[u8]) {
    let message: Value = serde_json::from_str(s(&case["message_json"])).unwrap();
    let key = DocumentKey::from_b64(s(&case["document_key"])).unwrap();
    let nonce = b64::decode_array::<24>(s(&message["nonce"])).unwrap();
    let pd = pd_b64(s(&case["message_json"]));
    let sealed = crypto::encrypt_with_nonce(plaintext, &pd, &key, &nonce).unwrap();
    assert_eq!(
        sealed.ciphertext,
        s(&message["ciphertext"]),
        "{}: re-encryption differs",
        s(&case["name"])
    );
    assert_eq!(
        crypto::decrypt(s(&message["ciphertext"]), s(&message["nonce"]), &pd, &key).unwrap(),
        plaintext,
        "{}",
        s(&case["name"])
    );
}

fn check_verdict(file_name: &str, case: &Value, expected: &str, ours: Result<Vec<u8>, SyncError>) {
    let name = s(&case["name"]);
    if let Some(code) = deviation(file_name, name) {
        let ours = ours.expect_err(name);
        assert_eq!(error_name(&ours), code, "{name}: deviation");
        return;
    }
    match ours {
        Ok(bytes) => assert_eq!(
            expected,
            format!("ok:{}", b64::encode(&bytes)),
            "{name}: we accepted"
        ),
        Err(e) => assert!(
            same_verdict(expected, &e),
            "{name}: expected {expected}, we gave {e:?}"
        ),
    }
}

fn expected_of(result: &Value) -> String {
    if let Some(err) = result.get("error") {
        s(err).to_owned()
    } else {
        format!("ok:{}", s(&result["plaintext_base64"]))
    }
}

/// The chain snapshots of `snapshots.json` by id, with their frame text.
fn chain_snapshots(file: &Value) -> BTreeMap<String, (ProofEntry, String)> {
    let mut out = BTreeMap::new();
    for case in file["cases"].as_array().unwrap() {
        if !s(&case["name"]).starts_with("chain S") {
            continue;
        }
        let text = s(&case["message_json"]).to_owned();
        let v =
            frames::verify_snapshot(&text, &doc_id(file, case), ParseOptions::default()).unwrap();
        out.insert(v.snapshot_id().to_string(), (v.info(), text));
    }
    out
}

fn entry(v: &Value) -> ProofEntry {
    ProofEntry {
        snapshot_id: SnapshotId::parse(s(&v["snapshotId"])).unwrap(),
        parent_snapshot_proof: s(&v["parentSnapshotProof"]).to_owned(),
        snapshot_ciphertext_hash: s(&v["snapshotCiphertextHash"]).to_owned(),
    }
}

#[test]
fn snapshots() {
    const FILE: &str = "snapshots.json";
    let file = load(FILE);
    let chain = chain_snapshots(&file);
    let s1 = chain
        .values()
        .find(|(info, _)| info.snapshot_id.as_str() == "7x9-BnH0EJo_-UqyvGMjt5KWyD8lB7Wk")
        .map(|(info, _)| info.clone())
        .unwrap();
    let own = public_of(&file, "B");
    let (mut verdicts, mut reencrypted, mut rebuilt) = (0, 0, 0);
    for case in file["cases"].as_array().unwrap() {
        let name = s(&case["name"]);
        let text = s(&case["message_json"]);
        // The parent the generator gave the JS client (`parent` of the chain cases; S1 for the
        // wrong-proof case), so the direct-parent check runs as in `verifyAndDecryptSnapshot`.
        let parent = case
            .get("parent")
            .filter(|p| !s(&p["snapshot_id"]).is_empty())
            .map(|p| ProofEntry {
                snapshot_id: SnapshotId::parse(s(&p["snapshot_id"])).unwrap(),
                parent_snapshot_proof: s(&p["parent_snapshot_proof"]).to_owned(),
                snapshot_ciphertext_hash: s(&p["ciphertext_hash"]).to_owned(),
            })
            .or_else(|| {
                name.contains("wrong parentSnapshotProof")
                    .then(|| s1.clone())
            });
        let known = parent.clone().map(KnownSnapshot::new);
        let mut state = SyncState::new(
            doc_id(&file, case),
            own.clone(),
            parse_options(case),
            known.as_ref(),
            LoadMode::Delta,
        );
        let ours = state
            .apply_live_snapshot(text, &context_key(&file))
            .map(|event| match event {
                Some(Event::Snapshot { plaintext, .. }) => plaintext,
                other => panic!("{name}: {other:?}"),
            });
        let expected = expected_of(&case["expected"]["client"]);
        check_verdict(FILE, case, &expected, ours);
        verdicts += 1;

        let (Some(plain), Some(_)) = (plaintext(case), case.get("document_key")) else {
            continue;
        };
        if expected.starts_with("ok:") {
            assert_eq!(expected, format!("ok:{}", b64::encode(&plain)), "{name}");
        }
        check_reencryption(case, &plain);
        reencrypted += 1;

        // Frames the JS client produced unaltered: rebuild them byte for byte.
        if case.get("changed").is_none() && case["valid"] == true {
            let message: Value = serde_json::from_str(text).unwrap();
            let pd = &message["publicData"];
            let clocks: Clocks = pd["parentSnapshotUpdateClocks"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), Clock::new(v.as_u64().unwrap()).unwrap()))
                .collect();
            let built = frames::build_snapshot_with_nonce(
                &SnapshotSpec {
                    doc_id: &DocumentId::parse(s(&pd["docId"])).unwrap(),
                    snapshot_id: &SnapshotId::parse(s(&pd["snapshotId"])).unwrap(),
                    parent: parent.as_ref().filter(|_| !name.contains("wrong")),
                    parent_snapshot_update_clocks: &clocks,
                },
                &plain,
                &DocumentKey::from_b64(s(&case["document_key"])).unwrap(),
                &seed_of(&file, s(&case["signed_by"])),
                &b64::decode_array::<24>(s(&message["nonce"])).unwrap(),
            )
            .unwrap();
            if name.contains("wrong parentSnapshotProof") {
                continue;
            }
            assert_eq!(built.text, text, "{name}: rebuilt frame differs");
            rebuilt += 1;
        }
    }
    println!("snapshots: {verdicts} verdicts, {reencrypted} re-encrypted, {rebuilt} rebuilt");
    assert_eq!(verdicts, file["cases"].as_array().unwrap().len());
    assert_eq!(reencrypted, with_plaintext(&file));
    assert!(rebuilt >= 6, "{rebuilt}");
}

#[test]
fn updates() {
    const FILE: &str = "updates.json";
    let file = load(FILE);
    let own = public_of(&file, "B");
    let (mut verdicts, mut skipped, mut reencrypted, mut rebuilt) = (0, 0, 0, 0);
    for case in file["cases"].as_array().unwrap() {
        let name = s(&case["name"]);
        let text = s(&case["message_json"]);
        let message: Value = serde_json::from_str(text).unwrap();
        let author = message["publicData"]["pubKey"].as_str().unwrap_or("");
        for run in case["expected"]["client"].as_array().unwrap() {
            // The JS client's clock is -1 when the author has none; -2 is a state this client
            // cannot be in (its clocks are non-negative or absent).
            let Some(current) = run["current_clock"].as_i64() else {
                panic!("{name}: current_clock")
            };
            if current < -1 {
                skipped += 1;
                continue;
            }
            let mut known = KnownSnapshot::new(ProofEntry {
                snapshot_id: SnapshotId::parse(s(&run["active_snapshot_id"])).unwrap(),
                parent_snapshot_proof: String::new(),
                snapshot_ciphertext_hash: String::new(),
            });
            if current >= 0 {
                known
                    .update_clocks
                    .insert(author.to_owned(), Clock::new(current as u64).unwrap());
            }
            let mut state = SyncState::new(
                doc_id(&file, case),
                own.clone(),
                parse_options(case),
                Some(&known),
                LoadMode::Delta,
            );
            let key = run.get("document_key").map_or_else(
                || context_key(&file),
                |k| DocumentKey::from_b64(s(k)).unwrap(),
            );
            let ours = state.apply_update(text, &key).map(|event| match event {
                Event::Change {
                    plaintext, clock, ..
                } => {
                    assert_eq!(Some(clock.get()), run["result"]["clock"].as_u64(), "{name}");
                    // Applied: the author's clock on the active snapshot is now this one.
                    assert_eq!(
                        state.active().unwrap().update_clocks.get(author),
                        Some(&clock)
                    );
                    plaintext
                }
                other => panic!("{name}: {other:?}"),
            });
            check_verdict(FILE, case, &expected_of(&run["result"]), ours);
            verdicts += 1;
        }

        let (Some(plain), Some(_)) = (plaintext(case), case.get("document_key")) else {
            continue;
        };
        check_reencryption(case, &plain);
        reencrypted += 1;
        if case.get("changed").is_none() && case["valid"] == true {
            let pd = &message["publicData"];
            let Some(clock) = pd["clock"].as_u64().and_then(|c| Clock::new(c).ok()) else {
                continue;
            };
            let built = frames::build_update_with_nonce(
                &DocumentId::parse(s(&pd["docId"])).unwrap(),
                &SnapshotId::parse(s(&pd["refSnapshotId"])).unwrap(),
                clock,
                &plain,
                &DocumentKey::from_b64(s(&case["document_key"])).unwrap(),
                &seed_of(&file, s(&case["signed_by"])),
                &b64::decode_array::<24>(s(&message["nonce"])).unwrap(),
            )
            .unwrap();
            assert_eq!(built, text, "{name}: rebuilt frame differs");
            rebuilt += 1;
        }
    }
    println!(
        "updates: {verdicts} verdicts ({skipped} skipped: current clock -2), \
         {reencrypted} re-encrypted, {rebuilt} rebuilt"
    );
    let runs: usize = file["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["expected"]["client"].as_array().unwrap().len())
        .sum();
    assert_eq!(verdicts + skipped, runs);
    assert_eq!(reencrypted, with_plaintext(&file));
    assert!(rebuilt >= 6, "{rebuilt}");
}

#[test]
fn ephemeral() {
    const FILE: &str = "ephemeral.json";
    let file = load(FILE);
    let sessions = &file["context"]["sessions"];
    let session = |who: &str| {
        EphemeralSessions::with(
            SessionId::from_b64(s(&sessions[who]["id"])).unwrap(),
            sessions[who]["initial_counter"].as_u64().unwrap() as u32,
        )
    };
    let mut receivers: BTreeMap<&str, EphemeralSessions> =
        [("A", session("A")), ("B", session("B"))].into();
    let (mut verdicts, mut layouts, mut rebuilt) = (0, 0, 0);
    for case in file["cases"].as_array().unwrap() {
        let name = s(&case["name"]);
        let text = s(&case["message_json"]);
        let signer = case.get("signed_by").map_or("A", s);
        let receiver = case
            .get("received_by")
            .map_or(if signer == "B" { "A" } else { "B" }, s);
        let receiver_key = seed_of(&file, receiver);
        let key = case.get("document_key").map_or_else(
            || context_key(&file),
            |k| DocumentKey::from_b64(s(k)).unwrap(),
        );
        let expected = &case["expected"]["client"];
        let sessions = receivers.get_mut(receiver).unwrap();

        // What the client does with an `ephemeral-message` (client.rs `handle_ephemeral`).
        match frames::verify_ephemeral(text, &doc_id(&file, case), parse_options(case)) {
            Err(frames::OpenError::WrongDocument) => {
                // Ignored silently, as the JS client does (it returns the sessions unchanged).
                assert!(expected.get("error").is_none(), "{name}");
                assert!(expected.get("content_base64").is_none(), "{name}");
                assert!(expected.get("proof_base64").is_none(), "{name}");
            }
            Err(e) => {
                let ours = match e {
                    frames::OpenError::BadSignature => SyncError::EphemeralSignature,
                    _ => SyncError::EphemeralMalformed,
                };
                let exp = s(&expected["error"]);
                assert!(
                    same_verdict(exp, &ours),
                    "{name}: expected {exp}, we gave {e:?}"
                );
            }
            Ok(verified) => {
                let payload = verified.decrypt(&key).unwrap();
                if let Some(layout) = case.get("decrypted_plaintext") {
                    assert_eq!(
                        b64::encode(&payload),
                        s(&layout["plaintext_base64"]),
                        "{name}"
                    );
                    let parsed = EphemeralPayload::decode(&payload).unwrap();
                    assert_eq!(
                        u64::from(parsed.type_byte),
                        layout["type_byte"].as_u64().unwrap()
                    );
                    assert_eq!(
                        parsed.session_id.to_b64(),
                        s(&layout["session_id"]),
                        "{name}"
                    );
                    assert_eq!(
                        u64::from(parsed.counter),
                        layout["counter_le_u32"].as_u64().unwrap()
                    );
                    assert_eq!(b64::encode(&parsed.content), s(&layout["content_base64"]));
                    layouts += 1;

                    // Deterministic given the nonce: the whole frame comes out identical.
                    let message: Value = serde_json::from_str(text).unwrap();
                    let built = frames::build_ephemeral_with_nonce(
                        &doc_id(&file, case),
                        &payload,
                        &key,
                        &seed_of(&file, signer),
                        &b64::decode_array::<24>(s(&message["nonce"])).unwrap(),
                    )
                    .unwrap();
                    assert_eq!(built, text, "{name}: rebuilt frame differs");
                    rebuilt += 1;
                }
                let received = sessions.receive(verified.author(), &payload, &receiver_key);
                assert_eq!(
                    received.error.as_ref().and_then(SyncError::code),
                    expected.get("error").map(s),
                    "{name}"
                );
                assert_eq!(
                    received.content.as_deref().map(b64::encode),
                    expected.get("content_base64").map(|c| s(c).to_owned()),
                    "{name}"
                );
                assert_eq!(
                    received.reply.map(|(kind, proof)| (
                        b64::encode(proof),
                        kind == crypto::EphemeralKind::ProofAndRequestProof
                    )),
                    expected
                        .get("proof_base64")
                        .map(|p| (s(p).to_owned(), expected["requestProof"] == true)),
                    "{name}"
                );
                if let Some(valid) = expected.get("validSessions") {
                    let ours: BTreeMap<String, (String, u64)> = sessions
                        .peers()
                        .iter()
                        .map(|(k, p)| (k.clone(), (p.session_id.to_b64(), u64::from(p.counter))))
                        .collect();
                    let theirs: BTreeMap<String, (String, u64)> = valid
                        .as_object()
                        .unwrap()
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.clone(),
                                (
                                    s(&v["sessionId"]).to_owned(),
                                    v["sessionCounter"].as_u64().unwrap(),
                                ),
                            )
                        })
                        .collect();
                    assert_eq!(ours, theirs, "{name}: valid sessions");
                }
            }
        }
        verdicts += 1;
    }
    println!("ephemeral: {verdicts} verdicts, {layouts} layouts, {rebuilt} rebuilt");
    assert_eq!(verdicts, file["cases"].as_array().unwrap().len());
    assert_eq!(layouts, 6);
}

#[test]
fn proofs_through_the_client() {
    let snapshots = load("snapshots.json");
    let file = load("proofs.json");
    let chain = chain_snapshots(&snapshots);
    let doc = DocumentId::parse(s(&snapshots["context"]["document_id"])).unwrap();
    let key = context_key(&snapshots);
    let own = public_of(&snapshots, "B");
    let (mut parents, mut chains, mut skipped) = (0, 0, 0);
    for case in file["cases"].as_array().unwrap() {
        let name = s(&case["name"]);
        match s(&case["kind"]) {
            "isValidParentSnapshot" => {
                let (_, text) = &chain[s(&case["snapshot"]["snapshotId"])];
                let known = KnownSnapshot::new(entry(&case["parent_info"]));
                let mut state = SyncState::new(
                    doc.clone(),
                    own.clone(),
                    ParseOptions::default(),
                    Some(&known),
                    LoadMode::Delta,
                );
                let ours = state.apply_live_snapshot(text, &key);
                let expected = s(&case["expected"]["verifyAndDecryptSnapshot"]);
                match ours {
                    Ok(Some(_)) => assert_eq!(expected, "ok", "{name}"),
                    Ok(None) => panic!("{name}: treated as already known"),
                    Err(e) => assert_eq!(e.code(), Some(expected), "{name}"),
                }
                parents += 1;
            }
            "snapshotProofChain" => {
                let active = entry(&case["active_snapshot"]);
                // Only chains ending in a snapshot whose frame the vectors hold.
                let Some((info, text)) = chain.get(active.snapshot_id.as_str()) else {
                    skipped += 1;
                    continue;
                };
                if *info != active {
                    skipped += 1;
                    continue;
                }
                let known = KnownSnapshot::new(entry(&case["known_snapshot"]));
                let proof_chain: Vec<ProofEntry> = case["snapshot_proof_chain"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(entry)
                    .collect();
                let mut state = SyncState::new(
                    doc.clone(),
                    own.clone(),
                    ParseOptions::default(),
                    Some(&known),
                    LoadMode::Delta,
                );
                let ours = state.apply_document(
                    Some(text),
                    &[],
                    Some(&proof_chain),
                    LoadMode::Delta,
                    Some(&known),
                    &key,
                );
                assert_eq!(
                    ours.is_ok(),
                    case["expected"]["valid"] == true,
                    "{name}: {ours:?}"
                );
                if ours.is_ok() {
                    assert_eq!(state.active().unwrap().info, active, "{name}");
                }
                chains += 1;
            }
            _ => {}
        }
    }
    println!("proofs: {parents} parent checks, {chains} chains ({skipped} skipped: no frame)");
    assert_eq!(parents, 6);
    assert!(chains >= 15, "{chains}");
}
