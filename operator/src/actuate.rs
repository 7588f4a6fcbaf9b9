//! Actuation: executes one planned step (server-side apply of owned objects with owner
//! references, deletes, membership admin RPCs to the leader) and records an Event for it. Also
//! keeps the shared objects (services, config map, disruption budget) applied.

use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::admin::{self, AdminError};
use crate::crd::KordCluster;
use crate::objects::{self, Names, ObjectError, Start, LABEL_RETIRED, MANAGER};
use crate::observe::Observation;
use crate::plan::{Kind, MemberId, Step};

#[derive(Debug, thiserror::Error)]
pub enum ActuateError {
    #[error("{verb} {what}: {source}")]
    Kube {
        verb: &'static str,
        what: String,
        source: kube::Error,
    },
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    Object(#[from] ObjectError),
    #[error("step {0} needs the leader, and no leader answers")]
    NoLeader(String),
}

impl ActuateError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            ActuateError::Kube { .. } => "kube",
            ActuateError::Admin(_) => "admin_rpc",
            ActuateError::Object(_) => "object",
            ActuateError::NoLeader(_) => "no_leader",
        }
    }
}

fn kube_err(
    verb: &'static str,
    what: impl Into<String>,
) -> impl FnOnce(kube::Error) -> ActuateError {
    let what = what.into();
    move |source| ActuateError::Kube { verb, what, source }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

async fn apply<K>(client: &kube::Client, ns: &str, obj: &K) -> Result<(), ActuateError>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let api = Api::<K>::namespaced(client.clone(), ns);
    api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .map_err(kube_err("apply", format!("{} {name}", K::kind(&()))))?;
    Ok(())
}

async fn delete<K>(client: &kube::Client, ns: &str, name: &str) -> Result<(), ActuateError>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api = Api::<K>::namespaced(client.clone(), ns);
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(kube_err("delete", format!("{} {name}", K::kind(&())))(e)),
    }
}

async fn label_retired<K>(client: &kube::Client, ns: &str, name: &str) -> Result<(), ActuateError>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api = Api::<K>::namespaced(client.clone(), ns);
    let patch = serde_json::json!({"metadata": {"labels": {LABEL_RETIRED: "true"}}});
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(kube_err("label", format!("{} {name}", K::kind(&())))(e)),
    }
}

/// Whether the API server serves policy/v1 PodDisruptionBudgets (1.21+; 1.20 only v1beta1).
pub async fn serves_pdb_v1(client: &kube::Client) -> bool {
    match client.list_api_group_resources("policy/v1").await {
        Ok(list) => list
            .resources
            .iter()
            .any(|r| r.name == "poddisruptionbudgets"),
        Err(_) => false,
    }
}

/// Applies the services, config map and (when offered) the disruption budget.
#[tracing::instrument(skip_all, fields(cluster = %names.cluster))]
pub async fn ensure_shared(
    client: &kube::Client,
    kc: &KordCluster,
    names: &Names,
    pdb_v1: bool,
) -> Result<(), ActuateError> {
    let ns = &names.namespace;
    apply::<Service>(client, ns, &objects::peer_service(kc, names)?).await?;
    apply::<Service>(client, ns, &objects::client_service(kc, names)?).await?;
    apply::<ConfigMap>(client, ns, &objects::config_map(kc, names)?).await?;
    if pdb_v1 {
        apply::<PodDisruptionBudget>(client, ns, &objects::pdb(kc, names)?).await?;
    }
    Ok(())
}

/// Records the next free member id before any object with that id exists, so a crash after
/// creating them can never hand the same id out again.
async fn reserve_id(
    client: &kube::Client,
    names: &Names,
    id: MemberId,
) -> Result<(), ActuateError> {
    let api = Api::<KordCluster>::namespaced(client.clone(), &names.namespace);
    let patch = serde_json::json!({"status": {"nextMemberId": id + 1}});
    api.patch_status(
        &names.cluster,
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(kube_err(
        "patch status of",
        format!("KordCluster {}", names.cluster),
    ))?;
    Ok(())
}

fn leader_addr(obs: &Observation, step: &Step) -> Result<String, ActuateError> {
    obs.membership
        .as_ref()
        .map(|m| m.leader_addr.clone())
        .ok_or_else(|| ActuateError::NoLeader(step.to_string()))
}

fn kind_of(obs: &Observation, id: MemberId) -> Kind {
    obs.observed
        .members
        .get(&id)
        .map_or(Kind::Voter, |m| m.kind)
}

/// Executes one step. Every step is idempotent, so a retry after a failure is harmless.
#[tracing::instrument(skip_all, fields(cluster = %names.cluster, step = %step))]
pub async fn execute(
    client: &kube::Client,
    kc: &KordCluster,
    names: &Names,
    obs: &Observation,
    step: &Step,
) -> Result<(), ActuateError> {
    let ns = &names.namespace;
    let create = |id: MemberId, kind: Kind, start: Start| async move {
        reserve_id(client, names, id).await?;
        if !kc.spec.storage.ephemeral {
            apply::<PersistentVolumeClaim>(client, ns, &objects::volume(kc, names, id, kind)?)
                .await?;
        }
        apply::<Pod>(client, ns, &objects::pod(kc, names, id, kind, start)?).await
    };
    match *step {
        Step::Bootstrap { id } => create(id, Kind::Voter, Start::Bootstrap).await,
        Step::CreateMember { id, kind } => create(id, kind, Start::Join).await,
        Step::CreatePod { id, bootstrap } => {
            let start = if bootstrap {
                Start::Bootstrap
            } else {
                Start::Join
            };
            apply::<Pod>(
                client,
                ns,
                &objects::pod(kc, names, id, kind_of(obs, id), start)?,
            )
            .await
        }
        Step::Retire { id, .. } => {
            label_retired::<PersistentVolumeClaim>(client, ns, &names.volume(id)).await?;
            label_retired::<Pod>(client, ns, &names.pod(id)).await
        }
        Step::Promote { id } => Ok(admin::promote(&leader_addr(obs, step)?, id).await?),
        Step::TransferLeader { to, .. } => {
            Ok(admin::transfer_leader(&leader_addr(obs, step)?, to).await?)
        }
        Step::RemoveMember { id } => Ok(admin::remove(&leader_addr(obs, step)?, id).await?),
        Step::RestartPod { id } | Step::DeletePod { id } => {
            delete::<Pod>(client, ns, &names.pod(id)).await
        }
        Step::DeleteVolume { id } => {
            delete::<PersistentVolumeClaim>(client, ns, &names.volume(id)).await
        }
    }
}

/// The Event reason of a step (PascalCase, as `kubectl describe` shows it).
pub fn reason(step: &Step) -> &'static str {
    match step {
        Step::Bootstrap { .. } => "Bootstrap",
        Step::CreateMember { .. } => "CreateMember",
        Step::CreatePod { .. } => "RecreatePod",
        Step::Retire { .. } => "RetireMember",
        Step::Promote { .. } => "PromoteMember",
        Step::TransferLeader { .. } => "TransferLeader",
        Step::RemoveMember { .. } => "RemoveMember",
        Step::RestartPod { .. } => "RestartPod",
        Step::DeletePod { .. } => "DeletePod",
        Step::DeleteVolume { .. } => "DeleteVolume",
    }
}

/// Publishes an Event on the KordCluster; a failure to record is logged, never fatal.
pub async fn event(
    recorder: &Recorder,
    kc: &KordCluster,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let ev = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: reason.to_string(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&ev, &kc.object_ref(&())).await {
        tracing::warn!(error = %e, "could not record an event");
    }
}
