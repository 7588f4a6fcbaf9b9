//! The Kubernetes operator for `KordCluster` resources. Data flow of one reconcile:
//! `crd` (the resource) → `observe` (pods, volumes and Raft membership → one `plan::Observed`)
//! → `plan` (pure: the next single step) → `actuate` (executes that step: server-side apply,
//! admin RPCs, events) → `controller` (the loop, error policy, status, metrics).

pub mod crd;
pub mod plan;
