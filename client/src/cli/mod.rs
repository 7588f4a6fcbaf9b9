//! kordctl: argument parsing and the commands, kept here so the binary is a thin `main` and the
//! pieces can be unit-tested.

mod member;
mod output;
mod recipes;
pub mod txn;

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

use crate::{
    Client, ClientBuilder, Consistency, CreateMode, CreateOptions, Error, EventType, WatchOptions,
    WatchScope,
};

/// Session timeout of `create --ephemeral` when none is given.
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(10);

/// Command line for Kord, a ZooKeeper-like coordination service.
#[derive(Debug, Parser)]
#[command(name = "kordctl")]
pub struct Cli {
    /// Comma-separated server endpoints (host:port).
    #[arg(
        long,
        global = true,
        env = "KORD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7379"
    )]
    pub endpoints: Vec<String>,

    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Format::Text)]
    pub output: Format,

    /// Deadline of each request attempt (e.g. 500ms, 5s).
    #[arg(long, global = true, value_parser = humantime::parse_duration, default_value = "5s")]
    pub timeout: Duration,

    /// Consistency of reads.
    #[arg(long, global = true, value_enum, default_value_t = ReadConsistency::Linearizable)]
    pub consistency: ReadConsistency,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReadConsistency {
    Linearizable,
    Local,
}

