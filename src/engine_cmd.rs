//! `dmsim engine`: the userland engine — the model's thin pool on real
//! storage, its thin devices served as ublk block devices — and requests
//! to a running one over its control socket (docs/engine.md).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::exit;

/// The statuses of a request to a running engine, for its `--help`.
const REQUEST_HELP: &str = crate::exit_help!(
    "\
Status 1 is not used: 0 when the engine did what was asked (its answer, \
if any, on stdout), 2 when it refused (the errno the kernel's target would \
give, and why) or cannot be reached."
);

/// The control socket when none is given.
const DEFAULT_SOCKET: &str = "/tmp/dmsim-engine.sock";

/// The engine's subcommands.
#[derive(Debug, Subcommand)]
pub enum EngineCommand {
    /// Run the engine: the pool on METADATA and DATA (files or block
    /// devices), listening on the control socket until `dmsim engine
    /// stop` (or SIGINT / SIGTERM, which stop it the same way: every ublk
    /// device deleted, the pool's last commit made). Serving thin devices
    /// needs root and the ublk_drv module (/dev/ublk-control); messages
    /// and status work without.
    #[command(after_help = crate::exit_help!("\
Status 1 is not used: the engine serves until it is stopped (0), or cannot \
start or stops on an error (2, with the reason: a missing device, a bad \
table, a socket it cannot create)."))]
    Serve(ServeArgs),
    /// Send a pool message (`create_thin 0`, `create_snap 1 0`, `delete 1`,
    /// `set_transaction_id 0 1`, `reserve_metadata_snap`, …).
    #[command(after_help = REQUEST_HELP)]
    Message {
        /// The message's words.
        #[arg(required = true, num_args = 1..)]
        words: Vec<String>,
        #[command(flatten)]
        socket: Socket,
    },
    /// Print the pool's status line (as `dmsetup status` of a thin-pool;
    /// it commits first unless --noflush).
    #[command(after_help = REQUEST_HELP)]
    Status {
        /// Do not commit first (`dmsetup status --noflush`).
        #[arg(long)]
        noflush: bool,
        #[command(flatten)]
        socket: Socket,
    },
    /// Print the pool's clock, in nanoseconds.
    #[command(after_help = REQUEST_HELP)]
    Time {
        #[command(flatten)]
        socket: Socket,
    },
    /// Move the engine's trace clock on by NS nanoseconds (an engine
    /// started with --trace-clock; its pool's worker runs at the new
    /// time, so a timed commit that is due is made before the answer).
    /// Prints the pool's new time.
    #[command(after_help = REQUEST_HELP)]
    Advance {
        /// Nanoseconds to move on by.
        ns: u64,
        #[command(flatten)]
        socket: Socket,
    },
    /// Make the pool commit now if its transaction changed, as the commit
    /// timer would (the worker's next pass); answered once the commit is
    /// on disk. Prints the pool's time. How a replay makes the engine
    /// commit where the kernel did.
    #[command(after_help = REQUEST_HELP)]
    Commit {
        #[command(flatten)]
        socket: Socket,
    },
    /// Grow the pool's metadata device to SECTORS (an engine started with
    /// --metadata-sectors showing less of it): the pool suspended (it
    /// commits), the device grown, the pool resumed, its metadata space
    /// map extended — as a table reload after `lvextend` of the metadata
    /// LV.
    #[command(name = "grow-metadata", after_help = REQUEST_HELP)]
    GrowMetadata {
        /// The metadata device's new size in sectors.
        sectors: u64,
        /// Load the pool's table again on the resume (otherwise the
        /// resume keeps the table it has).
        #[arg(long)]
        reload: bool,
        #[command(flatten)]
        socket: Socket,
    },
    /// Serve thin device ID, of SECTORS 512-byte sectors, as a new ublk
    /// device; prints its block node (/dev/ublkbN).
    #[command(after_help = REQUEST_HELP)]
    Activate {
        /// The thin device id.
        id: u64,
        /// Its size in sectors.
        sectors: u64,
        #[command(flatten)]
        socket: Socket,
    },
    /// Serve thin device ID, of SECTORS sectors, on ublk device UBLK_ID
    /// that an engine which died served (ublk's user recovery: the
    /// device was quiesced, not deleted, and /dev/ublkbUBLK_ID stays);
    /// waits up to 20 s for the driver to notice the death. Prints the
    /// block node, the same as before.
    #[command(after_help = REQUEST_HELP)]
    Recover {
        /// The thin device id.
        id: u64,
        /// Its size in sectors.
        sectors: u64,
        /// The ublk device id (N of /dev/ublkbN).
        ublk_id: u32,
        #[command(flatten)]
        socket: Socket,
    },
    /// Stop serving thin device ID (its ublk device deleted).
    #[command(after_help = REQUEST_HELP)]
    Deactivate {
        /// The thin device id.
        id: u64,
        #[command(flatten)]
        socket: Socket,
    },
    /// List the thin devices served (id:/dev/ublkbN).
    #[command(after_help = REQUEST_HELP)]
    Devices {
        #[command(flatten)]
        socket: Socket,
    },
    /// Stop the engine: every device deleted, the pool closed.
    #[command(after_help = REQUEST_HELP)]
    Stop {
        #[command(flatten)]
        socket: Socket,
    },
}

