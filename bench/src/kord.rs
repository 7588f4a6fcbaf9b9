//! Kord through its own client, `kord-client`.

use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kord_client::{
    Client, Consistency, CreateOptions, Error, EventType, Mutex, Session, WatchEvent, WatchOptions,
};

use crate::config::{RunConfig, Workload};
use crate::run::{
    for_each_limited, key, seq_of, uses_key_space, value, KeyPicker, StepResult, Tracker,
    WatchSetup, Worker, Writer,
};

/// One client handle per connection (each has its own channel per endpoint).
async fn connect(cfg: &RunConfig) -> anyhow::Result<Vec<Client>> {
    let mut out = Vec::with_capacity(cfg.connections);
    for _ in 0..cfg.connections {
        out.push(
            Client::builder(cfg.endpoints.clone())
                .request_timeout(cfg.op_timeout)
                .batch_writes(cfg.kord_batch_writes)
                .connect()
                .await?,
        );
    }
    Ok(out)
}

async fn ensure(client: &Client, path: &str) -> anyhow::Result<()> {
    match client.create(path, Vec::new()).await {
        Ok(_) | Err(Error::NodeExists { .. }) => Ok(()),
        Err(e) => Err(anyhow::anyhow!("create {path}: {e}")),
    }
}

/// Creates /bench, /bench/seq and the key space (skipped when it is already complete).
async fn prepare(cfg: &RunConfig, client: &Client) -> anyhow::Result<()> {
    for p in ["/bench", "/bench/k", "/bench/seq"] {
        ensure(client, p).await?;
    }
    if !uses_key_space(cfg.workload) {
        return Ok(());
    }
    let have: std::collections::HashSet<String> =
        client.children("/bench/k").await?.into_iter().collect();
    let missing: Vec<usize> = (0..cfg.keys)
        .filter(|i| !have.contains(&key(*i)["/bench/k/".len()..]))
        .collect();
    let v = value(cfg.value_size, 0);
    for_each_limited(missing, 32, |i| {
        let client = client.clone();
        let v = v.clone();
        async move {
            match client.create(&key(i), v).await {
                Ok(_) | Err(Error::NodeExists { .. }) => Ok(()),
                Err(e) => Err(anyhow::anyhow!("create {}: {e}", key(i))),
            }
        }
    })
    .await
}

pub(crate) async fn workers(cfg: &RunConfig, id: &str) -> anyhow::Result<Vec<Box<dyn Worker>>> {
    let conns = connect(cfg).await?;
    prepare(cfg, &conns[0]).await?;
    let locking = matches!(cfg.workload, Workload::Lock | Workload::LockContended);
    let mut out: Vec<Box<dyn Worker>> = Vec::with_capacity(cfg.clients);
    for i in 0..cfg.clients {
        let client = conns[i % conns.len()].clone();
        // Lock workers each hold a session, as a real lock user would.
        let session = if locking {
            Some(client.session(Duration::from_secs(30)).await?)
        } else {
            None
        };
        out.push(Box::new(KordWorker {
            client,
            workload: cfg.workload,
            keys: KeyPicker::new(i as u64 + 1, cfg.keys),
            value: value(cfg.value_size, 0),
            seq_prefix: format!("/bench/seq/{id}-"),
            session,
            lock_name: match cfg.workload {
                Workload::LockContended => format!("bench-{id}-contended"),
                _ => format!("bench-{id}-{i}"),
            },
        }));
    }
    Ok(out)
}

struct KordWorker {
    client: Client,
    workload: Workload,
    keys: KeyPicker,
    value: Vec<u8>,
    seq_prefix: String,
    session: Option<Session>,
    lock_name: String,
}

impl Worker for KordWorker {
    fn step(&mut self) -> BoxFuture<'_, StepResult> {
        Box::pin(async move {
            let r = match self.workload {
                Workload::Write => {
                    let k = self.keys.next_key();
                    self.client
                        .set(&k, self.value.clone(), None)
                        .await
                        .map(|_| ())
                }
                Workload::Create => self
                    .client
                    .create_with(
                        &self.seq_prefix,
                        self.value.clone(),
                        CreateOptions { sequential: true },
                    )
                    .await
                    .map(|_| ()),
                Workload::Read => {
                    let k = self.keys.next_key();
                    self.client
                        .get_with(&k, Consistency::Linearizable)
                        .await
                        .map(|_| ())
                }
                Workload::ReadLocal => {
                    let k = self.keys.next_key();
                    self.client
                        .get_with(&k, Consistency::Local)
                        .await
                        .map(|_| ())
                }
                Workload::Lease => match self
                    .client
                    .lease_grant(std::time::Duration::from_secs(60))
                    .await
                {
                    Ok(grant) => self.client.lease_revoke(grant.id).await.map(|_| ()),
                    Err(e) => Err(e),
                },
                Workload::Lock | Workload::LockContended => {
                    let Some(session) = self.session.as_ref() else {
                        return Err("lock workers hold a session".into());
                    };
                    let t = Instant::now();
                    let guard = Mutex::new(session, self.lock_name.clone())
                        .lock()
                        .await
                        .map_err(|e| e.to_string())?;
                    let acquired = t.elapsed();
                    guard.unlock().await.map_err(|e| e.to_string())?;
                    return Ok(Some(acquired));
                }
                other => return Err(format!("{other} is not supported by kord")),
            };
            r.map(|()| None).map_err(|e| e.to_string())
        })
    }

    fn finish(self: Box<Self>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            if let Some(session) = self.session {
                let _ = session.close().await;
            }
        })
    }
}

struct KordWriter {
    client: Client,
    key: String,
}

impl Writer for KordWriter {
    fn write(&mut self, value: Vec<u8>) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            self.client
                .set(&self.key, value, None)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }
}

/// Each watcher is its own watch stream (data changes of the key); the streams are spread
/// over `connections` clients, and the writer has its own.
pub(crate) async fn watch(
    cfg: &RunConfig,
    key: &str,
    tracker: Arc<Tracker>,
) -> anyhow::Result<WatchSetup> {
    let writer = connect(cfg).await?.remove(0);
    ensure(&writer, "/bench").await?;
    match writer.create(key, value(cfg.value_size, 0)).await {
        Ok(_) | Err(Error::NodeExists { .. }) => {}
        Err(e) => anyhow::bail!("create {key}: {e}"),
    }
    let conns = connect(cfg).await?;
    let mut tasks = Vec::new();
    for w in 0..cfg.watcher_count() {
        let options = WatchOptions {
            types: vec![EventType::DataChanged],
            ..WatchOptions::default()
        };
        let mut stream = conns[w % conns.len()]
            .watch(key, options)
            .await
            .map_err(|e| anyhow::anyhow!("watch {key}: {e}"))?;
        let tracker = Arc::clone(&tracker);
        tasks.push(tokio::spawn(async move {
            // Ends with the stream; otherwise aborted at the end of the run.
            while let Some(Ok(item)) = stream.next().await {
                if let WatchEvent::Events { events, .. } = item {
                    for ev in &events {
                        if let Some(seq) = seq_of(&ev.data) {
                            tracker.hit(seq);
                        }
                    }
                }
            }
        }));
    }
    Ok(WatchSetup {
        writer: Box::new(KordWriter {
            client: writer,
            key: key.to_owned(),
        }),
        tasks,
    })
}
