//! kordctl: argument parsing and the commands, kept here so the binary is a thin `main` and the
//! pieces can be unit-tested.

mod output;
pub mod txn;

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

use crate::{Client, ClientBuilder, Consistency, CreateOptions, Error};

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
    Create {
        /// Append a 10-digit sequence number to the name.
        #[arg(short, long)]
        sequential: bool,
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
    /// Bad input that clap could not catch (txn op syntax, unreadable data file).
    #[error("{0}")]
    Usage(String),
}

impl CliError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CliError::Kord(_) => ExitCode::from(1),
            CliError::Usage(_) => ExitCode::from(2),
        }
    }
}

/// Runs kordctl: prints the result to stdout, or `kordctl: <message>` to stderr.
pub async fn main(cli: Cli) -> ExitCode {
    match run(cli).await {
        Ok(out) => {
            // A closed pipe (`kordctl ls / | head`) is not worth a panic or an error.
            let _ = io::stdout().lock().write_all(out.as_bytes());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("kordctl: {err}");
            err.exit_code()
        }
    }
}

/// Runs one command and returns what it prints.
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
            path,
            data,
        } => {
            let created = client
                .create_with(&path, data.read(false)?, CreateOptions { sequential })
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
    };
    Ok(out)
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
    fn data_and_data_file_conflict() {
        let r = Cli::try_parse_from(["kordctl", "create", "/a", "x", "--data-file", "f"]);
        assert!(r.is_err());
    }
}
