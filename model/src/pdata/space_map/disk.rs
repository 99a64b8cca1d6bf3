//! In-memory state of a disk space map (dm-space-map-disk), used for the
//! thin pool's data blocks. Its operations live on
//! [`crate::pdata::TransactionManager`].

use super::LowLevel;

/// The data space map's state.
#[derive(Debug, Clone)]
pub struct DiskSpaceMap {
    /// Counts as of now.
    pub ll: LowLevel,
    /// Counts as of the last commit.
    pub old_ll: LowLevel,
    /// The allocation cursor (next fit, not reset at commit).
    pub begin: u64,
    /// Net allocations (allocations minus frees) since the last commit.
    pub nr_allocated_this_transaction: i64,
}

impl DiskSpaceMap {
    /// An empty data space map.
    pub fn new() -> Self {
        DiskSpaceMap {
            ll: LowLevel::new_disk(),
            old_ll: LowLevel::new_disk(),
            begin: 0,
            nr_allocated_this_transaction: 0,
        }
    }
}

impl Default for DiskSpaceMap {
    fn default() -> Self {
        Self::new()
    }
}
