//! On-disk layouts of persistent-data and thin-pool metadata (kernel 6.1),
//! as byte offsets and small codecs. The single source of these facts for
//! the writer (the model) and the reader (the checker, the dumper).
//!
//! All integers are little-endian. See `shared/dm-format-spec.md` §1–§2.

use std::fmt;

use super::checksum;

/// Bytes in a metadata block.
pub const BLOCK_SIZE: usize = 4096;
/// Sectors in a metadata block.
pub const BLOCK_SECTORS: u64 = 8;

/// Reads a little-endian u32 at `off`.
pub fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
/// Reads a little-endian u64 at `off`.
pub fn get_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}
/// Writes a little-endian u32 at `off`.
pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
/// Writes a little-endian u64 at `off`.
pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// The kinds of metadata block, each with its own checksum salt and the
/// offset of its self-location field (the kernel's validators).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BlockKind {
    /// The thin-pool superblock (block 0, and metadata-snapshot copies).
    ThinSuperblock,
    /// A btree node, internal or leaf.
    BtreeNode,
    /// A space-map bitmap block.
    Bitmap,
    /// The metadata space map's index block.
    MetadataIndex,
    /// A dm-array block.
    Array,
    /// The dm-cache superblock.
    CacheSuperblock,
}

impl BlockKind {
    /// The checksum salt of this kind.
    pub fn salt(self) -> u32 {
        match self {
            BlockKind::ThinSuperblock => checksum::THIN_SUPERBLOCK_SALT,
            BlockKind::BtreeNode => checksum::BTREE_NODE_SALT,
            BlockKind::Bitmap => checksum::BITMAP_SALT,
            BlockKind::MetadataIndex => checksum::INDEX_SALT,
            BlockKind::Array => checksum::ARRAY_SALT,
            BlockKind::CacheSuperblock => checksum::CACHE_SUPERBLOCK_SALT,
        }
    }

    /// Offset of the u64 field holding the block's own location.
    pub fn blocknr_offset(self) -> usize {
        match self {
            BlockKind::Array => 16,
            _ => 8,
        }
    }

    /// Stamps the block's location and checksum, as the kernel's
    /// `prepare_for_write` hooks do just before the block goes to disk.
    pub fn prepare_for_write(self, block: &mut [u8], location: u64) {
        put_u64(block, self.blocknr_offset(), location);
        checksum::seal(block, self.salt());
    }
}

impl fmt::Display for BlockKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlockKind::ThinSuperblock => "thin superblock",
            BlockKind::BtreeNode => "btree node",
            BlockKind::Bitmap => "space map bitmap",
            BlockKind::MetadataIndex => "metadata space map index",
            BlockKind::Array => "array",
            BlockKind::CacheSuperblock => "cache superblock",
        })
    }
}

/// Btree node layout (spec §1.3–1.4).
pub mod node {
    /// Header flag: internal node (values are child block numbers).
    pub const INTERNAL: u32 = 1;
    /// Header flag: leaf node.
    pub const LEAF: u32 = 2;
    /// Size of the node header.
    pub const HEADER_SIZE: usize = 32;
    /// Offset of the flags field.
    pub const FLAGS: usize = 4;
    /// Offset of the self-location field.
    pub const BLOCKNR: usize = 8;
    /// Offset of nr_entries.
    pub const NR_ENTRIES: usize = 16;
    /// Offset of max_entries.
    pub const MAX_ENTRIES: usize = 20;
    /// Offset of value_size.
    pub const VALUE_SIZE: usize = 24;

    /// The kernel's capacity rule: the largest multiple of three entries of
    /// `value_size` bytes (plus an 8-byte key) that fits after the header.
    pub fn max_entries_for(value_size: usize) -> u32 {
        let fit = (super::BLOCK_SIZE - HEADER_SIZE) / (8 + value_size);
        (3 * (fit / 3)) as u32
    }

    /// Offset of key `i`.
    pub fn key_offset(i: usize) -> usize {
        HEADER_SIZE + 8 * i
    }

    /// Offset of value `i` in a node with `max_entries` slots.
    pub fn value_offset(max_entries: usize, value_size: usize, i: usize) -> usize {
        HEADER_SIZE + 8 * max_entries + value_size * i
    }
}

/// Space-map layout (spec §1.10).
pub mod space_map {
    use super::{get_u32, get_u64, put_u32, put_u64};

