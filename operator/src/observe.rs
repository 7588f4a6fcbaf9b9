//! Observation: the cluster's member pods and volumes (listed from the API server, never from a
//! possibly stale cache) and the Raft membership as the leader reports it, merged into one
//! `plan::Observed` keyed by member id, plus what the status reports about each member.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::jiff::Timestamp;
use kord_api::v1::MemberRole;
use kube::api::ListParams;
use kube::{Api, ResourceExt};

use crate::admin::{self, Membership};
use crate::crd::{KordCluster, MemberStatus};
use crate::objects::{Names, ANNOTATION_POD_REVISION, LABEL_KIND, LABEL_MEMBER_ID, LABEL_RETIRED};
use crate::plan::{Kind, Member, MemberId, Millis, Observed, Pod as PlanPod, RaftRole, RaftView};

/// A member the leader has not heard from for this long is unhealthy even if its pod is ready.
pub const CONTACT_TIMEOUT_MS: u64 = 5_000;

#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("listing {what}: {source}")]
    List {
        what: &'static str,
        source: kube::Error,
    },
}

/// One reconcile's view of the world.
#[derive(Debug, Clone)]
pub struct Observation {
    pub observed: Observed,
    pub membership: Option<Membership>,
    /// Why no membership could be read (for the Degraded condition).
    pub membership_error: Option<String>,
    pub members: Vec<MemberStatus>,
    pub leader_pod: Option<String>,
}

/// Lists the member pods and volumes and asks the cluster for its membership.
#[tracing::instrument(skip_all, fields(cluster = %names.cluster))]
pub async fn observe(
    client: &kube::Client,
    kc: &KordCluster,
    names: &Names,
    endpoint: &str,
    now: Millis,
) -> Result<Observation, ObserveError> {
    let lp = ListParams::default().labels(&names.selector_string());
    let pods = Api::<Pod>::namespaced(client.clone(), &names.namespace)
        .list(&lp)
        .await
        .map_err(|source| ObserveError::List {
            what: "pods",
            source,
        })?
        .items;
    let volumes = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &names.namespace)
        .list(&lp)
        .await
        .map_err(|source| ObserveError::List {
            what: "persistentvolumeclaims",
            source,
        })?
        .items;
    let any_pod = pods.iter().any(|p| p.metadata.deletion_timestamp.is_none());
    // Nobody to ask before the first pod exists (saves a connect timeout per reconcile).
    let (membership, membership_error) = if any_pod {
        match admin::membership(endpoint).await {
            Ok(m) => (Some(m), None),
            Err(e) => {
                tracing::info!(error = %e, "no membership");
                (None, Some(e.to_string()))
            }
        }
    } else {
        (None, None)
    };
    Ok(assemble(
        kc,
        names,
        &pods,
        &volumes,
        membership,
        membership_error,
        now,
    ))
}

fn member_id(labels: &BTreeMap<String, String>) -> Option<MemberId> {
    labels
        .get(LABEL_MEMBER_ID)?
        .parse()
        .ok()
        .filter(|&id| id > 0)
}

fn millis(t: &Timestamp) -> Millis {
    u64::try_from(t.as_millisecond()).unwrap_or(0)
}

fn pod_ready(pod: &Pod) -> (bool, Option<Millis>) {
    let condition = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"));
    match condition {
        Some(c) => (
            c.status == "True" && pod.metadata.deletion_timestamp.is_none(),
            c.last_transition_time.as_ref().map(|t| millis(&t.0)),
        ),
        None => (false, None),
    }
}

