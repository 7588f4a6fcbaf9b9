//! The chaos suite: real `kord` clusters under a seeded workload and a nemesis, with the
//! recorded history checked for linearizability, watch delivery, state convergence and lost
//! writes. Modules follow a run's data flow:
//! `workload` (ops) → `history` (records) ← `nemesis` (faults, via `netns` for the network)
//! → `linearizability` (against `model`), `watches` → `run` (orchestration and report).

pub mod history;
pub mod linearizability;
pub mod model;
pub mod nemesis;
pub mod netns;
pub mod run;
pub mod watches;
pub mod workload;

pub use nemesis::Fault;
pub use run::{run, ChaosOpts, Report};
