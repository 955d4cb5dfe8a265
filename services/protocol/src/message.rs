//! Client → server frames (PROTOCOL.md 4), parsed while keeping the exact signed text.
//!
//! [`parse_client_frame`] classifies a text frame by shape, as the reference does (a
//! `publicData.snapshotId` makes a snapshot, else a `publicData.refSnapshotId` an update, else an
//! ephemeral message), checks every field into the newtypes of [`crate::ids`] and builds the
//! message's **body**: `{"ciphertext":…,"nonce":…,"signature":…,"publicData":…}` from the raw
//! text of the four signed parts exactly as received. The body is what gets stored and relayed
//! (PROTOCOL.md 7.6); nothing is ever re-serialised from the typed fields. Unknown top-level
//! fields (such as `additionalServerData`) are dropped, unknown `publicData` fields are refused
//! unless [`ParseOptions::allow_extra_public_data_fields`] is set.
//!
//! Parsing does not verify the signature: call [`ClientFrame::verify`] (the gateway does, once)
//! and [`ClientFrame::check_document`] for the connection's document.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::ops::Range;

use crate::b64;
use crate::canonical::to_canonical;
use crate::crypto::{self, Domain, KeyCache};
use crate::error::{FrameError, Reason, Shape};
use crate::ids::{Clock, DocumentId, IdError, PublicKey, SignatureBytes, SnapshotId};
use crate::json::{self, JsonError, Kind, Value};

/// A nonce is 24 bytes (XChaCha20).
pub const NONCE_LEN: usize = 24;
/// A ciphertext holds a 32-byte commitment tag and a 16-byte AEAD tag at least (PROTOCOL.md 2.4).
pub const MIN_CIPHERTEXT_LEN: usize = 48;
/// Raw values longer than this are not echoed back in `update-save-failed`.
const MAX_ECHO_LEN: usize = 512;

/// Per-deployment parsing choices.
#[derive(Debug, Clone, Copy, Default)]
pub struct ParseOptions {
    /// Accept `publicData` fields beyond those of PROTOCOL.md 4 (they are signed and relayed).
    pub allow_extra_public_data_fields: bool,
}

/// A client frame of one of the three kinds.
#[derive(Debug, Clone)]
pub enum ClientFrame {
    Snapshot(SnapshotMessage),
    Update(UpdateMessage),
    Ephemeral(EphemeralMessage),
}

/// The signed parts every message kind shares, and the body built from their exact text.
#[derive(Clone)]
pub struct Signed {
    body: String,
    ciphertext: Range<usize>,
    nonce: Range<usize>,
    public_data: Range<usize>,
    /// Whether any of the string literals used escapes (then the decoded value differs from the
    /// text between the quotes).
    escaped: bool,
    pd_b64: String,
    doc_id: DocumentId,
    pub_key: PublicKey,
    signature: SignatureBytes,
}

impl std::fmt::Debug for Signed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print ciphertext, nonce or signature (PROTOCOL.md 7.7).
        f.debug_struct("Signed")
            .field("doc_id", &self.doc_id)
            .field("pub_key", &self.pub_key)
            .field("body_len", &self.body.len())
            .finish_non_exhaustive()
    }
}

impl Signed {
    /// `{"ciphertext":…,"nonce":…,"signature":…,"publicData":…}` from the received text.
    pub fn body(&self) -> &str {
        &self.body
    }

    /// The exact received text of `publicData`.
    pub fn public_data_text(&self) -> &str {
        &self.body[self.public_data.clone()]
    }

    /// The decoded `ciphertext` string (base64 text).
    pub fn ciphertext(&self) -> Cow<'_, str> {
        self.decoded(self.ciphertext.clone())
    }

    /// The decoded `nonce` string (base64 text).
    pub fn nonce(&self) -> Cow<'_, str> {
        self.decoded(self.nonce.clone())
    }

    pub fn doc_id(&self) -> &DocumentId {
        &self.doc_id
    }

    pub fn pub_key(&self) -> &PublicKey {
        &self.pub_key
    }

    /// `b64u(canon(publicData))`, the AEAD additional data and part of the signed text.
    pub fn public_data_b64(&self) -> &str {
        &self.pd_b64
    }

    /// The text the signature covers.
    pub fn signature_input(&self, domain: Domain) -> String {
        crypto::signature_input(domain, &self.ciphertext(), &self.nonce(), &self.pd_b64)
    }

    fn verify(&self, domain: Domain, keys: &mut KeyCache) -> bool {
        keys.verify(
            &self.pub_key,
            &self.signature,
            self.signature_input(domain).as_bytes(),
        )
    }

    fn decoded(&self, literal: Range<usize>) -> Cow<'_, str> {
        let inner = &self.body[literal.start + 1..literal.end - 1];
        if !self.escaped {
            return Cow::Borrowed(inner);
        }
        // Validated at parse time as base64 text, so decoding again cannot fail.
        match json::decode_string_literal(&self.body[literal]) {
            Ok(json::JsStr::Text(text)) => text,
            _ => Cow::Borrowed(inner),
        }
    }
}

