//! The map path (`thin_bio_map`): runs in the submitter's context and never
//! waits for I/O. Mapped, unshared blocks are remapped straight to the data
//! device; everything else goes to the worker.

use super::bio::{Bio, BioOp};
use super::io::DataIo;
use super::{ActiveThin, Pool};
use crate::block_device::BlockDevice;
use crate::errno::Errno;
use crate::prison::{key_fits_region, region_of, BioPrison, CellId, CellKey, Detained};
use crate::sync::{lock, MutexGuard};
use crate::thin::metadata::{LookupResult, ThinError, ThinId};
use crate::thin::mode::PoolMode;

impl<M: BlockDevice, D: BlockDevice> Pool<M, D> {
    /// Maps one bio of an active device.
    pub(crate) fn map_bio(&self, mut bio: Bio) {
        let Some(thin) = self.thin(bio.thin) else {
            self.end_bio(bio, Err(Errno::EIO));
            return;
        };
        if self.mode() == PoolMode::Fail {
            self.end_bio(bio, Err(Errno::EIO));
            return;
        }
        if self.options.mutations.out_of_metadata_space_fails_writes
            && bio.op == BioOp::Write
            && self.mode() == PoolMode::OutOfMetadataSpace
        {
            // Broken on purpose: writes that need no metadata fail too.
            self.end_bio(bio, Err(Errno::EIO));
            return;
        }
        if bio.is_flush_or_fua() || bio.op == BioOp::Discard {
            self.defer_bio(&thin, bio);
            return;
        }
        // The virtual cell is taken before the lookup: a discard of this
        // block must not slip in between.
        let block = self.block_of(bio.sector);
        let virt = match self.detain(CellKey::virtual_block(thin.id, block), Some(bio)) {
            Detained::New(cell) => cell,
            Detained::AlreadyHeld(_) => return,
        };
        let lookup = self.find_block(thin.id, block);
        match lookup {
            Ok(Some(found)) if !found.shared && self.options.mutations.locking.fast_path_skips_data_cell => {
                // Broken on purpose: no data cell, so a copy or a discard
                // holding it is not waited for.
                let mut bio = self.take_holder(virt);
                self.inc_all_io_entry(&mut bio);
                self.cell_defer_no_holder(thin.id, virt);
                let data_sector = self.remap_sector(bio.sector, found.block);
                self.submit_data(DataIo::Bio { bio, data_sector });
            }
            Ok(Some(found)) if !found.shared => {
                bio = self.take_holder(virt);
                let data_key = CellKey::data_block(thin.id, found.block);
                let data_cell = match self.detain(data_key, Some(bio)) {
                    Detained::New(cell) => cell,
                    Detained::AlreadyHeld(_) => {
                        // Someone works on that block: wait in its cell.
                        // (Under the kernel's snapshot-time sharing nobody
                        // ever does here, see `LockingDesign::RefcountSharing`.)
                        self.cell_defer_no_holder(thin.id, virt);
                        return;
                    }
                };
                let mut bio = self.take_holder(data_cell);
                if self.locking.shares_by_refcount()
                    && !self.options.mutations.locking.fast_path_skips_recheck
                    && !self.still_unshared(thin.id, block, found.block)
                {
                    // A copy from this block finished between the lookup
                    // and the detain: its mapping replaced ours and the
                    // block may be free already. Let the worker look again.
                    self.cell_defer_no_holder(thin.id, data_cell);
                    self.cell_defer_no_holder(thin.id, virt);
                    self.defer_bio(&thin, bio);
                    return;
                }
                self.inc_all_io_entry(&mut bio);
                self.cell_defer_no_holder(thin.id, data_cell);
                self.cell_defer_no_holder(thin.id, virt);
                let data_sector = self.remap_sector(bio.sector, found.block);
                self.submit_data(DataIo::Bio { bio, data_sector });
            }
            // Shared (a snapshot may see it) or not provisioned: the worker
            // decides.
            Ok(_) => self.defer_cell(&thin, virt),
            Err(_) => {
                let bio = self.take_holder(virt);
                self.end_bio(bio, Err(Errno::EIO));
                self.cell_defer_no_holder(thin.id, virt);
            }
        }
    }

    /// `dm_thin_find_block`, with the design's sharing rule: the snapshot
    /// time, narrowed by reference counts in
    /// [`LockingDesign::RefcountSharing`].
    pub(crate) fn find_block(&self, thin: ThinId, block: u64) -> Result<Option<LookupResult>, ThinError> {
        let mut md = lock(&self.metadata);
        match md.find_block(thin, block)? {
            Some(found) if found.shared && self.locking.shares_by_refcount() => {
                let shared = md.mapping_shared_by_refcount(thin, block, found.block)?;
                Ok(Some(LookupResult { shared, ..found }))
            }
            other => Ok(other),
        }
    }

