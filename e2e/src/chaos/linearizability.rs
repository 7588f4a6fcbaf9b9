//! Step 3a: the linearizability checker. Wing & Gong's search with Lowe's memoization (the
//! algorithm of porcupine): linearize calls in real-time order, backtrack when a return is
//! reached whose call has no place, and skip (linearized set, state) pairs seen before.
//!
//! Operations with an unknown outcome return "at the end of time": they may be linearized
//! anywhere after their invocation, including after every other operation (which is the same
//! as never having happened). Each key group is checked on its own; the search is bounded in
//! steps and wall time and answers `Unknown` rather than hang.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::history::{Entry, Nanos};
use super::model::{step, Input, Output, State};

/// Bounds of one check.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Search steps per group.
    pub max_steps: u64,
    /// Wall time for the whole check.
    pub max_time: Duration,
}

impl Default for Budget {
    fn default() -> Self {
        Budget {
            max_steps: 20_000_000,
            max_time: Duration::from_secs(60),
        }
    }
}

/// The verdict on one group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupVerdict {
    Linearizable,
    /// No order explains the history. `stuck` is the op that could not be placed after the
    /// longest linearizable prefix found, `prefix` that prefix (in linearization order).
    Illegal {
        stuck: Box<Entry>,
        prefix: Vec<Entry>,
        /// A smaller history that is still not linearizable (see [`minimize`]), by invocation.
        minimal: Vec<Entry>,
    },
    /// The budget ran out.
    Unknown(String),
}

/// The verdict on a whole history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// One per group, by group number.
    pub groups: Vec<(usize, GroupVerdict)>,
}

impl Verdict {
    pub fn is_illegal(&self) -> bool {
        self.groups
            .iter()
            .any(|(_, v)| matches!(v, GroupVerdict::Illegal { .. }))
    }

    pub fn is_linearizable(&self) -> bool {
        self.groups
            .iter()
            .all(|(_, v)| *v == GroupVerdict::Linearizable)
    }

    /// One line per group that is not linearizable (with its stuck op and the prefix's tail).
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (g, v) in &self.groups {
            match v {
                GroupVerdict::Linearizable => {}
                GroupVerdict::Unknown(why) => {
                    out.push_str(&format!("group {g}: unknown ({why})\n"))
                }
                GroupVerdict::Illegal {
                    stuck,
                    prefix,
                    minimal,
                } => {
                    out.push_str(&format!(
                        "group {g}: NOT linearizable; after a linearizable prefix of {} ops, no \
                         order explains:\n  {}\n  last ops of the prefix:\n",
                        prefix.len(),
                        stuck.describe()
                    ));
                    for e in prefix.iter().rev().take(12).rev() {
                        out.push_str(&format!("    {}\n", e.describe()));
                    }
                    out.push_str(&format!(
                        "  a smaller history that is still not linearizable ({} ops; \
                         \"Unknown\" marks acknowledged writes whose reply it does not need):\n",
                        minimal.len()
                    ));
                    for e in minimal.iter().take(60) {
                        out.push_str(&format!("    {}\n", e.describe()));
                    }
                }
            }
        }
        out
    }
}

/// Checks every linearizable op (local reads excluded) of `history`, group by group.
pub fn check(history: &[Entry], initial: State, budget: Budget) -> Verdict {
    let deadline = Instant::now() + budget.max_time;
    let mut groups: Vec<usize> = history.iter().map(|e| e.group).collect();
    groups.sort_unstable();
    groups.dedup();
    let verdicts = groups
        .into_iter()
        .map(|g| {
            let ops: Vec<Entry> = history
                .iter()
                .filter(|e| e.group == g && !e.local)
                .cloned()
                .collect();
            let verdict = match check_group(&ops, initial, budget.max_steps, deadline) {
                GroupVerdict::Illegal { stuck, prefix, .. } => {
                    let shrink_deadline = Instant::now() + SHRINK_TIME;
                    GroupVerdict::Illegal {
                        stuck,
                        prefix,
                        minimal: minimize(&ops, initial, budget.max_steps, shrink_deadline),
                    }
                }
                other => other,
            };
            (g, verdict)
        })
        .collect();
    Verdict { groups: verdicts }
}

