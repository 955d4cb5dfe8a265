//! The client's document state and the rules it applies to what it receives, without I/O.
//!
//! This is the part of the JS client's `processQueues` that decides what to accept: the active
//! snapshot (id, its `parentSnapshotProof`, its ciphertext hash) with the per-author clocks of
//! its updates, the client's own next clock, and the checks on incoming snapshots (proof chain,
//! direct parent, own clock) and updates (active snapshot, clock exactly last + 1). Errors carry
//! the JS client's `SECSYNC_ERROR_…` codes, and [`SyncError::is_fatal`] says which ones stop
//! the JS client outside a document load (during a load every error is fatal).
//!
//! [`crate::client`] drives this from the WebSocket; keeping it pure lets the vector tests check
//! the same code the client runs.

use std::collections::BTreeMap;

use secsync_protocol::crypto::{verify_proof_chain, ProofEntry};
use secsync_protocol::{Clock, DocumentId, LoadMode, ParseOptions, PublicKey, Reason, SnapshotId};

use crate::crypto::DocumentKey;
use crate::frames::{self, OpenError, VerifiedSnapshot};

/// Per author (public key text) the highest clock seen on one snapshot.
pub type Clocks = BTreeMap<String, Clock>;

/// A snapshot the client holds, with the clocks of the updates it has applied on it: what the
/// JS client calls a `knownSnapshotInfo` (and passes back to resume a document).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownSnapshot {
    pub info: ProofEntry,
    pub update_clocks: Clocks,
}

impl KnownSnapshot {
    pub fn new(info: ProofEntry) -> Self {
        Self {
            info,
            update_clocks: Clocks::new(),
        }
    }

    pub fn snapshot_id(&self) -> &SnapshotId {
        &self.info.snapshot_id
    }
}

/// Why a received snapshot, update or ephemeral message was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    #[error("document load: updates without a snapshot in complete mode (SECSYNC_ERROR_100)")]
    UpdatesWithoutSnapshot,
    #[error("snapshot malformed: {0} (SECSYNC_ERROR_110)")]
    SnapshotMalformed(String),
    #[error("snapshot signature invalid (SECSYNC_ERROR_111)")]
    SnapshotSignature,
    #[error("snapshot is not a child of the known snapshot (SECSYNC_ERROR_112)")]
    SnapshotParent,
    #[error("snapshot belongs to another document (SECSYNC_ERROR_113)")]
    SnapshotWrongDocument,
    #[error("snapshot proof chain does not lead from the known snapshot (SECSYNC_ERROR_115)")]
    SnapshotChain,
    #[error("snapshot does not include this client's confirmed clock (SECSYNC_ERROR_102)")]
    SnapshotOwnClock,
    #[error("snapshot decryption failed (SECSYNC_ERROR_101)")]
    SnapshotDecryption,
    #[error("update malformed: {0} (SECSYNC_ERROR_211)")]
    UpdateMalformed(String),
    #[error("update signature invalid (SECSYNC_ERROR_212)")]
    UpdateSignature,
    /// Ours: the JS client does not compare an update's `docId` with its document.
    #[error("update belongs to another document")]
    UpdateWrongDocument,
    #[error("update does not reference the active snapshot (SECSYNC_ERROR_213)")]
    UpdateNotActiveSnapshot,
    #[error("update clock already applied (SECSYNC_ERROR_214)")]
    UpdateDuplicate,
    #[error("update clock skips one or more clocks (SECSYNC_ERROR_202)")]
    UpdateClockGap,
    #[error("update decryption failed (SECSYNC_ERROR_201)")]
    UpdateDecryption,
    #[error("ephemeral message malformed (SECSYNC_ERROR_307)")]
    EphemeralMalformed,
    #[error("ephemeral message signature invalid (SECSYNC_ERROR_308)")]
    EphemeralSignature,
    #[error("ephemeral message decryption failed (SECSYNC_ERROR_301)")]
    EphemeralDecryption,
    #[error("ephemeral message from a session without proof (SECSYNC_ERROR_302)")]
    EphemeralNoSession,
    #[error("ephemeral message counter not increasing (SECSYNC_ERROR_303)")]
    EphemeralReplay,
    #[error("ephemeral message of unknown type (SECSYNC_ERROR_305)")]
    EphemeralUnknownType,
}

