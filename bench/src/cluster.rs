//! Starts 1- or 3-member Kord, etcd and ZooKeeper setups on 127.0.0.1 with data under a given
//! directory, waits until they serve, and kills every process it started, by PID, when the
//! [`Cluster`] is dropped (also on panic, or when a Ctrl-C drops the future that owns it).

use std::fmt::Write as _;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use tokio::time::Instant;

use crate::config::Target;

/// ZooKeeper's jar and configuration from Debian's `zookeeper` package (its zkEnv.sh uses this
/// classpath; the jar's manifest names the dependencies).
pub const ZK_CLASSPATH: &str = "/etc/zookeeper/conf:/usr/share/java/zookeeper.jar";
pub const ZK_JAR: &str = "/usr/share/java/zookeeper.jar";
pub const ETCD_BIN: &str = "/usr/bin/etcd";
pub const JAVA_BIN: &str = "/usr/bin/java";

/// `n` distinct ports that were free a moment ago on 127.0.0.1.
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("local_addr").port())
        .collect()
}

/// Processes this tool started; dropping it kills each by its PID and reaps it.
#[derive(Default)]
pub struct Procs {
    children: Vec<(String, Child)>,
}

impl Procs {
    fn spawn(&mut self, name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<u32> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        let pid = child.id();
        self.children.push((name.to_owned(), child));
        Ok(pid)
    }

