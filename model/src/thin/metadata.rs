//! Thin-pool metadata (dm-thin-metadata.c, spec §2): the superblock, the
//! device details tree, the two-level mapping tree and the data space map,
//! with the kernel's operations and commit sequence, block for block.

use std::collections::BTreeMap;

use thiserror::Error;

use super::superblock::Superblock;
use crate::block_device::BlockDevice;
use crate::pdata::btree::{BtreeInfo, CountsAsOf, ValueType};
use crate::pdata::layout::space_map::{MAX_METADATA_BLOCKS, ROOT_AREA_SIZE};
use crate::pdata::layout::thin::*;
use crate::pdata::layout::{put_u32, put_u64, BlockKind, BLOCK_SECTORS};
use crate::pdata::transaction::TransactionManager;
use crate::pdata::{BlockNr, PdataError};

/// The two-level mapping tree: device id, then virtual block.
pub const MAPPING_INFO: BtreeInfo = BtreeInfo { levels: 2, value_type: ValueType::DataBlockTimes };
/// The mapping tree's top level on its own: device id → device tree root.
pub const TOP_LEVEL_INFO: BtreeInfo = BtreeInfo { levels: 1, value_type: ValueType::SubtreeRoots };
/// One device's mapping tree: virtual block → data block and time.
pub const BOTTOM_LEVEL_INFO: BtreeInfo = BtreeInfo { levels: 1, value_type: ValueType::DataBlockTimes };
/// The device details tree.
pub const DETAILS_INFO: BtreeInfo =
    BtreeInfo { levels: 1, value_type: ValueType::Plain(DEVICE_DETAILS_SIZE) };

/// A thin device id (24 bits are accepted by the pool messages).
pub type ThinId = u64;

/// Failures of thin metadata operations, with the kernel's errno in the name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ThinError {
    /// -EEXIST.
    #[error("thin device {0} already exists")]
    Exists(ThinId),
    /// -ENODATA for a device.
    #[error("thin device {0} does not exist")]
    NoSuchDevice(ThinId),
    /// -EBUSY: the device is open.
    #[error("thin device {0} is open")]
    Busy(ThinId),
    /// -EBUSY: a metadata snapshot is already held.
    #[error("a metadata snapshot already exists: release it before taking another")]
    SnapshotExists,
    /// -EINVAL: no metadata snapshot is held.
    #[error("no metadata snapshot to release")]
    NoSnapshot,
    /// -EINVAL from set_transaction_id.
    #[error("mismatched transaction id: current {current}, given {given}")]
    TransactionIdMismatch {
        /// The pool's transaction id.
        current: u64,
        /// The one the caller expected.
        given: u64,
    },
    /// -EINVAL: a previous abort failed; the metadata refuses all work.
    #[error("metadata failed (fail_io): a previous abort could not reopen it")]
    FailIo,
    /// -EPERM: the device is unformatted and formatting was not allowed.
    #[error("metadata device is unformatted")]
    Unformatted,
    /// The superblock or the table disagree.
    #[error("cannot open metadata: {0}")]
    Open(String),
    /// The device is not open (a bug in the caller, not a kernel errno).
    #[error("thin device {0} is not open")]
    NotOpen(ThinId),
    /// A persistent-data failure.
    #[error(transparent)]
    Pdata(#[from] PdataError),
    /// The pool's pre-commit flush of the data device failed.
    #[error("flushing the data device before the commit failed: {0}")]
    DataFlush(crate::block_device::IoError),
    /// -EPERM: the metadata is read-only (the pool is in
    /// out-of-metadata-space, read-only or fail mode), and every change
    /// is refused, as the kernel's block manager refuses write locks
    /// (`dm_bm_write_lock`).
    #[error("the metadata is read-only")]
    ReadOnly,
}

/// Result of thin metadata operations.
pub type Result<T, E = ThinError> = std::result::Result<T, E>;

/// The in-core record of a thin device (the kernel's `dm_thin_device`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinDevice {
    /// Device id.
    pub id: ThinId,
    /// Opens outstanding.
    pub open_count: u32,
    /// Details changed since the last commit.
    pub changed: bool,
    /// Had uncommitted changes when the transaction was aborted.
    pub aborted_with_changes: bool,
    /// Mappings the device has.
    pub mapped_blocks: u64,
    /// Pool transaction id at creation.
    pub transaction_id: u64,
    /// Pool time at creation.
    pub creation_time: u32,
    /// Pool time of the last snapshot it took part in.
    pub snapshotted_time: u32,
}

/// What a mapping lookup returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LookupResult {
    /// The data block.
    pub block: u64,
    /// The block may be shared with a snapshot (the device was snapshotted
    /// after the mapping was made).
    pub shared: bool,
}

/// A run found by [`ThinMetadata::find_mapped_range`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MappedRange {
    /// First virtual block.
    pub thin_begin: u64,
    /// One past the last virtual block.
    pub thin_end: u64,
    /// Data block of `thin_begin`.
    pub pool_begin: u64,
    /// Whether the run may be shared.
    pub maybe_shared: bool,
}

/// Pool metadata on a metadata device.
#[derive(Debug, Clone)]
pub struct ThinMetadata<D> {
    tm: TransactionManager<D>,
    data_block_size: u32,
    time: u32,
    root: BlockNr,
    details_root: BlockNr,
    trans_id: u64,
    flags: u32,
    /// The metadata snapshot's root, written to the superblock by the next
    /// commit (kernel 6.1.178 and later keep it in memory; before, it was
    /// written into block 0 in place, outside a commit: see
    /// docs/findings.md, finding 9).
    held_root: BlockNr,
    in_service: bool,
    fail_io: bool,
    read_only: bool,
    /// Most recently added first, as the kernel's list.
    devices: Vec<ThinDevice>,
    metadata_reserve: u64,
    /// Data blocks held in core ([`Self::hold_data_range`]), with how many
    /// holds each: no count on disk, but never handed out.
    held: BTreeMap<u64, u32>,
}

