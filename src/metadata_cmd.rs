//! `dmsim metadata ...`: check and dump thin-pool metadata images.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use dmsim_model::block_device::{BlockDevice, SECTOR_SIZE};
use dmsim_model::pdata::BLOCK_SIZE;
use dmsim_model::thin::check::{
    check_thin_metadata, classify_block0, Block0, CheckOptions, CheckReport, Severity,
};
use dmsim_model::thin::dump::{dump_xml, DumpOptions};

use crate::file_device::FileDevice;

use crate::exit::{CLEAN as EXIT_CLEAN, PROBLEMS as EXIT_DAMAGED, UNUSABLE as EXIT_UNUSABLE};

/// Metadata subcommands.
#[derive(Subcommand)]
pub enum MetadataCommand {
    /// Check a thin-pool metadata image (like thin_check). Exit status:
    /// 0 clean, 1 problems found (leaks included, as thin_check 0.9.0
    /// does, unless --ignore-non-fatal-errors), 2 unusable input.
    #[command(after_help = crate::exit_help!("\
Status 1: the metadata has problems (leaks too, as thin_check 0.9.0 says, \
unless --ignore-non-fatal-errors). A superblock overwritten by another \
metadata block (a btree node, a space-map block, an array block) is damage \
to a pool (1); an image that is not thin-pool metadata at all (zeroes, XML, \
random bytes, a dm-cache superblock, smaller than one block) is unusable \
(2), as are directories, FIFOs and character devices."))]
    Check {
        /// The metadata image (file or block device).
        image: PathBuf,
        /// Print the report as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Exit 0 when only non-fatal problems (leaks, under-filled nodes) are found.
        #[arg(long)]
        ignore_non_fatal_errors: bool,
        /// Only check the trees and the space maps' structure, not the
        /// reference counts.
        #[arg(long)]
        skip_counts: bool,
        /// Do not check index entries' nr_free / none_free_before and the
        /// roots' nr_allocated (thin_check does not; thin_restore 0.9.0
        /// writes them inconsistently).
        #[arg(long)]
        ignore_space_map_totals: bool,
    },
    /// Write the thin_dump XML of a metadata image (like thin_dump 0.9.0).
    #[command(after_help = crate::exit_help!("\
Status 1: the dump stopped at damaged metadata (what was written before it \
stands). Unusable input (2) is judged from block 0 exactly as `metadata \
check` judges it, so the two commands agree; an output path that is the \
image itself is refused (2)."))]
    Dump {
        /// The metadata image (file or block device).
        image: PathBuf,
        /// Dump the metadata snapshot instead of the live metadata.
        #[arg(short = 'm', long)]
        metadata_snap: bool,
        /// Write to this file instead of stdout.
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
    },
}

/// Runs a metadata subcommand and returns the process exit status.
pub fn run(cmd: MetadataCommand) -> ExitCode {
    match cmd {
        MetadataCommand::Check {
            image,
            json,
            ignore_non_fatal_errors,
            skip_counts,
            ignore_space_map_totals,
        } => {
            let opts = CheckOptions {
                check_counts: !skip_counts,
                check_totals: !ignore_space_map_totals,
                ..CheckOptions::default()
            };
            check(&image, json, ignore_non_fatal_errors, &opts)
        }
        MetadataCommand::Dump { image, metadata_snap, output } => {
            dump(&image, metadata_snap, output.as_deref())
        }
    }
}

fn open(image: &Path) -> Result<FileDevice, ExitCode> {
    FileDevice::open(image).map_err(|e| {
        eprintln!("dmsim metadata: {e}");
        ExitCode::from(EXIT_UNUSABLE)
    })
}

/// Whether the image is thin-pool metadata at all, judged from block 0
/// exactly as the checker judges it ([`classify_block0`]), so that `check`
/// and `dump` give unusable input the same exit status.
fn usable(dev: &mut FileDevice, image: &Path) -> Result<(), ExitCode> {
    let unusable = |why: String| {
        eprintln!("dmsim metadata: {} is not usable thin-pool metadata: {why}", image.display());
        ExitCode::from(EXIT_UNUSABLE)
    };
    let mut block = vec![0u8; BLOCK_SIZE];
    if dev.nr_sectors() < (BLOCK_SIZE as u64 / SECTOR_SIZE) {
        return Err(unusable(format!(
            "{} bytes, smaller than one metadata block",
            dev.nr_sectors() * SECTOR_SIZE
        )));
    }
    dev.read(0, &mut block).map_err(|e| unusable(format!("cannot read block 0: {e}")))?;
    match classify_block0(&block) {
        Block0::NotMetadata(why) => Err(unusable(why)),
        Block0::ThinSuperblock | Block0::Overwritten(_) => Ok(()),
    }
}

