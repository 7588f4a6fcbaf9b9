//! The sequential specification the checker compares histories against: one key group of the
//! znode tree (a few leaf znodes with data and version), and how each operation changes it.
//!
//! Every operation of the workload touches one group only, so groups are checked separately
//! (P-compositionality: a history is linearizable iff each group's sub-history is).

/// Leaf znodes per group (`/chaos/g<G>/k<K>`).
pub const KEYS_PER_GROUP: usize = 2;

/// A znode as the model knows it: the id of the value it holds and its data version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Node {
    /// Values are unique per write (`0` is the value written at setup).
    pub value: u64,
    pub version: i32,
}

/// One group's znodes; `None` means the node does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct State {
    pub nodes: [Option<Node>; KEYS_PER_GROUP],
}

impl State {
    /// What setup leaves: every key created with value 0.
    pub fn initial() -> State {
        State {
            nodes: [Some(Node {
                value: 0,
                version: 0,
            }); KEYS_PER_GROUP],
        }
    }
}

/// One op of a write (a plain write is a one-op transaction).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WriteOp {
    Create {
        key: usize,
        value: u64,
    },
    Set {
        key: usize,
        value: u64,
        expected: Option<i32>,
    },
    Delete {
        key: usize,
        expected: Option<i32>,
    },
    Check {
        key: usize,
        expected: Option<i32>,
    },
}

impl WriteOp {
    pub fn key(&self) -> usize {
        match *self {
            WriteOp::Create { key, .. }
            | WriteOp::Set { key, .. }
            | WriteOp::Delete { key, .. }
            | WriteOp::Check { key, .. } => key,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Input {
    Read {
        key: usize,
    },
    /// Applied atomically, all ops or none.
    Write(Vec<WriteOp>),
}

/// Why the server refused a write (definitely not applied).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    NoNode,
    NodeExists,
    BadVersion,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Output {
    Read(Option<Node>),
    /// Applied; per op, the node's version afterwards (`None` for deletes and checks).
    Written(Vec<Option<i32>>),
    /// Not applied: op `op` (when the server named it) failed with `why`.
    Refused {
        op: Option<usize>,
        why: Refusal,
    },
    /// Timed out or lost: may or may not have been applied.
    Unknown,
}

/// A write's effect: the new state and, per op, the node's version afterwards.
pub type Applied = (State, Vec<Option<i32>>);

/// The write's effect on `state`, or the index of the failing op and why.
pub fn apply(state: &State, ops: &[WriteOp]) -> Result<Applied, (usize, Refusal)> {
    let mut next = *state;
    let mut versions = Vec::with_capacity(ops.len());
    for (i, op) in ops.iter().enumerate() {
        let node = next.nodes[op.key()];
        let version_ok = |expected: Option<i32>, n: Node| expected.is_none_or(|v| v == n.version);
        match *op {
            WriteOp::Create { key, value } => {
                if node.is_some() {
                    return Err((i, Refusal::NodeExists));
                }
                next.nodes[key] = Some(Node { value, version: 0 });
                versions.push(Some(0));
            }
            WriteOp::Set {
                key,
                value,
                expected,
            } => {
                let n = node.ok_or((i, Refusal::NoNode))?;
                if !version_ok(expected, n) {
                    return Err((i, Refusal::BadVersion));
                }
                let version = n.version + 1;
                next.nodes[key] = Some(Node { value, version });
                versions.push(Some(version));
            }
            WriteOp::Delete { key, expected } => {
                let n = node.ok_or((i, Refusal::NoNode))?;
                if !version_ok(expected, n) {
                    return Err((i, Refusal::BadVersion));
                }
                next.nodes[key] = None;
                versions.push(None);
            }
            WriteOp::Check { expected, .. } => {
                let n = node.ok_or((i, Refusal::NoNode))?;
                if !version_ok(expected, n) {
                    return Err((i, Refusal::BadVersion));
                }
                versions.push(None);
            }
        }
    }
    Ok((next, versions))
}

/// The model's transition: `Some(next state)` when `output` is a possible result of `input`
/// in `state`, `None` when it is not.
pub fn step(state: &State, input: &Input, output: &Output) -> Option<State> {
    match (input, output) {
        (Input::Read { key }, Output::Read(seen)) => (state.nodes[*key] == *seen).then_some(*state),
        // A read whose reply was lost tells nothing (readers drop them; harmless if kept).
        (Input::Read { .. }, Output::Unknown) => Some(*state),
        (Input::Write(ops), Output::Unknown) => Some(match apply(state, ops) {
            Ok((next, _)) => next,
            Err(_) => *state,
        }),
        (Input::Write(ops), Output::Written(got)) => match apply(state, ops) {
            Ok((next, versions)) if versions == *got => Some(next),
            _ => None,
        },
        (Input::Write(ops), Output::Refused { op, why }) => match apply(state, ops) {
            Err((i, r)) if r == *why && op.is_none_or(|o| o == i) => Some(*state),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_bumps_the_version_and_cas_checks_it() {
        let s = State::initial();
        let set = Input::Write(vec![WriteOp::Set {
            key: 0,
            value: 7,
            expected: Some(0),
        }]);
        let next = step(&s, &set, &Output::Written(vec![Some(1)])).expect("cas at version 0");
        assert_eq!(
            next.nodes[0],
            Some(Node {
                value: 7,
                version: 1
            })
        );
        assert!(step(&s, &set, &Output::Written(vec![Some(2)])).is_none());
        let refused = Output::Refused {
            op: Some(0),
            why: Refusal::BadVersion,
        };
        assert!(
            step(&s, &set, &refused).is_none(),
            "version 0 matches: no refusal"
        );
        assert!(step(&next, &set, &refused).is_some());
    }

    #[test]
    fn txn_is_all_or_nothing() {
        let s = State::initial();
        let txn = Input::Write(vec![
            WriteOp::Set {
                key: 0,
                value: 5,
                expected: None,
            },
            WriteOp::Check {
                key: 1,
                expected: Some(3),
            },
        ]);
        let out = Output::Refused {
            op: Some(1),
            why: Refusal::BadVersion,
        };
        assert_eq!(step(&s, &txn, &out), Some(s));
        // Unknown: applied or not, never half.
        assert_eq!(step(&s, &txn, &Output::Unknown), Some(s));
    }

    #[test]
    fn delete_then_create_restarts_the_version() {
        let s = State::initial();
        let del = Input::Write(vec![WriteOp::Delete {
            key: 1,
            expected: None,
        }]);
        let s = step(&s, &del, &Output::Written(vec![None])).expect("delete");
        assert_eq!(
            step(&s, &Input::Read { key: 1 }, &Output::Read(None)),
            Some(s)
        );
        let create = Input::Write(vec![WriteOp::Create { key: 1, value: 9 }]);
        let s = step(&s, &create, &Output::Written(vec![Some(0)])).expect("create");
        assert_eq!(
            s.nodes[1],
            Some(Node {
                value: 9,
                version: 0
            })
        );
    }
}