impl SyncError {
    /// The JS client's error code (`SECSYNC_ERROR_…`), `None` for checks it does not make.
    pub fn code(&self) -> Option<&'static str> {
        Some(match self {
            SyncError::UpdatesWithoutSnapshot => "SECSYNC_ERROR_100",
            SyncError::SnapshotMalformed(_) => "SECSYNC_ERROR_110",
            SyncError::SnapshotSignature => "SECSYNC_ERROR_111",
            SyncError::SnapshotParent => "SECSYNC_ERROR_112",
            SyncError::SnapshotWrongDocument => "SECSYNC_ERROR_113",
            SyncError::SnapshotChain => "SECSYNC_ERROR_115",
            SyncError::SnapshotOwnClock => "SECSYNC_ERROR_102",
            SyncError::SnapshotDecryption => "SECSYNC_ERROR_101",
            SyncError::UpdateMalformed(_) => "SECSYNC_ERROR_211",
            SyncError::UpdateSignature => "SECSYNC_ERROR_212",
            SyncError::UpdateWrongDocument => return None,
            SyncError::UpdateNotActiveSnapshot => "SECSYNC_ERROR_213",
            SyncError::UpdateDuplicate => "SECSYNC_ERROR_214",
            SyncError::UpdateClockGap => "SECSYNC_ERROR_202",
            SyncError::UpdateDecryption => "SECSYNC_ERROR_201",
            SyncError::EphemeralMalformed => "SECSYNC_ERROR_307",
            SyncError::EphemeralSignature => "SECSYNC_ERROR_308",
            SyncError::EphemeralDecryption => "SECSYNC_ERROR_301",
            SyncError::EphemeralNoSession => "SECSYNC_ERROR_302",
            SyncError::EphemeralReplay => "SECSYNC_ERROR_303",
            SyncError::EphemeralUnknownType => "SECSYNC_ERROR_305",
        })
    }

    /// Whether the JS client stops for good on this error after the document load (it ignores
    /// the others and goes on). During the `document` load every error is fatal.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            SyncError::UpdatesWithoutSnapshot
                | SyncError::SnapshotOwnClock
                | SyncError::SnapshotDecryption
                | SyncError::UpdateClockGap
                | SyncError::UpdateDecryption
        )
    }

    fn from_snapshot_open(error: OpenError) -> Self {
        match error {
            OpenError::Malformed(reason) => SyncError::SnapshotMalformed(reason.code().into()),
            OpenError::WrongKind(_) => SyncError::SnapshotMalformed(Reason::BadShape.code().into()),
            OpenError::BadSignature => SyncError::SnapshotSignature,
            OpenError::WrongDocument => SyncError::SnapshotWrongDocument,
            OpenError::Decrypt(_) => SyncError::SnapshotDecryption,
        }
    }

    fn from_update_open(error: OpenError) -> Self {
        match error {
            OpenError::Malformed(reason) => SyncError::UpdateMalformed(reason.code().into()),
            OpenError::WrongKind(_) => SyncError::UpdateMalformed(Reason::BadShape.code().into()),
            OpenError::BadSignature => SyncError::UpdateSignature,
            OpenError::WrongDocument => SyncError::UpdateWrongDocument,
            OpenError::Decrypt(_) => SyncError::UpdateDecryption,
        }
    }
}

/// Something the client received and decrypted, in the order it was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A snapshot became the active snapshot: apply its full state (Yjs: `applyUpdateV2`).
    Snapshot {
        snapshot_id: SnapshotId,
        author: PublicKey,
        plaintext: Vec<u8>,
    },
    /// An update of the active snapshot: apply its changes.
    Change {
        snapshot_id: SnapshotId,
        author: PublicKey,
        clock: Clock,
        plaintext: Vec<u8>,
    },
    /// The content of an ephemeral message from a peer whose session was proven.
    Ephemeral { author: PublicKey, content: Vec<u8> },
    /// A server frame of a type the protocol does not define (`invalid-message` and custom
    /// types), as the JS client's `onCustomMessage` would see it.
    Custom { text: String },
}

