//! Kubernetes end-to-end suite (issue #9): Kord installed on a real cluster, used by a sample
//! service running as pods, scaled and disrupted with kubectl, checked from inside the cluster.
//!
//! Opt-in: it needs `KORD_K8S_KUBECONFIG` and `KORD_K8S_IMAGE` (see `kord_e2e::k8s`), which
//! `scripts/k8s/e2e.sh` (local cluster built from Debian's packages) and
//! `scripts/kind/run-e2e.sh` (kind) set. Without them each test prints "skipped: ..." and
//! passes. The operator scenario also needs the operator's image (`KORD_K8S_OPERATOR_IMAGE`),
//! cluster DNS (a `kube-system/kube-dns` Service) and `KORD_K8S_UPGRADE_TAG`, a second tag of the
//! Kord image for the helm-upgrade step; without them it skips, saying which is missing.
//!
//! Run: `cargo test -p kord-e2e --test k8s -- --test-threads 1 --nocapture`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kord_e2e::k8s::K8s;
use serde_json::{json, Value};

fn setup(test: &str) -> Option<K8s> {
    match K8s::from_env() {
        Ok(k) => Some(k),
        Err(why) => {
            println!("skipped: {test}: {why}");
            None
        }
    }
}

/// The tree under test. Read at run time: cargo sets it for the test process, while the
/// compile-time value can name another clone that shared the target dir (CI's cache).
fn repo_root() -> PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

// ---- a Kord cluster the suite starts itself (no operator) ------------------------------------

/// Three members in one pod, peers on the pod's loopback, clients on the pod IP: needs no
/// cluster DNS, Services or storage, so it runs on any cluster, including the local one.
fn static_kord_pod(image: &str) -> String {
    let cluster = "1=127.0.0.1:7380@$(POD_IP):7379,2=127.0.0.1:7390@$(POD_IP):7389,3=127.0.0.1:7400@$(POD_IP):7399";
    let member = |id: u32| {
        let client = 7379 + (id - 1) * 10;
        json!({
            "name": format!("m{id}"),
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
            "args": [
                "--id", id.to_string(), "--data-dir", format!("/data/m{id}"),
                "--listen-client", format!("0.0.0.0:{client}"),
                "--advertise-client", format!("$(POD_IP):{client}"),
                "--listen-peer", format!("127.0.0.1:{}", client + 1),
                "--listen-http", format!("0.0.0.0:{}", client + 2),
                "--initial-cluster", cluster,
            ],
            "readinessProbe": {"httpGet": {"path": "/readyz", "port": client + 2}, "periodSeconds": 1},
        })
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "kord-static", "labels": {"app": "kord-static"}},
        "spec": {"terminationGracePeriodSeconds": 5, "containers": [member(1), member(2), member(3)]},
    })
    .to_string()
}

/// The sample service as a Deployment of `replicas` pods.
fn sample_deployment(image: &str, endpoints: &str, replicas: u32) -> String {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "sample"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "kord-sample"}},
            "template": {
                "metadata": {"labels": {"app": "kord-sample"}},
                "spec": {
                    "terminationGracePeriodSeconds": 2,
                    "containers": [{
                        "name": "sample", "image": image, "imagePullPolicy": "IfNotPresent",
                        "args": ["serve"],
                        "env": [
                            {"name": "KORD_ENDPOINTS", "value": endpoints},
                            {"name": "SAMPLE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            {"name": "SAMPLE_HOLD_MS", "value": "200"},
                            {"name": "SAMPLE_SESSION_TIMEOUT_MS", "value": "5000"},
                        ],
                    }],
                },
            },
        },
    })
    .to_string()
}

/// One lock hold as the sample service reported it.
#[derive(Debug, Clone)]
struct Hold {
    pod: String,
    token: u64,
    prev: u64,
    prev_owner: String,
    ok: bool,
    /// Why the replica gave up during this hold, if it did.
    error: Option<String>,
}

/// Every sample pod's reports: (pod -> events).
fn sample_reports(k: &K8s, ns: &str) -> BTreeMap<String, Vec<Value>> {
    let mut out = BTreeMap::new();
    for pod in k.pods(ns, "app=kord-sample").unwrap_or_default() {
        let Some(name) = pod["metadata"]["name"].as_str() else {
            continue;
        };
        if let Ok(events) = k.pod_events(ns, name, "sample") {
            out.insert(name.to_owned(), events);
        }
    }
    out
}

fn holds(reports: &BTreeMap<String, Vec<Value>>) -> Vec<Hold> {
    let mut out: Vec<Hold> = reports
        .iter()
        .flat_map(|(pod, events)| {
            events
                .iter()
                .filter(|e| e["event"] == "lock")
                .map(move |e| Hold {
                    pod: pod.clone(),
                    token: e["token"].as_u64().unwrap_or(0),
                    prev: e["prev"].as_u64().unwrap_or(0),
                    prev_owner: e["prev_owner"].as_str().unwrap_or("").to_owned(),
                    // A hold whose read-back failed (the replica then exits) is reported with
                    // the error and without `intact`; its successor's check covers it.
                    ok: e["fenced_ok"] == true
                        && e["wrote"] == true
                        && (e["intact"] == true
                            || (e["intact"].is_null() && e["error"].is_string())),
                    error: e["error"].as_str().map(str::to_owned),
                })
        })
        .collect();
    out.sort_by_key(|h| h.token);
    out
}

