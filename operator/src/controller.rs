//! The reconcile loop: observe → plan → act (one step) → status, for each `KordCluster`, with
//! an error policy (retry with a delay, never crash), Events, tracing spans and metrics.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};

use crate::actuate::{self, ActuateError};
use crate::crd::{Condition, KordCluster, KordClusterStatus, SpecError};
use crate::metrics::{ErrorLabels, Metrics, StepLabels};
use crate::objects::{self, Names, ObjectError, LABEL_MANAGED_BY, MANAGER};
use crate::observe::{self, Observation, ObserveError};
use crate::plan::{self, majority, Desired, Plan, RaftRole, Step, Wait, DEFAULT_JOIN_TIMEOUT_MS};

/// After a step: look again soon (the next step usually follows right away).
const REQUEUE_AFTER_STEP: Duration = Duration::from_secs(2);
/// While waiting (a learner catching up, a pod starting): poll at a calm pace.
const REQUEUE_WAITING: Duration = Duration::from_secs(10);
/// Converged: a periodic check; changes to owned pods and volumes trigger earlier.
const REQUEUE_CONVERGED: Duration = Duration::from_secs(60);
const REQUEUE_ERROR: Duration = Duration::from_secs(15);
const DEBOUNCE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid spec: {0}")]
    Spec(#[from] SpecError),
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error(transparent)]
    Observe(#[from] ObserveError),
    #[error(transparent)]
    Actuate(#[from] ActuateError),
    #[error("patching status: {0}")]
    Status(kube::Error),
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Spec(_) => "spec",
            Error::Object(_) => "object",
            Error::Observe(_) => "observe",
            Error::Actuate(e) => e.metric_label(),
            Error::Status(_) => "status",
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: kube::Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// The API server serves policy/v1 PodDisruptionBudgets.
    pub pdb_v1: bool,
    /// Clusters already told (once per operator start) that no PDB is created.
    pub pdb_warned: Mutex<HashSet<String>>,
    /// Where to reach a cluster's members; default: its client service's in-cluster DNS name.
    pub member_endpoint: Option<String>,
}

impl Context {
    pub async fn new(
        client: kube::Client,
        metrics: Arc<Metrics>,
        member_endpoint: Option<String>,
    ) -> Context {
        let reporter = Reporter {
            controller: MANAGER.to_string(),
            instance: std::env::var("POD_NAME").ok(),
        };
        let pdb_v1 = actuate::serves_pdb_v1(&client).await;
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            pdb_v1,
            pdb_warned: Mutex::new(HashSet::new()),
            member_endpoint,
        }
    }
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn desired(kc: &KordCluster) -> Result<Desired, SpecError> {
    kc.spec.validate()?;
    let replace_after = kc.spec.replace_after()?;
    Ok(Desired {
        voters: usize::try_from(kc.spec.replicas).unwrap_or(1),
        observers: usize::try_from(kc.spec.observers).unwrap_or(0),
        revision: objects::pod_revision(&kc.spec),
        ephemeral: kc.spec.storage.ephemeral,
        replace_after: u64::try_from(replace_after.as_millis()).unwrap_or(u64::MAX),
        join_timeout: DEFAULT_JOIN_TIMEOUT_MS,
    })
}

/// One reconcile of one cluster: at most one step.
#[tracing::instrument(skip_all, fields(cluster = %kc.name_any(), namespace = kc.namespace().unwrap_or_default()))]
pub async fn reconcile(kc: Arc<KordCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let result = reconcile_inner(&kc, &ctx).await;
    ctx.metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    result
}

async fn reconcile_inner(kc: &KordCluster, ctx: &Context) -> Result<Action, Error> {
    let names = Names::of(kc)?;
    let desired = match desired(kc) {
        Ok(d) => d,
        Err(e) => {
            actuate::event(
                &ctx.recorder,
                kc,
                EventType::Warning,
                "InvalidSpec",
                e.to_string(),
            )
            .await;
            let status = degraded_status(kc, &names, "InvalidSpec", &e.to_string());
            patch_status(ctx, &names, &status).await?;
            return Err(e.into());
        }
    };
    actuate::ensure_shared(&ctx.client, kc, &names, ctx.pdb_v1).await?;
    if !ctx.pdb_v1 && warn_once(ctx, &names) {
        let note =
            "the API server does not serve policy/v1 PodDisruptionBudgets (Kubernetes < 1.21): \
                    no disruption budget is created; drain nodes one at a time";
        actuate::event(
            &ctx.recorder,
            kc,
            EventType::Warning,
            "NoPodDisruptionBudget",
            note.into(),
        )
        .await;
    }
    let endpoint = ctx
        .member_endpoint
        .clone()
        .unwrap_or_else(|| names.client_endpoint());
    let obs = observe::observe(&ctx.client, kc, &names, &endpoint, now_millis()).await?;
    let planned = plan::plan(&desired, &obs.observed);
    tracing::info!(plan = ?planned, "planned");
    let mut result = Ok(());
    if let Plan::Act(step) = &planned {
        result = actuate::execute(&ctx.client, kc, &names, &obs, step).await;
        let label = actuate::reason(step).to_string();
        match &result {
            Ok(()) => {
                ctx.metrics
                    .steps
                    .get_or_create(&StepLabels {
                        step: label.clone(),
                    })
                    .inc();
                actuate::event(
                    &ctx.recorder,
                    kc,
                    EventType::Normal,
                    &label,
                    step.to_string(),
                )
                .await;
            }
            Err(e) => {
                let note = format!("{step} failed: {e}");
                actuate::event(
                    &ctx.recorder,
                    kc,
                    EventType::Warning,
                    &format!("{label}Failed"),
                    note,
                )
                .await;
            }
        }
    }
    let status = status(kc, &names, &obs, &planned);
    // An unchanged status is not written: each write is a watch event that triggers a reconcile.
    if kc.status.as_ref() != Some(&status) {
        patch_status(ctx, &names, &status).await?;
    }
    result?;
    Ok(match planned {
        Plan::Act(_) => Action::requeue(REQUEUE_AFTER_STEP),
        Plan::Wait(_) => Action::requeue(REQUEUE_WAITING),
        Plan::Converged => Action::requeue(REQUEUE_CONVERGED),
    })
}

fn warn_once(ctx: &Context, names: &Names) -> bool {
    let key = format!("{}/{}", names.namespace, names.cluster);
    match ctx.pdb_warned.lock() {
        Ok(mut warned) => warned.insert(key),
        Err(_) => false,
    }
}

/// Retry later; the error is already in the logs, an Event and the metrics.
pub fn error_policy(_kc: Arc<KordCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(%error, "reconcile failed");
    ctx.metrics
        .errors
        .get_or_create(&ErrorLabels {
            kind: error.metric_label().to_string(),
        })
        .inc();
    Action::requeue(REQUEUE_ERROR)
}

async fn patch_status(
    ctx: &Context,
    names: &Names,
    status: &KordClusterStatus,
) -> Result<(), Error> {
    let api = Api::<KordCluster>::namespaced(ctx.client.clone(), &names.namespace);
    let patch = serde_json::json!({ "status": status });
    api.patch_status(
        &names.cluster,
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(Error::Status)?;
    Ok(())
}

fn condition(kc: &KordCluster, type_: &str, on: bool, reason: &str, message: &str) -> Condition {
    let status = if on { "True" } else { "False" };
    // Keep the transition time while the status stays the same.
    let previous = kc
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_));
    let last_transition_time = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => Some(Timestamp::now().to_string()),
    };
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: (!reason.is_empty()).then(|| reason.to_string()),
        message: (!message.is_empty()).then(|| message.to_string()),
        last_transition_time,
    }
}

