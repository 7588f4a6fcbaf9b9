//! The operator's view of a real Kord cluster (3 `kord` processes on 127.0.0.1): the admin
//! client finds the leader through any member and reads the membership (falling back to the
//! leader's Status where `MemberList` is not served yet), follows a leader change, reports a
//! dead cluster as an error within its timeouts, and `observe` + `plan` turn that membership
//! into the right next step.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod, PodCondition, PodSpec, PodStatus};
use kord_api::v1::MemberRole;
use kord_e2e::{Cluster, ClusterOpts};
use kord_operator::admin::{self, AdminError, Membership};
use kord_operator::crd::KordCluster;
use kord_operator::objects::{Names, ANNOTATION_POD_REVISION, LABEL_MEMBER_ID};
use kord_operator::observe::assemble;
use kord_operator::plan::{plan, Desired, Kind, Plan, Step};

const WAIT: Duration = Duration::from_secs(30);

async fn membership_until(
    endpoint: &str,
    what: &str,
    ok: impl Fn(&Membership) -> bool,
) -> Membership {
    kord_e2e::wait_until(what, WAIT, || async {
        match admin::membership(endpoint).await {
            Ok(m) if ok(&m) => Ok(m),
            Ok(m) => Err(format!("membership so far: {m:?}")),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
}

fn ready_pod(id: u64, revision: &str) -> Pod {
    let mut pod = Pod {
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "kord".into(),
                image: Some("kord:test".into()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            conditions: Some(vec![PodCondition {
                type_: "Ready".into(),
                status: "True".into(),
                ..PodCondition::default()
            }]),
            ..PodStatus::default()
        }),
        ..Pod::default()
    };
    pod.metadata.labels = Some(BTreeMap::from([(
        LABEL_MEMBER_ID.to_string(),
        id.to_string(),
    )]));
    pod.metadata.annotations = Some(BTreeMap::from([(
        ANNOTATION_POD_REVISION.to_string(),
        revision.to_string(),
    )]));
    pod
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_client_and_plan_on_a_real_cluster() {
    let mut c = Cluster::start(3, ClusterOpts::default()).await;
    let leader = c.wait_for_leader(WAIT).await;
    let follower = c
        .ids()
        .into_iter()
        .find(|&id| id != leader)
        .expect("a follower");

    // Through a follower: the leader, its client address, every member a voter.
    let m = membership_until(
        &c.client_addr(follower).to_string(),
        "the membership",
        |m| m.members.len() == 3,
    )
    .await;
    assert_eq!(m.leader, leader);
    assert_eq!(m.leader_addr, c.client_addr(leader).to_string());
    assert!(!m.change_in_progress);
    let mut ids: Vec<u64> = m.members.iter().map(|r| r.id).collect();
    ids.sort_unstable();
    assert_eq!(ids, [1, 2, 3]);
    assert!(
        m.members.iter().all(|r| r.role == MemberRole::Voter),
        "{m:?}"
    );

    // observe + plan on that membership, with every member's pod ready on the desired image.
    let mut kc = KordCluster::new(
        "demo",
        serde_json::from_value(serde_json::json!({"replicas": 3, "image": "kord:test", "storage": {"ephemeral": true}}))
            .expect("spec"),
    );
    kc.metadata.namespace = Some("ns".into());
    let names = Names::of(&kc).expect("names");
    let pods: Vec<Pod> = (1..=3).map(|id| ready_pod(id, "rev-1")).collect();
    let mut desired = Desired {
        voters: 3,
        observers: 0,
        revision: "rev-1".into(),
        ephemeral: true,
        replace_after: 300_000,
        join_timeout: 600_000,
    };
    let now = 1_000_000;
    let obs = assemble(&kc, &names, &pods, &[], Some(m.clone()), None, now);
    assert_eq!(
        obs.observed.members.values().filter(|m| m.healthy).count(),
        3
    );
    assert_eq!(plan(&desired, &obs.observed), Plan::Converged);
    desired.voters = 5;
    assert_eq!(
        plan(&desired, &obs.observed),
        Plan::Act(Step::CreateMember {
            id: 4,
            kind: Kind::Voter
        }),
        "scale-up allocates the next id after every member seen"
    );

    // A membership change to a member that does not exist is refused with a status, whatever
    // the server's version (UNIMPLEMENTED before the admin RPCs land, an error code after).
    match admin::promote(&m.leader_addr, 99).await {
        Err(AdminError::Rpc { rpc, .. }) => assert_eq!(rpc, "PromoteMember"),
        other => panic!("promoting an unknown member must fail: {other:?}"),
    }

    // The leader dies: the next leader is found through a survivor.
    c.kill(leader);
    let survivor = c.live_ids()[0];
    let m = membership_until(&c.client_addr(survivor).to_string(), "a new leader", |m| {
        m.leader != leader && m.leader != 0
    })
    .await;
    assert_ne!(m.leader, leader);

    // Nobody left: an error, within the connect timeout.
    for id in c.live_ids() {
        c.kill(id);
    }
    let started = Instant::now();
    let err = admin::membership(&c.client_addr(survivor).to_string())
        .await
        .expect_err("a dead cluster has no membership");
    assert!(started.elapsed() < Duration::from_secs(10), "{err}");
}