/// The last config value each pod reported.
fn last_config(reports: &BTreeMap<String, Vec<Value>>) -> BTreeMap<String, Option<String>> {
    reports
        .iter()
        .map(|(pod, events)| {
            let last = events
                .iter()
                .rfind(|e| e["event"] == "config")
                .and_then(|e| e["value"].as_str().map(str::to_owned));
            (pod.clone(), last)
        })
        .collect()
}

/// Asserts mutual exclusion over the holds reported by `earlier` (all holds with a token at or
/// below the highest token seen then must be in `later`): sorted by token, each hold saw the
/// previous hold's token as the last owner, and every hold's checks passed. `lost`: a pod that
/// was killed and the highest token in its log before that; its holds after that token (the
/// one the kill interrupted, and any between the last look at its log and the kill) left no
/// report, so a successor may have seen that pod as the last owner, with a token above that
/// and between its neighbours'.
fn assert_one_holder_at_a_time(earlier: &[Hold], later: &[Hold], lost: Option<(&str, u64)>) {
    let Some(cut) = earlier.iter().map(|h| h.token).max() else {
        panic!("no lock holds reported");
    };
    let upto: Vec<&Hold> = later.iter().filter(|h| h.token <= cut).collect();
    for h in upto.iter().filter(|h| h.error.is_some()) {
        println!(
            "{} gave up during its hold {}: {:?}",
            h.pod, h.token, h.error
        );
    }
    let tokens: BTreeSet<u64> = upto.iter().map(|h| h.token).collect();
    assert_eq!(
        tokens.len(),
        upto.len(),
        "a fencing token was reported twice: {upto:?}"
    );
    for pair in upto.windows(2) {
        if pair[1].prev == pair[0].token {
            continue;
        }
        let unreported = lost.is_some_and(|(pod, seen)| {
            pair[1].prev_owner == pod
                && seen < pair[1].prev
                && pair[0].token < pair[1].prev
                && pair[1].prev < pair[1].token
        });
        assert!(
            unreported,
            "hold {:?} did not see the previous hold {:?} as the last owner: two holders overlapped or a hold went unrecorded",
            pair[1],
            pair[0]
        );
    }
    let bad: Vec<&&Hold> = upto.iter().filter(|h| !h.ok).collect();
    assert!(
        bad.is_empty(),
        "holds whose fencing/ownership checks failed: {bad:?}"
    );
}