fn degraded_status(
    kc: &KordCluster,
    names: &Names,
    reason: &str,
    message: &str,
) -> KordClusterStatus {
    let mut status = kc.status.clone().unwrap_or_default();
    status.observed_generation = kc.metadata.generation;
    status.phase = Some("Degraded".into());
    status.selector = Some(names.selector_string());
    status.conditions = vec![
        condition(kc, "Available", false, reason, message),
        condition(kc, "Progressing", false, reason, message),
        condition(kc, "Degraded", true, reason, message),
    ];
    status
}

/// The status after this reconcile: members, leader, phase and the three conditions.
pub fn status(
    kc: &KordCluster,
    names: &Names,
    obs: &Observation,
    planned: &Plan,
) -> KordClusterStatus {
    let o = &obs.observed;
    let voters = o
        .members
        .values()
        .filter(|m| m.raft == Some(RaftRole::Voter))
        .count();
    let healthy_voters = o
        .members
        .values()
        .filter(|m| m.raft == Some(RaftRole::Voter) && m.healthy)
        .count();
    let ready = o
        .members
        .values()
        .filter(|m| m.raft.is_some() && m.healthy)
        .count();
    let available = o.raft.is_some() && voters > 0 && healthy_voters >= majority(voters);
    let reserved = match planned {
        Plan::Act(Step::Bootstrap { id } | Step::CreateMember { id, .. }) => id + 1,
        _ => 0,
    };
    let previous = kc.status.clone().unwrap_or_default();
    let (phase, progress, degraded): (&str, String, Option<(&str, String)>) = match planned {
        Plan::Converged => ("Running", "the cluster matches the spec".into(), None),
        Plan::Act(step) => (phase_of(step), step.to_string(), None),
        Plan::Wait(wait) if wait.degraded() => {
            let mut why = wait.to_string();
            if let Some(e) = &obs.membership_error {
                why = format!("{why} ({e})");
            }
            ("Degraded", why.clone(), Some((wait_reason(wait), why)))
        }
        Plan::Wait(Wait::Bootstrapping) => ("Bootstrapping", Wait::Bootstrapping.to_string(), None),
        Plan::Wait(wait) => ("Reconciling", wait.to_string(), None),
    };
    let converged = matches!(planned, Plan::Converged);
    KordClusterStatus {
        observed_generation: kc.metadata.generation,
        phase: Some(phase.to_string()),
        leader: obs.leader_pod.clone(),
        replicas: i32::try_from(voters).unwrap_or(i32::MAX),
        selector: Some(names.selector_string()),
        ready_members: i32::try_from(ready).unwrap_or(i32::MAX),
        members: obs.members.clone(),
        membership_change: (!converged).then(|| progress.clone()),
        next_member_id: o.next_id.max(reserved).max(previous.next_member_id),
        bootstrapped: o.bootstrapped || o.raft.is_some(),
        conditions: vec![
            condition(
                kc,
                "Available",
                available,
                if available {
                    "QuorumHealthy"
                } else {
                    "NoQuorum"
                },
                &format!("{healthy_voters} of {voters} voters healthy"),
            ),
            condition(
                kc,
                "Progressing",
                !converged && degraded.is_none(),
                if converged { "Converged" } else { "Step" },
                &progress,
            ),
            match &degraded {
                Some((reason, why)) => condition(kc, "Degraded", true, reason, why),
                None => condition(kc, "Degraded", false, "Healthy", ""),
            },
        ],
    }
}