/// Wall time spent shrinking one illegal group's history.
const SHRINK_TIME: Duration = Duration::from_secs(20);

/// Shrinks an illegal history to a smaller one that is still illegal, keeping only sound
/// steps: dropping ops without effect (reads, refused writes), whose removal only removes
/// constraints, and weakening acknowledged writes to unknown outcome, which only allows more
/// orders. So the result is a real witness: if it were linearizable, so would the input be.
/// Greedy, one op at a time, bounded by `deadline` (it returns what it has by then).
pub fn minimize(ops: &[Entry], initial: State, max_steps: u64, deadline: Instant) -> Vec<Entry> {
    let illegal = |h: &[Entry]| {
        matches!(
            check_group(h, initial, max_steps, deadline),
            GroupVerdict::Illegal { .. }
        )
    };
    let mut history: Vec<Entry> = ops.to_vec();
    history.sort_by_key(|e| e.invoke);
    let droppable = |e: &Entry| {
        matches!(e.input, Input::Read { .. }) || matches!(e.output, Output::Refused { .. })
    };
    let mut i = history.len();
    while i > 0 && Instant::now() < deadline {
        i -= 1;
        if !droppable(&history[i]) {
            continue;
        }
        let removed = history.remove(i);
        if !illegal(&history) {
            history.insert(i, removed);
        }
    }
    for i in (0..history.len()).rev() {
        if Instant::now() >= deadline {
            break;
        }
        if !matches!(history[i].output, Output::Written(_)) {
            continue;
        }
        let original = history[i].clone();
        history[i].output = Output::Unknown;
        history[i].complete = None;
        if !illegal(&history) {
            history[i] = original;
        }
    }
    history
}

const HEAD: usize = 0;
const NIL: usize = usize::MAX;

/// The doubly linked list of call and return events the search lifts ops out of.
struct Events {
    op: Vec<usize>,
    is_call: Vec<bool>,
    /// For a call: the index of its return.
    matching: Vec<usize>,
    prev: Vec<usize>,
    next: Vec<usize>,
}

impl Events {
    fn new(ops: &[Entry]) -> Events {
        // (time, calls before returns at equal times: that only makes ops more concurrent)
        let mut order: Vec<(Nanos, bool, usize)> = Vec::with_capacity(2 * ops.len());
        for (i, e) in ops.iter().enumerate() {
            order.push((e.invoke, false, i));
            order.push((e.complete.unwrap_or(Nanos::MAX), true, i));
        }
        order.sort_unstable();
        let n = order.len() + 1;
        let mut ev = Events {
            op: vec![NIL; n],
            is_call: vec![false; n],
            matching: vec![NIL; n],
            prev: vec![NIL; n],
            next: vec![NIL; n],
        };
        let mut call_at = vec![NIL; ops.len()];
        for (pos, &(_, is_return, op)) in order.iter().enumerate() {
            let idx = pos + 1;
            ev.op[idx] = op;
            ev.is_call[idx] = !is_return;
            if is_return {
                ev.matching[call_at[op]] = idx;
            } else {
                call_at[op] = idx;
            }
            ev.prev[idx] = idx - 1;
            ev.next[idx - 1] = idx;
        }
        ev
    }

    fn unlink(&mut self, i: usize) {
        let (p, n) = (self.prev[i], self.next[i]);
        self.next[p] = n;
        if n != NIL {
            self.prev[n] = p;
        }
    }

    fn relink(&mut self, i: usize) {
        let (p, n) = (self.prev[i], self.next[i]);
        self.next[p] = i;
        if n != NIL {
            self.prev[n] = i;
        }
    }

    fn lift(&mut self, call: usize) {
        self.unlink(call);
        self.unlink(self.matching[call]);
    }