/// A snapshot frame.
#[derive(Debug, Clone)]
pub struct SnapshotMessage {
    pub signed: Signed,
    pub snapshot_id: SnapshotId,
    /// `None` for a document's first snapshot (`parentSnapshotId: ""`).
    pub parent_snapshot_id: Option<SnapshotId>,
    pub parent_snapshot_proof: String,
    /// Per author (public key text) the last clock of the parent the author included.
    pub parent_snapshot_update_clocks: BTreeMap<String, Clock>,
}

impl SnapshotMessage {
    /// `b64u(BLAKE2b-256(ciphertext text))`, stored with the snapshot and used in proofs.
    pub fn ciphertext_hash(&self) -> String {
        crypto::ciphertext_hash(&self.signed.ciphertext())
    }
}

/// An update frame.
#[derive(Debug, Clone)]
pub struct UpdateMessage {
    pub signed: Signed,
    pub ref_snapshot_id: SnapshotId,
    pub clock: Clock,
}

/// An ephemeral message frame.
#[derive(Debug, Clone)]
pub struct EphemeralMessage {
    pub signed: Signed,
}

impl ClientFrame {
    pub fn signed(&self) -> &Signed {
        match self {
            ClientFrame::Snapshot(m) => &m.signed,
            ClientFrame::Update(m) => &m.signed,
            ClientFrame::Ephemeral(m) => &m.signed,
        }
    }

    /// The shape used to answer a failure of this frame.
    pub fn shape(&self) -> Shape {
        match self {
            ClientFrame::Snapshot(_) => Shape::Snapshot,
            ClientFrame::Update(m) => Shape::Update {
                snapshot_id: Some(json_string(m.ref_snapshot_id.as_str())),
                clock: Some(m.clock.to_string()),
            },
            ClientFrame::Ephemeral(_) => Shape::Ephemeral,
        }
    }

    pub fn domain(&self) -> Domain {
        match self {
            ClientFrame::Snapshot(_) => Domain::Snapshot,
            ClientFrame::Update(_) => Domain::Update,
            ClientFrame::Ephemeral(_) => Domain::EphemeralMessage,
        }
    }

    /// Checks the Ed25519 signature with libsodium's strictness.
    pub fn verify(&self) -> Result<(), FrameError> {
        self.verify_with(&mut KeyCache::default())
    }

    /// [`Self::verify`], with the connection's last checked public key at hand.
    pub fn verify_with(&self, keys: &mut KeyCache) -> Result<(), FrameError> {
        if self.signed().verify(self.domain(), keys) {
            Ok(())
        } else {
            Err(self.error(Reason::BadSignature))
        }
    }

    /// Checks that the frame names the connection's document (PROTOCOL.md 7.1).
    pub fn check_document(&self, doc: &DocumentId) -> Result<(), FrameError> {
        if self.signed().doc_id() == doc {
            Ok(())
        } else {
            Err(self.error(Reason::WrongDocument))
        }
    }

    /// An error about this frame, shaped so the client gets the reply it needs.
    pub fn error(&self, reason: Reason) -> FrameError {
        FrameError {
            shape: self.shape(),
            reason,
        }
    }
}

/// The exact signed parts of a client frame: what a server stores and relays for it (PROTOCOL.md
/// 7.6), and so what a load returns for it.
pub fn stored_body(text: &str) -> Result<String, FrameError> {
    Ok(parse_client_frame(text, ParseOptions::default())?
        .signed()
        .body()
        .to_owned())
}

