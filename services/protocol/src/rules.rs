//! The server's validation rules as pure functions over a small document state.
//!
//! Every store (Postgres, SQLite) loads a [`DocumentState`] under its per-document lock, asks
//! [`DocumentState::accept_snapshot`] / [`DocumentState::accept_update`] for each message in
//! order, writes what was accepted and commits. No rule of PROTOCOL.md 6.1, 6.2, 6.4, 6.5 or 7.10
//! lives anywhere else; the database constraints only back them up.

use std::collections::BTreeMap;

use crate::crypto::{parent_snapshot_proof, ProofEntry, INITIAL_PARENT_SNAPSHOT_PROOF};
use crate::error::Reason;
use crate::ids::{Clock, SnapshotId};
use crate::message::{SnapshotMessage, UpdateMessage};

/// Per author (public key text), a clock.
pub type Clocks = BTreeMap<String, Clock>;

/// What the rules need to know about a document's active snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveSnapshot {
    pub id: SnapshotId,
    pub ciphertext_hash: String,
    pub parent_snapshot_proof: String,
    /// Per author, the highest clock accepted on this snapshot.
    pub clocks: Clocks,
    /// Number of updates accepted on this snapshot; versions run 1..=update_count.
    pub update_count: u64,
}

impl ActiveSnapshot {
    /// The snapshot as an entry of a proof chain.
    pub fn proof_entry(&self) -> ProofEntry {
        ProofEntry {
            snapshot_id: self.id.clone(),
            parent_snapshot_proof: self.parent_snapshot_proof.clone(),
            snapshot_ciphertext_hash: self.ciphertext_hash.clone(),
        }
    }
}

/// A document as the rules see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DocumentState {
    pub active: Option<ActiveSnapshot>,
}

/// Rule switches a deployment may choose.
#[derive(Debug, Clone, Copy)]
pub struct RuleOptions {
    /// Check `parentSnapshotProof` of every new snapshot (PROTOCOL.md 7.10).
    pub verify_parent_proof: bool,
}

impl Default for RuleOptions {
    fn default() -> Self {
        Self {
            verify_parent_proof: true,
        }
    }
}

impl DocumentState {
    /// Checks a snapshot against the state without changing it.
    pub fn check_snapshot(
        &self,
        msg: &SnapshotMessage,
        options: RuleOptions,
    ) -> Result<(), Reason> {
        let Some(active) = &self.active else {
            let is_initial = msg.parent_snapshot_id.is_none()
                && msg.parent_snapshot_update_clocks.is_empty()
                && msg.parent_snapshot_proof == INITIAL_PARENT_SNAPSHOT_PROOF;
            if options.verify_parent_proof && !is_initial {
                return Err(Reason::SnapshotInvalidProof);
            }
            return Ok(());
        };
        if msg.parent_snapshot_id.as_ref() != Some(&active.id) {
            return Err(Reason::SnapshotOutdated);
        }
        if msg.parent_snapshot_update_clocks != active.clocks {
            return Err(Reason::SnapshotMissesUpdates);
        }
        if options.verify_parent_proof
            && msg.parent_snapshot_proof != active.proof_entry().child_proof()
        {
            return Err(Reason::SnapshotInvalidProof);
        }
        Ok(())
    }

    /// Checks a snapshot and, when it is accepted, makes it the active snapshot.
    pub fn accept_snapshot(
        &mut self,
        msg: &SnapshotMessage,
        ciphertext_hash: String,
        options: RuleOptions,
    ) -> Result<(), Reason> {
        self.check_snapshot(msg, options)?;
        self.active = Some(ActiveSnapshot {
            id: msg.snapshot_id.clone(),
            ciphertext_hash,
            parent_snapshot_proof: msg.parent_snapshot_proof.clone(),
            clocks: Clocks::new(),
            update_count: 0,
        });
        Ok(())
    }

    /// Checks an update and returns the version it would get.
    pub fn check_update(&self, msg: &UpdateMessage) -> Result<u64, Reason> {
        let active = self.active.as_ref().ok_or(Reason::UpdateNoActiveSnapshot)?;
        if msg.ref_snapshot_id != active.id {
            return Err(Reason::UpdateNotActiveSnapshot);
        }
        let expected = match active.clocks.get(msg.signed.pub_key().as_str()) {
            Some(last) => last.next(),
            None => Some(Clock::ZERO),
        };
        if expected != Some(msg.clock) {
            return Err(Reason::UpdateWrongClock);
        }
        Ok(active.update_count + 1)
    }

