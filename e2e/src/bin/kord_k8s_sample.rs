//! The Kubernetes suite's sample service (step: a service using Kord from pods). It reports
//! what it sees as one JSON object per stdout line, which the suite reads from the pod's log.
//!
//! Modes (first argument):
//! - `serve`: registers an ephemeral node under `SAMPLE_MEMBERS`, reads and watches the config
//!   key and reports each value it sees, and loops taking the lock `SAMPLE_LOCK`: while holding
//!   it, it checks the fencing token against the last holder's (kept in `SAMPLE_OWNER_KEY`),
//!   writes its own, holds for `SAMPLE_HOLD_MS`, and reports whether nobody wrote meanwhile.
//! - `write`: writes `SAMPLE_WRITES` keys `SAMPLE_PREFIX/<name>/<n>` (each retried until
//!   acknowledged, at most `SAMPLE_MAX_SECS`) and reports every acknowledged one.
//! - `verify`: on each endpoint of `KORD_ENDPOINTS` alone, lists every writer's keys under
//!   `SAMPLE_PREFIX` and reports them as ranges; then waits (bounded) for all members to agree
//!   on applied index and state digest and reports the digests.
//!
//! - `set KEY VALUE`: creates KEY (and its parents) or overwrites it; reports the revision.
//! - `ls KEY`: reports KEY's children (empty when KEY does not exist).
//!
//! Environment: `KORD_ENDPOINTS` (comma-separated host:port), `SAMPLE_NAME` (default: the
//! host name), and the per-mode variables above.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kord_client::{Client, Error, EventType, Mutex, Session, WatchEvent, WatchOptions};
use serde_json::{json, Value};

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| {
            eprintln!("{name}={v}: not a number; using {default}");
            default
        }),
        Err(_) => default,
    }
}

/// One report line; the suite parses these from the pod log.
fn report(event: &str, mut fields: Value) {
    if let Value::Object(map) = &mut fields {
        map.insert("event".into(), json!(event));
        map.insert(
            "unix_ms".into(),
            json!(std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0)),
        );
    }
    println!("{fields}");
}

