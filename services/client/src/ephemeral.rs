//! Ephemeral message sessions (PROTOCOL.md 2.8), as the JS client's
//! `verifyAndDecryptEphemeralMessage` runs them.
//!
//! Every connection has a random session id and a random starting counter. A peer's `message`
//! content is delivered only once the peer proved its session (an Ed25519 signature over both
//! session ids) and only with a counter above the last one seen, which is what protects against
//! a server replaying or forging presence data it cannot read. `initialize` and unknown sessions
//! are answered with a proof that requests one back; a `proofAndRequestProof` with a plain proof.
//! Pure state: [`crate::client`] sends the replies this module asks for.

use std::collections::BTreeMap;

use ed25519_dalek::SigningKey;
use rand::Rng as _;
use secsync_protocol::PublicKey;

use crate::crypto::{
    encode_ephemeral_payload, sign_session_proof, verify_session_proof, EphemeralKind,
    EphemeralPayload, SessionId,
};
use crate::sync::SyncError;

/// A peer whose session was proven, with the last counter seen from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerSession {
    pub session_id: SessionId,
    pub counter: u32,
}

/// What processing one received payload produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Received {
    /// Content of a `message` to hand to the application.
    pub content: Option<Vec<u8>>,
    /// A proof to send back, as a `proof` or `proofAndRequestProof` message.
    pub reply: Option<(EphemeralKind, [u8; 64])>,
    pub error: Option<SyncError>,
}

/// This connection's ephemeral session and the peers' proven sessions.
#[derive(Debug, Clone)]
pub struct EphemeralSessions {
    own: SessionId,
    counter: u32,
    peers: BTreeMap<String, PeerSession>,
}

impl Default for EphemeralSessions {
    fn default() -> Self {
        Self::new()
    }
}

impl EphemeralSessions {
    /// A random session id and a random starting counter below 2^31 − 1 (the JS client's
    /// `randombytes_uniform(2147483647)`).
    pub fn new() -> Self {
        Self::with(
            SessionId::random(),
            rand::rngs::OsRng.gen_range(0..2_147_483_647),
        )
    }

    /// A session with a fixed id and counter (tests reproduce the vectors with it).
    pub fn with(own: SessionId, counter: u32) -> Self {
        Self {
            own,
            counter,
            peers: BTreeMap::new(),
        }
    }

    pub fn own_id(&self) -> &SessionId {
        &self.own
    }

    /// Proven peers by public key.
    pub fn peers(&self) -> &BTreeMap<String, PeerSession> {
        &self.peers
    }

    /// Lays out the next outgoing payload and advances the counter.
    pub fn next_payload(&mut self, kind: EphemeralKind, content: &[u8]) -> Vec<u8> {
        let payload = encode_ephemeral_payload(kind.byte(), &self.own, self.counter, content);
        // JS writes the counter with setUint32, which wraps modulo 2^32.
        self.counter = self.counter.wrapping_add(1);
        payload
    }

    /// Processes a decrypted payload from `author` (signature and document already checked).
    pub fn receive(&mut self, author: &PublicKey, payload: &[u8], signer: &SigningKey) -> Received {
        let Ok(payload) = EphemeralPayload::decode(payload) else {
            return Received {
                error: Some(SyncError::EphemeralMalformed),
                ..Received::default()
            };
        };
        let proof_for_sender = || sign_session_proof(signer, &self.own, &payload.session_id);
        match payload.kind() {
            Some(EphemeralKind::Initialize) => Received {
                reply: Some((EphemeralKind::ProofAndRequestProof, proof_for_sender())),
                ..Received::default()
            },
            Some(kind @ (EphemeralKind::Proof | EphemeralKind::ProofAndRequestProof)) => {
                if !verify_session_proof(author, &payload.content, &payload.session_id, &self.own) {
                    return Received::default();
                }
                let reply = (kind == EphemeralKind::ProofAndRequestProof)
                    .then(|| (EphemeralKind::Proof, proof_for_sender()));
                self.peers.insert(
                    author.as_str().to_owned(),
                    PeerSession {
                        session_id: payload.session_id,
                        counter: payload.counter,
                    },
                );
                Received {
                    reply,
                    ..Received::default()
                }
            }
            Some(EphemeralKind::Message) => {
                let peer = self
                    .peers
                    .get(author.as_str())
                    .filter(|p| p.session_id == payload.session_id);
                match peer {
                    None => Received {
                        reply: Some((EphemeralKind::ProofAndRequestProof, proof_for_sender())),
                        error: Some(SyncError::EphemeralNoSession),
                        content: None,
                    },
                    Some(peer) if peer.counter >= payload.counter => Received {
                        error: Some(SyncError::EphemeralReplay),
                        ..Received::default()
                    },
                    Some(_) => {
                        self.peers.insert(
                            author.as_str().to_owned(),
                            PeerSession {
                                session_id: payload.session_id,
                                counter: payload.counter,
                            },
                        );
                        Received {
                            content: Some(payload.content),
                            ..Received::default()
                        }
                    }
                }
            }
            None => Received {
                error: Some(SyncError::EphemeralUnknownType),
                ..Received::default()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frames::public_key_of;

    /// Two sessions run the JS handshake and then exchange messages; replays are refused.
    #[test]
    fn handshake_then_messages() {
        let (ka, kb) = (
            SigningKey::from_bytes(&[1; 32]),
            SigningKey::from_bytes(&[2; 32]),
        );
        let (pa, pb) = (public_key_of(&ka), public_key_of(&kb));
        let mut a = EphemeralSessions::with(SessionId([1; 24]), 10);
        let mut b = EphemeralSessions::with(SessionId([2; 24]), 20);

        let init = a.next_payload(EphemeralKind::Initialize, &[]);
        let r = b.receive(&pa, &init, &kb);
        let (kind, proof) = r.reply.unwrap();
        assert_eq!(kind, EphemeralKind::ProofAndRequestProof);
        let msg = b.next_payload(kind, &proof);
        let r = a.receive(&pb, &msg, &ka);
        assert!(a.peers().contains_key(pb.as_str()));
        let (kind, proof) = r.reply.unwrap();
        assert_eq!(kind, EphemeralKind::Proof);
        let r = b.receive(&pa, &a.next_payload(kind, &proof), &kb);
        assert_eq!(r, Received::default());
        assert!(b.peers().contains_key(pa.as_str()));

        let hello = a.next_payload(EphemeralKind::Message, b"hi");
        assert_eq!(
            b.receive(&pa, &hello, &kb).content.as_deref(),
            Some(&b"hi"[..])
        );
        assert_eq!(
            b.receive(&pa, &hello, &kb).error,
            Some(SyncError::EphemeralReplay)
        );
        // A stranger's message gets a proof request.
        let mut c = EphemeralSessions::with(SessionId([3; 24]), 0);
        let r = b.receive(&pa, &c.next_payload(EphemeralKind::Message, b"x"), &kb);
        assert_eq!(r.error, Some(SyncError::EphemeralNoSession));
        assert_eq!(r.reply.unwrap().0, EphemeralKind::ProofAndRequestProof);
    }
}