impl<D: BlockDevice> ThinMetadata<D> {
    /// Opens pool metadata, formatting the device if block 0 is all zeroes
    /// and `format_device` allows it (`dm_pool_metadata_open`).
    pub fn open(dev: D, data_block_size: u32, format_device: bool) -> Result<Self> {
        let tm = Self::open_or_format(dev, data_block_size, format_device)?;
        let mut md = ThinMetadata {
            tm,
            data_block_size,
            time: 0,
            root: 0,
            details_root: 0,
            trans_id: 0,
            held_root: 0,
            flags: 0,
            in_service: false,
            fail_io: false,
            read_only: false,
            devices: Vec::new(),
            metadata_reserve: 0,
            held: BTreeMap::new(),
        };
        md.begin_transaction()?;
        md.set_metadata_reserve();
        Ok(md)
    }

    /// Formats `dev` as empty pool metadata and opens it.
    pub fn format(dev: D, data_block_size: u32) -> Result<Self> {
        Self::open(dev, data_block_size, true)
    }

    fn open_or_format(dev: D, data_block_size: u32, format_device: bool) -> Result<TransactionManager<D>> {
        let mut tm = TransactionManager::unopened(dev);
        if tm.block_manager().read_raw(SUPERBLOCK_LOCATION)?.iter().all(|&b| b == 0) {
            if !format_device {
                return Err(ThinError::Unformatted);
            }
            return Self::format_metadata(tm.into_device(), data_block_size);
        }
        Self::load_committed(&mut tm, data_block_size)?;
        Ok(tm)
    }

    fn format_metadata(dev: D, data_block_size: u32) -> Result<TransactionManager<D>> {
        let metadata_sectors = dev.nr_sectors().min(MAX_METADATA_BLOCKS * BLOCK_SECTORS);
        let mut tm = TransactionManager::create(dev, SUPERBLOCK_LOCATION)?;
        tm.data_sm_create(0)?;
        let root = tm.btree_empty(ValueType::DataBlockTimes)?;
        let details_root = tm.btree_empty(DETAILS_INFO.value_type)?;
        // The initial superblock is written outside the normal commit.
        tm.data_sm_commit()?;
        tm.pre_commit()?;
        let (msm_root, dsm_root) = (tm.metadata_sm_root(), tm.data_sm_root());
        let sb = tm.block_manager().write_zero(SUPERBLOCK_LOCATION, BlockKind::ThinSuperblock)?;
        put_u64(sb, SB_MAGIC, SUPERBLOCK_MAGIC);
        put_u32(sb, SB_VERSION, METADATA_VERSION);
        msm_root.encode(&mut sb[SB_METADATA_SM_ROOT..]);
        dsm_root.encode(&mut sb[SB_DATA_SM_ROOT..]);
        put_u64(sb, SB_DATA_MAPPING_ROOT, root);
        put_u64(sb, SB_DEVICE_DETAILS_ROOT, details_root);
        put_u32(sb, SB_METADATA_BLOCK_SIZE, BLOCK_SECTORS as u32);
        put_u64(sb, SB_METADATA_NR_BLOCKS, metadata_sectors / BLOCK_SECTORS);
        put_u32(sb, SB_DATA_BLOCK_SIZE, data_block_size);
        tm.commit()?;
        Ok(tm)
    }

    /// Checks the superblock and opens both space maps from it.
    fn load_committed(tm: &mut TransactionManager<D>, data_block_size: u32) -> Result<()> {
        let block0 = *tm.read(SUPERBLOCK_LOCATION, BlockKind::ThinSuperblock)?;
        let sb = Superblock::decode(&block0);
        if sb.magic != SUPERBLOCK_MAGIC {
            return Err(ThinError::Open(format!(
                "superblock magic is {}, expected {SUPERBLOCK_MAGIC}",
                sb.magic
            )));
        }
        if sb.data_block_size != data_block_size {
            return Err(ThinError::Open(format!(
                "changing the data block size (from {} to {data_block_size}) is not supported",
                sb.data_block_size
            )));
        }
        if sb.incompat_flags != 0 || sb.compat_ro_flags != 0 {
            return Err(ThinError::Open(format!(
                "unsupported features (incompat {:#x}, compat_ro {:#x})",
                sb.incompat_flags, sb.compat_ro_flags
            )));
        }
        tm.metadata_sm_open(&block0[SB_METADATA_SM_ROOT..SB_METADATA_SM_ROOT + ROOT_AREA_SIZE])?;
        tm.data_sm_open(&block0[SB_DATA_SM_ROOT..SB_DATA_SM_ROOT + ROOT_AREA_SIZE])?;
        Ok(())
    }

    fn superblock(&mut self) -> Result<Superblock> {
        let b = self.tm.read(SUPERBLOCK_LOCATION, BlockKind::ThinSuperblock)?;
        Ok(Superblock::decode(b))
    }

    /// Loads the transaction's starting state from the superblock.
    fn begin_transaction(&mut self) -> Result<()> {
        let sb = self.superblock()?;
        self.time = sb.time;
        self.root = sb.data_mapping_root;
        self.details_root = sb.device_details_root;
        self.trans_id = sb.trans_id;
        self.held_root = sb.held_root;
        self.flags = sb.flags;
        self.data_block_size = sb.data_block_size;
        Ok(())
    }

    fn set_metadata_reserve(&mut self) {
        let total = self.tm.metadata_sm_nr_blocks();
        self.metadata_reserve = (total / 10).min(4096);
    }

