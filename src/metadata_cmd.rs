//! `dmsim metadata ...`: check and dump thin-pool and dm-cache metadata
//! images (which one is judged from block 0).

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use dmsim_model::block_device::{BlockDevice, SECTOR_SIZE};
use dmsim_model::cache::check::{check_cache_metadata, CacheCheckOptions, CacheCheckReport};
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
    /// Check a thin-pool metadata image (like thin_check) or a dm-cache
    /// one (like cache_check, and more), recognised by its superblock.
    /// Exit status: 0 clean, 1 problems found (leaks included, as
    /// thin_check 0.9.0 does, unless --ignore-non-fatal-errors), 2
    /// unusable input.
    #[command(after_help = crate::exit_help!("\
Block 0 decides: the thin-pool superblock's magic or checksum means a pool \
(thin_check's checks and more), the dm-cache superblock's means a cache \
(cache_check's checks plus reference counts, the dirty bitset against the \
mappings, origin blocks mapped twice, array sizes against the superblock; \
--origin-blocks adds mappings past the origin).

Status 1: the metadata has problems (leaks too, as thin_check 0.9.0 says, \
unless --ignore-non-fatal-errors). A superblock overwritten by another \
metadata block (a btree node, a space-map block, an array block) is damage \
(1); an image that is neither thin-pool nor dm-cache metadata (zeroes, XML, \
random bytes, smaller than one block) is unusable (2), as are directories, \
FIFOs and character devices, and --origin-blocks given for a thin pool."))]
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
        /// dm-cache only: the origin device's size in cache blocks; a
        /// mapping to an origin block at or past it is damage (the
        /// metadata does not record the origin's size).
        #[arg(long, value_name = "N")]
        origin_blocks: Option<u64>,
    },
    /// Write the XML dump of a metadata image: thin_dump's for a thin pool
    /// (like thin_dump 0.9.0), cache_dump's for a dm-cache (like
    /// cache_dump 0.9.0, except that metadata2's dirty bits are printed as
    /// stored).
    #[command(after_help = crate::exit_help!("\
Status 1: the dump stopped at damaged metadata (what was written before it \
stands; a damaged dm-cache image is not dumped at all). Unusable input (2) \
is judged from block 0 exactly as `metadata check` judges it, so the two \
commands agree; an output path that is the image itself is refused (2), \
and so is --metadata-snap for a dm-cache image (it has none)."))]
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
            origin_blocks,
        } => {
            let opts = CheckOptions {
                check_counts: !skip_counts,
                check_totals: !ignore_space_map_totals,
                ..CheckOptions::default()
            };
            let cache_opts = CacheCheckOptions {
                check_counts: !skip_counts,
                check_totals: !ignore_space_map_totals,
                origin_blocks,
                ..CacheCheckOptions::default()
            };
            check(&image, json, ignore_non_fatal_errors, &opts, &cache_opts)
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

/// Whether the image is thin-pool or dm-cache metadata at all, judged
/// from block 0 exactly as the checkers judge it ([`classify_block0`]), so
/// that `check` and `dump` give unusable input the same exit status.
fn usable(dev: &mut FileDevice, image: &Path) -> Result<Block0, ExitCode> {
    let unusable = |why: String| {
        eprintln!("dmsim metadata: {} is not usable thin-pool or dm-cache metadata: {why}", image.display());
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
        b @ (Block0::ThinSuperblock | Block0::Overwritten(_) | Block0::CacheSuperblock) => Ok(b),
    }
}

/// Whether block 0 of the image holds a dm-cache superblock (its magic or
/// its checksum); false when it cannot be read (the thin path reports
/// that).
fn is_cache(dev: &mut FileDevice) -> bool {
    let mut block = vec![0u8; BLOCK_SIZE];
    dev.nr_sectors() >= BLOCK_SIZE as u64 / SECTOR_SIZE
        && dev.read(0, &mut block).is_ok()
        && classify_block0(&block) == Block0::CacheSuperblock
}

fn check(
    image: &Path,
    json: bool,
    ignore_non_fatal: bool,
    opts: &CheckOptions,
    cache_opts: &CacheCheckOptions,
) -> ExitCode {
    let mut dev = match open(image) {
        Ok(d) => d,
        Err(code) => return code,
    };
    if is_cache(&mut dev) {
        return check_cache(&mut dev, image, json, ignore_non_fatal, cache_opts);
    }
    if cache_opts.origin_blocks.is_some() {
        eprintln!("dmsim metadata: --origin-blocks applies to dm-cache metadata; {} is not", image.display());
        return ExitCode::from(EXIT_UNUSABLE);
    }
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

fn check_cache(
    dev: &mut FileDevice,
    image: &Path,
    json: bool,
    ignore_non_fatal: bool,
    opts: &CacheCheckOptions,
) -> ExitCode {
    let report = match check_cache_metadata(dev, opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dmsim metadata: cannot check {}: {e}", image.display());
            return ExitCode::from(EXIT_UNUSABLE);
        }
    };
    let printed = if json { print_cache_json(&report) } else { print_cache_text(&report) };
    if let Err(e) = printed {
        eprintln!("cannot write the report: {e}");
        return ExitCode::from(EXIT_UNUSABLE);
    }
    let bad = if ignore_non_fatal { report.has_damage() } else { !report.is_clean() };
    ExitCode::from(if bad { EXIT_DAMAGED } else { EXIT_CLEAN })
}

/// The problems, notes and verdict on stderr, as for a pool.
fn print_problems(
    err: &mut dyn Write,
    notes: &[String],
    problems: &[dmsim_model::thin::check::Problem],
) -> io::Result<()> {
    for n in notes {
        writeln!(err, "note: {n}")?;
    }
    for p in problems {
        writeln!(err, "{p}")?;
    }
    let damage = problems.iter().filter(|p| p.severity == Severity::Damage).count();
    let non_fatal = problems.len() - damage;
    if problems.is_empty() {
        writeln!(err, "clean")
    } else {
        writeln!(err, "{damage} damage, {non_fatal} non-fatal problem(s)")
    }
}

fn print_cache_text(r: &CacheCheckReport) -> io::Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "CACHE_METADATA_VERSION={}", r.version)?;
    writeln!(out, "CACHE_BLOCKS={}", r.cache_blocks)?;
    writeln!(out, "CACHE_BLOCK_SIZE={}", r.data_block_size)?;
    writeln!(out, "POLICY={}", r.policy)?;
    writeln!(out, "MAPPED_BLOCKS={}", r.mapped_blocks)?;
    writeln!(out, "DIRTY_BLOCKS={}", r.dirty_blocks)?;
    writeln!(out, "FLAGS={:#x}", r.flags)?;
    writeln!(out, "METADATA_FREE_BLOCKS={}", r.metadata_free_blocks)?;
    print_problems(&mut io::stderr().lock(), &r.notes, &r.problems)
}

