//! One session's recent calls, and the rules that tell a loop from work.
//!
//! A [`History`] is a fixed-capacity ring of the session's last
//! `window_calls` tool calls, oldest overwritten first. Each [`Record`] keeps
//! the call's fingerprint, when it was made and what became of it. Nothing
//! in it grows: a session costs `window_calls` records whatever it does.
//!
//! Deciding on a call ([`History::admit`]) reads the live records (those
//! inside the time window) from the newest back, once for the repeat rules
//! and once per cycle period, so it costs O(window) at most and usually far
//! less: the repeat scan stops at the first success of another call or at
//! the newest refusal of the identical call (which records when the
//! refusal began, so nothing older is read), and a cycle check stops at
//! the first mismatch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use toolwarden_core::LoopPattern;

use crate::sessions::Shared;

/// What became of a recorded call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mark {
    /// Still running, or dropped before it finished: neither success nor failure.
    Pending,
    /// The classifier called it a success.
    Succeeded,
    /// The tool answered badly: a tool error (`isError`, empty result) or
    /// a JSON-RPC error, of any failure class.
    Failed,
    /// The upstream was unreachable (transport failure, timeout) or a
    /// toolwarden layer below this one refused the call (rate limit, open
    /// circuit): not the agent's doing. Neither success nor failure, and
    /// not a repeat: it builds no loop.
    Neutral,
    /// Refused by this guard.
    Blocked {
        /// The pattern it was refused for.
        pattern: LoopPattern,
        /// The repeats reported when it was refused.
        repeats: u32,
        /// Whether the tool's circuit refused calls when this block, or an
        /// earlier block of the same refusal, was made.
        circuit_open: bool,
        /// How long the refusal had been in force when this block was made
        /// (0 for its first block), saturating: the refusal started
        /// `at_ms - in_force_ms`, even when its first block has left the
        /// window.
        in_force_ms: u32,
    },
}

/// One call in a session's history.
#[derive(Debug, Clone, Copy)]
struct Record {
    /// The low 64 bits of the call's fingerprint.
    fingerprint: u64,
    /// When the call was made, in milliseconds since the guard's epoch.
    at_ms: u64,
    mark: Mark,
    /// Whether the call's tool takes part in cycle detection.
    in_cycles: bool,
}

impl Record {
    const EMPTY: Record = Record {
        fingerprint: 0,
        at_ms: 0,
        mark: Mark::Pending,
        in_cycles: false,
    };
}

/// The limits that apply to one call, resolved from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rules {
    /// Block the call once this many identical calls failed in a row.
    pub(crate) max_failing_repeats: Option<u32>,
    /// Block the call once it was made this many times in a row.
    pub(crate) max_repeats: Option<u32>,
    /// Whether the call's tool takes part in cycle detection.
    pub(crate) in_cycles: bool,
    /// Which cycles are loops (for calls `in_cycles`).
    pub(crate) cycles: CycleRule,
    /// Records older than this are forgotten.
    pub(crate) window_ms: u64,
    /// A refusal lifts this long after it was first made.
    pub(crate) cooldown_ms: u64,
}

/// What else a decision may need to know, asked only when a refusal of the
/// identical call is found (or made).
pub(crate) struct Lifts<'a> {
    /// When the identical call last succeeded in any session of the guard,
    /// in milliseconds since the guard's epoch; 0 when not known.
    pub(crate) last_success_ms: &'a dyn Fn() -> u64,
    /// Whether the call's tool's circuit refuses calls now.
    pub(crate) circuit_open: &'a dyn Fn() -> bool,
}

/// Which cycles are loops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CycleRule {
    /// The longest cycle looked for (cycles of 2..=max_period distinct calls).
    pub(crate) max_period: usize,
    /// Full rounds of a cycle allowed; the call that starts one more is blocked.
    pub(crate) max_rounds: usize,
}

/// What [`History::admit`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Let the call through; settle its record with `seq` when it ends.
    Pass {
        /// The record's sequence number.
        seq: u64,
        /// Set when the next repeat would be blocked.
        warning: Option<Verdict>,
    },
    /// Refuse the call.
    Block(Verdict),
}

/// A pattern and how often it was seen, this call included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Verdict {
    pub(crate) pattern: LoopPattern,
    pub(crate) repeats: u32,
}

/// The identical calls before this one, back to the last success of
/// another call or to a refusal of the identical call.
#[derive(Debug, Default)]
struct Streak {
    /// Identical calls that succeeded, failed or are still pending (not
    /// the neutral ones).
    repeats: u32,
    /// Identical calls that failed since the last identical success.
    failures: u32,
    /// The refusal of an identical call, when it is still in force.
    blocked: Option<Refusal>,
}

/// A refusal of the identical call in force, as its newest block records it.
#[derive(Debug, Clone, Copy)]
struct Refusal {
    newest: Verdict,
    /// When its first block was made.
    since_ms: u64,
    /// Whether any of its blocks was made while the tool's circuit refused calls.
    circuit_open: bool,
}