/// Merges pods, volumes and membership into the planner's input (pure).
pub fn assemble(
    kc: &KordCluster,
    names: &Names,
    pods: &[Pod],
    volumes: &[PersistentVolumeClaim],
    membership: Option<Membership>,
    membership_error: Option<String>,
    now: Millis,
) -> Observation {
    let ephemeral = kc.spec.storage.ephemeral;
    let status = kc.status.clone().unwrap_or_default();
    let mut members: BTreeMap<MemberId, Member> = BTreeMap::new();
    let blank = |created: Millis| Member {
        kind: Kind::Voter,
        retired: false,
        pod: None,
        volume: false,
        raft: None,
        lag: 0,
        healthy: false,
        unhealthy_since: created,
        created_at: created,
    };
    let created = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        meta.creation_timestamp
            .as_ref()
            .map_or(now, |t| millis(&t.0))
    };
    let mut ready_since: BTreeMap<MemberId, (bool, Millis)> = BTreeMap::new();
    for pvc in volumes {
        let Some(id) = member_id(pvc.labels()) else {
            continue;
        };
        let m = members
            .entry(id)
            .or_insert_with(|| blank(created(&pvc.metadata)));
        m.created_at = m.created_at.min(created(&pvc.metadata));
        m.retired |= pvc.labels().get(LABEL_RETIRED).is_some_and(|v| v == "true");
        m.kind = kind_of(pvc.labels());
        // A claim being deleted is data about to be gone.
        if !ephemeral && pvc.metadata.deletion_timestamp.is_none() {
            m.volume = true;
        }
    }
    for pod in pods {
        let Some(id) = member_id(pod.labels()) else {
            continue;
        };
        let m = members
            .entry(id)
            .or_insert_with(|| blank(created(&pod.metadata)));
        m.created_at = m.created_at.min(created(&pod.metadata));
        m.retired |= pod.labels().get(LABEL_RETIRED).is_some_and(|v| v == "true");
        m.kind = kind_of(pod.labels());
        m.pod = Some(PlanPod {
            revision: pod
                .annotations()
                .get(ANNOTATION_POD_REVISION)
                .cloned()
                .unwrap_or_default(),
        });
        if ephemeral {
            m.volume = pod.metadata.deletion_timestamp.is_none();
        }
        // The server stopped because its volume holds no data although it is a voter (the
        // disk was wiped under an intact claim): as good as a lost volume, so it is replaced
        // now rather than after the unhealthy grace period.
        if stopped_with_data_lost(pod) {
            m.volume = false;
        }
        let (ready, since) = pod_ready(pod);
        ready_since.insert(id, (ready, since.unwrap_or(created(&pod.metadata))));
    }
    let mut leader = None;
    if let Some(ms) = &membership {
        leader = Some(ms.leader);
        for rm in &ms.members {
            let m = members.entry(rm.id).or_insert_with(|| blank(now));
            m.raft = Some(match rm.role {
                MemberRole::Voter => RaftRole::Voter,
                MemberRole::Learner | MemberRole::Observer => RaftRole::Learner,
            });
            if rm.role == MemberRole::Observer {
                m.kind = Kind::Observer;
            }
            m.lag = rm.lag;
        }
    }
    for (&id, m) in members.iter_mut() {
        let (ready, since) = ready_since.get(&id).copied().unwrap_or((false, now));
        let contact = membership
            .as_ref()
            .and_then(|ms| ms.members.iter().find(|r| r.id == id))
            .map(|r| r.last_contact_ms);
        // Unknown contact (older servers) defers to the pod's readiness, which needs a leader.
        let heard = match contact {
            Some(Some(ms)) => ms < CONTACT_TIMEOUT_MS,
            _ => true,
        };
        m.healthy = ready && heard;
        m.unhealthy_since = match (ready, contact) {
            (false, _) => since,
            (true, Some(Some(ms))) => now.saturating_sub(ms),
            (true, _) => now,
        };
    }
    let seen_max = members.keys().next_back().copied().unwrap_or(0);
    let next_id = status.next_member_id.max(seen_max + 1).max(1);
    let raft = membership.as_ref().map(|ms| RaftView {
        leader: ms.leader,
        change_in_progress: ms.change_in_progress,
    });
    let member_status = members
        .iter()
        .map(|(&id, m)| MemberStatus {
            id,
            pod: names.pod(id),
            role: role_name(m).to_string(),
            lag: m.lag,
            healthy: m.healthy,
        })
        .collect();
    Observation {
        observed: Observed {
            now,
            next_id,
            bootstrapped: status.bootstrapped,
            members,
            raft,
        },
        membership,
        membership_error,
        members: member_status,
        leader_pod: leader.filter(|&l| l > 0).map(|l| names.pod(l)),
    }
}

fn kind_of(labels: &BTreeMap<String, String>) -> Kind {
    match labels.get(LABEL_KIND).map(String::as_str) {
        Some("observer") => Kind::Observer,
        _ => Kind::Voter,
    }
}

fn role_name(m: &Member) -> &'static str {
    match (m.retired, m.raft, m.kind) {
        (true, _, _) => "retired",
        (false, Some(RaftRole::Voter), _) => "voter",
        (false, Some(RaftRole::Learner), Kind::Observer) => "observer",
        (false, Some(RaftRole::Learner), Kind::Voter) => "learner",
        (false, None, _) => "joining",
    }
}