fn phase_of(step: &Step) -> &'static str {
    match step {
        Step::Bootstrap { .. } => "Bootstrapping",
        Step::RestartPod { .. } => "Updating",
        Step::Retire {
            reason: plan::RetireReason::Outdated,
            ..
        } => "Updating",
        Step::Retire {
            reason: plan::RetireReason::DataLost | plan::RetireReason::Unhealthy,
            ..
        } => "Replacing",
        _ => "Scaling",
    }
}

fn wait_reason(wait: &Wait) -> &'static str {
    match wait {
        Wait::NoLeader => "NoLeader",
        Wait::AllDataLost => "AllDataLost",
        Wait::QuorumUnhealthy { .. } => "QuorumUnhealthy",
        _ => "Waiting",
    }
}

/// Runs the controller until the process is signalled. `namespace`: watch only that one.
pub async fn run(
    client: kube::Client,
    namespace: Option<String>,
    metrics: Arc<Metrics>,
    member_endpoint: Option<String>,
) {
    let (clusters, pods, volumes) = match &namespace {
        Some(ns) => (
            Api::<KordCluster>::namespaced(client.clone(), ns),
            Api::<Pod>::namespaced(client.clone(), ns),
            Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
        ),
    };
    let ctx = Arc::new(Context::new(client, metrics, member_endpoint).await);
    let owned = watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGER}"));
    // Debounced: status writes (a learner's lag, say) are watch events too, and a burst of
    // them should cost one reconcile, not one each.
    let config = kube::runtime::controller::Config::default().debounce(DEBOUNCE);
    Controller::new(clusters, watcher::Config::default())
        .with_config(config)
        .owns(pods, owned.clone())
        .owns(volumes, owned)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => tracing::debug!(cluster = %obj.name, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile did not run"),
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Kind, Member, Observed, RaftView};
    use std::collections::BTreeMap;

    fn cluster() -> KordCluster {
        let spec = serde_json::from_value(serde_json::json!({"replicas": 3})).expect("spec");
        let mut kc = KordCluster::new("demo", spec);
        kc.metadata.namespace = Some("ns".into());
        kc.metadata.generation = Some(4);
        kc
    }

    fn voter(healthy: bool) -> Member {
        Member {
            kind: Kind::Voter,
            retired: false,
            pod: None,
            volume: true,
            raft: Some(RaftRole::Voter),
            lag: 0,
            healthy,
            unhealthy_since: 0,
            created_at: 0,
        }
    }

    fn observation(healthy: [bool; 3], leader: bool) -> Observation {
        let members: BTreeMap<u64, Member> = (1..=3)
            .map(|id| (id, voter(healthy[id as usize - 1])))
            .collect();
        Observation {
            observed: Observed {
                now: 0,
                next_id: 4,
                bootstrapped: true,
                members,
                raft: leader.then_some(RaftView {
                    leader: 1,
                    change_in_progress: false,
                }),
            },
            membership: None,
            membership_error: (!leader).then(|| "cannot reach demo.ns.svc:7379".to_string()),
            members: Vec::new(),
            leader_pod: leader.then(|| "demo-1".to_string()),
        }
    }

    fn cond<'a>(s: &'a KordClusterStatus, t: &str) -> &'a Condition {
        s.conditions
            .iter()
            .find(|c| c.type_ == t)
            .expect("condition")
    }

    #[test]
    fn conditions_follow_the_plan() {
        let kc = cluster();
        let names = Names::of(&kc).expect("names");
        let ok = status(&kc, &names, &observation([true; 3], true), &Plan::Converged);
        assert_eq!(ok.phase.as_deref(), Some("Running"));
        assert_eq!(cond(&ok, "Available").status, "True");
        assert_eq!(cond(&ok, "Progressing").status, "False");
        assert_eq!(cond(&ok, "Degraded").status, "False");
        assert_eq!(
            (ok.replicas, ok.ready_members, ok.observed_generation),
            (3, 3, Some(4))
        );
        assert_eq!(ok.membership_change, None);

        let step = Plan::Act(Step::CreateMember {
            id: 4,
            kind: Kind::Voter,
        });
        let scaling = status(&kc, &names, &observation([true; 3], true), &step);
        assert_eq!(scaling.phase.as_deref(), Some("Scaling"));
        assert_eq!(cond(&scaling, "Progressing").status, "True");
        assert_eq!(
            scaling.next_member_id, 5,
            "the id just used is never handed out again"
        );
        assert!(scaling
            .membership_change
            .expect("step")
            .contains("member 4"));

        let lost = status(
            &kc,
            &names,
            &observation([true, false, false], false),
            &Plan::Wait(Wait::NoLeader),
        );
        assert_eq!(lost.phase.as_deref(), Some("Degraded"));
        assert_eq!(cond(&lost, "Available").status, "False");
        let degraded = cond(&lost, "Degraded");
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_deref()),
            ("True", Some("NoLeader"))
        );
        assert!(
            degraded
                .message
                .as_deref()
                .unwrap_or("")
                .contains("cannot reach"),
            "{degraded:?}"
        );
    }
}