/// Where a running engine listens.
#[derive(Debug, Args)]
pub struct Socket {
    /// The engine's control socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// `dmsim engine serve`'s arguments.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The pool's metadata device (file or block device).
    #[arg(long)]
    pub metadata: PathBuf,
    /// The pool's data device (file or block device).
    #[arg(long)]
    pub data: PathBuf,
    /// The thin-pool table's arguments after the two devices: block size
    /// in sectors, low water mark in blocks, then the features
    /// (`128 0 0`, `128 16 1 skip_block_zeroing`).
    #[arg(long, default_value = "128 0 0")]
    pub table: String,
    /// Format a new pool (the metadata's superblock is zeroed first);
    /// without it the pool on the metadata is opened.
    #[arg(long)]
    pub format: bool,
    /// The control socket to create.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Tags (requests in flight) per thin device.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub depth: u16,
    /// The no-space timeout in seconds (0: requests wait for space for ever).
    #[arg(long, default_value_t = 60)]
    pub no_space_timeout: u64,
    /// Commit every this many milliseconds instead of the model's timed
    /// commits (a commit once the last is a second old).
    #[arg(long)]
    pub commit_period_ms: Option<u64>,
    /// The pool's clock starts at this many nanoseconds and moves only on
    /// `dmsim engine advance NS` (and, when requests wait for data space
    /// and nothing else moves, to the no-space deadline) instead of real
    /// time: what a deterministic replay uses.
    #[arg(long, value_name = "START_NS", conflicts_with = "commit_period_ms")]
    pub trace_clock: Option<u64>,
    /// Show the pool only the first SECTORS of the metadata device (the
    /// rest for `dmsim engine grow-metadata` later).
    #[arg(long, value_name = "SECTORS")]
    pub metadata_sectors: Option<u64>,
}

/// Runs an engine subcommand: 0 on success, 2 when the engine refused or
/// cannot be reached (the reason on stderr).
pub fn run(cmd: EngineCommand) -> ExitCode {
    let (socket, line) = match cmd {
        EngineCommand::Serve(args) => return serve(&args),
        EngineCommand::Message { words, socket } => (socket, format!("message {}", words.join(" "))),
        EngineCommand::Status { noflush, socket } => {
            (socket, if noflush { "status noflush".into() } else { "status".into() })
        }
        EngineCommand::Time { socket } => (socket, "time".into()),
        EngineCommand::Advance { ns, socket } => (socket, format!("advance {ns}")),
        EngineCommand::Commit { socket } => (socket, "commit".into()),
        EngineCommand::GrowMetadata { sectors, reload, socket } => {
            (socket, format!("grow-metadata {sectors}{}", if reload { " reload" } else { "" }))
        }
        EngineCommand::Activate { id, sectors, socket } => (socket, format!("activate {id} {sectors}")),
        EngineCommand::Recover { id, sectors, ublk_id, socket } => {
            (socket, format!("recover {id} {sectors} {ublk_id}"))
        }
        EngineCommand::Deactivate { id, socket } => (socket, format!("deactivate {id}")),
        EngineCommand::Devices { socket } => (socket, "devices".into()),
        EngineCommand::Stop { socket } => (socket, "stop".into()),
    };
    match dmsim_engine::EngineClient::new(&socket.socket).request(&line) {
        Ok(answer) => {
            if !answer.is_empty() {
                println!("{answer}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dmsim engine: {e}");
            ExitCode::from(exit::UNUSABLE)
        }
    }
}

fn serve(args: &ServeArgs) -> ExitCode {
    let mut config = dmsim_engine::EngineConfig::new(&args.metadata, &args.data, &args.table, &args.socket);
    config.format = args.format;
    config.queue_depth = args.depth;
    config.no_space_timeout = std::time::Duration::from_secs(args.no_space_timeout);
    config.trace_clock = args.trace_clock;
    config.metadata_sectors = args.metadata_sectors;
    config.commit_period = args.commit_period_ms.filter(|&ms| ms > 0).map(std::time::Duration::from_millis);
    let socket = args.socket.clone();
    let ready = move || {
        eprintln!("dmsim engine: serving; control socket {}", socket.display());
        // SIGINT and SIGTERM stop the engine as `dmsim engine stop` does.
        if let Ok(mut signals) =
            signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM])
        {
            std::thread::spawn(move || {
                if signals.forever().next().is_some() {
                    let _ = dmsim_engine::EngineClient::new(&socket).request("stop");
                }
            });
        }
    };
    match dmsim_engine::serve(&config, ready) {
        Ok(()) => {
            eprintln!("dmsim engine: stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dmsim engine: {e}");
            ExitCode::from(exit::UNUSABLE)
        }
    }
}
