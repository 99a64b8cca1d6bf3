//! persistent-data: the kernel's library of copy-on-write on-disk structures
//! (drivers/md/persistent-data), reproduced block for block.
//!
//! Layering, bottom up: [`checksum`] and [`layout`] (the on-disk formats),
//! [`block_manager`] (a write-back cache of 4 KiB blocks over a
//! [`crate::block_device::BlockDevice`]), [`transaction`] (shadowing, the
//! metadata space map, commit), [`btree`] and [`space_map`], and on top of
//! the btree [`mod@array`] and [`bitset`] (used by dm-cache).

pub mod array;
pub mod bitset;
pub mod block_manager;
pub mod btree;
pub mod checksum;
pub mod layout;
pub mod space_map;
pub mod transaction;

pub use block_manager::BlockManager;
pub use layout::BLOCK_SIZE;
pub use transaction::TransactionManager;

use thiserror::Error;

use crate::block_device::IoError;

/// A metadata block number (4 KiB blocks).
pub type BlockNr = u64;

/// Failures of persistent-data operations, named as the kernel names them
/// where there is a kernel errno.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PdataError {
    /// The device failed.
    #[error("I/O error on metadata block {block}: {source}")]
    Io {
        /// The metadata block being read or written.
        block: BlockNr,
        /// The device's error.
        source: IoError,
    },
    /// A block's checksum does not match (kernel: -EILSEQ).
    #[error("checksum mismatch in {kind} block {block}: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// What the block was expected to be.
        kind: layout::BlockKind,
        /// Where it is.
        block: BlockNr,
        /// The checksum stored in the block.
        stored: u32,
        /// The checksum of its contents.
        computed: u32,
    },
    /// A block's self-location field is wrong (kernel: -ENOTBLK).
    #[error("{kind} block {block} says it is block {claimed}")]
    WrongLocation {
        /// What the block was expected to be.
        kind: layout::BlockKind,
        /// Where it is.
        block: BlockNr,
        /// The location written inside it.
        claimed: BlockNr,
    },
    /// A structure is malformed (bad header field, impossible count).
    #[error("corrupt {kind} block {block}: {what}")]
    Corrupt {
        /// What the block was expected to be.
        kind: layout::BlockKind,
        /// Where it is.
        block: BlockNr,
        /// What is wrong.
        what: String,
    },
    /// A walk or a loop went past the bound no sound structure reaches: a
    /// cycle in a tree, a tree deeper than any real one, a loop that makes
    /// no progress. Where the kernel has no bound it would spin for ever,
    /// where it has one (the deletion stack) it fails with -ENOMEM. On
    /// metadata the model wrote itself this is a model bug, and the
    /// transaction manager records it
    /// ([`TransactionManager::broken`]); on an image read from outside it
    /// is damage, reported as this error.
    #[error("runaway walk at {kind} block {block}: {what}")]
    Runaway {
        /// What the block was expected to be.
        kind: layout::BlockKind,
        /// Where the walk was when it went past its bound.
        block: BlockNr,
        /// Which bound, and what it suggests (a cycle?).
        what: String,
    },
    /// A block number beyond the end of the metadata device.
    #[error("block {block} is beyond the end of the metadata device ({nr_blocks} blocks)")]
    OutOfBounds {
        /// The block asked for.
        block: BlockNr,
        /// Blocks in the device.
        nr_blocks: u64,
    },
    /// A key is not in a tree (kernel: -ENODATA).
    #[error("no such key")]
    NoData,
    /// No free block (kernel: -ENOSPC).
    #[error("no free space in the {0} space map")]
    NoSpace(&'static str),
    /// A reference count would drop below zero (kernel: -EINVAL).
    #[error("unable to decrement the reference count of block {0} below 0")]
    RefCountUnderflow(u64),
    /// Too many nested space-map operations (kernel: -ENOMEM).
    #[error("too many recursive allocations in the metadata space map")]
    TooManyRecursiveOps,
    /// Any other invalid argument (kernel: -EINVAL).
    #[error("invalid: {0}")]
    Invalid(String),
}

impl PdataError {
    /// Whether the error says the structures are inconsistent in a way no
    /// sound history leaves them: a runaway walk, too many recursive
    /// space-map operations (a runaway too), a reference count below zero.
    /// On metadata the model wrote itself these are model bugs (see
    /// [`TransactionManager::broken`]); damage read from outside gives them
    /// too.
    pub fn is_inconsistency(&self) -> bool {
        matches!(
            self,
            PdataError::Runaway { .. } | PdataError::TooManyRecursiveOps | PdataError::RefCountUnderflow(_)
        )
    }
}

/// Result of persistent-data operations.
pub type Result<T, E = PdataError> = std::result::Result<T, E>;
