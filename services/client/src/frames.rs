//! Signed client frames: building them from plaintext, and verifying and decrypting received ones.
//!
//! Building mirrors the JS client's `createSnapshot` / `createUpdate` / `createEphemeralMessage`:
//! the `publicData` JSON is written in the same key order, encrypted with `pdB64` as additional
//! data, and signed through the protocol crate's [`build_frame`], so the frame text has the same
//! shape (`{"nonce","ciphertext","publicData","signature"}`) as what the JS client sends.
//!
//! Receiving is split in two steps because the JS client checks in this order: signature and
//! document first ([`verify_snapshot`], [`verify_update`], [`verify_ephemeral`]), then the
//! state-dependent checks (parent proof, clocks; see [`crate::sync`]), and decryption last
//! (`decrypt` on the verified value). Parsing uses the protocol crate's strict parser, so the
//! client verifies the exact bytes the server relayed.

use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;
use secsync_protocol::canonical::{to_canonical, write_str};
use secsync_protocol::crypto::{self as proto_crypto, Domain, ProofEntry};
use secsync_protocol::message::build_frame;
use secsync_protocol::{
    b64, json, parse_client_frame, ClientFrame, Clock, DocumentId, EphemeralMessage, ParseOptions,
    PublicKey, Reason, SnapshotId, SnapshotMessage, UpdateMessage,
};

use crate::crypto::{self, random_bytes, CryptoError, DocumentKey, NONCE_LEN};

/// Why a frame could not be built (only on impossible inputs; kept as an error, not a panic).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("publicData is not valid JSON")]
    PublicData,
    #[error("generated id is not a valid snapshot id")]
    Id,
}

/// Why a received frame was refused. Each maps to one of the JS client's error codes through
/// [`crate::sync::SyncError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// The strict parser refused it (the JS client's zod schema; ours is stricter, e.g. on
    /// duplicate keys, bad base64, extra `publicData` fields unless allowed).
    #[error("malformed frame: {0}")]
    Malformed(Reason),
    /// Parsed, but as another kind of message (a snapshot where an update was expected, …).
    #[error("frame is not a {0}")]
    WrongKind(&'static str),
    #[error("signature does not verify")]
    BadSignature,
    #[error("frame names another document")]
    WrongDocument,
    #[error("decryption failed: {0}")]
    Decrypt(#[from] CryptoError),
}

/// The author's public key as it goes into `publicData.pubKey`.
pub fn public_key_of(author: &SigningKey) -> PublicKey {
    PublicKey::from_bytes(author.verifying_key().to_bytes())
}

/// A fresh snapshot id (`generateId`: 24 random bytes, 32 characters).
pub fn generate_snapshot_id() -> Result<SnapshotId, BuildError> {
    // 32 characters always make a valid id; the error path exists only to avoid a panic.
    SnapshotId::parse(&b64::encode(random_bytes::<24>())).map_err(|_| BuildError::Id)
}

/// What a new snapshot says about itself and its parent.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotSpec<'a> {
    pub doc_id: &'a DocumentId,
    pub snapshot_id: &'a SnapshotId,
    /// The active snapshot the author builds on; `None` for a document's first snapshot.
    pub parent: Option<&'a ProofEntry>,
    /// Per author the last clock of the parent included (`{}` for a first snapshot).
    pub parent_snapshot_update_clocks: &'a BTreeMap<String, Clock>,
}

/// A built snapshot frame and what the client remembers about it while it is in flight.
#[derive(Debug, Clone)]
pub struct BuiltSnapshot {
    pub text: String,
    /// Id, own `parentSnapshotProof` and ciphertext hash: the entry a child must prove.
    pub info: ProofEntry,
    pub parent_snapshot_id: Option<SnapshotId>,
}

/// Builds a snapshot with a random nonce; its `parentSnapshotProof` is computed from the parent
/// (the constant initial proof when there is none).
pub fn build_snapshot(
    spec: &SnapshotSpec<'_>,
    plaintext: &[u8],
    key: &DocumentKey,
    author: &SigningKey,
) -> Result<BuiltSnapshot, BuildError> {
    build_snapshot_with_nonce(spec, plaintext, key, author, &random_bytes())
}

