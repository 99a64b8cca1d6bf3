//! Requests in and out, data I/O in flight, and the completion paths:
//! `thin_endio`, `overwrite_endio`, kcopyd's `copy_complete` and the
//! passdown discard's end-io, plus DM core's accounting of a request's
//! pieces.

use std::collections::BTreeMap;

use super::bio::{self, Bio, BioId, BioOp, BioRequest, Completion};
use super::{io_errno, MappingBio, MappingId, Pool, PoolLists, TargetError};
use crate::block_device::{BlockDevice, WriteFlags, SECTOR_SIZE};
use crate::deferred_set::{AddWork, DeferredEntry};
use crate::errno::Errno;
use crate::sync::lock;
use crate::thin::metadata::ThinId;

/// Names one data I/O in flight, for [`Pool::complete_io`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IoId(pub u64);

/// What a data I/O in flight does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataIoKind {
    /// A bio remapped to the data device reading.
    Read,
    /// A bio remapped to the data device writing (possibly overwriting a
    /// whole new block for a mapping).
    Write,
    /// An empty flush passed to the data device.
    Flush,
    /// kcopyd zeroing a new block.
    Zero,
    /// kcopyd copying a shared block to a new one.
    Copy,
    /// A passdown discard to the data device.
    Discard,
}

/// A data I/O in flight, as the scheduler sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoInfo {
    /// Its id.
    pub id: IoId,
    /// What it does.
    pub kind: DataIoKind,
    /// First data device sector it touches (the destination of a copy).
    pub sector: u64,
    /// Sectors it touches.
    pub nr_sectors: u64,
    /// Whether it is a FUA write.
    pub fua: bool,
}

/// A data I/O the pool has issued and the caller has not yet completed.
#[derive(Debug)]
pub(crate) enum DataIo {
    /// A bio remapped to `data_sector` (an overwrite bio if its hook names a
    /// mapping).
    Bio { bio: Bio, data_sector: u64 },
    /// Zeroing a new block for a mapping.
    Zero { mapping: MappingId, data_sector: u64, nr_sectors: u64 },
    /// Copying `nr_sectors` from `from` to `to` for a mapping.
    Copy { mapping: MappingId, from: u64, to: u64, nr_sectors: u64 },
    /// Discarding sector ranges of the data device for a passdown mapping.
    Discard { mapping: MappingId, ranges: Vec<(u64, u64)> },
}

impl DataIo {
    fn info(&self, id: IoId) -> IoInfo {
        match self {
            DataIo::Bio { bio, data_sector } => IoInfo {
                id,
                kind: match bio.op {
                    BioOp::Read => DataIoKind::Read,
                    BioOp::Write => DataIoKind::Write,
                    BioOp::Flush => DataIoKind::Flush,
                    BioOp::Discard => DataIoKind::Discard,
                },
                sector: *data_sector,
                nr_sectors: bio.nr_sectors,
                fua: bio.fua,
            },
            DataIo::Zero { data_sector, nr_sectors, .. } => IoInfo {
                id,
                kind: DataIoKind::Zero,
                sector: *data_sector,
                nr_sectors: *nr_sectors,
                fua: false,
            },
            DataIo::Copy { to, nr_sectors, .. } => {
                IoInfo { id, kind: DataIoKind::Copy, sector: *to, nr_sectors: *nr_sectors, fua: false }
            }
            DataIo::Discard { ranges, .. } => IoInfo {
                id,
                kind: DataIoKind::Discard,
                sector: ranges.first().map_or(0, |r| r.0),
                nr_sectors: ranges.iter().map(|(b, e)| e - b).sum(),
                fua: false,
            },
        }
    }
}

/// A request submitted by a user and not yet completed.
#[derive(Debug)]
pub(crate) struct UserIo {
    pub thin: ThinId,
    is_read: bool,
    pending: usize,
    result: Result<(), Errno>,
    data: Vec<u8>,
    after_flush: Vec<Bio>,
}

