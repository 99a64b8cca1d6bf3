//! Bios: what a user submits to a thin device, what comes back, and the
//! pieces DM core cuts a request into before the thin target sees them.

use crate::block_device::SECTOR_SIZE;
use crate::deferred_set::DeferredEntry;
use crate::errno::Errno;
use crate::prison::CellId;
use crate::thin::metadata::ThinId;

use super::MappingId;

/// Names one request submitted with [`super::Pool::submit`]; its
/// [`Completion`] carries the same id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BioId(pub u64);

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BioOp {
    /// REQ_OP_READ.
    Read,
    /// REQ_OP_WRITE.
    Write,
    /// REQ_OP_DISCARD.
    Discard,
    /// An empty REQ_PREFLUSH write: flush the device's volatile cache.
    Flush,
}

/// A request to a thin device, as a user (a file system, the trace
/// replayer) submits it: any size and alignment in sectors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BioRequest {
    /// The operation.
    pub op: BioOp,
    /// First sector on the thin device.
    pub sector: u64,
    /// Length in sectors (0 for [`BioOp::Flush`]).
    pub nr_sectors: u64,
    /// REQ_PREFLUSH: flush before the data is written.
    pub preflush: bool,
    /// REQ_FUA: the data is durable when the request completes.
    pub fua: bool,
    /// The payload of a write (`nr_sectors * 512` bytes); empty otherwise.
    pub data: Vec<u8>,
}

impl BioRequest {
    /// A read of `nr_sectors` at `sector`.
    pub fn read(sector: u64, nr_sectors: u64) -> Self {
        BioRequest { op: BioOp::Read, sector, nr_sectors, preflush: false, fua: false, data: Vec::new() }
    }

    /// A write of `data` (a whole number of sectors) at `sector`.
    pub fn write(sector: u64, data: Vec<u8>) -> Self {
        let nr_sectors = data.len() as u64 / SECTOR_SIZE;
        BioRequest { op: BioOp::Write, sector, nr_sectors, preflush: false, fua: false, data }
    }

    /// A discard of `nr_sectors` at `sector`.
    pub fn discard(sector: u64, nr_sectors: u64) -> Self {
        BioRequest { op: BioOp::Discard, sector, nr_sectors, preflush: false, fua: false, data: Vec::new() }
    }

    /// An empty flush.
    pub fn flush() -> Self {
        BioRequest {
            op: BioOp::Flush,
            sector: 0,
            nr_sectors: 0,
            preflush: true,
            fua: false,
            data: Vec::new(),
        }
    }

    /// The same request with REQ_FUA.
    pub fn with_fua(mut self) -> Self {
        self.fua = true;
        self
    }

    /// The same request with REQ_PREFLUSH.
    pub fn with_preflush(mut self) -> Self {
        self.preflush = true;
        self
    }

    /// Checks the request's shape against a device of `dev_sectors`:
    /// the errors the block layer gives before a target sees the bio.
    pub(crate) fn validate(&self, dev_sectors: u64) -> Result<(), String> {
        match self.op {
            BioOp::Flush => {
                if self.nr_sectors != 0 || !self.data.is_empty() {
                    return Err("a flush carries no data".into());
                }
                return Ok(());
            }
            BioOp::Write => {
                if self.data.len() as u64 != self.nr_sectors * SECTOR_SIZE {
                    return Err(format!(
                        "write of {} sectors carries {} bytes of data",
                        self.nr_sectors,
                        self.data.len()
                    ));
                }
            }
            BioOp::Read | BioOp::Discard => {
                if !self.data.is_empty() {
                    return Err("only writes carry data".into());
                }
            }
        }
        if self.nr_sectors == 0 {
            return Err("a read, write or discard needs at least one sector".into());
        }
        let end = self.sector.checked_add(self.nr_sectors).ok_or("sector range overflows")?;
        if end > dev_sectors {
            return Err(format!(
                "sectors {}..{end} reach past the end of the device ({dev_sectors} sectors)",
                self.sector
            ));
        }
        Ok(())
    }
}