    /// Checks an update and, when it is accepted, records its clock; returns its version.
    pub fn accept_update(&mut self, msg: &UpdateMessage) -> Result<u64, Reason> {
        let version = self.check_update(msg)?;
        if let Some(active) = self.active.as_mut() {
            active
                .clocks
                .insert(msg.signed.pub_key().as_str().to_owned(), msg.clock);
            active.update_count = version;
        }
        Ok(version)
    }
}

/// `compareUpdateClocks(server, client)` of secsync: equal, and for every server author whose
/// clock differs, the client's clock (0 when the client has none).
pub fn compare_update_clocks(server: &Clocks, client: &Clocks) -> (bool, Clocks) {
    let missing: Clocks = server
        .iter()
        .filter(|(key, clock)| client.get(*key) != Some(clock))
        .map(|(key, _)| (key.clone(), client.get(key).copied().unwrap_or(Clock::ZERO)))
        .collect();
    (server == client, missing)
}

/// The `mode` query parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadMode {
    #[default]
    Complete,
    Delta,
}

impl LoadMode {
    /// Anything but `delta` means `complete`, as in the reference.
    pub fn parse(value: Option<&str>) -> Self {
        if value == Some("delta") {
            LoadMode::Delta
        } else {
            LoadMode::Complete
        }
    }
}

/// What a connecting client says it already has.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadRequest {
    pub mode: LoadMode,
    pub known_snapshot_id: Option<SnapshotId>,
    /// Absent or unparseable clocks are empty.
    pub known_clocks: Clocks,
}

/// Which updates of the active snapshot a load returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateSelection {
    All,
    /// Those the client lacks: clock above its known clock, or an author it does not know.
    After(Clocks),
}

impl UpdateSelection {
    pub fn wants(&self, author: &str, clock: Clock) -> bool {
        match self {
            UpdateSelection::All => true,
            UpdateSelection::After(known) => known.get(author).is_none_or(|k| clock > *k),
        }
    }
}

/// The `snapshotProofChain` field of a load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainPlan {
    /// No field at all (delta load of the active snapshot).
    Omit,
    /// `[]`.
    Empty,
    /// Every snapshot of the document after this one, ending with the active one (6.5).
    From(SnapshotId),
}

/// How to answer a load (PROTOCOL.md 6.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadPlan {
    pub include_snapshot: bool,
    pub updates: UpdateSelection,
    pub chain: ChainPlan,
}

/// Plans the `document` frame for a request, given the document's active snapshot.
pub fn plan_load(active: Option<&SnapshotId>, request: &LoadRequest) -> LoadPlan {
    let Some(active) = active else {
        return LoadPlan {
            include_snapshot: false,
            updates: UpdateSelection::All,
            chain: ChainPlan::Empty,
        };
    };
    match (&request.known_snapshot_id, request.mode) {
        (Some(known), LoadMode::Delta) if known == active => LoadPlan {
            include_snapshot: false,
            updates: UpdateSelection::After(request.known_clocks.clone()),
            chain: ChainPlan::Omit,
        },
        // `complete` with the active snapshot known: resend everything, the client restarts
        // that snapshot's clocks (the safer choice of 6.4).
        (Some(known), LoadMode::Complete) if known == active => LoadPlan {
            include_snapshot: true,
            updates: UpdateSelection::All,
            chain: ChainPlan::Empty,
        },
        (Some(known), _) => LoadPlan {
            include_snapshot: true,
            updates: UpdateSelection::All,
            chain: ChainPlan::From(known.clone()),
        },
        (None, _) => LoadPlan {
            include_snapshot: true,
            updates: UpdateSelection::All,
            chain: ChainPlan::Empty,
        },
    }
}

/// The chain after `known` given all of a document's snapshots in acceptance order; empty when
/// `known` is not one of them.
pub fn proof_chain_after(snapshots_in_order: &[ProofEntry], known: &SnapshotId) -> Vec<ProofEntry> {
    snapshots_in_order
        .iter()
        .position(|entry| &entry.snapshot_id == known)
        .map(|i| snapshots_in_order[i + 1..].to_vec())
        .unwrap_or_default()
}

/// Checks that a new snapshot's proof follows from its parent (PROTOCOL.md 2.6).
pub fn is_valid_parent(child_proof: &str, child_parent_id: &str, parent: &ProofEntry) -> bool {
    child_parent_id == parent.snapshot_id.as_str()
        && child_proof
            == parent_snapshot_proof(
                &parent.parent_snapshot_proof,
                parent.snapshot_id.as_str(),
                &parent.snapshot_ciphertext_hash,
            )
}
