//! Seeded workloads of dm-cache metadata operations, as the cache target
//! performs them (dm-cache-target.c through dm-cache-metadata.c).
//!
//! The generator keeps the target's own invariants, because the metadata
//! checker holds the image to them: a cache block is inserted only while
//! unmapped and for an origin block no other cache block maps; only mapped
//! blocks are dirty, and a block is cleaned before it is unmapped (the
//! target writes a dirty block back before demoting it).

use rand::Rng;

/// One step of a cache metadata workload. Cache and origin blocks are
/// drawn as fractions (`pick`, in millionths) and resolved against the
/// state when the step runs, so that a workload stays meaningful whatever
/// the earlier steps did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheOp {
    /// A promotion: an unmapped cache block starts caching an origin block
    /// (`dm_cache_insert_mapping`).
    Insert {
        /// Which unmapped cache block (fraction of them).
        cblock: u32,
        /// Which origin block (fraction of the origin).
        oblock: u32,
    },
    /// A demotion or invalidation of a mapped block: cleaned if dirty
    /// (writeback), then unmapped (`dm_cache_remove_mapping`).
    Remove {
        /// Which mapped cache block (fraction of them).
        pick: u32,
    },
    /// A write hit makes a mapped block dirty, or a writeback cleans it
    /// (v1: the mapping's flag; v2: the dirty bitset).
    SetDirty {
        /// Which mapped cache block (fraction of them).
        pick: u32,
        /// Dirty or clean.
        dirty: bool,
    },
    /// The whole dirty bitset saved at once (`dm_cache_set_dirty_bits`):
    /// each mapped block dirty with the given chance (percent).
    SetDirtyBits {
        /// Percent of mapped blocks dirty.
        percent: u32,
        /// Seed of the choice.
        seed: u64,
    },
    /// A discard marks or clears a discard block (`dm_cache_set_discard`).
    SetDiscard {
        /// Which discard block (fraction of them).
        pick: u32,
        /// Set or clear.
        discarded: bool,
    },
    /// The policy's hints are saved (`dm_cache_write_hints`).
    SaveHints {
        /// Seed of the hint values.
        seed: u64,
    },
    /// The statistics counters move on.
    BumpStats,
    /// The cache device is resized (`dm_cache_resize`); a shrink over
    /// dirty blocks is refused, as the kernel refuses it.
    Resize {
        /// New size in percent of the current one (50..=150).
        percent: u32,
    },
    /// A commit (periodic, or for a FLUSH/FUA bio).
    Commit,
    /// A metadata error: the transaction is aborted (`dm_cache_metadata_abort`)
    /// and the metadata reopened from the last commit.
    Abort,
    /// Suspend: the target's clean shutdown (dirty bits, discards, stats,
    /// hints, a commit with CLEAN_SHUTDOWN), the table is reloaded and the
    /// metadata opened again (which clears CLEAN_SHUTDOWN in place).
    CleanShutdownAndReopen,
}

/// A fraction of `n` items given in millionths: an index below `n`.
pub fn resolve(fraction: u32, n: usize) -> usize {
    ((u64::from(fraction) * n as u64) / 1_000_000) as usize
}

/// A workload of `len` operations drawn from `rng`.
pub fn generate(rng: &mut impl Rng, len: usize) -> Vec<CacheOp> {
    let f = |rng: &mut dyn rand::RngCore| rng.gen_range(0..1_000_000u32);
    (0..len)
        .map(|_| match rng.gen_range(0..100) {
            0..=29 => CacheOp::Insert { cblock: f(rng), oblock: f(rng) },
            30..=41 => CacheOp::Remove { pick: f(rng) },
            42..=53 => CacheOp::SetDirty { pick: f(rng), dirty: rng.gen_bool(0.7) },
            54..=56 => CacheOp::SetDirtyBits { percent: rng.gen_range(0..=100), seed: rng.gen() },
            57..=64 => CacheOp::SetDiscard { pick: f(rng), discarded: rng.gen_bool(0.7) },
            65..=68 => CacheOp::SaveHints { seed: rng.gen() },
            69..=70 => CacheOp::BumpStats,
            71..=74 => CacheOp::Resize { percent: rng.gen_range(50..=150) },
            75..=90 => CacheOp::Commit,
            91..=94 => CacheOp::Abort,
            _ => CacheOp::CleanShutdownAndReopen,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn workloads_are_reproducible_and_use_every_operation() {
        let a = generate(&mut ChaCha8Rng::seed_from_u64(3), 2000);
        let b = generate(&mut ChaCha8Rng::seed_from_u64(3), 2000);
        assert_eq!(a, b);
        let kinds: std::collections::BTreeSet<String> =
            a.iter().map(|op| format!("{op:?}").split([' ', '{']).next().unwrap_or("").to_string()).collect();
        assert_eq!(kinds.len(), 11, "every kind of operation appears");
    }

    #[test]
    fn resolve_stays_in_range() {
        assert_eq!(resolve(0, 10), 0);
        assert_eq!(resolve(999_999, 10), 9);
        assert_eq!(resolve(500_000, 1), 0);
    }
}
