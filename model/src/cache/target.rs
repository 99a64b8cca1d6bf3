//! The dm-cache target's lifecycle (dm-cache-target.c): the constructor,
//! preresume and resume, the status lines, messages, and postsuspend's
//! clean shutdown — what a table load, `dmsetup resume`, `dmsetup status`,
//! `dmsetup message` and `dmsetup suspend` do to the metadata and the
//! policy.
//!
//! The bio paths (the map path, bio prison v2, migrations as data I/O,
//! commits on FLUSH/FUA, writethrough and passthrough I/O) are in
//! [`crate::cache::core`], which owns a `CacheTarget` and the data devices.
//! Without I/O, the in-core state changes only through activation,
//! messages and the policy's ticks, which is enough to hold the lifecycle
//! against the real kernel block for block.

use crate::block_device::BlockDevice;
use crate::cache::mapping::{discard_geometry, ShutdownState};
use crate::cache::metadata::{CacheError, CacheMetadata, OpenOptions};
use crate::cache::policy::{hints_valid, CachePolicy, Nanos, SmqParams, SmqPolicy};
use crate::cache::superblock::{policy_name_str, CacheStats};
use crate::cache::table::{
    config_value, info_status, CacheMessage, CacheTable, DeviceSizes, InfoStatus, IoMode,
};
use crate::errno::Errno;
use crate::thin::table::TableError;

/// The metadata mode (`enum cache_metadata_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CacheMode {
    /// Read-write.
    Write,
    /// Metadata errors made it read-only.
    ReadOnly,
    /// Failed: every status prints `Fail`.
    Fail,
}

/// Cache blocks (of the cache device) and origin blocks (of the target's
/// length, `ti->len`, which is what the kernel caches: the origin device
/// may be longer) of a table on devices of `sizes`.
fn geometry(table: &CacheTable, sizes: DeviceSizes) -> (u32, u64) {
    ((sizes.cache_sectors / table.block_sectors) as u32, sizes.target_len / table.block_sectors)
}

/// Why preresume could not load the mappings.
enum LoadFailure {
    /// A dirty mapping of an origin block past the origin's end (EFBIG,
    /// the metadata untouched).
    OriginShrinkDirty(u32),
    /// A metadata operation failed.
    Metadata(CacheError),
}

impl From<CacheError> for LoadFailure {
    fn from(e: CacheError) -> Self {
        LoadFailure::Metadata(e)
    }
}

/// An active cache target over a metadata device `D`.
#[derive(Debug)]
pub struct CacheTarget<D> {
    pub(crate) table: CacheTable,
    pub(crate) sizes: DeviceSizes,
    pub(crate) md: CacheMetadata<D>,
    pub(crate) policy: SmqPolicy,
    pub(crate) mode: CacheMode,
    pub(crate) cache_blocks: u32,
    pub(crate) origin_blocks: u64,
    pub(crate) dirty: Vec<bool>,
    pub(crate) nr_dirty: u64,
    pub(crate) discard_block_size: u64,
    pub(crate) discards: Vec<bool>,
    pub(crate) stats: CacheStats,
    pub(crate) demotions: u32,
    pub(crate) promotions: u32,
    pub(crate) sized: bool,
    pub(crate) loaded_mappings: bool,
    pub(crate) loaded_discards: bool,
    pub(crate) suspended: bool,
}

impl<D: BlockDevice> CacheTarget<D> {
    /// Loads a table (`cache_ctr`): parses it ([`CacheTable::parse`]),
    /// creates the policy for the cache device's size and applies the
    /// policy arguments, opens the metadata (formatting an all-zero device),
    /// and in passthrough mode requires every block clean. `now` starts the
    /// policy's clock. Errors are the kernel's `ti->error` texts.
    pub fn create(params: &str, sizes: DeviceSizes, metadata: D, now: Nanos) -> Result<Self, TableError> {
        let table = CacheTable::parse(params, sizes)?;
        let (cache_blocks, origin_blocks) = geometry(&table, sizes);
        let smq = SmqParams::new(table.policy, cache_blocks, sizes.target_len, table.block_sectors);
        let mut policy = SmqPolicy::new(smq, now);
        for (k, v) in &table.policy_args {
            if !k.eq_ignore_ascii_case("migration_threshold") && policy.set_config_value(k, v).is_err() {
                return Err(TableError::einval("Error setting cache policy's config values"));
            }
        }
        let opts = OpenOptions {
            data_block_size: table.block_sectors as u32,
            may_format: true,
            policy_hint_size: table.policy.hint_size(),
            metadata_version: table.metadata_version,
            read_only: false,
        };
        let md = CacheMetadata::open(metadata, opts).map_err(|e| {
            let errno = if e == CacheError::Unformatted { Errno::EPERM } else { Errno::EINVAL };
            TableError::new(errno, "Error creating metadata object")
        })?;
        Self::build(table, sizes, md, policy, cache_blocks, origin_blocks)
    }