/// Kills sample replica `pods[0]` outright (grace 0), runs `also` (more disruption at the same
/// moment), and checks: the replica's ephemeral node disappears within its session timeout
/// (5 s) plus a bound, the lock moves on among the other replicas, and over all holds, before
/// and after, each hold saw the previous one as the last owner and passed its fencing checks.
fn kill_sample_replica(k: &K8s, ns: &str, endpoints: &str, pods: &[String], also: impl FnOnce()) {
    let victim = &pods[0];
    let members = k
        .run_sample(ns, endpoints, &["ls", "/sample/members"], k.secs(60))
        .expect("ls members");
    let listed: Vec<String> = members
        .iter()
        .find(|e| e["event"] == "ls")
        .and_then(|e| e["children"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    for p in pods {
        assert!(listed.contains(p), "{p} has no ephemeral node: {listed:?}");
    }
    // The victim's log goes with its pod: keep its holds from before the kill.
    let pre_kill = holds(&sample_reports(k, ns));
    let before_kill = pre_kill.last().map(|h| h.token).unwrap_or(0);
    let victim_holds: Vec<Hold> = pre_kill.into_iter().filter(|h| &h.pod == victim).collect();
    let with_victim = |mut h: Vec<Hold>| {
        for v in &victim_holds {
            if !h.iter().any(|x| x.token == v.token) {
                h.push(v.clone());
            }
        }
        h.sort_by_key(|h| h.token);
        h
    };
    let killed_at = Instant::now();
    k.kubectl(&[
        "delete",
        "pod",
        "-n",
        ns,
        victim,
        "--grace-period=0",
        "--force",
    ])
    .expect("kill a replica");
    also();
    k.wait(
        &format!("{victim}'s ephemeral node to disappear"),
        k.secs(45),
        || {
            let out = k.run_sample(ns, endpoints, &["ls", "/sample/members"], k.secs(60))?;
            let still = out.iter().any(|e| {
                e["children"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|v| v == victim.as_str()))
            });
            if still {
                Err("still listed".into())
            } else {
                Ok(())
            }
        },
    );
    println!(
        "killed replica's ephemeral node gone after {:?}",
        killed_at.elapsed()
    );
    let survivors: Vec<String> = pods[1..].to_vec();
    let after_kill = k.wait(
        "the lock to move on among the survivors",
        k.secs(60),
        || {
            let h = with_victim(holds(&sample_reports(k, ns)));
            let after: BTreeSet<&String> = h
                .iter()
                .filter(|h| h.token > before_kill)
                .map(|h| &h.pod)
                .collect();
            if survivors.iter().all(|p| after.contains(p)) {
                Ok(h.clone())
            } else {
                Err(format!("holders since: {after:?}"))
            }
        },
    );
    let final_holds = with_victim(holds(&sample_reports(k, ns)));
    // The victim's holds since its log was last read have no report; their successors must
    // have seen the victim as the last owner (the only gaps allowed).
    let victim_seen = victim_holds.last().map(|h| h.token).unwrap_or(0);
    assert_one_holder_at_a_time(&after_kill, &final_holds, Some((victim, victim_seen)));
}

/// Scenario 2 on a Kord cluster the suite starts itself: config propagation to every replica,
/// exactly one lock holder at a time with increasing fencing tokens, a killed replica's
/// ephemeral node disappears, and the lock keeps moving among the survivors.
#[test]
fn sample_service_config_lock_and_ephemerals_on_static_kord() {
    let Some(k) = setup("sample_service_config_lock_and_ephemerals_on_static_kord") else {
        return;
    };
    let started = Instant::now();
    let ns = k.namespace("kord-e2e-sample").expect("namespace");
    let ns = ns.name.as_str();

    k.apply(ns, &static_kord_pod(&k.image)).expect("kord pod");
    k.wait_pods_ready(ns, "app=kord-static", 1, k.secs(120));
    let ip = k
        .pod_field(ns, "kord-static", "{.status.podIP}")
        .expect("pod IP");
    let endpoints = format!("{ip}:7379,{ip}:7389,{ip}:7399");
    println!(
        "kord members ready at {endpoints} after {:?}",
        started.elapsed()
    );

    k.run_sample(ns, &endpoints, &["set", "/sample/config", "v1"], k.secs(60))
        .expect("set config v1");
    k.apply(ns, &sample_deployment(&k.sample_image, &endpoints, 3))
        .expect("sample deployment");
    let pods = k.wait_pods_ready(ns, "app=kord-sample", 3, k.secs(120));

    let all_see = |value: &str, pods: &[String]| {
        k.wait(
            &format!("every sample replica to report config {value}"),
            k.secs(60),
            || {
                let seen = last_config(&sample_reports(&k, ns));
                let missing: Vec<&String> = pods
                    .iter()
                    .filter(|p| seen.get(*p).cloned().flatten().as_deref() != Some(value))
                    .collect();
                if missing.is_empty() {
                    Ok(())
                } else {
                    Err(format!("not yet: {missing:?}; seen {seen:?}"))
                }
            },
        )
    };
    all_see("v1", &pods);
    let t = Instant::now();
    k.run_sample(ns, &endpoints, &["set", "/sample/config", "v2"], k.secs(60))
        .expect("set config v2");
    all_see("v2", &pods);
    println!("config change reached all 3 replicas in {:?}", t.elapsed());

    // Lock: wait for holds by at least two replicas, then check exclusion over a snapshot.
    let earlier = k.wait("12 lock holds by at least 2 replicas", k.secs(90), || {
        let h = holds(&sample_reports(&k, ns));
        let pods: BTreeSet<&String> = h.iter().map(|h| &h.pod).collect();
        if h.len() >= 12 && pods.len() >= 2 {
            Ok(h)
        } else {
            Err(format!("{} holds by {pods:?}", h.len()))
        }
    });
    let later = holds(&sample_reports(&k, ns));
    assert_one_holder_at_a_time(&earlier, &later, None);
    println!(
        "{} lock holds, tokens strictly increasing, one holder at a time",
        later.len()
    );

    kill_sample_replica(&k, ns, &endpoints, &pods, || {});
    println!("scenario done in {:?}", started.elapsed());
}

// ---- the operator scenarios (issue #8's chart and KordCluster) --------------------------------

/// The chart under test: `KORD_K8S_CHART`, else the tree's charts/kord.
fn chart_dir() -> PathBuf {
    std::env::var_os("KORD_K8S_CHART")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("charts/kord"))
}

/// Why the operator scenarios cannot run yet, if they cannot.
fn operator_missing(k: &K8s) -> Option<String> {
    let chart = chart_dir().join("Chart.yaml");
    if !chart.exists() {
        return Some(format!(
            "the operator's chart is not in the tree yet ({} missing)",
            chart.display()
        ));
    }
    if std::env::var_os("KORD_K8S_UPGRADE_TAG").is_none() {
        return Some(
            "KORD_K8S_UPGRADE_TAG is not set: it names a second tag of the Kord image, for the \
             helm upgrade step (scripts/k8s/e2e.sh and scripts/kind/run-e2e.sh set it)"
                .into(),
        );
    }
    // Members advertise <pod>.<cluster>-peer.<ns>.svc and the operator reaches
    // <cluster>.<ns>.svc: both need cluster DNS (scripts/k8s/up.sh runs one).
    if k.kubectl(&["get", "service", "kube-dns", "-n", "kube-system"])
        .is_err()
    {
        return Some(
            "the cluster has no DNS (no kube-system/kube-dns service); the operator's member \
             addresses are <pod>.<cluster>-peer.<ns>.svc names"
                .into(),
        );
    }
    if std::process::Command::new(&k.helm)
        .arg("--help")
        .output()
        .is_err()
    {
        return Some(format!(
            "no Helm wrapper at {:?} (scripts/k8s/tools.sh helm)",
            k.helm
        ));
    }
    None
}

