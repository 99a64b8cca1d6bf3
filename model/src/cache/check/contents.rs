//! What the structures hold: superblock fields, array lengths against the
//! superblock, and each mapping against the cache, the origin, the other
//! mappings and the dirty bits.

use crate::cache::superblock::CacheSuperblock;
use crate::pdata::layout::array::max_entries_for;
use crate::pdata::layout::cache::{
    unpack_mapping, CLEAN_SHUTDOWN, MAX_VERSION, MIN_VERSION, M_DIRTY, M_VALID, NEEDS_CHECK, SUPERBLOCK_MAGIC,
};
use crate::thin::check::walk::Ctx;
use crate::thin::check::{Severity, Structure};

use super::array::ArrayContents;
use super::CacheCheckOptions;

/// Smallest cache block size the kernel accepts (32 KiB), in sectors; the
/// size must also be a multiple of it.
const MIN_DATA_BLOCK_SIZE: u32 = 64;
/// Largest cache block size (1 GiB), in sectors.
const MAX_DATA_BLOCK_SIZE: u32 = 2_097_152;

/// Superblock fields: magic, version, sizes, flags, the policy hint size.
pub(crate) fn superblock_fields(ctx: &mut Ctx<'_>, sb: &CacheSuperblock, notes: &mut Vec<String>) {
    let st = Structure::CacheSuperblock;
    let damage = |ctx: &mut Ctx<'_>, what: String| ctx.problem(Severity::Damage, st, Some(0), what);
    if sb.magic != SUPERBLOCK_MAGIC {
        damage(ctx, format!("bad magic {:#x}, expected {SUPERBLOCK_MAGIC:#x}", sb.magic));
    }
    if !(MIN_VERSION..=MAX_VERSION).contains(&sb.version) {
        damage(
            ctx,
            format!(
                "metadata version {}, only {MIN_VERSION} and {MAX_VERSION} exist (the rest is read as version {MIN_VERSION})",
                sb.version
            ),
        );
    }
    if sb.version == 2 && sb.dirty_root == 0 {
        damage(ctx, "version 2 metadata without a dirty bitset (dirty_root 0)".into());
    }
    if sb.metadata_block_size != 8 {
        damage(ctx, format!("metadata block size {} sectors, expected 8", sb.metadata_block_size));
    }
    let dbs = sb.data_block_size;
    if !(MIN_DATA_BLOCK_SIZE..=MAX_DATA_BLOCK_SIZE).contains(&dbs) || !dbs.is_multiple_of(MIN_DATA_BLOCK_SIZE)
    {
        damage(
            ctx,
            format!("cache block size {dbs} sectors is invalid (32 KiB to 1 GiB, a multiple of 32 KiB)"),
        );
    }
    if sb.incompat_flags != 0 {
        damage(ctx, format!("unknown incompatible features {:#x}: the kernel refuses it", sb.incompat_flags));
    }
    if sb.compat_ro_flags != 0 {
        ctx.problem(
            Severity::NonFatal,
            st,
            Some(0),
            format!(
                "unknown read-only-compatible features {:#x}: the kernel opens it read-only only",
                sb.compat_ro_flags
            ),
        );
    }
    if sb.policy_hint_size != 0 && sb.policy_hint_size != 4 {
        damage(
            ctx,
            format!(
                "policy_hint_size {}: the kernel's policies have hints of 0 or 4 bytes",
                sb.policy_hint_size
            ),
        );
    }
    if sb.hint_root != 0 && sb.policy_hint_size == 0 {
        notes.push(
            "a hint array with policy_hint_size 0 (as cache_restore 0.9.0 writes): the kernel ignores these hints"
                .into(),
        );
    }
    if sb.flags & NEEDS_CHECK != 0 {
        notes.push(
            "NEEDS_CHECK is set: the kernel opens this cache read-only until the flag is cleared".into(),
        );
    }
    let unknown = sb.flags & !(CLEAN_SHUTDOWN | NEEDS_CHECK);
    if unknown != 0 {
        notes.push(format!("unknown superblock flags {unknown:#x} (ignored by the kernel)"));
    }
}

/// An array's length against what the superblock says it must be.
pub(crate) fn length(
    ctx: &mut Ctx<'_>,
    st: Structure,
    a: &ArrayContents,
    want: u64,
    what: &str,
    severity: Severity,
) {
    if a.complete && a.len != want {
        ctx.problem(
            severity,
            st,
            a.ablocks.last().copied(),
            format!("the array holds {} entries, the superblock's {what} needs {want}", a.len),
        );
    }
}

/// Totals of the mapping pass.
pub(crate) struct Counts {
    /// Valid mappings.
    pub mapped: u64,
    /// Valid mappings stored dirty.
    pub dirty: u64,
}

/// Problems of one kind, listed up to a limit and then summarised.
struct Limited {
    listed: usize,
    hidden: u64,
}

impl Limited {
    fn new() -> Self {
        Limited { listed: 0, hidden: 0 }
    }

    fn report(
        &mut self,
        ctx: &mut Ctx<'_>,
        max: usize,
        severity: Severity,
        st: Structure,
        block: Option<u64>,
        what: impl FnOnce() -> String,
    ) {
        if self.listed < max.max(1) {
            self.listed += 1;
            ctx.problem(severity, st, block, what());
        } else {
            self.hidden += 1;
        }
    }

    fn summary(&self, ctx: &mut Ctx<'_>, severity: Severity, st: Structure, what: &str) {
        if self.hidden > 0 {
            ctx.problem(severity, st, None, format!("{} more {what} not listed", self.hidden));
        }
    }
}

