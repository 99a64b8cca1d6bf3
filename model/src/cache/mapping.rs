//! The cache metadata's mutators and lookups (dm-cache-metadata.c): the
//! mapping array, dirty bits (v1 flags / v2 bitset), the discard bitset,
//! hints, resize, and the target's clean-shutdown sequence.

use super::metadata::{CacheError, CacheMetadata, Result, HINT_ARRAY, MAPPING_ARRAY};
use super::superblock::CacheStats;
use crate::block_device::BlockDevice;
use crate::pdata::bitset::Bitset;
use crate::pdata::layout::cache::*;

/// One cache block's mapping as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// The origin block.
    pub oblock: u64,
    /// The flags (M_VALID, M_DIRTY).
    pub flags: u64,
}

impl Mapping {
    /// Whether the entry maps an origin block.
    pub fn valid(&self) -> bool {
        self.flags & M_VALID != 0
    }
}

/// The most discard blocks the target uses (`MAX_DISCARD_BLOCKS`).
pub const MAX_DISCARD_BLOCKS: u64 = 1 << 14;

/// The target's discard geometry for a cache block size and an origin size
/// (sectors): the cache block size doubled until at most 16384 discard
/// blocks cover the origin, and the number of discard blocks (rounded up).
pub fn discard_geometry(cache_block_size: u64, origin_sectors: u64) -> (u64, u64) {
    let mut size = cache_block_size;
    if origin_sectors > 0 {
        while origin_sectors / size > MAX_DISCARD_BLOCKS {
            size *= 2;
        }
    }
    (size, origin_sectors.div_ceil(size))
}

/// The policy's part of a clean shutdown: name, version, hint size and the
/// hint of every cache block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyHints {
    /// Policy name (1..=15 bytes), e.g. "smq".
    pub name: String,
    /// Policy version, e.g. [2, 0, 0] for smq.
    pub version: [u32; 3],
    /// Hint size in bytes: 0 (no hints) or 4.
    pub hint_size: u32,
    /// The hint of each cache block (read for every block when hint_size is 4).
    pub hints: Vec<u32>,
}

/// What the target saves at a clean shutdown (`sync_metadata`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownState {
    /// The in-core dirty bit of every cache block.
    pub dirty: Vec<bool>,
    /// Discard block size in sectors.
    pub discard_block_size: u64,
    /// The in-core discard bit of every discard block.
    pub discards: Vec<bool>,
    /// The statistics counters.
    pub stats: CacheStats,
    /// The policy's name, version and hints.
    pub policy: PolicyHints,
}

impl<D: BlockDevice> CacheMetadata<D> {
    /// The mapping of `cblock` as stored (`NoData` beyond the cache).
    pub fn mapping(&mut self, cblock: u32) -> Result<Mapping> {
        if self.fail_io {
            return Err(CacheError::FailIo);
        }
        let mut v = [0u8; 8];
        MAPPING_ARRAY.get(&mut self.tm, self.root, cblock, &mut v)?;
        let (oblock, flags) = unpack_mapping(u64::from_le_bytes(v));
        Ok(Mapping { oblock, flags })
    }

    /// The origin block `cblock` maps and whether it is dirty as stored
    /// (v1: the M_DIRTY flag; v2: the dirty bitset, including its unflushed
    /// cached word), or None when unmapped.
    pub fn lookup(&mut self, cblock: u32) -> Result<Option<(u64, bool)>> {
        let m = self.mapping(cblock)?;
        if !m.valid() {
            return Ok(None);
        }
        let dirty = if self.separate_dirty_bits() {
            self.dirty_info.test_bit(&mut self.tm, &mut self.dirty_root, cblock)?
        } else {
            m.flags & M_DIRTY != 0
        };
        Ok(Some((m.oblock, dirty)))
    }

    fn set_mapping(&mut self, cblock: u32, value: u64) -> Result<()> {
        MAPPING_ARRAY.set(&mut self.tm, &mut self.root, cblock, &value.to_le_bytes())?;
        self.changed = true;
        Ok(())
    }

    /// Maps `cblock` to `oblock`, clean (`dm_cache_insert_mapping`).
    pub fn insert_mapping(&mut self, cblock: u32, oblock: u64) -> Result<()> {
        self.write_lock()?;
        self.set_mapping(cblock, pack_mapping(oblock, M_VALID))
    }

    /// Unmaps `cblock` (`dm_cache_remove_mapping`). In v2 its dirty bit is
    /// left as it is, as in the kernel.
    pub fn remove_mapping(&mut self, cblock: u32) -> Result<()> {
        self.write_lock()?;
        self.set_mapping(cblock, pack_mapping(0, 0))
    }

