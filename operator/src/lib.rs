//! The Kubernetes operator for `KordCluster` resources. Data flow of one reconcile:
//! `crd` (the resource) → `observe` (pods, volumes and Raft membership through `admin` → one
//! `plan::Observed`) → `plan` (pure: the next single step) → `actuate` (executes that step:
//! server-side apply of `objects`, admin RPCs, events) → `controller` (the loop, error policy,
//! status, `metrics`).

pub mod actuate;
pub mod admin;
pub mod controller;
pub mod crd;
pub mod metrics;
pub mod objects;
pub mod observe;
pub mod plan;