/// [`build_snapshot`] with a given nonce (deterministic, for tests).
pub fn build_snapshot_with_nonce(
    spec: &SnapshotSpec<'_>,
    plaintext: &[u8],
    key: &DocumentKey,
    author: &SigningKey,
    nonce: &[u8; NONCE_LEN],
) -> Result<BuiltSnapshot, BuildError> {
    let proof = spec.parent.map_or_else(
        || proto_crypto::INITIAL_PARENT_SNAPSHOT_PROOF.to_owned(),
        ProofEntry::child_proof,
    );
    // Key order of the JS client: {...publicData, snapshotId, docId, pubKey, parentSnapshotId,
    // parentSnapshotUpdateClocks, parentSnapshotProof}. Only the canonical form is signed, but
    // the same order keeps our frames textually alike.
    let mut pd = String::from("{\"snapshotId\":");
    write_str(spec.snapshot_id.as_str(), &mut pd);
    pd.push_str(",\"docId\":");
    write_str(spec.doc_id.as_str(), &mut pd);
    pd.push_str(",\"pubKey\":");
    write_str(public_key_of(author).as_str(), &mut pd);
    pd.push_str(",\"parentSnapshotId\":");
    write_str(spec.parent.map_or("", |p| p.snapshot_id.as_str()), &mut pd);
    pd.push_str(",\"parentSnapshotUpdateClocks\":{");
    for (i, (author_key, clock)) in spec.parent_snapshot_update_clocks.iter().enumerate() {
        if i > 0 {
            pd.push(',');
        }
        write_str(author_key, &mut pd);
        pd.push(':');
        pd.push_str(&clock.to_string());
    }
    pd.push_str("},\"parentSnapshotProof\":");
    write_str(&proof, &mut pd);
    pd.push('}');

    let (text, ciphertext) = seal_and_sign(Domain::Snapshot, &pd, plaintext, key, author, nonce)?;
    Ok(BuiltSnapshot {
        text,
        info: ProofEntry {
            snapshot_id: spec.snapshot_id.clone(),
            parent_snapshot_proof: proof,
            snapshot_ciphertext_hash: proto_crypto::ciphertext_hash(&ciphertext),
        },
        parent_snapshot_id: spec.parent.map(|p| p.snapshot_id.clone()),
    })
}

/// Builds an update of `ref_snapshot_id` with `clock`, random nonce.
pub fn build_update(
    doc_id: &DocumentId,
    ref_snapshot_id: &SnapshotId,
    clock: Clock,
    plaintext: &[u8],
    key: &DocumentKey,
    author: &SigningKey,
) -> Result<String, BuildError> {
    build_update_with_nonce(
        doc_id,
        ref_snapshot_id,
        clock,
        plaintext,
        key,
        author,
        &random_bytes(),
    )
}

/// [`build_update`] with a given nonce (deterministic, for tests).
pub fn build_update_with_nonce(
    doc_id: &DocumentId,
    ref_snapshot_id: &SnapshotId,
    clock: Clock,
    plaintext: &[u8],
    key: &DocumentKey,
    author: &SigningKey,
    nonce: &[u8; NONCE_LEN],
) -> Result<String, BuildError> {
    // JS order: {refSnapshotId, docId, pubKey, clock}.
    let mut pd = String::from("{\"refSnapshotId\":");
    write_str(ref_snapshot_id.as_str(), &mut pd);
    pd.push_str(",\"docId\":");
    write_str(doc_id.as_str(), &mut pd);
    pd.push_str(",\"pubKey\":");
    write_str(public_key_of(author).as_str(), &mut pd);
    pd.push_str(",\"clock\":");
    pd.push_str(&clock.to_string());
    pd.push('}');
    seal_and_sign(Domain::Update, &pd, plaintext, key, author, nonce).map(|(text, _)| text)
}

/// Builds an ephemeral message around an already laid out payload
/// ([`crate::crypto::encode_ephemeral_payload`]), random nonce.
pub fn build_ephemeral(
    doc_id: &DocumentId,
    payload: &[u8],
    key: &DocumentKey,
    author: &SigningKey,
) -> Result<String, BuildError> {
    build_ephemeral_with_nonce(doc_id, payload, key, author, &random_bytes())
}

/// [`build_ephemeral`] with a given nonce (deterministic, for tests).
pub fn build_ephemeral_with_nonce(
    doc_id: &DocumentId,
    payload: &[u8],
    key: &DocumentKey,
    author: &SigningKey,
    nonce: &[u8; NONCE_LEN],
) -> Result<String, BuildError> {
    let mut pd = String::from("{\"docId\":");
    write_str(doc_id.as_str(), &mut pd);
    pd.push_str(",\"pubKey\":");
    write_str(public_key_of(author).as_str(), &mut pd);
    pd.push('}');
    seal_and_sign(Domain::EphemeralMessage, &pd, payload, key, author, nonce).map(|(text, _)| text)
}

