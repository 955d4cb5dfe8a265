//! The client-side cryptography of secsync 0.5, byte for byte as the JavaScript client does it.
//!
//! * Document encryption (PROTOCOL.md 2.4): `nonce = b64u(24 random bytes)`,
//!   `ciphertext = b64u(T ‖ C)` with `C = XChaCha20-Poly1305-IETF(plaintext, AD = ASCII(pdB64))`
//!   (tag included) and the key-commitment tag
//!   `T = crypto_auth(key, ASCII(nonce ‖ b64u(C) ‖ pdB64))`. libsodium's `crypto_auth` is
//!   `crypto_auth_hmacsha512256`: HMAC-SHA-512 keyed with the 32-byte key, truncated to its first
//!   32 bytes (not the SHA-512/256 hash function). Given the nonce the scheme is deterministic,
//!   which is what lets the tests reproduce the vectors' ciphertexts exactly.
//! * The ephemeral payload layout (PROTOCOL.md 2.8):
//!   `type ‖ session id (24 bytes) ‖ counter (u32 LE) ‖ content`.
//! * The ephemeral session proof: an Ed25519 signature with the domain
//!   `secsync_ephemeral_session_proof` over
//!   `canon({"currentClientSessionId","remoteClientSessionId"})`.
//!
//! Only clients hold the document key; the server never calls any of this.

use std::fmt;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use ed25519_dalek::SigningKey;
use hmac::{Hmac, Mac};
use rand::RngCore as _;
use secsync_protocol::canonical::write_str;
use secsync_protocol::crypto::{self as proto_crypto, Domain};
use secsync_protocol::{b64, PublicKey, SignatureBytes};
use sha2::Sha512;

/// A document key is 32 bytes (XChaCha20-Poly1305 and `crypto_auth` share it).
pub const KEY_LEN: usize = 32;
/// The XChaCha20 nonce is 24 bytes.
pub const NONCE_LEN: usize = 24;
/// The key-commitment tag `T` is HMAC-SHA-512 truncated to 32 bytes.
pub const COMMITMENT_LEN: usize = 32;
/// Poly1305 tag at the end of `C`.
pub const AEAD_TAG_LEN: usize = 16;
/// An ephemeral session id is 24 random bytes (`generateId`).
pub const SESSION_ID_LEN: usize = 24;
/// `type (1) ‖ session id (24) ‖ counter (4)` precede an ephemeral message's content.
pub const EPHEMERAL_HEADER_LEN: usize = 1 + SESSION_ID_LEN + 4;

/// Why encryption, decryption or a payload failed. Deliberately coarse: which check failed is
/// all a caller can act on, and finer detail would only help an attacker probing keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("ciphertext or nonce is not libsodium base64 of the right length")]
    Encoding,
    #[error("key-commitment tag does not match")]
    Commitment,
    #[error("AEAD authentication failed")]
    Aead,
    #[error("plaintext too large to encrypt")]
    TooLarge,
    #[error("ephemeral payload shorter than its 29-byte header")]
    ShortPayload,
    #[error("key is not 32 bytes of libsodium base64")]
    BadKey,
}

/// The symmetric document key. Its `Debug` output never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct DocumentKey([u8; KEY_LEN]);

impl DocumentKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self(bytes)
    }

    /// Reads a key written as libsodium base64 (how the vectors and the JS tests carry keys).
    pub fn from_b64(text: &str) -> Result<Self, CryptoError> {
        b64::decode_array::<KEY_LEN>(text)
            .map(Self)
            .map_err(|_| CryptoError::BadKey)
    }

    /// A fresh random key (the JS client's `sodium.crypto_aead_xchacha20poly1305_ietf_keygen`).
    pub fn generate() -> Self {
        Self(random_bytes())
    }

    pub fn to_b64(&self) -> String {
        b64::encode(self.0)
    }

    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for DocumentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DocumentKey(<redacted>)")
    }
}

/// The two strings an encryption produces, as they go into a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encrypted {
    /// `b64u(nonce)`.
    pub nonce: String,
    /// `b64u(T ‖ C)`.
    pub ciphertext: String,
}

