//! dm-cache: the cache metadata (dm-cache-metadata.c, spec §4) in kernel
//! 6.1's on-disk format, versions 1 and 2, block for block.
//!
//! * [`metadata`]: [`CacheMetadata`] — format, open, commit, abort, close.
//! * [`mapping`]: mappings, dirty bits, discards, hints, resize, the
//!   target's clean shutdown.
//! * [`superblock`]: every superblock field.
//! * [`inspect`]: read-only decoding of an image and the blocks of each
//!   structure (for checkers).
//! * [`dump`]: the `cache_dump` XML.
//! * [`check`]: the metadata checker (`cache_check` and more).
//! * [`policy`]: the smq / mq / cleaner policies and the background work
//!   tracker the cache core drives.
//! * [`table`]: the `cache` table line, its status lines and messages.
//! * [`target`]: the target's lifecycle: table load, resume, status,
//!   messages, the clean shutdown on suspend.
//! * [`core`]: the target's I/O paths over its data devices: the map path,
//!   prison v2, migrations, the committer, writethrough and passthrough.

pub mod check;
pub mod core;
pub mod dump;
pub mod inspect;
pub mod mapping;
pub mod metadata;
pub mod policy;
pub mod superblock;
pub mod table;
pub mod target;

pub use metadata::{CacheError, CacheMetadata, OpenOptions};