/// Encrypts under `pdB64` of `public_data` and signs; returns the frame and the ciphertext.
fn seal_and_sign(
    domain: Domain,
    public_data: &str,
    plaintext: &[u8],
    key: &DocumentKey,
    author: &SigningKey,
    nonce: &[u8; NONCE_LEN],
) -> Result<(String, String), BuildError> {
    let parsed = json::parse(public_data).map_err(|_| BuildError::PublicData)?;
    let pd_b64 = b64::encode(to_canonical(&parsed));
    let sealed = crypto::encrypt_with_nonce(plaintext, &pd_b64, key, nonce)?;
    let text = build_frame(
        domain,
        &sealed.ciphertext,
        &sealed.nonce,
        public_data,
        author,
    )
    .map_err(|_| BuildError::PublicData)?;
    Ok((text, sealed.ciphertext))
}

/// A snapshot whose signature and document were checked; not yet decrypted.
#[derive(Debug, Clone)]
pub struct VerifiedSnapshot(pub SnapshotMessage);

impl VerifiedSnapshot {
    pub fn snapshot_id(&self) -> &SnapshotId {
        &self.0.snapshot_id
    }

    pub fn author(&self) -> &PublicKey {
        self.0.signed.pub_key()
    }

    /// `{snapshotId, parentSnapshotProof, snapshotCiphertextHash}` of this snapshot.
    pub fn info(&self) -> ProofEntry {
        ProofEntry {
            snapshot_id: self.0.snapshot_id.clone(),
            parent_snapshot_proof: self.0.parent_snapshot_proof.clone(),
            snapshot_ciphertext_hash: self.0.ciphertext_hash(),
        }
    }

    pub fn decrypt(&self, key: &DocumentKey) -> Result<Vec<u8>, OpenError> {
        decrypt_signed(&self.0.signed, key)
    }
}

/// An update whose signature and document were checked; not yet decrypted.
#[derive(Debug, Clone)]
pub struct VerifiedUpdate(pub UpdateMessage);

impl VerifiedUpdate {
    pub fn author(&self) -> &PublicKey {
        self.0.signed.pub_key()
    }

    pub fn ref_snapshot_id(&self) -> &SnapshotId {
        &self.0.ref_snapshot_id
    }

    pub fn clock(&self) -> Clock {
        self.0.clock
    }

    pub fn decrypt(&self, key: &DocumentKey) -> Result<Vec<u8>, OpenError> {
        decrypt_signed(&self.0.signed, key)
    }
}

/// An ephemeral message whose signature and document were checked; not yet decrypted.
#[derive(Debug, Clone)]
pub struct VerifiedEphemeral(pub EphemeralMessage);

impl VerifiedEphemeral {
    pub fn author(&self) -> &PublicKey {
        self.0.signed.pub_key()
    }

    /// The decrypted payload (`type ‖ session id ‖ counter ‖ content`).
    pub fn decrypt(&self, key: &DocumentKey) -> Result<Vec<u8>, OpenError> {
        decrypt_signed(&self.0.signed, key)
    }
}

fn decrypt_signed(
    signed: &secsync_protocol::Signed,
    key: &DocumentKey,
) -> Result<Vec<u8>, OpenError> {
    Ok(crypto::decrypt(
        &signed.ciphertext(),
        &signed.nonce(),
        signed.public_data_b64(),
        key,
    )?)
}

/// Parses and checks the signature and document of a received frame (in the JS client's order:
/// signature first, then `docId`).
fn verify(
    text: &str,
    doc_id: &DocumentId,
    options: ParseOptions,
) -> Result<ClientFrame, OpenError> {
    let frame = parse_client_frame(text, options).map_err(|e| OpenError::Malformed(e.reason))?;
    frame.verify().map_err(|_| OpenError::BadSignature)?;
    frame
        .check_document(doc_id)
        .map_err(|_| OpenError::WrongDocument)?;
    Ok(frame)
}

/// Verifies a snapshot (the object embedded in `document` / `snapshot` / recovery frames).
pub fn verify_snapshot(
    text: &str,
    doc_id: &DocumentId,
    options: ParseOptions,
) -> Result<VerifiedSnapshot, OpenError> {
    match verify(text, doc_id, options)? {
        ClientFrame::Snapshot(m) => Ok(VerifiedSnapshot(m)),
        _ => Err(OpenError::WrongKind("snapshot")),
    }
}

