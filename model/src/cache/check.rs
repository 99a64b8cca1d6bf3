//! An independent checker for dm-cache metadata images (kernel 6.1
//! format, versions 1 and 2), in the spirit of `cache_check`.
//!
//! Like the thin checker ([`crate::thin::check`]), whose bounds-checked
//! block reader, btree walk and space-map verification it shares, it reads
//! the image with its own code (never the writer's array, bitset or
//! space-map code) and reports every problem with the structure and the
//! block concerned. It never panics, loops or recurses without bound: the
//! device size is trusted only as far as the device reports it (and at
//! most the 4,161,600 blocks a metadata space map can track), tree depth
//! and node visits are bounded, each array block is read once per array,
//! and no size read from disk is used before it is checked against the
//! device.
//!
//! What is checked (spec §6.3 names in parentheses):
//! * the superblock: checksum, location, magic, version 1 or 2, a dirty
//!   bitset root in version 2 (C1); metadata block size, cache block size,
//!   feature flags, `policy_hint_size` (0 or 4, the only widths the
//!   kernel registers);
//! * the mapping array, the hint array, the discard bitset and the dirty
//!   bitset (version 2): every btree node as the thin checker checks them,
//!   every array block's checksum, location, value size, max_entries,
//!   nr_entries (all but the last block full), contiguous keys (C2, C5);
//!   the hint array's value width against `policy_hint_size` (C4);
//! * the array lengths against the superblock: the mapping array and the
//!   dirty bitset against `cache_blocks`, the discard bitset against
//!   `discard_nr_blocks`, the hint array against `cache_blocks`;
//! * each mapping (C3): flags, unmapped entries holding an origin block or
//!   a dirty flag, a valid mapping's cache block within the cache, its
//!   origin block within the origin when the origin's size is given
//!   ([`CacheCheckOptions::origin_blocks`]; the superblock does not store
//!   it), no origin block mapped by two cache blocks, and (version 2) no
//!   dirty bit on an unmapped cache block;
//! * the metadata space map: index block, bitmaps, overflow tree, the
//!   index entries' and root's totals, and the reference count of every
//!   metadata block against the references of every structure (C6; leaks
//!   are non-fatal problems, as on the thin side).
//!
//! Compared with Debian bookworm's `cache_check` (0.9.0), established by
//! running it on damaged images: it does not audit reference counts,
//! never looks at the version 2 dirty bitset, passes a bad checksum in the
//! discard bitset's btree or array blocks, accepts NEEDS_CHECK (a note
//! here), a `policy_hint_size` other than 4 (it assumes 4 unless its own
//! VARIABLE_HINT_SIZE incompat bit is set), an invalid cache block size,
//! an unmapped entry holding an origin block (non-fatal here) or M_DIRTY
//! (damage here), and a mapping far past the origin the discard bitset
//! covers (the spec's §6.3 C3 says it derives the origin's size from the
//! discard geometry; 0.9.0 does not). It rejects two things the kernel
//! writes, clean here: a cache of 0 blocks ("missing mappings [1, 0]"),
//! and a hint array whose length differs from `cache_blocks` after an
//! unclean shutdown (stale after a resize; the kernel does not use it). It agrees on the superblock's checksum, version, metadata
//! block size, incompat flags, the mapping and hint arrays' blocks and
//! lengths, unknown mapping flags and origin blocks mapped twice.

mod array;
mod contents;

use thiserror::Error;

use crate::block_device::{BlockDevice, IoError, WriteFlags};
use crate::pdata::bitset::BITS_PER_WORD;
use crate::pdata::layout::cache::SUPERBLOCK_LOCATION;
use crate::pdata::layout::space_map::MAX_METADATA_BLOCKS;
use crate::pdata::layout::{BlockKind, BLOCK_SECTORS};
use crate::thin::check::space_map::{self, Expected, Which};
use crate::thin::check::walk::{Ctx, Use};
use crate::thin::check::{block, classify_block0, Block0, Reader};
pub use crate::thin::check::{Problem, Severity, Structure};

use super::superblock::CacheSuperblock;
use array::walk_array;

/// The input cannot be checked at all.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CacheCheckError {
    /// The device is smaller than one metadata block.
    #[error("metadata device too small to hold a superblock ({nr_sectors} sectors)")]
    TooSmall {
        /// Size of the device in sectors.
        nr_sectors: u64,
    },
    /// The superblock could not be read.
    #[error("cannot read the superblock: {0}")]
    Io(String),
    /// Block 0 is not a dm-cache superblock (neither its magic nor its
    /// checksum), nor another metadata block.
    #[error("block 0 is not a dm-cache superblock: {0}")]
    NotCacheMetadata(String),
}

