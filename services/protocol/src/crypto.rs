//! Signatures, hashes and snapshot proofs (PROTOCOL.md 2.5–2.7).
//!
//! Verification is as strict as libsodium's `crypto_sign_verify_detached`: non-canonical `S`,
//! small-order or non-canonical public keys and small-order `R` are refused. Hashes are unkeyed
//! BLAKE2b with a 32-byte output (`crypto_generichash(32, …)`).

use blake2::digest::consts::U32;
use blake2::{Blake2b, Digest};
use curve25519_dalek::edwards::CompressedEdwardsY;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

use crate::b64;
use crate::canonical::write_str;
use crate::ids::{PublicKey, SignatureBytes, SnapshotId};

/// The prefix that binds a signature to one kind of object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    Snapshot,
    Update,
    EphemeralMessage,
    EphemeralSessionProof,
}

impl Domain {
    pub fn prefix(self) -> &'static str {
        match self {
            Domain::Snapshot => "secsync_snapshot",
            Domain::Update => "secsync_update",
            Domain::EphemeralMessage => "secsync_ephemeral_message",
            Domain::EphemeralSessionProof => "secsync_ephemeral_session_proof",
        }
    }
}

/// The exact text a message signature covers:
/// `DOMAIN{"ciphertext":…,"nonce":…,"publicData":"<pdB64>"}`.
pub fn signature_input(domain: Domain, ciphertext: &str, nonce: &str, pd_b64: &str) -> String {
    let mut out = String::with_capacity(
        domain.prefix().len() + ciphertext.len() + nonce.len() + pd_b64.len() + 48,
    );
    out.push_str(domain.prefix());
    out.push_str("{\"ciphertext\":");
    write_str(ciphertext, &mut out);
    out.push_str(",\"nonce\":");
    write_str(nonce, &mut out);
    out.push_str(",\"publicData\":");
    write_str(pd_b64, &mut out);
    out.push('}');
    out
}

/// Verifies a detached Ed25519 signature with libsodium's strictness.
pub fn verify(public_key: &PublicKey, signature: &SignatureBytes, message: &[u8]) -> bool {
    checked_key(public_key.as_bytes()).is_some_and(|key| verify_strict(&key, signature, message))
}

/// The last public key that passed the key checks, kept decoded for the next signature it
/// makes: a connection signs everything with one key, and decoding and checking a key costs
/// about a fifth of a verification. Empty, it is one pointer.
#[derive(Debug, Default)]
pub struct KeyCache(Option<Box<([u8; 32], VerifyingKey)>>);

impl KeyCache {
    /// [`verify`], decoding `public_key` only when it is not the one kept.
    pub fn verify(
        &mut self,
        public_key: &PublicKey,
        signature: &SignatureBytes,
        message: &[u8],
    ) -> bool {
        let key_bytes = public_key.as_bytes();
        let key = match &self.0 {
            Some(kept) if kept.0 == *key_bytes => &kept.1,
            _ => match checked_key(key_bytes) {
                Some(key) => &self.0.insert(Box::new((*key_bytes, key))).1,
                None => return false,
            },
        };
        verify_strict(key, signature, message)
    }
}

/// Refuses small-order A and R and non-canonical S, as libsodium does.
fn verify_strict(key: &VerifyingKey, signature: &SignatureBytes, message: &[u8]) -> bool {
    key.verify_strict(message, &Signature::from_bytes(signature.as_bytes()))
        .is_ok()
}

/// The key, if its encoding is canonical and decodes to a point.
fn checked_key(key_bytes: &[u8; 32]) -> Option<VerifyingKey> {
    // libsodium refuses non-canonical encodings of the key; dalek would reduce them silently.
    let canonical = CompressedEdwardsY(*key_bytes)
        .decompress()
        .is_some_and(|point| point.compress().as_bytes() == key_bytes);
    if !canonical {
        return None;
    }
    VerifyingKey::from_bytes(key_bytes).ok()
}

/// Signs `message` (clients and tests; the server never signs).
pub fn sign(key: &SigningKey, message: &[u8]) -> SignatureBytes {
    SignatureBytes::from_bytes(key.sign(message).to_bytes())
}

/// `b64u(BLAKE2b-256(bytes))`.
pub fn hash(bytes: &[u8]) -> String {
    b64::encode(Blake2b::<U32>::digest(bytes))
}

/// The hash of a snapshot's ciphertext *text* as sent (not of the decoded bytes).
pub fn ciphertext_hash(ciphertext: &str) -> String {
    hash(ciphertext.as_bytes())
}

