//! The two space maps: their structure (index, bitmaps, overflow trees,
//! the root's totals) and their reference counts against what the trees
//! say.

use std::collections::BTreeMap;

use crate::pdata::layout::space_map::{
    IndexEntry, SmRoot, ENTRIES_PER_BITMAP, INDEX_ENTRY_SIZE, INDEX_HEADER_SIZE, MAX_METADATA_BITMAPS,
};
use crate::pdata::layout::BlockKind;

use super::block::{bitmap_entry, le32, verify};
use super::node::scan;
use super::report::{Severity, Structure};
use super::walk::{Ctx, TreeKind, Use};

/// Which space map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Which {
    /// The metadata space map (index block + bitmaps).
    Metadata,
    /// The data space map (index btree + bitmaps).
    Data,
}

impl Which {
    fn whole(self) -> Structure {
        match self {
            Which::Metadata => Structure::MetadataSpaceMap,
            Which::Data => Structure::DataSpaceMap,
        }
    }
    fn bitmap(self, index: u64) -> Structure {
        match self {
            Which::Metadata => Structure::MetadataBitmap { index },
            Which::Data => Structure::DataBitmap { index },
        }
    }
    fn overflow(self) -> (Structure, TreeKind) {
        match self {
            Which::Metadata => (Structure::MetadataOverflowTree, TreeKind::MetadataOverflow),
            Which::Data => (Structure::DataOverflowTree, TreeKind::DataOverflow),
        }
    }
    fn bitmap_use(self) -> Use {
        match self {
            Which::Metadata => Use::MetadataBitmap,
            Which::Data => Use::DataBitmap,
        }
    }
}

/// A space map as found on disk, after the structural pass.
pub(crate) struct SpaceMap {
    which: Which,
    root: SmRoot,
    /// Bitmaps needed to cover nr_blocks.
    nr_bitmaps: u64,
    /// Index entries whose bitmap block validated, by bitmap index.
    bitmaps: BTreeMap<u64, IndexEntry>,
    /// Whether every bitmap needed was present and valid.
    complete: bool,
    /// Overflow tree contents: block → count.
    overflow: BTreeMap<u64, u32>,
}

fn nr_bitmaps_for(nr_blocks: u64) -> u64 {
    nr_blocks.div_ceil(ENTRIES_PER_BITMAP)
}