/// Chart values for a test install, merged with `KORD_K8S_HELM_VALUES`.
fn chart_values(k: &K8s, replicas: u32, image_tag: Option<&str>, storage_class: &str) -> Value {
    let (repo, tag) = k
        .image
        .rsplit_once(':')
        .unwrap_or((k.image.as_str(), "latest"));
    let (op_repo, op_tag) = k
        .operator_image
        .rsplit_once(':')
        .unwrap_or((k.operator_image.as_str(), "latest"));
    // charts/kord/values.yaml: the operator's image, and one KordCluster named after the release.
    let mut values = json!({
        "operator": {"image": {"repository": op_repo, "tag": op_tag, "pullPolicy": "IfNotPresent"}},
        "cluster": {
            "enabled": true,
            "replicas": replicas,
            "image": {"repository": repo, "tag": image_tag.unwrap_or(tag), "pullPolicy": "IfNotPresent"},
            "storage": {"size": "1Gi", "storageClassName": storage_class},
        },
    });
    if let Some(extra) = std::env::var("KORD_K8S_HELM_VALUES")
        .ok()
        .and_then(|v| serde_json::from_str::<Value>(&v).ok())
    {
        merge(&mut values, extra);
    }
    values
}

fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (key, v) in o {
                merge(b.entry(key).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o,
    }
}

/// The KordCluster's status, as the operator reports it.
#[derive(Debug, Clone, Default)]
struct ClusterStatus {
    ready: u64,
    replicas: u64,
    leader: String,
    members: Vec<Value>,
    /// The step in flight for the spec the operator has seen (None once converged).
    membership_change: Option<String>,
    generation: i64,
    observed_generation: i64,
}

fn cluster_status(k: &K8s, ns: &str) -> Result<ClusterStatus, String> {
    let kc = k.get_json(ns, &["kordcluster", "kord"])?;
    let status = &kc["status"];
    Ok(ClusterStatus {
        ready: status["readyMembers"].as_u64().unwrap_or(0),
        replicas: kc["spec"]["replicas"].as_u64().unwrap_or(0),
        leader: match &status["leader"] {
            Value::String(s) => s.clone(),
            Value::Null => String::new(),
            other => other.to_string(),
        },
        members: status["members"].as_array().cloned().unwrap_or_default(),
        membership_change: status["membershipChange"].as_str().map(str::to_owned),
        generation: kc["metadata"]["generation"].as_i64().unwrap_or(0),
        observed_generation: status["observedGeneration"].as_i64().unwrap_or(-1),
    })
}

/// Deletes a pod at once (grace period 0), as a node failure would.
fn delete_pod_now(k: &K8s, ns: &str, pod: &str) {
    k.kubectl(&[
        "delete",
        "pod",
        "-n",
        ns,
        pod,
        "--grace-period=0",
        "--force",
    ])
    .expect("delete pod");
}

fn pod_uid(k: &K8s, ns: &str, pod: &str) -> String {
    k.pod_uid(ns, pod).unwrap_or_default()
}

/// Waits until the member `victim` (a status entry) is gone and one member with an id not in
/// `old_ids` makes the cluster whole again (5 ready members).
fn wait_replaced(
    k: &K8s,
    ns: &str,
    what: &str,
    timeout: Duration,
    old_ids: &BTreeSet<String>,
    victim: &Value,
) -> ClusterStatus {
    k.wait(what, timeout, || {
        let s = cluster_status(k, ns)?;
        let ids: BTreeSet<String> = s.members.iter().map(|m| m["id"].to_string()).collect();
        if s.ready == 5
            && ids.len() == 5
            && ids.difference(old_ids).count() == 1
            && !ids.contains(&victim["id"].to_string())
        {
            Ok(s)
        } else {
            Err(format!("{s:?}"))
        }
    })
}

/// Deletes member pods at once and waits until the operator has recreated every one under its
/// name (on its volume), so a following convergence wait cannot pass on the status from before.
fn kill_members(k: &K8s, ns: &str, pods: &[String]) {
    let before: BTreeMap<&String, String> = pods.iter().map(|p| (p, pod_uid(k, ns, p))).collect();
    for p in pods {
        delete_pod_now(k, ns, p);
    }
    k.wait(
        "the deleted member pods to be recreated",
        k.secs(300),
        || {
            let stale: Vec<&&String> = before
                .iter()
                .filter(|(p, old)| {
                    let uid = pod_uid(k, ns, p);
                    uid.is_empty() || uid == **old
                })
                .map(|(p, _)| p)
                .collect();
            if stale.is_empty() {
                Ok(())
            } else {
                Err(format!("not yet recreated: {stale:?}"))
            }
        },
    );
}