fn print_cache_json(r: &CacheCheckReport) -> io::Result<()> {
    let v = serde_json::json!({
        "metadata": "cache",
        "clean": r.is_clean(),
        "damaged": r.has_damage(),
        "version": r.version,
        "flags": r.flags,
        "cache_blocks": r.cache_blocks,
        "cache_block_size": r.data_block_size,
        "policy": r.policy,
        "policy_hint_size": r.policy_hint_size,
        "mapped_blocks": r.mapped_blocks,
        "dirty_blocks": r.dirty_blocks,
        "discard_nr_blocks": r.discard_nr_blocks,
        "metadata_nr_blocks": r.metadata_nr_blocks,
        "metadata_free_blocks": r.metadata_free_blocks,
        "notes": r.notes,
        "problems": problems_json(&r.problems),
    });
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, &v).map_err(io::Error::other)?;
    writeln!(out)
}

fn problems_json(problems: &[dmsim_model::thin::check::Problem]) -> Vec<serde_json::Value> {
    problems
        .iter()
        .map(|p| {
            serde_json::json!({
                "severity": p.severity.to_string(),
                "structure": p.structure.to_string(),
                "block": p.block,
                "message": p.message,
            })
        })
        .collect()
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
    print_problems(&mut io::stderr().lock(), &r.notes, &r.problems)
}

fn print_json(r: &CheckReport) -> io::Result<()> {
    let problems = problems_json(&r.problems);
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
        "metadata": "thin",
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
    let kind = match usable(&mut dev, image) {
        Ok(k) => k,
        Err(code) => return code,
    };
    if kind == Block0::CacheSuperblock && metadata_snap {
        eprintln!("dmsim metadata: {} is dm-cache metadata, which has no metadata snapshot", image.display());
        return ExitCode::from(EXIT_UNUSABLE);
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
    if kind == Block0::CacheSuperblock {
        return dump_cache(&mut dev, image, &mut *sink);
    }
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

/// The cache_dump XML of a dm-cache image ([`dmsim_model::cache::dump`]):
/// the image is decoded whole first, so a damaged one prints nothing.
fn dump_cache(dev: &mut FileDevice, image: &Path, sink: &mut dyn Write) -> ExitCode {
    let img = match dmsim_model::cache::inspect::read_image(dev) {
        Ok(img) => img,
        Err(e) => {
            eprintln!("cannot dump {}: {e}", image.display());
            return ExitCode::from(EXIT_DAMAGED);
        }
    };
    let res = dmsim_model::cache::dump::write_xml(&img, sink).and_then(|()| sink.flush());
    match res {
        Ok(()) => ExitCode::from(EXIT_CLEAN),
        // The reader went away (`| head`): not an error of the dump.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::from(EXIT_CLEAN),
        Err(e) => {
            eprintln!("cannot write the dump: {e}");
            ExitCode::from(EXIT_UNUSABLE)
        }
    }
}
