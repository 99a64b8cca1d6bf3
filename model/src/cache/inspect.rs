//! Read-only access to a cache metadata image: every structure decoded and
//! the blocks each one occupies, for checkers, dumps and tests. Nothing is
//! written and the space map is not opened, so damaged images can be read
//! as far as they go.

use super::mapping::Mapping;
use super::metadata::{CacheError, Result, MAPPING_ARRAY};
use super::superblock::CacheSuperblock;
use crate::block_device::BlockDevice;
use crate::pdata::array::{ArrayBlocks, ArrayInfo};
use crate::pdata::bitset::{Bitset, WORDS};
use crate::pdata::layout::cache::{unpack_mapping, SUPERBLOCK_LOCATION};
use crate::pdata::layout::BlockKind;
use crate::pdata::transaction::TransactionManager;

/// The blocks of each structure (superblock and space map excluded).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StructureBlocks {
    /// The mapping array.
    pub mapping: ArrayBlocks,
    /// The hint array, if there is one.
    pub hint: Option<ArrayBlocks>,
    /// The discard bitset.
    pub discard: ArrayBlocks,
    /// The dirty bitset (version 2).
    pub dirty: Option<ArrayBlocks>,
}

impl StructureBlocks {
    /// Every block of every structure (btree nodes and array blocks), in
    /// the order mapping, hint, discard, dirty; a block referenced twice
    /// appears twice. With the superblock and the space map's own blocks
    /// these are all the blocks a consistent image allocates, each once.
    pub fn all(&self) -> Vec<u64> {
        [Some(&self.mapping), self.hint.as_ref(), Some(&self.discard), self.dirty.as_ref()]
            .into_iter()
            .flatten()
            .flat_map(|a| a.nodes.iter().chain(&a.ablocks).copied())
            .collect()
    }
}

/// A cache metadata image, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheImage {
    /// Block 0.
    pub superblock: CacheSuperblock,
    /// Every entry of the mapping array, by cache block.
    pub mappings: Vec<Mapping>,
    /// Every hint (raw bytes of `policy_hint_size`, 4 when that is 0), when
    /// a hint array exists (`hint_root` non-zero).
    pub hints: Option<Vec<Vec<u8>>>,
    /// The first `discard_nr_blocks` bits of the discard bitset.
    pub discards: Vec<bool>,
    /// The first `cache_blocks` bits of the dirty bitset (version 2).
    pub dirty: Option<Vec<bool>>,
    /// Where each structure is.
    pub blocks: StructureBlocks,
}

impl CacheImage {
    /// Whether cache block `cblock` is dirty as stored: the M_DIRTY flag in
    /// version 1, the dirty bitset in version 2.
    pub fn is_dirty(&self, cblock: usize) -> bool {
        match &self.dirty {
            Some(bits) => bits.get(cblock).copied().unwrap_or(false),
            None => self.mappings[cblock].flags & crate::pdata::layout::cache::M_DIRTY != 0,
        }
    }
}

/// Reads and decodes the whole image. The superblock must check (checksum,
/// location, magic, version); every array block and btree node read is
/// checked too.
pub fn read_image<D: BlockDevice>(dev: &mut D) -> Result<CacheImage> {
    let mut tm = TransactionManager::unopened(dev);
    let raw = *tm.block_manager().read_raw(SUPERBLOCK_LOCATION)?;
    let sb = CacheSuperblock::decode(&raw);
    if sb.magic != crate::pdata::layout::cache::SUPERBLOCK_MAGIC {
        return Err(CacheError::BadSuperblock(sb.problems(true).expect("bad magic")));
    }
    tm.read(SUPERBLOCK_LOCATION, BlockKind::CacheSuperblock)?;
    if let Some(p) = sb.problems(true) {
        return Err(CacheError::BadSuperblock(p));
    }
    let mut blocks =
        StructureBlocks { mapping: MAPPING_ARRAY.blocks(&mut tm, sb.mapping_root)?, ..Default::default() };
    // Decoded as walked: no value is copied out first.
    let mut mappings = Vec::new();
    MAPPING_ARRAY.walk(&mut tm, sb.mapping_root, &mut |_, v| {
        let (oblock, flags) = unpack_mapping(u64::from_le_bytes(v[..8].try_into().expect("8 bytes")));
        mappings.push(Mapping { oblock, flags });
        Ok(())
    })?;
    let hints = if sb.hint_root != 0 {
        // The kernel builds 4-byte hint arrays only; 0.9.0's cache_restore
        // leaves policy_hint_size 0 beside a hint array of 4-byte hints.
        let width = if sb.policy_hint_size == 0 { 4 } else { sb.policy_hint_size };
        let info = ArrayInfo::new(width as usize);
        blocks.hint = Some(info.blocks(&mut tm, sb.hint_root)?);
        Some(info.values(&mut tm, sb.hint_root)?)
    } else {
        None
    };
    blocks.discard = WORDS.blocks(&mut tm, sb.discard_root)?;
    let discards = Bitset::read_bits(&mut tm, sb.discard_root, sb.discard_nr_blocks as u32)?;
    let dirty = if sb.separate_dirty_bits() {
        blocks.dirty = Some(WORDS.blocks(&mut tm, sb.dirty_root)?);
        Some(Bitset::read_bits(&mut tm, sb.dirty_root, sb.cache_blocks)?)
    } else {
        None
    };
    Ok(CacheImage { superblock: sb, mappings, hints, discards, dirty, blocks })
}