    /// Whether [`Self::reload`] would accept `params` on this target's
    /// metadata: the same checks, without giving the metadata up, so that a
    /// refused table leaves the loaded one as it was (the kernel keeps the
    /// live table when a load fails).
    pub fn check_reload(&mut self, params: &str, sizes: DeviceSizes) -> Result<(), TableError> {
        let table = CacheTable::parse(params, sizes)?;
        let (cache_blocks, _) = geometry(&table, sizes);
        let smq = SmqParams::new(table.policy, cache_blocks, sizes.target_len, table.block_sectors);
        let mut policy = SmqPolicy::new(smq, 0);
        for (k, v) in &table.policy_args {
            if !k.eq_ignore_ascii_case("migration_threshold") && policy.set_config_value(k, v).is_err() {
                return Err(TableError::einval("Error setting cache policy's config values"));
            }
        }
        if u64::from(self.md.data_block_size()) != table.block_sectors {
            return Err(TableError::einval("Error creating metadata object"));
        }
        // In fail mode the shared metadata cannot even say whether it needs
        // a check (`dm_cache_metadata_needs_check` fails): fail mode, refused.
        if self.md.needs_check() || self.mode == CacheMode::Fail {
            return Err(TableError::einval(
                "Unable to get write access to metadata, please check/repair metadata.",
            ));
        }
        Ok(())
    }

    /// Whether passthrough may load the mappings (`load_mapping` in
    /// preresume): no mapping may load dirty — none dirty on disk, and none
    /// at all when the metadata was opened after an unclean shutdown (every
    /// mapping then loads dirty). 6.1 has no such check in the constructor
    /// (older kernels called `dm_cache_metadata_all_clean` there): the
    /// table loads, its preresume fails with EBUSY ("cannot enter
    /// passthrough mode unless all blocks are clean"), and the device stays
    /// suspended with it until a table is loaded again. Seen on the stock
    /// 6.1 kernel (kernel-shim/tests/kernel_cache_replay.rs).
    fn passthrough_allowed(&mut self) -> Result<(), Errno> {
        let clean = self.md.clean_when_opened();
        for c in 0..self.md.cache_blocks() {
            match self.md.lookup(c) {
                Err(_) => return Err(Errno::EINVAL),
                Ok(Some((_, dirty))) if dirty || !clean => return Err(Errno::EBUSY),
                Ok(_) => {}
            }
        }
        Ok(())
    }

    /// Loads a table on metadata that is already open (a table reload: the
    /// kernel shares the metadata object between the old and the new table
    /// by reference count and does not reopen it, so CLEAN_SHUTDOWN and
    /// `clean_when_opened` stay as they are). On error the metadata comes
    /// back with the error.
    // The metadata comes back with the error, so the error is large.
    #[allow(clippy::result_large_err)]
    pub fn reload(
        params: &str,
        sizes: DeviceSizes,
        md: CacheMetadata<D>,
        now: Nanos,
    ) -> Result<Self, (CacheMetadata<D>, TableError)> {
        let table = match CacheTable::parse(params, sizes) {
            Ok(t) => t,
            Err(e) => return Err((md, e)),
        };
        let (cache_blocks, origin_blocks) = geometry(&table, sizes);
        let smq = SmqParams::new(table.policy, cache_blocks, sizes.target_len, table.block_sectors);
        let mut policy = SmqPolicy::new(smq, now);
        for (k, v) in &table.policy_args {
            if !k.eq_ignore_ascii_case("migration_threshold") && policy.set_config_value(k, v).is_err() {
                return Err((md, TableError::einval("Error setting cache policy's config values")));
            }
        }
        if u64::from(md.data_block_size()) != table.block_sectors {
            return Err((md, TableError::einval("Error creating metadata object")));
        }
        // `build` consumes the metadata; a refusal there hands it back
        // through the target.
        match Self::build_keeping(table, sizes, md, policy, cache_blocks, origin_blocks) {
            Ok(t) => Ok(t),
            Err((t, e)) => Err((t.md, e)),
        }
    }

