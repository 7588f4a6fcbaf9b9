//! ZooKeeper through its client protocol (`zookeeper-client`).

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;
use zookeeper_client as zk;

use crate::config::{RunConfig, Workload};
use crate::run::{
    for_each_limited, key, uses_key_space, value, KeyPicker, StepResult, Tracker, WatchSetup,
    Worker, Writer,
};

fn persistent() -> zk::CreateOptions<'static> {
    zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all())
}

fn persistent_seq() -> zk::CreateOptions<'static> {
    zk::CreateMode::PersistentSequential.with_acls(zk::Acls::anyone_all())
}

fn ephemeral_seq() -> zk::CreateOptions<'static> {
    zk::CreateMode::EphemeralSequential.with_acls(zk::Acls::anyone_all())
}

/// The connection string: every endpoint; a session picks one server.
fn cluster(cfg: &RunConfig) -> String {
    cfg.endpoints.join(",")
}

/// One session.
pub(crate) async fn session(cluster: &str, timeout: Duration) -> anyhow::Result<zk::Client> {
    let connect = zk::Client::connector()
        .with_session_timeout(Duration::from_secs(10))
        .with_connection_timeout(timeout)
        .with_server_version(3, 8, 0)
        .connect(cluster);
    match tokio::time::timeout(timeout + Duration::from_secs(2), connect).await {
        Ok(r) => Ok(r?),
        Err(_) => anyhow::bail!("no ZooKeeper session with {cluster} within {timeout:?}"),
    }
}

async fn sessions(cfg: &RunConfig, n: usize) -> anyhow::Result<Vec<zk::Client>> {
    let cluster = cluster(cfg);
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(session(&cluster, Duration::from_secs(5)).await?);
    }
    Ok(out)
}

pub(crate) async fn ensure(client: &zk::Client, path: &str) -> anyhow::Result<()> {
    match client.create(path, &[], &persistent()).await {
        Ok(_) | Err(zk::Error::NodeExists) => Ok(()),
        Err(e) => Err(anyhow::anyhow!("create {path}: {e}")),
    }
}

/// Creates /bench, its sub-trees and the key space (skipped when it is already complete).
async fn prepare(cfg: &RunConfig, client: &zk::Client) -> anyhow::Result<()> {
    for p in ["/bench", "/bench/k", "/bench/seq", "/bench/lock"] {
        ensure(client, p).await?;
    }
    if !uses_key_space(cfg.workload) {
        return Ok(());
    }
    let have: std::collections::HashSet<String> = client
        .list_children("/bench/k")
        .await?
        .into_iter()
        .collect();
    let missing: Vec<usize> = (0..cfg.keys)
        .filter(|i| !have.contains(&key(*i)["/bench/k/".len()..]))
        .collect();
    let v = value(cfg.value_size, 0);
    for_each_limited(missing, 32, |i| {
        let client = client.clone();
        let v = v.clone();
        async move {
            match client.create(&key(i), &v, &persistent()).await {
                Ok(_) | Err(zk::Error::NodeExists) => Ok(()),
                Err(e) => Err(anyhow::anyhow!("create {}: {e}", key(i))),
            }
        }
    })
    .await
}

pub(crate) async fn workers(cfg: &RunConfig, id: &str) -> anyhow::Result<Vec<Box<dyn Worker>>> {
    // Lock workers each get their own session, as separate lock holders would.
    let n = match cfg.workload {
        Workload::Lock | Workload::LockContended => cfg.clients,
        _ => cfg.connections,
    };
    let conns = sessions(cfg, n).await?;
    prepare(cfg, &conns[0]).await?;
    let mut out: Vec<Box<dyn Worker>> = Vec::with_capacity(cfg.clients);
    for i in 0..cfg.clients {
        let lock_dir = match cfg.workload {
            Workload::LockContended => format!("/bench/lock/{id}-contended"),
            _ => format!("/bench/lock/{id}-{i}"),
        };
        if matches!(cfg.workload, Workload::Lock | Workload::LockContended) {
            ensure(&conns[0], &lock_dir).await?;
        }
        out.push(Box::new(ZkWorker {
            client: conns[i % conns.len()].clone(),
            cluster: cluster(cfg),
            workload: cfg.workload,
            keys: KeyPicker::new(i as u64 + 1, cfg.keys),
            value: value(cfg.value_size, 0),
            seq_prefix: format!("/bench/seq/{id}-"),
            lock_dir,
        }));
    }
    Ok(out)
}

struct ZkWorker {
    client: zk::Client,
    cluster: String,
    workload: Workload,
    keys: KeyPicker,
    value: Vec<u8>,
    seq_prefix: String,
    lock_dir: String,
}

/// Sequence suffix of a `lock-NNNNNNNNNN` child.
fn lock_seq(name: &str) -> Option<i64> {
    name.strip_prefix("lock-")?.parse().ok()
}