/// Parses one client text frame.
pub fn parse_client_frame(text: &str, options: ParseOptions) -> Result<ClientFrame, FrameError> {
    let unknown = |reason| FrameError {
        shape: Shape::Unknown,
        reason,
    };
    let root = json::parse(text).map_err(|e| {
        unknown(match e {
            JsonError::DuplicateKey(_) => Reason::DuplicateKey,
            JsonError::TooDeep => Reason::TooDeep,
            JsonError::Syntax(_) | JsonError::NumberOutOfRange(_) => Reason::NotJson,
        })
    })?;
    if root.as_object().is_none() {
        return Err(unknown(Reason::NotObject));
    }
    let public_data = root
        .get("publicData")
        .filter(|pd| pd.as_object().is_some())
        .ok_or(unknown(Reason::BadShape))?;

    if public_data.get("snapshotId").is_some() {
        let fail = |reason| FrameError {
            shape: Shape::Snapshot,
            reason,
        };
        parse_snapshot(text, &root, public_data, options).map_err(fail)
    } else if let Some(ref_id) = public_data.get("refSnapshotId") {
        let echo = |v: Option<&Value<'_>>| {
            v.map(|v| &text[v.span.clone()])
                .filter(|raw| raw.len() <= MAX_ECHO_LEN)
                .map(str::to_owned)
        };
        let shape = Shape::Update {
            snapshot_id: echo(Some(ref_id)),
            clock: echo(public_data.get("clock")),
        };
        parse_update(text, &root, public_data, options).map_err(|reason| FrameError {
            shape: shape.clone(),
            reason,
        })
    } else {
        parse_ephemeral(text, &root, public_data, options).map_err(|reason| FrameError {
            shape: Shape::Ephemeral,
            reason,
        })
    }
}

const SNAPSHOT_FIELDS: &[&str] = &[
    "docId",
    "pubKey",
    "snapshotId",
    "parentSnapshotId",
    "parentSnapshotUpdateClocks",
    "parentSnapshotProof",
];
const UPDATE_FIELDS: &[&str] = &["docId", "pubKey", "refSnapshotId", "clock"];
const EPHEMERAL_FIELDS: &[&str] = &["docId", "pubKey"];

fn parse_snapshot(
    text: &str,
    root: &Value<'_>,
    pd: &Value<'_>,
    options: ParseOptions,
) -> Result<ClientFrame, Reason> {
    let signed = parse_signed(text, root, pd, SNAPSHOT_FIELDS, options)?;
    let snapshot_id = SnapshotId::parse(str_field(pd, "snapshotId")?).map_err(id_reason)?;
    let parent = str_field(pd, "parentSnapshotId")?;
    let parent_snapshot_id = if parent.is_empty() {
        None
    } else {
        Some(SnapshotId::parse(parent).map_err(id_reason)?)
    };
    let parent_snapshot_proof = str_field(pd, "parentSnapshotProof")?;
    if parent_snapshot_proof.len() > crate::ids::MAX_ID_LEN {
        return Err(Reason::BadId);
    }
    let parent_snapshot_update_clocks = pd
        .get("parentSnapshotUpdateClocks")
        .ok_or(Reason::BadShape)
        .and_then(clock_map)?;
    Ok(ClientFrame::Snapshot(SnapshotMessage {
        signed,
        snapshot_id,
        parent_snapshot_id,
        parent_snapshot_proof: parent_snapshot_proof.to_owned(),
        parent_snapshot_update_clocks,
    }))
}

fn parse_update(
    text: &str,
    root: &Value<'_>,
    pd: &Value<'_>,
    options: ParseOptions,
) -> Result<ClientFrame, Reason> {
    let signed = parse_signed(text, root, pd, UPDATE_FIELDS, options)?;
    let ref_snapshot_id = SnapshotId::parse(str_field(pd, "refSnapshotId")?).map_err(id_reason)?;
    let Some(Kind::Number(clock)) = pd.get("clock").map(|v| &v.kind) else {
        return Err(Reason::BadShape);
    };
    let clock = Clock::from_f64(*clock).map_err(|_| Reason::BadClock)?;
    Ok(ClientFrame::Update(UpdateMessage {
        signed,
        ref_snapshot_id,
        clock,
    }))
}

fn parse_ephemeral(
    text: &str,
    root: &Value<'_>,
    pd: &Value<'_>,
    options: ParseOptions,
) -> Result<ClientFrame, Reason> {
    let signed = parse_signed(text, root, pd, EPHEMERAL_FIELDS, options)?;
    Ok(ClientFrame::Ephemeral(EphemeralMessage { signed }))
}