/// The array block holding entry `i` of an array of `value_size`-byte
/// values, if known.
fn ablock_of(a: &ArrayContents, i: u64, value_size: usize) -> Option<u64> {
    let per = u64::from(max_entries_for(value_size));
    usize::try_from(i / per).ok().and_then(|k| a.ablocks.get(k).copied())
}

/// Each mapping: flags, unmapped entries, the cache and origin bounds,
/// origin blocks mapped twice, dirty bits (version 2) on unmapped blocks.
pub(crate) fn mappings(
    ctx: &mut Ctx<'_>,
    sb: &CacheSuperblock,
    mapping: &ArrayContents,
    dirty: Option<&ArrayContents>,
    opts: &CacheCheckOptions,
    notes: &mut Vec<String>,
) -> Counts {
    let st = Structure::MappingArray;
    let max = opts.max_problems;
    let v2 = sb.version == 2;
    let mut counts = Counts { mapped: 0, dirty: 0 };
    if !mapping.complete {
        notes.push("the mappings were not checked: the mapping array is damaged".into());
        return counts;
    }
    // The dirty bitset's words, when it could be read whole.
    let dirty_words: Option<Vec<u64>> = dirty.filter(|d| d.complete).map(|d| {
        d.values.chunks_exact(8).map(|w| u64::from_le_bytes(w.try_into().unwrap_or([0; 8]))).collect()
    });
    if v2 && dirty_words.is_none() {
        notes
            .push("the dirty bits were not checked against the mappings: the dirty bitset is damaged".into());
    }
    let dirty_bit = |c: u64| -> bool {
        dirty_words.as_ref().is_some_and(|w| {
            usize::try_from(c / 64).ok().and_then(|i| w.get(i)).is_some_and(|word| word >> (c % 64) & 1 != 0)
        })
    };
    let allowed = if v2 { M_VALID } else { M_VALID | M_DIRTY };
    let mut bad_flags = Limited::new();
    let mut stale = Limited::new();
    let mut beyond_cache = Limited::new();
    let mut beyond_origin = Limited::new();
    let mut unmapped_dirty = Limited::new();
    let mut twice = Limited::new();
    let mut by_oblock: Vec<(u64, u64)> = Vec::new();
    for (c, raw) in mapping.values.chunks_exact(8).enumerate() {
        let c = c as u64;
        let v = u64::from_le_bytes(raw.try_into().unwrap_or([0; 8]));
        let (oblock, flags) = unpack_mapping(v);
        let b = ablock_of(mapping, c, 8);
        if flags & !allowed != 0 {
            bad_flags.report(ctx, max, Severity::Damage, st, b, || {
                format!("cache block {c}: unknown mapping flags {:#x}", flags & !allowed)
            });
        }
        let valid = flags & M_VALID != 0;
        let dirty_here = if v2 { dirty_bit(c) } else { flags & M_DIRTY != 0 };
        if !valid {
            // Dirty bits are written only at a clean shutdown, so after an
            // unclean one a demoted or invalidated block keeps the bit it
            // had at the last clean shutdown (the kernel ignores it: every
            // mapping loads dirty then). Not damage.
            if !v2 && dirty_here {
                stale.report(ctx, max, Severity::NonFatal, st, b, || {
                    format!("cache block {c} is unmapped but flagged dirty")
                });
            } else if oblock != 0 {
                stale.report(ctx, max, Severity::NonFatal, st, b, || {
                    format!("cache block {c} is unmapped but holds origin block {oblock}")
                });
            }
            if v2 && dirty_here {
                let db = dirty.and_then(|d| ablock_of(d, c / 64, 8));
                unmapped_dirty.report(ctx, max, Severity::NonFatal, Structure::DirtyBitset, db, || {
                    format!("the dirty bit of unmapped cache block {c} is set")
                });
            }
            continue;
        }
        counts.mapped += 1;
        counts.dirty += u64::from(dirty_here);
        if c >= u64::from(sb.cache_blocks) {
            beyond_cache.report(ctx, max, Severity::Damage, st, b, || {
                format!(
                    "cache block {c} maps origin block {oblock}, but the cache has only {} blocks",
                    sb.cache_blocks
                )
            });
        }
        if let Some(n) = opts.origin_blocks.filter(|&n| oblock >= n) {
            beyond_origin.report(ctx, max, Severity::Damage, st, b, || {
                format!("cache block {c} maps origin block {oblock}, past the origin's {n} blocks")
            });
        }
        by_oblock.push((oblock, c));
    }
    by_oblock.sort_unstable();
    for w in by_oblock.windows(2) {
        let ((o1, c1), (o2, c2)) = (w[0], w[1]);
        if o1 == o2 {
            twice.report(ctx, max, Severity::Damage, st, ablock_of(mapping, c2, 8), || {
                format!("origin block {o1} is mapped by cache blocks {c1} and {c2}")
            });
        }
    }
    bad_flags.summary(ctx, Severity::Damage, st, "mappings with unknown flags");
    // Both kinds of stale entry are non-fatal (see above).
    stale.summary(ctx, Severity::NonFatal, st, "unmapped entries holding an origin block or a dirty flag");
    beyond_cache.summary(ctx, Severity::Damage, st, "mappings past the cache");
    beyond_origin.summary(ctx, Severity::Damage, st, "mappings past the origin");
    twice.summary(ctx, Severity::Damage, st, "origin blocks mapped twice");
    unmapped_dirty.summary(
        ctx,
        Severity::NonFatal,
        Structure::DirtyBitset,
        "dirty bits of unmapped cache blocks",
    );
    counts
}