/// A periodic run of calls ending with the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cycle {
    period: usize,
    /// How many calls, the current one included, follow the period.
    run: usize,
}

/// A session's recent calls: a ring of `capacity` records.
#[derive(Debug)]
pub(crate) struct History {
    records: Box<[Record]>,
    /// What became of each slot's call, settled without the session's
    /// lock (see [`Outcomes`]).
    outcomes: Arc<Outcomes>,
    /// The slot the next record goes to.
    next: usize,
    /// How many slots hold records.
    len: usize,
    /// The sequence number of the next record.
    next_seq: u64,
}

impl History {
    /// An empty history of `capacity` calls (at least one).
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        History {
            records: vec![Record::EMPTY; capacity].into_boxed_slice(),
            outcomes: Arc::new(Outcomes::new(capacity)),
            next: 0,
            len: 0,
            next_seq: 0,
        }
    }

    /// The slot `back` places before the next one, `1 <= back <= capacity`.
    /// (A branch, not `%`: this runs for every record a decision reads.)
    #[inline]
    fn slot_back(&self, back: usize) -> usize {
        if back <= self.next {
            self.next - back
        } else {
            self.next + self.records.len() - back
        }
    }

    /// The slot of the `k`-th newest record, `1 <= k <= len`.
    #[inline]
    fn prior_slot(&self, k: usize) -> usize {
        debug_assert!((1..=self.len).contains(&k));
        self.slot_back(k)
    }

    /// The mark of the record in `slot`: what became of its call once that
    /// was settled (see [`Outcomes`]).
    #[inline]
    fn mark_at(&self, slot: usize) -> Mark {
        match self.records[slot].mark {
            Mark::Pending => self.outcomes.mark(slot),
            mark => mark,
        }
    }

    /// The `k`-th newest record, `1 <= k <= len`, with its settled mark.
    #[cfg(test)]
    fn prior(&self, k: usize) -> Record {
        let slot = self.prior_slot(k);
        Record {
            mark: self.mark_at(slot),
            ..self.records[slot]
        }
    }

    /// The outcomes of this history's calls, to settle them without its lock.
    pub(crate) fn outcomes(&self) -> Arc<Outcomes> {
        Arc::clone(&self.outcomes)
    }

    fn push(&mut self, record: Record) -> u64 {
        // Slot and sequence number advance together from 0: the record of
        // call `seq` is in slot `seq % capacity` until it is overwritten.
        self.outcomes.open(self.next, self.next_seq);
        self.records[self.next] = record;
        self.next += 1;
        if self.next == self.records.len() {
            self.next = 0;
        }
        self.len = (self.len + 1).min(self.records.len());
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    /// Decides on a call with `fingerprint` made at `now_ms`, and records it
    /// (as pending, or as blocked).
    ///
    /// Neutral records (see [`Mark::Neutral`]) count for nothing. The
    /// rules, in order:
    /// 1. a refusal of the identical call since the last success of another
    ///    call stays in force, unless it lifted: the identical call
    ///    succeeded since (in this session, or in any other as `lifts`
    ///    says), a block of it was made while the tool's circuit refused
    ///    calls and it no longer does, or `cooldown_ms` passed since its
    ///    first block. A lifted refusal ends the streak: the calls before
    ///    it no longer count for rules 2–3;
    /// 2. `max_failing_repeats` identical calls failed since the last success
    ///    of the identical call or of another call: blocked;
    /// 3. `max_repeats` identical calls since the last success of another
    ///    call: blocked;
    /// 4. the calls ending with this one repeat a cycle of 2..=`max_period`
    ///    calls more than `max_rounds` times: blocked.
    ///
    /// A call one short of rules 2–4 passes with a warning.
    pub(crate) fn admit(
        &mut self,
        fingerprint: u64,
        now_ms: u64,
        rules: &Rules,
        lifts: &Lifts<'_>,
    ) -> Admission {
        let streak = self.streak(fingerprint, now_ms, rules, lifts);
        let cycle = if rules.in_cycles {
            self.cycle(fingerprint, now_ms, rules.window_ms, rules.cycles)
        } else {
            None
        };
        let decision = decide(&streak, cycle, rules);
        let mark = match decision {
            Err(verdict) => {
                // A block continues the refusal in force, or starts one.
                let (since_ms, was_open) = streak
                    .blocked
                    .map_or((now_ms, false), |r| (r.since_ms, r.circuit_open));
                Mark::Blocked {
                    pattern: verdict.pattern,
                    repeats: verdict.repeats,
                    circuit_open: was_open || (lifts.circuit_open)(),
                    in_force_ms: u32::try_from(now_ms.saturating_sub(since_ms)).unwrap_or(u32::MAX),
                }
            }
            Ok(_) => Mark::Pending,
        };
        let seq = self.push(Record {
            fingerprint,
            at_ms: now_ms,
            mark,
            in_cycles: rules.in_cycles,
        });
        match decision {
            Ok(warning) => Admission::Pass { seq, warning },
            Err(verdict) => Admission::Block(verdict),
        }
    }

    /// Records what became of the call `seq`, unless its record was
    /// overwritten meanwhile or already settled.
    #[cfg(test)]
    pub(crate) fn settle(&self, seq: u64, mark: Mark) {
        self.outcomes.settle(seq, mark);
    }

    fn is_live(record: &Record, now_ms: u64, window_ms: u64) -> bool {
        now_ms.saturating_sub(record.at_ms) < window_ms
    }

    fn streak(&self, fingerprint: u64, now_ms: u64, rules: &Rules, lifts: &Lifts<'_>) -> Streak {
        let mut streak = Streak::default();
        let mut counting_failures = true;
        for k in 1..=self.len {
            let slot = self.prior_slot(k);
            let record = &self.records[slot];
            if !Self::is_live(record, now_ms, rules.window_ms) {
                break;
            }
            if record.fingerprint != fingerprint {
                // A success with other arguments (or another tool) is
                // progress: it clears the streak.
                if self.mark_at(slot) == Mark::Succeeded {
                    break;
                }
                continue;
            }
            match self.mark_at(slot) {
                Mark::Neutral => {}
                Mark::Pending => streak.repeats += 1,
                Mark::Failed => {
                    streak.repeats += 1;
                    if counting_failures {
                        streak.failures += 1;
                    }
                }
                Mark::Succeeded => {
                    streak.repeats += 1;
                    counting_failures = false;
                }
                Mark::Blocked {
                    pattern,
                    repeats,
                    circuit_open,
                    in_force_ms,
                } => {
                    // The newest refusal: in force, or lifted, and then the
                    // calls before it are forgotten. Either way the older
                    // records say nothing more.
                    let refusal = Refusal {
                        newest: Verdict { pattern, repeats },
                        since_ms: record.at_ms.saturating_sub(u64::from(in_force_ms)),
                        circuit_open,
                    };
                    // An identical success newer than the refusal is one
                    // the refused session made itself.
                    let lifted = !counting_failures
                        || now_ms.saturating_sub(refusal.since_ms) >= rules.cooldown_ms
                        || (lifts.last_success_ms)() > refusal.since_ms
                        || (refusal.circuit_open && !(lifts.circuit_open)());
                    if !lifted {
                        streak.blocked = Some(refusal);
                    }
                    break;
                }
            }
        }
        streak
    }

    /// The call at distance `k` back: 0 is the current call.
    fn nth(&self, k: usize, current: u64, now_ms: u64, window_ms: u64) -> Option<(u64, bool)> {
        if k == 0 {
            return Some((current, true));
        }
        if k > self.len {
            return None;
        }
        let slot = self.prior_slot(k);
        let record = &self.records[slot];
        // A neutral call (the upstream was down, or a layer below refused
        // it) builds no cycle: it ends the run, like a call out of the window.
        (Self::is_live(record, now_ms, window_ms) && self.mark_at(slot) != Mark::Neutral)
            .then_some((record.fingerprint, record.in_cycles))
    }

    fn cycle(
        &self,
        fingerprint: u64,
        now_ms: u64,
        window_ms: u64,
        rule: CycleRule,
    ) -> Option<Cycle> {
        let at = |k: usize| self.nth(k, fingerprint, now_ms, window_ms);
        'periods: for period in 2..=rule.max_period {
            // A cycle of `period` calls repeats the call `period` back. When
            // that one differs, the run is `period` calls long, short of a
            // warning or a block (`max_rounds >= 2`, checked when
            // configured): the cheap test that rules most periods out.
            // (The fingerprint first: it rules most out without reading
            // the call's outcome.)
            if period > self.len
                || self.records[self.prior_slot(period)].fingerprint != fingerprint
                || at(period).is_none()
            {
                continue;
            }
            // One period back from the current call: live calls of tools
            // that take part in cycles, and not one call repeated (that is
            // the repeat rules' business).
            let mut one_call = true;
            for k in 1..period {
                match at(k) {
                    Some((fp, true)) => one_call &= fp == fingerprint,
                    _ => break 'periods,
                }
            }
            if one_call {
                continue;
            }
            let mut run = period;
            while let (Some(a), Some(b)) = (at(run - period), at(run)) {
                if a.0 != b.0 {
                    break;
                }
                run += 1;
            }
            if run >= rule.max_rounds * period {
                return Some(Cycle { period, run });
            }
        }
        None
    }
}

