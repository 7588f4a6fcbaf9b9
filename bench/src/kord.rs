//! Kord through its own client, `kord-client`.

use futures::future::BoxFuture;
use kord_client::{Client, Consistency, CreateOptions, Error};

use crate::config::{RunConfig, Workload};
use crate::run::{for_each_limited, key, uses_key_space, value, KeyPicker, StepResult, Worker};

/// One client handle per connection (each has its own channel per endpoint).
async fn connect(cfg: &RunConfig) -> anyhow::Result<Vec<Client>> {
    let mut out = Vec::with_capacity(cfg.connections);
    for _ in 0..cfg.connections {
        out.push(
            Client::builder(cfg.endpoints.clone())
                .request_timeout(cfg.op_timeout)
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
    Ok((0..cfg.clients)
        .map(|i| {
            Box::new(KordWorker {
                client: conns[i % conns.len()].clone(),
                workload: cfg.workload,
                keys: KeyPicker::new(i as u64 + 1, cfg.keys),
                value: value(cfg.value_size, 0),
                seq_prefix: format!("/bench/seq/{id}-"),
            }) as Box<dyn Worker>
        })
        .collect())
}

struct KordWorker {
    client: Client,
    workload: Workload,
    keys: KeyPicker,
    value: Vec<u8>,
    seq_prefix: String,
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
                other => return Err(format!("{other} is not supported by kord")),
            };
            r.map(|()| None).map_err(|e| e.to_string())
        })
    }
}
