//! Crash states as a base image and the blocks the crash changed, and a
//! memo of judged crash states.
//!
//! A crash state differs from the durable image its log started on (the
//! base) only where the writes it kept landed: a few blocks of a disk of
//! thousands. [`CrashOverlay`] holds just those blocks; an
//! [`OverlayDevice`] reads the state through them without copying the
//! base, and records every block a reader asked for.
//!
//! [`JudgedStates`] remembers, per judged state, its overlay, the blocks
//! the judge read and the verdict. A judge is a deterministic function of
//! the bytes it reads (and of the device's size, the same for every state
//! of one base): run on a state that holds the same bytes in every block
//! an earlier run read, it reads the same blocks in the same order, so it
//! reaches the same verdict. [`JudgedStates::judge`] finds such an
//! earlier state by comparing only the blocks either overlay changed that
//! the earlier judge read; the states of one commit mostly differ in
//! blocks no judge reads (shadows written to free blocks before the
//! superblock that would reach them), so most are judged once.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;

use dmsim_model::block_device::{byte_range, BlockDevice, IoError, WriteFlags, SECTOR_SIZE};

use crate::disk::{replay_crash, CrashPoint, DiskEvent};
use crate::image::{Image, CHUNK};

/// The unit an overlay holds and a reader's blocks are recorded in.
pub const OVERLAY_BLOCK: usize = CHUNK;

/// The blocks of a crash state that differ from its base (or may: a
/// block a kept write touched, even with the base's own bytes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CrashOverlay {
    blocks: BTreeMap<u64, Box<[u8]>>,
}

impl CrashOverlay {
    /// The state a power cut at `crash` leaves, replaying `log` onto
    /// `base` (the durable image when the log started): as
    /// [`crate::crash_image`], without copying `base`.
    pub fn of_crash(base: &Image, log: &[DiskEvent], crash: &CrashPoint) -> Self {
        let mut overlay = CrashOverlay::default();
        replay_crash(log, crash, |sector, data| overlay.put(base, sector * SECTOR_SIZE, data));
        overlay
    }

    /// Writes `data` at byte `at` over `base`.
    fn put(&mut self, base: &Image, at: u64, data: &[u8]) {
        let mut at = at as usize;
        let mut data = data;
        while !data.is_empty() {
            let block = at / OVERLAY_BLOCK;
            let off = at % OVERLAY_BLOCK;
            let n = data.len().min(OVERLAY_BLOCK - off);
            let bytes = self.blocks.entry(block as u64).or_insert_with(|| base.block(block as u64).into());
            bytes[off..off + n].copy_from_slice(&data[..n]);
            at += n;
            data = &data[n..];
        }
    }

    /// Block `b`'s bytes in the state: the overlay's, or `base`'s.
    pub fn block<'a>(&'a self, base: &'a Image, b: u64) -> &'a [u8] {
        match self.blocks.get(&b) {
            Some(bytes) => bytes,
            None => base.block(b),
        }
    }

    /// The blocks the overlay holds.
    pub fn blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.blocks.keys().copied()
    }

    /// The whole state (`base` with the overlay over it).
    pub fn to_image(&self, base: &Image) -> Image {
        let mut image = base.clone();
        for (&b, bytes) in &self.blocks {
            image.write(b as usize * OVERLAY_BLOCK, bytes);
        }
        image
    }
}

/// The blocks a reader of an [`OverlayDevice`] asked for, shared so that
/// they can be read after the device was handed on.
pub type ReadBlocks = Rc<RefCell<BTreeSet<u64>>>;

/// A crash state as a device: its base and overlay. Reads record the
/// blocks they touch ([`OverlayDevice::read_blocks`]); writes go into the
/// overlay (the base is never changed).
#[derive(Debug)]
pub struct OverlayDevice<'a> {
    base: &'a Image,
    overlay: CrashOverlay,
    read: ReadBlocks,
}

impl<'a> OverlayDevice<'a> {
    /// The state `overlay` over `base`.
    pub fn new(base: &'a Image, overlay: CrashOverlay) -> Self {
        OverlayDevice { base, overlay, read: ReadBlocks::default() }
    }