impl From<ReadConsistency> for Consistency {
    fn from(c: ReadConsistency) -> Self {
        match c {
            ReadConsistency::Linearizable => Consistency::Linearizable,
            ReadConsistency::Local => Consistency::Local,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a node; prints the created path.
    ///
    /// With --ephemeral, opens a session, creates the node in it, prints the path and then
    /// keeps the session alive until SIGINT/SIGTERM, on which it closes the session (deleting
    /// the node) and exits 0. If the session expires first, it exits 1.
    Create {
        /// Append a 10-digit sequence number to the name.
        #[arg(short, long)]
        sequential: bool,
        /// An ephemeral node, owned by a session this command opens and holds until killed.
        #[arg(short, long, conflicts_with_all = ["container", "ttl", "lease"])]
        ephemeral: bool,
        /// Requested session timeout for --ephemeral (the server clamps it) [default: 10s].
        #[arg(long, value_name = "DURATION", requires = "ephemeral", value_parser = humantime::parse_duration)]
        session_timeout: Option<Duration>,
        /// An ephemeral node owned by an existing lease (see `lease grant`); returns at once.
        #[arg(long, value_name = "ID", conflicts_with_all = ["container", "ttl"])]
        lease: Option<u64>,
        /// A container node: deleted by the server once its last child is deleted.
        #[arg(long, conflicts_with_all = ["ttl", "sequential"])]
        container: bool,
        /// A TTL node: deleted once unmodified for DURATION and childless.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        path: String,
        #[command(flatten)]
        data: DataArg,
    },
    /// Print a node's data.
    Get { path: String },
    /// Replace a node's data.
    Set {
        path: String,
        #[command(flatten)]
        data: DataArg,
        /// Only if the node's version equals N.
        #[arg(long, value_name = "N", allow_negative_numbers = true)]
        version: Option<i32>,
    },
    /// Delete a node.
    Delete {
        path: String,
        /// Only if the node's version equals N.
        #[arg(long, value_name = "N", allow_negative_numbers = true)]
        version: Option<i32>,
    },
    /// List a node's children.
    Ls {
        path: String,
        /// Show each child's stat.
        #[arg(short = 'l', long = "stat")]
        stat: bool,
    },
    /// Print a node's stat.
    Stat { path: String },
    /// Apply ops atomically. Each argument is one op; with none, ops are read from stdin, one
    /// per line: `create PATH [DATA]`, `create-seq PATH [DATA]`, `set PATH DATA [VERSION]`,
    /// `delete PATH [VERSION]`, `check PATH [VERSION]`.
    Txn {
        #[arg(value_name = "OP")]
        ops: Vec<String>,
    },
    /// Show the cluster as the first reachable endpoint sees it.
    Status,
    /// List, add, promote, remove and replace members, and move leadership (`member --help`).
    Member {
        #[command(subcommand)]
        command: member::MemberCommand,
    },
    /// Grant, refresh, inspect and revoke leases.
    Lease {
        #[command(subcommand)]
        command: LeaseCommand,
    },
    /// Print changes as they happen until killed, one line each: `REVISION TYPE PATH [DATA]`
    /// (newlines in DATA shown as \n), or with `-o json` one object per line (plus
    /// `{"revision":N,"progress":true}` for progress notifications).
    ///
    /// Rides out member failures by resuming after the last printed revision. Exits 1 if the
    /// history it needs was compacted.
    Watch {
        path: String,
        /// Watch the node's children (and the node's own child-list changes).
        #[arg(long, conflicts_with = "recursive")]
        children: bool,
        /// Watch the node and everything below it.
        #[arg(short = 'r', long)]
        recursive: bool,
        /// Start at revision N (inclusive) instead of now.
        #[arg(long, value_name = "N")]
        rev: Option<u64>,
        /// With -o json: also print each node as it was before the change.
        #[arg(long)]
        prev: bool,
        /// Only these event types (comma-separated) [default: all].
        #[arg(long, value_enum, value_delimiter = ',', value_name = "TYPES")]
        types: Vec<EventTypeArg>,
    },
    /// Forget the events of every revision up to and including REV; prints the compaction
    /// point (watches can no longer start at or below it).
    Compact { rev: u64 },
    /// Acquire a distributed lock and print its fencing token (`-o json`: `{"key",
    /// "fencing_token"}`).
    ///
    /// With COMMAND: runs it with KORD_FENCING_TOKEN and KORD_LOCK_KEY set, releases the lock
    /// when it exits and exits with its code. Without: holds the lock until SIGINT/SIGTERM,
    /// then releases it and exits 0. If the session expires while holding, the lock is lost:
    /// the command is killed and kordctl exits 1. Interrupted while waiting: exits 130.
    Lock {
        /// The lock's name (one path component).
        name: String,
        /// Requested session timeout (the server clamps it) [default: 10s].
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        session_timeout: Option<Duration>,
        /// Give up (exit 1) if the lock is not acquired within DURATION [default: wait
        /// forever]. (`--timeout` is the global per-request deadline.)
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        wait: Option<Duration>,
        /// The command to run while holding the lock, after `--`.
        #[arg(last = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Campaign in a leader election with VALUE; prints `leader KEY token N` once elected and
    /// leads until SIGINT/SIGTERM (then resigns, exit 0). Exits 1 as soon as the session is
    /// disconnected or expired, since leadership can then no longer be trusted.
    ///
    /// With --observe: prints the leader (`KEY VALUE`, or `none`; `-o json`: one object per
    /// line) and then every change, until killed.
    Elect {
        /// The election's name (one path component).
        name: String,
        /// This candidate's value, published while it leads.
        #[arg(required_unless_present = "observe")]
        value: Option<String>,
        /// Watch the election instead of campaigning.
        #[arg(long, conflicts_with_all = ["value", "session_timeout"])]
        observe: bool,
        /// Requested session timeout (the server clamps it) [default: 10s].
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        session_timeout: Option<Duration>,
    },
}

/// An event type for `watch --types`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EventTypeArg {
    Created,
    Deleted,
    #[value(alias = "data-changed", alias = "data_changed")]
    Data,
    #[value(alias = "children-changed", alias = "children_changed")]
    Children,
}

impl From<EventTypeArg> for EventType {
    fn from(t: EventTypeArg) -> Self {
        match t {
            EventTypeArg::Created => EventType::Created,
            EventTypeArg::Deleted => EventType::Deleted,
            EventTypeArg::Data => EventType::DataChanged,
            EventTypeArg::Children => EventType::ChildrenChanged,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// Grant a lease with a TTL (e.g. 10s); prints its id.
    Grant {
        #[arg(value_name = "TTL", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Choose the lease id instead of letting the server pick one.
        #[arg(long, value_name = "ID")]
        id: Option<u64>,
    },
    /// Keep a lease alive until killed, printing its TTL after each refresh; exits 1 once the
    /// lease is lost (revoked or expired).
    #[command(alias = "keep-alive")]
    Keepalive { id: u64 },
    /// Revoke a lease; prints the ephemeral nodes deleted with it.
    Revoke { id: u64 },
    /// Show a lease's granted and remaining TTL, whether it is a session, and its nodes.
    #[command(alias = "timetolive")]
    Ttl { id: u64 },
    /// List all leases and sessions.
    List,
}

/// Node data: a UTF-8 argument or a file's bytes.
#[derive(Debug, Args)]
pub struct DataArg {
    /// Data as a UTF-8 string.
    #[arg(conflicts_with = "data_file")]
    data: Option<String>,
    /// Read the data from FILE instead.
    #[arg(long, value_name = "FILE")]
    data_file: Option<PathBuf>,
}

impl DataArg {
    /// `required` is for `set`, where silently writing empty data would be a surprise.
    fn read(&self, required: bool) -> Result<Vec<u8>, CliError> {
        match (&self.data, &self.data_file) {
            (Some(data), _) => Ok(data.clone().into_bytes()),
            (None, Some(file)) => std::fs::read(file)
                .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", file.display()))),
            (None, None) if required => {
                Err(CliError::Usage("DATA or --data-file is required".into()))
            }
            (None, None) => Ok(Vec::new()),
        }
    }
}

/// Why a command failed, which decides the exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Kord(#[from] Error),
    /// The session held by `create --ephemeral` expired.
    #[error("session expired")]
    SessionExpired,
    /// The lease kept alive by `lease keepalive` is gone.
    #[error("lease {0} lost: revoked or expired")]
    LeaseLost(u64),
    /// The session held by `lock` expired while holding the lock.
    #[error("session expired: lock lost")]
    LockLost,
    /// `lock --wait` gave up.
    #[error("lock {0} not acquired in time")]
    LockTimeout(String),
    /// `elect` lost its session's connection (or the session) while leading.
    #[error("session disconnected or expired: leadership lost")]
    LeadershipLost,
    /// Exit with this code, printing nothing (a child's exit code, an interrupt).
    #[error("exit {0}")]
    Exit(u8),
    /// Bad input that clap could not catch (txn op syntax, unreadable data file).
    #[error("{0}")]
    Usage(String),
}

impl CliError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Kord(_)
            | CliError::SessionExpired
            | CliError::LeaseLost(_)
            | CliError::LockLost
            | CliError::LockTimeout(_)
            | CliError::LeadershipLost => ExitCode::from(1),
            CliError::Exit(code) => ExitCode::from(*code),
            CliError::Usage(_) => ExitCode::from(2),
        }
    }
}

