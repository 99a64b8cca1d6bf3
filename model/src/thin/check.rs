//! An independent checker for thin-pool metadata images (kernel 6.1
//! format), in the spirit of `thin_check`.
//!
//! It reads the image with its own bounds-checked readers (never the
//! writer's btree or space-map code, so that a writer bug cannot hide
//! behind shared code) and reports every problem it finds with the block
//! and structure concerned. It never panics, loops or recurses without
//! bound, whatever the image holds.
//!
//! What is checked (spec §6.2 names in parentheses):
//! * superblock checksum, location, magic (S1); the metadata snapshot's
//!   superblock copy and its trees (S2);
//! * every btree node: checksum, location, flags, value size, capacity,
//!   nr_entries, max_entries % 3, minimum fill, key order, key ranges
//!   against the parent, equal leaf depth, cycles (N1–N9, N11);
//! * details vs. top-level device sets (D1), mapped_blocks vs. counted
//!   mappings (D2), mapped data blocks within the data device (D3);
//! * metadata and data reference counts against the space maps (M1–M4),
//!   blocks used in two roles, references past the device or space map;
//! * space-map structure: index entries' nr_free and none_free_before,
//!   the roots' nr_allocated, overflow entries.
//!
//! Compared with Debian bookworm's thin_check (0.9.0, C++), established by
//! running it and reading its source:
//! * it exits 1 on any problem, leaks included (a leak is "non-fatal" but
//!   only `--ignore-non-fatal-errors` turns it into exit 0), as
//!   [`CheckReport::is_clean`] does;
//! * it never compares data reference counts (that code path is
//!   disabled) nor `mapped_blocks` with the mappings: damage of either
//!   kind alone passes it, and is caught here;
//! * it does not look at nr_free / none_free_before / nr_allocated
//!   ([`CheckOptions::check_totals`]);
//! * it counts the metadata snapshot's trees in the metadata reference
//!   counts, as done here.

pub(crate) mod block;
mod counts;
pub(crate) mod data_counts;
mod node;
mod report;
pub(crate) mod space_map;
pub(crate) mod walk;

pub(crate) use block::{le32, le64, Reader};
pub use counts::committed_data_counts;
pub(crate) use node::{scan, ScanError};
pub use report::{CheckReport, DeviceSummary, Problem, Severity, Structure};

use std::collections::BTreeMap;

use thiserror::Error;

use crate::block_device::BlockDevice;
use crate::pdata::checksum;
use crate::pdata::layout::space_map::SmRoot;
use crate::pdata::layout::thin::*;
use crate::pdata::layout::{BlockKind, BLOCK_SIZE};

use space_map::{Expected, Which};
use walk::{Ctx, TreeKind, Use};

/// The input cannot be checked at all.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CheckError {
    /// The device is smaller than one metadata block.
    #[error("metadata device too small to hold a superblock ({nr_sectors} sectors)")]
    TooSmall {
        /// Size of the device in sectors.
        nr_sectors: u64,
    },
    /// The superblock could not be read.
    #[error("cannot read the superblock: {0}")]
    Io(String),
    /// Block 0 is not a thin-pool superblock (wrong checksum and magic).
    #[error("block 0 is not a thin-pool superblock: {0}")]
    NotThinMetadata(String),
}

/// How to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOptions {
    /// Compare reference counts with the space maps (thin_check's full
    /// check). Off: only the trees and the space maps' structure.
    pub check_counts: bool,
    /// At most this many reference-count mismatches are listed one by one
    /// per space map; the rest are summarised in one problem.
    pub max_count_problems: usize,
    /// Check the space maps' bookkeeping: each index entry's nr_free and
    /// none_free_before against its bitmap, each root's nr_allocated
    /// against the bitmaps. The kernel keeps these exact and relies on
    /// them (allocation skips bitmaps by nr_free, the free-space status
    /// and thresholds use nr_allocated); thin_check does not look at them,
    /// and thin_restore 0.9.0 itself leaves them off by the blocks it
    /// frees while restoring — turn this off to judge such images as
    /// thin_check does.
    pub check_totals: bool,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions { check_counts: true, max_count_problems: 100, check_totals: true }
    }
}