/// Structural pass over one space map: counts and claims its blocks,
/// validates the index and bitmaps, reads the overflow tree.
pub(crate) fn load(ctx: &mut Ctx<'_>, which: Which, root: SmRoot) -> SpaceMap {
    let mut nr_bitmaps = nr_bitmaps_for(root.nr_blocks);
    let whole = which.whole();
    if root.nr_allocated > root.nr_blocks {
        ctx.problem(
            Severity::Damage,
            whole,
            None,
            format!("root says {} blocks allocated of {}", root.nr_allocated, root.nr_blocks),
        );
    }
    let mut entries: Vec<(u64, IndexEntry)> = Vec::new();
    match which {
        Which::Metadata => {
            if nr_bitmaps > MAX_METADATA_BITMAPS as u64 {
                ctx.problem(
                    Severity::Damage,
                    whole,
                    None,
                    format!(
                        "{} blocks need {nr_bitmaps} bitmaps, more than the index block's {MAX_METADATA_BITMAPS}",
                        root.nr_blocks
                    ),
                );
                nr_bitmaps = MAX_METADATA_BITMAPS as u64;
            }
            let b = root.bitmap_root;
            let st = Structure::MetadataIndex;
            if ctx.count_ref(b, st, "metadata space map index") && ctx.claim(b, Use::MetadataIndex, st) {
                match ctx.reader.read_as(b, BlockKind::MetadataIndex) {
                    Ok(block) => {
                        for i in 0..nr_bitmaps as usize {
                            let off = INDEX_HEADER_SIZE + i * INDEX_ENTRY_SIZE;
                            if let Some(raw) = block.get(off..off + INDEX_ENTRY_SIZE) {
                                entries.push((i as u64, IndexEntry::decode(raw)));
                            }
                        }
                    }
                    Err(e) => ctx.problem(Severity::Damage, st, Some(b), e.to_string()),
                }
            }
        }
        Which::Data => {
            let st = Structure::DataIndexTree;
            let s = ctx.walk_root(root.bitmap_root, TreeKind::DataIndex, st);
            if s.ok {
                let mut raw: Vec<(u64, IndexEntry)> = Vec::new();
                let _ = scan(&mut ctx.reader, root.bitmap_root, INDEX_ENTRY_SIZE, false, &mut |k, v| {
                    raw.push((k, IndexEntry::decode(v)));
                    Ok(())
                });
                for (k, e) in raw {
                    if k >= nr_bitmaps {
                        ctx.problem(
                            Severity::Damage,
                            st,
                            Some(e.blocknr),
                            format!(
                                "index entry for bitmap {k}, but {} blocks need only {nr_bitmaps}",
                                root.nr_blocks
                            ),
                        );
                    } else {
                        entries.push((k, e));
                    }
                }
            }
        }
    }

    // Bitmaps: one reference each, from their index entry.
    let mut bitmaps = BTreeMap::new();
    for (i, e) in entries {
        let st = which.bitmap(i);
        if !ctx.count_ref(e.blocknr, st, "bitmap") || !ctx.claim(e.blocknr, which.bitmap_use(), st) {
            continue;
        }
        match ctx.reader.read_as(e.blocknr, BlockKind::Bitmap) {
            Ok(_) => {
                bitmaps.insert(i, e);
            }
            Err(f) => ctx.problem(Severity::Damage, st, Some(e.blocknr), f.to_string()),
        }
    }
    let present = bitmaps.len() as u64;
    let complete = present == nr_bitmaps;
    if !complete {
        ctx.problem(
            Severity::Damage,
            whole,
            None,
            format!("{} of the {nr_bitmaps} bitmaps are missing or unreadable", nr_bitmaps - present),
        );
    }

    // Overflow tree: counts of blocks whose bitmap entry is 3.
    let (st, kind) = which.overflow();
    let s = ctx.walk_root(root.ref_count_root, kind, st);
    let mut overflow = BTreeMap::new();
    if s.ok {
        let _ = scan(&mut ctx.reader, root.ref_count_root, kind.value_size(), false, &mut |k, v| {
            overflow.insert(k, le32(v, 0));
            Ok(())
        });
    }
    SpaceMap { which, root, nr_bitmaps, bitmaps, complete, overflow }
}