/// What `kord` writes to its termination log when it stops because a voter's data is gone
/// (server/src/server.rs); Kubernetes keeps it as the container's termination message.
pub const DATA_LOST_MESSAGE: &str = "has lost its data";

/// Whether the pod's kord container last stopped saying its data is lost.
fn stopped_with_data_lost(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .flat_map(|c| {
            [c.state.as_ref(), c.last_state.as_ref()]
                .into_iter()
                .flatten()
                .filter_map(|s| s.terminated.as_ref())
        })
        .any(|t| {
            t.message
                .as_deref()
                .is_some_and(|m| m.contains(DATA_LOST_MESSAGE))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::RaftMember;
    use crate::plan::Kind as PlanKind;

    fn cluster() -> KordCluster {
        let mut kc = KordCluster::new(
            "demo",
            serde_json::from_value(serde_json::json!({"replicas": 3})).expect("spec"),
        );
        kc.metadata.namespace = Some("ns".into());
        kc.metadata.uid = Some("u".into());
        kc
    }

    fn labelled<T: kube::Resource + Default>(id: u64, extra: &[(&str, &str)]) -> T {
        let mut obj = T::default();
        let labels = obj.meta_mut().labels.get_or_insert_with(BTreeMap::new);
        labels.insert(LABEL_MEMBER_ID.into(), id.to_string());
        for (k, v) in extra {
            labels.insert((*k).into(), (*v).into());
        }
        obj
    }

    #[test]
    fn merges_objects_and_membership_by_id() {
        let kc = cluster();
        let names = Names::of(&kc).expect("names");
        let pods: Vec<Pod> = vec![labelled(1, &[]), labelled(3, &[(LABEL_KIND, "observer")])];
        let volumes: Vec<PersistentVolumeClaim> =
            vec![labelled(1, &[]), labelled(2, &[(LABEL_RETIRED, "true")])];
        let membership = Membership {
            leader: 1,
            leader_addr: "x:1".into(),
            change_in_progress: false,
            members: vec![
                RaftMember {
                    id: 1,
                    role: MemberRole::Voter,
                    lag: 0,
                    last_contact_ms: Some(0),
                },
                RaftMember {
                    id: 7,
                    role: MemberRole::Learner,
                    lag: 40,
                    last_contact_ms: Some(60_000),
                },
            ],
        };
        let o = assemble(
            &kc,
            &names,
            &pods,
            &volumes,
            Some(membership),
            None,
            1_000_000,
        );
        let ms = &o.observed.members;
        assert_eq!(ms.keys().copied().collect::<Vec<_>>(), [1, 2, 3, 7]);
        assert!(ms[&1].volume && ms[&1].pod.is_some() && ms[&1].raft == Some(RaftRole::Voter));
        assert!(ms[&2].retired && ms[&2].pod.is_none());
        assert_eq!(ms[&3].kind, PlanKind::Observer);
        assert!(!ms[&3].volume, "pod without its claim: data gone");
        assert!(!ms[&7].healthy, "no pod and no contact for a minute");
        assert_eq!(ms[&7].lag, 40);
        assert_eq!(o.observed.next_id, 8, "past every id seen");
        assert_eq!(o.leader_pod.as_deref(), Some("demo-1"));
    }

    #[test]
    fn a_member_that_stopped_with_its_data_lost_has_no_volume() {
        use k8s_openapi::api::core::v1::{
            ContainerState, ContainerStateTerminated, ContainerStatus, PodStatus,
        };
        let kc = cluster();
        let names = Names::of(&kc).expect("names");
        let mut lost: Pod = labelled(2, &[]);
        lost.status = Some(PodStatus {
            container_statuses: Some(vec![ContainerStatus {
                name: "kord".into(),
                last_state: Some(ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: 1,
                        message: Some(format!("kord: member 2 is a voter ... {DATA_LOST_MESSAGE}")),
                        ..ContainerStateTerminated::default()
                    }),
                    ..ContainerState::default()
                }),
                ..ContainerStatus::default()
            }]),
            ..PodStatus::default()
        });
        let pods = vec![labelled(1, &[]), lost];
        let volumes: Vec<PersistentVolumeClaim> = vec![labelled(1, &[]), labelled(2, &[])];
        let o = assemble(&kc, &names, &pods, &volumes, None, None, 1_000_000);
        assert!(o.observed.members[&1].volume);
        assert!(
            !o.observed.members[&2].volume,
            "data lost under an intact claim"
        );
    }
}