/// The superblock fields the checker uses.
struct Superblock {
    time: u32,
    trans_id: u64,
    held_root: u64,
    data_sm: SmRoot,
    metadata_sm: SmRoot,
    mapping_root: u64,
    details_root: u64,
}

impl Superblock {
    fn decode(b: &[u8]) -> Self {
        Superblock {
            time: le32(b, SB_TIME),
            trans_id: le64(b, SB_TRANS_ID),
            held_root: le64(b, SB_HELD_ROOT),
            data_sm: decode_root(b, SB_DATA_SM_ROOT),
            metadata_sm: decode_root(b, SB_METADATA_SM_ROOT),
            mapping_root: le64(b, SB_DATA_MAPPING_ROOT),
            details_root: le64(b, SB_DEVICE_DETAILS_ROOT),
        }
    }
}

fn decode_root(b: &[u8], off: usize) -> SmRoot {
    SmRoot {
        nr_blocks: le64(b, off),
        nr_allocated: le64(b, off + 8),
        bitmap_root: le64(b, off + 16),
        ref_count_root: le64(b, off + 24),
    }
}

/// What block 0 of an image holds, judged before anything else is read.
///
/// The line between damaged pool metadata (exit status 1) and input that
/// is not pool metadata at all (2), shared by the checker and the dump:
///
/// - the thin superblock's magic, whatever its checksum: a pool whose
///   superblock may be damaged ([`Block0::ThinSuperblock`]);
/// - a block that checksums as another persistent-data block (a btree
///   node, a space-map bitmap or index, an array block): a superblock
///   overwritten by a metadata block, the commonest real corruption of a
///   pool's metadata device; damage ([`Block0::Overwritten`]);
/// - the dm-cache superblock's magic, whatever its checksum, or a block
///   that checksums as a cache superblock: dm-cache metadata, for
///   [`crate::cache::check`] ([`Block0::CacheSuperblock`]);
/// - anything else (zeroes, XML, random bytes): not metadata
///   ([`Block0::NotMetadata`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Block0 {
    /// A thin superblock (its checksum may still be wrong).
    ThinSuperblock,
    /// Another persistent-data block where the superblock belongs.
    Overwritten(BlockKind),
    /// A dm-cache superblock: its magic (the checksum may still be
    /// wrong), or a block that checksums as one (the magic may be wrong).
    CacheSuperblock,
    /// Not thin-pool metadata; why, in words.
    NotMetadata(String),
}

/// Classifies block 0 of an image; see [`Block0`].
pub fn classify_block0(b: &[u8]) -> Block0 {
    if b.len() < BLOCK_SIZE {
        return Block0::NotMetadata(format!("block 0 is only {} bytes", b.len()));
    }
    let magic = le64(b, SB_MAGIC);
    if magic == SUPERBLOCK_MAGIC {
        return Block0::ThinSuperblock;
    }
    if magic == crate::pdata::layout::cache::SUPERBLOCK_MAGIC {
        return Block0::CacheSuperblock;
    }
    match block::kind_of(&b[..BLOCK_SIZE]) {
        Some(BlockKind::ThinSuperblock) => Block0::ThinSuperblock,
        Some(
            k @ (BlockKind::BtreeNode | BlockKind::Bitmap | BlockKind::MetadataIndex | BlockKind::Array),
        ) => Block0::Overwritten(k),
        Some(BlockKind::CacheSuperblock) => Block0::CacheSuperblock,
        None if b.iter().all(|&x| x == 0) => {
            Block0::NotMetadata("block 0 is all zeroes (unformatted?)".into())
        }
        None if b.starts_with(b"<") => {
            Block0::NotMetadata("it looks like XML; this reads the binary format".to_string())
        }
        None => Block0::NotMetadata(format!("bad checksum and magic {magic:#x}")),
    }
}

