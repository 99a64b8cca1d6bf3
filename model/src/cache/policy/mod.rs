//! dm-cache's policies as kernel 6.1 runs them (dm-cache-policy.h,
//! dm-cache-policy-internal.h, dm-cache-policy-smq.c,
//! dm-cache-background-tracker.c; spec §4.7–4.9).
//!
//! * [`CachePolicy`]: the operations the cache core calls (`struct
//!   dm_cache_policy`), one method per kernel op.
//! * [`SmqPolicy`]: smq, and the `mq`, `cleaner` and `default` policies,
//!   which in 6.1 are all smq (there is no separate cleaner file): `mq`
//!   accepts and ignores the old tunables, `cleaner` never promotes and
//!   writes back every dirty block, `default` is smq under another name.
//! * [`BackgroundTracker`]: the queue of promotions, demotions and
//!   writebacks the policy hands the core.
//!
//! The policy is a plain single-threaded object: the kernel serialises it
//! with one spinlock, the model's caller serialises it by `&mut self`.
//! Time enters only through [`CachePolicy::tick`] (and the creation time):
//! every other result is a function of the calls made, so the same calls
//! give the same work, residency and hints.
//!
//! Points of the 6.1 source worth knowing when driving the policy (spec §4.8
//! is right on the rest):
//!
//! * The cache-entry allocator takes the head of a free list built in index
//!   order and returns freed entries to its tail: cache blocks are handed
//!   out lowest-first only until the first one is freed, then first-freed
//!   first.
//! * `background_queued` is set whenever the lookup *wanted* to promote,
//!   even if nothing was queued (full cache, promotion already pending,
//!   migrations disallowed).
//! * A busy writeback (the `idle = false` path, which 6.1.y's cleaner also
//!   takes under load) stops at the first writeback sentinel of each level:
//!   only blocks untouched for a writeback period or more are cleaned.
//! * Redistribution moves each level's newest surplus entries (popped from
//!   the tail) to the tail of the level above, reversing their order; with a
//!   cache smaller than one hotspot block (`nr_in_top_levels` = 0) hotspot
//!   entries are pulled down to the lowest levels instead.
//! * Period deadlines use `time_after` (strictly after), so a "1 s" period
//!   ends at the first tick at least HZ + 1 jiffies later.

pub mod background;
pub mod entry;
pub mod hash;
pub mod queue;
pub mod smq;
pub mod stats;

pub use background::{BackgroundTracker, PolicyOp, PolicyWork};
pub use smq::{SmqParams, SmqPolicy};

use crate::cache::mapping::PolicyHints;
use crate::errno::Errno;

/// Simulated time in nanoseconds, as the rest of the model counts it.
pub type Nanos = u64;

/// The direction of the bio a lookup is for (`READ` / `WRITE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataDir {
    /// A read.
    Read,
    /// A write.
    Write,
}

/// What [`CachePolicy::lookup`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lookup {
    /// The cache block on a hit (the kernel's return 0), None on a miss
    /// (`-ENOENT`).
    pub cblock: Option<u32>,
    /// `background_queued`: the policy decided to promote (the core then
    /// wakes the migration worker). smq sets it whenever it *wanted* to
    /// promote, whether or not work was actually queued.
    pub background_queued: bool,
}

/// What [`CachePolicy::lookup_with_work`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LookupWithWork {
    /// The cache block on a hit, None on a miss.
    pub cblock: Option<u32>,
    /// A promotion handed straight to the caller (already issued; the
    /// caller must complete it).
    pub work: Option<PolicyWork>,
}

/// The policies the kernel registers (`dm_cache_policy_type`), all
/// implemented by smq in 6.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PolicyType {
    /// `smq`.
    Smq,
    /// `mq`: smq that accepts and ignores the old mq tunables.
    Mq,
    /// `cleaner`: smq with migrations disallowed that cleans regardless of
    /// idleness (6.1.y; see [`SmqParams::cleaner_ignores_idle`]).
    Cleaner,
    /// `default`: smq registered under another name.
    Default,
}

impl PolicyType {
    /// The type for a table's policy name (names are matched exactly, as
    /// `dm_cache_policy_create` does).
    pub fn from_name(name: &str) -> Option<PolicyType> {
        match name {
            "smq" => Some(PolicyType::Smq),
            "mq" => Some(PolicyType::Mq),
            "cleaner" => Some(PolicyType::Cleaner),
            "default" => Some(PolicyType::Default),
            _ => None,
        }
    }