    fn build(
        table: CacheTable,
        sizes: DeviceSizes,
        md: CacheMetadata<D>,
        policy: SmqPolicy,
        cache_blocks: u32,
        origin_blocks: u64,
    ) -> Result<Self, TableError> {
        Self::build_keeping(table, sizes, md, policy, cache_blocks, origin_blocks).map_err(|(_, e)| e)
    }

    #[allow(clippy::result_large_err)]
    fn build_keeping(
        table: CacheTable,
        sizes: DeviceSizes,
        md: CacheMetadata<D>,
        policy: SmqPolicy,
        cache_blocks: u32,
        origin_blocks: u64,
    ) -> Result<Self, (Self, TableError)> {
        let (discard_block_size, discard_blocks) = discard_geometry(table.block_sectors, sizes.target_len);
        let needs_check = md.needs_check();
        let mut t = CacheTarget {
            table,
            sizes,
            md,
            policy,
            mode: CacheMode::Write,
            cache_blocks,
            origin_blocks,
            dirty: vec![false; cache_blocks as usize],
            nr_dirty: 0,
            discard_block_size,
            discards: vec![false; discard_blocks as usize],
            stats: CacheStats::default(),
            demotions: 0,
            promotions: 0,
            sized: false,
            loaded_mappings: false,
            loaded_discards: false,
            suspended: true,
        };
        t.stats = t.md.stats();
        // `set_cache_mode(CM_WRITE)` keeps a needs_check metadata read-only,
        // and the constructor refuses anything but write mode.
        if needs_check {
            return Err((
                t,
                TableError::einval("Unable to get write access to metadata, please check/repair metadata."),
            ));
        }
        if t.table.io_mode == IoMode::Passthrough {
            t.policy.allow_migrations(false);
        }
        Ok(t)
    }

    /// A metadata operation failed: read-only mode (`metadata_operation_failed`
    /// → `set_cache_mode(CM_READ_ONLY)`; aborting is the caller's next step
    /// in the kernel and is not modelled here yet).
    pub(crate) fn metadata_failed(&mut self) {
        if self.mode == CacheMode::Write {
            // abort_transaction: reopen at the last commit, then NEEDS_CHECK
            // (6.1.y's order); a failure of either is fail mode.
            let aborted = self.md.abort().is_ok();
            let flagged = aborted && self.md.set_needs_check().is_ok();
            self.mode = if flagged { CacheMode::ReadOnly } else { CacheMode::Fail };
            self.md.set_read_only();
        }
    }

    /// The cache block ranges of an `invalidate_cblocks` message, checked
    /// as [`Self::message`] checks them.
    pub(crate) fn parse_invalidate(&self, words: &[&str]) -> Result<Vec<(u64, u64)>, Errno> {
        match self.parse_message(words)? {
            CacheMessage::InvalidateCblocks(r) => Ok(r),
            CacheMessage::Config { .. } => Err(Errno::EINVAL),
        }
    }

    /// A message's words parsed for this target (its policy, mode, size,
    /// and whether the metadata is read-only).
    fn parse_message(&self, words: &[&str]) -> Result<CacheMessage, Errno> {
        let read_only = self.mode >= CacheMode::ReadOnly;
        CacheMessage::parse(
            words,
            self.table.policy,
            self.table.io_mode,
            read_only,
            u64::from(self.cache_blocks),
        )
    }

    /// The metadata, for a table reload that keeps it open.
    pub(crate) fn into_metadata(self) -> CacheMetadata<D> {
        self.md
    }