/// Checks the thin-pool metadata on `dev`.
///
/// Returns `Err` only when the input is unusable (see [`CheckError`]);
/// every kind of damage is reported in the [`CheckReport`].
pub fn check_thin_metadata(
    dev: &mut dyn BlockDevice,
    opts: &CheckOptions,
) -> Result<CheckReport, CheckError> {
    let nr_sectors = dev.nr_sectors();
    let mut reader = Reader::new(dev);
    if reader.nr_blocks() == 0 {
        return Err(CheckError::TooSmall { nr_sectors });
    }
    let sb_block = reader.read(SUPERBLOCK_LOCATION).map_err(|e| CheckError::Io(e.to_string()))?;
    let mut ctx = Ctx::new(reader);

    // S1: block 0 (see [`classify_block0`]).
    let magic = le64(&sb_block[..], SB_MAGIC);
    match classify_block0(&sb_block[..]) {
        Block0::ThinSuperblock => {}
        Block0::NotMetadata(what) => return Err(CheckError::NotThinMetadata(what)),
        Block0::CacheSuperblock => {
            return Err(CheckError::NotThinMetadata(
                "it is a dm-cache superblock, not a thin-pool one".to_string(),
            ))
        }
        Block0::Overwritten(kind) => {
            // Nothing of the superblock is left to find the rest by.
            ctx.problem(
                Severity::Damage,
                Structure::Superblock,
                Some(0),
                format!(
                    "the superblock is overwritten: block 0 holds a valid {kind} block; \
                     the pool's roots are lost (thin_repair may rebuild them)"
                ),
            );
            return Ok(CheckReport { problems: ctx.problems, ..CheckReport::default() });
        }
    }
    if let Err(e) = block::verify(&sb_block, SUPERBLOCK_LOCATION, BlockKind::ThinSuperblock) {
        ctx.problem(Severity::Damage, Structure::Superblock, Some(0), e.to_string());
    }
    if magic != SUPERBLOCK_MAGIC {
        ctx.problem(
            Severity::Damage,
            Structure::Superblock,
            Some(0),
            format!("bad magic {magic:#x}, expected {SUPERBLOCK_MAGIC:#x}"),
        );
    }
    let sb = Superblock::decode(&sb_block[..]);
    check_sb_fields(&mut ctx, &sb_block[..], Structure::Superblock);

    let mut report = CheckReport {
        transaction_id: sb.trans_id,
        time: sb.time,
        metadata_nr_blocks: sb.metadata_sm.nr_blocks,
        metadata_free_blocks: sb.metadata_sm.nr_blocks.saturating_sub(sb.metadata_sm.nr_allocated),
        data_nr_blocks: sb.data_sm.nr_blocks,
        data_free_blocks: sb.data_sm.nr_blocks.saturating_sub(sb.data_sm.nr_allocated),
        held_root: sb.held_root,
        ..CheckReport::default()
    };

    // Metadata space map size vs. the device.
    let msm = sb.metadata_sm;
    let device_blocks = ctx.nr_blocks;
    ctx.check_metadata_sm_size(msm.nr_blocks, device_blocks);
    ctx.data_nr_blocks = sb.data_sm.nr_blocks;

    // The superblock holds one reference to itself.
    ctx.count_ref(SUPERBLOCK_LOCATION, Structure::Superblock, "superblock");
    ctx.claim(SUPERBLOCK_LOCATION, Use::Superblock, Structure::Superblock);

    // Live trees.
    let live = walk_trees(&mut ctx, sb.details_root, sb.mapping_root, false);

    // S2: the metadata snapshot, its trees counted like the live ones.
    let mut snap_devs = None;
    if sb.held_root != 0 {
        let st = Structure::SnapshotSuperblock;
        let b = sb.held_root;
        if ctx.count_ref(b, st, "metadata snapshot") && ctx.claim(b, Use::SnapshotSuperblock, st) {
            match ctx.reader.read_as(b, BlockKind::ThinSuperblock) {
                Ok(copy) => {
                    let magic = le64(&copy[..], SB_MAGIC);
                    if magic != SUPERBLOCK_MAGIC {
                        ctx.problem(Severity::Damage, st, Some(b), format!("bad magic {magic:#x}"));
                    }
                    let snap = Superblock::decode(&copy[..]);
                    snap_devs = Some(walk_trees(&mut ctx, snap.details_root, snap.mapping_root, true));
                }
                Err(e) => ctx.problem(Severity::Damage, st, Some(b), e.to_string()),
            }
        }
    }

    let tree_damage = ctx.problems.iter().any(|p| {
        p.severity == Severity::Damage
            && matches!(
                p.structure,
                Structure::DetailsTree { .. }
                    | Structure::TopLevelMappingTree { .. }
                    | Structure::MappingTree { .. }
                    | Structure::SnapshotSuperblock
            )
    });

    // Space maps: structure pass (counts their own blocks) before the
    // metadata counts are compared.
    let msm_loaded = space_map::load(&mut ctx, Which::Metadata, sb.metadata_sm);
    let dsm_loaded = space_map::load(&mut ctx, Which::Data, sb.data_sm);

    let compare = opts.check_counts && !tree_damage;
    if opts.check_counts && tree_damage {
        report.notes.push(
            "reference counts not compared: the trees are damaged, so the expected counts are unknown".into(),
        );
    }
    let meta_counts = std::mem::take(&mut ctx.meta_counts);
    let data_counts = std::mem::take(&mut ctx.data_counts);
    space_map::verify_counts(
        &mut ctx,
        &msm_loaded,
        compare.then_some(Expected::Dense(&meta_counts)),
        opts.max_count_problems,
        opts.check_totals,
    );
    space_map::verify_counts(
        &mut ctx,
        &dsm_loaded,
        compare.then_some(Expected::Counts(&data_counts)),
        opts.max_count_problems,
        opts.check_totals,
    );

    // Devices (live first, then those only in the snapshot).
    report.devices = live.summaries(false, None);
    if let Some(s) = &snap_devs {
        report.devices.extend(s.summaries(true, Some(&live)));
    }
    report.mapping_entries = ctx.mapping_entries;
    report.problems = ctx.problems;
    Ok(report)
}