/// Verifies an update (an `update` broadcast, or an entry of `updates`). The JS client does not
/// compare an update's `docId` with its document; we do (PROTOCOL.md 7.1 binds every message).
pub fn verify_update(
    text: &str,
    doc_id: &DocumentId,
    options: ParseOptions,
) -> Result<VerifiedUpdate, OpenError> {
    match verify(text, doc_id, options)? {
        ClientFrame::Update(m) => Ok(VerifiedUpdate(m)),
        _ => Err(OpenError::WrongKind("update")),
    }
}

/// Verifies an ephemeral message (an `ephemeral-message` broadcast). A message naming another
/// document yields [`OpenError::WrongDocument`], which receivers ignore silently as the JS
/// client does.
pub fn verify_ephemeral(
    text: &str,
    doc_id: &DocumentId,
    options: ParseOptions,
) -> Result<VerifiedEphemeral, OpenError> {
    match verify(text, doc_id, options)? {
        ClientFrame::Ephemeral(m) => Ok(VerifiedEphemeral(m)),
        _ => Err(OpenError::WrongKind("ephemeral message")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (DocumentId, DocumentKey, SigningKey) {
        (
            DocumentId::parse("doc").unwrap(),
            DocumentKey::from_bytes([3; 32]),
            SigningKey::from_bytes(&[5; 32]),
        )
    }

    #[test]
    fn snapshot_chain_round_trip() {
        let (doc, key, author) = setup();
        let s0 = generate_snapshot_id().unwrap();
        let none = BTreeMap::new();
        let first = build_snapshot(
            &SnapshotSpec {
                doc_id: &doc,
                snapshot_id: &s0,
                parent: None,
                parent_snapshot_update_clocks: &none,
            },
            b"state 0",
            &key,
            &author,
        )
        .unwrap();
        assert_eq!(
            first.info.parent_snapshot_proof,
            proto_crypto::INITIAL_PARENT_SNAPSHOT_PROOF
        );
        let verified = verify_snapshot(&first.text, &doc, ParseOptions::default()).unwrap();
        assert_eq!(verified.info(), first.info);
        assert_eq!(verified.decrypt(&key).unwrap(), b"state 0");

        let s1 = generate_snapshot_id().unwrap();
        let clocks = BTreeMap::from([(public_key_of(&author).to_string(), Clock::new(2).unwrap())]);
        let child = build_snapshot(
            &SnapshotSpec {
                doc_id: &doc,
                snapshot_id: &s1,
                parent: Some(&first.info),
                parent_snapshot_update_clocks: &clocks,
            },
            b"state 1",
            &key,
            &author,
        )
        .unwrap();
        let verified = verify_snapshot(&child.text, &doc, ParseOptions::default()).unwrap();
        assert_eq!(verified.0.parent_snapshot_id.as_ref(), Some(&s0));
        assert_eq!(verified.0.parent_snapshot_proof, first.info.child_proof());
        assert_eq!(verified.0.parent_snapshot_update_clocks, clocks);
        let other = DocumentId::parse("other").unwrap();
        assert_eq!(
            verify_snapshot(&child.text, &other, ParseOptions::default()).unwrap_err(),
            OpenError::WrongDocument
        );
    }

    #[test]
    fn update_and_ephemeral_round_trip() {
        let (doc, key, author) = setup();
        let s = SnapshotId::parse("S1").unwrap();
        let text = build_update(&doc, &s, Clock::new(7).unwrap(), b"u", &key, &author).unwrap();
        let verified = verify_update(&text, &doc, ParseOptions::default()).unwrap();
        assert_eq!(verified.clock().get(), 7);
        assert_eq!(verified.decrypt(&key).unwrap(), b"u");
        assert_eq!(
            verified.decrypt(&DocumentKey::from_bytes([4; 32])),
            Err(OpenError::Decrypt(CryptoError::Commitment))
        );
        assert_eq!(
            verify_snapshot(&text, &doc, ParseOptions::default()).unwrap_err(),
            OpenError::WrongKind("snapshot")
        );

        let eph = build_ephemeral(&doc, b"payload", &key, &author).unwrap();
        let verified = verify_ephemeral(&eph, &doc, ParseOptions::default()).unwrap();
        assert_eq!(verified.decrypt(&key).unwrap(), b"payload");
        let tampered = eph.replace("\"docId\":\"doc\"", "\"docId\":\"dod\"");
        assert_eq!(
            verify_ephemeral(&tampered, &doc, ParseOptions::default()).unwrap_err(),
            OpenError::BadSignature
        );
    }
}