/// The JS client's clock rule for an update (`verifyAndDecryptUpdate`): it must reference the
/// active snapshot (`213`), be above the author's last clock (`214`, a duplicate, ignored live)
/// and be exactly last + 1 (`202`, a gap, fatal). `last` is `None` when the author has no
/// update on the active snapshot yet (the JS client's `-1`).
pub fn check_update_clock(
    active: Option<&SnapshotId>,
    last: Option<Clock>,
    ref_snapshot_id: &SnapshotId,
    clock: Clock,
) -> Result<(), SyncError> {
    if active != Some(ref_snapshot_id) {
        return Err(SyncError::UpdateNotActiveSnapshot);
    }
    let expected = last.map_or(0, |c| c.get() + 1);
    if clock.get() < expected {
        return Err(SyncError::UpdateDuplicate);
    }
    if clock.get() != expected {
        return Err(SyncError::UpdateClockGap);
    }
    Ok(())
}

/// The client's view of its document.
#[derive(Debug, Clone)]
pub struct SyncState {
    doc_id: DocumentId,
    own: PublicKey,
    parse: ParseOptions,
    active: Option<KnownSnapshot>,
    /// Clock of this client's last sent update on the active snapshot (the JS client's
    /// `_updatesLocalClock`, `None` = -1).
    local_clock: Option<Clock>,
}

impl SyncState {
    /// A fresh state. Resuming in `delta` mode starts from the known snapshot and its clocks
    /// (the JS client does the same); in `complete` mode the known snapshot only serves to
    /// check what the server sends.
    pub fn new(
        doc_id: DocumentId,
        own: PublicKey,
        parse: ParseOptions,
        known: Option<&KnownSnapshot>,
        mode: LoadMode,
    ) -> Self {
        let mut state = Self {
            doc_id,
            own,
            parse,
            active: None,
            local_clock: None,
        };
        if mode == LoadMode::Delta {
            state.active = known.cloned();
        }
        state.reset_local_clock();
        state
    }

    pub fn doc_id(&self) -> &DocumentId {
        &self.doc_id
    }

    pub fn own_key(&self) -> &PublicKey {
        &self.own
    }

    pub fn active(&self) -> Option<&KnownSnapshot> {
        self.active.as_ref()
    }

    /// This client's confirmed clock on the active snapshot.
    pub fn confirmed_clock(&self) -> Option<Clock> {
        self.active
            .as_ref()
            .and_then(|a| a.update_clocks.get(self.own.as_str()).copied())
    }

    /// Clock of the last update this client sent on the active snapshot.
    pub fn local_clock(&self) -> Option<Clock> {
        self.local_clock
    }

    fn reset_local_clock(&mut self) {
        // The JS client restarts at -1 and learns its clock from a failure; starting from the
        // confirmed clock avoids that needless round trip when resuming.
        self.local_clock = self.confirmed_clock();
    }

    /// Applies the first frame, `document` (PROTOCOL.md 5.1). Every error is fatal here.
    pub fn apply_document(
        &mut self,
        snapshot: Option<&str>,
        updates: &[String],
        chain: Option<&[secsync_protocol::ProofEntry]>,
        mode: LoadMode,
        known: Option<&KnownSnapshot>,
        key: &DocumentKey,
    ) -> Result<Vec<Event>, SyncError> {
        if mode != LoadMode::Delta && snapshot.is_none() && !updates.is_empty() {
            return Err(SyncError::UpdatesWithoutSnapshot);
        }
        let mut events = Vec::new();
        if let Some(text) = snapshot {
            let verified = self.verify_snapshot(text)?;
            let info = verified.info();
            if known.is_some_and(|k| k.info == info) {
                // Already held: not applied again. In complete mode the server resends all of
                // its updates, so its clocks restart (PROTOCOL.md 6.4); in delta mode the known
                // clocks stay.
                if self.active.as_ref().map(|a| &a.info) != Some(&info) {
                    self.active = Some(KnownSnapshot::new(info));
                }
            } else if let Some(event) =
                self.check_and_apply_snapshot(&verified, chain.unwrap_or(&[]), known, key)?
            {
                events.push(event);
            }
        }
        for text in updates {
            events.push(self.apply_update(text, key)?);
        }
        self.reset_local_clock();
        Ok(events)
    }