    /// The blocks read so far, and from now on, through this device.
    pub fn read_blocks(&self) -> ReadBlocks {
        Rc::clone(&self.read)
    }
}

impl BlockDevice for OverlayDevice<'_> {
    fn nr_sectors(&self) -> u64 {
        self.base.len() as u64 / SECTOR_SIZE
    }

    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let r = byte_range(sector, buf.len(), self.base.len() as u64 / SECTOR_SIZE * SECTOR_SIZE)?;
        let mut read = self.read.borrow_mut();
        let mut at = r.start;
        while at < r.end {
            let b = at / OVERLAY_BLOCK;
            let off = at % OVERLAY_BLOCK;
            let n = (r.end - at).min(OVERLAY_BLOCK - off);
            read.insert(b as u64);
            let bytes = self.overlay.block(self.base, b as u64);
            buf[at - r.start..at - r.start + n].copy_from_slice(&bytes[off..off + n]);
            at += n;
        }
        Ok(())
    }

    fn write(&mut self, sector: u64, buf: &[u8], _flags: WriteFlags) -> Result<(), IoError> {
        let r = byte_range(sector, buf.len(), self.base.len() as u64 / SECTOR_SIZE * SECTOR_SIZE)?;
        self.overlay.put(self.base, r.start as u64, buf);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), IoError> {
        Ok(())
    }
}

/// The crash states of one base seen so far, by their bytes: a campaign
/// that draws several crash points at each request of a log judges each
/// distinct state once and counts only distinct ones (two draws often
/// keep the same writes, and two points can leave the same bytes).
#[derive(Debug, Default)]
pub struct DistinctStates {
    /// The blocks of each state seen that differ from the base, by a hash
    /// of them.
    seen: BTreeMap<u64, Vec<StateBlocks>>,
}

/// A state's blocks that differ from its base, in block order.
type StateBlocks = Vec<(u64, Box<[u8]>)>;