    /// `cache_preresume`. A table that failed an earlier preresume after
    /// sizing the cache cannot be resumed (`can_resume`: "missing proper
    /// cache table reload"; a new table must be loaded). The first resume
    /// of a table sizes the metadata's mapping array to the cache device's
    /// blocks (`resize_cache_dev` → `dm_cache_resize`); a shrink over a
    /// block stored dirty is refused with EINVAL, and as any failed
    /// metadata operation it aborts the transaction, sets NEEDS_CHECK and
    /// turns the metadata read-only (`metadata_operation_failed`), so that
    /// no table loads on it until it is repaired. Then the mappings are
    /// loaded (`load_filtered_mapping`): into the policy and the in-core
    /// dirty bits (every mapped block dirty unless the metadata was shut
    /// down cleanly; hints only where they are valid), except mappings of
    /// origin blocks past the origin's end (a table on a shorter origin):
    /// a dirty one refuses the resume with EFBIG ("unable to shrink origin")
    /// without touching the metadata, clean ones are removed from the
    /// metadata (`truncate_oblocks`; durable at the next commit). Last, the
    /// discard bits of a clean shutdown, rescaled to this table's discard
    /// block size and cut at its origin's end.
    ///
    /// The error is the errno the resume ioctl returns and the kernel's log
    /// line. (`can_resize`'s own refusals concern a cache device that
    /// changed size under a live table; the model's devices change size
    /// only with a table reload, whose new table always passes them.)
    pub fn preresume(&mut self) -> Result<(), TableError> {
        if self.sized && !self.loaded_mappings {
            return Err(TableError::einval(
                "unable to resume cache due to missing proper cache table reload",
            ));
        }
        if !self.sized {
            if let Err(e) = self.md.resize(self.cache_blocks) {
                self.metadata_failed();
                let what = match e {
                    CacheError::ShrinkDirty(b) => {
                        format!("unable to shrink cache due to dirty blocks (cache block {b} is dirty)")
                    }
                    e => format!("could not resize cache metadata: {e}"),
                };
                return Err(TableError::einval(what));
            }
            self.sized = true;
        }
        if !self.loaded_mappings {
            if self.table.io_mode == IoMode::Passthrough {
                self.passthrough_allowed().map_err(|e| {
                    TableError::new(e, "cannot enter passthrough mode unless all blocks are clean")
                })?;
            }
            match self.load_mappings() {
                Ok(()) => {}
                Err(LoadFailure::OriginShrinkDirty(c)) => {
                    return Err(TableError::new(
                        Errno::EFBIG,
                        format!("unable to shrink origin; cache block {c} is dirty"),
                    ))
                }
                Err(LoadFailure::Metadata(e)) => {
                    self.metadata_failed();
                    return Err(TableError::einval(format!("could not load cache mappings: {e}")));
                }
            }
            self.loaded_mappings = true;
        }
        if !self.loaded_discards {
            if let Err(e) = self.load_discards() {
                self.metadata_failed();
                return Err(TableError::einval(format!("could not load origin discards: {e}")));
            }
            self.loaded_discards = true;
        }
        Ok(())
    }

    /// The discard bits as stored at the last clean shutdown (none after an
    /// unclean one), rescaled from the stored discard block size to this
    /// table's: each run of discarded blocks becomes the whole discard
    /// blocks of the current size inside it, cut at the origin's end
    /// (`load_discard`, `set_discard_range`).
    fn load_discards(&mut self) -> Result<(), CacheError> {
        let (stored_size, _) = self.md.discard_geometry();
        let stored = self.md.load_discards()?;
        self.discards.iter_mut().for_each(|d| *d = false);
        let mut b = 0;
        while b < stored.len() {
            if !stored[b] {
                b += 1;
                continue;
            }
            let begin = b;
            while b < stored.len() && stored[b] {
                b += 1;
            }
            let first = (begin as u64 * stored_size).div_ceil(self.discard_block_size);
            let end = (b as u64 * stored_size / self.discard_block_size).min(self.discards.len() as u64);
            for d in first..end {
                self.discards[d as usize] = true;
            }
        }
        Ok(())
    }

