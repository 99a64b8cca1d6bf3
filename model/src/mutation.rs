//! Deliberate bugs, off by default, that tests switch on to show that a
//! detector (the crash checker, the oracle, the equivalence checks) catches
//! a broken model. Each one breaks a rule the kernel relies on.

/// Turns one mutation on.
pub type Switch = fn(&mut Mutations);

/// The set of deliberate bugs in force.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Mutations {
    /// Commit without the flush between writing the shadow blocks and
    /// writing the superblock: a crash can leave a superblock that points
    /// at blocks that never reached the disk.
    pub superblock_before_flush: bool,
    /// Reuse a block freed in the current transaction before the commit:
    /// the copy of an unshared block lands in the very block the copy frees,
    /// so a crash before the commit finds blocks of the committed trees
    /// overwritten.
    pub reuse_freed_before_commit: bool,
    /// Newly provisioned blocks are not zeroed although zeroing is on: the
    /// rest of a partly written new block shows whatever the data device
    /// held there.
    pub skip_zeroing: bool,
    /// `create_snap` shares the origin's mapping tree without taking a
    /// reference to its root: the snapshot's view changes with the origin.
    pub snapshot_without_inc: bool,
    /// A write to a shared block goes to that block instead of breaking
    /// the sharing: the snapshot sees the origin's new data.
    pub write_to_shared_in_place: bool,
    /// A passdown discard discards data blocks that another device still
    /// maps.
    pub passdown_ignores_sharing: bool,
    /// Flush and FUA bios complete without waiting for the metadata
    /// commit: after a crash their blocks can be unmapped.
    pub fua_before_commit: bool,
    /// The commit does not flush the data device first: committed mappings
    /// can point at data that never became durable.
    pub data_not_flushed_before_commit: bool,
    /// `LockingDesign::RefcountSharing` only (no effect elsewhere): a block
    /// counts as unshared when the current transaction says so, without
    /// asking the last commit. A write then goes in place into a block that
    /// another device let go of in this transaction (it broke sharing or
    /// discarded the block) and still maps in the state a crash goes back
    /// to.
    pub refcount_ignores_last_commit: bool,
    /// Passdown discard, pass two: after dropping the hold pass one took,
    /// the runs that were passed down to the data device are decremented
    /// once more, as if pass one's unmap had left their mapping's reference
    /// for pass two to drop (a patch that frees the discarded blocks
    /// explicitly). Their counts go below zero: the space map refuses with
    /// an error (the kernel's "unable to decrement a reference count below
    /// 0", -EINVAL), the pool aborts to the last commit and goes read-only.
    /// Nothing the user can see is wrong, so only the model's own
    /// consistency check reports it.
    pub passdown_frees_discarded_twice: bool,
    /// A whole-block overwrite's end-io (`overwrite_endio`) drops the bio's
    /// all-I/O reference as soon as the data write lands (so that discards
    /// need not wait for the metadata insert), but leaves it in the bio's
    /// hook, so `thin_endio` drops it again when the bio completes: a
    /// deferred-set decrement of an idle entry, the kernel's `BUG_ON` in
    /// `dm_deferred_entry_dec`.
    pub overwrite_drops_all_io_twice: bool,
    /// Passdown discard: its end-io (`passdown_endio`) releases the data
    /// cell as soon as the discard to the data device completes, so that
    /// bios queued on those blocks go sooner, and pass two releases it
    /// again as before: a cell released twice (in the kernel a double
    /// `rb_erase` and a double free into the cell mempool).
    pub passdown_releases_data_cell_twice: bool,
    /// The map path fails every write with EIO while the pool is out of
    /// metadata space, as it fails every bio in fail mode (a patch that
    /// widens `thin_bio_map`'s `PM_FAIL` test to the read-only modes for
    /// writes), though a write to a mapped, unshared block needs no
    /// metadata and the kernel lets it through.
    pub out_of_metadata_space_fails_writes: bool,
    /// `maybe_resize_metadata_dev` grows the metadata space map before it
    /// takes the pool out of out-of-metadata-space mode instead of after
    /// (two lines swapped): the block manager is still read-only, the
    /// growth fails, the abort keeps the block manager read-only, setting
    /// needs_check fails too, and the pool goes to fail mode.
    pub metadata_grows_before_write_mode: bool,
    /// dm-array: a value is written into its array block in place, even
    /// when the last commit still holds the block, instead of into a
    /// shadow: a crash finds the committed array changed (the cache
    /// metadata crash campaign catches it as a state that is neither the
    /// old commit nor the new one).
    pub array_set_in_place: bool,
    /// Cache metadata: the commit writes the superblock with the
    /// statistics of the commit before (a field forgotten in the commit):
    /// the committed counters are not the ones just saved. Nothing else
    /// changes, so only a comparison with what was saved can see it.
    pub cache_commit_forgets_stats: bool,
    /// Cache target: after an unclean shutdown, mappings load with their
    /// stored dirty bits instead of all dirty (the stored bits are only
    /// written at a clean shutdown, so they are stale).
    pub cache_dirty_trusted_after_crash: bool,
    /// Cache target: a writeback marks its block clean (and releases the
    /// block) when it issues the copy, not when the copy completes.
    pub cache_writeback_clean_before_copy: bool,
    /// Cache target: a promotion inserts its mapping into the metadata
    /// before its copy is issued, so a commit can make the mapping durable
    /// while the cache block still holds other data.
    pub cache_promote_maps_before_copy: bool,
    /// Cache target: a writethrough write to a clean cached block completes
    /// when its cache half does, without waiting for the origin half.
    pub cache_writethrough_acks_before_origin: bool,
    /// Cache target: the policy is not told when a write dirties a cached
    /// block, and a demotion never copies: a block the policy thinks clean
    /// is dropped with its data.
    pub cache_demote_frees_dirty: bool,
    /// Cache target: a write is granted its shared lock even while a
    /// migration holds the block exclusively, so a write during a promotion
    /// goes to the origin block the copy already read.
    pub cache_write_ignores_migration_lock: bool,
    /// Cache metadata: a resize that shrinks the cache does not look for
    /// dirty blocks among those it drops (`dm_cache_resize` refuses them),
    /// so a table reload on a smaller cache device loses their data.
    pub cache_shrink_drops_dirty: bool,
    /// Btree removal (`rebalance_children`): a node left with one child
    /// takes the child's bytes without giving the child's children a
    /// reference for the copy, even when the child is shared with another
    /// tree (kernel 6.1 before 6.1.175 did this): the children are one
    /// reference short, and the next unmapping frees a data block a
    /// snapshot still maps.
    pub collapse_forgets_shared_child: bool,
    /// Btree insert: a key below a node's lowest key lowers that bound in
    /// the root only (a patch that thinks only the root can see such a
    /// key); in a tree of three levels the internal node below the root
    /// keeps its old bound, and lookups of the new key miss it.
    pub below_min_key_lowers_root_only: bool,
    /// Btree shadowing of a child during a rebalance (`shadow_child`): the
    /// copy of a shared node takes references to its children only when
    /// it is a leaf (a patch that thinks only leaves carry counted
    /// values); a shared internal node below the root, which only trees of
    /// three levels have, leaves its children one reference short.
    pub shadow_child_skips_internal_children: bool,
    /// Thin metadata abort (`dm_pool_abort_metadata`): the mapping tree's
    /// root of the aborted transaction is kept instead of being read back
    /// from the superblock (a patch that reloads only the space maps), so
    /// after a failed commit the pool's read-only lookups see mappings
    /// that were never committed, in blocks the space maps call free.
    pub abort_keeps_mapping_root: bool,
    /// Thin metadata abort: the aborted transaction's in-core data space
    /// map is kept instead of being reopened from the superblock (a patch
    /// that rebuilds only the metadata space map): its counts and bitmap
    /// blocks are those of a transaction that never committed.
    pub abort_keeps_data_space_map: bool,
    /// `get_pool_io_error_code` asks the pool's `error_if_no_space`
    /// feature instead of its out-of-data-space state (a patch that reads
    /// `pool->pf.error_if_no_space` where the kernel reads
    /// `pool->out_of_data_space`): on a pool with that feature, a failed
    /// mapping, a cell errored after a fault or a bio failed in read-only
    /// or fail mode reports ENOSPC while the pool has data space.
    pub io_error_code_follows_feature: bool,
    /// `alloc_data_block` keeps the last free data block back: it tests
    /// `free_blocks <= 1` where the kernel tests `!free_blocks` (as if the
    /// count included the block about to be allocated), so the pool goes
    /// out of data space, and fails or queues writes, with a block still
    /// free in both the open transaction and the last commit.
    pub out_of_data_space_one_block_early: bool,
    /// A mapping whose zeroing or copy failed errors, besides its cell,
    /// every bio on its device's deferred list (a patch that calls
    /// `error_thin_bio_list` on the device's `deferred_bio_list` "since its
    /// data device is failing"): requests to blocks the failed I/O never
    /// touched fail with EIO.
    pub failed_mapping_errors_deferred_bios: bool,
    /// `process_prepared_mapping` handles a mapping whose zeroing or copy
    /// failed as it handles a failed insert (a patch that merges the two
    /// error paths): `metadata_operation_failed` aborts the transaction,
    /// sets needs_check and puts the pool in read-only mode over a data
    /// device error, and every request that then needs a new block fails.
    pub failed_mapping_aborts: bool,
    /// When a commit fails, the empty FLUSH and the FUA bios that waited
    /// for it complete successfully anyway (an error path that forgets to pass
    /// the commit's error on): the pool aborts to the last commit, so the
    /// data they promised durable is unmapped again.
    pub failed_commit_acks_flush: bool,
    /// The abort after a failed metadata operation carries on when its
    /// reread of the superblock fails (a patch that falls back to the copy
    /// in memory): the abort succeeds and the pool goes read-only, where
    /// the kernel's fails and the pool goes to fail mode.
    pub abort_ignores_superblock_read_error: bool,
    /// Passdown discard: when the discard to the data device fails, its
    /// end-io (`passdown_endio`) returns without queueing pass two (a
    /// patch that "stops on a failed passdown"): the mapping's cell is
    /// never released, so the user's discard never completes and every
    /// bio that later touches those blocks waits behind it, and pass one's
    /// hold on the data blocks (a count, or a hold in core) is never
    /// dropped.
    pub passdown_error_skips_pass_two: bool,
    /// Passdown discard: the data device's error is passed on to the
    /// user's discard (a patch that records it in the mapping's status for
    /// pass two to return): the discard fails with EIO, although its
    /// blocks were unmapped, where kernel 6.1 ignores the error and
    /// completes it successfully.
    pub passdown_error_fails_discard: bool,
    /// The regions design's discard split (DM core's
    /// `max_discard_granularity` of one prison region) cuts pieces one
    /// region long from where the last piece ended instead of at region
    /// boundaries (a patch that splits by length): a discard that starts
    /// inside a region and crosses the next boundary stays one piece,
    /// whose key crosses the boundary, and the thin target completes it
    /// without unmapping anything ("Discard doesn't respect bio prison
    /// limits").
    pub discard_split_unaligned: bool,
    /// Broken locking in the pool's concurrent core, for the loom and
    /// shuttle harnesses. Not in [`Self::ALL`]: single-stepped runs cannot
    /// open the windows these need, so the campaign's detector tests would
    /// not be meaningful for them.
    pub locking: LockingMutations,
}