    /// The name the type is registered under.
    pub fn registered_name(self) -> &'static str {
        match self {
            PolicyType::Smq => "smq",
            PolicyType::Mq => "mq",
            PolicyType::Cleaner => "cleaner",
            PolicyType::Default => "default",
        }
    }

    /// The name the policy reports (`dm_cache_policy_get_name`): an alias
    /// with a `real` type reports the real one, so `default` is "smq" in
    /// the status line and in the metadata.
    pub fn name(self) -> &'static str {
        match self {
            PolicyType::Default => "smq",
            t => t.registered_name(),
        }
    }

    /// The version (`{2, 0, 0}` for all four).
    pub fn version(self) -> [u32; 3] {
        [2, 0, 0]
    }

    /// The hint size in bytes (4 for all four).
    pub fn hint_size(self) -> u32 {
        4
    }
}

/// The operations of a cache policy (`struct dm_cache_policy` and the
/// `policy_*` wrappers of dm-cache-policy-internal.h).
pub trait CachePolicy {
    /// The policy's type (name, version, hint size).
    fn policy_type(&self) -> PolicyType;

    /// Looks `oblock` up for a bio (`lookup`). `fast_copy` says the bio may
    /// be promoted by overwriting (writeback mode, the bio covers the whole
    /// block or the block is discarded). May queue background work.
    fn lookup(&mut self, oblock: u64, dir: DataDir, fast_copy: bool) -> Lookup;

    /// As [`Self::lookup`], but a promotion is handed straight back rather
    /// than queued (`lookup_with_work`).
    fn lookup_with_work(&mut self, oblock: u64, dir: DataDir, fast_copy: bool) -> LookupWithWork;

    /// The next background work item (`get_background_work`): queued work
    /// first; with none, the policy may generate a writeback, more eagerly
    /// when `idle`. None is the kernel's `-ENODATA`.
    fn get_background_work(&mut self, idle: bool) -> Option<PolicyWork>;

    /// Reports the outcome of a work item the policy handed out
    /// (`complete_background_work`).
    fn complete_background_work(&mut self, work: PolicyWork, success: bool);

    /// Marks a mapped cache block dirty (`set_dirty`).
    fn set_dirty(&mut self, cblock: u32);

    /// Marks a mapped cache block clean (`clear_dirty`).
    fn clear_dirty(&mut self, cblock: u32);

    /// Loads a mapping from the metadata at activation (`load_mapping`).
    /// `hint_valid` is the metadata's verdict on the stored hints.
    fn load_mapping(
        &mut self,
        oblock: u64,
        cblock: u32,
        dirty: bool,
        hint: u32,
        hint_valid: bool,
    ) -> Result<(), Errno>;

    /// Forgets a mapping (`invalidate_mapping`); ENODATA if unmapped.
    fn invalidate_mapping(&mut self, cblock: u32) -> Result<(), Errno>;

    /// The hint saved for a cache block at clean shutdown (`get_hint`).
    fn get_hint(&self, cblock: u32) -> u32;

    /// Cache blocks in use, including those reserved for queued promotions
    /// (`residency`).
    fn residency(&self) -> u32;

    /// The passage of time (`tick`): the core calls it from the 1-second
    /// waker (`can_block` true) and when a tagged bio completes (false).
    /// `now` is the simulated time.
    fn tick(&mut self, can_block: bool, now: Nanos);

    /// A policy key/value from the table or a message
    /// (`set_config_value`); EINVAL when the policy has no such key.
    fn set_config_value(&mut self, key: &str, value: &str) -> Result<(), Errno>;

    /// The policy's part of the status line (`emit_config_values`), with
    /// the kernel's trailing space: "0 " for smq and cleaner.
    fn emit_config_values(&self) -> String;

    /// Allows or forbids promotions and demotions (`allow_migrations`).
    fn allow_migrations(&mut self, allow: bool);

    /// The cache size in blocks the policy was created for.
    fn cache_size(&self) -> u32;

    /// What the target saves at a clean shutdown: the reported name,
    /// version, hint size and `get_hint` of every cache block
    /// (`dm_cache_write_hints`).
    fn policy_hints(&self) -> PolicyHints {
        let t = self.policy_type();
        PolicyHints {
            name: t.name().to_string(),
            version: t.version(),
            hint_size: t.hint_size(),
            hints: (0..self.cache_size()).map(|c| self.get_hint(c)).collect(),
        }
    }
}

/// Whether stored hints are usable when loading mappings
/// (`hints_array_available` in dm-cache-metadata.c): the metadata was
/// cleanly shut down, the stored policy name equals the policy's reported
/// name, the major versions agree, the hint sizes agree, and a hint array
/// exists.
pub fn hints_valid(
    policy: PolicyType,
    clean_when_opened: bool,
    stored_name: &str,
    stored_version: [u32; 3],
    stored_hint_size: u32,
    hint_root_present: bool,
) -> bool {
    clean_when_opened
        && stored_name == policy.name()
        && stored_version[0] == policy.version()[0]
        && stored_hint_size == policy.hint_size()
        && hint_root_present
        && stored_hint_size != 0
}