    /// Bytes of the bitmap block header (csum, not_used, blocknr).
    pub const BITMAP_HEADER_SIZE: usize = 16;
    /// Reference counts held by one bitmap block (two bits each).
    pub const ENTRIES_PER_BITMAP: u64 = ((super::BLOCK_SIZE - BITMAP_HEADER_SIZE) * 4) as u64;
    /// Bytes of the metadata index block header.
    pub const INDEX_HEADER_SIZE: usize = 16;
    /// Index entries in the metadata index block.
    pub const MAX_METADATA_BITMAPS: usize = 255;
    /// The largest metadata device the metadata space map can track.
    pub const MAX_METADATA_BLOCKS: u64 = MAX_METADATA_BITMAPS as u64 * ENTRIES_PER_BITMAP;
    /// Bytes of a space-map root as stored in a superblock.
    pub const ROOT_SIZE: usize = 32;
    /// Bytes reserved for a space-map root in a superblock.
    pub const ROOT_AREA_SIZE: usize = 128;
    /// Bytes of an index entry.
    pub const INDEX_ENTRY_SIZE: usize = 16;
    /// Value size of overflow (reference count) tree entries.
    pub const REF_COUNT_VALUE_SIZE: usize = 4;

    /// One bitmap's index entry.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct IndexEntry {
        /// Where the bitmap block is.
        pub blocknr: u64,
        /// Entries of the bitmap whose count is zero.
        pub nr_free: u32,
        /// A hint: no free entry below this one.
        pub none_free_before: u32,
    }

    impl IndexEntry {
        /// Decodes 16 bytes.
        pub fn decode(b: &[u8]) -> Self {
            IndexEntry { blocknr: get_u64(b, 0), nr_free: get_u32(b, 8), none_free_before: get_u32(b, 12) }
        }
        /// Encodes into 16 bytes.
        pub fn encode(&self, b: &mut [u8]) {
            put_u64(b, 0, self.blocknr);
            put_u32(b, 8, self.nr_free);
            put_u32(b, 12, self.none_free_before);
        }
        /// The 16 encoded bytes.
        pub fn to_bytes(&self) -> [u8; 16] {
            let mut b = [0; 16];
            self.encode(&mut b);
            b
        }
    }

    /// A space map's root as kept in a superblock.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct SmRoot {
        /// Blocks tracked.
        pub nr_blocks: u64,
        /// Blocks whose count is non-zero.
        pub nr_allocated: u64,
        /// Data sm: root of the bitmap index tree; metadata sm: index block.
        pub bitmap_root: u64,
        /// Root of the overflow reference count tree.
        pub ref_count_root: u64,
    }

    impl SmRoot {
        /// Decodes 32 bytes.
        pub fn decode(b: &[u8]) -> Self {
            SmRoot {
                nr_blocks: get_u64(b, 0),
                nr_allocated: get_u64(b, 8),
                bitmap_root: get_u64(b, 16),
                ref_count_root: get_u64(b, 24),
            }
        }
        /// Encodes into 32 bytes.
        pub fn encode(&self, b: &mut [u8]) {
            put_u64(b, 0, self.nr_blocks);
            put_u64(b, 8, self.nr_allocated);
            put_u64(b, 16, self.bitmap_root);
            put_u64(b, 24, self.ref_count_root);
        }
    }

    /// The two-bit count of `entry` in a bitmap block's data area (the block
    /// without its 16-byte header): 0, 1, 2, or 3 meaning "see the overflow
    /// tree". The kernel stores the count's high bit in the lower-numbered
    /// bit of the pair.
    pub fn bitmap_get(data: &[u8], entry: u64) -> u32 {
        let bit = 2 * entry as usize;
        let hi = (data[bit / 8] >> (bit % 8)) & 1;
        let lo = (data[(bit + 1) / 8] >> ((bit + 1) % 8)) & 1;
        u32::from((hi << 1) | lo)
    }

    /// Sets the two-bit count of `entry` (`value` 0..=3).
    pub fn bitmap_set(data: &mut [u8], entry: u64, value: u32) {
        let bit = 2 * entry as usize;
        for (b, on) in [(bit, value & 2 != 0), (bit + 1, value & 1 != 0)] {
            if on {
                data[b / 8] |= 1 << (b % 8);
            } else {
                data[b / 8] &= !(1 << (b % 8));
            }
        }
    }

    /// Whether the 64-bit word holding `entry` counts as fully used in the
    /// kernel's free-block scan. This is the kernel's carry trick, kept as
    /// the same arithmetic so that the scan skips exactly the same words.
    pub fn bitmap_word_full(data: &[u8], entry: u64) -> bool {
        const HIGH: u64 = 0xAAAA_AAAA_AAAA_AAAA;
        let w = (entry / 32) as usize * 8;
        let word = u64::from_le_bytes(data[w..w + 8].try_into().expect("8 bytes"));
        let mask = word.wrapping_add(HIGH).wrapping_add(1) & HIGH;
        !word & mask == 0
    }
}