    /// Every mutating operation: refuse after a failed abort, and while
    /// the metadata is read-only ([`Self::set_read_only`]: the kernel's
    /// block manager then refuses every write lock, so the operation fails
    /// at its first change); put the pool in service (so that commits
    /// write).
    fn write_lock(&mut self) -> Result<()> {
        if self.fail_io {
            return Err(ThinError::FailIo);
        }
        if self.read_only {
            return Err(ThinError::ReadOnly);
        }
        self.in_service = true;
        Ok(())
    }

    fn check_fail_io(&self) -> Result<()> {
        if self.fail_io {
            Err(ThinError::FailIo)
        } else {
            Ok(())
        }
    }

    /// Switches deliberate bugs on or off (detector tests only).
    pub fn set_mutations(&mut self, m: crate::mutation::Mutations) {
        self.tm.mutations = m;
    }

    /// Whether a reference count that cannot be updated fails the
    /// operation (true) or is skipped as 6.1 does
    /// ([`crate::pdata::transaction::TransactionManager::refcount_errors_fail`]).
    pub fn set_refcount_errors_fail(&mut self, fail: bool) {
        self.tm.refcount_errors_fail = fail;
    }

    /// The first inconsistency the metadata's operations met, kept across
    /// aborts (see [`TransactionManager::broken`]).
    pub fn broken(&self) -> Option<&str> {
        self.tm.broken()
    }

    /// The transaction manager (for the checker's tests and tools).
    pub fn transaction_manager(&mut self) -> &mut TransactionManager<D> {
        &mut self.tm
    }

    // ---- devices ----

    fn find_device(&self, id: ThinId) -> Option<usize> {
        self.devices.iter().position(|d| d.id == id)
    }

    fn details_lookup(&mut self, id: ThinId) -> Result<Option<DeviceDetails>> {
        let mut buf = [0u8; DEVICE_DETAILS_SIZE];
        let found = self.tm.btree_lookup(&DETAILS_INFO, self.details_root, &[id], &mut buf)?;
        Ok(found.then(|| DeviceDetails::decode(&buf)))
    }

    /// Opens (or with `create`, creates) the in-core record of `id`.
    fn open_device(&mut self, id: ThinId, create: bool) -> Result<usize> {
        if let Some(i) = self.find_device(id) {
            if create {
                return Err(ThinError::Exists(id));
            }
            self.devices[i].open_count += 1;
            return Ok(i);
        }
        let (details, changed) = match self.details_lookup(id)? {
            Some(d) => (d, false),
            None if create => (
                DeviceDetails {
                    mapped_blocks: 0,
                    transaction_id: self.trans_id,
                    creation_time: self.time,
                    snapshotted_time: self.time,
                },
                true,
            ),
            None => return Err(ThinError::NoSuchDevice(id)),
        };
        self.devices.insert(
            0,
            ThinDevice {
                id,
                open_count: 1,
                changed,
                aborted_with_changes: false,
                mapped_blocks: details.mapped_blocks,
                transaction_id: details.transaction_id,
                creation_time: details.creation_time,
                snapshotted_time: details.snapshotted_time,
            },
        );
        Ok(0)
    }

    /// Opens a thin device, as an active thin target does.
    pub fn open_thin(&mut self, id: ThinId) -> Result<()> {
        self.check_fail_io()?;
        self.open_device(id, false).map(|_| ())
    }

    /// Closes a thin device opened with [`Self::open_thin`].
    pub fn close_thin(&mut self, id: ThinId) -> Result<()> {
        let i = self.find_device(id).ok_or(ThinError::NotOpen(id))?;
        let d = &mut self.devices[i];
        d.open_count = d.open_count.checked_sub(1).ok_or(ThinError::NotOpen(id))?;
        Ok(())
    }

    fn open_index(&self, id: ThinId) -> Result<usize> {
        match self.find_device(id) {
            Some(i) if self.devices[i].open_count > 0 => Ok(i),
            _ => Err(ThinError::NotOpen(id)),
        }
    }

    /// Creates an empty thin device.
    pub fn create_thin(&mut self, id: ThinId) -> Result<()> {
        self.write_lock()?;
        if self.details_lookup(id)?.is_some() {
            return Err(ThinError::Exists(id));
        }
        let dev_root = self.tm.btree_empty(BOTTOM_LEVEL_INFO.value_type)?;
        let (root, _) = self.tm.btree_insert(&TOP_LEVEL_INFO, self.root, &[id], &dev_root.to_le_bytes())?;
        self.root = root;
        match self.open_device(id, true) {
            Ok(i) => {
                self.devices[i].open_count -= 1;
                Ok(())
            }
            Err(e) => {
                self.root = self.tm.btree_remove(&TOP_LEVEL_INFO, self.root, &[id])?;
                self.tm.btree_del(&BOTTOM_LEVEL_INFO, dev_root)?;
                Err(e)
            }
        }
    }

