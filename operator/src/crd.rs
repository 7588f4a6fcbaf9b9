//! The `KordCluster` resource (group `kord.io`, version `v1alpha1`): what users write (spec) and
//! what the operator reports (status). The CRD YAML in `manifests/` and `charts/kord/crds/` is
//! generated from these types by `kord-operator crd`; a test fails when they drift.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, Toleration};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Largest voter count the operator accepts: 7 voters tolerate 3 failures; more only slow writes.
pub const MAX_REPLICAS: i32 = 7;
/// The default grace period before an unhealthy member is replaced: minutes, so a node reboot or
/// a slow image pull never triggers a full data copy.
pub const DEFAULT_REPLACE_AFTER: &str = "5m";
pub const DEFAULT_IMAGE: &str = "kord:0.1.0";
pub const DEFAULT_STORAGE_SIZE: &str = "1Gi";

/// A Kord cluster: `replicas` voting members (plus optional non-voting observers), each a pod
/// with its own volume, reconciled into Raft membership one safe step at a time.
// Several `printcolumn(type_ = ..)` read as duplicated attributes to clippy.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "kord.io",
    version = "v1alpha1",
    kind = "KordCluster",
    namespaced,
    shortname = "kord",
    status = "KordClusterStatus",
    derive = "PartialEq",
    doc = "A Kord cluster: voting members and observers, reconciled into Raft membership one safe step at a time.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".spec.replicas",
        description = "Voting members wanted"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readyMembers",
        description = "Healthy members"
    ),
    printcolumn(
        name = "Leader",
        type_ = "string",
        json_path = ".status.leader",
        description = "Pod of the Raft leader"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct KordClusterSpec {
    /// Voting members. Odd counts are recommended (3 tolerates one failure, 5 two).
    #[schemars(range(min = 1, max = 7))]
    pub replicas: i32,
    /// Non-voting members serving local reads and watches; never counted for quorum.
    #[serde(default)]
    #[schemars(range(min = 0, max = 16))]
    pub observers: i32,
    /// The Kord server image.
    #[serde(default = "default_image")]
    pub image: String,
    #[serde(default)]
    pub image_pull_policy: Option<String>,
    #[serde(default)]
    pub storage: StorageSpec,
    /// Resources of the kord container.
    #[serde(default)]
    pub resources: Option<ResourceRequirements>,
    /// Session timeout bounds the servers clamp client requests to (e.g. "4s", "40s").
    #[serde(default)]
    pub session_timeout: Option<SessionTimeoutSpec>,
    /// Minimum Raft election timeout (e.g. "1s"); must exceed 3x the heartbeat (100ms).
    #[serde(default)]
    pub election_timeout: Option<String>,
    /// How long a member may stay unhealthy before it is replaced under a new id (default 5m).
    #[serde(default)]
    pub replace_unhealthy_after: Option<String>,
    /// Pod affinity. Default: prefer spreading members over hosts (anti-affinity on hostname).
    #[serde(default)]
    pub affinity: Option<Affinity>,
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// Overrides merged (JSON merge patch) into every member pod: `metadata.labels`,
    /// `metadata.annotations` and `spec` fields such as `priorityClassName`.
    #[serde(default)]
    #[schemars(schema_with = "free_form_object")]
    pub pod_template: Option<serde_json::Value>,
}

fn default_image() -> String {
    DEFAULT_IMAGE.to_string()
}

fn free_form_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "nullable": true,
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// Where each member keeps its Raft log and state.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Volume size per member (a PersistentVolumeClaim each).
    #[serde(default = "default_storage_size")]
    pub size: String,
    /// Storage class of the claims; empty: the cluster default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Keep data in an emptyDir instead (tests only): a deleted pod loses its data, so its
    /// member is replaced under a new id instead of restarted.
    #[serde(default)]
    pub ephemeral: bool,
}

impl Default for StorageSpec {
    fn default() -> Self {
        StorageSpec {
            size: default_storage_size(),
            storage_class_name: None,
            ephemeral: false,
        }
    }
}

