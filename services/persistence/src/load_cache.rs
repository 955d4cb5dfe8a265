//! Documents kept in memory for loads: the active snapshot and its updates at one head sequence.
//!
//! A load reads the document's head (its sequence number and active snapshot) in its consistent
//! read transaction; when an entry is at that same head it holds exactly what the database
//! holds, because a per-document sequence number names one state. So a hit skips reading the
//! updates (a document of 10,000 updates is megabytes of rows), and a stale entry is simply
//! read again. The core keeps entries current as it commits (appending what it accepted), so a
//! document being edited stays cached; a write committed by another replica shows up as a newer
//! head and a miss. Bounded by bytes; the least recently used documents go first.

use std::collections::HashMap;
use std::sync::Mutex;

use bytes::Bytes;
use secsync_protocol::{Clock, DocumentId, SnapshotId};

use crate::backend::StoredUpdate;

/// Rough per-entry and per-update overhead beyond the bodies, for the byte budget.
const ENTRY_OVERHEAD: usize = 256;
const UPDATE_OVERHEAD: usize = 96;

/// A message a commit accepted, in sequence order.
#[derive(Debug, Clone, Copy)]
pub enum Accepted<'a> {
    Snapshot {
        id: &'a SnapshotId,
        body: &'a str,
    },
    Update {
        snapshot: &'a SnapshotId,
        pub_key: &'a str,
        clock: Clock,
        body: &'a str,
    },
}

/// What a hit returns: the snapshot body (when asked for) and the selected update bodies, as
/// shared bytes (a hit copies no body, whatever the document's size).
pub type Hit = (Option<Bytes>, Vec<Bytes>);

#[derive(Debug)]
struct Entry {
    head_seq: u64,
    active: SnapshotId,
    /// `None` until a load that included the snapshot read it.
    snapshot: Option<Bytes>,
    updates: Vec<StoredUpdate>,
    bytes: usize,
    used: u64,
}

impl Entry {
    fn measure(&mut self) {
        self.bytes = ENTRY_OVERHEAD
            + self.snapshot.as_ref().map_or(0, Bytes::len)
            + self.updates.iter().map(update_bytes).sum::<usize>();
    }

    /// Appends an update, counting it (a commit must not walk a large document's updates).
    fn push(&mut self, update: StoredUpdate) {
        self.bytes += update_bytes(&update);
        self.updates.push(update);
    }
}

fn update_bytes(update: &StoredUpdate) -> usize {
    update.body.len() + update.pub_key.len() + UPDATE_OVERHEAD
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<DocumentId, Entry>,
    bytes: usize,
    tick: u64,
}

/// The cache. `budget` 0 disables it.
#[derive(Debug)]
pub struct LoadCache {
    budget: usize,
    state: Mutex<State>,
}