/// Expected reference counts, per block.
pub(crate) enum Expected<'e> {
    /// Indexed by metadata block number.
    Dense(&'e [u32]),
    /// Data blocks' counts.
    Counts(&'e super::data_counts::DataCounts),
}

/// The low bit of every 2-bit entry of a bitmap word.
const LOW_BITS: u64 = 0x5555_5555_5555_5555;

/// 32 counts as the bitmap word that holds them, if each is below 3
/// (entry `k`'s high bit is the word's bit `2k`, its low bit bit `2k + 1`,
/// as [`bitmap_entry`] reads them).
fn packed_entries(counts: &[u32]) -> Option<u64> {
    let mut word = 0u64;
    for (k, &c) in counts.iter().enumerate() {
        match c {
            0 => {}
            1 => word |= 1 << (2 * k + 1),
            2 => word |= 1 << (2 * k),
            _ => return None,
        }
    }
    Some(word)
}

/// Second pass: reads every bitmap, checks index entries and the root's
/// totals, and compares counts with `expected` (when given).
pub(crate) fn verify_counts(
    ctx: &mut Ctx<'_>,
    sm: &SpaceMap,
    expected: Option<Expected<'_>>,
    max_count_problems: usize,
    check_totals: bool,
) {
    let which = sm.which;
    let whole = which.whole();
    let nr_blocks = sm.root.nr_blocks;
    let mut allocated: u64 = 0;
    let mut mismatches: u64 = 0;
    let mut worst_hidden: Option<Severity> = None;
    let mut threes: Vec<u64> = Vec::new();
    let mut exp = vec![0u32; ENTRIES_PER_BITMAP as usize];

    for (&index, entry) in &sm.bitmaps {
        let st = which.bitmap(index);
        let block = match ctx.reader.read(entry.blocknr) {
            Ok(b) if verify(&b, entry.blocknr, BlockKind::Bitmap).is_ok() => b,
            _ => continue, // reported by `load`
        };
        let base = index.saturating_mul(ENTRIES_PER_BITMAP);
        // Expected counts of this bitmap's blocks.
        exp.iter_mut().for_each(|c| *c = 0);
        match &expected {
            Some(Expected::Dense(v)) => {
                let start = usize::try_from(base).unwrap_or(usize::MAX).min(v.len());
                let end = start.saturating_add(exp.len()).min(v.len());
                exp[..end - start].copy_from_slice(&v[start..end]);
            }
            Some(Expected::Counts(m)) => m.fill(base, &mut exp),
            None => {}
        }
        let mut zeros: u32 = 0;
        let mut covered: u32 = 0;
        let mut first_free: Option<u32> = None;
        let mut junk_beyond = 0u32;
        let mut next = 0u64;
        while next < ENTRIES_PER_BITMAP {
            let e = next;
            next += 1;
            // A word of 32 entries at a time where it settles them all:
            // every entry past the space map's end (only whether each is
            // zero matters), or no entry of 3 and every count as expected.
            if e.is_multiple_of(32) {
                let at = 16 + (e / 32) as usize * 8;
                if let Some(word) = block.get(at..at + 8) {
                    let word = u64::from_le_bytes(word.try_into().expect("8 bytes"));
                    let b0 = base.saturating_add(e);
                    let nonzero = ((word | word >> 1) & LOW_BITS).count_ones();
                    if b0 >= nr_blocks {
                        junk_beyond += nonzero;
                        next = e + 32;
                        continue;
                    }
                    let as_expected = || match expected {
                        None => true,
                        Some(_) => packed_entries(&exp[e as usize..e as usize + 32]) == Some(word),
                    };
                    if b0.saturating_add(32) <= nr_blocks
                        && word & (word >> 1) & LOW_BITS == 0
                        && as_expected()
                    {
                        covered += 32;
                        zeros += 32 - nonzero;
                        allocated += u64::from(nonzero);
                        let free = !(word | word >> 1) & LOW_BITS;
                        if free != 0 {
                            first_free.get_or_insert(e as u32 + free.trailing_zeros() / 2);
                        }
                        next = e + 32;
                        continue;
                    }
                }
            }
            let v = bitmap_entry(&block[..], e);
            let b = base.saturating_add(e);
            if b >= nr_blocks {
                junk_beyond += u32::from(v != 0);
                continue;
            }
            covered += 1;
            if v == 0 {
                zeros += 1;
                first_free.get_or_insert(e as u32);
            } else {
                allocated += 1;
            }
            let on_disk = if v == 3 {
                threes.push(b);
                match sm.overflow.get(&b) {
                    Some(&c) if c >= 3 => c,
                    Some(&c) => {
                        ctx.problem(
                            Severity::Damage,
                            sm.which.overflow().0,
                            Some(b),
                            format!("overflow count {c} for block {b} (must be at least 3)"),
                        );
                        c
                    }
                    None => {
                        ctx.problem(
                            Severity::Damage,
                            sm.which.overflow().0,
                            Some(b),
                            format!(
                                "bitmap says block {b} has 3 or more references, overflow tree has no entry"
                            ),
                        );
                        3
                    }
                }
            } else {
                v
            };
            if expected.is_some() {
                let want = exp[e as usize];
                if on_disk != want {
                    mismatches += 1;
                    // thin_check's classification: a block counted but not
                    // referenced (count 1 or 2 where 0 is expected) is a
                    // leak, harmless to the kernel; anything else is damage.
                    let sev = if want == 0 && on_disk <= 2 { Severity::NonFatal } else { Severity::Damage };
                    if mismatches as usize <= max_count_problems {
                        let what = if sev == Severity::NonFatal { "leaked: " } else { "" };
                        ctx.problem(
                            sev,
                            whole,
                            Some(b),
                            format!("{what}block {b} count on disk {on_disk}, expected {want}"),
                        );
                    } else {
                        worst_hidden = worst_hidden.max(Some(sev));
                    }
                }
            }
        }
        if junk_beyond > 0 {
            ctx.problem(
                Severity::Damage,
                st,
                Some(entry.blocknr),
                format!("{junk_beyond} non-zero entries beyond the space map's {nr_blocks} blocks"),
            );
        }
        // The kernel counts a new bitmap's free entries over all 16320
        // slots, the tools only over those below nr_blocks; accept both.
        let zeros_all = zeros + (ENTRIES_PER_BITMAP as u32 - covered);
        if check_totals && entry.nr_free != zeros && entry.nr_free != zeros_all {
            ctx.problem(
                Severity::Damage,
                st,
                Some(entry.blocknr),
                format!("index entry says {} free entries, bitmap has {zeros}", entry.nr_free),
            );
        }
        if let Some(f) = first_free {
            if check_totals && f < entry.none_free_before {
                ctx.problem(
                    Severity::NonFatal,
                    st,
                    Some(entry.blocknr),
                    format!(
                        "entry {f} is free, below the index entry's none_free_before {}",
                        entry.none_free_before
                    ),
                );
            }
        }
    }
    if let Some(sev) = worst_hidden {
        ctx.problem(
            sev,
            whole,
            None,
            format!("{} more blocks with wrong counts not listed", mismatches as usize - max_count_problems),
        );
    }
    // Overflow entries must shadow bitmap entries of 3.
    let threes: std::collections::BTreeSet<u64> = threes.into_iter().collect();
    let stray: Vec<u64> = sm.overflow.keys().filter(|b| !threes.contains(b)).copied().collect();
    for b in stray.into_iter().take(max_count_problems.max(1)) {
        let known = sm.bitmaps.contains_key(&(b / ENTRIES_PER_BITMAP)) && b < nr_blocks;
        if known {
            ctx.problem(
                Severity::Damage,
                sm.which.overflow().0,
                Some(b),
                format!("overflow entry for block {b}, whose bitmap entry is not 3"),
            );
        } else if b >= nr_blocks {
            ctx.problem(
                Severity::Damage,
                sm.which.overflow().0,
                Some(b),
                format!("overflow entry for block {b}, beyond the space map's {nr_blocks} blocks"),
            );
        }
    }
    if check_totals && sm.complete && allocated != sm.root.nr_allocated {
        ctx.problem(
            Severity::Damage,
            whole,
            None,
            format!("root says {} blocks allocated, bitmaps say {allocated}", sm.root.nr_allocated),
        );
    }
    let _ = sm.nr_bitmaps;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdata::layout::space_map::bitmap_set;
    use proptest::prelude::*;

    proptest! {
        /// A word packed from 32 counts reads back, entry by entry, as
        /// those counts through the checker's own reader; counts of 3 or
        /// more do not pack.
        #[test]
        fn packed_counts_read_back_as_the_bitmap_entries(
            counts in prop::collection::vec(0u32..4, 32),
            word_index in 0usize..510,
        ) {
            let packed = packed_entries(&counts);
            prop_assert_eq!(packed.is_none(), counts.contains(&3));
            let mut block = vec![0u8; crate::pdata::layout::BLOCK_SIZE];
            for (k, &c) in counts.iter().enumerate() {
                bitmap_set(&mut block[16..], (word_index * 32 + k) as u64, c);
            }
            let at = 16 + word_index * 8;
            let word = u64::from_le_bytes(block[at..at + 8].try_into().unwrap());
            if let Some(p) = packed {
                prop_assert_eq!(p, word);
            }
            let nonzero = ((word | word >> 1) & LOW_BITS).count_ones();
            prop_assert_eq!(nonzero as usize, counts.iter().filter(|&&c| c != 0).count());
            prop_assert_eq!(word & (word >> 1) & LOW_BITS == 0, !counts.contains(&3));
            for (k, &c) in counts.iter().enumerate() {
                prop_assert_eq!(bitmap_entry(&block, (word_index * 32 + k) as u64), c);
            }
        }
    }
}
