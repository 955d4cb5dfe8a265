//! Live revocation and expiry: ends sessions whose grant expired or was revoked, on every
//! gateway, and keeps revoked credentials out afterwards.
//!
//! Nothing here costs an idle connection a task, a timer or a span. Sessions whose grant
//! expires or can be revoked by id have one entry in a gateway-wide [`Registry`]; one task per
//! gateway sleeps until the earliest expiry. A session is ended through its document's channel
//! ([`crate::hub::Hub::close`]): the channel drops what was queued for it and marks its inbox
//! ended with the close code, which the session notices before anything else it polls.
//!
//! A revocation (`POST /admin/revoke`, see [`crate::admin`]) travels over the bus to every
//! gateway, this one included, and is applied on arrival only ([`Registry::apply`]): by id, it
//! ends the sessions with that id and refuses the id at connect for `--revocation-retain-seconds`;
//! by document, it ends every session of the document and refuses credentials issued before it
//! (a token's `iat`) for as long. Revocations are not stored: a gateway started later does not
//! know older ones, so tokens should live shorter than the retention.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use secsync_protocol::DocumentId;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::auth::{unix_now, wall_clock, Grant};
use crate::hub::Hub;

/// Close codes of access control (application range 4000–4999, README.md "Access control").
pub mod close {
    /// The session's token (or grant) expired; get a fresh one and reconnect.
    pub const EXPIRED: u16 = 4001;
    /// The session was revoked by an administrator (by its id or its document).
    pub const REVOKED: u16 = 4003;
}

/// What an administrator revokes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revocation {
    /// Every session whose grant has this revocation id (a token's `jti`).
    Session(Arc<str>),
    /// Every session of the document.
    Document(DocumentId),
}

impl Revocation {
    /// Bus encoding: `S <id>` or `D <document id>`.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            Revocation::Session(id) => format!("S {id}").into_bytes(),
            Revocation::Document(doc) => format!("D {doc}").into_bytes(),
        }
    }

    pub fn decode(bytes: &[u8]) -> Option<Revocation> {
        let text = std::str::from_utf8(bytes).ok()?;
        match text.split_once(' ')? {
            ("S", id) if !id.is_empty() => Some(Revocation::Session(id.into())),
            ("D", doc) => DocumentId::parse(doc).ok().map(Revocation::Document),
            _ => None,
        }
    }
}

/// How long revocations are remembered, and how many.
#[derive(Debug, Clone, Copy)]
pub struct RevocationOptions {
    pub retain: Duration,
    pub max_remembered: usize,
}

impl Default for RevocationOptions {
    fn default() -> Self {
        Self {
            retain: Duration::from_hours(24),
            max_remembered: 100_000,
        }
    }
}

/// The gateway's sessions that can expire or be revoked by id, and the revocations it
/// remembers.
pub struct Registry {
    hub: Hub,
    options: RevocationOptions,
    state: Mutex<State>,
    /// Wakes the expiry task when an earlier expiry is registered.
    earlier: Arc<Notify>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    by_id: HashMap<Arc<str>, Vec<(DocumentId, u64)>>,
    expiries: BTreeMap<(Instant, u64), DocumentId>,
    /// Revoked ids, until when they are refused.
    revoked_ids: HashMap<Arc<str>, Instant>,
    /// Revoked documents: (when, unix seconds; until when it is remembered).
    revoked_docs: HashMap<DocumentId, (u64, Instant)>,
}

/// A session's entry in the [`Registry`]; removed on drop.
pub struct Registration {
    registry: Arc<Registry>,
    connection: u64,
    expires: Option<Instant>,
    id: Option<Arc<str>>,
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("connection", &self.connection)
            .finish_non_exhaustive()
    }
}