    /// Creates device `id` as a snapshot of `origin` (which may itself be a
    /// snapshot): the two share the origin's whole mapping tree.
    pub fn create_snap(&mut self, id: ThinId, origin: ThinId) -> Result<()> {
        self.write_lock()?;
        if self.details_lookup(id)?.is_some() {
            return Err(ThinError::Exists(id));
        }
        let mut buf = [0u8; 8];
        if !self.tm.btree_lookup(&TOP_LEVEL_INFO, self.root, &[origin], &mut buf)? {
            return Err(ThinError::NoSuchDevice(origin));
        }
        let origin_root = u64::from_le_bytes(buf);
        if !self.tm.mutations.snapshot_without_inc {
            self.tm.inc(origin_root)?;
        }
        match self.tm.btree_insert(&TOP_LEVEL_INFO, self.root, &[id], &origin_root.to_le_bytes()) {
            Ok((root, _)) => self.root = root,
            Err(e) => {
                self.tm.dec(origin_root)?;
                return Err(e.into());
            }
        }
        self.time += 1;
        let time = self.time;
        if let Err(e) = self.open_device(id, true) {
            // The kernel's failure path. Reachable only when messages are not
            // committed one by one (the pool always commits after each), and
            // then it leaves the metadata inconsistent just as the kernel does.
            self.root = self.tm.btree_remove(&TOP_LEVEL_INFO, self.root, &[id])?;
            if let Ok(root) = self.tm.btree_remove(&DETAILS_INFO, self.details_root, &[id]) {
                self.details_root = root;
            }
            return Err(e);
        }
        let r = self.open_device(origin, false).map(|_| {
            let o = self.find_device(origin).expect("just opened");
            let origin_mapped = self.devices[o].mapped_blocks;
            let od = &mut self.devices[o];
            od.changed = true;
            od.snapshotted_time = time;
            od.open_count -= 1;
            let s = self.find_device(id).expect("just created");
            self.devices[s].mapped_blocks = origin_mapped;
            self.devices[s].snapshotted_time = time;
        });
        let s = self.find_device(id).expect("just created");
        self.devices[s].open_count -= 1;
        if let Err(e) = r {
            self.root = self.tm.btree_remove(&TOP_LEVEL_INFO, self.root, &[id])?;
            if let Ok(root) = self.tm.btree_remove(&DETAILS_INFO, self.details_root, &[id]) {
                self.details_root = root;
            }
            return Err(e);
        }
        Ok(())
    }

    /// Deletes a thin device and drops its mappings.
    pub fn delete_thin(&mut self, id: ThinId) -> Result<()> {
        self.write_lock()?;
        let i = self.open_device(id, false)?;
        if self.devices[i].open_count > 1 && !self.tm.mutations.locking.delete_ignores_open_count {
            self.devices[i].open_count -= 1;
            return Err(ThinError::Busy(id));
        }
        self.devices.remove(i);
        self.details_root = self.tm.btree_remove(&DETAILS_INFO, self.details_root, &[id])?;
        self.root = self.tm.btree_remove(&TOP_LEVEL_INFO, self.root, &[id])?;
        Ok(())
    }

    /// Sets the userspace transaction id if it is currently `current`.
    pub fn set_transaction_id(&mut self, current: u64, new: u64) -> Result<()> {
        self.write_lock()?;
        if self.trans_id != current {
            return Err(ThinError::TransactionIdMismatch { current: self.trans_id, given: current });
        }
        self.trans_id = new;
        Ok(())
    }

    /// The userspace transaction id.
    pub fn transaction_id(&self) -> Result<u64> {
        self.check_fail_io()?;
        Ok(self.trans_id)
    }

    // ---- mappings ----

    /// Maps virtual block `vblock` of open device `id` to `data_block`,
    /// stamped with the pool's current time.
    pub fn insert_block(&mut self, id: ThinId, vblock: u64, data_block: u64) -> Result<()> {
        self.write_lock()?;
        let i = self.open_index(id)?;
        let value = pack_block_time(data_block, self.time);
        let (root, inserted) =
            self.tm.btree_insert(&MAPPING_INFO, self.root, &[id, vblock], &value.to_le_bytes())?;
        self.root = root;
        let d = &mut self.devices[i];
        d.changed = true;
        if inserted {
            d.mapped_blocks += 1;
        }
        Ok(())
    }

    /// Looks up virtual block `vblock` of open device `id`.
    pub fn find_block(&mut self, id: ThinId, vblock: u64) -> Result<Option<LookupResult>> {
        self.check_fail_io()?;
        let i = self.open_index(id)?;
        let mut buf = [0u8; 8];
        if !self.tm.btree_lookup(&MAPPING_INFO, self.root, &[id, vblock], &mut buf)? {
            return Ok(None);
        }
        Ok(Some(self.unpack_lookup(i, u64::from_le_bytes(buf))))
    }

    /// Whether the mapping of `vblock` in device `id` to `data_block` is
    /// reachable from anywhere else, by reference counts rather than the
    /// kernel's snapshot-time rule: the data block has more than one
    /// reference, or a mapping-tree node on the way to it does (sharing is
    /// lazy: a snapshot only adds a reference to its origin's root, and
    /// the counts move down as shared nodes are shadowed).
    ///
    /// Asked of the current transaction *and* of the last commit: a block
    /// that another device let go of in this transaction (breaking sharing
    /// with a copy, or discarding it) is still shared in the state a crash
    /// goes back to, and writing it in place would change that device's
    /// data there.
    /// A metadata snapshot makes every mapping shared by this rule, which
    /// only costs copies.
    pub fn mapping_shared_by_refcount(&mut self, id: ThinId, vblock: u64, data_block: u64) -> Result<bool> {
        self.check_fail_io()?;
        let keys = [id, vblock];
        let now = self.tm.btree_path_shared(&MAPPING_INFO, self.root, &keys, CountsAsOf::Now)?;
        if now.unwrap_or(true) || self.tm.data_sm_get_count(data_block)? > 1 {
            return Ok(true);
        }
        if self.tm.mutations.refcount_ignores_last_commit {
            return Ok(false);
        }
        let committed_root = self.superblock()?.data_mapping_root;
        let then = self.tm.btree_path_shared(&MAPPING_INFO, committed_root, &keys, CountsAsOf::LastCommit)?;
        Ok(then.unwrap_or(false) || self.tm.data_sm_get_committed_count(data_block)? > 1)
    }