/// `Ok` with an optional warning to let the call through, `Err` to refuse it.
fn decide(
    streak: &Streak,
    cycle: Option<Cycle>,
    rules: &Rules,
) -> Result<Option<Verdict>, Verdict> {
    if let Some(refusal) = streak.blocked {
        return Err(Verdict {
            pattern: refusal.newest.pattern,
            repeats: refusal.newest.repeats.saturating_add(1),
        });
    }
    let failing = rules
        .max_failing_repeats
        .map(|max| (max, streak.failures, LoopPattern::RepeatedFailure));
    let repeated = rules
        .max_repeats
        .map(|max| (max, streak.repeats, LoopPattern::Repeated));
    for (max, seen, pattern) in failing.into_iter().chain(repeated) {
        if seen >= max {
            return Err(Verdict {
                pattern,
                repeats: seen.saturating_add(1),
            });
        }
    }
    let cycle = cycle.map(|cycle| {
        let verdict = Verdict {
            // period <= max_period <= u8::MAX, checked when configured.
            pattern: LoopPattern::Cycle {
                period: u8::try_from(cycle.period).unwrap_or(u8::MAX),
            },
            repeats: u32::try_from(cycle.run.div_ceil(cycle.period)).unwrap_or(u32::MAX),
        };
        (cycle.run > rules.cycles.max_rounds * cycle.period, verdict)
    });
    if let Some((true, verdict)) = cycle {
        return Err(verdict);
    }
    // One short of a block: the next repeat would be refused.
    let warning = failing
        .into_iter()
        .chain(repeated)
        .find(|&(max, seen, _)| seen >= 1 && seen + 1 == max)
        .map(|(_, seen, pattern)| Verdict {
            pattern,
            repeats: seen + 1,
        })
        .or(cycle.map(|(_, verdict)| verdict));
    Ok(warning)
}

