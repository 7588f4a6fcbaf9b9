//! `kordctl` against a 1-member cluster: JSON status, create/get/set/ls, and errors on stderr
//! with a non-zero exit code.

use std::process::{Output, Stdio};
use std::time::Duration;

use kord_e2e::*;
use serde_json::Value;

async fn kordctl(c: &Cluster, args: &[&str]) -> Output {
    c.kordctl(args, Duration::from_secs(30)).await
}

fn show(args: &[&str], out: &Output) -> String {
    format!(
        "kordctl {args:?}: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn ok(c: &Cluster, args: &[&str]) -> String {
    let out = kordctl(c, args).await;
    assert!(
        out.status.success(),
        "expected success: {}",
        show(args, &out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn fails(c: &Cluster, args: &[&str]) -> String {
    let out = kordctl(c, args).await;
    assert!(
        !out.status.success(),
        "expected a non-zero exit: {}",
        show(args, &out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stderr.trim().is_empty(),
        "expected a message on stderr: {}",
        show(args, &out)
    );
    stderr
}

/// The first value under `key`, searching nested objects and arrays.
fn find_key<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    match v {
        Value::Object(map) => map
            .get(key)
            .or_else(|| map.values().find_map(|x| find_key(x, key))),
        Value::Array(items) => items.iter().find_map(|x| find_key(x, key)),
        _ => None,
    }
}

fn as_u64(v: &Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kordctl_status_create_get_set_and_errors() {
    let c = Cluster::start(1, ClusterOpts::default()).await;

    let out = ok(&c, &["-o", "json", "status"]).await;
    let json: Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("`kordctl -o json status` is not JSON ({e}): {out}"));
    let leader = find_key(&json, "leader_id").and_then(as_u64);
    assert_eq!(leader, Some(1), "leader_id in {json}");
    if let Some(member) = find_key(&json, "member_id") {
        assert_eq!(as_u64(member), Some(1), "member_id in {json}");
    }

    ok(&c, &["create", "/x", "hello"]).await;
    let got = get(&mut c.kv(1), "/x", LINEARIZABLE)
        .await
        .expect("get /x over gRPC");
    assert_eq!(got.data, b"hello");
    let out = ok(&c, &["get", "/x"]).await;
    assert!(out.contains("hello"), "`kordctl get /x` printed {out:?}");

    let err = fails(&c, &["get", "/missing"]).await;
    let lower = err.to_lowercase();
    assert!(
        lower.contains("/missing") || lower.contains("not found") || lower.contains("notfound"),
        "stderr should say what is missing: {err:?}"
    );
    fails(&c, &["create", "/x", "again"]).await;

    ok(&c, &["set", "/x", "world", "--version", "0"]).await;
    let got = get(&mut c.kv(1), "/x", LINEARIZABLE).await.expect("get /x");
    assert_eq!(
        (got.data.as_slice(), got.stat.expect("stat").version),
        (&b"world"[..], 1)
    );
    fails(&c, &["set", "/x", "stale", "--version", "0"]).await;
    let got = get(&mut c.kv(1), "/x", LINEARIZABLE).await.expect("get /x");
    assert_eq!(got.data, b"world", "a rejected set changed the value");

    let out = ok(&c, &["create", "--sequential", "/x/s-", "one"]).await;
    assert!(
        out.contains("/x/s-0000000000"),
        "sequential create printed {out:?}"
    );
    let out = ok(&c, &["ls", "/x"]).await;
    assert!(
        out.contains("s-0000000000"),
        "`kordctl ls /x` printed {out:?}"
    );
    let out = ok(&c, &["ls", "/"]).await;
    assert!(
        out.split_whitespace()
            .any(|w| w.trim_matches('"').trim_start_matches('/') == "x"),
        "`kordctl ls /` printed {out:?}"
    );

    let out = ok(&c, &["-o", "json", "stat", "/x"]).await;
    let json: Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("`kordctl -o json stat /x` is not JSON ({e}): {out}"));
    if let Some(v) = find_key(&json, "version") {
        assert_eq!(as_u64(v), Some(1), "version in {json}");
    }

    // txn: all ops or none.
    ok(&c, &["txn", "create /x/t tx", "check /x 1", "set /x txn 1"]).await;
    let got = get(&mut c.kv(1), "/x/t", LINEARIZABLE)
        .await
        .expect("get /x/t");
    assert_eq!(got.data, b"tx");
    let got = get(&mut c.kv(1), "/x", LINEARIZABLE).await.expect("get /x");
    assert_eq!(
        (got.data.as_slice(), got.stat.expect("stat").version),
        (&b"txn"[..], 2)
    );
    fails(&c, &["txn", "create /x/u", "check /x 9"]).await;
    assert_eq!(
        exists(&mut c.kv(1), "/x/u", LINEARIZABLE)
            .await
            .expect("exists"),
        None
    );

    ok(&c, &["delete", "/x/s-0000000000"]).await;
    assert_eq!(
        exists(&mut c.kv(1), "/x/s-0000000000", LINEARIZABLE)
            .await
            .expect("exists"),
        None
    );
    fails(&c, &["delete", "/x/s-0000000000"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kordctl_watch_prints_events_as_json_lines() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let c = Cluster::start(1, ClusterOpts::default()).await;
    ok(&c, &["create", "/cfg", "v0"]).await;
    let mut child = tokio::process::Command::new(kordctl_bin())
        .args([
            "--endpoints",
            &c.endpoints_csv(),
            "-o",
            "json",
            "watch",
            "/cfg",
            "--recursive",
            "--prev",
        ])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn kordctl watch");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    // `watch` acknowledges before it prints anything, but the process may still be starting:
    // keep changing the node until its first event shows up.
    let mut events: Vec<Value> = Vec::new();
    for i in 1..=20 {
        ok(&c, &["set", "/cfg", &format!("v{i}")]).await;
        if let Ok(Ok(Some(line))) =
            tokio::time::timeout(Duration::from_millis(500), lines.next_line()).await
        {
            events.push(serde_json::from_str(&line).expect("a JSON line"));
            break;
        }
    }
    ok(&c, &["create", "/cfg/child", "x"]).await;
    while events.len() < 3 {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .expect("event line in time")
            .expect("read")
            .expect("a line");
        let v: Value = serde_json::from_str(&line).expect("a JSON line");
        if v.get("progress").is_none() {
            events.push(v);
        }
    }
    assert_eq!(events[0]["type"], "data_changed", "{events:?}");
    assert!(events[0]["prev_data"].is_string(), "{events:?}");
    let revs: Vec<u64> = events
        .iter()
        .map(|e| e["revision"].as_u64().expect("revision"))
        .collect();
    assert!(revs.windows(2).all(|w| w[0] <= w[1]), "{revs:?}");
    assert!(
        events
            .iter()
            .any(|e| e["type"] == "created" && e["path"] == "/cfg/child"),
        "{events:?}"
    );
}