impl Registry {
    /// The registry and its expiry task (which ends with the registry).
    pub fn new(hub: Hub, options: RevocationOptions) -> Arc<Self> {
        let registry = Arc::new(Self {
            hub,
            options,
            state: Mutex::new(State::default()),
            earlier: Arc::new(Notify::new()),
        });
        tokio::spawn(expire(Arc::downgrade(&registry), registry.earlier.clone()));
        registry
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a session joined to `doc`'s channel, if its grant expires or has an id
    /// (`None` otherwise: nothing to track). Register after joining, then check
    /// [`Registry::refuses`]: a revocation is then either seen by the check or ends the session.
    pub fn register(
        self: &Arc<Self>,
        doc: &DocumentId,
        connection: u64,
        grant: &Grant,
    ) -> Option<Box<Registration>> {
        if grant.expires_at.is_none() && grant.revocation_id.is_none() {
            return None;
        }
        let expires = grant.expires_at.map(instant_of);
        let mut state = self.lock();
        if let Some(id) = &grant.revocation_id {
            state
                .by_id
                .entry(id.clone())
                .or_default()
                .push((doc.clone(), connection));
        }
        if let Some(at) = expires {
            let first = state.expiries.keys().next().map(|(t, _)| *t);
            state.expiries.insert((at, connection), doc.clone());
            if first.is_none_or(|first| at < first) {
                self.earlier.notify_one();
            }
        }
        drop(state);
        Some(Box::new(Registration {
            registry: self.clone(),
            connection,
            expires,
            id: grant.revocation_id.clone(),
        }))
    }

    /// Whether a remembered revocation refuses this grant for `doc`.
    pub fn refuses(&self, doc: &DocumentId, grant: &Grant) -> bool {
        let now = Instant::now();
        let state = self.lock();
        let by_id = grant
            .revocation_id
            .as_ref()
            .and_then(|id| state.revoked_ids.get(id))
            .is_some_and(|until| *until > now);
        let by_doc = grant.issued_at.is_some_and(|issued| {
            state
                .revoked_docs
                .get(doc)
                .is_some_and(|(at, until)| *until > now && issued <= *at)
        });
        by_id || by_doc
    }

    /// Applies a revocation that arrived from the bus: remember it, then end the sessions it
    /// concerns.
    pub fn apply(&self, revocation: &Revocation) {
        let now = Instant::now();
        let until = now + self.options.retain;
        let mut state = self.lock();
        let max = self.options.max_remembered.max(1);
        if state.revoked_ids.len() + state.revoked_docs.len() >= max {
            state.revoked_ids.retain(|_, t| *t > now);
            state.revoked_docs.retain(|_, (_, t)| *t > now);
        }
        let full = state.revoked_ids.len() + state.revoked_docs.len() >= max;
        if full {
            // Still ends the live sessions; only the memory of it is lost.
            tracing::warn!(
                max,
                "too many remembered revocations; not remembering this one"
            );
        }
        match revocation {
            Revocation::Session(id) => {
                if !full {
                    state.revoked_ids.insert(id.clone(), until);
                }
                let sessions = state.by_id.get(id).cloned().unwrap_or_default();
                drop(state);
                tracing::info!(sessions = sessions.len(), "revocation by id applied");
                for (doc, connection) in sessions {
                    self.hub.close(&doc, Some(connection), close::REVOKED);
                }
            }
            Revocation::Document(doc) => {
                if !full {
                    state.revoked_docs.insert(doc.clone(), (unix_now(), until));
                }
                drop(state);
                tracing::info!(%doc, "revocation of a document applied");
                self.hub.close(doc, None, close::REVOKED);
            }
        }
    }

    /// Sessions registered (for tests and logs).
    pub fn registered(&self) -> usize {
        self.lock().by_id.values().map(Vec::len).sum()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut state = self.registry.lock();
        if let Some(at) = self.expires {
            state.expiries.remove(&(at, self.connection));
        }
        if let Some(id) = &self.id {
            if let Some(sessions) = state.by_id.get_mut(id) {
                sessions.retain(|(_, c)| *c != self.connection);
                if sessions.is_empty() {
                    state.by_id.remove(id);
                }
            }
        }
    }
}

/// The one expiry task: sleeps until the earliest expiry, ends the sessions that are due.
async fn expire(registry: Weak<Registry>, earlier: Arc<Notify>) {
    loop {
        let Some(strong) = registry.upgrade() else {
            return;
        };
        let now = Instant::now();
        let mut due = Vec::new();
        let next = {
            let mut state = strong.lock();
            while let Some(entry) = state.expiries.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                let ((_, connection), doc) = entry.remove_entry();
                due.push((doc, connection));
            }
            state.expiries.keys().next().map(|(t, _)| *t)
        };
        for (doc, connection) in due {
            tracing::info!(connection, %doc, "session expired");
            strong.hub.close(&doc, Some(connection), close::EXPIRED);
        }
        // Wait without keeping the registry alive; re-check at least once a minute so the
        // task notices the registry is gone.
        let wake = next.map_or(now + Duration::from_mins(1), |next| {
            next.min(now + Duration::from_mins(1))
        });
        drop(strong);
        tokio::select! {
            () = tokio::time::sleep_until(wake) => {}
            () = earlier.notified() => {}
        }
    }
}

/// The monotonic instant of a unix time in seconds (now, if it is past).
fn instant_of(unix_seconds: u64) -> Instant {
    Instant::now() + Duration::from_secs(unix_seconds).saturating_sub(wall_clock())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocations_round_trip() {
        let cases = [
            Revocation::Session("abc def".into()),
            Revocation::Document(DocumentId::parse("a b/c").unwrap_or_else(|_| unreachable!())),
        ];
        for case in cases {
            assert_eq!(Revocation::decode(&case.encode()), Some(case));
        }
        assert_eq!(Revocation::decode(b"S "), None);
        assert_eq!(Revocation::decode(b"D "), None);
        assert_eq!(Revocation::decode(b"X y"), None);
    }
}