/// Requests and data I/O in flight.
#[derive(Debug, Default)]
pub(crate) struct IoState {
    next_io: u64,
    pub in_flight: BTreeMap<IoId, DataIo>,
    next_bio: u64,
    pub user: BTreeMap<BioId, UserIo>,
    completions: Vec<Completion>,
}

impl<M: BlockDevice, D: BlockDevice> Pool<M, D> {
    /// Submits `req` to active thin device `thin`: DM core splits it, and
    /// the thin target's map function runs on each piece right here, in the
    /// caller's (the submitter's) context. The request completes later, in
    /// [`Pool::take_completions`].
    pub fn submit(&self, thin: ThinId, req: BioRequest) -> Result<BioId, TargetError> {
        let Some(t) = self.thin(thin) else {
            return Err(TargetError::new(Errno::ENODATA, format!("thin device {thin} is not active")));
        };
        req.validate(t.nr_sectors).map_err(|e| TargetError::new(Errno::EINVAL, e))?;
        let is_read = req.op == BioOp::Read;
        let nr_bytes = (req.nr_sectors * SECTOR_SIZE) as usize;
        let (first, id) = {
            let mut io = lock(&self.io);
            let id = BioId(io.next_bio);
            io.next_bio += 1;
            let unaligned = self.options.mutations.discard_split_unaligned;
            let (first, after_flush) =
                bio::split(id, thin, req, self.block_sectors, self.discard_split(), unaligned);
            io.user.insert(
                id,
                UserIo {
                    thin,
                    is_read,
                    pending: first.len(),
                    result: Ok(()),
                    data: if is_read { vec![0; nr_bytes] } else { Vec::new() },
                    after_flush,
                },
            );
            (first, id)
        };
        for piece in first {
            self.map_bio(piece);
        }
        Ok(id)
    }

    /// Requests completed since the last call, in completion order.
    pub fn take_completions(&self) -> Vec<Completion> {
        std::mem::take(&mut lock(&self.io).completions)
    }

    /// Requests submitted and not yet completed.
    pub fn bios_in_flight(&self) -> usize {
        lock(&self.io).user.len()
    }

    /// Whether request `id` may still meet the metadata: one of its pieces
    /// is held by the pool (in a cell, on a deferred, retry or commit
    /// list, in a mapping being prepared) rather than in flight to the
    /// data device as a bio remapped to a block already mapped; or it has
    /// completed and not been taken yet ([`Pool::take_completions`]). A
    /// request all of whose pieces are in flight that way ends with what
    /// the data device returns.
    pub fn request_awaits_pool(&self, id: BioId) -> bool {
        let io = lock(&self.io);
        let Some(user) = io.user.get(&id) else { return true };
        let at_device = io
            .in_flight
            .values()
            .filter(|d| matches!(d, DataIo::Bio { bio, .. } if bio.parent == id && bio.hook.overwrite_mapping.is_none()))
            .count();
        user.pending > at_device
    }

    /// Data I/O issued and not yet completed, in issue order.
    pub fn in_flight_io(&self) -> Vec<IoInfo> {
        lock(&self.io).in_flight.iter().map(|(id, io)| io.info(*id)).collect()
    }

    /// Completes data I/O `id`: performs it on the data device (this is
    /// when the device sees it) and runs its end-io path.
    pub fn complete_io(&self, id: IoId) -> Result<(), TargetError> {
        self.finish_io(id, None)
    }

    /// Completes data I/O `id` with an error instead of performing it (an
    /// injected device fault).
    pub fn fail_io(&self, id: IoId, errno: Errno) -> Result<(), TargetError> {
        self.finish_io(id, Some(errno))
    }

