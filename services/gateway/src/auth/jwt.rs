//! `--auth jwt`: the session key a client passes is a signed JSON Web Token.
//!
//! Keys come from one file (`--jwt-key-file`): an Ed25519 public key in PEM (tokens signed
//! `EdDSA`), a shared secret of at least 32 bytes (`HS256`), or a JWKS document (`{"keys":[…]}`
//! with `OKP`/`Ed25519` and `oct` keys, chosen by the token's `kid`). The file is checked for
//! changes (size, modification time) on every connect and re-read when it changed, so keys
//! rotate without a restart; a file that no longer parses keeps the previous keys (logged).
//!
//! The algorithm is the key's, never the token header's choice (a header naming another
//! algorithm is refused), so an Ed25519 public key can never be used as an HMAC secret.
//!
//! Claims (documented in README.md, "Access control"):
//! * `exp` (required): unix seconds; the session is closed at that moment (close 4001).
//! * `doc` (exact document id) or `doc_prefix` (every id starting with it); exactly one.
//! * `access`: `read` or `read-write`.
//! * `jti` (optional): the id `POST /admin/revoke` revokes the session by.
//! * `iat` (optional): a revocation of the document refuses tokens issued before it (tokens
//!   without `iat` count as issued at 0).
//! * `nbf`, and `iss`/`aud` when `--jwt-issuer`/`--jwt-audience` are set, are checked too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use anyhow::Context as _;
use async_trait::async_trait;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use secsync_protocol::{DocumentId, SessionKey};
use serde::Deserialize;

use super::{Access, Authorizer, Denied, Grant};

/// Shortest HMAC secret accepted (HS256's output size).
const MIN_SECRET_BYTES: usize = 32;

/// How tokens are checked.
#[derive(Debug, Clone)]
pub struct JwtOptions {
    pub key_file: PathBuf,
    /// Seconds of clock skew tolerated on `exp` and `nbf`.
    pub leeway_seconds: u64,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

#[derive(Clone)]
struct Key {
    decoding: DecodingKey,
    algorithm: Algorithm,
}

/// The keys of one version of the key file.
#[derive(Clone, Default)]
struct KeySet {
    by_kid: HashMap<String, Key>,
    /// A key without `kid` (a PEM or secret file, or a JWKS key without one): used for tokens
    /// whose `kid` matches nothing.
    default: Option<Key>,
}

/// What identifies a version of the key file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

pub struct JwtAuthorizer {
    options: JwtOptions,
    keys: RwLock<Arc<KeySet>>,
    stamp: Mutex<Option<Stamp>>,
}

impl std::fmt::Debug for JwtAuthorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuthorizer")
            .field("key_file", &self.options.key_file)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Claims {
    exp: u64,
    #[serde(default)]
    iat: Option<u64>,
    #[serde(default)]
    jti: Option<String>,
    #[serde(default)]
    doc: Option<String>,
    #[serde(default)]
    doc_prefix: Option<String>,
    access: String,
}

impl JwtAuthorizer {
    /// Loads the key file; an unreadable or invalid file is an error (the binary stops).
    pub fn new(options: JwtOptions) -> anyhow::Result<Self> {
        let stamp = stamp_of(&options.key_file)
            .with_context(|| format!("JWT key file {}", options.key_file.display()))?;
        let keys = load(&options.key_file)?;
        Ok(Self {
            options,
            keys: RwLock::new(Arc::new(keys)),
            stamp: Mutex::new(Some(stamp)),
        })
    }