    fn load_mappings(&mut self) -> Result<(), LoadFailure> {
        let clean = self.md.clean_when_opened();
        let sb_name = policy_name_str(&self.md.policy_name);
        let valid = hints_valid(
            self.table.policy,
            clean,
            &sb_name,
            self.md.policy_version,
            self.md.policy_hint_size,
            self.md.hint_root != 0,
        );
        let hints = if valid { self.md.hints()? } else { Vec::new() };
        // Clean mappings past the origin's end (`invalid_bitset`).
        let mut beyond_origin = Vec::new();
        for c in 0..self.md.cache_blocks() {
            let Some((oblock, stored_dirty)) = self.md.lookup(c)? else { continue };
            // The deliberate bug `cache-dirty-trusted-after-crash` believes
            // the stored dirty bits although the shutdown was not clean.
            let dirty = if self.md.mutations().cache_dirty_trusted_after_crash {
                stored_dirty
            } else {
                !clean || stored_dirty
            };
            if oblock >= self.origin_blocks {
                if dirty {
                    return Err(LoadFailure::OriginShrinkDirty(c));
                }
                beyond_origin.push(c);
                continue;
            }
            // The hint cursor ends with the hint array (shorter than the
            // mapping array after a grown cache): no hint past it.
            let hint_valid = valid && (c as usize) < hints.len();
            let hint = if hint_valid { hints[c as usize] } else { 0 };
            if self.policy.load_mapping(oblock, c, dirty, hint, hint_valid).is_err() {
                return Err(LoadFailure::Metadata(CacheError::BadSuperblock(format!(
                    "policy refused the mapping of cache block {c}"
                ))));
            }
            if dirty && (c as usize) < self.dirty.len() && !self.dirty[c as usize] {
                self.dirty[c as usize] = true;
                self.nr_dirty += 1;
            }
        }
        for c in beyond_origin {
            self.md.remove_mapping(c)?;
        }
        Ok(())
    }

    /// `cache_resume`: ticks the policy (the waker's first run) at `now`.
    pub fn resume(&mut self, now: Nanos) {
        self.suspended = false;
        self.policy.tick(true, now);
    }

    /// The INFO status line (`cache_status`). Unless `noflush`, and while
    /// not suspended, it commits first, changed or not (spec §4.5). FAIL mode
    /// prints `Fail`; a failed query prints `Error`.
    pub fn status(&mut self, noflush: bool) -> String {
        if self.mode == CacheMode::Fail {
            return "Fail".to_string();
        }
        if !noflush && !self.suspended && self.mode == CacheMode::Write && self.md.commit(false).is_err() {
            self.metadata_failed();
        }
        let (Ok(free), Ok(total)) = (self.md.free_metadata_blocks(), self.md.metadata_dev_blocks()) else {
            return "Error".to_string();
        };
        let s = InfoStatus {
            metadata_used: total - free,
            metadata_total: total,
            resident: u64::from(self.policy.residency()),
            cache_blocks: u64::from(self.cache_blocks),
            hits: [
                self.stats.read_hits,
                self.stats.read_misses,
                self.stats.write_hits,
                self.stats.write_misses,
            ],
            demotions: self.demotions,
            promotions: self.promotions,
            dirty: self.nr_dirty,
            policy_config: self.policy.emit_config_values(),
            read_only: self.mode == CacheMode::ReadOnly,
            needs_check: self.md.needs_check(),
        };
        info_status(&self.table, &s)
    }

    /// A message (`cache_message`): a config key, or `invalidate_cblocks`
    /// (parsed and checked; invalidation itself is the I/O path's:
    /// [`crate::cache::core::Cache::message`] does it; here EOPNOTSUPP).
    pub fn message(&mut self, words: &[&str]) -> Result<(), Errno> {
        match self.parse_message(words)? {
            CacheMessage::Config { key, value } => {
                if let Some(t) = config_value(self.table.policy, &key, &value)? {
                    self.table.migration_threshold = t;
                } else {
                    self.policy.set_config_value(&key, &value)?;
                }
                Ok(())
            }
            CacheMessage::InvalidateCblocks(_) => Err(Errno::EOPNOTSUPP),
        }
    }