/// What a child snapshot must carry as `parentSnapshotProof` for a parent with these values.
pub fn parent_snapshot_proof(
    grand_parent_snapshot_proof: &str,
    parent_snapshot_id: &str,
    parent_snapshot_ciphertext_hash: &str,
) -> String {
    // Keys already in canonical (sorted) order.
    let mut text = String::from("{\"grandParentSnapshotProof\":");
    write_str(grand_parent_snapshot_proof, &mut text);
    text.push_str(",\"parentSnapshotCiphertextHash\":");
    write_str(parent_snapshot_ciphertext_hash, &mut text);
    text.push_str(",\"parentSnapshotId\":");
    write_str(parent_snapshot_id, &mut text);
    text.push('}');
    hash(text.as_bytes())
}

/// The `parentSnapshotProof` of every document's first snapshot (three empty inputs).
pub const INITIAL_PARENT_SNAPSHOT_PROOF: &str = "k_CZR7BveaeM7FOc0TYtEtTtTi0ElwG9XrDVLxb9tR0";

/// One entry of a `snapshotProofChain`: what a client needs to check a snapshot's ancestry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProofEntry {
    pub snapshot_id: SnapshotId,
    pub parent_snapshot_proof: String,
    pub snapshot_ciphertext_hash: String,
}

impl ProofEntry {
    /// The proof a child of this snapshot must carry.
    pub fn child_proof(&self) -> String {
        parent_snapshot_proof(
            &self.parent_snapshot_proof,
            self.snapshot_id.as_str(),
            &self.snapshot_ciphertext_hash,
        )
    }
}

/// Checks a chain as the client does (PROTOCOL.md 2.7): every snapshot after `known`, oldest
/// first, ending with `active`.
pub fn verify_proof_chain(known: &ProofEntry, active: &ProofEntry, chain: &[ProofEntry]) -> bool {
    if known == active {
        return true;
    }
    let (Some(first), Some(last)) = (chain.first(), chain.last()) else {
        return false;
    };
    first.parent_snapshot_proof == known.child_proof()
        && last == active
        && chain
            .windows(2)
            .all(|pair| pair[0].child_proof() == pair[1].parent_snapshot_proof)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initial_proof_is_the_hash_of_three_empty_strings() {
        assert_eq!(
            parent_snapshot_proof("", "", ""),
            INITIAL_PARENT_SNAPSHOT_PROOF
        );
    }

    #[test]
    fn worked_example_of_the_protocol() {
        let hash =
            ciphertext_hash("7_LIx6K7buhz7A_AOzHZ4lYqyBbk2DvoLoX8oxVexkHM4LEHwFyvK5H7ZKADBvJ0BA");
        assert_eq!(hash, "cre_M9eVsDK9sgRZo5KJGgweBb9Ip0XBB9njnQ6BkCo");
        assert_eq!(
            parent_snapshot_proof(INITIAL_PARENT_SNAPSHOT_PROOF, "S1", &hash),
            "kJNcGuN4ZB0L94Vdcfh3Lbda558oKmpce6liFOcv274"
        );
    }

    #[test]
    fn sign_and_verify_round_trip() {
        let key = SigningKey::from_bytes(&[42; 32]);
        let public = PublicKey::from_bytes(key.verifying_key().to_bytes());
        let msg = signature_input(Domain::Update, "Y2lwaGVy", "bm9uY2U", "cGQ");
        let sig = sign(&key, msg.as_bytes());
        assert!(verify(&public, &sig, msg.as_bytes()));
        assert!(!verify(&public, &sig, b"other"));
    }

    #[test]
    fn a_kept_key_verifies_only_its_own_signatures() {
        let alice = SigningKey::from_bytes(&[1; 32]);
        let bob = SigningKey::from_bytes(&[2; 32]);
        let alice_public = PublicKey::from_bytes(alice.verifying_key().to_bytes());
        let bob_public = PublicKey::from_bytes(bob.verifying_key().to_bytes());
        let msg = b"secsync_update{}";
        let by_alice = sign(&alice, msg);
        let by_bob = sign(&bob, msg);
        let mut keys = KeyCache::default();
        assert!(keys.verify(&alice_public, &by_alice, msg));
        // Alice's key is kept now: Bob's signature under her key, hers under his, both fail.
        assert!(!keys.verify(&alice_public, &by_bob, msg));
        assert!(!keys.verify(&bob_public, &by_alice, msg));
        assert!(keys.verify(&bob_public, &by_bob, msg));
        assert!(keys.verify(&alice_public, &by_alice, msg));
        assert!(!keys.verify(&alice_public, &by_alice, b"other"));
    }
}
