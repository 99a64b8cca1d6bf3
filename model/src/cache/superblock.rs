//! The dm-cache superblock (block 0, spec §4.1): every field, decoded.

use crate::pdata::layout::cache::*;
use crate::pdata::layout::space_map::{SmRoot, ROOT_AREA_SIZE};
use crate::pdata::layout::{get_u32, get_u64};

/// The statistics counters kept in the superblock (saved at clean shutdown).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Reads served from the cache.
    pub read_hits: u32,
    /// Reads that missed.
    pub read_misses: u32,
    /// Writes to cached blocks.
    pub write_hits: u32,
    /// Writes that missed.
    pub write_misses: u32,
}

/// Every field of a cache superblock (`struct cache_disk_superblock`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheSuperblock {
    /// Checksum as stored.
    pub csum: u32,
    /// CLEAN_SHUTDOWN (bit 0), NEEDS_CHECK (bit 1).
    pub flags: u32,
    /// Self location (0).
    pub blocknr: u64,
    /// Never set by the kernel (zero).
    pub uuid: [u8; 16],
    /// [`SUPERBLOCK_MAGIC`].
    pub magic: u64,
    /// Metadata version, 1 or 2.
    pub version: u32,
    /// Policy name, NUL padded (empty until the first hint write).
    pub policy_name: [u8; POLICY_NAME_SIZE],
    /// Bytes of hint per cache block (4 for smq; 0 until written).
    pub policy_hint_size: u32,
    /// The metadata space map root (first 32 of 128 bytes).
    pub metadata_sm_root: SmRoot,
    /// The 128-byte area holding the space map root, as stored.
    pub metadata_sm_root_area: [u8; ROOT_AREA_SIZE],
    /// Root of the mapping array.
    pub mapping_root: u64,
    /// Root of the hint array, 0 for none.
    pub hint_root: u64,
    /// Root of the discard bitset.
    pub discard_root: u64,
    /// Discard block size in sectors.
    pub discard_block_size: u64,
    /// Bits in the discard bitset.
    pub discard_nr_blocks: u64,
    /// Cache block size in sectors.
    pub data_block_size: u32,
    /// Metadata block size in sectors (8).
    pub metadata_block_size: u32,
    /// Cache blocks (length of the mapping array).
    pub cache_blocks: u32,
    /// Compatible feature flags.
    pub compat_flags: u32,
    /// Read-only-compatible feature flags.
    pub compat_ro_flags: u32,
    /// Incompatible feature flags.
    pub incompat_flags: u32,
    /// The statistics.
    pub stats: CacheStats,
    /// Policy version (major, minor, patch).
    pub policy_version: [u32; 3],
    /// Root of the dirty bitset (version 2 only; read as stored otherwise).
    pub dirty_root: u64,
}

impl CacheSuperblock {
    /// Decodes block 0 (no checks; see [`CacheSuperblock::problems`]).
    pub fn decode(b: &[u8]) -> Self {
        CacheSuperblock {
            csum: get_u32(b, 0),
            flags: get_u32(b, SB_FLAGS),
            blocknr: get_u64(b, SB_BLOCKNR),
            uuid: b[SB_UUID..SB_UUID + 16].try_into().expect("16 bytes"),
            magic: get_u64(b, SB_MAGIC),
            version: get_u32(b, SB_VERSION),
            policy_name: b[SB_POLICY_NAME..SB_POLICY_NAME + POLICY_NAME_SIZE].try_into().expect("16 bytes"),
            policy_hint_size: get_u32(b, SB_POLICY_HINT_SIZE),
            metadata_sm_root: SmRoot::decode(&b[SB_METADATA_SM_ROOT..]),
            metadata_sm_root_area: b[SB_METADATA_SM_ROOT..SB_METADATA_SM_ROOT + ROOT_AREA_SIZE]
                .try_into()
                .expect("128 bytes"),
            mapping_root: get_u64(b, SB_MAPPING_ROOT),
            hint_root: get_u64(b, SB_HINT_ROOT),
            discard_root: get_u64(b, SB_DISCARD_ROOT),
            discard_block_size: get_u64(b, SB_DISCARD_BLOCK_SIZE),
            discard_nr_blocks: get_u64(b, SB_DISCARD_NR_BLOCKS),
            data_block_size: get_u32(b, SB_DATA_BLOCK_SIZE),
            metadata_block_size: get_u32(b, SB_METADATA_BLOCK_SIZE),
            cache_blocks: get_u32(b, SB_CACHE_BLOCKS),
            compat_flags: get_u32(b, SB_COMPAT_FLAGS),
            compat_ro_flags: get_u32(b, SB_COMPAT_RO_FLAGS),
            incompat_flags: get_u32(b, SB_INCOMPAT_FLAGS),
            stats: CacheStats {
                read_hits: get_u32(b, SB_READ_HITS),
                read_misses: get_u32(b, SB_READ_MISSES),
                write_hits: get_u32(b, SB_WRITE_HITS),
                write_misses: get_u32(b, SB_WRITE_MISSES),
            },
            policy_version: [
                get_u32(b, SB_POLICY_VERSION),
                get_u32(b, SB_POLICY_VERSION + 4),
                get_u32(b, SB_POLICY_VERSION + 8),
            ],
            dirty_root: get_u64(b, SB_DIRTY_ROOT),
        }
    }

    /// The policy name up to its first NUL, lossily as UTF-8.
    pub fn policy_name_str(&self) -> String {
        policy_name_str(&self.policy_name)
    }

    /// Whether the last close was clean.
    pub fn clean_shutdown(&self) -> bool {
        self.flags & CLEAN_SHUTDOWN != 0
    }

    /// Whether NEEDS_CHECK is set.
    pub fn needs_check(&self) -> bool {
        self.flags & NEEDS_CHECK != 0
    }

    /// Whether the mapping array's dirty flags are replaced by a separate
    /// dirty bitset (metadata version 2).
    pub fn separate_dirty_bits(&self) -> bool {
        self.version >= 2
    }

    /// What the kernel's superblock validator and open path refuse, in its
    /// order (magic, version, then feature flags), or None. `read_only`
    /// allows unknown read-only-compatible features.
    pub fn problems(&self, read_only: bool) -> Option<String> {
        if self.magic != SUPERBLOCK_MAGIC {
            return Some(format!("bad magic {:#x} (expected {:#x})", self.magic, SUPERBLOCK_MAGIC));
        }
        if !(MIN_VERSION..=MAX_VERSION).contains(&self.version) {
            return Some(format!(
                "metadata version {} found, only versions {MIN_VERSION} to {MAX_VERSION} are supported",
                self.version
            ));
        }
        let incompat = self.incompat_flags & !INCOMPAT_SUPPORTED;
        if incompat != 0 {
            return Some(format!("unsupported incompatible features {incompat:#x}"));
        }
        let compat_ro = self.compat_ro_flags & !COMPAT_RO_SUPPORTED;
        if !read_only && compat_ro != 0 {
            return Some(format!(
                "unsupported read-only-compatible features {compat_ro:#x} (open read-only)"
            ));
        }
        None
    }
}

/// A NUL-padded name up to its first NUL, lossily as UTF-8.
pub fn policy_name_str(name: &[u8]) -> String {
    let end = name.iter().position(|&c| c == 0).unwrap_or(name.len());
    String::from_utf8_lossy(&name[..end]).into_owned()
}