/// Turns one locking mutation on.
pub type LockingSwitch = fn(&mut LockingMutations);

/// Deliberately broken locking and device lifecycle in the pool's (and the cache's) concurrent core, off by
/// default. Each opens a window between two threads that the kernel's
/// locking closes; the concurrency harnesses (`sim/tests/concurrency_*.rs`)
/// show loom or shuttle catching each one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LockingMutations {
    /// A provisioning mapping releases its virtual cell as soon as its
    /// preparation finishes (in the completion context), before the worker
    /// inserts the mapping: a bio arriving in between finds the block free
    /// and unmapped, and the worker provisions it a second time.
    pub release_cell_before_insert: bool,
    /// A discard runs as soon as it is prepared instead of waiting (in the
    /// all-I/O deferred set) for I/O issued before it: it unmaps and
    /// discards a block that a write is still in flight to.
    pub discard_skips_io_wait: bool,
    /// The map path's fast path remaps a mapped, unshared block without
    /// taking its data-block cell, so it ignores a break-sharing copy that
    /// holds that cell and writes to the copy's source. Harmless in the
    /// kernel's designs, where such a block is never unshared (see
    /// `LockingDesign::RefcountSharing`); caught in that design.
    pub fast_path_skips_data_cell: bool,
    /// `LockingDesign::RefcountSharing` only: the worker remaps a mapped,
    /// unshared block without taking its data-block cell (as 6.1 does), so
    /// a write deferred to the worker lands in a copy's source.
    pub worker_skips_data_cell: bool,
    /// `LockingDesign::RefcountSharing` only: the fast path does not look
    /// the block up again once it holds the data cell, so a copy that
    /// finished between its lookup and its detain goes unnoticed and the
    /// write lands in the copy's freed source.
    pub fast_path_skips_recheck: bool,
    /// `thin_dtr` frees the thin device (closes it in the metadata and
    /// drops its lists) without waiting for `can_destroy`, the completion
    /// the last `thin_put` signals: a worker pass that took a reference to
    /// the device before it left the active list then touches freed state.
    pub thin_dtr_skips_destroy_wait: bool,
    /// The worker walks the active thin devices without `thin_get`, as if
    /// the RCU read lock alone kept each device alive across its blocking
    /// processing: `thin_dtr`'s wait sees no reference and frees the
    /// device under the worker.
    pub worker_skips_thin_get: bool,
    /// `__delete_device` does not refuse a device that is still open
    /// (`open_count > 1` with its own open): the `delete` message removes
    /// an active thin device's mappings and details under its table.
    pub delete_ignores_open_count: bool,
    /// In the regions design, a prison key's region is computed from its
    /// `block_end` instead of its `block_begin`: a key ending on a region
    /// boundary (a discard of a whole region, or its last block) goes to
    /// the next region's lock and prison, where overlapping keys of its
    /// own region never meet it.
    pub region_from_block_end: bool,
    /// kcopyd's completion of a failed zeroing or copy (`copy_complete`)
    /// queues the mapping for the worker first and records the error in
    /// its status after (two statements swapped: the status written after
    /// `complete_mapping_preparation` published the mapping on the
    /// worker's list under `pool->lock`): a worker pass that runs in
    /// between finds the
    /// status clear and inserts the mapping, so the block is mapped with
    /// neither its zeroes nor its copy, and the bios in its cell succeed.
    /// Only a failed zeroing or copy takes this path, and only a worker
    /// running between the two opens the window.
    pub copy_error_after_queueing: bool,
    /// Cache target: `set_dirty` tests the block's dirty bit and sets it in
    /// two critical sections instead of one `test_and_set_bit`, so two
    /// writes to one clean cached block, mapped at once under their shared
    /// locks, can both find it clean and both count it: `nr_dirty` ends one
    /// above the bits set (the cache's harnesses,
    /// `sim/tests/cache_concurrency_*.rs`, catch it).
    pub cache_dirty_test_then_set: bool,
}

