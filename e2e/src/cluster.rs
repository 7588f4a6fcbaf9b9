//! Starts, kills and restarts clusters of real `kord` processes, and waits on their status.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kord_api::v1::cluster_client::ClusterClient;
use kord_api::v1::kv_client::KvClient;
use kord_api::v1::{MemberRole, StatusRequest, StatusResponse};
use tempfile::TempDir;
use tonic::transport::{Channel, Endpoint};
use tonic::Status;

use crate::bins::kord_bin;
use crate::ports::free_ports;
use crate::wait::{wait_until, POLL_INTERVAL};

/// How a test cluster is started.
#[derive(Debug, Clone)]
pub struct ClusterOpts {
    /// Extra `kord` flags given to every member, e.g. `["--snapshot-count", "50"]`.
    pub extra_args: Vec<String>,
    /// How long `Cluster::start` waits for every member to agree on a leader.
    pub startup_timeout: Duration,
    /// Where members run, by id (`hosts[id - 1]`); members without an entry run on 127.0.0.1
    /// in this network namespace.
    pub hosts: Vec<MemberHost>,
}

/// A member's address and, optionally, the network namespace its process runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberHost {
    pub ip: String,
    /// Started through `ip netns exec <netns>` (which execs, so the pid is the member's).
    pub netns: Option<String>,
}

impl Default for MemberHost {
    fn default() -> Self {
        MemberHost {
            ip: "127.0.0.1".into(),
            netns: None,
        }
    }
}

impl Default for ClusterOpts {
    fn default() -> Self {
        ClusterOpts {
            extra_args: Vec::new(),
            startup_timeout: Duration::from_secs(30),
            hosts: Vec::new(),
        }
    }
}

impl ClusterOpts {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds extra `kord` flags (flag and value as separate items).
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// Places members by id (see [`ClusterOpts::hosts`]).
    pub fn hosts(mut self, hosts: Vec<MemberHost>) -> Self {
        self.hosts = hosts;
        self
    }
}

struct Member {
    id: u64,
    host: MemberHost,
    /// Members added after start: `kord --join` at this client endpoint, plus these flags.
    join: Option<(String, Vec<String>)>,
    paused: bool,
    client_port: u16,
    peer_port: u16,
    http_port: u16,
    data_dir: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    starts: u32,
    channel: Channel,
}

/// A running test cluster. Dropping it SIGKILLs every member; when dropped during a panic it
/// prints the tail of every member's log first.
pub struct Cluster {
    members: Vec<Member>,
    bin: PathBuf,
    extra_args: Vec<String>,
    initial_cluster: String,
    hosts: Vec<MemberHost>,
    root: Option<TempDir>,
}

enum StartupError {
    PortTaken(String),
    Failed(String),
}

const STATUS_TIMEOUT: Duration = Duration::from_secs(2);
const RESTART_TIMEOUT: Duration = Duration::from_secs(30);
const BIND_ATTEMPTS: usize = 3;

fn channel_to(ip: &str, port: u16) -> Channel {
    Endpoint::from_shared(format!("http://{ip}:{port}"))
        .expect("endpoint uri")
        .connect_timeout(Duration::from_millis(500))
        .timeout(Duration::from_secs(10))
        .connect_lazy()
}

