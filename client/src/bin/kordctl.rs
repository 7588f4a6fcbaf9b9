//! kordctl, the command line for Kord; everything but `main` lives in `kord_client::cli`.

use std::process::ExitCode;

use clap::Parser;
use kord_client::cli::{self, Cli};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    cli::main(Cli::parse()).await
}