/// `N` bytes from the operating system's CSPRNG (nonces, ids, keys).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut out);
    out
}

/// Encrypts with a fresh random nonce, as `encryptAead` does.
pub fn encrypt(
    plaintext: &[u8],
    pd_b64: &str,
    key: &DocumentKey,
) -> Result<Encrypted, CryptoError> {
    encrypt_with_nonce(plaintext, pd_b64, key, &random_bytes())
}

/// Encrypts with the given nonce. Deterministic; tests use it to reproduce the vectors. Never
/// reuse a nonce with one key in real traffic.
pub fn encrypt_with_nonce(
    plaintext: &[u8],
    pd_b64: &str,
    key: &DocumentKey,
    nonce: &[u8; NONCE_LEN],
) -> Result<Encrypted, CryptoError> {
    let cipher = XChaCha20Poly1305::new(key.0.as_ref().into());
    let sealed = cipher
        .encrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: plaintext,
                aad: pd_b64.as_bytes(),
            },
        )
        .map_err(|_| CryptoError::TooLarge)?;
    let nonce_b64 = b64::encode(nonce);
    let sealed_b64 = b64::encode(&sealed);
    let tag = commitment_mac(key, &nonce_b64, &sealed_b64, pd_b64)?.finalize();
    let mut combined = Vec::with_capacity(COMMITMENT_LEN + sealed.len());
    combined.extend_from_slice(&tag.into_bytes()[..COMMITMENT_LEN]);
    combined.extend_from_slice(&sealed);
    Ok(Encrypted {
        nonce: nonce_b64,
        ciphertext: b64::encode(&combined),
    })
}

/// Checks the commitment tag (in constant time), then opens the AEAD, as `decryptAead` does.
/// `ciphertext` and `nonce` are the strings exactly as received; `pd_b64` is
/// `b64u(canon(publicData))` of the received `publicData`.
pub fn decrypt(
    ciphertext: &str,
    nonce: &str,
    pd_b64: &str,
    key: &DocumentKey,
) -> Result<Vec<u8>, CryptoError> {
    let combined = b64::decode(ciphertext).map_err(|_| CryptoError::Encoding)?;
    let nonce_bytes = b64::decode_array::<NONCE_LEN>(nonce).map_err(|_| CryptoError::Encoding)?;
    if combined.len() < COMMITMENT_LEN + AEAD_TAG_LEN {
        return Err(CryptoError::Encoding);
    }
    let (tag, sealed) = combined.split_at(COMMITMENT_LEN);
    // The tag covers the nonce *text* as received and the re-encoded `C`, exactly as the JS
    // client computes it (`publicNonce + to_base64(c) + additionalData`).
    commitment_mac(key, nonce, &b64::encode(sealed), pd_b64)?
        .verify_truncated_left(tag)
        .map_err(|_| CryptoError::Commitment)?;
    let cipher = XChaCha20Poly1305::new(key.0.as_ref().into());
    cipher
        .decrypt(
            XNonce::from_slice(&nonce_bytes),
            Payload {
                msg: sealed,
                aad: pd_b64.as_bytes(),
            },
        )
        .map_err(|_| CryptoError::Aead)
}

/// HMAC-SHA-512 under the document key over `nonce ‖ b64u(C) ‖ pdB64`, not yet finalised.
fn commitment_mac(
    key: &DocumentKey,
    nonce_b64: &str,
    sealed_b64: &str,
    pd_b64: &str,
) -> Result<Hmac<Sha512>, CryptoError> {
    // HMAC takes keys of any length, so this cannot fail; mapped rather than unwrapped.
    let mut mac = <Hmac<Sha512> as Mac>::new_from_slice(&key.0).map_err(|_| CryptoError::BadKey)?;
    mac.update(nonce_b64.as_bytes());
    mac.update(sealed_b64.as_bytes());
    mac.update(pd_b64.as_bytes());
    Ok(mac)
}

/// The four ephemeral message kinds (PROTOCOL.md 2.8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EphemeralKind {
    Initialize = 1,
    ProofAndRequestProof = 2,
    Proof = 3,
    Message = 4,
}

