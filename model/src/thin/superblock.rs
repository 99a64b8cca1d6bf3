//! The thin-pool superblock (block 0, spec §2.1), decoded.

use crate::pdata::layout::space_map::{SmRoot, ROOT_SIZE};
use crate::pdata::layout::thin::*;
use crate::pdata::layout::{get_u32, get_u64};

/// The fields of a thin-pool superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Flags (bit 0: needs check).
    pub flags: u32,
    /// Self-location.
    pub blocknr: u64,
    /// The uuid (never set by the kernel).
    pub uuid: [u8; 16],
    /// Magic number.
    pub magic: u64,
    /// Metadata version.
    pub version: u32,
    /// Snapshot time counter.
    pub time: u32,
    /// Userspace transaction id.
    pub trans_id: u64,
    /// Location of the metadata snapshot's superblock copy, 0 if none.
    pub held_root: u64,
    /// Data space map root.
    pub data_sm_root: SmRoot,
    /// Metadata space map root.
    pub metadata_sm_root: SmRoot,
    /// Root of the two-level mapping tree.
    pub data_mapping_root: u64,
    /// Root of the device details tree.
    pub device_details_root: u64,
    /// Data block size in sectors.
    pub data_block_size: u32,
    /// Metadata block size in sectors (8).
    pub metadata_block_size: u32,
    /// Metadata device size in blocks at format time.
    pub metadata_nr_blocks: u64,
    /// Compatible feature flags.
    pub compat_flags: u32,
    /// Read-only-compatible feature flags.
    pub compat_ro_flags: u32,
    /// Incompatible feature flags.
    pub incompat_flags: u32,
}

impl Superblock {
    /// Decodes a superblock block (no validation).
    pub fn decode(b: &[u8]) -> Self {
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[SB_UUID..SB_UUID + 16]);
        Superblock {
            flags: get_u32(b, SB_FLAGS),
            blocknr: get_u64(b, SB_BLOCKNR),
            uuid,
            magic: get_u64(b, SB_MAGIC),
            version: get_u32(b, SB_VERSION),
            time: get_u32(b, SB_TIME),
            trans_id: get_u64(b, SB_TRANS_ID),
            held_root: get_u64(b, SB_HELD_ROOT),
            data_sm_root: SmRoot::decode(&b[SB_DATA_SM_ROOT..SB_DATA_SM_ROOT + ROOT_SIZE]),
            metadata_sm_root: SmRoot::decode(&b[SB_METADATA_SM_ROOT..SB_METADATA_SM_ROOT + ROOT_SIZE]),
            data_mapping_root: get_u64(b, SB_DATA_MAPPING_ROOT),
            device_details_root: get_u64(b, SB_DEVICE_DETAILS_ROOT),
            data_block_size: get_u32(b, SB_DATA_BLOCK_SIZE),
            metadata_block_size: get_u32(b, SB_METADATA_BLOCK_SIZE),
            metadata_nr_blocks: get_u64(b, SB_METADATA_NR_BLOCKS),
            compat_flags: get_u32(b, SB_COMPAT_FLAGS),
            compat_ro_flags: get_u32(b, SB_COMPAT_RO_FLAGS),
            incompat_flags: get_u32(b, SB_INCOMPAT_FLAGS),
        }
    }
}