/// What became of the call in each slot of a history, written when the
/// call completes without taking the session's lock: a completing call
/// then touches only its own slot, so calls of one session on two threads
/// contend on the lock once per call (to be admitted), not twice.
///
/// A slot holds `seq << 2 | outcome` for the call `seq` recorded in it
/// (all ones: none yet, which no pending value equals); the outcome is 0
/// while the call is pending, else the code of [`Mark::Succeeded`],
/// [`Mark::Failed`] or [`Mark::Neutral`]. A call is settled by one
/// compare-and-swap from its pending value, which fails when its record was
/// overwritten by a newer call or was already settled: a late answer never
/// marks another call's record. (Two calls 2^62 apart would share a pending
/// value: a session does not make that many.)
#[derive(Debug)]
pub(crate) struct Outcomes {
    slots: Box<[AtomicU64]>,
}

impl Outcomes {
    const PENDING: u64 = 0;
    const SUCCEEDED: u64 = 1;
    const FAILED: u64 = 2;
    const NEUTRAL: u64 = 3;
    const EMPTY: u64 = u64::MAX;

    fn new(capacity: usize) -> Self {
        Outcomes {
            slots: (0..capacity).map(|_| AtomicU64::new(Self::EMPTY)).collect(),
        }
    }

    fn pending(seq: u64) -> u64 {
        seq << 2 | Self::PENDING
    }

    /// A copy of the outcomes as they are now.
    #[cfg(test)]
    fn copy(&self) -> Self {
        Outcomes {
            slots: self
                .slots
                .iter()
                .map(|slot| AtomicU64::new(slot.load(Ordering::Relaxed)))
                .collect(),
        }
    }

    /// Slot `slot` now holds the pending call `seq` (under the session's
    /// lock, which orders it before any settle of `seq`).
    fn open(&self, slot: usize, seq: u64) {
        self.slots[slot].store(Self::pending(seq), Ordering::Release);
    }

    /// Settles the call `seq` with `mark` (succeeded, failed or neutral:
    /// the only marks a completed call gets).
    pub(crate) fn settle(&self, seq: u64, mark: Mark) {
        let code = match mark {
            Mark::Succeeded => Self::SUCCEEDED,
            Mark::Failed => Self::FAILED,
            Mark::Neutral => Self::NEUTRAL,
            Mark::Pending | Mark::Blocked { .. } => return,
        };
        let capacity = self.slots.len() as u64;
        // The remainder is below the capacity, a usize.
        let slot = &self.slots[(seq % capacity) as usize];
        let pending = Self::pending(seq);
        // Fails when the slot holds another call, or this one settled.
        let _ = slot.compare_exchange(pending, pending | code, Ordering::AcqRel, Ordering::Relaxed);
    }

    /// What became of the call in `slot`, as a mark.
    fn mark(&self, slot: usize) -> Mark {
        match self.slots[slot].load(Ordering::Acquire) & 3 {
            Self::SUCCEEDED => Mark::Succeeded,
            Self::FAILED => Mark::Failed,
            Self::NEUTRAL => Mark::Neutral,
            _ => Mark::Pending,
        }
    }
}

/// One session's state: its history behind a short lock, uncontended
/// unless the session itself makes concurrent calls, the outcomes of its
/// calls (settled without the lock), and the guard's state every session
/// shares (clock, recent successes).
#[derive(Debug)]
pub(crate) struct Session {
    history: Mutex<History>,
    outcomes: Arc<Outcomes>,
    shared: Arc<Shared>,
}

impl Session {
    pub(crate) fn new(capacity: usize, shared: Arc<Shared>) -> Self {
        let history = History::new(capacity);
        Session {
            outcomes: history.outcomes(),
            history: Mutex::new(history),
            shared,
        }
    }