impl EphemeralKind {
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            1 => Some(Self::Initialize),
            2 => Some(Self::ProofAndRequestProof),
            3 => Some(Self::Proof),
            4 => Some(Self::Message),
            _ => None,
        }
    }

    pub fn byte(self) -> u8 {
        self as u8
    }
}

/// An ephemeral session id: 24 random bytes, compared and signed as their base64 text.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub [u8; SESSION_ID_LEN]);

impl SessionId {
    pub fn random() -> Self {
        Self(random_bytes())
    }

    pub fn from_b64(text: &str) -> Option<Self> {
        b64::decode_array::<SESSION_ID_LEN>(text).ok().map(Self)
    }

    pub fn to_b64(&self) -> String {
        b64::encode(self.0)
    }
}

impl fmt::Debug for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SessionId({})", self.to_b64())
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_b64())
    }
}

/// A decrypted ephemeral payload split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EphemeralPayload {
    /// The raw type byte (see [`EphemeralKind::from_byte`]; unknown types are kept so the
    /// receiver can report them as the JS client does).
    pub type_byte: u8,
    pub session_id: SessionId,
    pub counter: u32,
    pub content: Vec<u8>,
}

impl EphemeralPayload {
    pub fn kind(&self) -> Option<EphemeralKind> {
        EphemeralKind::from_byte(self.type_byte)
    }

    /// `type ‖ session id ‖ counter (u32 LE) ‖ content`.
    pub fn encode(&self) -> Vec<u8> {
        encode_ephemeral_payload(
            self.type_byte,
            &self.session_id,
            self.counter,
            &self.content,
        )
    }

    /// Splits a decrypted payload; shorter than the header is an error (`SECSYNC_ERROR_307`).
    pub fn decode(bytes: &[u8]) -> Result<Self, CryptoError> {
        if bytes.len() < EPHEMERAL_HEADER_LEN {
            return Err(CryptoError::ShortPayload);
        }
        let mut session_id = [0u8; SESSION_ID_LEN];
        session_id.copy_from_slice(&bytes[1..=SESSION_ID_LEN]);
        let mut counter = [0u8; 4];
        counter.copy_from_slice(&bytes[1 + SESSION_ID_LEN..EPHEMERAL_HEADER_LEN]);
        Ok(Self {
            type_byte: bytes[0],
            session_id: SessionId(session_id),
            counter: u32::from_le_bytes(counter),
            content: bytes[EPHEMERAL_HEADER_LEN..].to_vec(),
        })
    }
}

/// `type ‖ session id ‖ counter (u32 LE) ‖ content`.
pub fn encode_ephemeral_payload(
    type_byte: u8,
    session_id: &SessionId,
    counter: u32,
    content: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(EPHEMERAL_HEADER_LEN + content.len());
    out.push(type_byte);
    out.extend_from_slice(&session_id.0);
    out.extend_from_slice(&counter.to_le_bytes());
    out.extend_from_slice(content);
    out
}

/// The text a session proof signs:
/// `secsync_ephemeral_session_proof{"currentClientSessionId":…,"remoteClientSessionId":…}`.
fn session_proof_input(current: &SessionId, remote: &SessionId) -> String {
    // Keys already in canonical (sorted) order.
    let mut text = String::from(Domain::EphemeralSessionProof.prefix());
    text.push_str("{\"currentClientSessionId\":");
    write_str(&current.to_b64(), &mut text);
    text.push_str(",\"remoteClientSessionId\":");
    write_str(&remote.to_b64(), &mut text);
    text.push('}');
    text
}

/// The proof the owner of session `current` sends to the peer with session `remote`
/// (`createEphemeralMessageProof`): 64 signature bytes, sent as the content of a type 2 or 3
/// ephemeral message.
pub fn sign_session_proof(
    author: &SigningKey,
    current: &SessionId,
    remote: &SessionId,
) -> [u8; 64] {
    *proto_crypto::sign(author, session_proof_input(current, remote).as_bytes()).as_bytes()
}