/// Waits until the KordCluster has `n` desired, `n` ready voters, a leader, no other members
/// and no step in flight.
fn wait_converged(k: &K8s, ns: &str, n: u64, timeout: Duration) -> ClusterStatus {
    k.wait(
        &format!("KordCluster kord at {n}/{n} with a leader"),
        timeout,
        || {
            let s = cluster_status(k, ns)?;
            let voters = s
                .members
                .iter()
                .filter(|m| m["role"] == "voter" && m["healthy"] == true)
                .count() as u64;
            // The operator's own word that nothing is left to do for this spec, too: a member
            // being retired can still be listed beside n healthy voters.
            let settled = s.membership_change.is_none()
                && s.observed_generation == s.generation
                && s.members.len() as u64 == n;
            if s.replicas == n && s.ready == n && voters == n && !s.leader.is_empty() && settled {
                Ok(s)
            } else {
                Err(format!("{s:?}"))
            }
        },
    )
}

/// The member pods, by the selector the operator publishes in the status.
fn member_pods(k: &K8s, ns: &str) -> Vec<Value> {
    let selector = k
        .get_json(ns, &["kordcluster", "kord"])
        .ok()
        .and_then(|kc| kc["status"]["selector"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "app.kubernetes.io/name=kord".into());
    k.pods(ns, &selector).unwrap_or_default()
}

/// The operator's pods: the chart's Deployment (component label `operator`).
fn operator_pods(k: &K8s, ns: &str) -> Vec<String> {
    k.pods(ns, "app.kubernetes.io/component=operator")
        .unwrap_or_default()
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
        .collect()
}

/// Static hostPath volumes for the members' claims where the cluster has no provisioner (the
/// local cluster has none): a pool under /var/lib/kord-e2e-pv/<ns>, deleted with the guard.
struct PvPool {
    k: K8s,
    names: Vec<String>,
    class: String,
}

impl PvPool {
    fn create(k: &K8s, ns: &str, count: usize) -> PvPool {
        let class = format!("kord-e2e-{ns}");
        let mut names = Vec::new();
        for i in 0..count {
            let name = format!("{class}-{i}");
            let pv = json!({
                "apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": {"name": name, "labels": {"kord-e2e": ns}},
                "spec": {
                    "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Retain", "storageClassName": class,
                    "hostPath": {"path": format!("/var/lib/kord-e2e-pv/{ns}/{i}"), "type": "DirectoryOrCreate"},
                },
            });
            k.kubectl_stdin(&["apply", "-f", "-"], Some(&pv.to_string()))
                .expect("pv");
            names.push(name);
        }
        PvPool {
            k: k.clone(),
            names,
            class,
        }
    }
}

impl Drop for PvPool {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = self.k.kubectl(&["delete", "pv", n, "--wait=false"]);
        }
    }
}

/// Uninstalls the release when the scenario ends early (a panic), so its cluster-scoped objects
/// (the operator's ClusterRole and binding) do not outlive the namespace.
struct Release<'a> {
    k: &'a K8s,
    ns: &'a str,
    installed: bool,
}

impl Drop for Release<'_> {
    fn drop(&mut self) {
        if self.installed && std::env::var("KORD_K8S_KEEP").as_deref() != Ok("1") {
            let _ = self.k.helm(&["uninstall", "kord", "-n", self.ns]);
        }
    }
}

/// Client endpoints (pod IP : client port) of the cluster's members, from the status' pods.
fn member_endpoints(k: &K8s, ns: &str, s: &ClusterStatus) -> String {
    s.members
        .iter()
        .filter_map(|m| m["pod"].as_str())
        .filter_map(|pod| {
            let ip = k.pod_field(ns, pod, "{.status.podIP}").ok()?;
            (!ip.is_empty()).then(|| format!("{ip}:7379"))
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The leader's pod name (the status' `leader` names the pod; a member's role may say so too).
fn leader_pod(s: &ClusterStatus) -> Option<String> {
    s.members
        .iter()
        .find(|m| {
            m["role"]
                .as_str()
                .is_some_and(|r| r.eq_ignore_ascii_case("leader"))
                || m["pod"].as_str() == Some(s.leader.as_str())
        })
        .and_then(|m| m["pod"].as_str().map(str::to_owned))
}

/// Starts `n` writer pods (sample `write` mode) against `endpoints`.
fn start_writers(k: &K8s, ns: &str, endpoints: &str, n: u32, writes: u32) {
    for i in 0..n {
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("writer-{i}"), "labels": {"app": "kord-writer"}},
            "spec": {"restartPolicy": "Never", "terminationGracePeriodSeconds": 1, "containers": [{
                "name": "main", "image": k.sample_image, "imagePullPolicy": "IfNotPresent",
                "args": ["write"],
                "env": [
                    {"name": "KORD_ENDPOINTS", "value": endpoints},
                    {"name": "SAMPLE_NAME", "value": format!("writer-{i}")},
                    {"name": "SAMPLE_WRITES", "value": writes.to_string()},
                    {"name": "SAMPLE_INTERVAL_MS", "value": "20"},
                ],
            }]},
        });
        k.apply(ns, &pod.to_string()).expect("writer pod");
    }
}

/// Every writer's acknowledged write numbers so far; waits for `done` when `finished`.
fn writer_acks(k: &K8s, ns: &str, n: u32) -> BTreeMap<String, (u64, bool, u64)> {
    (0..n)
        .map(|i| {
            let name = format!("writer-{i}");
            let events = k.pod_events(ns, &name, "main").unwrap_or_default();
            let acked = events.iter().filter(|e| e["event"] == "ack").count() as u64;
            let done = events.iter().any(|e| e["event"] == "done");
            let retries = events.iter().filter(|e| e["event"] == "retry").count() as u64;
            (name, (acked, done, retries))
        })
        .collect()
}

