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

/// What a data I/O in flight asks of the data device
/// ([`Pool::data_request`]), for a caller that performs it itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataRequest {
    /// Read `nr_sectors` from `sector`.
    Read {
        /// First sector.
        sector: u64,
        /// Length.
        nr_sectors: u64,
    },
    /// Write `data` at `sector`; durable on completion when `fua`.
    Write {
        /// First sector.
        sector: u64,
        /// The bytes (a whole number of sectors).
        data: Vec<u8>,
        /// REQ_FUA.
        fua: bool,
    },
    /// Flush the device's volatile cache.
    Flush,
    /// Write zeroes over `nr_sectors` from `sector` (kcopyd zeroing a new
    /// block).
    Zero {
        /// First sector.
        sector: u64,
        /// Length.
        nr_sectors: u64,
    },
    /// Copy `nr_sectors` from `from` to `to` (kcopyd breaking sharing).
    Copy {
        /// Source's first sector.
        from: u64,
        /// Destination's first sector.
        to: u64,
        /// Length.
        nr_sectors: u64,
    },
    /// Discard these `(begin, end)` sector ranges; they read back as
    /// zeroes afterwards (as a file's punched holes do).
    Discard {
        /// The ranges, end excluded.
        ranges: Vec<(u64, u64)>,
    },
    /// Nothing reaches the device (a discard bio the pool passes on whole,
    /// which the model's data device ignores); end it with success.
    Nothing,
}