/// Thin-pool superblock and value layouts (spec §2).
pub mod thin {
    use super::{get_u32, get_u64, put_u32, put_u64};

    /// The superblock's magic number, compared as a u64.
    pub const SUPERBLOCK_MAGIC: u64 = 27_022_010;
    /// The metadata version the kernel writes.
    pub const METADATA_VERSION: u32 = 2;
    /// Superblock flag: the pool needs checking.
    pub const NEEDS_CHECK: u32 = 1;
    /// The superblock lives in block 0.
    pub const SUPERBLOCK_LOCATION: u64 = 0;
    /// Largest thin device id the pool messages accept (24 bits).
    pub const MAX_DEV_ID: u64 = (1 << 24) - 1;

    /// Offset of flags.
    pub const SB_FLAGS: usize = 4;
    /// Offset of blocknr.
    pub const SB_BLOCKNR: usize = 8;
    /// Offset of the 16-byte uuid.
    pub const SB_UUID: usize = 16;
    /// Offset of magic.
    pub const SB_MAGIC: usize = 32;
    /// Offset of version.
    pub const SB_VERSION: usize = 40;
    /// Offset of time.
    pub const SB_TIME: usize = 44;
    /// Offset of trans_id.
    pub const SB_TRANS_ID: usize = 48;
    /// Offset of held_root (metadata snapshot).
    pub const SB_HELD_ROOT: usize = 56;
    /// Offset of the data space map root area (128 bytes).
    pub const SB_DATA_SM_ROOT: usize = 64;
    /// Offset of the metadata space map root area (128 bytes).
    pub const SB_METADATA_SM_ROOT: usize = 192;
    /// Offset of the mapping tree root.
    pub const SB_DATA_MAPPING_ROOT: usize = 320;
    /// Offset of the device details tree root.
    pub const SB_DEVICE_DETAILS_ROOT: usize = 328;
    /// Offset of data_block_size (sectors).
    pub const SB_DATA_BLOCK_SIZE: usize = 336;
    /// Offset of metadata_block_size (sectors).
    pub const SB_METADATA_BLOCK_SIZE: usize = 340;
    /// Offset of metadata_nr_blocks.
    pub const SB_METADATA_NR_BLOCKS: usize = 344;
    /// Offset of compat_flags.
    pub const SB_COMPAT_FLAGS: usize = 352;
    /// Offset of compat_ro_flags.
    pub const SB_COMPAT_RO_FLAGS: usize = 356;
    /// Offset of incompat_flags.
    pub const SB_INCOMPAT_FLAGS: usize = 360;

    /// Value size of the device details tree.
    pub const DEVICE_DETAILS_SIZE: usize = 24;
    /// Value size of mapping tree leaves (block_time) and of the top level.
    pub const MAPPING_VALUE_SIZE: usize = 8;

    /// A thin device's details record.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct DeviceDetails {
        /// Number of mapped blocks.
        pub mapped_blocks: u64,
        /// Pool transaction id when the device was created.
        pub transaction_id: u64,
        /// Pool time at creation.
        pub creation_time: u32,
        /// Pool time of the last snapshot the device took part in.
        pub snapshotted_time: u32,
    }

    impl DeviceDetails {
        /// Decodes 24 bytes.
        pub fn decode(b: &[u8]) -> Self {
            DeviceDetails {
                mapped_blocks: get_u64(b, 0),
                transaction_id: get_u64(b, 8),
                creation_time: get_u32(b, 16),
                snapshotted_time: get_u32(b, 20),
            }
        }
        /// The 24 encoded bytes.
        pub fn to_bytes(&self) -> [u8; 24] {
            let mut b = [0; 24];
            put_u64(&mut b, 0, self.mapped_blocks);
            put_u64(&mut b, 8, self.transaction_id);
            put_u32(&mut b, 16, self.creation_time);
            put_u32(&mut b, 20, self.snapshotted_time);
            b
        }
    }

    /// Packs a mapping value: data block in the high 40 bits, time in the
    /// low 24. Like the kernel, the time is not masked.
    pub fn pack_block_time(data_block: u64, time: u32) -> u64 {
        (data_block << 24) | u64::from(time)
    }

    /// Unpacks a mapping value into (data block, time).
    pub fn unpack_block_time(v: u64) -> (u64, u32) {
        (v >> 24, (v & ((1 << 24) - 1)) as u32)
    }
}