    /// Sets one cache block's dirty state. v1: the kernel's `__dirty` (an
    /// array write only when the flag changes). v2: a bit of the dirty
    /// bitset through its cached word — not a kernel path (6.1 only
    /// rebuilds the whole bitset, [`Self::set_dirty_bits`]), but the same
    /// bitset operations.
    pub fn set_dirty(&mut self, cblock: u32, dirty: bool) -> Result<()> {
        self.write_lock()?;
        if self.separate_dirty_bits() {
            if dirty {
                self.dirty_info.set_bit(&mut self.tm, &mut self.dirty_root, cblock)?;
            } else {
                self.dirty_info.clear_bit(&mut self.tm, &mut self.dirty_root, cblock)?;
            }
            self.changed = true;
            return Ok(());
        }
        self.dirty_v1(cblock, dirty)
    }

    fn dirty_v1(&mut self, cblock: u32, dirty: bool) -> Result<()> {
        let m = self.mapping(cblock)?;
        if (m.flags & M_DIRTY != 0) == dirty {
            return Ok(());
        }
        let flags = (m.flags & !M_DIRTY) | if dirty { M_DIRTY } else { 0 };
        self.set_mapping(cblock, pack_mapping(m.oblock, flags))
    }

    /// Saves the in-core dirty bits (`dm_cache_set_dirty_bits`): v1 walks
    /// every cache block through `__dirty`; v2 deletes the dirty bitset and
    /// builds a new one.
    pub fn set_dirty_bits(&mut self, bits: &[bool]) -> Result<()> {
        self.write_lock()?;
        if !self.separate_dirty_bits() {
            for (i, &d) in bits.iter().enumerate() {
                self.dirty_v1(i as u32, d)?;
            }
            return Ok(());
        }
        if bits.len() != self.cache_blocks as usize {
            return Err(CacheError::DirtyBitsSize { given: bits.len(), cache_blocks: self.cache_blocks });
        }
        // The rebuilt bitset supersedes any word cached by set_dirty (the
        // kernel never caches a dirty-bitset word).
        self.dirty_info.forget();
        Bitset::del(&mut self.tm, self.dirty_root)?;
        self.changed = true;
        self.dirty_root = Bitset::new_bitset(&mut self.tm, bits.len() as u32, |i| Ok(bits[i as usize]))?;
        Ok(())
    }

    /// Whether every cache block in `begin..end` is unmapped or clean
    /// (`blocks_are_unmapped_or_clean`); the first dirty one otherwise.
    /// v2 reads the stored bitset (the kernel's cursor ignores the cached
    /// word, which the kernel never has for the dirty bitset; a word cached
    /// by the model-only [`Self::set_dirty`] is written back first).
    pub fn first_dirty(&mut self, begin: u32, end: u32) -> Result<Option<u32>> {
        if self.separate_dirty_bits() {
            if self.cache_blocks == 0 {
                return Ok(None);
            }
            self.dirty_info.flush(&mut self.tm, &mut self.dirty_root)?;
            let bits = Bitset::read_bits(&mut self.tm, self.dirty_root, self.cache_blocks)?;
            return Ok((begin..end).find(|&b| bits.get(b as usize).copied().unwrap_or(false)));
        }
        for b in begin..end {
            let m = self.mapping(b)?;
            if m.valid() && m.flags & M_DIRTY != 0 {
                return Ok(Some(b));
            }
        }
        Ok(None)
    }

    /// Resizes the cache to `new_cache_blocks` (`dm_cache_resize`): refused
    /// if a dropped block is mapped and dirty as stored (v1: the mapping's
    /// flags; v2: the dirty bitset alone, whatever the mapping); the
    /// mapping array (and v2 dirty bitset) grow with unmapped / clean
    /// entries, or lose their tail (clean mappings in it are simply
    /// dropped: their data is on the origin).
    pub fn resize(&mut self, new_cache_blocks: u32) -> Result<()> {
        self.write_lock()?;
        let old = self.cache_blocks;
        // The deliberate bug `cache-shrink-drops-dirty` skips the check.
        if new_cache_blocks < old && !self.mutations().cache_shrink_drops_dirty {
            if let Some(b) = self.first_dirty(new_cache_blocks, old)? {
                return Err(CacheError::ShrinkDirty(b));
            }
        }
        let null = pack_mapping(0, 0).to_le_bytes();
        self.root = MAPPING_ARRAY.resize(&mut self.tm, self.root, old, new_cache_blocks, &null)?;
        if self.separate_dirty_bits() {
            self.dirty_root = Bitset::resize(&mut self.tm, self.dirty_root, old, new_cache_blocks, false)?;
        }
        self.cache_blocks = new_cache_blocks;
        self.changed = true;
        Ok(())
    }