/// Superblock fields the kernel refuses or that must hold fixed values.
fn check_sb_fields(ctx: &mut Ctx<'_>, b: &[u8], st: Structure) {
    let incompat = le32(b, SB_INCOMPAT_FLAGS);
    if incompat != 0 {
        ctx.problem(Severity::Damage, st, Some(0), format!("unknown incompat flags {incompat:#x}"));
    }
    let mbs = le32(b, SB_METADATA_BLOCK_SIZE);
    if mbs != 8 {
        ctx.problem(Severity::Damage, st, Some(0), format!("metadata block size {mbs} sectors, expected 8"));
    }
    let dbs = le32(b, SB_DATA_BLOCK_SIZE);
    // dm-thin: 64 KiB .. 1 GiB, a multiple of 64 KiB (128 sectors).
    if !(128..=2_097_152).contains(&dbs) || !dbs.is_multiple_of(128) {
        ctx.problem(Severity::Damage, st, Some(0), format!("data block size {dbs} sectors is invalid"));
    }
    let _ = checksum::THIN_SUPERBLOCK_SALT;
}

/// The devices found through one superblock.
struct Devices {
    details: BTreeMap<u64, DeviceDetails>,
    /// Device id → (subtree root, counted mappings if exact).
    roots: BTreeMap<u64, (u64, Option<u64>)>,
}

impl Devices {
    fn summaries(&self, snap: bool, live: Option<&Devices>) -> Vec<DeviceSummary> {
        let ids: std::collections::BTreeSet<u64> =
            self.details.keys().chain(self.roots.keys()).copied().collect();
        ids.into_iter()
            .filter(|id| {
                // A snapshot device is listed only if the live superblock
                // does not have the same device with the same tree.
                live.is_none_or(|l| l.roots.get(id).map(|r| r.0) != self.roots.get(id).map(|r| r.0))
            })
            .map(|dev| DeviceSummary {
                dev,
                mapped_blocks: self.details.get(&dev).map(|d| d.mapped_blocks),
                counted_mappings: self.roots.get(&dev).and_then(|r| r.1),
                snapshot_only: snap,
            })
            .collect()
    }
}