/// dm-array block layout (spec §1.15, dm-array.c `struct array_block`).
pub mod array {
    /// Size of the array block header.
    pub const HEADER_SIZE: usize = 24;
    /// Offset of max_entries.
    pub const MAX_ENTRIES: usize = 4;
    /// Offset of nr_entries.
    pub const NR_ENTRIES: usize = 8;
    /// Offset of value_size.
    pub const VALUE_SIZE: usize = 12;
    /// Offset of the self-location field.
    pub const BLOCKNR: usize = 16;

    /// Values of `value_size` bytes one array block holds (the kernel's
    /// `calc_max_entries`): no rounding to a multiple of three here.
    pub fn max_entries_for(value_size: usize) -> u32 {
        ((super::BLOCK_SIZE - HEADER_SIZE) / value_size) as u32
    }

    /// Offset of value `i`.
    pub fn value_offset(value_size: usize, i: usize) -> usize {
        HEADER_SIZE + value_size * i
    }
}

/// dm-cache superblock and value layouts (spec §4.1–4.2,
/// dm-cache-metadata.c `struct cache_disk_superblock`).
pub mod cache {
    /// The superblock's magic number (06142003 octal).
    pub const SUPERBLOCK_MAGIC: u64 = 0o6142003;
    /// The superblock lives in block 0.
    pub const SUPERBLOCK_LOCATION: u64 = 0;
    /// Oldest metadata version the kernel accepts.
    pub const MIN_VERSION: u32 = 1;
    /// Newest metadata version the kernel accepts.
    pub const MAX_VERSION: u32 = 2;
    /// Superblock flag bit 0: the last close was clean.
    pub const CLEAN_SHUTDOWN: u32 = 1 << 0;
    /// Superblock flag bit 1: the metadata must be checked.
    pub const NEEDS_CHECK: u32 = 1 << 1;
    /// Incompatible features the kernel supports (none).
    pub const INCOMPAT_SUPPORTED: u32 = 0;
    /// Read-only-compatible features the kernel supports (none).
    pub const COMPAT_RO_SUPPORTED: u32 = 0;
    /// Bytes of the policy name field (NUL padded).
    pub const POLICY_NAME_SIZE: usize = 16;

    /// Offset of flags.
    pub const SB_FLAGS: usize = 4;
    /// Offset of blocknr.
    pub const SB_BLOCKNR: usize = 8;
    /// Offset of the 16-byte uuid.
    pub const SB_UUID: usize = 16;
    /// Offset of magic.
    pub const SB_MAGIC: usize = 32;
    /// Offset of version.
    pub const SB_VERSION: usize = 40;
    /// Offset of policy_name (16 bytes).
    pub const SB_POLICY_NAME: usize = 44;
    /// Offset of policy_hint_size.
    pub const SB_POLICY_HINT_SIZE: usize = 60;
    /// Offset of the metadata space map root area (128 bytes).
    pub const SB_METADATA_SM_ROOT: usize = 64;
    /// Offset of mapping_root.
    pub const SB_MAPPING_ROOT: usize = 192;
    /// Offset of hint_root.
    pub const SB_HINT_ROOT: usize = 200;
    /// Offset of discard_root.
    pub const SB_DISCARD_ROOT: usize = 208;
    /// Offset of discard_block_size (sectors).
    pub const SB_DISCARD_BLOCK_SIZE: usize = 216;
    /// Offset of discard_nr_blocks.
    pub const SB_DISCARD_NR_BLOCKS: usize = 224;
    /// Offset of data_block_size (sectors).
    pub const SB_DATA_BLOCK_SIZE: usize = 232;
    /// Offset of metadata_block_size (sectors).
    pub const SB_METADATA_BLOCK_SIZE: usize = 236;
    /// Offset of cache_blocks.
    pub const SB_CACHE_BLOCKS: usize = 240;
    /// Offset of compat_flags.
    pub const SB_COMPAT_FLAGS: usize = 244;
    /// Offset of compat_ro_flags.
    pub const SB_COMPAT_RO_FLAGS: usize = 248;
    /// Offset of incompat_flags.
    pub const SB_INCOMPAT_FLAGS: usize = 252;
    /// Offset of read_hits.
    pub const SB_READ_HITS: usize = 256;
    /// Offset of read_misses.
    pub const SB_READ_MISSES: usize = 260;
    /// Offset of write_hits.
    pub const SB_WRITE_HITS: usize = 264;
    /// Offset of write_misses.
    pub const SB_WRITE_MISSES: usize = 268;
    /// Offset of `policy_version[3]` (three le32).
    pub const SB_POLICY_VERSION: usize = 272;
    /// Offset of dirty_root (metadata version 2 only).
    pub const SB_DIRTY_ROOT: usize = 284;
    /// Bytes of the packed superblock.
    pub const SB_SIZE: usize = 292;