fn default_storage_size() -> String {
    DEFAULT_STORAGE_SIZE.to_string()
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionTimeoutSpec {
    pub min: Option<String>,
    pub max: Option<String>,
}

/// What the operator saw and did last.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KordClusterStatus {
    #[serde(default)]
    pub observed_generation: Option<i64>,
    /// Pending, Bootstrapping, Scaling, Replacing, Updating, Running or Degraded.
    #[serde(default)]
    pub phase: Option<String>,
    /// The leader's pod name.
    #[serde(default)]
    pub leader: Option<String>,
    /// Voting members (for the scale subresource).
    #[serde(default)]
    pub replicas: i32,
    /// Label selector of the member pods (for the scale subresource and HPA).
    #[serde(default)]
    pub selector: Option<String>,
    #[serde(default)]
    pub ready_members: i32,
    #[serde(default)]
    pub members: Vec<MemberStatus>,
    /// The membership change (or other step) the operator is in the middle of.
    #[serde(default)]
    pub membership_change: Option<String>,
    /// The next member id the operator allocates. Ids are never reused.
    #[serde(default)]
    pub next_member_id: u64,
    /// Set once the first member has formed the cluster; bootstrap flags are never used again.
    #[serde(default)]
    pub bootstrapped: bool,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    pub id: u64,
    pub pod: String,
    /// voter, learner, observer, joining or retired.
    pub role: String,
    /// Entries behind the leader (as the leader reports it).
    #[serde(default)]
    pub lag: u64,
    pub healthy: bool,
}

/// A status condition (Available, Progressing, Degraded), as in metav1.Condition.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    // Never an empty string: the Kubernetes 1.20 API server built here reads "" as null in
    // custom resources (and refuses it); absent instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default)]
    pub last_transition_time: Option<String>,
}

/// Errors in a spec that the schema cannot express.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("spec.replicas must be between 1 and {MAX_REPLICAS}, got {0}")]
    Replicas(i32),
    #[error("spec.{field}: {value:?} is not a duration like \"5m\" or \"1s\"")]
    Duration { field: &'static str, value: String },
}

impl KordClusterSpec {
    /// The grace period before an unhealthy member is replaced.
    pub fn replace_after(&self) -> Result<Duration, SpecError> {
        let value = self
            .replace_unhealthy_after
            .as_deref()
            .unwrap_or(DEFAULT_REPLACE_AFTER);
        parse_duration("replaceUnhealthyAfter", value)
    }

    /// Checks what the schema cannot (the apiserver already enforces the ranges; an old CRD
    /// might not).
    pub fn validate(&self) -> Result<(), SpecError> {
        if !(1..=MAX_REPLICAS).contains(&self.replicas) {
            return Err(SpecError::Replicas(self.replicas));
        }
        self.replace_after()?;
        if let Some(value) = &self.election_timeout {
            parse_duration("electionTimeout", value)?;
        }
        if let Some(bounds) = &self.session_timeout {
            if let Some(value) = &bounds.min {
                parse_duration("sessionTimeout.min", value)?;
            }
            if let Some(value) = &bounds.max {
                parse_duration("sessionTimeout.max", value)?;
            }
        }
        Ok(())
    }
}

fn parse_duration(field: &'static str, value: &str) -> Result<Duration, SpecError> {
    humantime::parse_duration(value).map_err(|_| SpecError::Duration {
        field,
        value: value.to_string(),
    })
}

/// The CRD as YAML, exactly as checked in under `manifests/` and `charts/kord/crds/`.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    let body = serde_yaml::to_string(&KordCluster::crd())?;
    Ok(format!(
        "# Generated by `kord-operator crd` from operator/src/crd.rs; do not edit.\n{body}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_bounds_replicas_and_enables_scale() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(KordCluster::crd()).expect("crd serializes");
        let version = &crd["spec"]["versions"][0];
        let replicas =
            &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["replicas"];
        assert_eq!(replicas["minimum"], 1.0);
        assert_eq!(replicas["maximum"], 7.0);
        assert_eq!(
            version["subresources"]["scale"]["specReplicasPath"],
            ".spec.replicas"
        );
        assert_eq!(crd["spec"]["names"]["shortNames"][0], "kord");
    }

    #[test]
    fn validate_names_the_field() {
        let mut spec: KordClusterSpec =
            serde_json::from_value(serde_json::json!({"replicas": 3})).expect("minimal spec");
        assert_eq!(spec.validate(), Ok(()));
        assert_eq!(spec.replace_after(), Ok(Duration::from_secs(300)));
        spec.replicas = 9;
        assert_eq!(spec.validate(), Err(SpecError::Replicas(9)));
        spec.replicas = 3;
        spec.election_timeout = Some("soon".into());
        let err = spec.validate().expect_err("bad duration");
        assert!(err.to_string().contains("electionTimeout"), "{err}");
    }
}