/// Verifies on every member that every acknowledged write is present and digests agree.
fn assert_acked_everywhere(k: &K8s, ns: &str, endpoints: &str, writers: u32) {
    let acks = writer_acks(k, ns, writers);
    let report = k
        .run_sample(ns, endpoints, &["verify"], k.secs(180))
        .expect("verify pod");
    let members = endpoints.split(',').count();
    let present: Vec<&Value> = report.iter().filter(|e| e["event"] == "present").collect();
    assert_eq!(
        present.len(),
        members,
        "verify reported {} members of {members}",
        present.len()
    );
    for member in &present {
        for (writer, (acked, _, _)) in &acks {
            if *acked == 0 {
                continue;
            }
            let ranges = member["writers"][writer]
                .as_array()
                .cloned()
                .unwrap_or_default();
            // Every acknowledged number 0..acked lies in one reported [start, end] range.
            let covered = ranges.iter().any(|r| {
                r[0].as_u64() == Some(0) && r[1].as_u64().is_some_and(|end| end + 1 >= *acked)
            });
            assert!(
                covered,
                "member {}: {writer}'s {acked} acknowledged writes not all present: {ranges:?}",
                member["endpoint"]
            );
        }
    }
    let digests = report
        .iter()
        .find(|e| e["event"] == "digests")
        .expect("digests reported");
    assert_eq!(
        digests["agree"], true,
        "members' state digests differ: {digests}"
    );
}

