//! Against a real Kubernetes API server (only when KORD_TEST_KUBECONFIG names a kubeconfig;
//! skipped otherwise, saying why): installs the CRD, runs the controller in-process on a
//! namespace of its own, and checks that a KordCluster gets its objects (owned, server-side
//! applied), its status and events, that `kubectl scale` (the scale subresource) changes
//! `spec.replicas`, and that the schema refuses 9 replicas.
//!
//! Kord pods need not run for this: the operator cannot reach members from outside the cluster,
//! so the cluster stays in Bootstrapping, which is what the status must say.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PersistentVolumeClaim, Pod, Service};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kord_operator::crd::KordCluster;
use kord_operator::metrics::Metrics;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, CustomResourceExt, ResourceExt};

const WAIT: Duration = Duration::from_secs(90);

async fn client() -> Option<kube::Client> {
    // KORD_K8S_KUBECONFIG: what scripts/k8s/e2e.sh exports for the local cluster it runs.
    let path = std::env::var_os("KORD_TEST_KUBECONFIG")
        .or_else(|| std::env::var_os("KORD_K8S_KUBECONFIG"));
    let Some(path) = path else {
        println!(
            "SKIPPED: neither KORD_TEST_KUBECONFIG nor KORD_K8S_KUBECONFIG names a kubeconfig, so \
             there is no API server to test the operator against (run it under scripts/k8s/e2e.sh \
             or point KORD_TEST_KUBECONFIG at a cluster you may create namespaces in)"
        );
        return None;
    };
    let kubeconfig = Kubeconfig::read_from(&path).expect("readable kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("usable kubeconfig");
    Some(kube::Client::try_from(config).expect("client"))
}

/// Polls `check` until it returns Some, at most WAIT.
async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    kord_e2e::wait_until(what, WAIT, || {
        let polled = check();
        async move { polled.await.ok_or_else(|| "not yet".to_string()) }
    })
    .await
}

async fn install_crd(client: &kube::Client) {
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    let crd = KordCluster::crd();
    crds.patch(
        &crd.name_any(),
        &PatchParams::apply("kord-operator-test").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("CRD applies");
    wait_for("the CRD to be established", || {
        let crds = crds.clone();
        async move {
            let crd = crds.get("kordclusters.kord.io").await.ok()?;
            let established = crd
                .status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            established.then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn reconcile_creates_owned_objects_status_and_scales() {
    let Some(client) = client().await else { return };
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_ansi(false)
        .with_env_filter("info,kube=warn")
        .try_init();
    install_crd(&client).await;
    let ns_name = format!("kord-op-test-{}", std::process::id());
    let namespaces = Api::<Namespace>::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": ns_name, "labels": {"app.kubernetes.io/part-of": "kord-operator-test"}}
    }))
    .expect("namespace");
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");

    let metrics = Arc::new(Metrics::default());
    let controller = tokio::spawn(kord_operator::controller::run(
        client.clone(),
        Some(ns_name.clone()),
        metrics.clone(),
        Some("127.0.0.1:1".into()),
    ));

    // The checks run in their own task so that a failed assertion still cleans up here.
    let outcome = tokio::spawn(exercise(client.clone(), ns_name.clone(), metrics)).await;
    controller.abort();
    let _ = namespaces.delete(&ns_name, &DeleteParams::default()).await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn exercise(client: kube::Client, ns: String, metrics: Arc<Metrics>) {
    let (client, ns) = (&client, ns.as_str());
    let clusters = Api::<KordCluster>::namespaced(client.clone(), ns);
    let kc: KordCluster = serde_json::from_value(serde_json::json!({
        "apiVersion": "kord.io/v1alpha1",
        "kind": "KordCluster",
        "metadata": {"name": "demo"},
        "spec": {"replicas": 1, "image": "kord:0.1.0", "imagePullPolicy": "Never",
                 "electionTimeout": "2s", "storage": {"size": "64Mi"}}
    }))
    .expect("cluster");
    let kc = clusters
        .create(&PostParams::default(), &kc)
        .await
        .expect("create KordCluster");
    let uid = kc.uid().expect("uid");

    // The first member: its volume and pod (bootstrapping itself), owned by the cluster.
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let pod = wait_for("pod demo-1", || {
        let pods = pods.clone();
        async move { pods.get_opt("demo-1").await.ok().flatten() }
    })
    .await;
    let owned =
        |refs: Option<&Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference>>| {
            refs.is_some_and(|rs| {
                rs.iter()
                    .any(|r| r.uid == uid && r.controller == Some(true))
            })
        };
    assert!(
        owned(pod.metadata.owner_references.as_ref()),
        "pod owned by the cluster"
    );
    let args = pod.spec.expect("spec").containers[0]
        .args
        .clone()
        .expect("args");
    assert!(
        args.iter()
            .any(|a| a.starts_with("--initial-cluster=1=demo-1.demo-peer.")),
        "the first member bootstraps: {args:?}"
    );
    assert_eq!(
        pod.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("kord.io/member-id"))
            .map(String::as_str),
        Some("1")
    );
    let pvc = Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .get("data-demo-1")
        .await
        .expect("volume of member 1");
    assert!(owned(pvc.metadata.owner_references.as_ref()));
    let services = Api::<Service>::namespaced(client.clone(), ns);
    let peer = services.get("demo-peer").await.expect("peer service");
    let peer_spec = peer.spec.expect("spec");
    assert_eq!(peer_spec.cluster_ip.as_deref(), Some("None"), "headless");
    assert_eq!(peer_spec.publish_not_ready_addresses, Some(true));
    services.get("demo").await.expect("client service");
    let config = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get("demo-config")
        .await
        .expect("config map");
    assert_eq!(
        config
            .data
            .and_then(|d| d.get("KORD_ELECTION_TIMEOUT").cloned())
            .as_deref(),
        Some("2s")
    );

    // Status: patched through the status subresource.
    let status = wait_for("status with phase and next member id", || {
        let clusters = clusters.clone();
        async move {
            let s = clusters.get_status("demo").await.ok()?.status?;
            (s.phase.is_some() && s.next_member_id >= 2).then_some(s)
        }
    })
    .await;
    assert_eq!(status.phase.as_deref(), Some("Bootstrapping"), "{status:?}");
    assert_eq!(
        status.selector.as_deref(),
        Some("app.kubernetes.io/component=member,app.kubernetes.io/instance=demo,app.kubernetes.io/name=kord")
    );
    assert!(status
        .conditions
        .iter()
        .any(|c| c.type_ == "Available" && c.status == "False"));
    assert!(!status.bootstrapped);

    // Events: the bootstrap step, and (Kubernetes < 1.21) the missing policy/v1 PDB.
    let events = Api::<Event>::namespaced(client.clone(), ns);
    let reasons = wait_for("events", || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await.ok()?;
            let reasons: Vec<String> = list.items.iter().filter_map(|e| e.reason.clone()).collect();
            reasons.iter().any(|r| r == "Bootstrap").then_some(reasons)
        }
    })
    .await;
    let pdb_v1 = kord_operator::actuate::serves_pdb_v1(client).await;
    assert_eq!(
        reasons.iter().any(|r| r == "NoPodDisruptionBudget"),
        !pdb_v1,
        "{reasons:?}"
    );

    // `kubectl scale kord/demo --replicas=3` is a patch of the scale subresource.
    clusters
        .patch_scale(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 3}})),
        )
        .await
        .expect("scale subresource");
    let kc = clusters.get("demo").await.expect("cluster");
    assert_eq!(kc.spec.replicas, 3);
    let scale = clusters.get_scale("demo").await.expect("scale");
    assert_eq!(scale.spec.and_then(|s| s.replicas), Some(3));
    let selector = scale
        .status
        .map(|s| s.selector.unwrap_or_default())
        .unwrap_or_default();
    assert!(
        selector.contains("app.kubernetes.io/instance=demo"),
        "{selector}"
    );

    // The schema bounds replicas to 1..=7.
    let err = clusters
        .patch_scale(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"replicas": 9}})),
        )
        .await
        .expect_err("9 replicas refused");
    assert!(err.to_string().contains("replicas"), "{err}");

    // Still bootstrapping (the member is not reachable from here): no second member yet.
    assert!(
        pods.get_opt("demo-2").await.expect("get").is_none(),
        "one step at a time"
    );
    assert!(metrics.encode().contains("kord_operator_reconciles_total"));
}

