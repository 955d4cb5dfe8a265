//! `--auth callback`: the gateway asks the application over HTTP, like the reference's
//! `hasAccess` hook.
//!
//! `POST --auth-callback-url` with `{"documentId": …, "sessionKey": …}`; the application
//! answers 200 with `{"allow": true|false, "access": "read"|"read-write", "ttlSeconds": n,
//! "revocationId": "…", "expiresAt": unix-seconds}` (all but `allow` optional; `access`
//! defaults to `read-write`). Anything else — another status, a body that is not that JSON, a
//! timeout (`--auth-callback-timeout-ms`), an unreachable application — denies (fail closed)
//! and is not cached. Answers are cached for `ttlSeconds` (at most
//! `--auth-callback-max-ttl-seconds`; 0 or absent: not cached) in a bounded cache
//! (`--auth-callback-cache-entries`, oldest first out), keyed by a hash of document id and
//! session key so the cache holds no session key. Any revocation clears the cache.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use secsync_protocol::{DocumentId, SessionKey};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tokio::time::Instant;

use super::{Access, Authorizer, Denied, Grant};
use crate::revocation::Revocation;

/// How the application is asked.
#[derive(Debug, Clone)]
pub struct CallbackOptions {
    pub url: String,
    pub timeout: Duration,
    pub cache_entries: usize,
    pub max_ttl: Duration,
}

type CacheKey = [u8; 32];

#[derive(Default)]
struct Cache {
    entries: HashMap<CacheKey, (Result<Grant, Denied>, Instant)>,
    /// Insertion order, for evicting the oldest; may name entries already gone.
    order: VecDeque<CacheKey>,
}

pub struct CallbackAuthorizer {
    client: reqwest::Client,
    options: CallbackOptions,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for CallbackAuthorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallbackAuthorizer")
            .field("url", &self.options.url)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Answer {
    allow: bool,
    #[serde(default)]
    access: Option<String>,
    #[serde(default)]
    ttl_seconds: Option<f64>,
    #[serde(default)]
    revocation_id: Option<String>,
    #[serde(default)]
    expires_at: Option<u64>,
}

impl CallbackAuthorizer {
    pub fn new(options: CallbackOptions) -> anyhow::Result<Self> {
        let url = reqwest::Url::parse(&options.url)
            .map_err(|e| anyhow::anyhow!("--auth-callback-url: {e}"))?;
        anyhow::ensure!(
            matches!(url.scheme(), "http" | "https"),
            "--auth-callback-url must be http:// or https://"
        );
        // reqwest is built without a bundled TLS provider: use ring (already in the tree).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .timeout(options.timeout)
            .connect_timeout(options.timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| anyhow::anyhow!("HTTP client: {e}"))?;
        Ok(Self {
            client,
            options,
            cache: Mutex::new(Cache::default()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn cached(&self, key: &CacheKey) -> Option<Result<Grant, Denied>> {
        let mut cache = self.lock();
        match cache.entries.get(key) {
            Some((decision, until)) if *until > Instant::now() => Some(decision.clone()),
            Some(_) => {
                cache.entries.remove(key);
                None
            }
            None => None,
        }
    }

    fn remember(&self, key: CacheKey, decision: &Result<Grant, Denied>, ttl: Duration) {
        let max = self.options.cache_entries;
        if ttl.is_zero() || max == 0 {
            return;
        }
        let mut cache = self.lock();
        while cache.entries.len() >= max {
            let Some(oldest) = cache.order.pop_front() else {
                break;
            };
            cache.entries.remove(&oldest);
        }
        if cache.order.len() > 2 * max {
            // Order entries of keys replaced or expired since: keep the queue bounded.
            let Cache { entries, order } = &mut *cache;
            order.retain(|k| entries.contains_key(k));
        }
        cache
            .entries
            .insert(key, (decision.clone(), Instant::now() + ttl));
        cache.order.push_back(key);
    }

    /// Asks the application; the error is a reason code for the log (never the key).
    async fn ask(&self, doc: &DocumentId, key: &SessionKey) -> Result<(Answer, Duration), Denied> {
        let body = serde_json::json!({
            "documentId": doc.as_str(),
            "sessionKey": key.expose(),
        });
        let response = self
            .client
            .post(&self.options.url)
            .json(&body)
            .send()
            .await
            .map_err(|error| {
                let reason = if error.is_timeout() {
                    "callback-timeout"
                } else {
                    "callback-unreachable"
                };
                // reqwest's error names the URL, not the body: safe to log.
                tracing::warn!(reason, error = %error.without_url(), "access callback failed");
                Denied::new(reason)
            })?;
        if !response.status().is_success() {
            tracing::warn!(
                status = response.status().as_u16(),
                "access callback answered an error"
            );
            return Err(Denied::new("callback-status"));
        }
        let answer: Answer = response.json().await.map_err(|error| {
            let reason = if error.is_timeout() {
                "callback-timeout"
            } else {
                "callback-bad-answer"
            };
            tracing::warn!(reason, "access callback answer unusable");
            Denied::new(reason)
        })?;
        let ttl = answer
            .ttl_seconds
            .filter(|t| t.is_finite() && *t > 0.0)
            .map_or(Duration::ZERO, |t| {
                Duration::from_secs_f64(t.min(self.options.max_ttl.as_secs_f64()))
            });
        Ok((answer, ttl))
    }
}

#[async_trait]
impl Authorizer for CallbackAuthorizer {
    async fn authorize(&self, doc: &DocumentId, session_key: &SessionKey) -> Result<Grant, Denied> {
        let key: CacheKey = {
            let mut hash = Sha256::new();
            hash.update(doc.as_str().as_bytes());
            hash.update([0]);
            hash.update(session_key.expose().as_bytes());
            hash.finalize().into()
        };
        if let Some(decision) = self.cached(&key) {
            return decision;
        }
        let (answer, ttl) = self.ask(doc, session_key).await?;
        let decision = if answer.allow {
            match answer
                .access
                .as_deref()
                .map_or(Some(Access::ReadWrite), Access::parse)
            {
                Some(access) => Ok(Grant {
                    access,
                    expires_at: answer.expires_at,
                    revocation_id: answer.revocation_id.map(Arc::from),
                    issued_at: None,
                }),
                None => Err(Denied::new("callback-bad-answer")),
            }
        } else {
            Err(Denied::new("callback-denied"))
        };
        if decision
            .as_ref()
            .is_ok_and(|g| g.expires_at.is_some_and(|at| at <= super::unix_now()))
        {
            return Err(Denied::new("expired"));
        }
        self.remember(key, &decision, ttl);
        decision
    }

    fn revoked(&self, _revocation: &Revocation) {
        // Decisions are keyed by hash: which ones a revocation concerns is unknown, and
        // revocations are rare. Forget them all.
        *self.lock() = Cache::default();
    }
}