/// Runs kordctl: prints the result to stdout, or `kordctl: <message>` to stderr.
pub async fn main(cli: Cli) -> ExitCode {
    match run(cli).await {
        Ok(out) => {
            emit(&out);
            ExitCode::SUCCESS
        }
        Err(err) => {
            if !matches!(err, CliError::Exit(_)) {
                eprintln!("kordctl: {err}");
            }
            err.exit_code()
        }
    }
}

/// Writes to stdout at once, so a reader on a pipe sees it while the command keeps running. A
/// closed pipe (`kordctl ls / | head`) is not worth a panic or an error.
fn emit(text: &str) {
    if text.is_empty() {
        return;
    }
    let mut stdout = io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

/// Runs one command and returns what it prints. Commands that run until killed
/// (`create --ephemeral`, `lease keepalive`) print as they go and return nothing.
pub async fn run(cli: Cli) -> Result<String, CliError> {
    let client = ClientBuilder::new(cli.endpoints.iter().flat_map(|e| e.split(',')))
        .request_timeout(cli.timeout)
        .consistency(cli.consistency.into())
        .connect()
        .await?;
    let json = cli.output == Format::Json;
    let out = match cli.command {
        Command::Create {
            sequential,
            ephemeral: true,
            session_timeout,
            path,
            data,
            ..
        } => {
            let timeout = session_timeout.unwrap_or(DEFAULT_SESSION_TIMEOUT);
            let data = data.read(false)?;
            create_in_session(&client, &path, data, sequential, timeout, json).await?
        }
        Command::Create {
            sequential,
            lease,
            container,
            ttl,
            path,
            data,
            ..
        } => {
            let mode = match (lease, container, ttl) {
                (Some(lease), _, _) => CreateMode::Ephemeral(lease),
                (_, true, _) => CreateMode::Container,
                (_, _, Some(ttl)) => CreateMode::Ttl(ttl),
                _ => CreateMode::Persistent,
            };
            let options = CreateOptions { sequential };
            let created = client
                .create_with_mode(&path, data.read(false)?, mode, options)
                .await?;
            if json {
                render(output::created_json(&created))
            } else {
                format!("{}\n", created.path)
            }
        }
        Command::Get { path } => {
            let (data, stat) = client.get(&path).await?;
            let text = String::from_utf8_lossy(&data);
            if json {
                render(json!({ "path": path, "data": text, "stat": output::stat_json(&stat) }))
            } else {
                format!("{text}\n")
            }
        }
        Command::Set {
            path,
            data,
            version,
        } => {
            let stat = client.set(&path, data.read(true)?, version).await?;
            if json {
                render(json!({ "path": path, "stat": output::stat_json(&stat) }))
            } else {
                String::new()
            }
        }
        Command::Delete { path, version } => {
            client.delete(&path, version).await?;
            if json {
                render(json!({ "path": path, "deleted": true }))
            } else {
                String::new()
            }
        }
        Command::Ls { path, stat } => ls(&client, &path, stat, json).await?,
        Command::Stat { path } => {
            let stat = client.exists(&path).await?.ok_or_else(|| Error::NoNode {
                message: format!("node {path} does not exist"),
                failed_op: None,
            })?;
            if json {
                render(json!({ "path": path, "stat": output::stat_json(&stat) }))
            } else {
                output::stat_text(&stat)
            }
        }
        Command::Txn { ops } => txn(&client, ops, json).await?,
        Command::Status => {
            let status = client.status().await?;
            if json {
                render(output::status_json(&status))
            } else {
                output::status_text(&status)
            }
        }
        Command::Lease { command } => lease(&client, command, json).await?,
        Command::Member { command } => member::run(&client, command, json).await?,
        Command::Watch {
            path,
            children,
            recursive,
            rev,
            prev,
            types,
        } => {
            let scope = if children {
                WatchScope::Children
            } else if recursive {
                WatchScope::Subtree
            } else {
                WatchScope::Node
            };
            let options = WatchOptions {
                scope,
                types: types.into_iter().map(Into::into).collect(),
                start_revision: rev,
                prev_value: prev,
            };
            watch(&client, &path, options, json).await?
        }
        Command::Lock {
            name,
            session_timeout,
            wait,
            command,
        } => {
            let timeout = session_timeout.unwrap_or(DEFAULT_SESSION_TIMEOUT);
            recipes::lock(&client, &name, timeout, wait, command, json).await?
        }
        Command::Elect {
            name,
            observe: true,
            ..
        } => recipes::observe(&client, &name, json).await?,
        Command::Elect {
            name,
            value,
            session_timeout,
            ..
        } => {
            let timeout = session_timeout.unwrap_or(DEFAULT_SESSION_TIMEOUT);
            let value = value.unwrap_or_default().into_bytes();
            recipes::elect(&client, &name, value, timeout, json).await?
        }
        Command::Compact { rev } => {
            let compacted = client.compact(rev).await?;
            if json {
                render(json!({ "compacted_revision": compacted }))
            } else {
                format!("{compacted}\n")
            }
        }
    };
    Ok(out)
}

/// `create --ephemeral`: the node lives as long as this process holds its session.
async fn create_in_session(
    client: &Client,
    path: &str,
    data: Vec<u8>,
    sequential: bool,
    timeout: Duration,
    json: bool,
) -> Result<String, CliError> {
    // Installed first: a signal that arrives once the path is printed must close the session,
    // not kill the process with it still open.
    let mut signals = Signals::install()?;
    let session = client.session(timeout).await?;
    let created = if sequential {
        client
            .create_ephemeral_sequential(path, data, &session)
            .await
    } else {
        client.create_ephemeral(path, data, &session).await
    };
    let created = match created {
        Ok(created) => created,
        Err(err) => {
            let _ = session.close().await;
            return Err(err.into());
        }
    };
    if json {
        let mut value = output::created_json(&created);
        value["session"] = json!({
            "id": session.id(),
            "timeout_ms": duration_ms(session.timeout()),
        });
        emit(&format!("{value}\n"));
    } else {
        emit(&format!("{}\n", created.path));
    }
    tokio::select! {
        () = signals.recv() => match session.close().await {
            Ok(_) => Ok(String::new()),
            Err(Error::SessionExpired { .. }) => Err(CliError::SessionExpired),
            Err(err) => Err(err.into()),
        },
        () = session.expired() => Err(CliError::SessionExpired),
    }
}

async fn lease(client: &Client, command: LeaseCommand, json: bool) -> Result<String, CliError> {
    Ok(match command {
        LeaseCommand::Grant { ttl, id } => {
            let grant = match id {
                Some(id) => client.lease_grant_with_id(id, ttl).await?,
                None => client.lease_grant(ttl).await?,
            };
            if json {
                render(json!({ "id": grant.id, "ttl_ms": duration_ms(grant.ttl) }))
            } else {
                format!("{}\n", grant.id)
            }
        }
        LeaseCommand::Keepalive { id } => keep_alive(client, id, json).await?,
        LeaseCommand::Revoke { id } => {
            let deleted = client.lease_revoke(id).await?;
            if json {
                render(json!({ "id": id, "deleted": deleted }))
            } else {
                deleted.iter().map(|p| format!("{p}\n")).collect()
            }
        }
        LeaseCommand::Ttl { id } => {
            let ttl = client.lease_time_to_live(id).await?;
            if json {
                render(output::lease_ttl_json(&ttl))
            } else {
                output::lease_ttl_text(&ttl)
            }
        }
        LeaseCommand::List => {
            let leases = client.lease_list().await?;
            if json {
                render(output::lease_list_json(&leases))
            } else {
                output::lease_list_text(&leases)
            }
        }
    })
}

/// `lease keepalive`: one line per refresh (a JSON object per line with `-o json`) until
/// killed (exit 0) or the lease is lost (exit 1).
async fn keep_alive(client: &Client, id: u64, json: bool) -> Result<String, CliError> {
    let mut signals = Signals::install()?;
    let keep_alive = client.lease_keep_alive(id).await?;
    let mut updates = keep_alive.watch();
    loop {
        let status = *updates.borrow_and_update();
        if status.lost {
            return Err(CliError::LeaseLost(id));
        }
        let ttl_ms = duration_ms(status.ttl);
        if json {
            emit(&format!("{}\n", json!({ "id": id, "ttl_ms": ttl_ms })));
        } else {
            emit(&format!("lease {id} ttl_ms {ttl_ms}\n"));
        }
        tokio::select! {
            () = signals.recv() => return Ok(String::new()),
            changed = updates.changed() => {
                if changed.is_err() {
                    return Err(CliError::LeaseLost(id));
                }
            }
        }
    }
}

/// `watch`: prints events as they come until killed (exit 0), the history it needs is
/// compacted or the watch fails for good (exit 1), or stdout is closed (exit 0).
async fn watch(
    client: &Client,
    path: &str,
    options: WatchOptions,
    json: bool,
) -> Result<String, CliError> {
    let mut signals = Signals::install()?;
    let prev = options.prev_value;
    let mut stream = tokio::select! {
        () = signals.recv() => return Ok(String::new()),
        stream = client.watch(path, options) => stream?,
    };
    loop {
        let item = tokio::select! {
            () = signals.recv() => return Ok(String::new()),
            item = stream.next() => item,
        };
        let event = match item {
            Some(Ok(event)) => event,
            Some(Err(err)) => return Err(err.into()),
            None => return Err(Error::Unavailable(format!("watch on {path} ended")).into()),
        };
        let text = if json {
            output::watch_json_lines(&event, prev)
        } else {
            output::watch_text(&event)
        };
        if !text.is_empty() && write_stdout(&text).is_err() {
            // Nobody is reading any more (`kordctl watch / | head -1`).
            return Ok(String::new());
        }
    }
}

fn write_stdout(text: &str) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()
}