/// Checks the parts every kind shares and builds the body from their exact text.
fn parse_signed(
    text: &str,
    root: &Value<'_>,
    pd: &Value<'_>,
    allowed: &[&str],
    options: ParseOptions,
) -> Result<Signed, Reason> {
    let members = pd.as_object().ok_or(Reason::BadShape)?;
    for field in allowed {
        if pd.get(field).is_none() {
            return Err(Reason::BadShape);
        }
    }
    if !options.allow_extra_public_data_fields
        && members
            .iter()
            .any(|(k, _)| !k.as_str().is_some_and(|k| allowed.contains(&k)))
    {
        return Err(Reason::ExtraField);
    }
    let doc_id = DocumentId::parse(str_field(pd, "docId")?).map_err(id_reason)?;
    let pub_key = PublicKey::parse(str_field(pd, "pubKey")?).map_err(id_reason)?;

    let ciphertext = root.get("ciphertext").ok_or(Reason::BadShape)?;
    let nonce = root.get("nonce").ok_or(Reason::BadShape)?;
    let signature = root.get("signature").ok_or(Reason::BadShape)?;
    let (ct_text, nonce_text, sig_text) = (
        ciphertext.as_str().ok_or(Reason::BadShape)?,
        nonce.as_str().ok_or(Reason::BadShape)?,
        signature.as_str().ok_or(Reason::BadShape)?,
    );
    let signature_bytes = SignatureBytes::parse(sig_text).map_err(id_reason)?;
    if b64::validate(nonce_text).map_err(|_| Reason::BadBase64)? != NONCE_LEN {
        return Err(Reason::BadLength);
    }
    if b64::validate(ct_text).map_err(|_| Reason::BadBase64)? < MIN_CIPHERTEXT_LEN {
        return Err(Reason::BadLength);
    }

    let raw = |v: &Value<'_>| &text[v.span.clone()];
    let escaped = [ciphertext, nonce, signature]
        .iter()
        .any(|v| raw(v).len() != v.as_str().map_or(0, str::len) + 2);
    let pd_b64 = b64::encode(to_canonical(pd));

    let mut body = String::with_capacity(
        raw(ciphertext).len() + raw(nonce).len() + raw(signature).len() + raw(pd).len() + 64,
    );
    let mut push_field = |name: &str, value: &str| {
        body.push_str(if body.is_empty() { "{\"" } else { ",\"" });
        body.push_str(name);
        body.push_str("\":");
        let start = body.len();
        body.push_str(value);
        start..body.len()
    };
    let ciphertext = push_field("ciphertext", raw(ciphertext));
    let nonce = push_field("nonce", raw(nonce));
    push_field("signature", raw(signature));
    let public_data = push_field("publicData", raw(pd));
    body.push('}');

    Ok(Signed {
        body,
        ciphertext,
        nonce,
        public_data,
        escaped,
        pd_b64,
        doc_id,
        pub_key,
        signature: signature_bytes,
    })
}

/// Reads an object of author public keys to clocks, such as `parentSnapshotUpdateClocks`.
pub fn clock_map(value: &Value<'_>) -> Result<BTreeMap<String, Clock>, Reason> {
    let members = value.as_object().ok_or(Reason::BadShape)?;
    let mut clocks = BTreeMap::new();
    for (key, value) in members {
        let key = key.as_str().ok_or(Reason::BadShape)?;
        let Kind::Number(n) = value.kind else {
            return Err(Reason::BadShape);
        };
        clocks.insert(
            key.to_owned(),
            Clock::from_f64(n).map_err(|_| Reason::BadClock)?,
        );
    }
    Ok(clocks)
}

fn str_field<'v>(value: &'v Value<'_>, key: &str) -> Result<&'v str, Reason> {
    value
        .get(key)
        .and_then(Value::as_str)
        .ok_or(Reason::BadShape)
}

fn id_reason(error: IdError) -> Reason {
    match error {
        IdError::Empty | IdError::TooLong => Reason::BadId,
        IdError::Base64 => Reason::BadBase64,
        IdError::Length => Reason::BadLength,
        IdError::Clock => Reason::BadClock,
    }
}

fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    crate::canonical::write_str(text, &mut out);
    out
}

/// Builds a signed client frame (for clients, tests and the load generator; the server never
/// signs). `public_data` is JSON text and is sent exactly as given.
pub fn build_frame(
    domain: Domain,
    ciphertext: &str,
    nonce: &str,
    public_data: &str,
    key: &ed25519_dalek::SigningKey,
) -> Result<String, JsonError> {
    let pd_b64 = b64::encode(to_canonical(&json::parse(public_data)?));
    let input = crypto::signature_input(domain, ciphertext, nonce, &pd_b64);
    let signature = b64::encode(crypto::sign(key, input.as_bytes()).as_bytes());
    let mut out = String::with_capacity(ciphertext.len() + public_data.len() + 200);
    out.push_str("{\"nonce\":");
    crate::canonical::write_str(nonce, &mut out);
    out.push_str(",\"ciphertext\":");
    crate::canonical::write_str(ciphertext, &mut out);
    out.push_str(",\"publicData\":");
    out.push_str(public_data);
    out.push_str(",\"signature\":");
    crate::canonical::write_str(&signature, &mut out);
    out.push('}');
    Ok(out)
}