    /// The first process that has exited, with its status.
    fn exited(&mut self) -> Option<String> {
        self.children.iter_mut().find_map(|(name, c)| {
            c.try_wait()
                .ok()
                .flatten()
                .map(|st| format!("{name} (pid {}) exited: {st}", c.id()))
        })
    }

    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|(_, c)| c.id()).collect()
    }

    /// Kills (SIGKILL, by PID) and reaps every process, bounded.
    pub fn stop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
        }
        for (_, c) in &mut self.children {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while std::time::Instant::now() < deadline {
                if !matches!(c.try_wait(), Ok(None)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.children.clear();
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running setup of one target.
pub struct Cluster {
    pub target: Target,
    pub size: usize,
    /// Client endpoints, `127.0.0.1:port`.
    pub endpoints: Vec<String>,
    procs: Procs,
    dir: PathBuf,
}

impl Cluster {
    pub fn pids(&self) -> Vec<u32> {
        self.procs.pids()
    }

    /// "1 node" / "3 nodes".
    pub fn setup(&self) -> String {
        format!(
            "{} node{}",
            self.size,
            if self.size == 1 { "" } else { "s" }
        )
    }

    pub fn stop(mut self) {
        self.procs.stop();
    }

    fn fail(&mut self, what: anyhow::Error) -> anyhow::Error {
        let mut msg = format!("{what:#}");
        if let Some(exit) = self.procs.exited() {
            let _ = write!(msg, "; {exit}");
        }
        let _ = write!(msg, "; logs in {}", self.dir.display());
        anyhow::anyhow!(msg)
    }

    /// Starts `size` members of `target` with data under `root/<target>-<size>`.
    pub async fn start(
        target: Target,
        size: usize,
        root: &Path,
        kord_bin: &Path,
    ) -> anyhow::Result<Cluster> {
        anyhow::ensure!(size >= 1, "a cluster has at least one member");
        let dir = root.join(format!("{}-{size}", target.name()));
        std::fs::create_dir_all(&dir)?;
        let mut cluster = match target {
            Target::Kord => start_kord(size, &dir, kord_bin)?,
            Target::Etcd => start_etcd(size, &dir)?,
            Target::Zookeeper => start_zk(size, &dir)?,
        };
        let ready = match target {
            Target::Kord => wait_kord(&mut cluster).await,
            Target::Etcd => wait_etcd(&mut cluster).await,
            Target::Zookeeper => wait_zk(&mut cluster).await,
        };
        match ready {
            Ok(()) => Ok(cluster),
            Err(e) => Err(cluster.fail(e)),
        }
    }
}

fn start_kord(size: usize, dir: &Path, bin: &Path) -> anyhow::Result<Cluster> {
    anyhow::ensure!(
        bin.is_file(),
        "kord binary {} not found (build it: cargo build --release -p kord-server, or pass --kord-bin)",
        bin.display()
    );
    let ports = free_ports(3 * size);
    let (client, peer, http) = (&ports[..size], &ports[size..2 * size], &ports[2 * size..]);
    let spec: Vec<String> = (0..size)
        .map(|i| format!("{}=127.0.0.1:{}@127.0.0.1:{}", i + 1, peer[i], client[i]))
        .collect();
    let mut procs = Procs::default();
    for i in 0..size {
        let mut cmd = Command::new(bin);
        cmd.arg("--id")
            .arg((i + 1).to_string())
            .arg("--data-dir")
            .arg(dir.join(format!("data-{}", i + 1)))
            .arg("--listen-client")
            .arg(format!("127.0.0.1:{}", client[i]))
            .arg("--listen-peer")
            .arg(format!("127.0.0.1:{}", peer[i]))
            .arg("--listen-http")
            .arg(format!("127.0.0.1:{}", http[i]))
            .arg("--initial-cluster")
            .arg(spec.join(","));
        // With its default log level (as a user runs it): RUST_LOG from the bench's own
        // environment does not reach it.
        cmd.env_remove("RUST_LOG");
        procs.spawn(
            &format!("kord-{}", i + 1),
            cmd,
            &dir.join(format!("kord-{}.log", i + 1)),
        )?;
    }
    Ok(Cluster {
        target: Target::Kord,
        size,
        endpoints: client.iter().map(|p| format!("127.0.0.1:{p}")).collect(),
        procs,
        dir: dir.to_owned(),
    })
}

fn start_etcd(size: usize, dir: &Path) -> anyhow::Result<Cluster> {
    let ports = free_ports(2 * size);
    let (client, peer) = (&ports[..size], &ports[size..]);
    let initial: Vec<String> = (0..size)
        .map(|i| format!("n{}=http://127.0.0.1:{}", i + 1, peer[i]))
        .collect();
    let mut procs = Procs::default();
    for i in 0..size {
        let curl = format!("http://127.0.0.1:{}", client[i]);
        let purl = format!("http://127.0.0.1:{}", peer[i]);
        let mut cmd = Command::new(ETCD_BIN);
        // fsync stays on: etcd syncs its WAL unless --unsafe-no-fsync is given.
        cmd.arg("--name")
            .arg(format!("n{}", i + 1))
            .arg("--data-dir")
            .arg(dir.join(format!("data-{}", i + 1)))
            .arg("--listen-client-urls")
            .arg(&curl)
            .arg("--advertise-client-urls")
            .arg(&curl)
            .arg("--listen-peer-urls")
            .arg(&purl)
            .arg("--initial-advertise-peer-urls")
            .arg(&purl)
            .arg("--initial-cluster")
            .arg(initial.join(","))
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg("kord-bench")
            .arg("--logger")
            .arg("zap")
            .arg("--log-level")
            .arg("warn");
        procs.spawn(
            &format!("etcd-{}", i + 1),
            cmd,
            &dir.join(format!("etcd-{}.log", i + 1)),
        )?;
    }
    Ok(Cluster {
        target: Target::Etcd,
        size,
        endpoints: client.iter().map(|p| format!("127.0.0.1:{p}")).collect(),
        procs,
        dir: dir.to_owned(),
    })
}

fn start_zk(size: usize, dir: &Path) -> anyhow::Result<Cluster> {
    let ports = free_ports(3 * size);
    let (client, quorum, election) = (&ports[..size], &ports[size..2 * size], &ports[2 * size..]);
    let mut procs = Procs::default();
    for (i, port) in client.iter().enumerate() {
        let data = dir.join(format!("data-{}", i + 1));
        std::fs::create_dir_all(&data)?;
        // forceSync defaults to yes: the transaction log is fsynced before acknowledging.
        let mut cfg = format!(
            "tickTime=2000\ninitLimit=10\nsyncLimit=5\ndataDir={}\nclientPort={}\n\
             clientPortAddress=127.0.0.1\nmaxClientCnxns=0\nadmin.enableServer=false\n\
             forceSync=yes\n4lw.commands.whitelist=srvr,ruok\n",
            data.display(),
            port
        );
        if size > 1 {
            std::fs::write(data.join("myid"), format!("{}\n", i + 1))?;
            for j in 0..size {
                let _ = writeln!(
                    cfg,
                    "server.{}=127.0.0.1:{}:{}",
                    j + 1,
                    quorum[j],
                    election[j]
                );
            }
        }
        let cfg_path = dir.join(format!("zoo-{}.cfg", i + 1));
        std::fs::write(&cfg_path, cfg)?;
        let mut cmd = Command::new(JAVA_BIN);
        cmd.arg("-Xms1g")
            .arg("-Xmx2g")
            .arg(format!("-Dzookeeper.log.dir={}", dir.display()))
            .arg("-Dzookeeper.root.logger=WARN,CONSOLE")
            .arg("-Dlog4j.configuration=file:/etc/zookeeper/conf/log4j.properties")
            .arg("-cp")
            .arg(ZK_CLASSPATH)
            .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
            .arg(&cfg_path);
        procs.spawn(
            &format!("zookeeper-{}", i + 1),
            cmd,
            &dir.join(format!("zookeeper-{}.log", i + 1)),
        )?;
    }
    Ok(Cluster {
        target: Target::Zookeeper,
        size,
        endpoints: client.iter().map(|p| format!("127.0.0.1:{p}")).collect(),
        procs,
        dir: dir.to_owned(),
    })
}

const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// Polls `check` for every endpoint until all pass, a process exits, or time runs out.
async fn wait_all<F, Fut>(cluster: &mut Cluster, what: &str, check: F) -> anyhow::Result<()>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last_err = None;
    loop {
        if let Some(exit) = cluster.procs.exited() {
            anyhow::bail!("{exit}");
        }
        let mut ok = true;
        for ep in cluster.endpoints.clone() {
            let r = tokio::time::timeout(Duration::from_secs(5), check(ep.clone()))
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("timed out")));
            if let Err(e) = r {
                ok = false;
                last_err = Some(format!("{ep}: {e:#}"));
                break;
            }
        }
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "{what} not ready within {READY_TIMEOUT:?}: {}",
                last_err.unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn wait_kord(cluster: &mut Cluster) -> anyhow::Result<()> {
    wait_all(cluster, "kord", |ep| async move {
        let client = kord_client::Client::builder([ep.clone()])
            .request_timeout(Duration::from_secs(2))
            .connect()
            .await?;
        let st = client.status_of(&ep).await?;
        anyhow::ensure!(st.leader_id != 0, "no leader yet");
        Ok(())
    })
    .await
}

async fn wait_etcd(cluster: &mut Cluster) -> anyhow::Result<()> {
    wait_all(cluster, "etcd", |ep| async move {
        let mut c = crate::etcd::Client::connect(&ep, Duration::from_secs(2)).await?;
        let leader = c.leader().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::ensure!(leader != 0, "no leader yet");
        // A write goes through only once the cluster has a quorum.
        c.put("/bench/ready", ep.as_bytes().to_vec())
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    })
    .await
}

async fn wait_zk(cluster: &mut Cluster) -> anyhow::Result<()> {
    wait_all(cluster, "zookeeper", |ep| async move {
        let c = crate::zk::session(&ep, Duration::from_secs(2)).await?;
        crate::zk::ensure(&c, "/bench").await?;
        Ok(())
    })
    .await
}
