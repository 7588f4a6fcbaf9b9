//! Harness for the Kubernetes suite (`tests/k8s.rs`): a kubectl and Helm driver, per-test
//! namespaces, pod logs (through `kubectl logs`, or the node's /var/log/pods where the
//! kubelet cannot serve logs), one-shot pods that run the sample service's `set`/`ls`/`verify`
//! modes inside the cluster, and bounded polls.
//!
//! Everything is configured by environment; with `KORD_K8S_KUBECONFIG` unset the suite skips:
//! - `KORD_K8S_KUBECONFIG`: the cluster; `KORD_K8S_IMAGE`: the kord image (kord + kordctl).
//! - `KORD_K8S_SAMPLE_IMAGE`: the sample service's image (default: the kord image's reference
//!   with `kord-k8s-sample` for the repository's last component).
//! - `KORD_K8S_OPERATOR_IMAGE`: the operator image (default likewise, `kord-operator`).
//! - `KORD_K8S_UPGRADE_TAG`: a second tag of the kord image, for the helm-upgrade step.
//! - `KORD_K8S_KUBECTL` (default `kubectl`), `KORD_K8S_HELM` (a `helm`-compatible wrapper,
//!   default `kord-helm`; see scripts/k8s/tools.sh).
//! - `KORD_K8S_POD_LOG_DIR`: read pod logs from this directory (the node's /var/log/pods)
//!   instead of `kubectl logs`.
//! - `KORD_K8S_HELM_VALUES`: JSON merged over the suite's chart values; `KORD_K8S_CHART`: the
//!   chart directory (default: the tree's charts/kord).
//! - `KORD_K8S_TIME_SCALE`: multiplies every wait (default 1).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The suite's configuration, read from the environment.
#[derive(Debug, Clone)]
pub struct K8s {
    pub kubeconfig: PathBuf,
    pub kubectl: String,
    pub helm: String,
    pub image: String,
    pub sample_image: String,
    pub operator_image: String,
    pub pod_log_dir: Option<PathBuf>,
    pub time_scale: f64,
}

/// Replaces the last path component of an image reference's repository.
fn sibling_image(image: &str, repo_name: &str) -> String {
    let (repo, tag) = match image.rsplit_once(':') {
        Some((r, t)) if !t.contains('/') => (r, Some(t)),
        _ => (image, None),
    };
    let base = match repo.rsplit_once('/') {
        Some((prefix, _)) => format!("{prefix}/{repo_name}"),
        None => repo_name.to_owned(),
    };
    match tag {
        Some(t) => format!("{base}:{t}"),
        None => base,
    }
}