/// A finished request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// Which request.
    pub id: BioId,
    /// The thin device it was submitted to.
    pub thin: ThinId,
    /// Success, or the errno the target completed it with.
    pub result: Result<(), Errno>,
    /// What a successful read returned; empty otherwise.
    pub data: Vec<u8>,
}

/// The per-bio data the thin target keeps (the kernel's
/// `dm_thin_endio_hook`): what its completion must undo.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct EndioHook {
    /// Incremented entry of the shared-read deferred set.
    pub shared_read_entry: Option<DeferredEntry>,
    /// Incremented entry of the all-I/O deferred set.
    pub all_io_entry: Option<DeferredEntry>,
    /// The mapping this bio overwrites a whole block for.
    pub overwrite_mapping: Option<MappingId>,
    /// A virtual cell to release when the bio completes (passdown discards).
    pub cell: Option<CellId>,
}

/// A bio as the thin target sees it: a piece of a user's request that never
/// crosses a data block boundary (reads and writes), a whole discard, or an
/// empty flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bio {
    /// The request this piece belongs to.
    pub parent: BioId,
    /// Byte offset of this piece in the parent's payload.
    pub offset: usize,
    /// The thin device.
    pub thin: ThinId,
    /// The operation (an empty flush is `Flush`).
    pub op: BioOp,
    /// First sector on the thin device.
    pub sector: u64,
    /// Length in sectors.
    pub nr_sectors: u64,
    /// REQ_PREFLUSH.
    pub preflush: bool,
    /// REQ_FUA.
    pub fua: bool,
    /// Payload of a write; the buffer a read fills.
    pub data: Vec<u8>,
    /// Per-bio target data.
    pub hook: EndioHook,
}

impl Bio {
    /// `op_is_flush`: PREFLUSH or FUA.
    pub fn is_flush_or_fua(&self) -> bool {
        self.preflush || self.fua
    }

    /// Whether the bio writes data (`bio_data_dir == WRITE` with a size).
    pub fn writes_data(&self) -> bool {
        self.op == BioOp::Write && self.nr_sectors > 0
    }

    /// Whether the bio carries no data (an empty flush).
    pub fn is_empty(&self) -> bool {
        self.nr_sectors == 0
    }
}