/// The error for a data I/O that is not in flight.
fn no_such_io(id: IoId) -> TargetError {
    TargetError::new(Errno::EINVAL, format!("no data I/O {} in flight", id.0))
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
    /// Pieces DM core has not handed the target yet
    /// ([`Pool::submit_in_part`]).
    held: Vec<Bio>,
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
        self.submit_in_part(thin, req, usize::MAX).map(|(id, _)| id)
    }

    /// As [`Pool::submit`], but the map function runs on the first
    /// `mapped` pieces only; the others wait for
    /// [`Pool::map_held_pieces`]. Returns the request and how many pieces
    /// wait. DM core maps a split request's pieces one after another in
    /// the submitter's context (6.1's `dm_split_and_process_bio` maps one
    /// and submits the rest of the bio again) while the pool's worker runs
    /// on another CPU: a worker pass, and the commit it makes, may come
    /// between two pieces of one request. Pieces after a PREFLUSH's flush
    /// are not counted: they are mapped when the flush completes.
    pub fn submit_in_part(
        &self,
        thin: ThinId,
        req: BioRequest,
        mapped: usize,
    ) -> Result<(BioId, usize), TargetError> {
        let Some(t) = self.thin(thin) else {
            return Err(TargetError::new(Errno::ENODATA, format!("thin device {thin} is not active")));
        };
        req.validate(t.nr_sectors).map_err(|e| TargetError::new(Errno::EINVAL, e))?;
        let is_read = req.op == BioOp::Read;
        let nr_bytes = (req.nr_sectors * SECTOR_SIZE) as usize;
        let (first, id, held) = {
            let mut io = lock(&self.io);
            let id = BioId(io.next_bio);
            io.next_bio += 1;
            let unaligned = self.options.mutations.discard_split_unaligned;
            let (mut first, after_flush) =
                bio::split(id, thin, req, self.block_sectors, self.discard_split(), unaligned);
            let held = first.split_off(mapped.min(first.len()));
            let nr_held = held.len();
            io.user.insert(
                id,
                UserIo {
                    thin,
                    is_read,
                    pending: first.len() + nr_held,
                    result: Ok(()),
                    data: if is_read { vec![0; nr_bytes] } else { Vec::new() },
                    after_flush,
                    held,
                },
            );
            (first, id, nr_held)
        };
        for piece in first {
            self.map_bio(piece);
        }
        Ok((id, held))
    }

    /// Runs the map function on the pieces of request `id` that
    /// [`Pool::submit_in_part`] held back (none: nothing happens).
    pub fn map_held_pieces(&self, id: BioId) {
        let held = lock(&self.io).user.get_mut(&id).map(|u| std::mem::take(&mut u.held)).unwrap_or_default();
        for piece in held {
            self.map_bio(piece);
        }
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
        let Some(mut io) = io else {
            return Err(no_such_io(id));
        };
        let r = match fault {
            Some(e) => Err(e),
            None => self.perform(&mut io),
        };
        self.end_data_io(io, r);
        Ok(())
    }

    /// What data I/O `id` asks of the data device, for a caller that
    /// performs it itself (an engine submitting it to io_uring) and then
    /// ends it with [`Pool::end_io`], instead of [`Pool::complete_io`]
    /// performing it on the pool's own data device. `None` when no such
    /// I/O is in flight. The I/O stays in flight.
    pub fn data_request(&self, id: IoId) -> Option<DataRequest> {
        let io = lock(&self.io);
        Some(match io.in_flight.get(&id)? {
            DataIo::Bio { bio, data_sector } => match bio.op {
                BioOp::Read => DataRequest::Read { sector: *data_sector, nr_sectors: bio.nr_sectors },
                BioOp::Write => {
                    DataRequest::Write { sector: *data_sector, data: bio.data.clone(), fua: bio.fua }
                }
                BioOp::Flush => DataRequest::Flush,
                BioOp::Discard => DataRequest::Nothing,
            },
            DataIo::Zero { data_sector, nr_sectors, .. } => {
                DataRequest::Zero { sector: *data_sector, nr_sectors: *nr_sectors }
            }
            DataIo::Copy { from, to, nr_sectors, .. } => {
                DataRequest::Copy { from: *from, to: *to, nr_sectors: *nr_sectors }
            }
            DataIo::Discard { ranges, .. } => DataRequest::Discard { ranges: ranges.clone() },
        })
    }

    /// Ends data I/O `id`, which the caller performed itself
    /// ([`Pool::data_request`]), with `result`; `read` is what a read
    /// returned (its length the read's). Runs the same end-io path as
    /// [`Pool::complete_io`]. A read that succeeded without the bytes, or
    /// with another length, is refused (`EINVAL`) and stays in flight.
    pub fn end_io(
        &self,
        id: IoId,
        result: Result<(), Errno>,
        read: Option<&[u8]>,
    ) -> Result<(), TargetError> {
        let mut state = lock(&self.io);
        let Some(io) = state.in_flight.get_mut(&id) else {
            return Err(no_such_io(id));
        };
        if let (DataIo::Bio { bio, .. }, Ok(())) = (&mut *io, result) {
            if bio.op == BioOp::Read {
                match read {
                    Some(bytes) if bytes.len() == bio.data.len() => bio.data.copy_from_slice(bytes),
                    _ => {
                        return Err(TargetError::new(
                            Errno::EINVAL,
                            format!(
                                "data I/O {}: a read of {} bytes ended with {} bytes",
                                id.0,
                                bio.data.len(),
                                read.map_or(0, <[u8]>::len)
                            ),
                        ))
                    }
                }
            }
        }
        let io = state.in_flight.remove(&id).expect("just seen");
        drop(state);
        self.end_data_io(io, result);
        Ok(())
    }

    /// Performs `io` on the pool's own data device (a read fills its
    /// bio's buffer).
    fn perform(&self, io: &mut DataIo) -> Result<(), Errno> {
        let mut data = lock(&self.data);
        match io {
            DataIo::Bio { bio, data_sector } => match bio.op {
                BioOp::Read => data.read(*data_sector, &mut bio.data),
                BioOp::Write => data.write(*data_sector, &bio.data, WriteFlags { fua: bio.fua }),
                BioOp::Flush => data.flush(),
                BioOp::Discard => Ok(()),
            }
            .map_err(|e| io_errno(&e)),
            DataIo::Zero { data_sector, nr_sectors, .. } => {
                let zeroes = vec![0; (*nr_sectors * SECTOR_SIZE) as usize];
                data.write(*data_sector, &zeroes, WriteFlags::default()).map_err(|e| io_errno(&e))
            }
            DataIo::Copy { from, to, nr_sectors, .. } => {
                let mut buf = vec![0; (*nr_sectors * SECTOR_SIZE) as usize];
                data.read(*from, &mut buf).map_err(|e| io_errno(&e))?;
                data.write(*to, &buf, WriteFlags::default()).map_err(|e| io_errno(&e))
            }
            DataIo::Discard { ranges, .. } => {
                // The data device's discard reads back as zeroes, as a loop
                // device over a file (hole punching) does. Every range is
                // tried; one that fails fails the discard.
                let mut failed = false;
                for (b, e) in ranges.iter() {
                    let zeroes = vec![0; ((e - b) * SECTOR_SIZE) as usize];
                    failed |= data.write(*b, &zeroes, WriteFlags::default()).is_err();
                }
                if failed {
                    Err(Errno::EIO)
                } else {
                    Ok(())
                }
            }
        }
    }

    /// The end-io path of `io`, which ended with `r`.
    fn end_data_io(&self, io: DataIo, r: Result<(), Errno>) {
        match io {
            DataIo::Bio { bio, .. } => match bio.hook.overwrite_mapping {
                Some(m) => self.overwrite_endio(m, bio, r),
                None => self.end_bio(bio, r),
            },
            DataIo::Zero { mapping, .. } | DataIo::Copy { mapping, .. } => self.copy_complete(mapping, r),
            DataIo::Discard { mapping, .. } => {
                // The pool ignores an error (`passdown_endio`: "It doesn't
                // matter if the passdown discard failed, we still want to
                // unmap"): pass two runs and the user's discard completes
                // as if the discard had reached the device.
                if r.is_err() {
                    self.probe(|p| p.passdown_failures += 1);
                    if self.options.mutations.passdown_error_skips_pass_two {
                        // Broken on purpose: the mapping, its cell, its hold
                        // and the user's discard are left as they are.
                        return;
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