    /// Resizes the discard bitset (`dm_cache_discard_bitset_resize`); new
    /// bits are clear.
    pub fn discard_bitset_resize(&mut self, discard_block_size: u64, nr_blocks: u64) -> Result<()> {
        self.write_lock()?;
        let r = Bitset::resize(
            &mut self.tm,
            self.discard_root,
            self.discard_nr_blocks as u32,
            nr_blocks as u32,
            false,
        );
        if let Ok(root) = r {
            self.discard_root = root;
            self.discard_block_size = discard_block_size;
            self.discard_nr_blocks = nr_blocks;
        }
        self.changed = true;
        Ok(r.map(|_| ())?)
    }

    /// Sets or clears discard block `dblock`'s bit through the bitset's
    /// cached word (`dm_cache_set_discard`).
    pub fn set_discard(&mut self, dblock: u64, discarded: bool) -> Result<()> {
        self.write_lock()?;
        let b = dblock as u32;
        if discarded {
            self.discard_info.set_bit(&mut self.tm, &mut self.discard_root, b)?;
        } else {
            self.discard_info.clear_bit(&mut self.tm, &mut self.discard_root, b)?;
        }
        self.changed = true;
        Ok(())
    }

    /// The discard bits as the target loads them (`dm_cache_load_discards`):
    /// the stored bits after flushing the cached word if the metadata was
    /// clean when opened, else all clear.
    pub fn load_discards(&mut self) -> Result<Vec<bool>> {
        let n = self.discard_nr_blocks as u32;
        if n == 0 {
            return Ok(Vec::new());
        }
        if !self.clean_when_opened {
            return Ok(vec![false; n as usize]);
        }
        self.discard_info.flush(&mut self.tm, &mut self.discard_root)?;
        Ok(Bitset::read_bits(&mut self.tm, self.discard_root, n)?)
    }

    /// Rebuilds the hint array (`dm_cache_write_hints`): stores the policy
    /// name and version; with a hint size of 4, deletes the old array and
    /// builds a new one of `cache_blocks` hints.
    pub fn write_hints(&mut self, policy: &PolicyHints) -> Result<()> {
        self.write_lock()?;
        if policy.name.is_empty() || policy.name.len() > POLICY_NAME_SIZE - 1 {
            return Err(CacheError::PolicyName(policy.name.clone()));
        }
        self.policy_name = [0; POLICY_NAME_SIZE];
        self.policy_name[..policy.name.len()].copy_from_slice(policy.name.as_bytes());
        self.policy_version = policy.version;
        if policy.hint_size == 0 {
            return Ok(());
        }
        self.policy_hint_size = policy.hint_size;
        if self.hint_root != 0 {
            HINT_ARRAY.del(&mut self.tm, self.hint_root)?;
        }
        let hints = &policy.hints;
        self.hint_root = HINT_ARRAY.new_array(&mut self.tm, self.cache_blocks, |i, v| {
            v.copy_from_slice(&hints.get(i as usize).copied().unwrap_or(0).to_le_bytes());
            Ok(())
        })?;
        Ok(())
    }

    /// The stored hint of every cache block (empty without a hint array).
    pub fn hints(&mut self) -> Result<Vec<u32>> {
        if self.hint_root == 0 || self.policy_hint_size == 0 {
            return Ok(Vec::new());
        }
        let vals = HINT_ARRAY.values(&mut self.tm, self.hint_root)?;
        Ok(vals.iter().map(|v| u32::from_le_bytes(v[..4].try_into().expect("4 bytes"))).collect())
    }

    /// The target's clean shutdown (`sync_metadata` in dm-cache-target.c):
    /// dirty bits, discard bitset (resize, then every bit), stats, hints,
    /// then a commit with CLEAN_SHUTDOWN set. The first failure is
    /// returned at once, nothing after it written and nothing committed:
    /// in 6.1 each of those writes that fails goes through
    /// `metadata_operation_failed` (the transaction aborted, the cache
    /// read-only), so the writes after it and the commit are refused with
    /// `-EINVAL` (`sync_metadata`'s comment that it "still commits" is
    /// older than that). The caller aborts and goes read-only.
    pub fn clean_shutdown(&mut self, s: &ShutdownState) -> Result<()> {
        self.set_dirty_bits(&s.dirty)?;
        self.write_discard_bitset(s)?;
        let _ = self.set_stats(s.stats);
        self.write_hints(&s.policy)?;
        self.commit(true)
    }

    fn write_discard_bitset(&mut self, s: &ShutdownState) -> Result<()> {
        self.discard_bitset_resize(s.discard_block_size, s.discards.len() as u64)?;
        for (i, &d) in s.discards.iter().enumerate() {
            self.set_discard(i as u64, d)?;
        }
        Ok(())
    }
}