/// SIGINT and SIGTERM, listened for from creation on.
struct Signals {
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals, CliError> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let listen = |kind: SignalKind| {
                signal(kind).map_err(|e| CliError::Usage(format!("cannot listen for signals: {e}")))
            };
            Ok(Signals {
                int: listen(SignalKind::interrupt())?,
                term: listen(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    async fn recv(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.int.recv() => {}
            _ = self.term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

async fn ls(client: &Client, path: &str, with_stats: bool, json: bool) -> Result<String, Error> {
    if with_stats {
        let children = client.children_with_stats(path).await?;
        Ok(if json {
            let list: Vec<Value> = children
                .iter()
                .map(|(name, stat)| json!({ "name": name, "stat": output::stat_json(stat) }))
                .collect();
            render(json!({ "path": path, "children": list }))
        } else {
            output::children_text(&children)
        })
    } else {
        let names = client.children(path).await?;
        Ok(if json {
            render(json!({ "path": path, "children": names }))
        } else {
            names.iter().map(|n| format!("{n}\n")).collect()
        })
    }
}

async fn txn(client: &Client, args: Vec<String>, json: bool) -> Result<String, CliError> {
    let ops = if args.is_empty() {
        let mut input = String::new();
        io::stdin()
            .read_to_string(&mut input)
            .map_err(|e| CliError::Usage(format!("cannot read ops from stdin: {e}")))?;
        txn::parse_ops(input.lines(), "line")
    } else {
        txn::parse_ops(args.iter().map(String::as_str), "op")
    }
    .map_err(CliError::Usage)?;
    if ops.is_empty() {
        return Err(CliError::Usage("txn needs at least one op".into()));
    }
    // The server's message already names the failing op's index.
    let results = client.txn(ops.clone()).await?;
    Ok(if json {
        render(output::txn_json(&ops, &results))
    } else {
        output::txn_text(&ops, &results)
    })
}

fn render(value: Value) -> String {
    format!("{value:#}\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_global_flags_and_subcommands() {
        let cli = Cli::try_parse_from([
            "kordctl",
            "--endpoints",
            "a:1,b:2",
            "-o",
            "json",
            "--timeout",
            "250ms",
            "--consistency",
            "local",
            "set",
            "/a",
            "x",
            "--version",
            "3",
        ])
        .unwrap();
        assert_eq!(cli.endpoints, ["a:1", "b:2"]);
        assert_eq!(cli.output, Format::Json);
        assert_eq!(cli.timeout, Duration::from_millis(250));
        assert_eq!(cli.consistency, ReadConsistency::Local);
        assert!(matches!(
            cli.command,
            Command::Set {
                version: Some(3),
                ..
            }
        ));
    }

    #[test]
    fn parses_create_modes() {
        let cli = Cli::try_parse_from([
            "kordctl",
            "create",
            "--ephemeral",
            "--session-timeout",
            "3s",
            "/e",
            "x",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Create {
                ephemeral: true,
                session_timeout: Some(t),
                ..
            } if t == Duration::from_secs(3)
        ));
        let cli = Cli::try_parse_from(["kordctl", "create", "--ttl", "1m", "/t"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Create { ttl: Some(t), .. } if t == Duration::from_secs(60)
        ));
        let cli = Cli::try_parse_from(["kordctl", "create", "--container", "/c"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Create {
                container: true,
                ..
            }
        ));
        let cli = Cli::try_parse_from(["kordctl", "create", "--lease", "5", "/l"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Create { lease: Some(5), .. }
        ));
        for bad in [
            &["kordctl", "create", "--ephemeral", "--container", "/x"][..],
            &["kordctl", "create", "--ephemeral", "--ttl", "1s", "/x"],
            &["kordctl", "create", "--container", "--ttl", "1s", "/x"],
            &["kordctl", "create", "--session-timeout", "1s", "/x"],
            &["kordctl", "create", "--ttl", "soon", "/x"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_lease_commands() {
        let cli = Cli::try_parse_from(["kordctl", "lease", "grant", "10s", "--id", "9"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Lease {
                command: LeaseCommand::Grant { ttl, id: Some(9) }
            } if ttl == Duration::from_secs(10)
        ));
        for (args, want) in [
            (&["lease", "keepalive", "3"][..], "Keepalive"),
            (&["lease", "keep-alive", "3"], "Keepalive"),
            (&["lease", "revoke", "3"], "Revoke"),
            (&["lease", "ttl", "3"], "Ttl"),
            (&["lease", "list"], "List"),
        ] {
            let cli = Cli::try_parse_from(["kordctl"].iter().chain(args)).unwrap();
            let Command::Lease { command } = cli.command else {
                panic!("{args:?}");
            };
            assert!(format!("{command:?}").starts_with(want), "{args:?}");
        }
        assert!(Cli::try_parse_from(["kordctl", "lease", "revoke", "x"]).is_err());
    }

    #[test]
    fn parses_watch_and_compact() {
        let cli = Cli::try_parse_from([
            "kordctl",
            "watch",
            "/a",
            "--children",
            "--rev",
            "7",
            "--prev",
            "--types",
            "created,deleted,data,children",
        ])
        .unwrap();
        let Command::Watch {
            path,
            children,
            recursive,
            rev,
            prev,
            types,
        } = cli.command
        else {
            panic!("not a watch");
        };
        assert_eq!(path, "/a");
        assert!(children && !recursive && prev);
        assert_eq!(rev, Some(7));
        assert_eq!(
            types.into_iter().map(EventType::from).collect::<Vec<_>>(),
            [
                EventType::Created,
                EventType::Deleted,
                EventType::DataChanged,
                EventType::ChildrenChanged
            ]
        );
        let cli = Cli::try_parse_from(["kordctl", "watch", "-r", "/", "--types", "data_changed"])
            .unwrap();
        assert!(matches!(
            cli.command,
            Command::Watch {
                recursive: true,
                ref types,
                ..
            } if types == &[EventTypeArg::Data]
        ));
        for bad in [
            &["kordctl", "watch", "/a", "--children", "--recursive"][..],
            &["kordctl", "watch", "/a", "--types", "renamed"],
            &["kordctl", "watch", "/a", "--rev", "-1"],
        ] {
            assert!(Cli::try_parse_from(bad).is_err(), "{bad:?}");
        }
        let cli = Cli::try_parse_from(["kordctl", "compact", "42"]).unwrap();
        assert!(matches!(cli.command, Command::Compact { rev: 42 }));
    }

    #[test]
    fn parses_lock_and_elect() {
        let cli = Cli::try_parse_from(["kordctl", "lock", "jobs"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Lock { ref name, wait: None, ref command, .. } if name == "jobs" && command.is_empty()
        ));
        let cli = Cli::try_parse_from([
            "kordctl",
            "--timeout",
            "2s",
            "lock",
            "jobs",
            "--wait",
            "3s",
            "--session-timeout",
            "5s",
            "--",
            "sh",
            "-c",
            "echo $KORD_FENCING_TOKEN",
        ])
        .unwrap();
        assert_eq!(cli.timeout, Duration::from_secs(2));
        let Command::Lock {
            wait,
            session_timeout,
            command,
            ..
        } = cli.command
        else {
            panic!("not lock");
        };
        assert_eq!(wait, Some(Duration::from_secs(3)));
        assert_eq!(session_timeout, Some(Duration::from_secs(5)));
        assert_eq!(command, ["sh", "-c", "echo $KORD_FENCING_TOKEN"]);

        let cli = Cli::try_parse_from(["kordctl", "elect", "e", "me"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Elect { observe: false, value: Some(ref v), .. } if v == "me"
        ));
        let cli = Cli::try_parse_from(["kordctl", "elect", "--observe", "e"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Elect {
                observe: true,
                value: None,
                ..
            }
        ));
        assert!(Cli::try_parse_from(["kordctl", "elect", "e"]).is_err());
        assert!(Cli::try_parse_from(["kordctl", "elect", "--observe", "e", "v"]).is_err());
    }

    #[test]
    fn data_and_data_file_conflict() {
        let r = Cli::try_parse_from(["kordctl", "create", "/a", "x", "--data-file", "f"]);
        assert!(r.is_err());
    }
}