impl LoadCache {
    pub fn new(budget: usize) -> Self {
        Self {
            budget,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The active snapshot's body (if `want_snapshot`) and its updates that `select` keeps, in
    /// version order, when the entry is at `head_seq` with `active`; `None` on a miss.
    pub fn get(
        &self,
        doc: &DocumentId,
        head_seq: u64,
        active: &SnapshotId,
        want_snapshot: bool,
        select: impl Fn(&str, Clock) -> bool,
    ) -> Option<Hit> {
        if self.budget == 0 {
            return None;
        }
        let mut state = self.lock();
        state.tick += 1;
        let tick = state.tick;
        let entry = state.entries.get_mut(doc)?;
        if entry.head_seq != head_seq || entry.active != *active {
            return None;
        }
        let snapshot = if want_snapshot {
            Some(entry.snapshot.clone()?)
        } else {
            None
        };
        entry.used = tick;
        let updates = entry
            .updates
            .iter()
            .filter(|u| select(&u.pub_key, u.clock))
            .map(|u| u.body.clone())
            .collect();
        Some((snapshot, updates))
    }

    /// Remembers what a load read at `head_seq`, unless a newer state is cached already.
    pub fn put(
        &self,
        doc: &DocumentId,
        head_seq: u64,
        active: &SnapshotId,
        snapshot: Option<&Bytes>,
        updates: &[StoredUpdate],
    ) {
        if self.budget == 0 {
            return;
        }
        let mut state = self.lock();
        let snapshot = match state.entries.get(doc) {
            Some(existing) if existing.head_seq > head_seq => return,
            // Same state: keep a snapshot body read earlier when this load skipped it.
            Some(existing) if existing.head_seq == head_seq && snapshot.is_none() => {
                existing.snapshot.clone()
            }
            _ => snapshot.cloned(),
        };
        state.tick += 1;
        let mut entry = Entry {
            head_seq,
            active: active.clone(),
            snapshot,
            updates: updates.to_vec(),
            bytes: 0,
            used: state.tick,
        };
        entry.measure();
        insert(&mut state, doc.clone(), entry, self.budget);
    }

    /// A commit moved `doc` from `from_seq` to `to_seq` by accepting `accepted` (in sequence
    /// order): an entry at `from_seq` follows; any other entry is dropped.
    pub fn advance<'a>(
        &self,
        doc: &DocumentId,
        from_seq: u64,
        to_seq: u64,
        accepted: impl IntoIterator<Item = Accepted<'a>>,
    ) {
        if self.budget == 0 {
            return;
        }
        let mut state = self.lock();
        let Some(mut entry) = state.entries.remove(doc) else {
            return;
        };
        state.bytes -= entry.bytes;
        if entry.head_seq != from_seq {
            return;
        }
        for message in accepted {
            match message {
                Accepted::Snapshot { id, body } => {
                    entry.active = id.clone();
                    entry.snapshot = Some(Bytes::copy_from_slice(body.as_bytes()));
                    entry.updates.clear();
                    entry.measure();
                }
                Accepted::Update {
                    snapshot,
                    pub_key,
                    clock,
                    body,
                } => {
                    if *snapshot != entry.active {
                        // The rules accept updates of the active snapshot only; anything else
                        // means this entry is not what the commit saw.
                        return;
                    }
                    entry.push(StoredUpdate {
                        pub_key: pub_key.to_owned(),
                        clock,
                        body: Bytes::copy_from_slice(body.as_bytes()),
                    });
                }
            }
        }
        entry.head_seq = to_seq;
        insert(&mut state, doc.clone(), entry, self.budget);
    }
}

/// Inserts `entry`, then evicts the least recently used entries while over `budget` (an entry
/// larger than the whole budget is not kept).
fn insert(state: &mut State, doc: DocumentId, entry: Entry, budget: usize) {
    if entry.bytes > budget {
        if let Some(old) = state.entries.remove(&doc) {
            state.bytes -= old.bytes;
        }
        return;
    }
    state.bytes += entry.bytes;
    if let Some(old) = state.entries.insert(doc, entry) {
        state.bytes -= old.bytes;
    }
    while state.bytes > budget {
        let Some(oldest) = state
            .entries
            .iter()
            .min_by_key(|(_, e)| e.used)
            .map(|(d, _)| d.clone())
        else {
            break;
        };
        if let Some(old) = state.entries.remove(&oldest) {
            state.bytes -= old.bytes;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn doc(id: &str) -> DocumentId {
        DocumentId::parse(id).unwrap()
    }

    fn snap(id: &str) -> SnapshotId {
        SnapshotId::parse(id).unwrap()
    }

    fn update(key: &str, clock: u64) -> StoredUpdate {
        StoredUpdate {
            pub_key: key.into(),
            clock: Clock::new(clock).unwrap(),
            body: format!("{key}{clock}").into(),
        }
    }

    const ALL: fn(&str, Clock) -> bool = |_, _| true;

    #[test]
    fn hits_only_at_the_same_head_and_snapshot() {
        let cache = LoadCache::new(1 << 20);
        let (d, s) = (doc("d"), snap("S1"));
        cache.put(
            &d,
            3,
            &s,
            Some(&"snap".into()),
            &[update("a", 0), update("b", 0)],
        );
        let (snapshot, updates) = cache.get(&d, 3, &s, true, ALL).unwrap();
        assert_eq!(snapshot.as_deref(), Some("snap".as_bytes()));
        assert_eq!(updates, ["a0", "b0"]);
        assert!(cache.get(&d, 4, &s, false, ALL).is_none());
        assert!(cache.get(&d, 3, &snap("S2"), false, ALL).is_none());
        assert!(cache.get(&doc("other"), 3, &s, false, ALL).is_none());
        let only_b = cache.get(&d, 3, &s, false, |k, _| k == "b").unwrap();
        assert_eq!(only_b, (None, vec![Bytes::from("b0")]));
    }

    #[test]
    fn a_load_without_the_snapshot_cannot_serve_one_that_needs_it() {
        let cache = LoadCache::new(1 << 20);
        let (d, s) = (doc("d"), snap("S1"));
        cache.put(&d, 1, &s, None, &[]);
        assert!(cache.get(&d, 1, &s, true, ALL).is_none());
        assert!(cache.get(&d, 1, &s, false, ALL).is_some());
        cache.put(&d, 1, &s, Some(&"snap".into()), &[]);
        cache.put(&d, 1, &s, None, &[]);
        assert_eq!(
            cache.get(&d, 1, &s, true, ALL).unwrap().0.as_deref(),
            Some("snap".as_bytes())
        );
    }

    #[test]
    fn commits_advance_a_current_entry_and_drop_a_stale_one() {
        let cache = LoadCache::new(1 << 20);
        let (d, s1, s2) = (doc("d"), snap("S1"), snap("S2"));
        cache.put(&d, 2, &s1, Some(&"one".into()), &[update("a", 0)]);
        let accepted = [
            Accepted::Update {
                snapshot: &s1,
                pub_key: "a",
                clock: Clock::new(1).unwrap(),
                body: "a1",
            },
            Accepted::Snapshot {
                id: &s2,
                body: "two",
            },
            Accepted::Update {
                snapshot: &s2,
                pub_key: "b",
                clock: Clock::new(0).unwrap(),
                body: "b0",
            },
        ];
        cache.advance(&d, 2, 5, accepted);
        let (snapshot, updates) = cache.get(&d, 5, &s2, true, ALL).unwrap();
        assert_eq!(
            (snapshot.as_deref(), updates),
            (Some("two".as_bytes()), vec![Bytes::from("b0")])
        );
        // Counted as it grew: the same bytes as measuring the entry afresh.
        let counted = cache.lock().entries[&d].bytes;
        let mut fresh = Entry {
            head_seq: 5,
            active: s2.clone(),
            snapshot: Some("two".into()),
            updates: vec![update("b", 0)],
            bytes: 0,
            used: 0,
        };
        fresh.measure();
        assert_eq!((counted, cache.lock().bytes), (fresh.bytes, fresh.bytes));
        // A commit from a head the entry is not at (another replica wrote in between).
        cache.advance(&d, 7, 8, []);
        assert!(cache.get(&d, 5, &s2, false, ALL).is_none());
    }

    #[test]
    fn an_older_load_never_replaces_a_newer_entry() {
        let cache = LoadCache::new(1 << 20);
        let (d, s) = (doc("d"), snap("S1"));
        cache.put(&d, 5, &s, None, &[update("a", 0)]);
        cache.put(&d, 4, &s, None, &[]);
        assert!(cache.get(&d, 5, &s, false, ALL).is_some());
        assert!(cache.get(&d, 4, &s, false, ALL).is_none());
    }

    #[test]
    fn stays_within_its_budget_evicting_the_least_recently_used() {
        let s = snap("S1");
        let one = ENTRY_OVERHEAD + 1000;
        let cache = LoadCache::new(one * 2 + 10);
        let body = Bytes::from("x".repeat(1000));
        for name in ["a", "b"] {
            cache.put(&doc(name), 1, &s, Some(&body), &[]);
        }
        assert!(cache.get(&doc("a"), 1, &s, true, ALL).is_some());
        cache.put(&doc("c"), 1, &s, Some(&body), &[]);
        assert!(
            cache.get(&doc("b"), 1, &s, true, ALL).is_none(),
            "b was least recent"
        );
        assert!(cache.get(&doc("a"), 1, &s, true, ALL).is_some());
        assert!(cache.get(&doc("c"), 1, &s, true, ALL).is_some());
        assert!(cache.lock().bytes <= one * 2 + 10);
        // Larger than the budget: not kept.
        cache.put(&doc("huge"), 1, &s, Some(&"x".repeat(10_000).into()), &[]);
        assert!(cache.get(&doc("huge"), 1, &s, true, ALL).is_none());
        let disabled = LoadCache::new(0);
        disabled.put(&doc("a"), 1, &s, None, &[]);
        assert!(disabled.get(&doc("a"), 1, &s, false, ALL).is_none());
    }
}