impl K8s {
    /// The configuration, or why the suite cannot run (the caller prints "skipped: ...").
    pub fn from_env() -> Result<K8s, String> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let kubeconfig = var("KORD_K8S_KUBECONFIG").ok_or(
            "KORD_K8S_KUBECONFIG is not set (scripts/k8s/e2e.sh or scripts/kind/run-e2e.sh set it)",
        )?;
        if !Path::new(&kubeconfig).exists() {
            return Err(format!("KORD_K8S_KUBECONFIG={kubeconfig} does not exist"));
        }
        let image = var("KORD_K8S_IMAGE").ok_or("KORD_K8S_IMAGE is not set")?;
        let k = K8s {
            kubeconfig: kubeconfig.into(),
            kubectl: var("KORD_K8S_KUBECTL").unwrap_or_else(|| "kubectl".into()),
            helm: var("KORD_K8S_HELM").unwrap_or_else(|| "kord-helm".into()),
            sample_image: var("KORD_K8S_SAMPLE_IMAGE")
                .unwrap_or_else(|| sibling_image(&image, "kord-k8s-sample")),
            operator_image: var("KORD_K8S_OPERATOR_IMAGE")
                .unwrap_or_else(|| sibling_image(&image, "kord-operator")),
            image,
            pod_log_dir: var("KORD_K8S_POD_LOG_DIR").map(PathBuf::from),
            time_scale: var("KORD_K8S_TIME_SCALE")
                .and_then(|v| v.parse().ok())
                .filter(|s: &f64| *s > 0.0)
                .unwrap_or(1.0),
        };
        k.kubectl(&["get", "--raw", "/readyz"])
            .map_err(|e| format!("the cluster's apiserver is not ready: {e}"))?;
        Ok(k)
    }

    /// A wait bound, scaled for slow machines.
    pub fn secs(&self, s: u64) -> Duration {
        Duration::from_secs_f64(s as f64 * self.time_scale)
    }

    /// Runs kubectl; Ok(stdout) on exit 0, else Err naming the command and its stderr.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        self.kubectl_stdin(args, None)
    }

    pub fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let mut cmd = Command::new(&self.kubectl);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        run(cmd, stdin).map_err(|e| format!("kubectl {}: {e}", args.join(" ")))
    }

    /// `kubectl apply -f -` in namespace `ns`.
    pub fn apply(&self, ns: &str, yaml: &str) -> Result<String, String> {
        self.kubectl_stdin(&["apply", "-n", ns, "-f", "-"], Some(yaml))
    }

    /// A JSON object from `kubectl get -o json`.
    pub fn get_json(&self, ns: &str, what: &[&str]) -> Result<Value, String> {
        let mut args = vec!["get", "-n", ns, "-o", "json"];
        args.extend_from_slice(what);
        let out = self.kubectl(&args)?;
        serde_json::from_str(&out).map_err(|e| format!("kubectl get {what:?}: bad JSON: {e}"))
    }

    /// Runs the Helm wrapper with the suite's kubeconfig.
    pub fn helm(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(&self.helm);
        cmd.args(args).arg("--kubeconfig").arg(&self.kubeconfig);
        run(cmd, None).map_err(|e| format!("{} {}: {e}", self.helm, args.join(" ")))
    }

    /// Whether the API server serves a resource (e.g. the KordCluster CRD once installed).
    pub fn has_resource(&self, resource: &str) -> bool {
        self.kubectl(&["get", resource, "-A", "--request-timeout=10s"])
            .is_ok()
    }

    /// A fresh namespace for one test, deleted when the guard drops.
    pub fn namespace(&self, prefix: &str) -> Result<Namespace, String> {
        let name = format!("{prefix}-{:06x}", rand::random::<u32>() & 0xff_ffff);
        self.kubectl(&["create", "namespace", &name])?;
        // Pods need the namespace's default service account, made by the controller manager.
        self.wait(
            "the namespace's default service account",
            self.secs(60),
            || {
                self.kubectl(&["get", "serviceaccount", "default", "-n", &name])
                    .map(|_| ())
            },
        );
        Ok(Namespace {
            k8s: self.clone(),
            name,
        })
    }

    /// Polls `check` every 500 ms until Ok; panics after `timeout` with the last reason.
    pub fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut() -> Result<T, String>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        loop {
            let reason = match check() {
                Ok(v) => return v,
                Err(r) => r,
            };
            if Instant::now() >= deadline {
                panic!("timed out after {timeout:?} waiting for {what}; last: {reason}");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Names of the pods matching a label selector.
    pub fn pods(&self, ns: &str, selector: &str) -> Result<Vec<Value>, String> {
        let list = self.get_json(ns, &["pods", "-l", selector])?;
        Ok(list["items"].as_array().cloned().unwrap_or_default())
    }

    /// Waits until `count` pods match `selector` and all are Ready; returns their names.
    pub fn wait_pods_ready(
        &self,
        ns: &str,
        selector: &str,
        count: usize,
        timeout: Duration,
    ) -> Vec<String> {
        self.wait(
            &format!("{count} Ready pods matching {selector} in {ns}"),
            timeout,
            || {
                let pods = self.pods(ns, selector)?;
                let live: Vec<&Value> = pods
                    .iter()
                    .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
                    .collect();
                let ready: Vec<String> = live
                    .iter()
                    .filter(|p| pod_ready(p))
                    .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
                    .collect();
                if live.len() == count && ready.len() == count {
                    Ok(ready)
                } else {
                    Err(format!("{} live, ready: {ready:?}", live.len()))
                }
            },
        )
    }

    /// A field of a pod, by a `kubectl` JSONPath such as `{.status.podIP}`, trimmed.
    pub fn pod_field(&self, ns: &str, pod: &str, jsonpath: &str) -> Result<String, String> {
        self.kubectl(&[
            "get",
            "pod",
            "-n",
            ns,
            pod,
            "-o",
            &format!("jsonpath={jsonpath}"),
        ])
        .map(|v| v.trim().to_owned())
    }

    /// The pod's UID (it changes when a pod of the same name is recreated).
    pub fn pod_uid(&self, ns: &str, pod: &str) -> Result<String, String> {
        self.pod_field(ns, pod, "{.metadata.uid}")
    }

    /// The pod's log (one container), from the kubelet or from the node's log directory.
    pub fn pod_log(&self, ns: &str, pod: &str, container: &str) -> Result<String, String> {
        let Some(dir) = &self.pod_log_dir else {
            // `kubectl logs` shows the running container only. A container that restarted
            // left its earlier reports in the previous one's log, which the kubelet keeps
            // (one, not more: a second restart loses the first run's).
            let restarts = self.pod_field(
                ns,
                pod,
                &format!("{{.status.containerStatuses[?(@.name==\"{container}\")].restartCount}}"),
            )?;
            let mut out = String::new();
            if restarts.parse::<u64>().unwrap_or(0) > 0 {
                out = self.kubectl(&["logs", "--previous", "-n", ns, pod, "-c", container])?;
            }
            out.push_str(&self.kubectl(&["logs", "-n", ns, pod, "-c", container])?);
            return Ok(out);
        };
        let uid = self.pod_uid(ns, pod)?;
        let cdir = dir.join(format!("{ns}_{pod}_{uid}")).join(container);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&cdir)
            .map_err(|e| format!("{}: {e}", cdir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        // 0.log, 1.log, ...: one per container start.
        files.sort_by_key(|p| {
            p.file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse::<u64>().ok())
                .unwrap_or(0)
        });
        let mut out = String::new();
        for f in files {
            let text = std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?;
            out.push_str(&cri_log_to_text(&text));
        }
        Ok(out)
    }

    /// The JSON report lines of a pod's log (see the sample service).
    pub fn pod_events(&self, ns: &str, pod: &str, container: &str) -> Result<Vec<Value>, String> {
        Ok(json_lines(&self.pod_log(ns, pod, container)?))
    }

    /// Runs the sample image once (`restartPolicy: Never`) with `args`, waits for it to
    /// succeed, and returns its report lines.
    pub fn run_sample(
        &self,
        ns: &str,
        endpoints: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<Vec<Value>, String> {
        let name = format!("oneshot-{:08x}", rand::random::<u32>());
        let args_json = serde_json::to_string(args).map_err(|e| e.to_string())?;
        let pod = format!(
            r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{name}","labels":{{"app":"kord-oneshot"}}}},
"spec":{{"restartPolicy":"Never","terminationGracePeriodSeconds":1,"containers":[{{"name":"main",
"image":"{}","imagePullPolicy":"IfNotPresent","args":{args_json},
"env":[{{"name":"KORD_ENDPOINTS","value":"{endpoints}"}},{{"name":"SAMPLE_NAME","value":"{name}"}}]}}]}}}}"#,
            self.sample_image
        );
        self.apply(ns, &pod)?;
        let deadline = Instant::now() + timeout;
        let phase = loop {
            let phase = self
                .kubectl(&[
                    "get",
                    "pod",
                    "-n",
                    ns,
                    &name,
                    "-o",
                    "jsonpath={.status.phase}",
                ])
                .unwrap_or_default();
            if phase == "Succeeded" || phase == "Failed" || Instant::now() >= deadline {
                break phase;
            }
            std::thread::sleep(Duration::from_millis(300));
        };
        let log = self.pod_log(ns, &name, "main").unwrap_or_else(|e| e);
        let _ = self.kubectl(&["delete", "pod", "-n", ns, &name, "--wait=false"]);
        if phase != "Succeeded" {
            return Err(format!("one-shot {args:?}: phase {phase:?}; log:\n{log}"));
        }
        Ok(json_lines(&log))
    }
}