/// How to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheCheckOptions {
    /// Compare every metadata block's reference count with the space map.
    pub check_counts: bool,
    /// Check the space map's index entries (nr_free, none_free_before)
    /// and its root's nr_allocated against the bitmaps.
    pub check_totals: bool,
    /// At most this many problems of one kind (per space map, per kind of
    /// mapping fault) are listed one by one; the rest are summarised.
    pub max_problems: usize,
    /// Blocks of the origin device, if known: a mapping to an origin block
    /// at or past it is damage. The metadata does not record the origin's
    /// size (only the discard bitset's geometry, which lags behind
    /// resizes), so it is given from outside (`--origin-blocks`).
    pub origin_blocks: Option<u64>,
}

impl Default for CacheCheckOptions {
    fn default() -> Self {
        CacheCheckOptions { check_counts: true, check_totals: true, max_problems: 100, origin_blocks: None }
    }
}

/// The cache checker's findings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CacheCheckReport {
    /// Everything found wrong, in the order found (deterministic).
    pub problems: Vec<Problem>,
    /// Remarks that are not problems (NEEDS_CHECK set, hints the kernel
    /// will ignore, comparisons skipped because of damage).
    pub notes: Vec<String>,
    /// Metadata version (superblock).
    pub version: u32,
    /// Superblock flags.
    pub flags: u32,
    /// Cache blocks (superblock).
    pub cache_blocks: u32,
    /// Cache block size in sectors (superblock).
    pub data_block_size: u32,
    /// The stored policy name.
    pub policy: String,
    /// The stored policy hint size.
    pub policy_hint_size: u32,
    /// Valid mappings found.
    pub mapped_blocks: u64,
    /// Valid mappings stored dirty (M_DIRTY in version 1, the dirty bitset
    /// in version 2).
    pub dirty_blocks: u64,
    /// Bits of the discard bitset (superblock).
    pub discard_nr_blocks: u64,
    /// Blocks tracked by the metadata space map.
    pub metadata_nr_blocks: u64,
    /// Metadata blocks free according to the space map root.
    pub metadata_free_blocks: u64,
}

impl CacheCheckReport {
    /// No problems at all.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// At least one problem of [`Severity::Damage`].
    pub fn has_damage(&self) -> bool {
        self.problems.iter().any(|p| p.severity == Severity::Damage)
    }

    /// The problems found in `structure`.
    pub fn problems_in(&self, structure: Structure) -> impl Iterator<Item = &Problem> {
        self.problems.iter().filter(move |p| p.structure == structure)
    }
}

/// A device seen no larger than `nr_sectors` (the metadata space map's
/// limit): blocks past it can be neither tracked nor referenced, and the
/// checker's per-block tables stay bounded however large the device is.
struct Clamped<'a> {
    dev: &'a mut dyn BlockDevice,
    nr_sectors: u64,
}

impl BlockDevice for Clamped<'_> {
    fn nr_sectors(&self) -> u64 {
        self.nr_sectors
    }
    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.dev.read(sector, buf)
    }
    fn write(&mut self, _sector: u64, _buf: &[u8], _flags: WriteFlags) -> Result<(), IoError> {
        Err(IoError::Failed { sector: _sector, reason: "the checker never writes".into() })
    }
    fn flush(&mut self) -> Result<(), IoError> {
        Ok(())
    }
}

/// The hint array's length against the cache. The kernel rebuilds it
/// for the current size at every clean shutdown, and uses it on the next
/// load only after a clean shutdown with a non-zero hint size; it then
/// reads one hint per cache block and fails the load (the cache does not
/// resume) if the array is shorter. Otherwise a mismatch is harmless: a
/// longer array after a clean shutdown is a writer's slip (non-fatal),
/// any mismatch after an unclean one is the normal lag behind a resize.
fn hint_length(ctx: &mut Ctx<'_>, sb: &CacheSuperblock, h: &array::ArrayContents, notes: &mut Vec<String>) {
    let want = u64::from(sb.cache_blocks);
    if !h.complete || h.len == want {
        return;
    }
    let st = Structure::HintArray;
    let block = h.ablocks.last().copied();
    if !sb.clean_shutdown() || sb.policy_hint_size == 0 {
        notes.push(format!(
            "the hint array holds {} hints for {want} cache blocks; the kernel will not use it \
             (no clean shutdown, or hint size 0)",
            h.len
        ));
    } else if h.len < want {
        ctx.problem(
            Severity::Damage,
            st,
            block,
            format!(
                "the array holds {} hints for {want} cache blocks after a clean shutdown: \
                 the kernel's load of the mappings fails",
                h.len
            ),
        );
    } else {
        ctx.problem(
            Severity::NonFatal,
            st,
            block,
            format!("the array holds {} hints for {want} cache blocks", h.len),
        );
    }
}