    fn finish_io(&self, id: IoId, fault: Option<Errno>) -> Result<(), TargetError> {
        let io = lock(&self.io).in_flight.remove(&id);
        let Some(io) = io else {
            return Err(TargetError::new(Errno::EINVAL, format!("no data I/O {} in flight", id.0)));
        };
        let fail = |r: Result<(), Errno>| match fault {
            Some(e) => Err(e),
            None => r,
        };
        match io {
            DataIo::Bio { mut bio, data_sector } => {
                let r = fail(Ok(())).and_then(|()| {
                    let mut data = lock(&self.data);
                    match bio.op {
                        BioOp::Read => data.read(data_sector, &mut bio.data),
                        BioOp::Write => data.write(data_sector, &bio.data, WriteFlags { fua: bio.fua }),
                        BioOp::Flush => data.flush(),
                        BioOp::Discard => Ok(()),
                    }
                    .map_err(|e| io_errno(&e))
                });
                match bio.hook.overwrite_mapping {
                    Some(m) => self.overwrite_endio(m, bio, r),
                    None => self.end_bio(bio, r),
                }
            }
            DataIo::Zero { mapping, data_sector, nr_sectors } => {
                let r = fail(Ok(())).and_then(|()| {
                    let zeroes = vec![0; (nr_sectors * SECTOR_SIZE) as usize];
                    lock(&self.data)
                        .write(data_sector, &zeroes, WriteFlags::default())
                        .map_err(|e| io_errno(&e))
                });
                self.copy_complete(mapping, r);
            }
            DataIo::Copy { mapping, from, to, nr_sectors } => {
                let r = fail(Ok(())).and_then(|()| {
                    let mut buf = vec![0; (nr_sectors * SECTOR_SIZE) as usize];
                    let mut data = lock(&self.data);
                    data.read(from, &mut buf).map_err(|e| io_errno(&e))?;
                    data.write(to, &buf, WriteFlags::default()).map_err(|e| io_errno(&e))
                });
                self.copy_complete(mapping, r);
            }
            DataIo::Discard { mapping, ranges } => {
                // The data device's discard reads back as zeroes, as a loop
                // device over a file (hole punching) does. The pool ignores
                // an error (`passdown_endio`: "It doesn't matter if the
                // passdown discard failed, we still want to unmap"): pass
                // two runs and the user's discard completes as if the
                // discard had reached the device.
                let mut failed = fault.is_some();
                if !failed {
                    let mut data = lock(&self.data);
                    for (b, e) in ranges {
                        let zeroes = vec![0; ((e - b) * SECTOR_SIZE) as usize];
                        failed |= data.write(b, &zeroes, WriteFlags::default()).is_err();
                    }
                }
                if failed {
                    self.probe(|p| p.passdown_failures += 1);
                    if self.options.mutations.passdown_error_skips_pass_two {
                        // Broken on purpose: the mapping, its cell, its hold
                        // and the user's discard are left as they are.
                        return Ok(());
                    }
                    if self.options.mutations.passdown_error_fails_discard {
                        // Broken on purpose: the error is kept for pass two,
                        // which passes it to the user's discard.
                        if let Some(m) = lock(&self.lists).mappings.get_mut(&mapping) {
                            m.status = Err(Errno::EIO);
                        }
                    }
                }
                if self.options.mutations.passdown_releases_data_cell_twice {
                    // Broken on purpose: released here, and again by pass two.
                    let held = lock(&self.lists).mappings.get(&mapping).and_then(|m| Some((m.thin, m.cell?)));
                    if let Some((thin, cell)) = held {
                        self.cell_defer_no_holder(thin, cell);
                    }
                }
                self.queue_passdown_pt2(mapping);
            }
        }
        Ok(())
    }

    /// Puts `io` in flight.
    pub(crate) fn submit_data(&self, io: DataIo) -> IoId {
        let mut state = lock(&self.io);
        let id = IoId(state.next_io);
        state.next_io += 1;
        state.in_flight.insert(id, io);
        id
    }

