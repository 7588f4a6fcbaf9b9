//! The Kubernetes objects a `KordCluster` owns, built from its spec (pure; `actuate.rs` applies
//! them with server-side apply): member pods and volumes named by member id, the peer (headless)
//! and client services, the config map of server flags, and the disruption budget.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, ConfigMap, ConfigMapEnvSource, Container, ContainerPort, EmptyDirVolumeSource,
    EnvFromSource, HTTPGetAction, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PersistentVolumeClaimVolumeSource, Pod, PodAffinityTerm, PodAntiAffinity, PodSecurityContext,
    PodSpec, Probe, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
    VolumeResourceRequirements, WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use crate::crd::{KordCluster, KordClusterSpec};
use crate::plan::{Kind, MemberId};

pub const CLIENT_PORT: i32 = 7379;
pub const PEER_PORT: i32 = 7380;
pub const HTTP_PORT: i32 = 7381;
pub const DATA_DIR: &str = "/var/lib/kord";

pub const LABEL_NAME: &str = "app.kubernetes.io/name";
pub const LABEL_INSTANCE: &str = "app.kubernetes.io/instance";
pub const LABEL_COMPONENT: &str = "app.kubernetes.io/component";
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const LABEL_MEMBER_ID: &str = "kord.io/member-id";
pub const LABEL_KIND: &str = "kord.io/kind";
pub const LABEL_RETIRED: &str = "kord.io/retired";
pub const MANAGER: &str = "kord-operator";

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("the KordCluster has no namespace or uid (not read from the API server)")]
    Unstored,
    #[error("spec.podTemplate cannot be merged into the member pod: {0}")]
    PodTemplate(serde_json::Error),
}

/// Names derived from the cluster's name and namespace.
#[derive(Debug, Clone)]
pub struct Names {
    pub cluster: String,
    pub namespace: String,
}

impl Names {
    pub fn of(kc: &KordCluster) -> Result<Names, ObjectError> {
        Ok(Names {
            cluster: kc.name_any(),
            namespace: kc.namespace().ok_or(ObjectError::Unstored)?,
        })
    }
    pub fn pod(&self, id: MemberId) -> String {
        format!("{}-{id}", self.cluster)
    }
    pub fn volume(&self, id: MemberId) -> String {
        format!("data-{}-{id}", self.cluster)
    }
    pub fn peer_service(&self) -> String {
        format!("{}-peer", self.cluster)
    }
    pub fn client_service(&self) -> String {
        self.cluster.clone()
    }
    pub fn config_map(&self) -> String {
        format!("{}-config", self.cluster)
    }
    pub fn pdb(&self) -> String {
        self.cluster.clone()
    }
    /// The member's stable DNS name (pod hostname under the headless peer service).
    pub fn host(&self, id: MemberId) -> String {
        format!(
            "{}.{}.{}.svc",
            self.pod(id),
            self.peer_service(),
            self.namespace
        )
    }
    pub fn client_endpoint(&self) -> String {
        format!(
            "{}.{}.svc:{CLIENT_PORT}",
            self.client_service(),
            self.namespace
        )
    }
    /// Selects every member pod of this cluster.
    pub fn selector(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_NAME.to_string(), "kord".to_string()),
            (LABEL_INSTANCE.to_string(), self.cluster.clone()),
            (LABEL_COMPONENT.to_string(), "member".to_string()),
        ])
    }
    pub fn selector_string(&self) -> String {
        self.selector()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    }
    fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.selector();
        labels.insert(LABEL_MANAGED_BY.to_string(), MANAGER.to_string());
        labels
    }
    fn member_labels(&self, id: MemberId, kind: Kind) -> BTreeMap<String, String> {
        let mut labels = self.labels();
        labels.insert(LABEL_MEMBER_ID.to_string(), id.to_string());
        labels.insert(LABEL_KIND.to_string(), kind_label(kind).to_string());
        labels
    }
}

pub fn kind_label(kind: Kind) -> &'static str {
    match kind {
        Kind::Voter => "voter",
        Kind::Observer => "observer",
    }
}

fn owner(kc: &KordCluster) -> Result<OwnerReference, ObjectError> {
    kc.controller_owner_ref(&()).ok_or(ObjectError::Unstored)
}

fn meta(
    kc: &KordCluster,
    name: String,
    labels: BTreeMap<String, String>,
) -> Result<ObjectMeta, ObjectError> {
    Ok(ObjectMeta {
        name: Some(name),
        namespace: kc.namespace(),
        labels: Some(labels),
        owner_references: Some(vec![owner(kc)?]),
        ..ObjectMeta::default()
    })
}