    /// Whether the last commit reaches data block `data_block` from
    /// anywhere but virtual block `vblock` of device `id`: the state a crash
    /// goes back to would then show the block's contents in another
    /// device, or at another virtual block, than the one asking.
    ///
    /// The committed space map's count alone cannot say so: a snapshot
    /// shares its origin's tree nodes, not its data blocks' counts, until
    /// the nodes are shadowed. So a block counted once at the last commit
    /// is held only by `id`'s `vblock` when that committed mapping names
    /// it and every node on the committed path to it has a single
    /// reference. A metadata snapshot makes every committed path shared by
    /// this rule, so everything counts as held elsewhere while one exists.
    pub fn data_block_held_elsewhere_at_last_commit(
        &mut self,
        id: ThinId,
        vblock: u64,
        data_block: u64,
    ) -> Result<bool> {
        self.check_fail_io()?;
        match self.tm.data_sm_get_committed_count(data_block)? {
            0 => return Ok(false),
            1 => {}
            _ => return Ok(true),
        }
        let committed_root = self.superblock()?.data_mapping_root;
        let keys = [id, vblock];
        let mut buf = [0u8; 8];
        if !self.tm.btree_lookup(&MAPPING_INFO, committed_root, &keys, &mut buf)? {
            // The single committed reference is someone else's.
            return Ok(true);
        }
        if unpack_block_time(u64::from_le_bytes(buf)).0 != data_block {
            return Ok(true);
        }
        let path = self.tm.btree_path_shared(&MAPPING_INFO, committed_root, &keys, CountsAsOf::LastCommit)?;
        Ok(path.unwrap_or(true))
    }

    fn unpack_lookup(&self, i: usize, value: u64) -> LookupResult {
        let (block, time) = unpack_block_time(value);
        LookupResult { block, shared: self.devices[i].snapshotted_time > time }
    }

    /// The first mapped run in `begin..end` of virtual blocks that maps to
    /// consecutive data blocks with the same sharing.
    pub fn find_mapped_range(&mut self, id: ThinId, begin: u64, end: u64) -> Result<Option<MappedRange>> {
        self.check_fail_io()?;
        let i = self.open_index(id)?;
        if end < begin {
            return Ok(None);
        }
        let mut buf = [0u8; 8];
        let Some(first) = self.tm.btree_lookup_next(&MAPPING_INFO, self.root, &[id, begin], &mut buf)? else {
            return Ok(None);
        };
        if first >= end {
            return Ok(None);
        }
        let l = self.unpack_lookup(i, u64::from_le_bytes(buf));
        let mut range = MappedRange {
            thin_begin: first,
            thin_end: first + 1,
            pool_begin: l.block,
            maybe_shared: l.shared,
        };
        let mut pool_end = l.block + 1;
        while range.thin_end != end {
            let Some(next) = self.find_block(id, range.thin_end)? else { break };
            if next.block != pool_end || next.shared != range.maybe_shared {
                break;
            }
            pool_end += 1;
            range.thin_end += 1;
        }
        Ok(Some(range))
    }

    /// Unmaps every virtual block of `begin..end` of open device `id`,
    /// dropping the data block references.
    pub fn remove_range(&mut self, id: ThinId, begin: u64, end: u64) -> Result<()> {
        self.write_lock()?;
        let i = self.open_index(id)?;
        let mut buf = [0u8; 8];
        if !self.tm.btree_lookup(&TOP_LEVEL_INFO, self.root, &[id], &mut buf)? {
            return Err(ThinError::NoSuchDevice(id));
        }
        // Take the device's tree out of the top level (holding an extra
        // reference so it survives), work on it, and put it back: the
        // kernel's way, which restructures the top level every time.
        let mut mapping_root = u64::from_le_bytes(buf);
        self.tm.inc(mapping_root)?;
        self.root = self.tm.btree_remove(&TOP_LEVEL_INFO, self.root, &[id])?;
        let mut begin = begin;
        let mut total = 0;
        while begin < end {
            let Some(next) =
                self.tm.btree_lookup_next(&BOTTOM_LEVEL_INFO, mapping_root, &[begin], &mut buf)?
            else {
                break;
            };
            begin = next;
            if begin >= end {
                break;
            }
            let mut keys = [begin];
            let (root, count) =
                self.tm.btree_remove_leaves(&BOTTOM_LEVEL_INFO, mapping_root, &mut keys, end)?;
            mapping_root = root;
            if count == 0 {
                // The search found a key the removal cannot reach: only a
                // damaged tree does that, and the kernel's loop would spin
                // here for ever.
                return Err(self
                    .tm
                    .runaway(
                        BlockKind::BtreeNode,
                        mapping_root,
                        format!("mapping tree of device {id}: vblock {begin} is found but cannot be removed"),
                    )
                    .into());
            }
            begin = keys[0];
            total += count;
        }
        let d = &mut self.devices[i];
        d.mapped_blocks -= total;
        d.changed = true;
        let (root, _) =
            self.tm.btree_insert(&TOP_LEVEL_INFO, self.root, &[id], &mapping_root.to_le_bytes())?;
        self.root = root;
        Ok(())
    }

    /// Mappings of open device `id`.
    pub fn mapped_count(&self, id: ThinId) -> Result<u64> {
        self.check_fail_io()?;
        Ok(self.devices[self.open_index(id)?].mapped_blocks)
    }

    /// Every mapping of device `id` as (virtual block, data block), in
    /// order, from one walk of its tree (the device need not be open).
    pub fn mappings(&mut self, id: ThinId) -> Result<Vec<(u64, u64)>> {
        self.check_fail_io()?;
        let mut buf = [0u8; 8];
        if !self.tm.btree_lookup(&TOP_LEVEL_INFO, self.root, &[id], &mut buf)? {
            return Err(ThinError::NoSuchDevice(id));
        }
        let mut out = Vec::new();
        self.tm.btree_walk(u64::from_le_bytes(buf), BOTTOM_LEVEL_INFO.value_type, &mut |k, v| {
            let value = u64::from_le_bytes(v.try_into().expect("8-byte mapping values"));
            out.push((k, unpack_block_time(value).0));
            Ok(())
        })?;
        Ok(out)
    }