    /// Mapping flag: the entry maps an origin block.
    pub const M_VALID: u64 = 1;
    /// Mapping flag: the cache block is dirty (metadata version 1 only).
    pub const M_DIRTY: u64 = 2;
    /// The low 16 bits of a mapping value are flags.
    pub const FLAGS_MASK: u64 = (1 << 16) - 1;
    /// Value size of the mapping array.
    pub const MAPPING_VALUE_SIZE: usize = 8;

    /// Packs a mapping value (`pack_value`): origin block above 16 flag bits.
    pub fn pack_mapping(oblock: u64, flags: u64) -> u64 {
        (oblock << 16) | (flags & FLAGS_MASK)
    }

    /// Unpacks a mapping value into (origin block, flags).
    pub fn unpack_mapping(v: u64) -> (u64, u64) {
        (v >> 16, v & FLAGS_MASK)
    }
}

#[cfg(test)]
mod tests {
    use super::space_map::*;
    use super::*;

    #[test]
    fn max_entries_match_the_kernel_table() {
        assert_eq!(node::max_entries_for(4), 336);
        assert_eq!(node::max_entries_for(8), 252);
        assert_eq!(node::max_entries_for(16), 168);
        assert_eq!(node::max_entries_for(24), 126);
        assert_eq!(ENTRIES_PER_BITMAP, 16320);
        assert_eq!(MAX_METADATA_BLOCKS, 4_161_600);
    }

    #[test]
    fn bitmap_bit_order_puts_the_count_high_bit_first() {
        let mut data = vec![0u8; 4080];
        bitmap_set(&mut data, 0, 1);
        // Count 1 is the higher-numbered bit of the pair: raw field value 2.
        assert_eq!(data[0], 0b10);
        bitmap_set(&mut data, 0, 2);
        assert_eq!(data[0], 0b01);
        bitmap_set(&mut data, 33, 3);
        assert_eq!(bitmap_get(&data, 33), 3);
        assert_eq!(bitmap_get(&data, 0), 2);
        assert!(!bitmap_word_full(&data, 0));
        for e in 0..32 {
            bitmap_set(&mut data, e, 1);
        }
        assert!(bitmap_word_full(&data, 5));
    }

    /// The kernel's word test is a carry trick; check it means "no entry of
    /// the word is zero" for many words (a deterministic pseudo-random walk
    /// plus the edge patterns).
    #[test]
    fn kernel_word_test_means_every_entry_is_in_use() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut words = vec![0, u64::MAX, 0xAAAA_AAAA_AAAA_AAAA, 0x5555_5555_5555_5555];
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Bias towards words with few zero entries.
            words.push(x | (x >> 1 & 0x5555_5555_5555_5555) | x.rotate_left(17) & x.rotate_left(31));
        }
        for w in words {
            let data = w.to_le_bytes();
            let naive = (0..32).all(|e| bitmap_get(&data, e) != 0);
            assert_eq!(bitmap_word_full(&data, 0), naive, "word {w:#018x}");
        }
    }

    #[test]
    fn array_and_cache_layouts_match_the_kernel() {
        assert_eq!(array::max_entries_for(8), 509);
        assert_eq!(array::max_entries_for(4), 1018);
        assert_eq!(array::value_offset(8, 1), 32);
        assert_eq!(cache::SUPERBLOCK_MAGIC, 1_623_043);
        assert_eq!(cache::SB_DIRTY_ROOT + 8, cache::SB_SIZE);
        assert_eq!(cache::SB_METADATA_SM_ROOT + space_map::ROOT_AREA_SIZE, cache::SB_MAPPING_ROOT);
        assert_eq!(cache::pack_mapping(5, cache::M_VALID | cache::M_DIRTY), 0x5_0003);
        assert_eq!(cache::unpack_mapping(0x5_0003), (5, 3));
        assert_eq!(BlockKind::Array.blocknr_offset(), array::BLOCKNR);
    }

    #[test]
    fn block_time_packs_like_the_kernel() {
        let v = thin::pack_block_time(0x12_3456_789a, 0xabcdef);
        assert_eq!(v, 0x1234_5678_9aab_cdef);
        assert_eq!(thin::unpack_block_time(v), (0x12_3456_789a, 0xabcdef));
    }
}