/// The member's volume claim, named by member id so a new id always gets a fresh volume.
pub fn volume(
    kc: &KordCluster,
    names: &Names,
    id: MemberId,
    kind: Kind,
) -> Result<PersistentVolumeClaim, ObjectError> {
    let storage = &kc.spec.storage;
    Ok(PersistentVolumeClaim {
        metadata: meta(kc, names.volume(id), names.member_labels(id, kind))?,
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_string()]),
            storage_class_name: storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(storage.size.clone()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        status: None,
    })
}

/// How a member pod starts when its data directory is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The first member: `--initial-cluster` of itself.
    Bootstrap,
    /// Every other member (and any restart): `--join` the client service as a learner.
    Join,
}

/// Annotation on a member pod: the revision of the spec it was made from ([`pod_revision`]).
pub const ANNOTATION_POD_REVISION: &str = "kord.io/pod-revision";

/// The revision of the member pod template: a hash of every spec field that shapes a member pod
/// (image, pull policy, resources, timeouts, scheduling, podTemplate), so that changing any of
/// them rolls the members, the leader last. Not `replicas`, `observers` (counts),
/// `storage` (a claim's size and class are fixed once made) or `replaceUnhealthyAfter` (the
/// operator's own setting). FNV-1a over the spec's JSON (object keys sorted): the same on
/// every build, so a new operator binary does not restart members for nothing.
pub fn pod_revision(spec: &KordClusterSpec) -> String {
    let mut value = serde_json::to_value(spec).unwrap_or_default();
    if let Some(fields) = value.as_object_mut() {
        for ignored in ["replicas", "observers", "storage", "replaceUnhealthyAfter"] {
            fields.remove(ignored);
        }
        // Unset fields (null, [], {}) do not count, so a field added to a later spec version
        // leaves existing clusters' revision alone.
        fields.retain(|_, v| match v {
            serde_json::Value::Null => false,
            serde_json::Value::Array(a) => !a.is_empty(),
            serde_json::Value::Object(o) => !o.is_empty(),
            _ => true,
        });
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in value.to_string().bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

pub fn pod(
    kc: &KordCluster,
    names: &Names,
    id: MemberId,
    kind: Kind,
    start: Start,
) -> Result<Pod, ObjectError> {
    let spec = &kc.spec;
    let host = names.host(id);
    let mut args = vec![
        format!("--id={id}"),
        format!("--data-dir={DATA_DIR}"),
        format!("--listen-client=0.0.0.0:{CLIENT_PORT}"),
        format!("--listen-peer=0.0.0.0:{PEER_PORT}"),
        format!("--listen-http=0.0.0.0:{HTTP_PORT}"),
        format!("--advertise-client={host}:{CLIENT_PORT}"),
        format!("--advertise-peer={host}:{PEER_PORT}"),
    ];
    match start {
        Start::Bootstrap => args.push(format!(
            "--initial-cluster={id}={host}:{PEER_PORT}@{host}:{CLIENT_PORT}"
        )),
        Start::Join => {
            args.push(format!("--join={}", names.client_endpoint()));
            // Voters join as learners and are promoted once caught up; observers say so at
            // join, so every member reports them as observers and none promotes them.
            args.push(match kind {
                Kind::Observer => "--observer".to_string(),
                _ => "--join-as-learner".to_string(),
            });
        }
    }
    let data_volume = if spec.storage.ephemeral {
        Volume {
            name: "data".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        }
    } else {
        Volume {
            name: "data".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: names.volume(id),
                read_only: None,
            }),
            ..Volume::default()
        }
    };
    // Protocol spelled out: server-side apply on Kubernetes < 1.21 refuses list keys left to
    // defaulting ("associative list ... omits key field protocol").
    let port = |name: &str, port: i32| ContainerPort {
        name: Some(name.to_string()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    };
    let probe = |path: &str, period: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_string()),
            port: IntOrString::Int(HTTP_PORT),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(3),
        ..Probe::default()
    };
    let container = Container {
        name: "kord".into(),
        image: Some(spec.image.clone()),
        image_pull_policy: spec.image_pull_policy.clone(),
        args: Some(args),
        ports: Some(vec![
            port("client", CLIENT_PORT),
            port("peer", PEER_PORT),
            port("http", HTTP_PORT),
        ]),
        env_from: Some(vec![EnvFromSource {
            config_map_ref: Some(ConfigMapEnvSource {
                name: names.config_map(),
                optional: Some(true),
            }),
            ..EnvFromSource::default()
        }]),
        resources: spec.resources.clone(),
        readiness_probe: Some(probe("/readyz", 5)),
        liveness_probe: Some(probe("/healthz", 10)),
        volume_mounts: Some(vec![VolumeMount {
            name: "data".into(),
            mount_path: DATA_DIR.into(),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    };
    let mut metadata = meta(kc, names.pod(id), names.member_labels(id, kind))?;
    metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(ANNOTATION_POD_REVISION.into(), pod_revision(spec));
    let pod = Pod {
        metadata,
        spec: Some(PodSpec {
            hostname: Some(names.pod(id)),
            subdomain: Some(names.peer_service()),
            containers: vec![container],
            volumes: Some(vec![data_volume]),
            // The operator recreates a member's pod itself, on the same volume, only when safe.
            restart_policy: Some("Always".into()),
            automount_service_account_token: Some(false),
            // The Dockerfile's image runs as uid 65532: let it write its volume.
            security_context: Some(PodSecurityContext {
                fs_group: Some(65532),
                ..PodSecurityContext::default()
            }),
            affinity: Some(
                spec.affinity
                    .clone()
                    .unwrap_or_else(|| default_affinity(names)),
            ),
            tolerations: (!spec.tolerations.is_empty()).then(|| spec.tolerations.clone()),
            node_selector: (!spec.node_selector.is_empty()).then(|| spec.node_selector.clone()),
            termination_grace_period_seconds: Some(30),
            ..PodSpec::default()
        }),
        status: None,
    };
    match &spec.pod_template {
        None => Ok(pod),
        Some(overrides) => {
            let mut value = serde_json::to_value(&pod).map_err(ObjectError::PodTemplate)?;
            merge(&mut value, overrides);
            serde_json::from_value(value).map_err(ObjectError::PodTemplate)
        }
    }
}

/// JSON merge patch (RFC 7386): objects merge, anything else replaces, null deletes.
fn merge(target: &mut serde_json::Value, patch: &serde_json::Value) {
    match (target, patch) {
        (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(serde_json::Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// Prefer one member per host: losing a host then costs at most one member.
fn default_affinity(names: &Names) -> Affinity {
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        topology_key: "kubernetes.io/hostname".into(),
                        label_selector: Some(LabelSelector {
                            match_labels: Some(names.selector()),
                            ..LabelSelector::default()
                        }),
                        ..PodAffinityTerm::default()
                    },
                },
            ]),
            ..PodAntiAffinity::default()
        }),
        ..Affinity::default()
    }
}

