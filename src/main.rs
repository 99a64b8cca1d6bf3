//! `dmsim`: the command line over the dmsim crates.

mod file_device;
mod metadata_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Deterministic simulation and model checking of Linux dm-thin and dm-cache.
#[derive(Parser)]
#[command(name = "dmsim", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the default campaign (in-process, no root).
    Check,
    /// Inspect thin-pool metadata images: check, dump.
    #[command(subcommand)]
    Metadata(metadata_cmd::MetadataCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check => {
            eprintln!("dmsim check: the campaign is not built yet");
            ExitCode::from(2)
        }
        Command::Metadata(cmd) => metadata_cmd::run(cmd),
    }
}