impl Cluster {
    /// Starts `n` members (ids 1..=n) and waits until all agree on a leader. Panics, printing
    /// the members' logs, if that does not happen within `opts.startup_timeout`.
    pub async fn start(n: usize, opts: ClusterOpts) -> Cluster {
        assert!(n >= 1, "a cluster needs at least one member");
        let bin = kord_bin();
        for attempt in 1..=BIND_ATTEMPTS {
            let mut cluster = Cluster::spawn_all(n, &opts, &bin);
            match cluster.wait_startup(opts.startup_timeout).await {
                Ok(()) => return cluster,
                Err(StartupError::PortTaken(why)) if attempt < BIND_ATTEMPTS => {
                    eprintln!(
                        "e2e: a port was taken ({why}); restarting the cluster on fresh ports"
                    );
                    drop(cluster);
                }
                Err(StartupError::PortTaken(why)) | Err(StartupError::Failed(why)) => {
                    panic!("the {n}-member cluster did not start: {why}");
                }
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn spawn_all(n: usize, opts: &ClusterOpts, bin: &Path) -> Cluster {
        let root = tempfile::Builder::new()
            .prefix("kord-e2e-")
            .tempdir()
            .expect("create temp dir");
        let ports = free_ports(3 * n);
        let members: Vec<Member> = (0..n)
            .map(|i| {
                let id = i as u64 + 1;
                let dir = root.path().join(format!("member-{id}"));
                let host = opts.hosts.get(i).cloned().unwrap_or_default();
                Member {
                    id,
                    channel: channel_to(&host.ip, ports[3 * i]),
                    host,
                    join: None,
                    paused: false,
                    client_port: ports[3 * i],
                    peer_port: ports[3 * i + 1],
                    http_port: ports[3 * i + 2],
                    data_dir: dir.join("data"),
                    log_path: dir.join("kord.log"),
                    child: None,
                    starts: 0,
                }
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| {
                format!(
                    "{}={ip}:{}@{ip}:{}",
                    m.id,
                    m.peer_port,
                    m.client_port,
                    ip = m.host.ip
                )
            })
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Cluster {
            members,
            bin: bin.to_path_buf(),
            extra_args: opts.extra_args.clone(),
            initial_cluster,
            hosts: opts.hosts.clone(),
            root: Some(root),
        };
        for id in cluster.ids() {
            cluster.spawn_member(id);
        }
        cluster
    }

    fn args(&self, m: &Member) -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--id".into(),
            m.id.to_string(),
            "--data-dir".into(),
            m.data_dir.display().to_string(),
            "--listen-client".into(),
            format!("{}:{}", m.host.ip, m.client_port),
            "--listen-peer".into(),
            format!("{}:{}", m.host.ip, m.peer_port),
            "--listen-http".into(),
            format!("{}:{}", m.host.ip, m.http_port),
        ];
        match &m.join {
            Some((endpoint, flags)) => {
                args.extend(["--join".to_owned(), endpoint.clone()]);
                args.extend(flags.iter().cloned());
            }
            None => args.extend(["--initial-cluster".to_owned(), self.initial_cluster.clone()]),
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }

    fn spawn_member(&mut self, id: u64) {
        let args = self.args(self.member(id));
        let bin = self.bin.clone();
        let m = self.member_mut(id);
        assert!(m.child.is_none(), "member {id} is already running");
        fs::create_dir_all(&m.data_dir)
            .unwrap_or_else(|e| panic!("create {}: {e}", m.data_dir.display()));
        m.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", m.log_path.display()));
        let _ = writeln!(
            log,
            "==== e2e: start #{} of member {id}: {} {}",
            m.starts,
            bin.display(),
            args.join(" ")
        );
        let stdout: File = log.try_clone().expect("clone log file");
        let mut command = match &m.host.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let child = command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        m.child = Some(child);
        m.paused = false;
        m.channel = channel_to(&m.host.ip, m.client_port);
    }

    /// Polls until every member agrees on a leader; notices members that exit early.
    async fn wait_startup(&mut self, timeout: Duration) -> Result<(), StartupError> {
        let deadline = Instant::now() + timeout;
        loop {
            for id in self.ids() {
                if let Some(exit) = self.exited(id) {
                    let log = self.log_tail(id, 30);
                    let why = format!("member {id} exited during startup ({exit})");
                    return Err(if log.to_ascii_lowercase().contains("in use") {
                        StartupError::PortTaken(why)
                    } else {
                        StartupError::Failed(why)
                    });
                }
            }
            let reason = match self.agreed_leader().await {
                Ok(_) => return Ok(()),
                Err(reason) => reason,
            };
            if Instant::now() >= deadline {
                return Err(StartupError::Failed(format!(
                    "no agreed leader after {timeout:?}; last: {reason}"
                )));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The exit status of a member process that has exited (and is still marked running).
    pub fn exited(&mut self, id: u64) -> Option<String> {
        let child = self.member_mut(id).child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("try_wait failed: {e}")),
        }
    }

    /// Ok(leader) when every live member reports the same live leader (one poll, no waiting).
    pub async fn agreed_leader(&self) -> Result<u64, String> {
        let live = self.live_ids();
        if live.is_empty() {
            return Err("no member is running".into());
        }
        let mut leaders = Vec::new();
        for &id in &live {
            match self.status(id).await {
                Ok(s) => leaders.push((id, s.leader_id)),
                Err(e) => {
                    return Err(format!(
                        "member {id}: Status failed: {:?} {}",
                        e.code(),
                        e.message()
                    ))
                }
            }
        }
        let first = leaders[0].1;
        if first != 0 && live.contains(&first) && leaders.iter().all(|&(_, l)| l == first) {
            Ok(first)
        } else {
            Err(format!(
                "(member, leader_id) = {leaders:?}, live = {live:?}"
            ))
        }
    }

    // ---- members ------------------------------------------------------------------------------

    fn member(&self, id: u64) -> &Member {
        self.members
            .iter()
            .find(|m| m.id == id)
            .unwrap_or_else(|| panic!("no member {id}"))
    }

    fn member_mut(&mut self, id: u64) -> &mut Member {
        self.members
            .iter_mut()
            .find(|m| m.id == id)
            .unwrap_or_else(|| panic!("no member {id}"))
    }

    /// All member ids, 1..=n.
    pub fn ids(&self) -> Vec<u64> {
        self.members.iter().map(|m| m.id).collect()
    }

    /// Ids of members whose process is running (not killed by the harness).
    pub fn live_ids(&self) -> Vec<u64> {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| m.id)
            .collect()
    }

    pub fn is_running(&self, id: u64) -> bool {
        self.member(id).child.is_some()
    }

    /// `http://127.0.0.1:<client port>`.
    pub fn client_endpoint(&self, id: u64) -> String {
        format!("http://{}", self.client_addr(id))
    }

    /// Runs `kordctl --endpoints <every member> ARGS`, bounded by `timeout`.
    pub async fn kordctl(&self, args: &[&str], timeout: Duration) -> std::process::Output {
        let mut cmd = tokio::process::Command::new(crate::bins::kordctl_bin());
        cmd.arg("--endpoints")
            .arg(self.endpoints_csv())
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        tokio::time::timeout(timeout, cmd.output())
            .await
            .unwrap_or_else(|_| panic!("kordctl {args:?} did not finish within {timeout:?}"))
            .unwrap_or_else(|e| panic!("run kordctl {args:?}: {e}"))
    }

    /// Every member's client address as `host:port`, comma separated (for `kordctl --endpoints`).
    pub fn endpoints_csv(&self) -> String {
        self.ids()
            .into_iter()
            .map(|id| self.client_addr(id).to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn client_addr(&self, id: u64) -> SocketAddr {
        self.addr(id, self.member(id).client_port)
    }

    pub fn peer_addr(&self, id: u64) -> SocketAddr {
        self.addr(id, self.member(id).peer_port)
    }

    pub fn http_addr(&self, id: u64) -> SocketAddr {
        self.addr(id, self.member(id).http_port)
    }

    /// A series of member `id`'s `/metrics`, named with its labels as exposed (for example
    /// `kord_requests_total{op="watch",code="ok"}`); panics if it is not there.
    pub async fn metric(&self, id: u64, series: &str) -> u64 {
        let body = crate::http_get(self.http_addr(id), "/metrics")
            .await
            .expect("metrics")
            .body;
        body.lines()
            .find(|l| {
                l.strip_prefix(series)
                    .is_some_and(|rest| rest.starts_with(' '))
            })
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{series} in member {id}'s /metrics")) as u64
    }

    /// Waits until a series of member `id`'s `/metrics` reads `want`; panics after `timeout`.
    pub async fn wait_metric(&self, id: u64, series: &str, want: u64, timeout: Duration) {
        crate::wait_until(&format!("{series} = {want}"), timeout, || async {
            match self.metric(id, series).await {
                n if n == want => Ok(()),
                n => Err(format!("{series} = {n}")),
            }
        })
        .await;
    }

    fn addr(&self, id: u64, port: u16) -> SocketAddr {
        let ip: std::net::IpAddr = self.member(id).host.ip.parse().expect("member ip");
        SocketAddr::new(ip, port)
    }

    pub fn data_dir(&self, id: u64) -> &Path {
        &self.member(id).data_dir
    }

    pub fn log_path(&self, id: u64) -> &Path {
        &self.member(id).log_path
    }

    /// A Kv client for member `id` (lazily connected; errors surface as UNAVAILABLE).
    pub fn kv(&self, id: u64) -> KvClient<Channel> {
        KvClient::new(self.member(id).channel.clone())
    }

    /// One Kv client per member, in id order.
    pub fn kv_all(&self) -> Vec<KvClient<Channel>> {
        self.ids().into_iter().map(|id| self.kv(id)).collect()
    }

    /// The (lazily connected) channel to member `id`'s client API.
    pub fn channel(&self, id: u64) -> Channel {
        self.member(id).channel.clone()
    }

    /// A Lease client for member `id`.
    pub fn lease(&self, id: u64) -> kord_api::v1::lease_client::LeaseClient<Channel> {
        kord_api::v1::lease_client::LeaseClient::new(self.member(id).channel.clone())
    }

    pub fn cluster_client(&self, id: u64) -> ClusterClient<Channel> {
        ClusterClient::new(self.member(id).channel.clone())
    }

    // ---- process control ----------------------------------------------------------------------

    /// SIGKILLs member `id` and reaps it.
    pub fn kill(&mut self, id: u64) {
        let m = self.member_mut(id);
        let mut child = m
            .child
            .take()
            .unwrap_or_else(|| panic!("member {id} is not running"));
        // The member may have died on its own: that is a failure worth reporting.
        if let Ok(Some(status)) = child.try_wait() {
            panic!("member {id} had already exited ({status}) before the harness killed it");
        }
        child
            .kill()
            .unwrap_or_else(|e| panic!("kill member {id}: {e}"));
        child
            .wait()
            .unwrap_or_else(|e| panic!("wait member {id}: {e}"));
        m.paused = false;
        m.channel = channel_to(&m.host.ip, m.client_port);
    }

    /// SIGSTOPs member `id` (it keeps its sockets but answers nothing until resumed).
    pub fn pause(&mut self, id: u64) {
        self.signal(id, libc::SIGSTOP);
        self.member_mut(id).paused = true;
    }

    /// SIGCONTs a paused member.
    pub fn resume(&mut self, id: u64) {
        self.signal(id, libc::SIGCONT);
        self.member_mut(id).paused = false;
    }

    /// SIGTERMs member `id` (a graceful stop); wait for it with [`Cluster::wait_exit`].
    pub fn terminate(&mut self, id: u64) {
        self.signal(id, libc::SIGTERM);
    }

    pub fn is_paused(&self, id: u64) -> bool {
        self.member(id).paused
    }

    fn signal(&mut self, id: u64, signal: libc::c_int) {
        let child = self
            .member_mut(id)
            .child
            .as_mut()
            .unwrap_or_else(|| panic!("member {id} is not running"));
        if let Ok(Some(status)) = child.try_wait() {
            panic!("member {id} had already exited ({status}) before the harness signalled it");
        }
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) with a pid the harness spawned and has not reaped yet.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {signal}) failed: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Deletes the data dir of a killed member (a disk loss).
    pub fn wipe(&mut self, id: u64) {
        assert!(!self.is_running(id), "wipe member {id}: it is running");
        let dir = self.member(id).data_dir.clone();
        if dir.exists() {
            fs::remove_dir_all(&dir).unwrap_or_else(|e| panic!("wipe {}: {e}", dir.display()));
        }
    }

    /// Starts a new, empty member with id `id` that joins the running cluster through a live
    /// member's client endpoint (`kord --join`), with `flags` added (e.g. `--observer`). Returns
    /// at once; wait on its membership with `Status`/`MemberList`.
    pub fn spawn_joining(&mut self, id: u64, flags: &[&str]) {
        self.add_joining(id, flags);
        self.spawn_member(id);
    }

    /// Like [`Cluster::spawn_joining`] but only allocates the member's ports and directories:
    /// start it later with [`Cluster::respawn`] (e.g. after an admin call named its address).
    /// It runs on `hosts[id - 1]` when the options placed one there.
    pub fn add_joining(&mut self, id: u64, flags: &[&str]) {
        assert!(
            self.members.iter().all(|m| m.id != id),
            "member {id} already exists in this cluster"
        );
        let via = *self
            .live_ids()
            .first()
            .expect("a live member to join through");
        let endpoint = self.client_addr(via).to_string();
        let host = self
            .hosts
            .get(usize::try_from(id - 1).unwrap_or(usize::MAX))
            .cloned()
            .unwrap_or_default();
        let ports = free_ports(3);
        let dir = self
            .root
            .as_ref()
            .expect("cluster root dir")
            .path()
            .join(format!("member-{id}"));
        self.members.push(Member {
            id,
            channel: channel_to(&host.ip, ports[0]),
            host,
            join: Some((endpoint, flags.iter().map(|f| f.to_string()).collect())),
            paused: false,
            client_port: ports[0],
            peer_port: ports[1],
            http_port: ports[2],
            data_dir: dir.join("data"),
            log_path: dir.join("kord.log"),
            child: None,
            starts: 0,
        });
    }

    /// Starts a stopped member again with `kord --join` (through a live member) and `flags`,
    /// as a pod recreated by an orchestrator would, without waiting for it.
    pub fn respawn_joining(&mut self, id: u64, flags: &[&str]) {
        assert!(!self.is_running(id), "respawn member {id}: it is running");
        let via = *self
            .live_ids()
            .iter()
            .find(|&&m| m != id)
            .expect("a live member to join through");
        let endpoint = self.client_addr(via).to_string();
        self.member_mut(id).join = Some((endpoint, flags.iter().map(|f| f.to_string()).collect()));
        self.spawn_member(id);
    }

    /// Starts a stopped member again on its data without waiting for it (it may be expected
    /// to refuse to run).
    pub fn respawn(&mut self, id: u64) {
        self.spawn_member(id);
    }

    /// Waits (bounded) until member `id`'s process exits on its own; returns its exit status.
    pub async fn wait_exit(&mut self, id: u64, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            let m = self.member_mut(id);
            let child = m
                .child
                .as_mut()
                .unwrap_or_else(|| panic!("member {id} is not running"));
            match child.try_wait() {
                Ok(Some(status)) => {
                    m.child = None;
                    return status;
                }
                Ok(None) => {}
                Err(e) => panic!("try_wait member {id}: {e}"),
            }
            if Instant::now() >= deadline {
                panic!("member {id} did not exit within {timeout:?}");
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Kills member `id` if it runs and drops it from the cluster (after a removal).
    /// (A removed member may have exited by itself: that is expected, not a failure.)
    pub fn forget(&mut self, id: u64) {
        if let Some(mut child) = self.member_mut(id).child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.members.retain(|m| m.id != id);
    }

    /// Restarts a killed member with the same flags and data dir, and waits until it answers
    /// Status (not for a leader: a lone restarted member of a dead cluster cannot elect one).
    pub async fn restart(&mut self, id: u64) {
        self.spawn_member(id);
        let deadline = Instant::now() + RESTART_TIMEOUT;
        loop {
            if let Some(exit) = self.exited(id) {
                panic!("member {id} exited right after its restart ({exit})");
            }
            let reason = match self.status(id).await {
                Ok(_) => return,
                Err(e) => format!("{:?} {}", e.code(), e.message()),
            };
            if Instant::now() >= deadline {
                panic!("restarted member {id} did not answer Status within {RESTART_TIMEOUT:?}: {reason}");
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    // ---- status -------------------------------------------------------------------------------

    /// Cluster.Status of member `id`, bounded by a 2 s timeout, and checked to come from this
    /// cluster's member (see [`Cluster::check_identity`]).
    pub async fn status(&self, id: u64) -> Result<StatusResponse, Status> {
        let mut client = self.cluster_client(id);
        match tokio::time::timeout(STATUS_TIMEOUT, client.status(StatusRequest {})).await {
            Ok(result) => result.and_then(|r| self.check_identity(id, r.into_inner())),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "e2e: Status of member {id} took over {STATUS_TIMEOUT:?}"
            ))),
        }
    }

    /// Refuses a Status from a server that is not member `id` of this cluster (see
    /// [`not_the_member`]).
    fn check_identity(&self, id: u64, status: StatusResponse) -> Result<StatusResponse, Status> {
        let m = self.member(id);
        let peer = format!("{}:{}", m.host.ip, m.peer_port);
        match not_the_member(id, &peer, &status) {
            Some(why) => Err(Status::failed_precondition(why)),
            None => Ok(status),
        }
    }

    /// Status of every live member, in id order; panics if one fails.
    pub async fn statuses(&self) -> Vec<StatusResponse> {
        let mut out = Vec::new();
        for id in self.live_ids() {
            out.push(self.status(id).await.unwrap_or_else(|e| {
                panic!("Status of member {id}: {:?} {}", e.code(), e.message())
            }));
        }
        out
    }

    /// Waits (up to `timeout`) until every live member reports the same live leader; returns it.
    pub async fn wait_for_leader(&self, timeout: Duration) -> u64 {
        wait_until(
            "all live members to agree on a live leader",
            timeout,
            || self.agreed_leader(),
        )
        .await
    }

    /// Waits (up to `timeout`) until member `via` lists member `id` as a voter.
    pub async fn wait_voter(&self, via: u64, id: u64, timeout: Duration) {
        let what = format!("member {via} to list member {id} as a voter");
        wait_until(&what, timeout, || async {
            let members = self.status(via).await.map_err(|e| e.to_string())?.members;
            let voter = members
                .iter()
                .any(|m| m.id == id && m.role == MemberRole::Voter as i32);
            if voter {
                Ok(())
            } else {
                Err(format!("members: {members:?}"))
            }
        })
        .await
    }

    /// The current leader, waiting up to 30 s for one that every live member agrees on.
    pub async fn leader(&self) -> u64 {
        self.wait_for_leader(Duration::from_secs(30)).await
    }

    /// The live members other than the current leader.
    pub async fn followers(&self) -> Vec<u64> {
        let leader = self.leader().await;
        self.live_ids()
            .into_iter()
            .filter(|&id| id != leader)
            .collect()
    }

    /// Waits until every live member's applied_index is equal and `>= min_index`; returns their
    /// statuses (id order).
    pub async fn wait_applied_equal(
        &self,
        min_index: u64,
        timeout: Duration,
    ) -> Vec<StatusResponse> {
        let what = format!("applied_index equal on all live members and >= {min_index}");
        wait_until(&what, timeout, || async {
            let mut statuses = Vec::new();
            for id in self.live_ids() {
                match self.status(id).await {
                    Ok(s) => statuses.push(s),
                    Err(e) => return Err(format!("member {id}: {:?} {}", e.code(), e.message())),
                }
            }
            let applied: Vec<(u64, u64)> = statuses
                .iter()
                .map(|s| (s.member_id, s.applied_index))
                .collect();
            let first = applied[0].1;
            if first >= min_index && applied.iter().all(|&(_, a)| a == first) {
                Ok(statuses)
            } else {
                Err(format!("(member, applied_index) = {applied:?}"))
            }
        })
        .await
    }

    /// Waits for a leader, then until every live member has applied the leader's commit index
    /// (and they are all equal). Returns the statuses.
    pub async fn wait_converged(&self, timeout: Duration) -> Vec<StatusResponse> {
        let start = Instant::now();
        let leader = self.wait_for_leader(timeout).await;
        let commit = self
            .status(leader)
            .await
            .unwrap_or_else(|e| panic!("Status of leader {leader}: {e}"))
            .commit_index;
        let left = timeout
            .saturating_sub(start.elapsed())
            .max(Duration::from_secs(1));
        self.wait_applied_equal(commit, left).await
    }

    /// (member_id, applied_index, state_digest) of every live member.
    pub async fn digests(&self) -> Vec<(u64, u64, u64)> {
        self.statuses()
            .await
            .into_iter()
            .map(|s| (s.member_id, s.applied_index, s.state_digest))
            .collect()
    }

    // ---- logs ---------------------------------------------------------------------------------

    /// The last `lines` lines of member `id`'s log (stdout and stderr of all its runs).
    pub fn log_tail(&self, id: u64, lines: usize) -> String {
        let path = &self.member(id).log_path;
        match fs::read(path) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                let all: Vec<&str> = text.lines().collect();
                all[all.len().saturating_sub(lines)..].join("\n")
            }
            Err(e) => format!("<cannot read {}: {e}>", path.display()),
        }
    }

    /// Prints the tail of every member's log to stderr.
    pub fn dump_logs(&self) {
        let lines = std::env::var("KORD_E2E_LOG_LINES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(60);
        for m in &self.members {
            eprintln!(
                "\n---- member {} ({}), last {lines} lines of {} ----\n{}",
                m.id,
                if m.child.is_some() {
                    "running"
                } else {
                    "killed"
                },
                m.log_path.display(),
                self.log_tail(m.id, lines)
            );
        }
        eprintln!("---- end of member logs ----");
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking {
            self.dump_logs();
        }
        for m in &mut self.members {
            if let Some(mut child) = m.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if std::env::var_os("KORD_E2E_KEEP").is_some() {
            if let Some(root) = self.root.take() {
                eprintln!("e2e: kept cluster files in {}", root.keep().display());
            }
        }
    }
}

/// Asserts that the statuses (taken when nothing was writing) describe the same state:
/// equal applied_index, state_digest and znode_count.
#[track_caller]
pub fn assert_same_state(statuses: &[StatusResponse]) {
    assert!(!statuses.is_empty(), "no statuses");
    let summary: Vec<String> = statuses
        .iter()
        .map(|s| {
            format!(
                "member {}: applied {} digest {:#x} znodes {}",
                s.member_id, s.applied_index, s.state_digest, s.znode_count
            )
        })
        .collect();
    let first = &statuses[0];
    for s in statuses {
        assert!(
            s.applied_index == first.applied_index
                && s.state_digest == first.state_digest
                && s.znode_count == first.znode_count,
            "members diverge:\n  {}",
            summary.join("\n  ")
        );
    }
}

/// Why `status` did not come from member `id` listening for peers at `peer`, if it did not.
///
/// Tests run in parallel, each on ports that were free a moment before its members bound them.
/// If another test's server took member `id`'s client port first, that server answers there
/// while this member is still starting (and about to exit, unable to bind): startup must not
/// take it for this member. A member lists its own peer address, which the other server would
/// have to share too. One that does not list itself (not yet joined, or removed) is told apart
/// by its id only.
fn not_the_member(id: u64, peer: &str, status: &StatusResponse) -> Option<String> {
    let listed = status.members.iter().find(|m| m.id == id);
    if status.member_id == id && listed.is_none_or(|m| m.peer_addr == peer) {
        return None;
    }
    let members: Vec<String> = status
        .members
        .iter()
        .map(|m| format!("{}={}", m.id, m.peer_addr))
        .collect();
    Some(format!(
        "e2e: the server on member {id}'s client port is member {} with members {members:?}, \
         not member {id} at peer address {peer}: another test's server took the port",
        status.member_id
    ))
}

#[cfg(test)]
mod tests {
    use kord_api::v1::Member;

    use super::*;

    fn status(member_id: u64, members: &[(u64, &str)]) -> StatusResponse {
        StatusResponse {
            member_id,
            members: members
                .iter()
                .map(|&(id, peer)| Member {
                    id,
                    peer_addr: peer.to_owned(),
                    ..Member::default()
                })
                .collect(),
            ..StatusResponse::default()
        }
    }

    #[test]
    fn a_status_from_another_clusters_server_is_not_taken_for_the_member() {
        let own = "127.0.0.1:4001";
        // This member, alone or among others.
        assert_eq!(not_the_member(1, own, &status(1, &[(1, own)])), None);
        let three = [(1, own), (2, "127.0.0.1:4002"), (3, "127.0.0.1:4003")];
        assert_eq!(not_the_member(1, own, &status(1, &three)), None);
        // Not listed (joining, or removed): told apart by its id only.
        assert_eq!(
            not_the_member(2, own, &status(2, &[(1, "127.0.0.1:4009")])),
            None
        );
        assert_eq!(not_the_member(2, own, &status(2, &[])), None);
        // Another test's member 1, on this member's client port: a different peer address.
        let why = not_the_member(1, own, &status(1, &[(1, "127.0.0.1:5001")]))
            .expect("another cluster's member 1 refused");
        assert!(why.contains("127.0.0.1:5001") && why.contains(own), "{why}");
        // Another member id.
        assert!(not_the_member(2, own, &status(3, &[])).is_some());
    }
}