/// Checks a peer's proof: `signer` owns session `signer_session` and proves it to the receiver's
/// session `receiver_session`. Strict as libsodium; anything but 64 bytes is invalid.
pub fn verify_session_proof(
    signer: &PublicKey,
    proof: &[u8],
    signer_session: &SessionId,
    receiver_session: &SessionId,
) -> bool {
    let Ok(bytes) = <[u8; 64]>::try_from(proof) else {
        return false;
    };
    proto_crypto::verify(
        signer,
        &SignatureBytes::from_bytes(bytes),
        session_proof_input(signer_session, receiver_session).as_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_tamper() {
        let key = DocumentKey::generate();
        let pd = "eyJhIjoxfQ";
        let enc = encrypt(b"hello", pd, &key).unwrap();
        assert_eq!(enc.nonce.len(), 32);
        assert_eq!(
            decrypt(&enc.ciphertext, &enc.nonce, pd, &key).unwrap(),
            b"hello"
        );
        assert_eq!(
            decrypt(&enc.ciphertext, &enc.nonce, "eyJhIjoyfQ", &key),
            Err(CryptoError::Commitment)
        );
        assert_eq!(
            decrypt(&enc.ciphertext, &enc.nonce, pd, &DocumentKey::generate()),
            Err(CryptoError::Commitment)
        );
        assert_eq!(
            decrypt("AAAA", &enc.nonce, pd, &key),
            Err(CryptoError::Encoding)
        );
        assert_eq!(
            decrypt(&enc.ciphertext, "AAAA", pd, &key),
            Err(CryptoError::Encoding)
        );
    }

    /// PROTOCOL.md 2.5's worked example: key 0x07…, plaintext "hi"; the tag and AEAD must agree
    /// with what libsodium produced for that frame.
    #[test]
    fn worked_example_decrypts() {
        let key = DocumentKey::from_bytes([7; 32]);
        let pd = "eyJjbG9jayI6MCwiZG9jSWQiOiJEMSIsInB1YktleSI6IkdYOXJJLUZzaFRMR3E4ZzQtczFlcDRtLURIYXlrZ00wQTV2Nml6MDJqV0UiLCJyZWZTbmFwc2hvdElkIjoiUzEifQ";
        let nonce = "SJnPYpyx--UQkBFx750JmgbIvlV4pKur";
        let ct = "LUrcbBTkJILZkg3hWWyu4YjUe8OSBvEHR-rWlKJKiKIuXCJ96RGTnrd1FNwpfk8N3_s";
        assert_eq!(decrypt(ct, nonce, pd, &key).unwrap(), b"hi");
        let nonce_bytes = b64::decode_array::<24>(nonce).unwrap();
        assert_eq!(
            encrypt_with_nonce(b"hi", pd, &key, &nonce_bytes)
                .unwrap()
                .ciphertext,
            ct
        );
    }

    #[test]
    fn payload_layout() {
        let id = SessionId([9; 24]);
        let bytes = encode_ephemeral_payload(4, &id, 0x0102_0304, b"x");
        assert_eq!(bytes.len(), EPHEMERAL_HEADER_LEN + 1);
        assert_eq!(&bytes[25..29], &[4, 3, 2, 1]);
        let decoded = EphemeralPayload::decode(&bytes).unwrap();
        assert_eq!(decoded.kind(), Some(EphemeralKind::Message));
        assert_eq!(decoded.counter, 0x0102_0304);
        assert_eq!(decoded.encode(), bytes);
        assert_eq!(
            EphemeralPayload::decode(&bytes[..28]),
            Err(CryptoError::ShortPayload)
        );
    }

    #[test]
    fn session_proofs_verify_one_way_only() {
        let author = SigningKey::from_bytes(&[1; 32]);
        let public = PublicKey::from_bytes(author.verifying_key().to_bytes());
        let (mine, theirs) = (SessionId([1; 24]), SessionId([2; 24]));
        let proof = sign_session_proof(&author, &mine, &theirs);
        assert!(verify_session_proof(&public, &proof, &mine, &theirs));
        assert!(!verify_session_proof(&public, &proof, &theirs, &mine));
        assert!(!verify_session_proof(&public, &proof[..63], &mine, &theirs));
    }

    #[test]
    fn key_debug_is_redacted() {
        assert_eq!(
            format!("{:?}", DocumentKey::from_bytes([1; 32])),
            "DocumentKey(<redacted>)"
        );
    }
}