    fn unlift(&mut self, call: usize) {
        self.relink(self.matching[call]);
        self.relink(call);
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(n: usize) -> Bits {
        Bits(vec![0; n.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
    fn clear(&mut self, i: usize) {
        self.0[i / 64] &= !(1 << (i % 64));
    }
}

/// Wing & Gong / Lowe search over one group's ops.
pub fn check_group(
    ops: &[Entry],
    initial: State,
    max_steps: u64,
    deadline: Instant,
) -> GroupVerdict {
    // A read whose reply was lost has no effect and constrains nothing.
    let ops: Vec<Entry> = ops
        .iter()
        .filter(|e| !(matches!(e.input, Input::Read { .. }) && e.output == Output::Unknown))
        .cloned()
        .collect();
    if ops.is_empty() {
        return GroupVerdict::Linearizable;
    }
    let mut ev = Events::new(&ops);
    let mut cache: HashSet<(Bits, State)> = HashSet::new();
    let mut calls: Vec<(usize, State)> = Vec::new();
    let mut linearized = Bits::new(ops.len());
    let mut state = initial;
    let mut entry = ev.next[HEAD];
    let mut steps = 0u64;
    // The deepest point reached, for the report.
    let mut best: (Vec<usize>, usize) = (Vec::new(), NIL);
    while ev.next[HEAD] != NIL {
        steps += 1;
        if steps > max_steps {
            return GroupVerdict::Unknown(format!("gave up after {max_steps} search steps"));
        }
        if steps.is_multiple_of(4096) && Instant::now() > deadline {
            return GroupVerdict::Unknown("ran out of time".into());
        }
        if entry == NIL {
            // Cannot happen (the last event is always a return); treated as a dead end.
            return GroupVerdict::Unknown("search walked off the event list".into());
        }
        let op = ev.op[entry];
        if ev.is_call[entry] {
            if let Some(next) = step(&state, &ops[op].input, &ops[op].output) {
                let mut lin = linearized.clone();
                lin.set(op);
                if cache.insert((lin.clone(), next)) {
                    calls.push((entry, state));
                    state = next;
                    linearized = lin;
                    ev.lift(entry);
                    entry = ev.next[HEAD];
                    continue;
                }
            }
            entry = ev.next[entry];
        } else {
            // The return of an op not yet linearized: everything before it is stuck.
            if calls.len() >= best.0.len() {
                best = (calls.iter().map(|&(c, _)| ev.op[c]).collect(), op);
            }
            let Some((call, prior)) = calls.pop() else {
                let stuck = if best.1 == NIL { op } else { best.1 };
                return GroupVerdict::Illegal {
                    stuck: Box::new(ops[stuck].clone()),
                    prefix: best.0.iter().map(|&i| ops[i].clone()).collect(),
                    minimal: Vec::new(),
                };
            };
            state = prior;
            linearized.clear(ev.op[call]);
            ev.unlift(call);
            entry = ev.next[call];
        }
    }
    GroupVerdict::Linearizable
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chaos::model::{Node, Refusal, WriteOp};

    fn op(invoke: u64, complete: Option<u64>, input: Input, output: Output) -> Entry {
        Entry::for_test(input, output, invoke, complete, false)
    }

    fn set(key: usize, value: u64) -> Input {
        Input::Write(vec![WriteOp::Set {
            key,
            value,
            expected: None,
        }])
    }

    fn cas(key: usize, value: u64, expected: i32) -> Input {
        Input::Write(vec![WriteOp::Set {
            key,
            value,
            expected: Some(expected),
        }])
    }

    fn read(key: usize) -> Input {
        Input::Read { key }
    }

    fn saw(value: u64, version: i32) -> Output {
        Output::Read(Some(Node { value, version }))
    }

    fn written(version: i32) -> Output {
        Output::Written(vec![Some(version)])
    }

    fn verdict(ops: &[Entry]) -> GroupVerdict {
        let deadline = Instant::now() + Duration::from_secs(10);
        check_group(ops, State::initial(), 1_000_000, deadline)
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = [
            op(0, Some(10), set(0, 1), written(1)),
            op(20, Some(30), read(0), saw(1, 1)),
            op(40, Some(50), cas(0, 2, 1), written(2)),
            op(60, Some(70), read(0), saw(2, 2)),
        ];
        assert_eq!(verdict(&h), GroupVerdict::Linearizable);
    }

    #[test]
    fn stale_read_after_acknowledged_write_is_not() {
        let h = [
            op(0, Some(10), set(0, 1), written(1)),
            // Starts after the write was acknowledged, yet sees the old value.
            op(20, Some(30), read(0), saw(0, 0)),
        ];
        match verdict(&h) {
            GroupVerdict::Illegal { stuck, .. } => assert_eq!(stuck.input, read(0)),
            v => panic!("expected illegal, got {v:?}"),
        }
    }

    #[test]
    fn concurrent_read_may_see_either_value() {
        let h = [
            op(0, Some(100), set(0, 1), written(1)),
            op(10, Some(20), read(0), saw(1, 1)),
            op(30, Some(40), read(0), saw(1, 1)),
        ];
        assert_eq!(verdict(&h), GroupVerdict::Linearizable);
        let h = [
            op(0, Some(100), set(0, 1), written(1)),
            op(10, Some(20), read(0), saw(0, 0)),
            op(30, Some(40), read(0), saw(1, 1)),
        ];
        assert_eq!(verdict(&h), GroupVerdict::Linearizable);
    }

    #[test]
    fn reads_going_back_in_time_are_not() {
        let h = [
            op(0, Some(100), set(0, 1), written(1)),
            op(10, Some(20), read(0), saw(1, 1)),
            // The write is still in flight, but it was already observed: no going back.
            op(30, Some(40), read(0), saw(0, 0)),
        ];
        assert!(matches!(verdict(&h), GroupVerdict::Illegal { .. }));
    }

    #[test]
    fn lost_acknowledged_write_is_not() {
        let h = [
            op(0, Some(10), set(0, 1), written(1)),
            op(20, Some(30), set(0, 2), written(2)),
            // The second write vanished.
            op(40, Some(50), read(0), saw(1, 1)),
        ];
        assert!(matches!(verdict(&h), GroupVerdict::Illegal { .. }));
    }

    #[test]
    fn unknown_write_may_or_may_not_take_effect_until_the_end() {
        // Never observed: fine (as if it never happened).
        let h = [
            op(0, None, set(0, 1), Output::Unknown),
            op(50, Some(60), read(0), saw(0, 0)),
        ];
        assert_eq!(verdict(&h), GroupVerdict::Linearizable);
        // Observed much later: fine too (it was applied late).
        let h = [
            op(0, None, set(0, 1), Output::Unknown),
            op(50, Some(60), read(0), saw(0, 0)),
            op(70, Some(80), read(0), saw(1, 1)),
        ];
        assert_eq!(verdict(&h), GroupVerdict::Linearizable);
        // But once observed it cannot un-happen.
        let h = [
            op(0, None, set(0, 1), Output::Unknown),
            op(50, Some(60), read(0), saw(1, 1)),
            op(70, Some(80), read(0), saw(0, 0)),
        ];
        assert!(matches!(verdict(&h), GroupVerdict::Illegal { .. }));
    }

    #[test]
    fn unknown_write_cannot_be_observed_before_it_was_invoked() {
        let h = [
            op(0, Some(10), read(0), saw(1, 1)),
            op(20, None, set(0, 1), Output::Unknown),
        ];
        assert!(matches!(verdict(&h), GroupVerdict::Illegal { .. }));
    }

    #[test]
    fn two_cas_at_the_same_version_cannot_both_win() {
        let h = [
            op(0, Some(100), cas(0, 1, 0), written(1)),
            op(0, Some(100), cas(0, 2, 0), written(1)),
        ];
        assert!(matches!(verdict(&h), GroupVerdict::Illegal { .. }));
        let h = [
            op(0, Some(100), cas(0, 1, 0), written(1)),
            op(
                0,
                Some(100),
                cas(0, 2, 0),
                Output::Refused {
                    op: None,
                    why: Refusal::BadVersion,
                },
            ),
            op(110, Some(120), read(0), saw(1, 1)),
        ];
        assert_eq!(verdict(&h), GroupVerdict::Linearizable);
    }

    #[test]
    fn a_refused_cas_must_have_had_a_reason() {
        // Nothing else wrote, so version 0 matched: the refusal is wrong.
        let h = [op(
            0,
            Some(10),
            cas(0, 1, 0),
            Output::Refused {
                op: None,
                why: Refusal::BadVersion,
            },
        )];
        assert!(matches!(verdict(&h), GroupVerdict::Illegal { .. }));
    }

    #[test]
    fn torn_transaction_is_not_linearizable() {
        let txn = Input::Write(vec![
            WriteOp::Set {
                key: 0,
                value: 5,
                expected: None,
            },
            WriteOp::Set {
                key: 1,
                value: 6,
                expected: None,
            },
        ]);
        let h = [
            op(
                0,
                Some(10),
                txn.clone(),
                Output::Written(vec![Some(1), Some(1)]),
            ),
            op(20, Some(30), read(0), saw(5, 1)),
            // The txn's second half is missing.
            op(40, Some(50), read(1), saw(0, 0)),
        ];
        assert!(matches!(verdict(&h), GroupVerdict::Illegal { .. }));
    }

    #[test]
    fn budget_exhaustion_reports_unknown() {
        // Many concurrent unknown writes make a large search; one step is not enough.
        let mut h: Vec<Entry> = (0..20)
            .map(|i| op(i, None, set(0, i + 1), Output::Unknown))
            .collect();
        h.push(op(100, Some(110), read(0), saw(999, 1)));
        let deadline = Instant::now() + Duration::from_secs(10);
        assert!(matches!(
            check_group(&h, State::initial(), 1, deadline),
            GroupVerdict::Unknown(_)
        ));
    }

    #[test]
    fn shrinking_keeps_only_what_the_violation_needs() {
        let mut h = vec![
            op(0, Some(10), set(0, 1), written(1)),
            op(20, Some(30), read(0), saw(1, 1)),
            op(40, Some(50), set(1, 2), written(1)),
            op(60, Some(70), read(1), saw(2, 1)),
            op(
                80,
                Some(90),
                cas(1, 3, 0),
                Output::Refused {
                    op: None,
                    why: Refusal::BadVersion,
                },
            ),
        ];
        // The violation: a read after the acknowledged write of 1 sees the initial value.
        h.push(op(100, Some(110), read(0), saw(0, 0)));
        for i in 0..20 {
            h.push(op(120 + i * 10, Some(125 + i * 10), read(1), saw(2, 1)));
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        assert!(matches!(
            check_group(&h, State::initial(), 1_000_000, deadline),
            GroupVerdict::Illegal { .. }
        ));
        let minimal = minimize(&h, State::initial(), 1_000_000, deadline);
        let inputs: Vec<&Input> = minimal.iter().map(|e| &e.input).collect();
        // Reads and refusals that do not matter are gone; the unrelated acknowledged write stays
        // (dropping a write is unsound: a read may need it) but no longer needs its reply.
        assert_eq!(
            inputs,
            vec![&set(0, 1), &set(1, 2), &read(0)],
            "{minimal:#?}"
        );
        assert_eq!(minimal[1].output, Output::Unknown);
        // The write stays acknowledged: the violation needs its reply.
        assert_eq!(minimal[0].output, written(1));
        // Sound: the shrunk history is itself not linearizable.
        assert!(matches!(
            check_group(&minimal, State::initial(), 1_000_000, deadline),
            GroupVerdict::Illegal { .. }
        ));
    }

    #[test]
    fn groups_are_checked_separately() {
        let mut a = op(0, Some(10), set(0, 1), written(1));
        a.group = 1;
        let mut b = op(20, Some(30), read(0), saw(0, 0));
        b.group = 2; // another group: its key 0 was never written
        let v = check(&[a.clone(), b], State::initial(), Budget::default());
        assert!(v.is_linearizable(), "{}", v.describe());
        let mut c = op(20, Some(30), read(0), saw(0, 0));
        c.group = 1;
        let v = check(&[a, c], State::initial(), Budget::default());
        assert!(v.is_illegal());
    }
}