/// Walks the details tree and the two-level mapping tree of one
/// superblock, then checks details against mappings [D1, D2].
fn walk_trees(ctx: &mut Ctx<'_>, details_root: u64, mapping_root: u64, snap: bool) -> Devices {
    let dst = Structure::DetailsTree { snap };
    let d = ctx.walk_root(details_root, TreeKind::Details, dst);
    let mut details = BTreeMap::new();
    if d.ok {
        let _ =
            node::scan(&mut ctx.reader, details_root, TreeKind::Details.value_size(), false, &mut |k, v| {
                if v.len() == DEVICE_DETAILS_SIZE {
                    details.insert(k, DeviceDetails::decode(v));
                }
                Ok(())
            });
    }

    let tst = Structure::TopLevelMappingTree { snap };
    let first_pending = ctx.pending_subtrees.len();
    let t = ctx.walk_root(mapping_root, TreeKind::TopLevel, tst);
    // Walk the subtrees whose references the top-level leaves just
    // counted (a leaf shared with the other superblock was counted and
    // its subtrees walked already).
    let pending: Vec<(u64, u64, bool)> = ctx.pending_subtrees[first_pending..].to_vec();
    for (dev, root, snap) in pending {
        ctx.visit(root, TreeKind::Mapping, Structure::MappingTree { dev, snap }, 0, (0, None), true);
    }
    let mut roots = BTreeMap::new();
    if t.ok {
        let _ =
            node::scan(&mut ctx.reader, mapping_root, TreeKind::TopLevel.value_size(), false, &mut |k, v| {
                roots.insert(k, (le64(v, 0), None));
                Ok(())
            });
    }
    for (dev, entry) in roots.iter_mut() {
        match ctx.summary_of(entry.0) {
            Some(s) if s.ok => entry.1 = Some(s.entries),
            Some(_) => {}
            None => {
                // Only if the top-level leaf naming it was damaged.
                let _ = dev;
            }
        }
    }

    // D1: both trees name the same devices (only judged when both are
    // intact; otherwise their damage is already reported).
    if d.ok && t.ok {
        for dev in details.keys().filter(|k| !roots.contains_key(k)) {
            ctx.problem(
                Severity::Damage,
                Structure::Device { dev: *dev, snap },
                None,
                "has a details record but no mapping tree".into(),
            );
        }
        for dev in roots.keys().filter(|k| !details.contains_key(k)) {
            ctx.problem(
                Severity::Damage,
                Structure::Device { dev: *dev, snap },
                None,
                "has a mapping tree but no details record".into(),
            );
        }
    }
    // D2: mapped_blocks equals the mappings counted (thin_check 0.9.0
    // does not check this; the 1.x checker does).
    for (dev, (_, counted)) in &roots {
        if let (Some(n), Some(dd)) = (counted, details.get(dev)) {
            if *n != dd.mapped_blocks {
                ctx.problem(
                    Severity::Damage,
                    Structure::Device { dev: *dev, snap },
                    None,
                    format!(
                        "details say mapped_blocks {}, its mapping tree holds {n} mappings",
                        dd.mapped_blocks
                    ),
                );
            }
        }
    }
    Devices { details, roots }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_device::MemDevice;

    #[test]
    fn tiny_and_zero_inputs_are_unusable_not_panics() {
        let mut d = MemDevice::new(1);
        assert!(matches!(
            check_thin_metadata(&mut d, &CheckOptions::default()),
            Err(CheckError::TooSmall { .. })
        ));
        let mut d = MemDevice::new(64);
        assert!(matches!(
            check_thin_metadata(&mut d, &CheckOptions::default()),
            Err(CheckError::NotThinMetadata(_))
        ));
    }

    #[test]
    fn a_sealed_superblock_with_garbage_fields_reports_problems() {
        let mut d = MemDevice::new(64);
        let mut b = vec![0xffu8; 4096];
        crate::pdata::layout::put_u64(&mut b, SB_MAGIC, SUPERBLOCK_MAGIC);
        BlockKind::ThinSuperblock.prepare_for_write(&mut b, 0);
        d.as_bytes_mut()[..4096].copy_from_slice(&b);
        let r = check_thin_metadata(&mut d, &CheckOptions::default()).unwrap();
        assert!(r.has_damage());
    }
}