/// Words of a bitset of `nr_bits` bits.
fn nr_words(nr_bits: u64) -> u64 {
    nr_bits.div_ceil(u64::from(BITS_PER_WORD))
}

/// Checks the dm-cache metadata on `dev`.
///
/// Returns `Err` only when the input is unusable (see [`CacheCheckError`]);
/// every kind of damage is a [`Problem`] in the report, naming the
/// structure and, where there is one, the block. A block 0 that checksums
/// as another metadata block (an overwritten superblock) is damage: the
/// report holds that one problem.
pub fn check_cache_metadata(
    dev: &mut dyn BlockDevice,
    opts: &CacheCheckOptions,
) -> Result<CacheCheckReport, CacheCheckError> {
    let nr_sectors = dev.nr_sectors();
    let mut clamped = Clamped { nr_sectors: nr_sectors.min(MAX_METADATA_BLOCKS * BLOCK_SECTORS), dev };
    let mut reader = Reader::new(&mut clamped);
    if reader.nr_blocks() == 0 {
        return Err(CacheCheckError::TooSmall { nr_sectors });
    }
    let sb_block = reader.read(SUPERBLOCK_LOCATION).map_err(|e| CacheCheckError::Io(e.to_string()))?;
    let mut ctx = Ctx::new(reader);
    let sbs = Structure::CacheSuperblock;
    match classify_block0(&sb_block[..]) {
        Block0::CacheSuperblock => {}
        Block0::ThinSuperblock => {
            return Err(CacheCheckError::NotCacheMetadata("it is a thin-pool superblock".into()))
        }
        Block0::NotMetadata(why) => return Err(CacheCheckError::NotCacheMetadata(why)),
        Block0::Overwritten(kind) => {
            ctx.problem(
                Severity::Damage,
                sbs,
                Some(0),
                format!(
                    "the superblock is overwritten: block 0 holds a valid {kind} block; \
                     the roots of every structure are lost"
                ),
            );
            return Ok(CacheCheckReport { problems: ctx.problems, ..CacheCheckReport::default() });
        }
    }
    if let Err(e) = block::verify(&sb_block, SUPERBLOCK_LOCATION, BlockKind::CacheSuperblock) {
        ctx.problem(Severity::Damage, sbs, Some(0), e.to_string());
    }
    let sb = CacheSuperblock::decode(&sb_block[..]);
    let mut report = CacheCheckReport {
        version: sb.version,
        flags: sb.flags,
        cache_blocks: sb.cache_blocks,
        data_block_size: sb.data_block_size,
        policy: sb.policy_name_str(),
        policy_hint_size: sb.policy_hint_size,
        discard_nr_blocks: sb.discard_nr_blocks,
        metadata_nr_blocks: sb.metadata_sm_root.nr_blocks,
        metadata_free_blocks: sb.metadata_sm_root.nr_blocks.saturating_sub(sb.metadata_sm_root.nr_allocated),
        ..CacheCheckReport::default()
    };
    contents::superblock_fields(&mut ctx, &sb, &mut report.notes);

    // The metadata space map's size against the device.
    let msm = sb.metadata_sm_root;
    ctx.check_metadata_sm_size(msm.nr_blocks, nr_sectors / BLOCK_SECTORS);

    // The superblock holds one reference to itself.
    ctx.count_ref(SUPERBLOCK_LOCATION, sbs, "superblock");
    ctx.claim(SUPERBLOCK_LOCATION, Use::Superblock, sbs);

    // The arrays.
    let v2 = sb.version == 2;
    let mapping = walk_array(&mut ctx, sb.mapping_root, 8, Structure::MappingArray, true);
    contents::length(
        &mut ctx,
        Structure::MappingArray,
        &mapping,
        u64::from(sb.cache_blocks),
        "cache_blocks",
        Severity::Damage,
    );
    if sb.hint_root != 0 {
        let width = match sb.policy_hint_size {
            0 => 4,
            w @ 1..=128 => w as usize,
            _ => 4,
        };
        let h = walk_array(&mut ctx, sb.hint_root, width, Structure::HintArray, false);
        hint_length(&mut ctx, &sb, &h, &mut report.notes);
    }
    let discard = walk_array(&mut ctx, sb.discard_root, 8, Structure::DiscardBitset, false);
    contents::length(
        &mut ctx,
        Structure::DiscardBitset,
        &discard,
        nr_words(sb.discard_nr_blocks),
        "the words of discard_nr_blocks",
        Severity::Damage,
    );
    let dirty = if v2 && sb.dirty_root != 0 {
        let d = walk_array(&mut ctx, sb.dirty_root, 8, Structure::DirtyBitset, true);
        contents::length(
            &mut ctx,
            Structure::DirtyBitset,
            &d,
            nr_words(u64::from(sb.cache_blocks)),
            "the words of cache_blocks",
            Severity::Damage,
        );
        Some(d)
    } else {
        None
    };

    // Damage to the structures makes the expected counts unknown.
    let structure_damage = ctx.problems.iter().any(|p| {
        p.severity == Severity::Damage
            && matches!(
                p.structure,
                Structure::MappingArray
                    | Structure::HintArray
                    | Structure::DiscardBitset
                    | Structure::DirtyBitset
            )
    });

    // The mappings and the dirty bits.
    let counts = contents::mappings(&mut ctx, &sb, &mapping, dirty.as_ref(), opts, &mut report.notes);
    report.mapped_blocks = counts.mapped;
    report.dirty_blocks = counts.dirty;

    // The space map: structure pass (counts its own blocks), then counts.
    let loaded = space_map::load(&mut ctx, Which::Metadata, msm);
    let compare = opts.check_counts && !structure_damage;
    if opts.check_counts && structure_damage {
        report.notes.push(
            "reference counts not compared: the arrays are damaged, so the expected counts are unknown"
                .into(),
        );
    }
    let expected = std::mem::take(&mut ctx.meta_counts);
    space_map::verify_counts(
        &mut ctx,
        &loaded,
        compare.then_some(Expected::Dense(&expected)),
        opts.max_problems,
        opts.check_totals,
    );
    report.problems = ctx.problems;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_device::MemDevice;
    use crate::cache::CacheMetadata;

    #[test]
    fn tiny_zero_and_thin_inputs_are_unusable() {
        let opts = CacheCheckOptions::default();
        assert!(matches!(
            check_cache_metadata(&mut MemDevice::new(1), &opts),
            Err(CacheCheckError::TooSmall { .. })
        ));
        assert!(matches!(
            check_cache_metadata(&mut MemDevice::new(64), &opts),
            Err(CacheCheckError::NotCacheMetadata(_))
        ));
    }

    #[test]
    fn block0_recognises_a_cache_superblock_by_magic_or_checksum() {
        let dev = CacheMetadata::format(MemDevice::new(8 * 64), 128, 1).unwrap().close();
        let mut b = dev.as_bytes()[..4096].to_vec();
        assert_eq!(classify_block0(&b), Block0::CacheSuperblock);
        b[300] ^= 1; // bad checksum, magic intact
        assert_eq!(classify_block0(&b), Block0::CacheSuperblock);
        b[32] ^= 1; // bad magic too: neither
        assert!(matches!(classify_block0(&b), Block0::NotMetadata(_)));
        BlockKind::CacheSuperblock.prepare_for_write(&mut b, 0); // bad magic, good checksum
        assert_eq!(classify_block0(&b), Block0::CacheSuperblock);
        let r = check_cache_metadata(&mut MemDevice::from_bytes(b), &CacheCheckOptions::default()).unwrap();
        assert!(r.problems_in(Structure::CacheSuperblock).any(|p| p.message.contains("bad magic")));
    }

    #[test]
    fn a_fresh_image_of_each_version_is_clean() {
        for version in [1, 2] {
            let mut md = CacheMetadata::format(MemDevice::new(8 * 512), 128, version).unwrap();
            md.resize(1000).unwrap();
            md.insert_mapping(3, 77).unwrap();
            md.commit(false).unwrap();
            let mut dev = md.close();
            let r = check_cache_metadata(&mut dev, &CacheCheckOptions::default()).unwrap();
            assert!(r.is_clean(), "v{version}: {:?}", r.problems);
            assert_eq!((r.mapped_blocks, r.cache_blocks, r.version), (1, 1000, version));
            // The kernel's freshly formatted metadata (0 cache blocks) too.
            let mut dev = CacheMetadata::format(MemDevice::new(8 * 512), 128, version).unwrap().close();
            let r = check_cache_metadata(&mut dev, &CacheCheckOptions::default()).unwrap();
            assert!(r.is_clean(), "fresh v{version}: {:?}", r.problems);
        }
    }
}