/// Scenarios 1 and 3-6 in one install (each step asserts; the cluster carries over):
/// helm install 3 members; scale 3->5->3 under write load; chaos (leader pod, follower pod,
/// two of five, operator killed mid-scale, pod with its PVC); helm upgrade with leader last;
/// uninstall leaves no pods or services.
#[test]
fn operator_install_scale_chaos_upgrade_uninstall() {
    let Some(k) = setup("operator_install_scale_chaos_upgrade_uninstall") else {
        return;
    };
    if let Some(why) = operator_missing(&k) {
        println!("skipped: operator_install_scale_chaos_upgrade_uninstall: {why}");
        return;
    }
    let started = Instant::now();
    let chart = chart_dir();
    let chart = chart.to_string_lossy().into_owned();
    let ns_guard = k.namespace("kord-e2e-op").expect("namespace");
    let ns = ns_guard.name.as_str();
    let mut phase = Instant::now();
    let mut timings: Vec<(String, Duration)> = Vec::new();
    let mut lap = |name: &str, phase: &mut Instant| {
        timings.push((name.to_owned(), phase.elapsed()));
        println!("phase {name}: {:?}", phase.elapsed());
        *phase = Instant::now();
    };

    // 1. helm install: 3 members Ready, `kubectl get kord` shows 3/3 and a leader.
    // Enough volumes for 5 members, their replacements and a migration.
    let pool = PvPool::create(&k, ns, 12);
    let values = chart_values(&k, 3, None, &pool.class).to_string();
    k.helm(&[
        "install",
        "kord",
        &chart,
        "-n",
        ns,
        "--values-json",
        &values,
    ])
    .expect("helm install");
    let mut release = Release {
        k: &k,
        ns,
        installed: true,
    };
    let s = wait_converged(&k, ns, 3, k.secs(300));
    let table = k
        .kubectl(&["get", "kord", "kord", "-n", ns, "--no-headers"])
        .expect("kubectl get kord");
    println!("kubectl get kord: {table}");
    let cols: Vec<&str> = table.split_whitespace().collect();
    // NAME DESIRED READY LEADER PHASE AGE
    assert_eq!(
        cols.get(1..4),
        Some(&["3", "3", s.leader.as_str()][..]),
        "kubectl get kord: {table}"
    );
    lap("install", &mut phase);

    // 3. Scale 3 -> 5 -> 3 under write load from inside the cluster.
    let endpoints = member_endpoints(&k, ns, &s);
    k.run_sample(ns, &endpoints, &["set", "/load-start", "x"], k.secs(60))
        .expect("first write");
    start_writers(&k, ns, &endpoints, 2, 3000);
    k.kubectl(&["scale", "-n", ns, "kordcluster/kord", "--replicas=5"])
        .expect("scale to 5");
    let s5 = wait_converged(&k, ns, 5, k.secs(600));
    k.kubectl(&["scale", "-n", ns, "kordcluster/kord", "--replicas=3"])
        .expect("scale to 3");
    let s3 = wait_converged(&k, ns, 3, k.secs(600));
    k.wait("writers to finish", k.secs(600), || {
        let acks = writer_acks(&k, ns, 2);
        if acks.values().all(|(_, done, _)| *done) {
            Ok(())
        } else {
            Err(format!("{acks:?}"))
        }
    });
    let acks = writer_acks(&k, ns, 2);
    println!(
        "writer acks/retries through scaling: {acks:?} (5 members: {:?})",
        s5.members
    );
    let endpoints = member_endpoints(&k, ns, &s3);
    assert_acked_everywhere(&k, ns, &endpoints, 2);
    lap("scale 3-5-3 under load", &mut phase);

    // 4. Chaos. Each step: disrupt, see the disruption, wait for convergence within the bound,
    // verify.
    let recover = k.secs(300);
    let s = wait_converged(&k, ns, 3, recover);
    let leader = leader_pod(&s).expect("leader pod in status");
    kill_members(&k, ns, std::slice::from_ref(&leader));
    let s = wait_converged(&k, ns, 3, recover);
    assert_acked_everywhere(&k, ns, &member_endpoints(&k, ns, &s), 2);
    lap("leader pod deleted", &mut phase);

    let follower = s
        .members
        .iter()
        .filter_map(|m| m["pod"].as_str())
        .find(|p| leader_pod(&s).as_deref() != Some(*p))
        .expect("a follower")
        .to_owned();
    kill_members(&k, ns, std::slice::from_ref(&follower));
    let s = wait_converged(&k, ns, 3, recover);
    assert_acked_everywhere(&k, ns, &member_endpoints(&k, ns, &s), 2);
    lap("follower pod deleted", &mut phase);

    k.kubectl(&["scale", "-n", ns, "kordcluster/kord", "--replicas=5"])
        .expect("scale to 5");
    let s = wait_converged(&k, ns, 5, k.secs(600));
    // Two replicas of the sample service, connected the way users connect: the client
    // Service's DNS name (cluster DNS, kube-proxy). One is killed with two of the five members.
    let service = format!("kord.{ns}.svc:7379");
    k.apply(ns, &sample_deployment(&k.sample_image, &service, 2))
        .expect("sample deployment");
    let samples = k.wait_pods_ready(ns, "app=kord-sample", 2, k.secs(120));
    k.wait("both sample replicas to hold the lock", k.secs(60), || {
        let holders: BTreeSet<String> = holds(&sample_reports(&k, ns))
            .into_iter()
            .map(|h| h.pod)
            .collect();
        if samples.iter().all(|p| holders.contains(p)) {
            Ok(())
        } else {
            Err(format!("holders so far: {holders:?}"))
        }
    });
    let two: Vec<String> = s
        .members
        .iter()
        .filter_map(|m| m["pod"].as_str().map(str::to_owned))
        .take(2)
        .collect();
    kill_sample_replica(&k, ns, &service, &samples, || kill_members(&k, ns, &two));
    let s = wait_converged(&k, ns, 5, recover);
    assert_acked_everywhere(&k, ns, &member_endpoints(&k, ns, &s), 2);
    k.kubectl(&["delete", "deployment", "-n", ns, "sample", "--wait=false"])
        .expect("delete the sample service");
    lap("two of five deleted, with a client replica", &mut phase);

    // The operator killed in the middle of a scale-down and of a scale-up.
    for target in [3u64, 5] {
        k.kubectl(&[
            "scale",
            "-n",
            ns,
            "kordcluster/kord",
            &format!("--replicas={target}"),
        ])
        .expect("scale");
        let step = k.wait(
            "the operator to be in the middle of the scale",
            k.secs(120),
            || {
                let s = cluster_status(&k, ns)?;
                match s.membership_change {
                    Some(step) if s.observed_generation == s.generation => Ok(step),
                    _ => Err(format!("{s:?}")),
                }
            },
        );
        let ops = operator_pods(&k, ns);
        assert!(!ops.is_empty(), "no operator pod found in {ns}");
        println!("scaling to {target}: killing the operator during \"{step}\"");
        for op in &ops {
            delete_pod_now(&k, ns, op);
        }
        let s = wait_converged(&k, ns, target, k.secs(600));
        assert_acked_everywhere(&k, ns, &member_endpoints(&k, ns, &s), 2);
    }
    lap("operator killed mid-scale (down and up)", &mut phase);

    // A member's pod deleted together with its PVC: replaced under a new id.
    let s = wait_converged(&k, ns, 5, recover);
    let victim = s.members.last().cloned().expect("a member");
    let victim_pod = victim["pod"].as_str().expect("member pod").to_owned();
    let old_ids: BTreeSet<String> = s.members.iter().map(|m| m["id"].to_string()).collect();
    let pvcs = k.get_json(ns, &["pvc"]).expect("pvcs");
    let victim_pvcs: Vec<String> = pvcs["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
        .filter(|n| n.contains(&victim_pod))
        .collect();
    for pvc in &victim_pvcs {
        let _ = k.kubectl(&["delete", "pvc", "-n", ns, pvc, "--wait=false"]);
    }
    delete_pod_now(&k, ns, &victim_pod);
    let s = wait_replaced(
        &k,
        ns,
        "the lost member to be replaced under a new id",
        k.secs(600),
        &old_ids,
        &victim,
    );
    assert_acked_everywhere(&k, ns, &member_endpoints(&k, ns, &s), 2);
    lap("pod and PVC deleted: replaced", &mut phase);

    // A follower's disk wiped under its intact claim, then its pod deleted: the recreated pod
    // starts empty, the cluster refuses it ("has lost its data", its termination message),
    // and the operator replaces it under a new id at once, well before the 5-minute unhealthy
    // grace. Needs the volumes' hostPath dirs on this machine (the local cluster's case).
    if std::env::var("KORD_K8S_NODE_IS_LOCAL").as_deref() == Ok("1") {
        let s = wait_converged(&k, ns, 5, recover);
        let victim = s
            .members
            .iter()
            .find(|m| m["pod"].as_str() != leader_pod(&s).as_deref())
            .cloned()
            .expect("a follower");
        let victim_pod = victim["pod"].as_str().expect("member pod").to_owned();
        let old_ids: BTreeSet<String> = s.members.iter().map(|m| m["id"].to_string()).collect();
        let pv = k
            .kubectl(&[
                "get",
                "pvc",
                "-n",
                ns,
                &format!("data-{victim_pod}"),
                "-o",
                "jsonpath={.spec.volumeName}",
            ])
            .expect("the victim's claim");
        let dir = k
            .kubectl(&[
                "get",
                "pv",
                pv.trim(),
                "-o",
                "jsonpath={.spec.hostPath.path}",
            ])
            .expect("its volume");
        let wipe = || {
            for entry in std::fs::read_dir(dir.trim())
                .expect("the volume's dir")
                .flatten()
            {
                let p = entry.path();
                let _ = std::fs::remove_dir_all(&p).or_else(|_| std::fs::remove_file(&p));
            }
        };
        wipe();
        delete_pod_now(&k, ns, &victim_pod);
        // Again: the killed process may have written a file between the first wipe and its end.
        wipe();
        let s = wait_replaced(
            &k,
            ns,
            "the member with a wiped disk to be replaced under a new id",
            k.secs(240),
            &old_ids,
            &victim,
        );
        assert_acked_everywhere(&k, ns, &member_endpoints(&k, ns, &s), 2);
        lap("disk wiped under its claim: replaced", &mut phase);
    } else {
        println!(
            "skipped the wiped-disk step: KORD_K8S_NODE_IS_LOCAL=1 is not set (the volumes' \
             hostPath dirs are not on this machine)"
        );
    }

    // 5. Helm upgrade to a new image tag: rolling, leader last, at most one election. The tag
    // names the same image under a second name (scripts/k8s/e2e.sh and scripts/kind/run-e2e.sh
    // make it), since the operator rolls members when their image changes.
    let new_tag = std::env::var("KORD_K8S_UPGRADE_TAG").expect("checked by operator_missing");
    let before = cluster_status(&k, ns).expect("status");
    let old_leader = leader_pod(&before).unwrap_or_default();
    let values = chart_values(&k, 5, Some(&new_tag), &pool.class).to_string();
    k.helm(&[
        "upgrade",
        "kord",
        &chart,
        "-n",
        ns,
        "--values-json",
        &values,
    ])
    .expect("helm upgrade");
    let mut restart_order: Vec<String> = Vec::new();
    let mut leaders: BTreeSet<String> = BTreeSet::new();
    let deadline = Instant::now() + k.secs(900);
    let original: BTreeMap<String, String> = member_pods(&k, ns)
        .iter()
        .filter_map(|p| {
            Some((
                p["metadata"]["name"].as_str()?.to_owned(),
                p["metadata"]["uid"].as_str()?.to_owned(),
            ))
        })
        .collect();
    while Instant::now() < deadline && restart_order.len() < original.len() {
        if let Ok(s) = cluster_status(&k, ns) {
            if !s.leader.is_empty() {
                leaders.insert(s.leader.clone());
            }
        }
        for p in member_pods(&k, ns) {
            let (Some(name), Some(uid)) = (
                p["metadata"]["name"].as_str(),
                p["metadata"]["uid"].as_str(),
            ) else {
                continue;
            };
            if original.get(name).is_some_and(|u| u != uid)
                && !restart_order.iter().any(|r| r == name)
            {
                restart_order.push(name.to_owned());
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    println!("upgrade restart order {restart_order:?}, leaders seen {leaders:?}");
    assert_eq!(
        restart_order.len(),
        original.len(),
        "not every member was restarted"
    );
    assert_eq!(
        restart_order.last(),
        Some(&old_leader),
        "the leader was not restarted last"
    );
    assert!(
        leaders.len() <= 2,
        "more than one election during the upgrade: {leaders:?}"
    );
    let s = wait_converged(&k, ns, 5, recover);
    assert_acked_everywhere(&k, ns, &member_endpoints(&k, ns, &s), 2);
    lap("helm upgrade", &mut phase);

    // 6. Uninstall leaves no pods, services or volume claims (the writers are the suite's own;
    // the claims are owned by the KordCluster, so they go with it).
    let _ = k.kubectl(&[
        "delete",
        "pod",
        "-n",
        ns,
        "-l",
        "app=kord-writer",
        "--wait=false",
    ]);
    k.helm(&["uninstall", "kord", "-n", ns, "--wait"])
        .expect("helm uninstall");
    release.installed = false;
    k.wait(
        "no pods, services or claims left after uninstall",
        k.secs(180),
        || {
            let left = k.kubectl(&["get", "pods,services,pvc", "-n", ns, "-o", "name"])?;
            if left.trim().is_empty() {
                Ok(())
            } else {
                Err(left)
            }
        },
    );
    lap("uninstall", &mut phase);
    println!(
        "operator scenarios done in {:?}: {timings:?}",
        started.elapsed()
    );
}
