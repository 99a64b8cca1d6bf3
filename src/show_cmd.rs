//! `dmsim show`: a trace (thin or cache) as a readable timeline.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use dmsim_sim::cache_run::is_cache_header;
use dmsim_traces::{DiskFault, Event, FaultAim, Op, Trace};

use crate::exit;
use dmsim_traces::file as trace_file;

/// Options of `dmsim show`.
#[derive(Args, Debug)]
#[command(after_help = crate::exit_help!("\
Status 1 is not used: a trace that can be read is shown, whatever it \
records."))]
pub struct ShowArgs {
    /// The trace file (text or binary; thin or cache: a cache trace's
    /// workload is cache-…).
    pub trace: PathBuf,
    /// Show only the ops (the inputs), not what was observed.
    #[arg(long)]
    pub ops_only: bool,
}

/// Prints the timeline; exit 2 if the trace cannot be read.
pub fn run(args: ShowArgs) -> ExitCode {
    match trace_file::read(&args.trace) {
        Ok((trace, encoding)) => {
            print!(
                "{}",
                timeline(&trace, args.ops_only, &format!("{} ({})", args.trace.display(), encoding.name()))
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dmsim show: {e}");
            ExitCode::from(exit::UNUSABLE)
        }
    }
}

/// The timeline of `trace`: a header (seed, workload, settings), then one
/// numbered line per event (per op with `ops_only`). A cache trace's
/// observations are worded for the cache (its one device, its cache and
/// origin disks).
pub fn timeline(trace: &Trace, ops_only: bool, source: &str) -> String {
    let mut s = String::new();
    let h = &trace.header;
    let cache = is_cache_header(h);
    let ops = trace.ops().count();
    let _ = writeln!(s, "trace {source}");
    let _ = writeln!(
        s,
        "  seed {}, workload {}{}, {} ops, {} events",
        h.seed,
        h.workload,
        if cache { " (a cache trace)" } else { "" },
        ops,
        trace.events.len()
    );
    let (swarm, settings): (Vec<_>, Vec<_>) = h.params.iter().partition(|(k, _)| k.starts_with("swarm."));
    let show = |v: &str| if v.is_empty() { "(none)".to_string() } else { v.to_string() };
    for (title, params) in [("settings", settings), ("fault swarm", swarm)] {
        if params.is_empty() {
            continue;
        }
        let _ = writeln!(s, "  {title}:");
        let mut line = String::from("   ");
        for (k, v) in params {
            let item = format!(" {}={}", k.strip_prefix("swarm.").unwrap_or(k), show(v));
            if line.len() + item.len() > 100 {
                let _ = writeln!(s, "{line}");
                line = String::from("   ");
            }
            line.push_str(&item);
        }
        let _ = writeln!(s, "{line}");
    }
    let _ = writeln!(s);
    let _ = writeln!(s, "{:>6}  {:>6}  what", "event", "op");
    let mut op_index = 0usize;
    for (i, e) in trace.events.iter().enumerate() {
        let n = i + 1;
        match e {
            Event::Op(op) => {
                let _ = writeln!(s, "{n:>6}  {op_index:>6}  {}", describe_op(op));
                op_index += 1;
            }
            _ if ops_only => {}
            Event::Violation { kind, message } => {
                let _ = writeln!(s, "{n:>6}  {:>6}  *** VIOLATION ({kind}): {message} ***", "");
            }
            other => {
                let _ = writeln!(s, "{n:>6}  {:>6}    {}", "", describe_event(other, cache));
            }
        }
    }
    match trace.violation() {
        Some((kind, message)) => {
            let _ = writeln!(s, "\nthe run ended with a violation ({kind}): {message}");
        }
        None => {
            let _ = writeln!(s, "\nno violation");
        }
    }
    s
}

/// An op in words, e.g. `write dev#0 sectors 257..513 FUA` (end excluded;
/// `dev#N` is the N-th live thin device, modulo how many are live).
pub fn describe_op(op: &Op) -> String {
    match *op {
        Op::Write { dev, sector, nr_sectors, fua, preflush } => {
            let mut s = format!("write dev#{dev} sectors {}", range(sector.into(), nr_sectors.into()));
            if preflush {
                s.push_str(" PREFLUSH");
            }
            if fua {
                s.push_str(" FUA");
            }
            s
        }
        Op::Read { dev, sector, nr_sectors } => {
            format!("read dev#{dev} sectors {}", range(sector.into(), nr_sectors.into()))
        }
        Op::Discard { dev, sector, nr_sectors } => {
            format!("discard dev#{dev} sectors {}", range(sector.into(), nr_sectors.into()))
        }
        Op::Flush { dev } => format!("flush dev#{dev}"),
        Op::CreateThin => "create a thin device".to_string(),
        Op::CreateSnap { origin } => format!("snapshot dev#{origin}"),
        Op::Delete { dev } => format!("delete dev#{dev}"),
        Op::Worker => "worker pass".to_string(),
        Op::Complete { pick } => format!("complete in-flight data I/O #{pick}"),
        Op::FailIo { pick } => format!("fail in-flight data I/O #{pick} with EIO"),
        Op::Fault { disk, fault } => {
            let what = match fault {
                DiskFault::ReadError { permanent } => {
                    format!("the next read fails ({})", if permanent { "permanent" } else { "transient" })
                }
                DiskFault::WriteError { permanent } => {
                    format!("the next write fails ({})", if permanent { "permanent" } else { "transient" })
                }
                DiskFault::BitFlip { bit } => format!("the next read flips bit {bit}"),
                DiskFault::Misdirect { offset } => format!("the next write lands {offset:+} sectors away"),
            };
            format!("arm a fault on the {} disk: {what}", disk.name())
        }
        Op::Tick { millis } => format!("time passes: {millis} ms"),
        Op::Crash { mode, seed } => format!("POWER CUT ({} crash, seed {seed}), then recovery", mode.name()),
        Op::Reload { mode, policy } => format!(
            "reload the cache: suspend (clean shutdown), load mode {} policy {}, resume",
            mode.name(),
            policy.name()
        ),
        Op::Invalidate { cblock, nr } => {
            format!(
                "invalidate_cblocks: cache blocks {} (modulo the cache size)",
                range(cblock.into(), nr.into())
            )
        }
        Op::Status => "status query (INFO; commits the metadata)".to_string(),
        Op::Resize { cache_blocks, origin_blocks } => format!(
            "resize the cache: suspend (clean shutdown), reload the table on {cache_blocks} cache blocks \
             and {origin_blocks} origin blocks, resume"
        ),
        Op::GrowMetadata { blocks, reload } => format!(
            "grow the metadata device: suspend the pool, add {blocks} metadata blocks, {}resume",
            if reload { "reload the table, " } else { "" }
        ),
        Op::AimFault { aim: FaultAim::Commit { request } } => format!(
            "aim a metadata write error at the next commit: its write {request} (counting from 0) fails"
        ),
        Op::AimFault { aim: FaultAim::Abort } => "aim faults at the next abort: the next commit's first \
            metadata write fails, and so does the abort's first metadata read"
            .to_string(),
        Op::AimFault { aim: FaultAim::Passdown } => "aim a data write error at the next passdown \
            discard: the discard the pool sends to the data device between a discard's two passes fails \
            with EIO (the pool ignores it and runs pass two)"
            .to_string(),
    }
}

fn range(start: u64, len: u64) -> String {
    format!("{start}..{}", start + len)
}

/// An observation in words, of a cache trace if `cache`.
pub fn describe_event(e: &Event, cache: bool) -> String {
    match e {
        Event::Op(op) => describe_op(op),
        Event::Done { bio, dev, result, read } => {
            let mut s = if cache {
                format!("→ bio {bio} on the cache device: {result}")
            } else {
                format!("→ bio {bio} on thin {dev}: {result}")
            };
            if let Some(r) = read {
                let _ = write!(s, ", read {r}");
            }
            s
        }
        Event::FaultFired { disk, what } => format!("! fault fired on the {} disk: {what}", disk.name()),
        Event::Crashed { metadata, data, torn } => format!(
            "crash state: metadata disk kept {} of {} unflushed writes, {} {} of {}{}",
            metadata.0,
            metadata.1,
            if cache { "cache and origin disks" } else { "data disk" },
            data.0,
            data.1,
            if *torn { ", one write torn" } else { "" }
        ),
        Event::Mode(m) => format!("{} mode → {m}", if cache { "cache" } else { "pool" }),
        Event::Violation { kind, message } => format!("*** VIOLATION ({kind}): {message} ***"),
    }
}

#[cfg(test)]
mod tests {
    use dmsim_traces::{CacheIoMode, CachePolicyKind, DiskId, Header};

    use super::*;

    #[test]
    fn the_cache_ops_and_disks_are_shown() {
        let ops = [
            Op::Reload { mode: CacheIoMode::Passthrough, policy: CachePolicyKind::Cleaner },
            Op::Invalidate { cblock: 300, nr: 2 },
            Op::Status,
            Op::Resize { cache_blocks: 16, origin_blocks: 80 },
            Op::Fault { disk: DiskId::Origin, fault: DiskFault::WriteError { permanent: true } },
        ];
        let mut events: Vec<Event> = ops.into_iter().map(Event::Op).collect();
        events.push(Event::FaultFired { disk: DiskId::Cache, what: "read-error".into() });
        let trace = Trace { header: Header::default(), events };
        let t = timeline(&trace, false, "x");
        for want in [
            "reload the cache: suspend (clean shutdown), load mode passthrough policy cleaner, resume",
            "invalidate_cblocks: cache blocks 300..302",
            "status query",
            "reload the table on 16 cache blocks and 80 origin blocks",
            "arm a fault on the origin disk: the next write fails (permanent)",
            "fault fired on the cache disk: read-error",
        ] {
            assert!(t.contains(want), "{want:?} missing from\n{t}");
        }
    }

    #[test]
    fn the_aimed_faults_are_shown() {
        let ops = [
            Op::AimFault { aim: FaultAim::Commit { request: 2 } },
            Op::AimFault { aim: FaultAim::Abort },
            Op::AimFault { aim: FaultAim::Passdown },
        ];
        let mut events: Vec<Event> = ops.into_iter().map(Event::Op).collect();
        events.push(Event::FaultFired { disk: DiskId::Data, what: "aimed passdown discard error".into() });
        let trace = Trace { header: Header::default(), events };
        let t = timeline(&trace, false, "x");
        for want in [
            "its write 2 (counting from 0) fails",
            "aim faults at the next abort",
            "aim a data write error at the next passdown discard",
            "fault fired on the data disk: aimed passdown discard error",
        ] {
            assert!(t.contains(want), "{want:?} missing from\n{t}");
        }
    }
}