fn endpoints() -> Vec<String> {
    env("KORD_ENDPOINTS", "127.0.0.1:7379")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

fn name() -> String {
    std::env::var("SAMPLE_NAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("sample-{}", std::process::id()))
}

/// Connects, retrying for up to a minute: the pods may start before Kord serves.
async fn connect(endpoints: &[String]) -> Result<Client, Error> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match Client::connect(endpoints.to_vec()).await {
            Ok(c) => return Ok(c),
            Err(e) if Instant::now() < deadline => {
                report("retry", json!({"op": "connect", "error": e.to_string()}));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Creates `path` and its missing ancestors as persistent nodes.
async fn ensure_path(client: &Client, path: &str) -> Result<(), Error> {
    let mut prefix = String::new();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        prefix.push('/');
        prefix.push_str(part);
        match client.create(&prefix, "").await {
            Ok(_) | Err(Error::NodeExists { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

async fn serve(client: Client, me: String) -> Result<(), Error> {
    let config_key = env("SAMPLE_CONFIG_KEY", "/sample/config");
    let members = env("SAMPLE_MEMBERS", "/sample/members");
    let timeout = Duration::from_millis(env_u64("SAMPLE_SESSION_TIMEOUT_MS", 6000));
    ensure_path(&client, &members).await?;
    let session = client.session(timeout).await?;
    client
        .create_ephemeral(&format!("{members}/{me}"), me.clone(), &session)
        .await?;
    report("registered", json!({"session": session.id()}));

    let watcher = tokio::spawn(watch_config(client.clone(), config_key));
    let locker = lock_loop(&client, &session, &me).await;
    watcher.abort();
    locker
}

/// Reports the config value now and after every change.
async fn watch_config(client: Client, key: String) -> Result<(), Error> {
    loop {
        let (value, revision) = match client.get(&key).await {
            Ok((data, stat)) => (
                Some(String::from_utf8_lossy(&data).into_owned()),
                stat.modify_revision,
            ),
            Err(Error::NoNode { .. }) => (None, 0),
            Err(e) => {
                report("retry", json!({"op": "get config", "error": e.to_string()}));
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        report("config", json!({"value": value, "revision": revision}));
        let status = client.status().await?;
        let opts = WatchOptions {
            start_revision: Some(revision.max(status.applied_index) + 1),
            ..Default::default()
        };
        let mut stream = client.watch(&key, opts).await?;
        while let Some(item) = stream.next().await {
            match item {
                Ok(WatchEvent::Events { revision, events }) => {
                    for ev in events {
                        let value = (ev.kind != EventType::Deleted)
                            .then(|| String::from_utf8_lossy(&ev.data).into_owned());
                        report("config", json!({"value": value, "revision": revision}));
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    report(
                        "retry",
                        json!({"op": "watch config", "error": e.to_string()}),
                    );
                    break;
                }
            }
        }
    }
}

/// Takes the lock again and again; each hold is checked against the previous holder's token.
async fn lock_loop(client: &Client, session: &Session, me: &str) -> Result<(), Error> {
    let lock = env("SAMPLE_LOCK", "sample");
    let owner_key = env("SAMPLE_OWNER_KEY", "/sample/owner");
    let hold = Duration::from_millis(env_u64("SAMPLE_HOLD_MS", 300));
    ensure_path(client, &owner_key).await?;
    let mutex = Mutex::new(session, lock);
    loop {
        let guard = mutex.lock().await?;
        let token = guard.fencing_token();
        let (data, stat) = client.get(&owner_key).await?;
        // The owner record is "<name>:<token>" of the last holder.
        let last = String::from_utf8_lossy(&data).into_owned();
        let (prev_owner, prev) = match last.rsplit_once(':') {
            Some((owner, t)) => (owner.to_owned(), t.parse::<u64>().unwrap_or(0)),
            None => (String::new(), 0),
        };
        let mine = format!("{me}:{token}");
        // The fencing check a guarded resource makes: never accept a token at or below the last.
        let fenced = token > prev;
        let wrote = client
            .set(&owner_key, mine.clone(), Some(stat.version))
            .await
            .is_ok();
        tokio::time::sleep(hold).await;
        let mut outcome = json!({"token": token, "prev": prev, "prev_owner": prev_owner,
                              "fenced_ok": fenced, "wrote": wrote});
        let after = client.get(&owner_key).await;
        match &after {
            Ok((data, _)) => outcome["intact"] = json!(*data == mine.as_bytes()),
            // The hold happened (the record may name it): it is reported, unverified, so that
            // its successor's "previous owner" is accounted for; then the replica gives up.
            Err(e) => {
                outcome["intact"] = Value::Null;
                outcome["error"] = json!(e.to_string());
            }
        }
        report("lock", outcome);
        after?;
        guard.unlock().await?;
        // Let the next in the queue in before queueing again.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn write(client: Client, me: String) -> Result<(), Error> {
    let prefix = env("SAMPLE_PREFIX", "/load");
    let count = env_u64("SAMPLE_WRITES", 1000);
    let interval = Duration::from_millis(env_u64("SAMPLE_INTERVAL_MS", 20));
    let deadline = Instant::now() + Duration::from_secs(env_u64("SAMPLE_MAX_SECS", 600));
    let dir = format!("{prefix}/{me}");
    ensure_path(&client, &dir).await?;
    let mut retried = 0u64;
    let mut n = 0;
    while n < count && Instant::now() < deadline {
        let key = format!("{dir}/{n:08}");
        match client.create(&key, n.to_string()).await {
            // NodeExists: an earlier attempt was applied though its reply was lost.
            Ok(_) | Err(Error::NodeExists { .. }) => {
                report("ack", json!({"n": n}));
                n += 1;
                tokio::time::sleep(interval).await;
            }
            Err(e) => {
                retried += 1;
                report(
                    "retry",
                    json!({"op": "create", "n": n, "error": e.to_string()}),
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    report("done", json!({"acked": n, "retried": retried}));
    // Stay up (a pod that exits would be restarted by its controller) until stopped.
    tokio::signal::ctrl_c().await.ok();
    Ok(())
}

/// Compresses sorted numbers into [start, end] ranges.
fn ranges(ns: &[u64]) -> Vec<[u64; 2]> {
    let mut out: Vec<[u64; 2]> = Vec::new();
    for &n in ns {
        match out.last_mut() {
            Some(r) if r[1] + 1 == n => r[1] = n,
            _ => out.push([n, n]),
        }
    }
    out
}

async fn verify(endpoints: Vec<String>) -> Result<(), Error> {
    let prefix = env("SAMPLE_PREFIX", "/load");
    for ep in &endpoints {
        let client = connect(std::slice::from_ref(ep)).await?;
        let status = client.status_of(ep).await?;
        let writers = match client.children(&prefix).await {
            Ok(w) => w,
            Err(Error::NoNode { .. }) => Vec::new(),
            Err(e) => return Err(e),
        };
        let mut present = BTreeMap::new();
        for w in writers {
            let mut ns: Vec<u64> = client
                .children(&format!("{prefix}/{w}"))
                .await?
                .iter()
                .filter_map(|c| c.parse().ok())
                .collect();
            ns.sort_unstable();
            present.insert(w, ranges(&ns));
        }
        report(
            "present",
            json!({"endpoint": ep, "member": status.member_id, "writers": present}),
        );
    }
    // Digests: poll until every member has applied the same index with the same digest.
    let deadline = Instant::now() + Duration::from_secs(env_u64("SAMPLE_DIGEST_SECS", 60));
    loop {
        let mut seen = Vec::new();
        for ep in &endpoints {
            let client = connect(std::slice::from_ref(ep)).await?;
            let s = client.status_of(ep).await?;
            seen.push((s.member_id, s.applied_index, s.state_digest));
        }
        let agree = seen
            .windows(2)
            .all(|w| w[0].1 == w[1].1 && w[0].2 == w[1].2);
        if agree || Instant::now() >= deadline {
            let members: Vec<Value> = seen
                .iter()
                .map(|(id, applied, digest)| json!({"member": id, "applied": applied, "digest": format!("{digest:#x}")}))
                .collect();
            report("digests", json!({"agree": agree, "members": members}));
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

/// `set KEY VALUE` and `ls KEY`: the suite's way to write and read Kord from inside the cluster.
async fn one_shot(client: Client, mode: &str) -> Result<(), Error> {
    let args: Vec<String> = std::env::args().skip(2).collect();
    let Some(key) = args.first() else {
        eprintln!("{mode}: missing KEY");
        std::process::exit(2);
    };
    if mode == "set" {
        let value = args.get(1).cloned().unwrap_or_default();
        let parent = key.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
        ensure_path(&client, parent).await?;
        let revision = match client.create(key, value.clone()).await {
            Ok(created) => created.stat.create_revision,
            Err(Error::NodeExists { .. }) => client.set(key, value, None).await?.modify_revision,
            Err(e) => return Err(e),
        };
        report("set", json!({"key": key, "revision": revision}));
    } else {
        let children = match client.children(key).await {
            Ok(c) => c,
            Err(Error::NoNode { .. }) => Vec::new(),
            Err(e) => return Err(e),
        };
        report("ls", json!({"key": key, "children": children}));
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "serve".into());
    let me = name();
    let eps = endpoints();
    report(
        "start",
        json!({"mode": mode, "name": me, "endpoints": eps.clone()}),
    );
    let result = match mode.as_str() {
        "serve" => match connect(&eps).await {
            Ok(c) => serve(c, me).await,
            Err(e) => Err(e),
        },
        "write" => match connect(&eps).await {
            Ok(c) => write(c, me).await,
            Err(e) => Err(e),
        },
        "verify" => verify(eps).await,
        "set" | "ls" => match connect(&eps).await {
            Ok(c) => one_shot(c, &mode).await,
            Err(e) => Err(e),
        },
        other => {
            eprintln!("unknown mode {other:?}: serve, write or verify");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        report("fatal", json!({"error": e.to_string()}));
        std::process::exit(1);
    }
    report("exit", json!({}));
}