    /// The current keys, re-read first if the file changed.
    fn current(&self) -> Arc<KeySet> {
        let path = &self.options.key_file;
        let now = stamp_of(path).ok();
        let mut stamp = self
            .stamp
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if now.is_some() && *stamp != now {
            *stamp = now;
            match load(path) {
                Ok(keys) => {
                    tracing::info!(file = %path.display(), keys = keys.by_kid.len() + usize::from(keys.default.is_some()), "JWT keys reloaded");
                    *self
                        .keys
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(keys);
                }
                Err(error) => {
                    tracing::warn!(file = %path.display(), error = %format!("{error:#}"), "JWT key file invalid; keeping the previous keys");
                }
            }
        }
        drop(stamp);
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn check(&self, doc: &DocumentId, token: &str) -> Result<Grant, Denied> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| Denied::new("malformed"))?;
        let keys = self.current();
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| keys.by_kid.get(kid))
            .or(keys.default.as_ref())
            .ok_or(Denied::new("unknown-key"))?;
        if header.alg != key.algorithm {
            return Err(Denied::new("wrong-algorithm"));
        }
        let mut validation = Validation::new(key.algorithm);
        validation.leeway = self.options.leeway_seconds;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        validation.validate_aud = self.options.audience.is_some();
        if let Some(audience) = &self.options.audience {
            validation.set_audience(&[audience]);
        }
        if let Some(issuer) = &self.options.issuer {
            validation.set_issuer(&[issuer]);
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation)
            .map_err(|error| {
                Denied::new(match error.kind() {
                    ErrorKind::ExpiredSignature => "expired",
                    ErrorKind::ImmatureSignature => "not-yet-valid",
                    ErrorKind::InvalidSignature => "bad-signature",
                    ErrorKind::InvalidAudience => "wrong-audience",
                    ErrorKind::InvalidIssuer => "wrong-issuer",
                    ErrorKind::Json(_) | ErrorKind::MissingRequiredClaim(_) => "bad-claims",
                    _ => "invalid-token",
                })
            })?
            .claims;
        let document_matches = match (&claims.doc, &claims.doc_prefix) {
            (Some(exact), None) => exact == doc.as_str(),
            (None, Some(prefix)) => doc.as_str().starts_with(prefix.as_str()),
            _ => return Err(Denied::new("bad-claims")),
        };
        if !document_matches {
            return Err(Denied::new("wrong-document"));
        }
        let access = Access::parse(&claims.access).ok_or(Denied::new("bad-claims"))?;
        Ok(Grant {
            access,
            expires_at: Some(claims.exp.saturating_add(self.options.leeway_seconds)),
            revocation_id: claims.jti.map(Arc::from),
            issued_at: Some(claims.iat.unwrap_or(0)),
        })
    }
}

#[async_trait]
impl Authorizer for JwtAuthorizer {
    async fn authorize(&self, doc: &DocumentId, session_key: &SessionKey) -> Result<Grant, Denied> {
        self.check(doc, session_key.expose())
    }
}

fn stamp_of(path: &Path) -> std::io::Result<Stamp> {
    let metadata = std::fs::metadata(path)?;
    Ok(Stamp {
        modified: metadata.modified().ok(),
        len: metadata.len(),
    })
}

/// Reads a key file: JWKS, PEM or secret (see the module docs).
fn load(path: &Path) -> anyhow::Result<KeySet> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading JWT key file {}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let trimmed = text.trim();
    if trimmed.starts_with('{') {
        return load_jwks(trimmed).with_context(|| format!("JWKS file {}", path.display()));
    }
    let key = if trimmed.starts_with("-----BEGIN") {
        let decoding = DecodingKey::from_ed_pem(trimmed.as_bytes()).with_context(|| {
            format!(
                "{}: not an Ed25519 public key in PEM (\"-----BEGIN PUBLIC KEY-----\")",
                path.display()
            )
        })?;
        Key {
            decoding,
            algorithm: Algorithm::EdDSA,
        }
    } else {
        // A secret: the file's bytes without a trailing line break (editors add one).
        let secret = super::strip_line_break(&bytes);
        anyhow::ensure!(
            secret.len() >= MIN_SECRET_BYTES,
            "{}: an HS256 secret must have at least {MIN_SECRET_BYTES} bytes",
            path.display()
        );
        Key {
            decoding: DecodingKey::from_secret(secret),
            algorithm: Algorithm::HS256,
        }
    };
    Ok(KeySet {
        by_kid: HashMap::new(),
        default: Some(key),
    })
}

fn load_jwks(text: &str) -> anyhow::Result<KeySet> {
    let set: JwkSet = serde_json::from_str(text).context("not a JWKS document")?;
    let mut keys = KeySet::default();
    for jwk in &set.keys {
        let algorithm = match &jwk.algorithm {
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                Algorithm::EdDSA
            }
            AlgorithmParameters::OctetKey(_) => Algorithm::HS256,
            // Other key types may share the document (another service's keys): not ours.
            _ => continue,
        };
        let decoding = DecodingKey::from_jwk(jwk).context("invalid key in JWKS")?;
        if algorithm == Algorithm::HS256 {
            anyhow::ensure!(
                decoding_secret_len(jwk) >= MIN_SECRET_BYTES,
                "an oct key must have at least {MIN_SECRET_BYTES} bytes"
            );
        }
        let key = Key {
            decoding,
            algorithm,
        };
        match &jwk.common.key_id {
            Some(kid) => {
                keys.by_kid.insert(kid.clone(), key);
            }
            None if keys.default.is_none() => keys.default = Some(key),
            None => anyhow::bail!("more than one key without a kid"),
        }
    }
    anyhow::ensure!(
        !keys.by_kid.is_empty() || keys.default.is_some(),
        "no Ed25519 (OKP) or oct key in the JWKS"
    );
    Ok(keys)
}

fn decoding_secret_len(jwk: &jsonwebtoken::jwk::Jwk) -> usize {
    match &jwk.algorithm {
        AlgorithmParameters::OctetKey(p) => p.value.trim_end_matches('=').len() * 3 / 4,
        _ => 0,
    }
}