/// With a Kord image in the cluster (KORD_TEST_KORD_IMAGE, or KORD_K8S_IMAGE from
/// scripts/k8s/e2e.sh): the first member's pod, as the operator builds it (bootstrap flags,
/// probes, data volume), runs the real server and becomes Ready.
#[tokio::test]
async fn bootstrap_pod_runs_the_real_server() {
    let Some(client) = client().await else { return };
    let image = std::env::var("KORD_TEST_KORD_IMAGE").or_else(|_| std::env::var("KORD_K8S_IMAGE"));
    let Ok(image) = image else {
        println!(
            "SKIPPED: no Kord image named (KORD_TEST_KORD_IMAGE or KORD_K8S_IMAGE), so no member \
             pod can run"
        );
        return;
    };
    install_crd(&client).await;
    let ns_name = format!("kord-op-pod-{}", std::process::id());
    let namespaces = Api::<Namespace>::all(client.clone());
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": ns_name}}))
        .expect("namespace");
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
    let controller = tokio::spawn(kord_operator::controller::run(
        client.clone(),
        Some(ns_name.clone()),
        Arc::new(Metrics::default()),
        Some("127.0.0.1:1".into()),
    ));
    let check = {
        let (client, ns) = (client.clone(), ns_name.clone());
        async move {
            let clusters = Api::<KordCluster>::namespaced(client.clone(), &ns);
            let kc: KordCluster = serde_json::from_value(serde_json::json!({
                "apiVersion": "kord.io/v1alpha1",
                "kind": "KordCluster",
                "metadata": {"name": "solo"},
                "spec": {"replicas": 1, "image": image, "imagePullPolicy": "IfNotPresent",
                         "storage": {"ephemeral": true}}
            }))
            .expect("cluster");
            clusters
                .create(&PostParams::default(), &kc)
                .await
                .expect("create KordCluster");
            let pods = Api::<Pod>::namespaced(client.clone(), &ns);
            wait_for("pod solo-1 to be Ready", || {
                let pods = pods.clone();
                async move {
                    let pod = pods.get_opt("solo-1").await.ok().flatten()?;
                    let ready = pod
                        .status?
                        .conditions?
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True");
                    ready.then_some(())
                }
            })
            .await;
        }
    };
    let outcome = tokio::spawn(check).await;
    controller.abort();
    let _ = namespaces.delete(&ns_name, &DeleteParams::default()).await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}