    /// A `snapshot` broadcast: must be a direct child of the active snapshot that includes this
    /// client's confirmed clock.
    pub fn apply_live_snapshot(
        &mut self,
        text: &str,
        key: &DocumentKey,
    ) -> Result<Option<Event>, SyncError> {
        let verified = self.verify_snapshot(text)?;
        let known = self.active.clone();
        if known.as_ref().is_some_and(|k| k.info == verified.info()) {
            return Ok(None);
        }
        self.check_and_apply_snapshot(&verified, &[], known.as_ref(), key)
    }

    /// The recovery data of a `snapshot-save-failed`: the active snapshot (checked against ours,
    /// through `chain` when given) and updates. Returns what was applied and every error met,
    /// in order (already applied updates are skipped silently); the caller decides which are fatal
    /// ([`SyncError::is_fatal`]).
    pub fn apply_recovery(
        &mut self,
        snapshot: Option<&str>,
        updates: Option<&[String]>,
        chain: Option<&[ProofEntry]>,
        key: &DocumentKey,
    ) -> (Vec<Event>, Vec<SyncError>) {
        let mut events = Vec::new();
        let mut errors = Vec::new();
        if let Some(text) = snapshot {
            let known = self.active.clone();
            let result = self.verify_snapshot(text).and_then(|verified| {
                if known.as_ref().is_some_and(|k| k.info == verified.info()) {
                    return Ok(None);
                }
                self.check_and_apply_snapshot(&verified, chain.unwrap_or(&[]), known.as_ref(), key)
            });
            match result {
                Ok(event) => events.extend(event),
                Err(e) => errors.push(e),
            }
        }
        // Updates are checked against the active snapshot: when the carried snapshot was not
        // accepted, updates referencing it fail with 213 instead of being applied to a snapshot
        // we do not hold (the JS client would apply their content anyway).
        for text in updates.unwrap_or(&[]) {
            match self.apply_update(text, key) {
                Ok(event) => events.push(event),
                // Recovery data carries all updates of the active snapshot; the ones already
                // applied are expected, not errors.
                Err(SyncError::UpdateDuplicate) => {}
                Err(e) => errors.push(e),
            }
        }
        (events, errors)
    }

    fn verify_snapshot(&self, text: &str) -> Result<VerifiedSnapshot, SyncError> {
        frames::verify_snapshot(text, &self.doc_id, self.parse)
            .map_err(SyncError::from_snapshot_open)
    }

    /// `processSnapshot` after parsing: the chain or direct-parent check against `known`, the own
    /// clock check, decryption, then the snapshot becomes active with empty clocks.
    fn check_and_apply_snapshot(
        &mut self,
        verified: &VerifiedSnapshot,
        chain: &[ProofEntry],
        known: Option<&KnownSnapshot>,
        key: &DocumentKey,
    ) -> Result<Option<Event>, SyncError> {
        let info = verified.info();
        if let Some(known) = known {
            if chain.is_empty() {
                let msg = &verified.0;
                if msg.parent_snapshot_id.as_ref() != Some(&known.info.snapshot_id)
                    || msg.parent_snapshot_proof != known.info.child_proof()
                {
                    return Err(SyncError::SnapshotParent);
                }
                if let Some(own_clock) = known.update_clocks.get(self.own.as_str()) {
                    if msg.parent_snapshot_update_clocks.get(self.own.as_str()) != Some(own_clock) {
                        return Err(SyncError::SnapshotOwnClock);
                    }
                }
            } else if !verify_proof_chain(&known.info, &info, chain) {
                return Err(SyncError::SnapshotChain);
            }
        }
        let plaintext = verified
            .decrypt(key)
            .map_err(|_| SyncError::SnapshotDecryption)?;
        self.active = Some(KnownSnapshot::new(info.clone()));
        self.local_clock = None;
        Ok(Some(Event::Snapshot {
            snapshot_id: info.snapshot_id,
            author: verified.author().clone(),
            plaintext,
        }))
    }

