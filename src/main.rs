//! `dmsim`: the command line over the dmsim crates.

mod check_cmd;
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
    /// Run the default campaign (in-process, no root): seeded workloads
    /// with every commit's crash states judged. Exit status 1 on any
    /// violation.
    Check(check_cmd::CheckArgs),
    /// Inspect thin-pool metadata images: check, dump.
    #[command(subcommand)]
    Metadata(metadata_cmd::MetadataCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check(args) => check_cmd::run(args),
        Command::Metadata(cmd) => metadata_cmd::run(cmd),
    }
}