fn service(
    kc: &KordCluster,
    names: &Names,
    name: String,
    headless: bool,
) -> Result<Service, ObjectError> {
    let port = |name: &str, port: i32| ServicePort {
        name: Some(name.to_string()),
        port,
        protocol: Some("TCP".into()),
        target_port: Some(IntOrString::Int(port)),
        ..ServicePort::default()
    };
    let mut ports = vec![port("client", CLIENT_PORT)];
    if headless {
        ports.push(port("peer", PEER_PORT));
    }
    Ok(Service {
        metadata: meta(kc, name, names.labels())?,
        spec: Some(ServiceSpec {
            selector: Some(names.selector()),
            ports: Some(ports),
            cluster_ip: headless.then(|| "None".to_string()),
            // Peers must resolve each other before they are ready (a joining learner is not).
            publish_not_ready_addresses: headless.then_some(true),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}

/// Headless: one stable DNS name per member pod for Raft traffic.
pub fn peer_service(kc: &KordCluster, names: &Names) -> Result<Service, ObjectError> {
    service(kc, names, names.peer_service(), true)
}

/// What clients (kordctl) connect to: ready members only.
pub fn client_service(kc: &KordCluster, names: &Names) -> Result<Service, ObjectError> {
    service(kc, names, names.client_service(), false)
}

/// Server flags as environment (read by `kord` through clap's `env`).
pub fn config_map(kc: &KordCluster, names: &Names) -> Result<ConfigMap, ObjectError> {
    let mut data = BTreeMap::new();
    if let Some(election) = &kc.spec.election_timeout {
        data.insert("KORD_ELECTION_TIMEOUT".to_string(), election.clone());
    }
    if let Some(bounds) = &kc.spec.session_timeout {
        if let Some(min) = &bounds.min {
            data.insert("KORD_SESSION_TIMEOUT_MIN".to_string(), min.clone());
        }
        if let Some(max) = &bounds.max {
            data.insert("KORD_SESSION_TIMEOUT_MAX".to_string(), max.clone());
        }
    }
    Ok(ConfigMap {
        metadata: meta(kc, names.config_map(), names.labels())?,
        data: Some(data),
        ..ConfigMap::default()
    })
}

/// At most one member down by choice (drain, eviction) at a time.
pub fn pdb(kc: &KordCluster, names: &Names) -> Result<PodDisruptionBudget, ObjectError> {
    Ok(PodDisruptionBudget {
        metadata: meta(kc, names.pdb(), names.labels())?,
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(names.selector()),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        status: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(spec: serde_json::Value) -> KordCluster {
        let mut kc = KordCluster::new("demo", serde_json::from_value(spec).expect("spec"));
        kc.metadata.namespace = Some("ns".into());
        kc.metadata.uid = Some("uid-1".into());
        kc
    }

    #[test]
    fn pod_revision_follows_the_fields_that_shape_a_pod() {
        let base = serde_json::json!({"replicas": 3, "image": "kord:1"});
        let rev = |over: serde_json::Value| {
            let mut spec = base.clone();
            merge(&mut spec, &over);
            pod_revision(&cluster(spec).spec)
        };
        let r0 = rev(serde_json::json!({}));
        // Pinned: a different value on another build would restart every member for nothing.
        assert_eq!(r0, "2563ed5a9295e841");
        for same in [
            serde_json::json!({"replicas": 5}),
            serde_json::json!({"observers": 2}),
            serde_json::json!({"storage": {"size": "9Gi"}}),
            serde_json::json!({"replaceUnhealthyAfter": "1h"}),
        ] {
            assert_eq!(rev(same.clone()), r0, "{same} must not roll the members");
        }
        for changed in [
            serde_json::json!({"image": "kord:2"}),
            serde_json::json!({"electionTimeout": "2s"}),
            serde_json::json!({"resources": {"limits": {"memory": "1Gi"}}}),
            serde_json::json!({"nodeSelector": {"disk": "ssd"}}),
            serde_json::json!({"podTemplate": {"metadata": {"annotations": {"a": "b"}}}}),
        ] {
            assert_ne!(rev(changed.clone()), r0, "{changed} must roll the members");
        }
        let kc = cluster(base.clone());
        let names = Names::of(&kc).expect("names");
        let p = pod(&kc, &names, 1, Kind::Voter, Start::Join).expect("pod");
        assert_eq!(
            p.annotations().get(ANNOTATION_POD_REVISION),
            Some(&pod_revision(&kc.spec))
        );
    }

    #[test]
    fn first_member_bootstraps_others_join_as_learners() {
        let kc = cluster(serde_json::json!({"replicas": 3}));
        let names = Names::of(&kc).expect("names");
        let args = |start| {
            pod(&kc, &names, 4, Kind::Voter, start)
                .expect("pod")
                .spec
                .expect("spec")
                .containers[0]
                .args
                .clone()
                .expect("args")
        };
        let boot = args(Start::Bootstrap);
        assert!(
            boot.contains(
                &"--initial-cluster=4=demo-4.demo-peer.ns.svc:7380@demo-4.demo-peer.ns.svc:7379"
                    .to_string()
            ),
            "{boot:?}"
        );
        let join = args(Start::Join);
        assert!(
            join.contains(&"--join=demo.ns.svc:7379".to_string()),
            "{join:?}"
        );
        assert!(join.contains(&"--join-as-learner".to_string()));
        assert!(!join.iter().any(|a| a.starts_with("--initial-cluster")));
        let observer = pod(&kc, &names, 5, Kind::Observer, Start::Join)
            .expect("pod")
            .spec
            .expect("spec")
            .containers[0]
            .args
            .clone()
            .expect("args");
        assert!(
            observer.contains(&"--observer".to_string()),
            "an observer joins as one: {observer:?}"
        );
        assert!(!observer.contains(&"--join-as-learner".to_string()));
    }

    #[test]
    fn pod_template_overrides_merge_into_the_pod() {
        let kc = cluster(serde_json::json!({
            "replicas": 1,
            "podTemplate": {"metadata": {"annotations": {"a": "b"}}, "spec": {"priorityClassName": "high"}}
        }));
        let names = Names::of(&kc).expect("names");
        let p = pod(&kc, &names, 1, Kind::Voter, Start::Join).expect("pod");
        assert_eq!(p.annotations().get("a").map(String::as_str), Some("b"));
        let spec = p.spec.expect("spec");
        assert_eq!(spec.priority_class_name.as_deref(), Some("high"));
        assert_eq!(
            spec.containers[0].name, "kord",
            "the rest of the pod is kept"
        );
        assert!(spec.affinity.is_some(), "default anti-affinity");
    }
}