impl ZkWorker {
    /// The standard recipe: an ephemeral sequential child; the lowest holds the lock; every
    /// other waits for the deletion of the one just below it. Returns the acquire time.
    async fn lock_once(&self) -> anyhow::Result<Duration> {
        let t = Instant::now();
        let (_, seq) = self
            .client
            .create(&format!("{}/lock-", self.lock_dir), &[], &ephemeral_seq())
            .await?;
        let mine = format!("lock-{seq}");
        let my_seq = lock_seq(&mine).ok_or_else(|| anyhow::anyhow!("bad lock name {mine}"))?;
        // Bounded: each round either acquires or waits for a predecessor to go.
        for _ in 0..100_000 {
            let mut children: Vec<(i64, String)> = self
                .client
                .list_children(&self.lock_dir)
                .await?
                .into_iter()
                .filter_map(|c| lock_seq(&c).map(|s| (s, c)))
                .collect();
            children.sort_unstable();
            let below = children.iter().rev().find(|(s, _)| *s < my_seq).cloned();
            let Some((_, pred)) = below else {
                let acquired = t.elapsed();
                self.client
                    .delete(&format!("{}/{mine}", self.lock_dir), None)
                    .await?;
                return Ok(acquired);
            };
            let (stat, watcher) = self
                .client
                .check_and_watch_stat(&format!("{}/{pred}", self.lock_dir))
                .await?;
            if stat.is_some() {
                watcher.changed().await;
            }
        }
        anyhow::bail!("lock not acquired after 100000 rounds")
    }

    /// Session open + close, ZooKeeper's counterpart of a lease grant + revoke.
    async fn session_once(&self) -> anyhow::Result<()> {
        let client = session(&self.cluster, Duration::from_secs(5)).await?;
        let mut state = client.state_watcher();
        drop(client);
        for _ in 0..10 {
            if state.peek_state().is_terminated() {
                break;
            }
            let s = state.changed().await;
            if s.is_terminated() {
                break;
            }
        }
        if state.peek_state() != zk::SessionState::Closed {
            anyhow::bail!("session ended as {:?}", state.peek_state());
        }
        Ok(())
    }

    async fn step_inner(&mut self) -> anyhow::Result<Option<Duration>> {
        let c = &self.client;
        match self.workload {
            Workload::Write => {
                c.set_data(&self.keys.next_key(), &self.value, None).await?;
            }
            Workload::Create => {
                c.create(&self.seq_prefix, &self.value, &persistent_seq())
                    .await?;
            }
            Workload::Read => {
                let k = self.keys.next_key();
                c.sync(&k).await?;
                c.get_data(&k).await?;
            }
            Workload::ReadLocal => {
                c.get_data(&self.keys.next_key()).await?;
            }
            Workload::Lock | Workload::LockContended => {
                return self.lock_once().await.map(Some);
            }
            Workload::Lease => self.session_once().await?,
            Workload::Watch | Workload::WatchFanout => {
                anyhow::bail!("watch workloads have no workers")
            }
        }
        Ok(None)
    }
}

impl Worker for ZkWorker {
    fn step(&mut self) -> BoxFuture<'_, StepResult> {
        Box::pin(async move { self.step_inner().await.map_err(|e| e.to_string()) })
    }
}

struct ZkWriter {
    client: zk::Client,
    key: String,
}

impl Writer for ZkWriter {
    fn write(&mut self, value: Vec<u8>) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            self.client
                .set_data(&self.key, &value, None)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }
}

/// Each watcher is its own session (ZooKeeper keeps one watch per path and session, so
/// watchers sharing a session would be one server-side watch): an exists watch, re-armed after
/// every event. The node's data version numbers the writes (it is created at version 0 and
/// each write adds one), so the event is for the write after the version the watcher last
/// read; writes that land before the watch is re-armed are seen by the re-arming read
/// (ZooKeeper's one-shot watch semantics), and count as delivered then.
pub(crate) async fn watch(
    cfg: &RunConfig,
    key: &str,
    tracker: Arc<Tracker>,
) -> anyhow::Result<WatchSetup> {
    let writer = session(&cluster(cfg), Duration::from_secs(5)).await?;
    ensure(&writer, "/bench").await?;
    writer
        .create(key, &value(cfg.value_size, 0), &persistent())
        .await?;
    let clusters = cluster(cfg);
    let watchers: Vec<zk::Client> = {
        let out = std::sync::Mutex::new(Vec::new());
        for_each_limited((0..cfg.watcher_count()).collect(), 32, |_| {
            let cluster = clusters.clone();
            let out = &out;
            async move {
                let c = session(&cluster, Duration::from_secs(10)).await?;
                out.lock().expect("lock").push(c);
                Ok(())
            }
        })
        .await?;
        out.into_inner().expect("lock")
    };
    let mut tasks = Vec::new();
    for c in watchers {
        let key = key.to_owned();
        let tracker = Arc::clone(&tracker);
        let (stat, first) = c.check_and_watch_stat(&key).await?;
        let start = stat.map(|s| s.version as u64).unwrap_or(0);
        tasks.push(tokio::spawn(async move {
            let mut last = start;
            let mut watcher = first;
            // Ends on a session error; otherwise aborted at the end of the run.
            loop {
                let ev = watcher.changed().await;
                if ev.event_type != zk::EventType::NodeDataChanged {
                    break;
                }
                tracker.hit(last + 1);
                match c.check_and_watch_stat(&key).await {
                    Ok((stat, w)) => {
                        let now = stat.map(|s| s.version as u64).unwrap_or(last + 1);
                        for seq in last + 2..=now {
                            tracker.hit(seq);
                        }
                        last = now.max(last + 1);
                        watcher = w;
                    }
                    Err(_) => break,
                }
            }
        }));
    }
    Ok(WatchSetup {
        writer: Box::new(ZkWriter {
            client: writer,
            key: key.to_owned(),
        }),
        tasks,
    })
}