impl LockingMutations {
    /// Every locking mutation with its name.
    pub const ALL: [(&'static str, LockingSwitch); 11] = [
        ("release-cell-before-insert", |m| m.release_cell_before_insert = true),
        ("discard-skips-io-wait", |m| m.discard_skips_io_wait = true),
        ("fast-path-skips-data-cell", |m| m.fast_path_skips_data_cell = true),
        ("worker-skips-data-cell", |m| m.worker_skips_data_cell = true),
        ("fast-path-skips-recheck", |m| m.fast_path_skips_recheck = true),
        ("thin-dtr-skips-destroy-wait", |m| m.thin_dtr_skips_destroy_wait = true),
        ("worker-skips-thin-get", |m| m.worker_skips_thin_get = true),
        ("delete-ignores-open-count", |m| m.delete_ignores_open_count = true),
        ("region-from-block-end", |m| m.region_from_block_end = true),
        ("copy-error-after-queueing", |m| m.copy_error_after_queueing = true),
        ("cache-dirty-test-then-set", |m| m.cache_dirty_test_then_set = true),
    ];

    /// The locking mutation named `name` (see [`Self::ALL`]), as
    /// [`Mutations`].
    pub fn by_name(name: &str) -> Option<Mutations> {
        let (_, set) = Self::ALL.iter().find(|(n, _)| *n == name)?;
        let mut m = Mutations::default();
        set(&mut m.locking);
        Some(m)
    }
}

impl Mutations {
    /// Every mutation with its command-line name.
    pub const ALL: [(&'static str, Switch); 15] = [
        ("superblock-before-flush", |m| m.superblock_before_flush = true),
        ("reuse-freed-before-commit", |m| m.reuse_freed_before_commit = true),
        ("skip-zeroing", |m| m.skip_zeroing = true),
        ("snapshot-without-inc", |m| m.snapshot_without_inc = true),
        ("write-to-shared-in-place", |m| m.write_to_shared_in_place = true),
        ("passdown-ignores-sharing", |m| m.passdown_ignores_sharing = true),
        ("fua-before-commit", |m| m.fua_before_commit = true),
        ("data-not-flushed-before-commit", |m| m.data_not_flushed_before_commit = true),
        ("refcount-ignores-last-commit", |m| m.refcount_ignores_last_commit = true),
        ("passdown-frees-discarded-twice", |m| m.passdown_frees_discarded_twice = true),
        ("overwrite-drops-all-io-twice", |m| m.overwrite_drops_all_io_twice = true),
        ("passdown-releases-data-cell-twice", |m| m.passdown_releases_data_cell_twice = true),
        ("out-of-metadata-space-fails-writes", |m| m.out_of_metadata_space_fails_writes = true),
        ("metadata-grows-before-write-mode", |m| m.metadata_grows_before_write_mode = true),
        ("discard-split-unaligned", |m| m.discard_split_unaligned = true),
    ];

    /// The mutations that break the metadata commit protocol (caught by the
    /// metadata crash campaign).
    pub const METADATA: [&'static str; 2] = ["superblock-before-flush", "reuse-freed-before-commit"];

    /// Mutations of the cache metadata only (the thin campaign cannot see
    /// them; the cache metadata crash campaign catches them).
    pub const CACHE: [(&'static str, Switch); 2] = [
        ("array-set-in-place", |m| m.array_set_in_place = true),
        ("cache-commit-forgets-stats", |m| m.cache_commit_forgets_stats = true),
    ];

    /// Mutations of persistent-data's btrees that only the metadata
    /// campaign's shaped workloads reach (shared children collapsed, keys
    /// below the minimum and shared internal nodes of three-level trees).
    pub const TREES: [(&'static str, Switch); 3] = [
        ("collapse-forgets-shared-child", |m| m.collapse_forgets_shared_child = true),
        ("below-min-key-lowers-root-only", |m| m.below_min_key_lowers_root_only = true),
        ("shadow-child-skips-internal-children", |m| m.shadow_child_skips_internal_children = true),
    ];

    /// Mutations of the abort after a failed commit, which only the
    /// metadata campaign's aimed faults reach.
    pub const ABORTS: [(&'static str, Switch); 2] = [
        ("abort-keeps-mapping-root", |m| m.abort_keeps_mapping_root = true),
        ("abort-keeps-data-space-map", |m| m.abort_keeps_data_space_map = true),
    ];

    /// Mutations of the code the exact oracle under faults reaches: which
    /// requests a fault may fail, and when the pool may report ENOSPC
    /// (the thin campaign catches them; before the oracle knew which
    /// requests a fault could reach, and that ENOSPC needs the pool out of
    /// data space, it missed them).
    pub const UNDER_FAULTS: [(&'static str, Switch); 4] = [
        ("io-error-code-follows-feature", |m| m.io_error_code_follows_feature = true),
        ("out-of-data-space-one-block-early", |m| m.out_of_data_space_one_block_early = true),
        ("failed-mapping-errors-deferred-bios", |m| m.failed_mapping_errors_deferred_bios = true),
        ("failed-mapping-aborts", |m| m.failed_mapping_aborts = true),
    ];

    /// Mutations of the error paths after a failed commit, a failed abort
    /// and a failed passdown discard, which the thin swarm's aimed faults
    /// reach (`Op::AimFault`).
    pub const AIMED: [(&'static str, Switch); 4] = [
        ("failed-commit-acks-flush", |m| m.failed_commit_acks_flush = true),
        ("abort-ignores-superblock-read-error", |m| m.abort_ignores_superblock_read_error = true),
        ("passdown-error-skips-pass-two", |m| m.passdown_error_skips_pass_two = true),
        ("passdown-error-fails-discard", |m| m.passdown_error_fails_discard = true),
    ];

    /// Mutations of the cache target's I/O paths (the cache campaign
    /// catches them).
    pub const CACHE_TARGET: [(&'static str, Switch); 7] = [
        ("cache-dirty-trusted-after-crash", |m| m.cache_dirty_trusted_after_crash = true),
        ("cache-writeback-clean-before-copy", |m| m.cache_writeback_clean_before_copy = true),
        ("cache-promote-maps-before-copy", |m| m.cache_promote_maps_before_copy = true),
        ("cache-writethrough-acks-before-origin", |m| m.cache_writethrough_acks_before_origin = true),
        ("cache-demote-frees-dirty", |m| m.cache_demote_frees_dirty = true),
        ("cache-write-ignores-migration-lock", |m| m.cache_write_ignores_migration_lock = true),
        ("cache-shrink-drops-dirty", |m| m.cache_shrink_drops_dirty = true),
    ];

    /// The mutations the cache metadata crash campaign must catch: the
    /// broken commit protocols shared with the thin metadata (the
    /// transaction manager's) and the cache's own.
    pub const CACHE_METADATA: [&'static str; 4] = [
        "superblock-before-flush",
        "reuse-freed-before-commit",
        "array-set-in-place",
        "cache-commit-forgets-stats",
    ];

    /// Every named mutation: [`Self::ALL`], then [`Self::CACHE`], then
    /// [`Self::CACHE_TARGET`], then [`Self::TREES`], then [`Self::ABORTS`],
    /// then [`Self::UNDER_FAULTS`], then [`Self::AIMED`].
    fn every() -> impl Iterator<Item = &'static (&'static str, Switch)> {
        Self::ALL
            .iter()
            .chain(Self::CACHE.iter())
            .chain(Self::CACHE_TARGET.iter())
            .chain(Self::TREES.iter())
            .chain(Self::ABORTS.iter())
            .chain(Self::UNDER_FAULTS.iter())
            .chain(Self::AIMED.iter())
    }

    /// The mutation named `name` (see [`Self::ALL`] and [`Self::CACHE`]).
    pub fn by_name(name: &str) -> Option<Mutations> {
        let mut m = Mutations::default();
        let (_, set) = Self::every().find(|(n, _)| *n == name)?;
        set(&mut m);
        Some(m)
    }

    /// Whether any mutation is on.
    pub fn any(&self) -> bool {
        *self != Mutations::default()
    }

    /// The names of the mutations that are on, in [`Self::ALL`] order,
    /// then [`Self::CACHE`] order.
    pub fn names(&self) -> Vec<&'static str> {
        Self::every()
            .filter(|(_, set)| {
                let mut with = *self;
                set(&mut with);
                with == *self
            })
            .map(|(name, _)| *name)
            .collect()
    }

    /// The mutations named in `names` together; `None` if one is unknown.
    pub fn from_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<Mutations> {
        let mut m = Mutations::default();
        for name in names {
            let (_, set) = Self::every().find(|(n, _)| *n == name)?;
            set(&mut m);
        }
        Some(m)
    }
}
