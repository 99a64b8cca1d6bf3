//! `dmsim`: the command line over the dmsim crates.

mod check_cmd;
mod file_device;
mod metadata_cmd;
mod minimize_cmd;
mod replay_cmd;
mod run_cmd;
mod show_cmd;
mod trace_file;

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
    /// Run the default campaign (in-process, no root): seeded runs of the
    /// thin target on simulated disks under the oracle, and the metadata
    /// crash campaign. Exit status 1 on any violation.
    Check(check_cmd::CheckArgs),
    /// Run one seed of the thin campaign and write its trace.
    Run(run_cmd::RunArgs),
    /// Replay a trace on the simulator and compare it with the recording.
    Replay(replay_cmd::ReplayArgs),
    /// Shrink a failing trace while its violation still occurs.
    Minimize(minimize_cmd::MinimizeArgs),
    /// Print a trace as a readable timeline.
    Show(show_cmd::ShowArgs),
    /// Inspect thin-pool metadata images: check, dump.
    #[command(subcommand)]
    Metadata(metadata_cmd::MetadataCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check(args) => check_cmd::run(args),
        Command::Run(args) => run_cmd::run(args),
        Command::Replay(args) => replay_cmd::run(args),
        Command::Minimize(args) => minimize_cmd::run(args),
        Command::Show(args) => show_cmd::run(args),
        Command::Metadata(cmd) => metadata_cmd::run(cmd),
    }
}
