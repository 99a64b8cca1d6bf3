//! Seeded workloads of pool metadata operations.

use rand::Rng;

/// Thin device ids the workloads use.
pub const DEVICES: u64 = 6;
/// Virtual blocks per device the workloads touch.
pub const VBLOCKS: u64 = 4000;

/// One step of a metadata workload, as the pool would perform it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataOp {
    /// `create_thin` message.
    CreateThin(u64),
    /// `create_snap` message.
    CreateSnap {
        /// New device.
        dev: u64,
        /// Its origin.
        origin: u64,
    },
    /// `delete` message.
    Delete(u64),
    /// Writes provisioning `len` blocks from `vblock`.
    Provision {
        /// Device.
        dev: u64,
        /// First virtual block.
        vblock: u64,
        /// Blocks.
        len: u64,
    },
    /// A discard unmapping `len` blocks from `vblock`.
    Discard {
        /// Device.
        dev: u64,
        /// First virtual block.
        vblock: u64,
        /// Blocks.
        len: u64,
    },
    /// `set_transaction_id` message moving the id on by one.
    BumpTransactionId,
    /// `reserve_metadata_snap` message.
    ReserveMetadataSnap,
    /// `release_metadata_snap` message.
    ReleaseMetadataSnap,
    /// A commit (periodic, or for a FLUSH).
    Commit,
}

impl MetadataOp {
    /// Whether the pool treats this as a message (commits right after).
    pub fn is_message(&self) -> bool {
        !matches!(self, MetadataOp::Provision { .. } | MetadataOp::Discard { .. } | MetadataOp::Commit)
    }
}

/// A workload of `len` operations drawn from `rng`.
pub fn generate(rng: &mut impl Rng, len: usize) -> Vec<MetadataOp> {
    (0..len)
        .map(|_| match rng.gen_range(0..100) {
            0..=7 => MetadataOp::CreateThin(rng.gen_range(0..DEVICES)),
            8..=15 => {
                MetadataOp::CreateSnap { dev: rng.gen_range(0..DEVICES), origin: rng.gen_range(0..DEVICES) }
            }
            16..=19 => MetadataOp::Delete(rng.gen_range(0..DEVICES)),
            20..=54 => MetadataOp::Provision {
                dev: rng.gen_range(0..DEVICES),
                vblock: rng.gen_range(0..VBLOCKS),
                len: rng.gen_range(1..300),
            },
            55..=74 => MetadataOp::Discard {
                dev: rng.gen_range(0..DEVICES),
                vblock: rng.gen_range(0..VBLOCKS),
                len: rng.gen_range(1..800),
            },
            75..=77 => MetadataOp::BumpTransactionId,
            78..=80 => MetadataOp::ReserveMetadataSnap,
            81..=83 => MetadataOp::ReleaseMetadataSnap,
            _ => MetadataOp::Commit,
        })
        .collect()
}
