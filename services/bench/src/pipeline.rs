//! One author's updates in flight: which clock to send next, window, acknowledgements, and what
//! a real client does after `update-save-failed` (send again from the failed clock).
//!
//! Replies are matched by clock, not by order: the reference server handles a connection's
//! frames concurrently, so its replies can come out of order. A clock is never sent while an
//! earlier attempt of it is still unanswered, and sending stops at a clock that is in flight,
//! so after a failure nothing later than the failed clock is sent before it (it could only fail).

use std::collections::BTreeSet;

/// The send state of one author.
#[derive(Debug)]
pub struct Pipeline {
    len: usize,
    window: usize,
    next: usize,
    in_flight: BTreeSet<usize>,
    acked: Vec<bool>,
    sent_once: Vec<bool>,
    acked_count: usize,
    /// `update-save-failed` replies so far.
    pub failures: usize,
    /// Acknowledgements for a clock that was not in flight (a relay bug if not zero).
    pub unexpected_acks: usize,
}

impl Pipeline {
    pub fn new(len: usize, window: usize) -> Self {
        Self {
            len,
            window: window.max(1),
            next: 0,
            in_flight: BTreeSet::new(),
            acked: vec![false; len],
            sent_once: vec![false; len],
            acked_count: 0,
            failures: 0,
            unexpected_acks: 0,
        }
    }

    /// The clock to send now, if the window and the order allow one.
    pub fn ready(&mut self) -> Option<usize> {
        if self.in_flight.len() >= self.window {
            return None;
        }
        while self.next < self.len && self.acked[self.next] {
            self.next += 1;
        }
        if self.next >= self.len || self.in_flight.contains(&self.next) {
            return None;
        }
        Some(self.next)
    }

    /// Records that `clock` (from [`Pipeline::ready`]) was sent.
    pub fn sent(&mut self, clock: usize) {
        self.in_flight.insert(clock);
        if let Some(once) = self.sent_once.get_mut(clock) {
            *once = true;
        }
        self.next = clock + 1;
    }

    /// `update-saved` for `clock`: true if it answered a frame in flight.
    pub fn acked(&mut self, clock: u64) -> bool {
        let Ok(clock) = usize::try_from(clock) else {
            self.unexpected_acks += 1;
            return false;
        };
        if !self.in_flight.remove(&clock) || self.acked[clock] {
            self.unexpected_acks += 1;
            return false;
        }
        self.acked[clock] = true;
        self.acked_count += 1;
        true
    }

    /// `update-save-failed` for `clock` (the oldest frame in flight when the reply has none):
    /// that clock is sent again once nothing before it is pending.
    pub fn failed(&mut self, clock: Option<u64>) {
        self.failures += 1;
        let clock = clock
            .and_then(|c| usize::try_from(c).ok())
            .filter(|c| self.in_flight.contains(c))
            .or_else(|| self.in_flight.first().copied());
        if let Some(c) = clock {
            self.in_flight.remove(&c);
            if !self.acked[c] {
                self.next = self.next.min(c);
            }
        }
    }

    /// Forgets everything in flight (no reply came); returns how many were dropped.
    pub fn abandon_in_flight(&mut self) -> usize {
        let n = self.in_flight.len();
        self.in_flight.clear();
        n
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub fn acked_count(&self) -> usize {
        self.acked_count
    }

    /// True once every frame is acknowledged.
    pub fn complete(&self) -> bool {
        self.acked_count == self.len
    }

    /// True if `clock` was sent before (a resend goes now, not at its scheduled time).
    pub fn is_resend(&self, clock: usize) -> bool {
        self.sent_once.get(clock).copied().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_and_in_order_acks() {
        let mut p = Pipeline::new(5, 2);
        assert_eq!(p.ready(), Some(0));
        p.sent(0);
        assert_eq!(p.ready(), Some(1));
        p.sent(1);
        assert_eq!(p.ready(), None, "window full");
        assert!(p.acked(0));
        assert_eq!(p.ready(), Some(2));
        p.sent(2);
        assert!(p.acked(1));
        assert!(p.acked(2));
        assert!(!p.acked(2), "a second ack is unexpected");
        assert_eq!(p.unexpected_acks, 1);
        for c in 3..5 {
            assert_eq!(p.ready(), Some(c));
            p.sent(c);
        }
        assert_eq!(p.ready(), None);
        assert!(p.acked(4));
        assert!(p.acked(3), "acks may come out of order");
        assert!(p.complete());
        assert_eq!(p.acked_count(), 5);
    }

    #[test]
    fn failure_resends_from_the_failed_clock() {
        let mut p = Pipeline::new(6, 4);
        for c in 0..4 {
            let k = p.ready().unwrap();
            p.sent(k);
            assert_eq!(p.in_flight(), c + 1);
        }
        assert!(p.acked(0));
        p.failed(Some(1));
        // 2 and 3 are still in flight: 1 goes again, but nothing after it yet.
        assert_eq!(p.ready(), Some(1));
        assert!(p.is_resend(1));
        assert!(!p.is_resend(4));
        p.sent(1);
        assert_eq!(p.ready(), None, "2 is still in flight");
        p.failed(Some(2));
        p.failed(Some(3));
        assert_eq!(p.failures, 3);
        assert_eq!(p.ready(), Some(2));
        p.sent(2);
        assert!(p.acked(1));
        assert!(p.acked(2));
        assert_eq!(p.ready(), Some(3));
        p.sent(3);
        assert!(p.acked(3));
        for c in 4..6 {
            assert_eq!(p.ready(), Some(c));
            p.sent(c);
            assert!(p.acked(c as u64));
        }
        assert!(p.complete());
    }

    #[test]
    fn late_success_of_an_earlier_attempt_is_not_sent_again() {
        let mut p = Pipeline::new(3, 3);
        for _ in 0..3 {
            let k = p.ready().unwrap();
            p.sent(k);
        }
        p.failed(Some(0));
        assert_eq!(p.ready(), Some(0));
        p.sent(0);
        assert!(p.acked(0));
        // The first attempt of 1 was retried by the server and succeeded after all.
        assert!(p.acked(1));
        assert!(p.acked(2));
        assert_eq!(p.ready(), None);
        assert!(p.complete());
    }

    #[test]
    fn failure_without_clock_takes_the_oldest_and_abandon_clears() {
        let mut p = Pipeline::new(3, 3);
        let k = p.ready().unwrap();
        p.sent(k);
        let k = p.ready().unwrap();
        p.sent(k);
        p.failed(None);
        assert_eq!(p.in_flight(), 1);
        assert_eq!(p.ready(), Some(0));
        assert_eq!(p.abandon_in_flight(), 1);
        assert_eq!(p.in_flight(), 0);
        assert!(!p.complete());
    }
}