/// Runs a command, feeding `stdin`; Ok(stdout) on success.
fn run(mut cmd: Command, stdin: Option<&str>) -> Result<String, String> {
    use std::io::Write;
    use std::process::Stdio;
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("cannot start: {e}"))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|e| format!("stdin: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether a pod object has condition Ready=True.
pub fn pod_ready(pod: &Value) -> bool {
    pod["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

/// CRI log format ("<time> <stream> <P|F> <text>") to plain text; P(artial) lines are joined.
pub fn cri_log_to_text(raw: &str) -> String {
    let mut out = String::new();
    for line in raw.lines() {
        let mut parts = line.splitn(4, ' ');
        let (_time, _stream, tag, text) = (parts.next(), parts.next(), parts.next(), parts.next());
        out.push_str(text.unwrap_or(""));
        if tag != Some("P") {
            out.push('\n');
        }
    }
    out
}

/// The lines of `text` that parse as JSON objects.
pub fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .filter(Value::is_object)
        .collect()
}

/// A test's namespace; deleted (without waiting) when dropped, unless `KORD_K8S_KEEP=1`.
pub struct Namespace {
    k8s: K8s,
    pub name: String,
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if std::env::var("KORD_K8S_KEEP").as_deref() == Ok("1") {
            eprintln!("keeping namespace {}", self.name);
            return;
        }
        let _ = self
            .k8s
            .kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sibling_images() {
        assert_eq!(
            sibling_image("kord.local/kord:abc", "kord-operator"),
            "kord.local/kord-operator:abc"
        );
        assert_eq!(sibling_image("kord", "x"), "x");
        assert_eq!(
            sibling_image("localhost:5000/a/kord:1", "s"),
            "localhost:5000/a/s:1"
        );
    }

    #[test]
    fn cri_lines_join_partials() {
        let raw = "2026-01-01T00:00:00Z stdout P {\"a\":\n2026-01-01T00:00:00Z stdout F 1}\n\
                   2026-01-01T00:00:01Z stderr F plain text\n";
        assert_eq!(cri_log_to_text(raw), "{\"a\":1}\nplain text\n");
        assert_eq!(
            json_lines(&cri_log_to_text(raw)),
            vec![serde_json::json!({"a": 1})]
        );
    }
}