    /// Completes a bio the target is done with: `thin_endio`, then DM
    /// core's accounting of the request it belongs to.
    pub(crate) fn end_bio(&self, mut bio: Bio, result: Result<(), Errno>) {
        if let Some(entry) = bio.hook.shared_read_entry.take() {
            let work = lock(&self.shared_read_ds).dec(entry);
            if !work.is_empty() {
                let mut lists = lock(&self.lists);
                for m in work {
                    self.complete_mapping_preparation_locked(&mut lists, m);
                }
            }
        }
        if let Some(entry) = bio.hook.all_io_entry.take() {
            self.all_io_done(entry);
        }
        if let Some(cell) = bio.hook.cell.take() {
            self.cell_defer_no_holder(bio.thin, cell);
        }
        self.piece_done(bio, result);
    }

    /// Drops an all-I/O reference; discards that waited for it go to the
    /// worker.
    fn all_io_done(&self, entry: DeferredEntry) {
        let work = lock(&self.all_io_ds).dec(entry);
        if !work.is_empty() {
            let mut lists = lock(&self.lists);
            lists.prepared_discards.extend(work);
            lists.worker_wanted = true;
        }
    }

    fn piece_done(&self, bio: Bio, result: Result<(), Errno>) {
        let mut io = lock(&self.io);
        let Some(user) = io.user.get_mut(&bio.parent) else {
            self.bug(format!("a piece of unknown request {:?} completed", bio.parent));
            return;
        };
        // DM core keeps the last error a piece completes with
        // (`dm_io_set_error` overwrites the dm_io's status, and
        // `__dm_io_complete` the original bio's, for every piece that
        // fails): a request whose pieces fail differently (one ENOSPC, one
        // EIO) ends with the error of the piece that completed last.
        if let Err(e) = result {
            user.result = Err(e);
        }
        if user.is_read && bio.op == BioOp::Read && result.is_ok() {
            user.data[bio.offset..bio.offset + bio.data.len()].copy_from_slice(&bio.data);
        }
        // DM core's count of the request's pieces (`bio_remaining_done`
        // BUG_ONs on one ended too often).
        let Some(pending) = user.pending.checked_sub(1) else {
            self.bug(format!("request {:?} ended more pieces than it had", bio.parent));
            return;
        };
        user.pending = pending;
        if user.pending > 0 {
            return;
        }
        if !user.after_flush.is_empty() && user.result.is_ok() {
            let pieces = std::mem::take(&mut user.after_flush);
            user.pending = pieces.len();
            drop(io);
            for piece in pieces {
                self.map_bio(piece);
            }
            return;
        }
        let user = io.user.remove(&bio.parent).expect("just seen");
        let data = if user.is_read && user.result.is_ok() { user.data } else { Vec::new() };
        io.completions.push(Completion { id: bio.parent, thin: user.thin, result: user.result, data });
    }

    /// `bio_io_error`: fails `bio` through its own end-io hook. A whole-block
    /// overwrite still owed to its mapping goes through `overwrite_endio`,
    /// so the mapping learns of the failure and releases its cell; ending
    /// it directly would leave the cell, and every bio behind it, held.
    pub(crate) fn fail_bio(&self, bio: Bio, code: Errno) {
        if let Some(m) = bio.hook.overwrite_mapping {
            let owed = matches!(
                lock(&self.lists).mappings.get(&m),
                Some(mapping) if matches!(mapping.bio, MappingBio::Overwrite(None))
            );
            if owed {
                self.overwrite_endio(m, bio, Err(code));
                return;
            }
        }
        self.end_bio(bio, Err(code));
    }