    /// Decides on a call made now, and when that was (milliseconds since
    /// the guard's epoch, for [`settle`](Self::settle)); `circuit_open`
    /// tells whether the call's tool's circuit refuses calls, and is asked
    /// only when a refusal is found or made.
    pub(crate) fn admit(
        &self,
        fingerprint: u64,
        rules: &Rules,
        circuit_open: &dyn Fn() -> bool,
    ) -> (Admission, u64) {
        let shared = &*self.shared;
        let lifts = Lifts {
            last_success_ms: &|| shared.last_success_ms(fingerprint),
            circuit_open,
        };
        let now_ms = shared.now_ms();
        let admission = self
            .history
            .lock()
            .admit(fingerprint, now_ms, rules, &lifts);
        if let Admission::Block(_) = admission {
            shared.note_block(now_ms);
        }
        (admission, now_ms)
    }

    /// Records what became of the call `seq` with `fingerprint`, admitted
    /// at `admitted_ms`; a success is also noted for every session of the
    /// guard.
    pub(crate) fn settle(&self, seq: u64, fingerprint: u64, mark: Mark, admitted_ms: u64) {
        if mark == Mark::Succeeded {
            self.shared.record_success(fingerprint, admitted_ms);
        }
        self.outcomes.settle(seq, mark);
    }

    /// The number of records the session can hold.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.history.lock().records.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const A: u64 = 0xA;
    const B: u64 = 0xB;
    const C: u64 = 0xC;

    fn rules() -> Rules {
        Rules {
            max_failing_repeats: Some(3),
            max_repeats: Some(8),
            in_cycles: true,
            cycles: CycleRule {
                max_period: 3,
                max_rounds: 3,
            },
            window_ms: 300_000,
            cooldown_ms: 30_000,
        }
    }

    fn never_succeeded() -> u64 {
        0
    }

    fn closed() -> bool {
        false
    }