    /// `cache_postsuspend`: in write mode, the clean shutdown
    /// (`sync_metadata`: the in-core dirty bits, the discard bits, the
    /// statistics, the policy's hints, then a commit with CLEAN_SHUTDOWN set
    /// only if all of those worked).
    pub fn postsuspend(&mut self) -> Result<(), CacheError> {
        self.suspended = true;
        if self.mode != CacheMode::Write {
            return Ok(());
        }
        let state = ShutdownState {
            dirty: self.dirty.clone(),
            discard_block_size: self.discard_block_size,
            discards: self.discards.clone(),
            stats: self.stats,
            policy: self.policy.policy_hints(),
        };
        let r = self.md.clean_shutdown(&state);
        if r.is_err() {
            self.metadata_failed();
        }
        r
    }

    /// Removes the target (`cache_dtr`): closes the metadata and returns its
    /// device (suspend first for a clean shutdown).
    pub fn close(self) -> D {
        self.md.close()
    }

    /// The table as loaded (a message may have changed
    /// `migration_threshold`).
    pub fn table(&self) -> &CacheTable {
        &self.table
    }

    /// The device sizes the table was loaded with.
    pub fn sizes(&self) -> DeviceSizes {
        self.sizes
    }

    /// Cache and origin blocks.
    pub fn geometry(&self) -> (u32, u64) {
        (self.cache_blocks, self.origin_blocks)
    }

    /// The metadata mode.
    pub fn mode(&self) -> CacheMode {
        self.mode
    }

    /// The policy.
    pub fn policy(&self) -> &SmqPolicy {
        &self.policy
    }

    /// Whether cache block `c` is dirty in core.
    pub fn is_dirty(&self, c: u32) -> bool {
        self.dirty.get(c as usize).copied().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_device::MemDevice;

    const BS: u64 = 64;

    fn sizes(origin_sectors: u64) -> DeviceSizes {
        DeviceSizes { target_len: origin_sectors, cache_sectors: 16 * BS, origin_sectors }
    }

    /// A target on `origin_sectors` after a clean shutdown that recorded
    /// `discarded` (discard blocks), then one on `next_origin_sectors`:
    /// the discard block size and bits the second loads.
    fn reload_discards(
        origin_sectors: u64,
        discarded: &[usize],
        next_origin_sectors: u64,
    ) -> (u64, Vec<bool>) {
        let params = format!("m c o {BS} 1 writeback smq 0");
        let mut t = CacheTarget::create(&params, sizes(origin_sectors), MemDevice::new(8192), 0).unwrap();
        t.preresume().unwrap();
        t.resume(0);
        for &d in discarded {
            t.discards[d] = true;
        }
        t.postsuspend().unwrap();
        let md = t.close();
        let mut t = CacheTarget::create(&params, sizes(next_origin_sectors), md, 0).unwrap();
        t.preresume().unwrap();
        (t.discard_block_size, t.discards.clone())
    }

    #[test]
    fn discard_bits_follow_the_origin_size() {
        // The same discard block size: a longer origin adds clear bits, a
        // shorter one cuts the bits past its end.
        let (size, bits) = reload_discards(32 * BS, &[1, 2, 31], 40 * BS);
        assert_eq!(size, BS);
        assert_eq!(bits.iter().positions(), vec![1, 2, 31]);
        assert_eq!(bits.len(), 40);
        let (_, bits) = reload_discards(32 * BS, &[1, 2, 31], 20 * BS);
        assert_eq!((bits.len(), bits.iter().positions()), (20, vec![1, 2]));
    }

    #[test]
    fn discard_bits_are_rescaled_to_a_larger_discard_block() {
        // 16384 discard blocks of 64 sectors, then an origin twice as long:
        // blocks of 128 sectors. A run of old blocks 0..4 covers new
        // blocks 0 and 1; old block 5 alone covers no whole new block;
        // old blocks 8..11 cover new block 4 only (5's second half is
        // not discarded).
        let n = super::super::mapping::MAX_DISCARD_BLOCKS;
        let (size, bits) = reload_discards(n * BS, &[0, 1, 2, 3, 5, 8, 9, 10], 2 * n * BS);
        assert_eq!(size, 2 * BS);
        assert_eq!(bits.iter().positions(), vec![0, 1, 4]);
    }

    trait Positions {
        fn positions(self) -> Vec<usize>;
    }

    impl<'a, I: Iterator<Item = &'a bool>> Positions for I {
        fn positions(self) -> Vec<usize> {
            self.enumerate().filter(|(_, b)| **b).map(|(i, _)| i).collect()
        }
    }
}