    /// `overwrite_endio`: the whole-block write of a mapping landed (or
    /// failed); park the bio in the mapping until it is inserted.
    fn overwrite_endio(&self, mapping: MappingId, bio: Bio, result: Result<(), Errno>) {
        if self.options.mutations.overwrite_drops_all_io_twice {
            // Broken on purpose: dropped here, and again by `end_bio`.
            if let Some(entry) = bio.hook.all_io_entry {
                self.all_io_done(entry);
            }
        }
        self.release_cell_early(mapping);
        let mut lists = lock(&self.lists);
        if let Some(m) = lists.mappings.get_mut(&mapping) {
            m.status = result;
            m.bio = MappingBio::Overwrite(Some(bio));
        }
        self.complete_mapping_preparation_locked(&mut lists, mapping);
    }

    /// kcopyd's completion of a zero or a copy.
    fn copy_complete(&self, mapping: MappingId, result: Result<(), Errno>) {
        self.release_cell_early(mapping);
        if result.is_err() && self.options.mutations.locking.copy_error_after_queueing {
            // Broken on purpose: queued for the worker before the status
            // records the error; a worker pass in between inserts it.
            self.complete_mapping_preparation(mapping);
            if let Some(m) = lock(&self.lists).mappings.get_mut(&mapping) {
                m.status = result;
            }
            return;
        }
        let mut lists = lock(&self.lists);
        if let Some(m) = lists.mappings.get_mut(&mapping) {
            if result.is_err() {
                m.status = result;
            }
        }
        self.complete_mapping_preparation_locked(&mut lists, mapping);
    }

    /// With [`crate::mutation::LockingMutations::release_cell_before_insert`]
    /// only: releases a provisioning mapping's cell from the completion
    /// context, keeping its holder (if still inside) in the mapping for the
    /// worker to issue after the insert. Waiters go back to the worker.
    fn release_cell_early(&self, mapping: MappingId) {
        if !self.options.mutations.locking.release_cell_before_insert {
            return;
        }
        let (thin, cell) = {
            let mut lists = lock(&self.lists);
            let Some(m) = lists.mappings.get_mut(&mapping) else { return };
            if matches!(m.bio, MappingBio::Discard(_) | MappingBio::DiscardParent(_)) {
                return;
            }
            let Some(cell) = m.cell.take() else { return };
            (m.thin, cell)
        };
        let holder = self.prison_for_cell(cell).take_holder(cell);
        self.cell_defer_no_holder(thin, cell);
        if let Some(m) = lock(&self.lists).mappings.get_mut(&mapping) {
            m.early_holder = holder;
        }
    }

    /// One preparation step of `mapping` finished.
    pub(crate) fn complete_mapping_preparation(&self, mapping: MappingId) {
        self.complete_mapping_preparation_locked(&mut lock(&self.lists), mapping);
    }

    fn complete_mapping_preparation_locked(&self, lists: &mut PoolLists, mapping: MappingId) {
        let Some(m) = lists.mappings.get_mut(&mapping) else {
            self.bug(format!("preparation of unknown mapping {mapping:?}"));
            return;
        };
        let Some(left) = m.prepare_actions.checked_sub(1) else {
            self.bug(format!("mapping {mapping:?} prepared once more than it had steps"));
            return;
        };
        m.prepare_actions = left;
        if m.prepare_actions == 0 {
            lists.prepared_mappings.push(mapping);
            lists.worker_wanted = true;
        }
    }

    /// `passdown_endio`: the device discards of a run finished.
    pub(crate) fn queue_passdown_pt2(&self, mapping: MappingId) {
        let mut lists = lock(&self.lists);
        lists.prepared_discards_pt2.push(mapping);
        lists.worker_wanted = true;
    }

    /// Adds `mapping` as work to the all-I/O deferred set; runs it now if
    /// no older I/O is in flight.
    pub(crate) fn defer_discard_until_io_quiet(&self, mapping: MappingId) {
        if self.options.mutations.locking.discard_skips_io_wait {
            // Broken on purpose: older I/O may still be in flight.
            self.process_prepared_discard(mapping);
            return;
        }
        let r = lock(&self.all_io_ds).add_work(mapping);
        if let AddWork::NothingInFlight(m) = r {
            self.process_prepared_discard(m);
        }
    }
}