    /// No success elsewhere, every circuit closed.
    const NO_LIFTS: Lifts<'static> = Lifts {
        last_success_ms: &never_succeeded,
        circuit_open: &closed,
    };

    /// Admits `fp` at `now`, settles it with `mark` when it passes, and
    /// returns the admission.
    fn call(h: &mut History, fp: u64, now: u64, mark: Mark, rules: &Rules) -> Admission {
        let admission = h.admit(fp, now, rules, &NO_LIFTS);
        if let Admission::Pass { seq, .. } = admission {
            h.settle(seq, mark);
        }
        admission
    }

    fn blocked(a: Admission) -> Option<Verdict> {
        match a {
            Admission::Block(v) => Some(v),
            Admission::Pass { .. } => None,
        }
    }

    fn warned(a: Admission) -> Option<Verdict> {
        match a {
            Admission::Pass { warning, .. } => warning,
            Admission::Block(_) => None,
        }
    }

    #[test]
    fn the_fourth_identical_failing_call_is_blocked_after_a_warning_on_the_third() {
        let (mut h, r) = (History::new(16), rules());
        assert_eq!(warned(call(&mut h, A, 0, Mark::Failed, &r)), None);
        assert_eq!(warned(call(&mut h, A, 1, Mark::Failed, &r)), None);
        let third = call(&mut h, A, 2, Mark::Failed, &r);
        assert_eq!(
            warned(third),
            Some(Verdict {
                pattern: LoopPattern::RepeatedFailure,
                repeats: 3
            })
        );
        let fourth = call(&mut h, A, 3, Mark::Failed, &r);
        assert_eq!(
            blocked(fourth),
            Some(Verdict {
                pattern: LoopPattern::RepeatedFailure,
                repeats: 4
            })
        );
        // The refusal stays in force and keeps counting.
        assert_eq!(
            blocked(call(&mut h, A, 4, Mark::Failed, &r)).map(|v| v.repeats),
            Some(5)
        );
    }

    #[test]
    fn failures_of_other_calls_do_not_clear_the_streak_but_a_success_does() {
        let (mut h, r) = (History::new(16), rules());
        for t in 0..3 {
            call(&mut h, A, t, Mark::Failed, &r);
        }
        call(&mut h, B, 3, Mark::Failed, &r);
        assert!(blocked(call(&mut h, A, 4, Mark::Failed, &r)).is_some());
        call(&mut h, C, 5, Mark::Failed, &r);
        assert!(
            blocked(call(&mut h, A, 6, Mark::Failed, &r)).is_some(),
            "the block stays"
        );
        call(&mut h, B, 7, Mark::Succeeded, &r);
        // Cleared: three more failures are allowed before the next block.
        for t in 8..11 {
            assert!(
                blocked(call(&mut h, A, t, Mark::Failed, &r)).is_none(),
                "t={t}"
            );
        }
        assert!(blocked(call(&mut h, A, 11, Mark::Failed, &r)).is_some());
    }

    #[test]
    fn a_success_of_the_identical_call_resets_its_failures_but_not_its_repeats() {
        let (mut h, r) = (History::new(16), rules());
        let marks = [
            Mark::Failed,
            Mark::Failed,
            Mark::Succeeded,
            Mark::Failed,
            Mark::Failed,
        ];
        for (t, mark) in marks.into_iter().enumerate() {
            assert!(blocked(call(&mut h, A, t as u64, mark, &r)).is_none());
        }
        // Two failures since the success: the sixth call passes, with a warning.
        let sixth = call(&mut h, A, 5, Mark::Succeeded, &r);
        assert_eq!(
            warned(sixth).map(|v| v.pattern),
            Some(LoopPattern::RepeatedFailure)
        );
        // Identical calls in general still count: 8 allowed, the 9th blocked.
        call(&mut h, A, 6, Mark::Succeeded, &r);
        let eighth = call(&mut h, A, 7, Mark::Succeeded, &r);
        assert_eq!(
            warned(eighth),
            Some(Verdict {
                pattern: LoopPattern::Repeated,
                repeats: 8
            })
        );
        assert_eq!(
            blocked(call(&mut h, A, 8, Mark::Succeeded, &r)),
            Some(Verdict {
                pattern: LoopPattern::Repeated,
                repeats: 9
            })
        );
    }

    #[test]
    fn pending_calls_are_repeats_but_not_failures_and_neutral_calls_are_neither() {
        let (mut h, r) = (History::new(16), rules());
        // Neutral calls (upstream down, refused below) build no loop, however many.
        for t in 0..12 {
            let a = call(&mut h, A, t, Mark::Neutral, &r);
            assert_eq!((blocked(a), warned(a)), (None, None), "neutral call {t}");
        }
        for t in 12..18 {
            h.admit(A, t, &r, &NO_LIFTS); // never settled: pending
        }
        assert!(blocked(call(&mut h, A, 18, Mark::Failed, &r)).is_none());
        assert!(blocked(call(&mut h, A, 19, Mark::Failed, &r)).is_none());
        // 8 identical calls that count so far: the 9th is a repeat too many.
        assert_eq!(
            blocked(call(&mut h, A, 20, Mark::Failed, &r)).map(|v| v.pattern),
            Some(LoopPattern::Repeated)
        );
    }

    #[test]
    fn neutral_calls_build_no_cycle() {
        let (mut h, r) = (History::new(16), rules());
        for t in 0..16u64 {
            let fp = if t % 2 == 0 { A } else { B };
            let a = call(&mut h, fp, t, Mark::Neutral, &r);
            assert_eq!((blocked(a), warned(a)), (None, None), "t={t}");
        }
    }

    #[test]
    fn a_refusal_in_force_lifts_by_its_first_block_and_the_streak_restarts() {
        let (mut h, r) = (History::new(16), rules());
        for t in 0..3 {
            call(&mut h, A, t, Mark::Failed, &r);
        }
        // Refused at 10, asked again at 20_000 and 29_999: still in force.
        for t in [10, 20_000, 29_999] {
            assert!(blocked(call(&mut h, A, t, Mark::Failed, &r)).is_some());
        }
        // 30 s after the first block, not the newest: lifted.
        assert!(blocked(call(&mut h, A, 30_010, Mark::Failed, &r)).is_none());
        // The streak restarted: one failure so far, two more pass.
        assert!(blocked(call(&mut h, A, 30_011, Mark::Failed, &r)).is_none());
        assert!(blocked(call(&mut h, A, 30_012, Mark::Failed, &r)).is_none());
        assert!(blocked(call(&mut h, A, 30_013, Mark::Failed, &r)).is_some());

        // A success elsewhere after the first block lifts it; one before does not.
        let (before, after) = (|| 30_013, || 30_014);
        let before = Lifts {
            last_success_ms: &before,
            circuit_open: &closed,
        };
        let after = Lifts {
            last_success_ms: &after,
            circuit_open: &closed,
        };
        assert!(blocked(h.clone_admit_with(A, 30_014, &r, &before)).is_some());
        assert!(blocked(h.clone_admit_with(A, 30_014, &r, &after)).is_none());
        // A circuit that refused calls at the block lifts it when closed, not before.
        let open = || true;
        let open_now = Lifts {
            last_success_ms: &never_succeeded,
            circuit_open: &open,
        };
        assert!(blocked(h.admit(A, 30_015, &r, &open_now)).is_some());
        assert!(blocked(h.clone_admit_with(A, 30_016, &r, &open_now)).is_some());
        assert!(blocked(h.clone_admit_with(A, 30_016, &r, &NO_LIFTS)).is_none());
    }

    #[test]
    fn records_leave_by_time_and_by_count() {
        let (mut h, r) = (History::new(16), rules());
        for t in 0..3 {
            call(&mut h, A, t, Mark::Failed, &r);
        }
        assert!(
            blocked(h.clone_admit(A, 299_999, &r)).is_some(),
            "inside the window"
        );
        assert!(
            blocked(call(&mut h, A, 300_002, Mark::Failed, &r)).is_none(),
            "all three expired"
        );

        let mut h = History::new(4);
        for t in 0..3 {
            call(&mut h, A, t, Mark::Failed, &r);
        }
        call(&mut h, B, 3, Mark::Failed, &r); // the ring holds 4: A's first failure is gone next
        call(&mut h, C, 4, Mark::Failed, &r);
        assert!(blocked(call(&mut h, A, 5, Mark::Failed, &r)).is_none());
    }

    #[test]
    fn a_two_call_cycle_is_blocked_when_it_starts_a_fourth_round() {
        let (mut h, r) = (History::new(16), rules());
        for (t, fp) in [A, B, A, B, A].into_iter().enumerate() {
            let a = call(&mut h, fp, t as u64, Mark::Succeeded, &r);
            assert_eq!(
                a,
                Admission::Pass {
                    seq: t as u64,
                    warning: None
                },
                "call {t}"
            );
        }
        let sixth = call(&mut h, B, 5, Mark::Succeeded, &r);
        assert_eq!(
            warned(sixth),
            Some(Verdict {
                pattern: LoopPattern::Cycle { period: 2 },
                repeats: 3
            })
        );
        let seventh = call(&mut h, A, 6, Mark::Succeeded, &r);
        assert_eq!(
            blocked(seventh),
            Some(Verdict {
                pattern: LoopPattern::Cycle { period: 2 },
                repeats: 4
            })
        );
        // Continuing the cycle stays blocked; so does repeating the refused call.
        assert!(blocked(call(&mut h, B, 7, Mark::Succeeded, &r)).is_some());
        assert!(blocked(call(&mut h, A, 8, Mark::Succeeded, &r)).is_some());
        // A different call that succeeds breaks the pattern.
        assert!(blocked(call(&mut h, C, 9, Mark::Succeeded, &r)).is_none());
        assert!(blocked(call(&mut h, A, 10, Mark::Succeeded, &r)).is_none());
    }

    #[test]
    fn three_call_cycles_are_found_up_to_the_configured_period() {
        let mut r = rules();
        let mut h = History::new(16);
        let seq = [A, B, C, A, B, C, A, B, C, A];
        let admissions: Vec<_> = seq
            .iter()
            .enumerate()
            .map(|(t, &fp)| call(&mut h, fp, t as u64, Mark::Succeeded, &r))
            .collect();
        assert!(admissions[..9].iter().all(|a| blocked(*a).is_none()));
        assert_eq!(
            warned(admissions[8]).map(|v| v.pattern),
            Some(LoopPattern::Cycle { period: 3 })
        );
        assert_eq!(
            blocked(admissions[9]).map(|v| v.pattern),
            Some(LoopPattern::Cycle { period: 3 })
        );

        r.cycles = CycleRule {
            max_period: 2,
            max_rounds: 3,
        };
        let mut h = History::new(16);
        for t in 0..30 {
            let fp = [A, B, C][t % 3];
            assert!(
                blocked(call(&mut h, fp, t as u64, Mark::Succeeded, &r)).is_none(),
                "t={t}"
            );
        }
    }

    #[test]
    fn a_tool_outside_cycle_detection_breaks_cycles() {
        let mut r = rules();
        let mut h = History::new(16);
        for t in 0..20u64 {
            // A polls without cycle detection; B is an ordinary call.
            r.in_cycles = t % 2 == 1;
            let fp = if t % 2 == 0 { A } else { B };
            assert!(
                blocked(call(&mut h, fp, t, Mark::Succeeded, &r)).is_none(),
                "t={t}"
            );
        }
    }

    #[test]
    fn a_settled_record_is_not_settled_again_and_an_overwritten_one_is_left_alone() {
        let (mut h, r) = (History::new(2), rules());
        let Admission::Pass { seq: first, .. } = h.admit(A, 0, &r, &NO_LIFTS) else {
            panic!()
        };
        h.settle(first, Mark::Failed);
        h.settle(first, Mark::Succeeded);
        assert_eq!(h.prior(1).mark, Mark::Failed);
        call(&mut h, B, 1, Mark::Failed, &r);
        call(&mut h, C, 2, Mark::Failed, &r);
        h.settle(first, Mark::Succeeded); // overwritten: must not touch B's or C's slot
        assert_eq!(
            (h.prior(1).mark, h.prior(2).mark),
            (Mark::Failed, Mark::Failed)
        );
        h.settle(u64::MAX, Mark::Succeeded); // never issued
        assert_eq!(h.prior(1).mark, Mark::Failed);
    }

    impl History {
        /// Admits on a copy, leaving `self` untouched.
        fn clone_admit(&self, fp: u64, now: u64, r: &Rules) -> Admission {
            let mut copy = History {
                records: self.records.clone(),
                outcomes: Arc::new(self.outcomes.copy()),
                next: self.next,
                len: self.len,
                next_seq: self.next_seq,
            };
            copy.admit(fp, now, r, &NO_LIFTS)
        }

        /// Admits on a copy with `lifts`, leaving `self` untouched.
        fn clone_admit_with(&self, fp: u64, now: u64, r: &Rules, lifts: &Lifts<'_>) -> Admission {
            let mut copy = History {
                records: self.records.clone(),
                outcomes: Arc::new(self.outcomes.copy()),
                next: self.next,
                len: self.len,
                next_seq: self.next_seq,
            };
            copy.admit(fp, now, r, lifts)
        }
    }

    fn arb_mark() -> impl Strategy<Value = Mark> {
        prop_oneof![
            Just(Mark::Succeeded),
            Just(Mark::Failed),
            Just(Mark::Neutral),
            Just(Mark::Pending)
        ]
    }

    proptest! {
        /// Whatever the calls, the inner service never sees more than
        /// `max_failing_repeats` failures of one call in a row, nor more
        /// than `max_repeats` identical calls in a row, where "in a row"
        /// means with no success of another call in between, and neutral
        /// calls do not count.
        #[test]
        fn no_streak_ever_exceeds_its_limit(
            calls in prop::collection::vec((0u64..4, arb_mark()), 0..200),
            max_failing in 1u32..5,
            max_repeats in 1u32..10,
        ) {
            let r = Rules { max_failing_repeats: Some(max_failing), max_repeats: Some(max_repeats), ..rules() };
            // Room for every call: the property is about the rules, not the window.
            let mut h = History::new(256);
            // What reached the service, per fingerprint: (failures, repeats)
            // since the last success of another call.
            let mut seen = std::collections::HashMap::<u64, (u32, u32)>::new();
            for (t, (fp, mark)) in calls.into_iter().enumerate() {
                if blocked(call(&mut h, fp, t as u64, mark, &r)).is_some() {
                    continue;
                }
                let (failures, repeats) = seen.entry(fp).or_default();
                // Neutral calls count for nothing.
                if mark != Mark::Neutral {
                    *repeats += 1;
                }
                match mark {
                    Mark::Failed => *failures += 1,
                    Mark::Succeeded => *failures = 0,
                    _ => {}
                }
                prop_assert!(*failures <= max_failing, "fp {fp}: {failures} failures passed");
                prop_assert!(*repeats <= max_repeats, "fp {fp}: {repeats} repeats passed");
                if mark == Mark::Succeeded {
                    seen.retain(|other, _| *other == fp);
                }
            }
        }

        /// Calls that never repeat within the window are never blocked.
        #[test]
        fn distinct_calls_are_never_blocked(marks in prop::collection::vec(arb_mark(), 0..100)) {
            let (mut h, r) = (History::new(16), rules());
            for (t, mark) in marks.into_iter().enumerate() {
                prop_assert!(blocked(call(&mut h, t as u64 + 1, t as u64, mark, &r)).is_none());
            }
        }
    }

    #[test]
    fn a_record_is_at_most_32_bytes_as_documented() {
        assert!(
            std::mem::size_of::<Record>() <= 32,
            "{}",
            std::mem::size_of::<Record>()
        );
    }

    #[test]
    fn a_session_holds_a_fixed_number_of_records() {
        let s = Session::new(16, Arc::new(Shared::new()));
        let r = rules();
        for t in 0..1000u64 {
            s.admit(t, &r, &|| false);
        }
        assert_eq!(s.capacity(), 16);
    }

    /// Calls settled on other threads, racing the calls that overwrite
    /// their records, each mark only their own record: thread `t` makes
    /// calls with fingerprint `t` and settles each with `t`'s mark, so any
    /// record marked for another fingerprint is a settle that landed on a
    /// slot another call had taken.
    #[test]
    fn concurrent_settles_mark_only_their_own_records() {
        let marks = [Mark::Succeeded, Mark::Failed, Mark::Neutral];
        let r = Rules {
            max_failing_repeats: None,
            max_repeats: None,
            in_cycles: false,
            ..rules()
        };
        // Every record's mark is its own thread's, or pending.
        let check = |session: &Session| {
            let history = session.history.lock();
            for k in 1..=history.len {
                let record = history.prior(k);
                let own = marks[record.fingerprint as usize];
                assert!(
                    record.mark == own || record.mark == Mark::Pending,
                    "call {} holds {:?}, its thread settles {:?}",
                    record.fingerprint,
                    record.mark,
                    own
                );
            }
        };
        for _ in 0..20 {
            let session = Session::new(4, Arc::new(Shared::new()));
            std::thread::scope(|scope| {
                for (t, &mark) in marks.iter().enumerate() {
                    let (session, r, check) = (&session, &r, &check);
                    scope.spawn(move || {
                        let mut admitted = Vec::new();
                        for i in 0..2_000u64 {
                            if let (Admission::Pass { seq, .. }, at) =
                                session.admit(t as u64, r, &|| false)
                            {
                                admitted.push((seq, at));
                            }
                            // Settle late, in bursts, while others push.
                            std::thread::yield_now();
                            if i % 13 == 12 {
                                for (seq, at) in admitted.drain(..) {
                                    session.settle(seq, t as u64, mark, at);
                                }
                                check(session);
                            }
                        }
                        for (seq, at) in admitted {
                            session.settle(seq, t as u64, mark, at);
                        }
                    });
                }
            });
            check(&session);
            // Every call was settled, and the last four are still held.
            let history = session.history.lock();
            assert!((1..=history.len).all(|k| history.prior(k).mark != Mark::Pending));
        }
    }
}