fn check(image: &Path, json: bool, ignore_non_fatal: bool, opts: &CheckOptions) -> ExitCode {
    let mut dev = match open(image) {
        Ok(d) => d,
        Err(code) => return code,
    };
    let report = match check_thin_metadata(&mut dev, opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dmsim metadata: cannot check {}: {e}", image.display());
            return ExitCode::from(EXIT_UNUSABLE);
        }
    };
    let printed = if json { print_json(&report) } else { print_text(&report) };
    if let Err(e) = printed {
        eprintln!("cannot write the report: {e}");
        return ExitCode::from(EXIT_UNUSABLE);
    }
    let bad = if ignore_non_fatal { report.has_damage() } else { !report.is_clean() };
    ExitCode::from(if bad { EXIT_DAMAGED } else { EXIT_CLEAN })
}

fn print_text(r: &CheckReport) -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "TRANSACTION_ID={}", r.transaction_id)?;
    writeln!(out, "METADATA_FREE_BLOCKS={}", r.metadata_free_blocks)?;
    writeln!(out, "DATA_FREE_BLOCKS={}", r.data_free_blocks)?;
    writeln!(out, "DEVICES={}", r.devices.len())?;
    writeln!(out, "MAPPING_ENTRIES={}", r.mapping_entries)?;
    if r.held_root != 0 {
        writeln!(out, "METADATA_SNAPSHOT={}", r.held_root)?;
    }
    let mut err = io::stderr().lock();
    for n in &r.notes {
        writeln!(err, "note: {n}")?;
    }
    for p in &r.problems {
        writeln!(err, "{p}")?;
    }
    let damage = r.problems.iter().filter(|p| p.severity == Severity::Damage).count();
    let non_fatal = r.problems.len() - damage;
    if r.is_clean() {
        writeln!(err, "clean")?;
    } else {
        writeln!(err, "{damage} damage, {non_fatal} non-fatal problem(s)")?;
    }
    Ok(())
}

fn print_json(r: &CheckReport) -> io::Result<()> {
    let problems: Vec<serde_json::Value> = r
        .problems
        .iter()
        .map(|p| {
            serde_json::json!({
                "severity": p.severity.to_string(),
                "structure": p.structure.to_string(),
                "block": p.block,
                "message": p.message,
            })
        })
        .collect();
    let devices: Vec<serde_json::Value> = r
        .devices
        .iter()
        .map(|d| {
            serde_json::json!({
                "dev_id": d.dev,
                "mapped_blocks": d.mapped_blocks,
                "counted_mappings": d.counted_mappings,
                "snapshot_only": d.snapshot_only,
            })
        })
        .collect();
    let v = serde_json::json!({
        "clean": r.is_clean(),
        "damaged": r.has_damage(),
        "transaction_id": r.transaction_id,
        "time": r.time,
        "metadata_nr_blocks": r.metadata_nr_blocks,
        "metadata_free_blocks": r.metadata_free_blocks,
        "data_nr_blocks": r.data_nr_blocks,
        "data_free_blocks": r.data_free_blocks,
        "held_root": r.held_root,
        "mapping_entries": r.mapping_entries,
        "devices": devices,
        "notes": r.notes,
        "problems": problems,
    });
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &v).map_err(io::Error::other)?;
    writeln!(out)
}

/// Whether `a` and `b` name one file (the same device and inode).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

fn dump(image: &Path, metadata_snap: bool, output: Option<&Path>) -> ExitCode {
    let mut dev = match open(image) {
        Ok(d) => d,
        Err(code) => return code,
    };
    if let Err(code) = usable(&mut dev, image) {
        return code;
    }
    if let Some(out) = output.filter(|o| same_file(o, image)) {
        eprintln!("dmsim metadata: --output {} is the image itself; refusing to overwrite it", out.display());
        return ExitCode::from(EXIT_UNUSABLE);
    }
    let mut sink: Box<dyn Write> = match output {
        None => Box::new(BufWriter::new(io::stdout().lock())),
        Some(p) => match File::create(p) {
            Ok(f) => Box::new(BufWriter::new(f)),
            Err(e) => {
                eprintln!("cannot create {}: {e}", p.display());
                return ExitCode::from(EXIT_UNUSABLE);
            }
        },
    };
    let res = dump_xml(&mut dev, &mut *sink, &DumpOptions { metadata_snap });
    let flushed = sink.flush();
    let reader_left = |e: &io::Error| e.kind() == io::ErrorKind::BrokenPipe;
    match (res, flushed) {
        (Ok(()), Ok(())) => ExitCode::from(EXIT_CLEAN),
        // The reader went away (`| head`): not an error of the dump.
        (Err(dmsim_model::thin::dump::DumpError::Write(e)), _) if reader_left(&e) => {
            ExitCode::from(EXIT_CLEAN)
        }
        (Ok(()), Err(e)) if reader_left(&e) => ExitCode::from(EXIT_CLEAN),
        (Err(e), _) => {
            eprintln!("cannot dump {}: {e}", image.display());
            ExitCode::from(EXIT_DAMAGED)
        }
        (_, Err(e)) => {
            eprintln!("cannot write the dump: {e}");
            ExitCode::from(EXIT_UNUSABLE)
        }
    }
}