impl DistinctStates {
    /// No state seen yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `overlay` (over the one base of every overlay given) holds
    /// bytes no overlay given before held; remembers it.
    pub fn first_time(&mut self, base: &Image, overlay: &CrashOverlay) -> bool {
        // Blocks that hold the base's own bytes do not make a state
        // differ: they are left out of the key and of the comparison.
        let own: Vec<(u64, &[u8])> = overlay
            .blocks
            .iter()
            .filter(|(&b, bytes)| base.block(b) != &bytes[..])
            .map(|(&b, bytes)| (b, &bytes[..]))
            .collect();
        let mut key = 0u64;
        for (b, bytes) in &own {
            key = (key.rotate_left(17) ^ b ^ u64::from(crc32c::crc32c(bytes)) << 32)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
        let bucket = self.seen.entry(key).or_default();
        let alike = |other: &StateBlocks| {
            other.len() == own.len() && other.iter().zip(&own).all(|((a, x), (b, y))| a == b && &x[..] == *y)
        };
        if bucket.iter().any(alike) {
            return false;
        }
        bucket.push(own.into_iter().map(|(b, bytes)| (b, bytes.into())).collect());
        true
    }

    /// Distinct states seen.
    pub fn len(&self) -> usize {
        self.seen.values().map(Vec::len).sum()
    }

    /// Whether none was seen.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

/// Judged crash states of one base, with the blocks their judge read
/// (see the module's documentation).
#[derive(Debug)]
pub struct JudgedStates<V> {
    judged: Vec<(CrashOverlay, BTreeSet<u64>, V)>,
    /// The most states kept; the oldest go first.
    capacity: usize,
    hits: u64,
}

impl<V: Clone> JudgedStates<V> {
    /// A memo keeping up to `capacity` judged states.
    pub fn new(capacity: usize) -> Self {
        JudgedStates { judged: Vec::new(), capacity, hits: 0 }
    }

    /// The verdict of an earlier state whose judge read, in every block,
    /// what `overlay` over `base` holds there; `None` if there is none.
    fn verdict(&mut self, base: &Image, overlay: &CrashOverlay) -> Option<V> {
        let found = self.judged.iter().find(|(earlier, read, _)| {
            let changed: BTreeSet<u64> = earlier.blocks().chain(overlay.blocks()).collect();
            changed
                .into_iter()
                .filter(|b| read.contains(b))
                .all(|b| earlier.block(base, b) == overlay.block(base, b))
        });
        let v = found.map(|(_, _, v)| v.clone());
        self.hits += u64::from(v.is_some());
        v
    }

    /// Remembers `overlay`'s verdict, its judge having read `read`.
    fn remember(&mut self, overlay: CrashOverlay, read: BTreeSet<u64>, verdict: V) {
        if self.capacity == 0 {
            return;
        }
        if self.judged.len() == self.capacity {
            self.judged.remove(0);
        }
        self.judged.push((overlay, read, verdict));
    }

    /// States answered from the memo so far.
    pub fn hits(&self) -> u64 {
        self.hits
    }

    /// Judges the state `overlay` over `base` with `judge` (given a device
    /// of the state), or answers from an earlier state: see
    /// the module's documentation. The boolean says whether it was answered
    /// so.
    pub fn judge(
        &mut self,
        base: &Image,
        overlay: CrashOverlay,
        judge: impl FnOnce(OverlayDevice<'_>) -> V,
    ) -> (V, bool) {
        if let Some(v) = self.verdict(base, &overlay) {
            return (v, true);
        }
        let dev = OverlayDevice::new(base, overlay.clone());
        let read = dev.read_blocks();
        let v = judge(dev);
        let read = std::mem::take(&mut *read.borrow_mut());
        self.remember(overlay, read, v.clone());
        (v, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{crash_image, TearMode};
    use rand::SeedableRng;

    fn write(sector: u64, byte: u8, sectors: usize, fua: bool) -> DiskEvent {
        DiskEvent::Write { sector, data: vec![byte; sectors * SECTOR_SIZE as usize], fua }
    }

    /// A log over several blocks: writes, a flush, more writes, some FUA
    /// and some across block boundaries.
    fn log() -> Vec<DiskEvent> {
        vec![
            write(0, 1, 8, false),
            write(12, 2, 8, false),
            DiskEvent::Flush,
            write(8, 3, 2, false),
            write(30, 4, 4, true),
            write(9, 5, 8, false),
            write(40, 6, 1, false),
        ]
    }

    #[test]
    fn an_overlay_reads_as_the_crash_image_at_every_point() {
        let base = Image::from((0..64 * SECTOR_SIZE as usize).map(|i| (i / 7) as u8).collect::<Vec<u8>>());
        let log = log();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for after in 0..=log.len() {
            for _ in 0..16 {
                let crash = CrashPoint::random(&log, after, TearMode::Sectors, &mut rng);
                let image = crash_image(&base, &log, &crash);
                let overlay = CrashOverlay::of_crash(&base, &log, &crash);
                assert_eq!(overlay.to_image(&base), image, "{crash:?}");
                let mut dev = OverlayDevice::new(&base, overlay);
                let mut buf = vec![0u8; image.len()];
                dev.read(0, &mut buf).unwrap();
                assert!(image == buf);
                let mut piece = [0u8; 1024];
                dev.read(13, &mut piece).unwrap();
                assert_eq!(piece.to_vec(), image.range(13 * 512..15 * 512));
            }
        }
    }

    #[test]
    fn reads_are_recorded_by_block_and_bounded_by_the_device() {
        let base = Image::filled(4 * OVERLAY_BLOCK, 0);
        let mut dev = OverlayDevice::new(&base, CrashOverlay::default());
        let read = dev.read_blocks();
        let mut buf = [0u8; 1024];
        dev.read(7, &mut buf).unwrap(); // sectors 7 and 8: blocks 0 and 1
        assert_eq!(*read.borrow(), BTreeSet::from([0, 1]));
        assert!(dev.read(31, &mut buf).is_err(), "past the end");
        dev.write(24, &[9u8; 512], WriteFlags::default()).unwrap();
        let mut one = [0u8; 512];
        dev.read(24, &mut one).unwrap();
        assert_eq!(one, [9u8; 512]);
        assert!(base == vec![0u8; 4 * OVERLAY_BLOCK], "the base is never written");
    }

    /// The state of `writes` over `base`: each `(block, byte)` writes
    /// `len` bytes of `byte` at the start of the block.
    fn overlay_of(base: &Image, writes: &[(u64, u8)], len: usize) -> CrashOverlay {
        let mut o = CrashOverlay::default();
        for &(block, byte) in writes {
            o.put(base, block * OVERLAY_BLOCK as u64, &vec![byte; len]);
        }
        o
    }

    /// Distinct states are told apart by their bytes alone: the same
    /// writes kept twice, or a kept write of the base's own bytes, are not
    /// new; a different byte anywhere is.
    #[test]
    fn distinct_states_are_distinct_in_their_bytes() {
        let base = Image::filled(8 * OVERLAY_BLOCK, 0);
        let state = |writes: &[(u64, u8)]| overlay_of(&base, writes, 16);
        let mut seen = DistinctStates::new();
        assert!(seen.first_time(&base, &state(&[])));
        assert!(!seen.first_time(&base, &state(&[])), "nothing kept, twice");
        assert!(!seen.first_time(&base, &state(&[(3, 0)])), "a write of the base's own bytes");
        assert!(seen.first_time(&base, &state(&[(3, 1)])));
        assert!(seen.first_time(&base, &state(&[(3, 2)])), "another byte in the same block");
        assert!(seen.first_time(&base, &state(&[(3, 1), (5, 1)])));
        assert!(!seen.first_time(&base, &state(&[(5, 1), (3, 1), (6, 0)])));
        assert_eq!(seen.len(), 4);
    }

    /// The memo answers a state only from one whose judge read the same
    /// bytes: a state that differs in a block the judge read is judged
    /// again; one that differs only elsewhere is not.
    #[test]
    fn the_memo_answers_only_from_states_alike_where_the_judge_read() {
        let base = Image::filled(8 * OVERLAY_BLOCK, 0);
        let state = |writes: &[(u64, u8)]| overlay_of(&base, writes, OVERLAY_BLOCK);
        // A judge that reads blocks 0 and whatever block 0's first byte
        // names, and answers with the bytes it read.
        let judge = |mut dev: OverlayDevice<'_>| {
            let mut b0 = [0u8; OVERLAY_BLOCK];
            dev.read(0, &mut b0).unwrap();
            let mut next = [0u8; OVERLAY_BLOCK];
            dev.read(u64::from(b0[0]) * 8, &mut next).unwrap();
            (b0[0], next[0])
        };
        let mut memo = JudgedStates::new(8);
        assert_eq!(memo.judge(&base, state(&[(5, 7)]), judge), ((0, 0), false));
        // Block 5 was never read: the same verdict, from the memo.
        assert_eq!(memo.judge(&base, state(&[(5, 9), (6, 1)]), judge), ((0, 0), true));
        // Block 0 was read: judged again, and it now reads block 3.
        assert_eq!(memo.judge(&base, state(&[(0, 3), (3, 4)]), judge), ((3, 4), false));
        assert_eq!(memo.judge(&base, state(&[(0, 3), (3, 4), (5, 1)]), judge), ((3, 4), true));
        assert_eq!(memo.judge(&base, state(&[(0, 3), (3, 8)]), judge), ((3, 8), false));
        // A state whose overlay holds the base's own bytes is alike.
        assert_eq!(memo.judge(&base, state(&[(0, 0)]), judge), ((0, 0), true));
        assert_eq!(memo.hits(), 3);
        // With no room, nothing is remembered.
        let mut none = JudgedStates::new(0);
        assert_eq!(none.judge(&base, state(&[]), judge), ((0, 0), false));
        assert_eq!(none.judge(&base, state(&[]), judge), ((0, 0), false));
    }
}