    /// Levels of device `id`'s mapping tree (1: a single leaf), counted
    /// down its leftmost path.
    pub fn tree_levels(&mut self, id: ThinId) -> Result<u32> {
        self.check_fail_io()?;
        let mut buf = [0u8; 8];
        if !self.tm.btree_lookup(&TOP_LEVEL_INFO, self.root, &[id], &mut buf)? {
            return Err(ThinError::NoSuchDevice(id));
        }
        Ok(self.tm.btree_levels(u64::from_le_bytes(buf), BOTTOM_LEVEL_INFO.value_type)?)
    }

    /// The highest mapped virtual block of open device `id`, if any
    /// (`dm_thin_get_highest_mapped_block`).
    pub fn highest_mapped_block(&mut self, id: ThinId) -> Result<Option<u64>> {
        self.check_fail_io()?;
        self.open_index(id)?;
        let mut buf = [0u8; 8];
        if !self.tm.btree_lookup(&TOP_LEVEL_INFO, self.root, &[id], &mut buf)? {
            return Ok(None);
        }
        let mut highest = None;
        self.tm.btree_walk(u64::from_le_bytes(buf), BOTTOM_LEVEL_INFO.value_type, &mut |k, _| {
            highest = Some(k);
            Ok(())
        })?;
        Ok(highest)
    }

    /// Whether open device `id` has uncommitted changes.
    pub fn thin_changed_this_transaction(&self, id: ThinId) -> Result<bool> {
        Ok(self.devices[self.open_index(id)?].changed)
    }

    /// Whether any device has uncommitted changes.
    pub fn changed_this_transaction(&self) -> bool {
        self.devices.iter().any(|d| d.changed)
    }

    /// Whether open device `id` lost changes to an abort.
    pub fn thin_aborted_changes(&self, id: ThinId) -> Result<bool> {
        Ok(self.devices[self.open_index(id)?].aborted_with_changes)
    }

    // ---- data blocks ----

    /// Allocates a data block (never one held in core).
    pub fn alloc_data_block(&mut self) -> Result<u64> {
        self.write_lock()?;
        if self.held.is_empty() {
            return Ok(self.tm.data_sm_new_block()?);
        }
        let held = &self.held;
        Ok(self.tm.data_sm_new_block_skipping(&|b| held.contains_key(&b))?)
    }

    /// Holds data blocks `b..e` in core: the allocator passes over them as
    /// if they were counted, but no count changes, so no commit can make
    /// the hold durable (the fix of
    /// `KernelFixes::passdown_holds_blocks_in_core`; the kernel holds them
    /// with [`Self::inc_data_range`]). Holds live until released, across
    /// aborts; a crash forgets them.
    pub fn hold_data_range(&mut self, b: u64, e: u64) {
        for block in b..e {
            *self.held.entry(block).or_insert(0) += 1;
        }
    }

    /// Releases a hold of [`Self::hold_data_range`]. Releasing a block that
    /// is not held is an inconsistency the model keeps (see
    /// [`Self::broken`]).
    pub fn release_data_range(&mut self, b: u64, e: u64) -> Result<()> {
        for block in b..e {
            match self.held.get_mut(&block) {
                Some(1) => {
                    self.held.remove(&block);
                }
                Some(n) => *n -= 1,
                None => return Err(self.tm.noted(PdataError::RefCountUnderflow(block)).into()),
            }
        }
        Ok(())
    }

    /// Whether data block `b` has more than one reference.
    pub fn data_block_is_shared(&mut self, b: u64) -> Result<bool> {
        self.check_fail_io()?;
        Ok(self.tm.data_sm_get_count(b)? > 1)
    }

    /// The reference count of data block `b`.
    pub fn data_block_count(&mut self, b: u64) -> Result<u32> {
        self.check_fail_io()?;
        Ok(self.tm.data_sm_get_count(b)?)
    }

    /// Adds a reference to data blocks `b..e`.
    pub fn inc_data_range(&mut self, b: u64, e: u64) -> Result<()> {
        self.write_lock()?;
        Ok(self.tm.data_sm_inc(b, e)?)
    }

    /// Drops a reference to data blocks `b..e`.
    pub fn dec_data_range(&mut self, b: u64, e: u64) -> Result<()> {
        self.write_lock()?;
        Ok(self.tm.data_sm_dec(b, e)?)
    }

    /// Free data blocks.
    pub fn free_data_blocks(&mut self) -> Result<u64> {
        self.check_fail_io()?;
        let free = self.tm.data_sm_nr_free();
        // A block held in core is as used as the kernel's counted hold
        // makes it.
        let mut held_free = 0;
        for &b in self.held.keys() {
            held_free += u64::from(self.tm.data_sm_get_count(b)? == 0);
        }
        Ok(free.saturating_sub(held_free))
    }

    /// Free data blocks as the data space map counts them in core
    /// (`sm_disk_get_nr_free`: a block freed in the open transaction counts
    /// free), without reading anything; `None` while a block is held in
    /// core ([`Self::free_data_blocks`] then reads its count).
    pub fn free_data_blocks_in_core(&mut self) -> Option<u64> {
        let known = self.held.is_empty() && self.check_fail_io().is_ok() && self.tm.has_data_sm();
        known.then(|| self.tm.data_sm_nr_free())
    }

    /// Data blocks the allocator could hand out now: free in both the open
    /// transaction and the last commit (`sm_disk_new_block` takes no
    /// other) and not held in core. Reads the data space map's bitmaps
    /// (cached after an allocation has just searched them).
    pub fn data_blocks_free_in_both(&mut self) -> Result<u64> {
        self.check_fail_io()?;
        let held = &self.held;
        let mut count = 0;
        let mut begin = 0;
        while let Some(b) = self.tm.data_sm_find_free_in_both(begin, &|b| held.contains_key(&b))? {
            count += 1;
            begin = b + 1;
        }
        Ok(count)
    }

    /// Free metadata blocks as the pool reports them (less the reserve).
    pub fn free_metadata_blocks(&mut self) -> Result<u64> {
        self.check_fail_io()?;
        Ok(self.tm.metadata_sm_nr_free().saturating_sub(self.metadata_reserve))
    }