    /// Whether `block` of `thin` still maps to `data_block`, unshared: the
    /// fast path's second look, once it holds the data cell, in
    /// [`LockingDesign::RefcountSharing`] (where an unshared block may be
    /// a copy's source, and the copy may finish between lookup and detain).
    ///
    /// [`LockingDesign::RefcountSharing`]: super::LockingDesign::RefcountSharing
    fn still_unshared(&self, thin: ThinId, block: u64, data_block: u64) -> bool {
        matches!(self.find_block(thin, block), Ok(Some(found)) if found.block == data_block && !found.shared)
    }

    /// Detains `bio` under `key`. The prison lock is dropped on return: a
    /// guard kept alive across a `match` on the result would deadlock the
    /// paths that release cells in its arms.
    pub(crate) fn detain(&self, key: CellKey, bio: Option<Bio>) -> Detained {
        self.prison_for_key(&key).detain(key, bio)
    }

    /// The prison (region) a key belongs to, locked. In the regions design
    /// a key must not cross a region boundary: the callers split ranges so
    /// that it never does.
    pub(crate) fn prison_for_key(&self, key: &CellKey) -> MutexGuard<'_, BioPrison<Bio>> {
        if self.locking.has_regions() {
            if !key_fits_region(key) {
                self.bug(format!("prison key {key:?} crosses a region boundary"));
            }
            let region = if self.options.mutations.locking.region_from_block_end {
                ((key.block_end >> crate::prison::REGION_SHIFT) as usize) & (self.prisons.len() - 1)
            } else {
                region_of(key, self.prisons.len())
            };
            lock(&self.prisons[region])
        } else {
            lock(&self.prisons[0])
        }
    }

    /// The prison (region) that made `cell`, locked.
    pub(crate) fn prison_for_cell(&self, cell: CellId) -> MutexGuard<'_, BioPrison<Bio>> {
        lock(&self.prisons[cell.region(self.prisons.len())])
    }

    /// Takes the holder out of `cell`; the paths that call this have just
    /// detained it with a bio, so a missing holder is a bug in the model.
    pub(crate) fn take_holder(&self, cell: CellId) -> Bio {
        self.prison_for_cell(cell).take_holder(cell).expect("cell has its holder")
    }

    /// `thin_defer_bio`: hand a bio to the worker.
    pub(crate) fn defer_bio(&self, thin: &ActiveThin, bio: Bio) {
        lock(&thin.lists).deferred_bios.push(bio);
        self.wake_worker();
    }

    /// `thin_defer_cell`: hand a detained cell (holder inside) to the worker.
    pub(crate) fn defer_cell(&self, thin: &ActiveThin, cell: CellId) {
        lock(&thin.lists).deferred_cells.push(cell);
        self.wake_worker();
    }

    /// `cell_defer_no_holder`: release `cell`, sending the bios that waited
    /// in it back to the device's deferred list. Its holder has already
    /// been taken out by whoever is dealing with it.
    ///
    /// The designs nest their locks differently (spec §5.7): 6.1 takes the
    /// device's `tc->lock` first and releases the cell under it, the prison
    /// lock inside; 6.4 releases into a local list under the region's lock
    /// alone and takes `tc->lock` only if bios waited. Both wake the worker
    /// only when bios were handed back: 6.1 wakes whenever the deferred
    /// list is non-empty, but whoever put the other bios there woke it
    /// already.
    pub(crate) fn cell_defer_no_holder(&self, thin: ThinId, cell: CellId) {
        let active = self.thin(thin);
        let bios: Vec<Bio> = match (self.locking.has_regions(), &active) {
            (false, Some(t)) => {
                let mut lists = lock(&t.lists);
                let (holder, waiters) = self.prison_for_cell(cell).release_no_holder(cell);
                if holder.is_some() {
                    self.bug(format!("{cell:?} released with its holder still inside"));
                }
                let woke = holder.is_some() || !waiters.is_empty();
                lists.deferred_bios.extend(holder.into_iter().chain(waiters));
                drop(lists);
                if woke {
                    self.wake_worker();
                }
                return;
            }
            _ => {
                let (holder, waiters) = self.prison_for_cell(cell).release_no_holder(cell);
                if holder.is_some() {
                    self.bug(format!("{cell:?} released with its holder still inside"));
                }
                holder.into_iter().chain(waiters).collect()
            }
        };
        if bios.is_empty() {
            return;
        }
        match active {
            Some(t) => {
                lock(&t.lists).deferred_bios.extend(bios);
                self.wake_worker();
            }
            None => {
                for bio in bios {
                    self.end_bio(bio, Err(Errno::EIO));
                }
            }
        }
    }

    /// `inc_all_io_entry`: every non-discard bio issued to the data device
    /// is counted, so that discards can wait for it.
    pub(crate) fn inc_all_io_entry(&self, bio: &mut Bio) {
        if bio.op != BioOp::Discard {
            bio.hook.all_io_entry = Some(lock(&self.all_io_ds).inc());
        }
    }
}
