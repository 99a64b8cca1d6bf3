//! dm-thin: the pool metadata (superblock, device details, the two-level
//! mapping tree, the data space map, metadata snapshots), an independent
//! checker and the thin_dump XML writer.

pub mod check;
pub mod dump;
pub mod message;
pub mod metadata;
pub mod mode;
pub mod pool;
pub mod status;
pub mod superblock;
pub mod table;

pub use metadata::{ThinError, ThinMetadata};