    /// Size of the data device in blocks, as of the last commit.
    pub fn data_dev_size(&mut self) -> Result<u64> {
        self.check_fail_io()?;
        Ok(self.tm.data_sm_nr_blocks())
    }

    /// Size of the metadata device in blocks.
    pub fn metadata_dev_size(&mut self) -> Result<u64> {
        self.check_fail_io()?;
        Ok(self.tm.metadata_sm_nr_blocks())
    }

    /// Grows the data device to `new_count` blocks (shrinking is refused).
    pub fn resize_data_dev(&mut self, new_count: u64) -> Result<()> {
        self.write_lock()?;
        let old = self.tm.data_sm_nr_blocks();
        if new_count < old {
            return Err(PdataError::Invalid("cannot reduce size of space map".into()).into());
        }
        if new_count > old {
            self.tm.data_sm_extend(new_count - old)?;
        }
        Ok(())
    }

    /// Grows the metadata device to `new_count` blocks (shrinking is refused).
    pub fn resize_metadata_dev(&mut self, new_count: u64) -> Result<()> {
        self.write_lock()?;
        let old = self.tm.metadata_sm_nr_blocks();
        if new_count < old {
            return Err(PdataError::Invalid("cannot reduce size of space map".into()).into());
        }
        if new_count > old {
            self.tm.metadata_sm_extend(new_count - old)?;
        }
        self.set_metadata_reserve();
        Ok(())
    }

    /// The data block size in sectors.
    pub fn data_block_size(&self) -> u32 {
        self.data_block_size
    }

    /// The pool's snapshot time counter.
    pub fn time(&self) -> u32 {
        self.time
    }

    // ---- metadata snapshots ----

    /// Takes a metadata snapshot: a copy of the superblock that holds the
    /// current trees, for userspace tools to read while the pool runs.
    pub fn reserve_metadata_snap(&mut self) -> Result<()> {
        self.write_lock()?;
        self.commit_transaction(&mut || Ok(()))?;
        self.tm.inc(SUPERBLOCK_LOCATION)?;
        let copy = self.tm.shadow_block(SUPERBLOCK_LOCATION, BlockKind::ThinSuperblock)?.block;
        let data = self.tm.write_locked(copy, BlockKind::ThinSuperblock)?;
        if crate::pdata::layout::get_u64(data, SB_HELD_ROOT) != 0 {
            self.tm.dec(copy)?;
            return Err(ThinError::SnapshotExists);
        }
        data[SB_DATA_SM_ROOT..SB_DATA_SM_ROOT + ROOT_AREA_SIZE].fill(0);
        data[SB_METADATA_SM_ROOT..SB_METADATA_SM_ROOT + ROOT_AREA_SIZE].fill(0);
        let sb = Superblock::decode(data);
        self.tm.inc(sb.data_mapping_root)?;
        self.tm.inc(sb.device_details_root)?;
        // Kept in memory until the next commit writes it with the space
        // maps that count the copy (6.1.178 and later).
        self.held_root = copy;
        Ok(())
    }

    /// Releases the metadata snapshot.
    pub fn release_metadata_snap(&mut self) -> Result<()> {
        self.write_lock()?;
        let held_root = std::mem::take(&mut self.held_root);
        if held_root == 0 {
            return Err(ThinError::NoSnapshot);
        }
        let copy = Superblock::decode(self.tm.read(held_root, BlockKind::ThinSuperblock)?);
        self.tm.btree_del(&MAPPING_INFO, copy.data_mapping_root)?;
        self.tm.btree_del(&DETAILS_INFO, copy.device_details_root)?;
        self.tm.metadata_sm_dec(held_root, held_root + 1)?;
        Ok(())
    }

    /// Where the metadata snapshot is (0 if none).
    pub fn metadata_snap(&mut self) -> Result<u64> {
        self.check_fail_io()?;
        Ok(self.superblock()?.held_root)
    }

    // ---- transactions ----

    /// Commits the transaction (`dm_pool_commit_metadata`).
    pub fn commit(&mut self) -> Result<()> {
        self.commit_with(|| Ok(()))
    }

    /// Commits, calling `pre_commit` first — the pool flushes the data
    /// device there, so that every committed mapping's data is stable.
    pub fn commit_with(&mut self, mut pre_commit: impl FnMut() -> Result<()>) -> Result<()> {
        self.check_fail_io()?;
        self.commit_transaction(&mut pre_commit)?;
        self.begin_transaction()
    }

    fn commit_transaction(&mut self, pre_commit: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        if !self.in_service {
            // Never put in service since it was opened: nothing to write.
            return Ok(());
        }
        pre_commit()?;
        self.write_changed_details()?;
        self.tm.data_sm_commit()?;
        self.tm.pre_commit()?;
        let (msm_root, dsm_root) = (self.tm.metadata_sm_root(), self.tm.data_sm_root());
        let (time, root, details_root, trans_id, flags, held_root) =
            (self.time, self.root, self.details_root, self.trans_id, self.flags, self.held_root);
        let sb = self.tm.write_locked(SUPERBLOCK_LOCATION, BlockKind::ThinSuperblock)?;
        put_u64(sb, SB_HELD_ROOT, held_root);
        put_u32(sb, SB_TIME, time);
        put_u64(sb, SB_DATA_MAPPING_ROOT, root);
        put_u64(sb, SB_DEVICE_DETAILS_ROOT, details_root);
        put_u64(sb, SB_TRANS_ID, trans_id);
        put_u32(sb, SB_FLAGS, flags);
        // The kernel copies 128 bytes per root from a buffer of which only
        // the first 32 are ever set; the rest is written as zeroes here
        // (see spec §2.1 on the padding).
        sb[SB_METADATA_SM_ROOT..SB_METADATA_SM_ROOT + ROOT_AREA_SIZE].fill(0);
        msm_root.encode(&mut sb[SB_METADATA_SM_ROOT..]);
        sb[SB_DATA_SM_ROOT..SB_DATA_SM_ROOT + ROOT_AREA_SIZE].fill(0);
        dsm_root.encode(&mut sb[SB_DATA_SM_ROOT..]);
        self.tm.commit()?;
        Ok(())
    }

