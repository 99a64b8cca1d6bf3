//! `dmsim`: the command line over the dmsim crates.

mod check_cmd;
mod engine_cmd;
mod exit;
mod file_device;
mod fuzz_cmd;
mod kernel_check_cmd;
mod metadata_cmd;
mod minimize_cmd;
mod probes_report;
mod replay_cmd;
mod replay_many;
mod run_cmd;
mod show_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Deterministic simulation and model checking of Linux dm-thin and dm-cache.
#[derive(Parser)]
#[command(name = "dmsim", version, about, after_help = exit_table!())]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the default campaign (in-process, no root): seeded runs of the
    /// thin and cache targets on simulated disks under the oracle, and the
    /// thin and cache metadata crash campaigns. Exit status 1 on any
    /// violation.
    Check(check_cmd::CheckArgs),
    /// Run one seed of the thin campaign (of the cache campaign with
    /// --workload cache-…) and write its trace.
    Run(run_cmd::RunArgs),
    /// Replay a trace (thin or cache) on the simulator and compare it with
    /// the recording.
    Replay(replay_cmd::ReplayArgs),
    /// Shrink a failing trace while its violation still occurs.
    Minimize(minimize_cmd::MinimizeArgs),
    /// Print a trace as a readable timeline.
    Show(show_cmd::ShowArgs),
    /// Run an input of the `simulate` fuzz target (a crash it saved, a
    /// corpus file) as the target does, and write its trace.
    FuzzToTrace(fuzz_cmd::FuzzToTraceArgs),
    /// Inspect thin-pool and dm-cache metadata images: check, dump.
    #[command(subcommand)]
    Metadata(metadata_cmd::MetadataCommand),
    /// The userland engine: the model's thin pool served as ublk block
    /// devices, its I/O through io_uring; and requests to a running one.
    #[command(subcommand)]
    Engine(engine_cmd::EngineCommand),
}

/// Takes SIGINT and SIGTERM on a thread of their own: it removes what the
/// run made (the kernel shim's VM and folders, temporary images) and exits
/// with 128 + the signal's number.
fn install_signal_handlers() {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "dmsim: cannot install signal handlers ({e}); an interrupted run may leave files behind"
            );
            return;
        }
    };
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            let shim = dmsim_kernel_shim::cleanup::clean_up_now();
            let files = dmsim_sim::run::remove_temporary_files();
            let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
            eprintln!(
                "\ndmsim: interrupted by {name}: stopped {} VM(s), removed {} temporary folder(s) and {files} file(s)",
                shim.groups, shim.dirs
            );
            std::process::exit(128 + sig);
        }
    });
}

/// Parses the command line; errors are printed with long values cut
/// (clap quotes a bad value whole) and give exit status 2.
fn parse() -> Cli {
    match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => {
            let text = e.render().to_string();
            let clipped: Vec<String> = text
                .split('\n')
                .map(|line| {
                    line.split(' ')
                        .map(|w| {
                            if w.chars().count() > 100 {
                                dmsim_traces::error::clip(w)
                            } else {
                                w.to_string()
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect();
            eprint!("{}", clipped.join("\n"));
            std::process::exit(i32::from(exit::UNUSABLE));
        }
    }
}

fn main() -> ExitCode {
    // The engine stops itself on SIGINT and SIGTERM (its devices deleted).
    let serving = std::env::args().nth(1).as_deref() == Some("engine")
        && std::env::args().nth(2).as_deref() == Some("serve");
    if !serving {
        install_signal_handlers();
    }
    dmsim_sim::quiet_caught_panics();
    let cli = parse();
    match cli.command {
        Command::Check(args) => check_cmd::run(args),
        Command::Run(args) => run_cmd::run(args),
        Command::Replay(args) => replay_cmd::run(args),
        Command::Minimize(args) => minimize_cmd::run(args),
        Command::Show(args) => show_cmd::run(args),
        Command::FuzzToTrace(args) => fuzz_cmd::run(args),
        Command::Metadata(cmd) => metadata_cmd::run(cmd),
        Command::Engine(cmd) => engine_cmd::run(cmd),
    }
}