    /// An update (live, in `document` or in recovery data) on the active snapshot.
    pub fn apply_update(&mut self, text: &str, key: &DocumentKey) -> Result<Event, SyncError> {
        let verified = frames::verify_update(text, &self.doc_id, self.parse)
            .map_err(SyncError::from_update_open)?;
        let author = verified.author().clone();
        let clock = verified.clock();
        let last = self
            .active
            .as_ref()
            .and_then(|a| a.update_clocks.get(author.as_str()).copied());
        check_update_clock(
            self.active.as_ref().map(KnownSnapshot::snapshot_id),
            last,
            verified.ref_snapshot_id(),
            clock,
        )?;
        let plaintext = verified
            .decrypt(key)
            .map_err(|_| SyncError::UpdateDecryption)?;
        if let Some(active) = self.active.as_mut() {
            active
                .update_clocks
                .insert(author.as_str().to_owned(), clock);
        }
        if author == self.own {
            self.local_clock = Some(clock);
        }
        Ok(Event::Change {
            snapshot_id: verified.ref_snapshot_id().clone(),
            author,
            clock,
            plaintext,
        })
    }

    /// Reserves the clock of the next update this client sends (`_updatesLocalClock + 1`).
    /// `None` without an active snapshot: the first change of a document is a snapshot.
    pub fn next_update(&mut self) -> Option<(SnapshotId, Clock)> {
        let active = self.active.as_ref()?.info.snapshot_id.clone();
        let clock = match self.local_clock {
            None => Clock::ZERO,
            Some(c) => c.next()?,
        };
        self.local_clock = Some(clock);
        Some((active, clock))
    }

    /// `update-saved`: records the own confirmed clock (only ever raising it).
    pub fn on_update_saved(&mut self, snapshot_id: &SnapshotId, clock: Clock) {
        if let Some(active) = self
            .active
            .as_mut()
            .filter(|a| &a.info.snapshot_id == snapshot_id)
        {
            let entry = active
                .update_clocks
                .entry(self.own.as_str().to_owned())
                .or_insert(clock);
            *entry = (*entry).max(clock);
        }
    }

    /// `update-save-failed`: the next update restarts after the confirmed clock.
    pub fn on_update_save_failed(&mut self) {
        self.reset_local_clock();
    }

    /// `snapshot-saved` for the snapshot in flight: it becomes active if the active snapshot is
    /// still its parent (otherwise the JS client ignores the acknowledgement). Returns whether
    /// it was adopted.
    pub fn adopt_own_snapshot(
        &mut self,
        info: &ProofEntry,
        parent_snapshot_id: Option<&SnapshotId>,
    ) -> bool {
        let parent_ok = match &self.active {
            None => true,
            Some(active) => Some(&active.info.snapshot_id) == parent_snapshot_id,
        };
        if parent_ok {
            self.active = Some(KnownSnapshot::new(info.clone()));
            self.local_clock = None;
        }
        parent_ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SnapshotId {
        SnapshotId::parse(s).unwrap()
    }

    fn c(n: u64) -> Clock {
        Clock::new(n).unwrap()
    }

    #[test]
    fn clock_rule() {
        let s1 = id("S1");
        assert_eq!(check_update_clock(Some(&s1), None, &s1, c(0)), Ok(()));
        assert_eq!(check_update_clock(Some(&s1), Some(c(3)), &s1, c(4)), Ok(()));
        assert_eq!(
            check_update_clock(Some(&s1), Some(c(3)), &s1, c(3)),
            Err(SyncError::UpdateDuplicate)
        );
        assert_eq!(
            check_update_clock(Some(&s1), Some(c(3)), &s1, c(5)),
            Err(SyncError::UpdateClockGap)
        );
        assert_eq!(
            check_update_clock(Some(&s1), None, &s1, c(1)),
            Err(SyncError::UpdateClockGap)
        );
        assert_eq!(
            check_update_clock(Some(&id("S2")), None, &s1, c(0)),
            Err(SyncError::UpdateNotActiveSnapshot)
        );
        assert_eq!(
            check_update_clock(None, None, &s1, c(0)),
            Err(SyncError::UpdateNotActiveSnapshot)
        );
    }

    #[test]
    fn fatal_errors_match_the_js_client() {
        assert!(SyncError::UpdateClockGap.is_fatal());
        assert!(!SyncError::UpdateDuplicate.is_fatal());
        assert!(!SyncError::SnapshotParent.is_fatal());
        assert_eq!(SyncError::UpdateDuplicate.code(), Some("SECSYNC_ERROR_214"));
    }
}