/// Cuts `req` into the bios DM core hands the thin target (spec §3.4): reads
/// and writes split at data block boundaries; a PREFLUSH with data becomes an
/// empty flush (returned first) and data pieces without PREFLUSH that are
/// submitted once the flush completes; discards and flushes stay whole.
///
/// With `discard_split` (the 6.4 design's `max_discard_granularity`, in
/// sectors), DM core also splits discards at multiples of it (with the
/// mutation `discard-split-unaligned`, `unaligned`: every piece as long as
/// the granularity from where the last one ended, boundaries or not).
///
/// Returns `(first, after_flush)`: the bios to map now and the ones to map
/// when all of `first` has completed.
pub(crate) fn split(
    id: BioId,
    thin: ThinId,
    mut req: BioRequest,
    block_sectors: u64,
    discard_split: Option<u64>,
    unaligned: bool,
) -> (Vec<Bio>, Vec<Bio>) {
    let piece = |op, sector, nr_sectors, preflush, fua, offset, data| Bio {
        parent: id,
        offset,
        thin,
        op,
        sector,
        nr_sectors,
        preflush,
        fua,
        data,
        hook: EndioHook::default(),
    };
    let empty_flush = || piece(BioOp::Flush, 0, 0, true, false, 0, Vec::new());
    match req.op {
        BioOp::Flush => (vec![empty_flush()], Vec::new()),
        BioOp::Discard => match discard_split {
            None => (
                vec![piece(BioOp::Discard, req.sector, req.nr_sectors, false, false, 0, Vec::new())],
                Vec::new(),
            ),
            Some(granularity) => {
                let mut pieces = Vec::new();
                let mut sector = req.sector;
                let end = req.sector + req.nr_sectors;
                while sector < end {
                    let piece_end = if unaligned {
                        (sector + granularity).min(end)
                    } else {
                        ((sector / granularity + 1) * granularity).min(end)
                    };
                    pieces.push(piece(
                        BioOp::Discard,
                        sector,
                        piece_end - sector,
                        false,
                        false,
                        0,
                        Vec::new(),
                    ));
                    sector = piece_end;
                }
                (pieces, Vec::new())
            }
        },
        BioOp::Read | BioOp::Write => {
            let mut pieces = Vec::new();
            let mut sector = req.sector;
            let end = req.sector + req.nr_sectors;
            while sector < end {
                let block_end = (sector / block_sectors + 1) * block_sectors;
                let piece_end = block_end.min(end);
                let offset = ((sector - req.sector) * SECTOR_SIZE) as usize;
                let len = ((piece_end - sector) * SECTOR_SIZE) as usize;
                let data = match req.op {
                    // A write within one block is one piece: its data moves.
                    BioOp::Write if offset == 0 && len == req.data.len() => std::mem::take(&mut req.data),
                    BioOp::Write => req.data[offset..offset + len].to_vec(),
                    _ => vec![0; len],
                };
                pieces.push(piece(req.op, sector, piece_end - sector, false, req.fua, offset, data));
                sector = piece_end;
            }
            if req.preflush {
                (vec![empty_flush()], pieces)
            } else {
                (pieces, Vec::new())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_and_writes_split_at_block_boundaries() {
        let req = BioRequest::write(100, vec![7; 200 * 512]).with_fua();
        let (now, later) = split(BioId(1), 3, req, 128, None, false);
        assert!(later.is_empty());
        let shape: Vec<_> = now.iter().map(|b| (b.sector, b.nr_sectors, b.offset, b.fua)).collect();
        assert_eq!(shape, vec![(100, 28, 0, true), (128, 128, 28 * 512, true), (256, 44, 156 * 512, true)]);
        assert!(now.iter().all(|b| b.data.len() as u64 == b.nr_sectors * 512 && b.thin == 3));
    }

    #[test]
    fn preflush_with_data_is_an_empty_flush_first() {
        let req = BioRequest::write(0, vec![1; 512]).with_preflush().with_fua();
        let (now, later) = split(BioId(2), 0, req, 128, None, false);
        assert_eq!(now.len(), 1);
        assert!(now[0].is_empty() && now[0].preflush && now[0].op == BioOp::Flush);
        assert_eq!(later.len(), 1);
        assert!(!later[0].preflush && later[0].fua && later[0].nr_sectors == 1);
    }

    #[test]
    fn discards_stay_whole() {
        let (now, later) = split(BioId(3), 0, BioRequest::discard(5, 1000), 128, None, false);
        assert_eq!((now.len(), later.len()), (1, 0));
        assert_eq!((now[0].sector, now[0].nr_sectors), (5, 1000));
    }

    #[test]
    fn discards_split_at_the_granularity_when_asked() {
        let (now, _) = split(BioId(4), 0, BioRequest::discard(100, 1000), 128, Some(512), false);
        let shape: Vec<_> = now.iter().map(|b| (b.sector, b.nr_sectors)).collect();
        assert_eq!(shape, vec![(100, 412), (512, 512), (1024, 76)]);
    }

    #[test]
    fn validation_rejects_bad_shapes() {
        assert!(BioRequest::read(0, 0).validate(100).is_err());
        assert!(BioRequest::read(99, 2).validate(100).is_err());
        assert!(BioRequest::read(u64::MAX, 2).validate(u64::MAX).is_err());
        let mut w = BioRequest::write(0, vec![0; 512]);
        w.nr_sectors = 2;
        assert!(w.validate(100).is_err());
        assert!(BioRequest::flush().validate(100).is_ok());
        assert!(BioRequest::discard(0, 100).validate(100).is_ok());
    }
}