    /// Writes the changed in-core device records into the details tree, in
    /// list order; records nobody holds open are dropped.
    fn write_changed_details(&mut self) -> Result<()> {
        let mut i = 0;
        while i < self.devices.len() {
            let d = self.devices[i].clone();
            if !d.changed {
                i += 1;
                continue;
            }
            let details = DeviceDetails {
                mapped_blocks: d.mapped_blocks,
                transaction_id: d.transaction_id,
                creation_time: d.creation_time,
                snapshotted_time: d.snapshotted_time,
            };
            let (root, _) =
                self.tm.btree_insert(&DETAILS_INFO, self.details_root, &[d.id], &details.to_bytes())?;
            self.details_root = root;
            if d.open_count > 0 {
                self.devices[i].changed = false;
                i += 1;
            } else {
                self.devices.remove(i);
            }
        }
        Ok(())
    }

    /// Throws away the transaction and reopens the last committed state
    /// (`dm_pool_abort_metadata`). Like the kernel, this reloads the roots
    /// but keeps the in-memory time, transaction id and device records.
    pub fn abort(&mut self) -> Result<()> {
        self.check_fail_io()?;
        for d in &mut self.devices {
            d.aborted_with_changes = d.changed;
        }
        let aborted_dsm = self.tm.dsm.clone();
        self.tm.reset();
        let r = (|| {
            let ignore_errors = self.tm.mutations.abort_ignores_superblock_read_error;
            match self.tm.block_manager().read_raw(SUPERBLOCK_LOCATION) {
                Ok(sb) if sb.iter().all(|&b| b == 0) => return Err(ThinError::Unformatted),
                Ok(_) => {}
                Err(_) if ignore_errors => {}
                Err(e) => return Err(e.into()),
            }
            Self::load_committed(&mut self.tm, self.data_block_size)?;
            if self.tm.mutations.abort_keeps_data_space_map {
                self.tm.dsm = aborted_dsm;
            }
            let sb = self.superblock()?;
            if !self.tm.mutations.abort_keeps_mapping_root {
                self.root = sb.data_mapping_root;
            }
            self.details_root = sb.device_details_root;
            Ok(())
        })();
        if r.is_err() {
            self.fail_io = true;
        }
        r
    }

    /// Sets the needs-check flag in memory and in block 0, without a commit.
    pub fn set_needs_check(&mut self) -> Result<()> {
        self.write_lock()?;
        self.flags |= NEEDS_CHECK;
        let flags = self.flags;
        let sb = self.tm.write_locked(SUPERBLOCK_LOCATION, BlockKind::ThinSuperblock)?;
        put_u32(sb, SB_FLAGS, flags);
        Ok(())
    }

    /// Clears the needs-check flag in memory and in block 0, without a
    /// commit (what `thin_check --clear-needs-check-flag` does to a pool
    /// that checked clean).
    pub fn clear_needs_check(&mut self) -> Result<()> {
        self.write_lock()?;
        self.flags &= !NEEDS_CHECK;
        let flags = self.flags;
        let sb = self.tm.write_locked(SUPERBLOCK_LOCATION, BlockKind::ThinSuperblock)?;
        put_u32(sb, SB_FLAGS, flags);
        Ok(())
    }

    /// Whether the needs-check flag is set.
    pub fn needs_check(&self) -> bool {
        self.flags & NEEDS_CHECK != 0
    }

    /// Marks the metadata read-only (`dm_pool_metadata_read_only`, which
    /// makes the block manager read-only) or writable again: while it is,
    /// every change fails with [`ThinError::ReadOnly`] and closing it does
    /// not commit. An [`Self::abort`] leaves it as it is (the kernel's
    /// `dm_block_manager_reset` keeps the block manager's flag).
    pub fn set_read_only(&mut self, read_only: bool) {
        self.read_only = read_only;
    }

    /// Closes the metadata (`dm_pool_metadata_close`): refuses while devices
    /// are open, commits unless failed or read-only, writes back what is
    /// still dirty (unflushed) unless failed, returns the device.
    ///
    /// As in the kernel, the records of closed devices are dropped *before*
    /// that commit, so detail changes (mapped_blocks, snapshot times) not yet
    /// committed are lost while their mappings are written. The kernel's pool
    /// always commits in postsuspend before it gets here; callers of this
    /// model must commit first too.
    // The refusal hands the metadata back, hence the large error.
    #[allow(clippy::result_large_err)]
    pub fn close(mut self) -> std::result::Result<D, (Self, ThinError)> {
        if let Some(d) = self.devices.iter().find(|d| d.open_count > 0) {
            let id = d.id;
            return Err((self, ThinError::Busy(id)));
        }
        self.devices.retain(|d| d.open_count > 0);
        if !self.fail_io && !self.read_only {
            // The kernel only warns if this commit fails.
            let _ = self.commit_transaction(&mut || Ok(()));
        }
        if !self.fail_io {
            // Destroying the block manager writes what is still dirty back,
            // unflushed (dm-bufio's `drop_buffers`): in a read-only pool,
            // block 0 with the needs_check flag its abort set. The kernel
            // does not report these writes' errors.
            let _ = self.tm.block_manager().write_back_all();
        }
        Ok(self.tm.into_device())
    }

    /// Drops all uncommitted state and returns the device, as a crash would.
    pub fn crash(self) -> D {
        self.tm.into_device()
    }
}
