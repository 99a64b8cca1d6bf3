//! The simulated disk and crash-state construction.

use dmsim_model::block_device::{byte_range, BlockDevice, IoError, WriteFlags, SECTOR_SIZE};
use std::collections::{BTreeSet, VecDeque};

use dmsim_traces::DiskFault;
use rand::Rng;

use crate::armed::{ArmedFault, FaultKind, FiredFault};
use crate::image::Image;

/// One request the disk acknowledged, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskEvent {
    /// A write; with FUA it was durable on completion.
    Write {
        /// First sector.
        sector: u64,
        /// The bytes written.
        data: Vec<u8>,
        /// REQ_FUA.
        fua: bool,
    },
    /// A completed flush (REQ_PREFLUSH): everything before it is durable.
    Flush,
}

/// A write acknowledged since the last completed flush, in order.
///
/// Non-FUA writes are volatile until the next flush; FUA writes are durable
/// already but stay in the list so that a crash state replays every write
/// in its order (a kept unflushed write must not overwrite a later FUA one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingWrite {
    /// First sector where the write landed (after any misdirection).
    pub sector: u64,
    /// The bytes written.
    pub data: Vec<u8>,
    /// REQ_FUA: durable on completion.
    pub fua: bool,
}

impl PendingWrite {
    /// Length in sectors.
    pub fn nr_sectors(&self) -> u64 {
        self.data.len() as u64 / SECTOR_SIZE
    }

    /// What names this write among a disk's pending ones: where it
    /// landed, its length, FUA, and a fingerprint of its bytes.
    pub fn key(&self) -> PendingKey {
        PendingKey {
            sector: self.sector,
            nr_sectors: self.nr_sectors(),
            fua: self.fua,
            fnv: fnv64(&self.data),
        }
    }

    fn overlaps(&self, other: &PendingWrite) -> bool {
        self.sector < other.sector + other.nr_sectors() && other.sector < self.sector + self.nr_sectors()
    }
}

/// FNV-1a, 64 bits: a cheap fingerprint of a write's bytes or a disk
/// image.
pub fn fnv64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A pending write's name ([`PendingWrite::key`]): enough to find the
/// same write in another disk's list (another implementation's disk that
/// received the same requests, perhaps in another order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PendingKey {
    /// First sector.
    pub sector: u64,
    /// Length in sectors.
    pub nr_sectors: u64,
    /// REQ_FUA.
    pub fua: bool,
    /// FNV-1a 64 of the bytes.
    pub fnv: u64,
}

/// A disk whose acknowledged writes are volatile until flushed.
///
/// Reads see every acknowledged write. The durable image holds what would
/// survive a power cut right now if the cache lost everything. The disk
/// always tracks the writes acknowledged since the last completed flush, so
/// [`SimDisk::crash_state`] can build a crash state at any moment; the event
/// log (kept only while recording) lets [`crash_image`] build every state
/// of a recorded stretch.
///
/// Faults can be armed with [`SimDisk::arm`] (see [`ArmedFault`]); the ones
/// that fired are collected by [`SimDisk::take_fired`]. Bad sectors and
/// armed faults belong to this `SimDisk` value only: a crash state is just
/// bytes, and the simulator rebuilds a fresh `SimDisk` from it after a power
/// cut, so permanent bad sectors are forgotten across a crash. That is a
/// simplification (a real medium error outlives a power cycle).
#[derive(Debug, Clone)]
pub struct SimDisk {
    /// What reads return.
    visible: Image,
    /// What a power cut that loses the whole cache would leave (sharing
    /// every chunk no write changed since the last flush with `visible`).
    durable: Image,
    /// Requests since recording started.
    log: Vec<DiskEvent>,
    recording: bool,
    /// Writes acknowledged since the last completed flush, in order.
    since_flush: Vec<PendingWrite>,
    /// Faults waiting for their request, oldest first.
    armed: VecDeque<DiskFault>,
    /// Writes that pass before an armed write fault may fire
    /// ([`SimDisk::arm_after_writes`]).
    write_skip: usize,
    /// A fault armed only when the next write error fires
    /// ([`SimDisk::arm_after_write_error`]).
    after_write_error: Option<DiskFault>,
    /// Sectors that fail every request touching them.
    bad: BTreeSet<u64>,
    /// Faults that fired since the last [`SimDisk::take_fired`].
    fired: Vec<FiredFault>,
}

impl SimDisk {
    /// A zeroed disk of `nr_sectors`.
    pub fn new(nr_sectors: u64) -> Self {
        Self::filled(nr_sectors, 0)
    }

    /// A disk of `nr_sectors` every byte of which is `fill`, durable.
    pub fn filled(nr_sectors: u64, fill: u8) -> Self {
        Self::from_image(Image::filled((nr_sectors * SECTOR_SIZE) as usize, fill))
    }

    /// A disk holding `image`, all of it durable (a disk after a power cut,
    /// or one prepared with known contents). No faults are armed and no
    /// sector is bad.
    pub fn from_image(image: impl Into<Image>) -> Self {
        let image = image.into();
        assert!(
            (image.len() as u64).is_multiple_of(SECTOR_SIZE),
            "a disk image is a whole number of sectors"
        );
        SimDisk {
            visible: image.clone(),
            durable: image,
            log: Vec::new(),
            recording: false,
            since_flush: Vec::new(),
            armed: VecDeque::new(),
            write_skip: 0,
            after_write_error: None,
            bad: BTreeSet::new(),
            fired: Vec::new(),
        }
    }

    /// Grows the disk to `nr_sectors` (nothing if it is that large
    /// already), the new sectors all `fill` bytes and durable: a disk that
    /// was always this large, its tail never written. Not while recording
    /// (a crash image is rebuilt on the base image's size).
    pub fn grow(&mut self, nr_sectors: u64, fill: u8) {
        assert!(!self.recording, "a disk grows only while not recording");
        let len = (nr_sectors * SECTOR_SIZE) as usize;
        self.visible.grow(len, fill);
        self.durable.grow(len, fill);
    }

    /// Starts (or restarts) logging requests; returns the durable image at
    /// this point, the base that [`crash_image`] replays the log onto (a
    /// clone sharing the disk's chunks).
    pub fn start_recording(&mut self) -> Image {
        self.log.clear();
        self.recording = true;
        self.durable.clone()
    }

    /// Stops logging and returns the log.
    pub fn take_log(&mut self) -> Vec<DiskEvent> {
        self.recording = false;
        std::mem::take(&mut self.log)
    }

    /// What reads return now.
    pub fn visible(&self) -> &Image {
        &self.visible
    }

    /// What is certainly durable now.
    pub fn durable(&self) -> &Image {
        &self.durable
    }

    /// Every write acknowledged since the last completed flush, FUA ones
    /// included, in order.
    pub fn since_flush(&self) -> &[PendingWrite] {
        &self.since_flush
    }

    /// How many acknowledged writes are volatile (non-FUA since the last
    /// completed flush): the writes a crash state chooses among.
    pub fn unflushed(&self) -> usize {
        self.since_flush.iter().filter(|w| !w.fua).count()
    }

    /// Whether the writes since the last flush are exactly `writes`, in
    /// any order (another disk's unflushed writes: [`PendingWrite::key`]).
    pub fn has_pending(&self, writes: &[PendingKey]) -> bool {
        let mut ours: Vec<PendingKey> = self.since_flush.iter().map(PendingWrite::key).collect();
        let mut theirs = writes.to_vec();
        ours.sort_unstable();
        theirs.sort_unstable();
        ours == theirs
    }

    /// Puts the writes since the last flush in `order` (another disk's
    /// order of the same writes: [`PendingWrite::key`]), so that a crash
    /// state chooses among them as that disk's did. Done only when `order`
    /// names exactly these writes and keeps every two that overlap in
    /// their order here (so what reads see is unchanged); returns whether
    /// the order changed (false too when it was `order` already).
    pub fn follow_pending_order(&mut self, order: &[PendingKey]) -> bool {
        if order.len() != self.since_flush.len() {
            return false;
        }
        let keys: Vec<PendingKey> = self.since_flush.iter().map(PendingWrite::key).collect();
        if keys == order {
            return false;
        }
        let mut taken = vec![false; order.len()];
        let mut permutation = Vec::with_capacity(order.len());
        for key in order {
            let Some(i) = (0..keys.len()).find(|&i| !taken[i] && keys[i] == *key) else { return false };
            taken[i] = true;
            permutation.push(i);
        }
        for (a, &i) in permutation.iter().enumerate() {
            for &j in &permutation[a + 1..] {
                if j < i && self.since_flush[i].overlaps(&self.since_flush[j]) {
                    return false;
                }
            }
        }
        let old = std::mem::take(&mut self.since_flush);
        let mut slots: Vec<Option<PendingWrite>> = old.into_iter().map(Some).collect();
        self.since_flush = permutation.iter().map(|&i| slots[i].take().expect("each once")).collect();
        true
    }

    /// Arms `fault`: it fires on this disk's next request of its kind (see
    /// [`ArmedFault`]). Faults wait in a FIFO; a request fires the oldest
    /// armed fault of its kind, at most one.
    pub fn arm(&mut self, fault: DiskFault) {
        self.armed.push_back(fault);
    }

    /// Arms `fault`, a write fault, to fire on the write after the next
    /// `skip` writes (an aimed fault: the Nth request of a commit). Armed
    /// faults of other kinds are not delayed.
    pub fn arm_after_writes(&mut self, skip: usize, fault: DiskFault) {
        self.write_skip = skip;
        self.armed.push_back(fault);
    }

    /// Arms `fault` at the moment this disk's next armed write error
    /// fires: a fault aimed at what follows a failed write, such as the abort after a failed commit, whose first
    /// read is then the one that fails. Replaces a fault so armed before.
    pub fn arm_after_write_error(&mut self, fault: DiskFault) {
        self.after_write_error = Some(fault);
    }

    /// How many armed faults have not fired yet (one waiting for a write
    /// error included).
    pub fn armed(&self) -> usize {
        self.armed.len() + usize::from(self.after_write_error.is_some())
    }

    /// The armed faults that have not fired yet, oldest first.
    pub fn armed_faults(&self) -> impl Iterator<Item = ArmedFault> + '_ {
        self.armed.iter().map(|&fault| ArmedFault { fault })
    }

    /// Forgets every armed fault that has not fired.
    pub fn disarm_all(&mut self) {
        self.armed.clear();
        self.write_skip = 0;
        self.after_write_error = None;
    }

    /// The sectors made bad by permanent errors, in order.
    pub fn bad_sectors(&self) -> impl Iterator<Item = u64> + '_ {
        self.bad.iter().copied()
    }

    /// The faults that fired and have not been taken yet
    /// ([`Self::take_fired`]), in order.
    pub fn fired(&self) -> &[FiredFault] {
        &self.fired
    }

    /// The faults that fired since the last call (bad-sector hits
    /// included), in order; clears the list.
    pub fn take_fired(&mut self) -> Vec<FiredFault> {
        std::mem::take(&mut self.fired)
    }

    fn check(&self, sector: u64, len: usize) -> Result<std::ops::Range<usize>, IoError> {
        byte_range(sector, len, self.visible.len() as u64)
    }

    fn touches_bad(&self, sector: u64, nr: u64) -> Option<u64> {
        self.bad.range(sector..sector + nr).next().copied()
    }

    /// Fails a request that touches a bad sector, recording the hit.
    fn fail_bad(&mut self, op: &str, sector: u64, nr: u64) -> Result<(), IoError> {
        let Some(bad) = self.touches_bad(sector, nr) else { return Ok(()) };
        self.fired.push(FiredFault {
            kind: FaultKind::BadSectorHit,
            sector,
            nr_sectors: nr,
            description: format!("bad-sector-hit {op} sector {sector} nr {nr} (bad sector {bad})"),
        });
        Err(IoError::Failed { sector, reason: format!("{op} touches bad sector {bad}") })
    }

    /// Removes and returns the oldest armed fault that `pred` accepts.
    fn take_armed(&mut self, pred: impl Fn(&DiskFault) -> bool) -> Option<DiskFault> {
        let i = self.armed.iter().position(pred)?;
        self.armed.remove(i)
    }

    fn error(&mut self, op: &str, sector: u64, nr: u64, permanent: bool) -> IoError {
        if permanent {
            self.bad.extend(sector..sector + nr);
        }
        if op == "write" {
            if let Some(next) = self.after_write_error.take() {
                self.armed.push_back(next);
            }
        }
        let (kind, word) = match (op, permanent) {
            ("read", false) => (FaultKind::ReadErrorTransient, "transient"),
            ("read", true) => (FaultKind::ReadErrorPermanent, "permanent"),
            (_, false) => (FaultKind::WriteErrorTransient, "transient"),
            (_, true) => (FaultKind::WriteErrorPermanent, "permanent"),
        };
        let description = format!("{op}-error sector {sector} nr {nr} {word}");
        self.fired.push(FiredFault { kind, sector, nr_sectors: nr, description: description.clone() });
        IoError::Failed { sector, reason: format!("injected {description}") }
    }
}

impl BlockDevice for SimDisk {
    fn nr_sectors(&self) -> u64 {
        self.visible.len() as u64 / SECTOR_SIZE
    }

    fn read(&mut self, sector: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let r = self.check(sector, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let nr = buf.len() as u64 / SECTOR_SIZE;
        self.fail_bad("read", sector, nr)?;
        let fault = self.take_armed(|f| matches!(f, DiskFault::ReadError { .. } | DiskFault::BitFlip { .. }));
        match fault {
            Some(DiskFault::ReadError { permanent }) => Err(self.error("read", sector, nr, permanent)),
            Some(DiskFault::BitFlip { bit }) => {
                self.visible.read(r.start, buf);
                let bit = bit as u64 % (buf.len() as u64 * 8);
                buf[(bit / 8) as usize] ^= 1 << (bit % 8);
                self.fired.push(FiredFault {
                    kind: FaultKind::BitFlip,
                    sector,
                    nr_sectors: nr,
                    description: format!("bit-flip sector {sector} nr {nr} bit {bit}"),
                });
                Ok(())
            }
            _ => {
                self.visible.read(r.start, buf);
                Ok(())
            }
        }
    }

    fn write(&mut self, sector: u64, buf: &[u8], flags: WriteFlags) -> Result<(), IoError> {
        self.check(sector, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let nr = buf.len() as u64 / SECTOR_SIZE;
        self.fail_bad("write", sector, nr)?;
        let is_write_fault =
            |f: &DiskFault| matches!(f, DiskFault::WriteError { .. } | DiskFault::Misdirect { .. });
        let fault = if self.write_skip > 0 && self.armed.iter().any(is_write_fault) {
            self.write_skip -= 1;
            None
        } else {
            self.take_armed(is_write_fault)
        };
        let target = match fault {
            Some(DiskFault::WriteError { permanent }) => {
                return Err(self.error("write", sector, nr, permanent))
            }
            Some(DiskFault::Misdirect { offset }) => {
                let last_start = self.nr_sectors() - nr;
                let target = (sector as i64 + offset as i64).clamp(0, last_start as i64) as u64;
                self.fired.push(FiredFault {
                    kind: FaultKind::Misdirect,
                    sector,
                    nr_sectors: nr,
                    description: format!("misdirect sector {sector} nr {nr} offset {offset} to {target}"),
                });
                self.fail_bad("write", target, nr)?;
                target
            }
            _ => sector,
        };
        let r = self.check(target, buf.len())?;
        self.visible.write(r.start, buf);
        if flags.fua {
            self.durable.write(r.start, buf);
        }
        self.since_flush.push(PendingWrite { sector: target, data: buf.to_vec(), fua: flags.fua });
        if self.recording {
            self.log.push(DiskEvent::Write { sector: target, data: buf.to_vec(), fua: flags.fua });
        }
        Ok(())
    }

    /// Flushes are never faulted.
    fn flush(&mut self) -> Result<(), IoError> {
        // What reads see is the durable image with every write since the
        // last flush over it, in order (FUA ones too: a later write may
        // cover them). Replaying those costs what they wrote; taking a
        // clone of what reads see costs a reference per chunk of the disk
        // (and the next write to each chunk a copy): the cheaper of the two.
        let pending: usize = self.since_flush.iter().map(|w| w.data.len()).sum();
        if pending < self.visible.len() / 64 {
            for w in &self.since_flush {
                self.durable.write((w.sector * SECTOR_SIZE) as usize, &w.data);
            }
        } else {
            self.durable = self.visible.clone();
        }
        self.since_flush.clear();
        if self.recording {
            self.log.push(DiskEvent::Flush);
        }
        Ok(())
    }
}

/// How the last unflushed write kept by a crash may be torn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TearMode {
    /// Writes reach the disk whole or not at all.
    Whole,
    /// One kept write may keep only some of its sectors.
    Sectors,
}

/// Where a power cut happens and what of the cache survives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrashPoint {
    /// Requests of the log completed before the cut.
    pub after_events: usize,
    /// For each unflushed write since the last flush (in order), whether it
    /// reached the disk.
    pub kept: Vec<bool>,
    /// A kept write that reached the disk only in part: its index among the
    /// unflushed writes, and which of its sectors made it.
    pub torn: Option<(usize, Vec<bool>)>,
}

impl CrashPoint {
    /// A seeded choice of crash point after `after_events` requests of `log`:
    /// each unflushed write survives with probability one half, and with
    /// [`TearMode::Sectors`] one surviving write may be torn.
    pub fn random(log: &[DiskEvent], after_events: usize, tear: TearMode, rng: &mut impl Rng) -> Self {
        let unflushed = unflushed_writes(log, after_events);
        let kept: Vec<bool> = unflushed.iter().map(|_| rng.gen_bool(0.5)).collect();
        let torn = match tear {
            TearMode::Sectors => {
                let candidates: Vec<usize> = (0..kept.len()).filter(|&i| kept[i]).collect();
                if candidates.is_empty() || !rng.gen_bool(0.5) {
                    None
                } else {
                    let i = candidates[rng.gen_range(0..candidates.len())];
                    let sectors = match &log[unflushed[i]] {
                        DiskEvent::Write { data, .. } => data.len() / SECTOR_SIZE as usize,
                        DiskEvent::Flush => 0,
                    };
                    Some((i, (0..sectors).map(|_| rng.gen_bool(0.5)).collect()))
                }
            }
            TearMode::Whole => None,
        };
        CrashPoint { after_events, kept, torn }
    }
}

/// Indexes in `log[..after]` of the writes after the last flush (FUA writes
/// excluded: they are durable already).
fn unflushed_writes(log: &[DiskEvent], after: usize) -> Vec<usize> {
    let last_flush = log[..after].iter().rposition(|e| *e == DiskEvent::Flush);
    let start = last_flush.map_or(0, |i| i + 1);
    (start..after).filter(|&i| matches!(log[i], DiskEvent::Write { fua: false, .. })).collect()
}

/// The disk contents after a power cut at `crash`, replaying `log` onto
/// `base` (the durable image when the log started): a clone of `base`
/// with the crash's writes over it.
pub fn crash_image(base: &Image, log: &[DiskEvent], crash: &CrashPoint) -> Image {
    let mut image = base.clone();
    replay_crash(log, crash, |sector, data| image.write((sector * SECTOR_SIZE) as usize, data));
    image
}

/// Calls `put` with every write (or kept piece of a torn one) that a power
/// cut at `crash` leaves on the disk, in the log's order: everything
/// before the last flush, every FUA write, and the unflushed writes
/// `crash` keeps. Replayed in order, so that a kept unflushed write never
/// overwrites a later FUA write (or a later kept one) where they overlap.
pub(crate) fn replay_crash(log: &[DiskEvent], crash: &CrashPoint, mut put: impl FnMut(u64, &[u8])) {
    let after = crash.after_events.min(log.len());
    let unflushed = unflushed_writes(log, after);
    let first_unflushed = unflushed.first().copied().unwrap_or(after);
    let mut n = 0;
    for (idx, e) in log[..after].iter().enumerate() {
        let DiskEvent::Write { sector, data, fua } = e else { continue };
        // Everything before the last flush is durable, and so is every FUA
        // write.
        if idx < first_unflushed || *fua {
            put(*sector, data);
            continue;
        }
        let this = n;
        n += 1;
        if !crash.kept.get(this).copied().unwrap_or(false) {
            continue;
        }
        match &crash.torn {
            Some((t, sectors)) if *t == this => {
                for (k, &keep) in sectors.iter().enumerate() {
                    if keep {
                        let off = k * SECTOR_SIZE as usize;
                        put(sector + k as u64, &data[off..off + SECTOR_SIZE as usize]);
                    }
                }
            }
            _ => put(*sector, data),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn w(disk: &mut SimDisk, sector: u64, byte: u8) {
        disk.write(sector, &[byte; 1024], WriteFlags::default()).unwrap();
    }

    #[test]
    fn a_disk_grows_with_durable_fill_and_keeps_its_volatile_writes() {
        let mut disk = SimDisk::new(4);
        w(&mut disk, 0, 7);
        disk.grow(8, 0xc5);
        disk.grow(2, 0);
        assert_eq!(disk.nr_sectors(), 8, "never shrinks");
        assert_eq!(disk.visible()[0], 7);
        assert_eq!(disk.durable()[0], 0, "the write is still volatile");
        assert!(disk.visible().range(4 * 512..8 * 512).iter().all(|&b| b == 0xc5));
        assert!(disk.durable().range(4 * 512..8 * 512).iter().all(|&b| b == 0xc5));
        assert_eq!(disk.unflushed(), 1);
        w(&mut disk, 6, 9);
        let (image, _) = disk.crash_state(dmsim_traces::CrashMode::LoseAll, 0);
        assert_eq!(image.len(), 8 * 512);
        assert_eq!(
            (image[0], image[6 * 512], image[5 * 512]),
            (0, 0xc5, 0xc5),
            "the writes lost, the fill kept"
        );
    }

    #[test]
    fn a_crash_state_follows_another_disks_order_of_the_same_writes() {
        let mut disk = SimDisk::new(16);
        w(&mut disk, 0, 1);
        w(&mut disk, 4, 2);
        w(&mut disk, 8, 3);
        let keys: Vec<PendingKey> = disk.since_flush().iter().map(PendingWrite::key).collect();
        // Prefix mode with this seed keeps the first write only.
        let seed =
            (0..1000).find(|&s| disk.crash_state(dmsim_traces::CrashMode::Prefix, s).1.kept == 1).unwrap();
        let (before, _) = disk.crash_state(dmsim_traces::CrashMode::Prefix, seed);
        assert_eq!((before[0], before[4 * 512]), (1, 0));
        let visible = disk.visible().to_vec();
        // Another disk saw the second write first: the same seed keeps it.
        assert!(disk.follow_pending_order(&[keys[1], keys[0], keys[2]]));
        let (after, _) = disk.crash_state(dmsim_traces::CrashMode::Prefix, seed);
        assert_eq!((after[0], after[4 * 512]), (0, 2));
        assert_eq!(disk.visible(), &visible[..], "reads see the same");
        // Not the same writes, or one missing: nothing changes.
        let mut other = keys[2];
        other.fnv ^= 1;
        assert!(!disk.follow_pending_order(&[keys[0], keys[1], other]));
        assert!(!disk.follow_pending_order(&[keys[0], keys[1]]));
        assert!(disk.has_pending(&[keys[2], keys[0], keys[1]]), "the same writes in any order");
        assert!(!disk.has_pending(&[keys[0], keys[1], other]) && !disk.has_pending(&keys[..2]));
        assert_eq!(disk.since_flush()[0].key(), keys[1], "the order followed before");
        // Two overlapping writes swapped would change what reads see: refused.
        w(&mut disk, 9, 4);
        let k: Vec<PendingKey> = disk.since_flush().iter().map(PendingWrite::key).collect();
        assert!(!disk.follow_pending_order(&[k[0], k[1], k[3], k[2]]));
        assert!(!disk.follow_pending_order(&k), "the same order: nothing changes");
        assert!(disk.follow_pending_order(&[k[1], k[0], k[2], k[3]]));
    }

    #[test]
    fn a_flush_makes_the_durable_image_what_reads_see() {
        // Overlapping writes, FUA and not, few and many between flushes
        // (a flush replays the few and copies the whole disk for many).
        let mut disk = SimDisk::new(32);
        let mut x = 7u64;
        for round in 0..40u64 {
            for _ in 0..(round % 7) * (round % 5) {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let (sector, nr, fua) = ((x >> 33) % 28, 1 + (x >> 20) % 4, (x >> 10).is_multiple_of(3));
                disk.write(sector, &vec![(x >> 50) as u8; (nr * 512) as usize], WriteFlags { fua }).unwrap();
            }
            disk.flush().unwrap();
            assert!(disk.durable() == disk.visible(), "round {round}");
            assert!(disk.since_flush().is_empty());
        }
    }

    #[test]
    fn unflushed_writes_are_volatile_and_flushed_ones_durable() {
        let mut disk = SimDisk::new(16);
        let base = disk.start_recording();
        w(&mut disk, 0, 1);
        disk.flush().unwrap();
        w(&mut disk, 2, 2);
        w(&mut disk, 4, 3);
        disk.write(6, &[4; 512], WriteFlags { fua: true }).unwrap();
        let log = disk.take_log();
        assert_eq!(disk.durable()[0], 1);
        assert_eq!(disk.durable()[2 * 512], 0, "not flushed");
        assert_eq!(disk.durable()[6 * 512], 4, "FUA is durable");

        // Lose everything after the flush but the FUA write.
        let lost = CrashPoint { after_events: log.len(), kept: vec![false, false], torn: None };
        let img = crash_image(&base, &log, &lost);
        assert_eq!((img[0], img[2 * 512], img[4 * 512], img[6 * 512]), (1, 0, 0, 4));
        // Keep only the second unflushed write, torn to its second sector.
        let torn = CrashPoint {
            after_events: log.len(),
            kept: vec![false, true],
            torn: Some((1, vec![false, true])),
        };
        let img = crash_image(&base, &log, &torn);
        assert_eq!((img[4 * 512], img[5 * 512]), (0, 3));
        // A crash before the flush may lose the first write too.
        let early = CrashPoint { after_events: 1, kept: vec![false], torn: None };
        assert_eq!(crash_image(&base, &log, &early)[0], 0);
    }

    #[test]
    fn random_crash_points_are_reproducible_from_the_seed() {
        let mut disk = SimDisk::new(64);
        let base = disk.start_recording();
        for i in 0..20 {
            w(&mut disk, 2 * i, i as u8);
        }
        let log = disk.take_log();
        let pick = |seed| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let c = CrashPoint::random(&log, log.len(), TearMode::Sectors, &mut rng);
            (c.clone(), crash_image(&base, &log, &c))
        };
        assert_eq!(pick(7), pick(7));
        assert_ne!(pick(7).0, pick(8).0);
    }

    #[test]
    fn crash_image_replays_in_order_so_a_later_fua_write_wins() {
        let mut disk = SimDisk::new(8);
        let base = disk.start_recording();
        w(&mut disk, 0, 1);
        disk.write(1, &[2; 512], WriteFlags { fua: true }).unwrap();
        let log = disk.take_log();
        let keep = CrashPoint { after_events: log.len(), kept: vec![true], torn: None };
        let img = crash_image(&base, &log, &keep);
        assert_eq!((img[0], img[512]), (1, 2), "the FUA write is later and wins sector 1");
        assert_eq!(img, disk.visible());
    }

    #[test]
    fn crash_image_and_crash_states_agree() {
        let mut disk = SimDisk::new(32);
        let base = disk.start_recording();
        w(&mut disk, 0, 1);
        disk.flush().unwrap();
        for i in 0..5u8 {
            w(&mut disk, u64::from(i) * 3, i + 2);
        }
        disk.write(4, &[9; 512], WriteFlags { fua: true }).unwrap();
        let log = disk.take_log();
        let all = disk.crash_states_exhaustive(5).unwrap();
        for mask in 0..32u32 {
            let kept = (0..5).map(|i| mask >> i & 1 == 1).collect();
            let img = crash_image(&base, &log, &CrashPoint { after_events: log.len(), kept, torn: None });
            assert!(all.iter().any(|(i, _)| img == *i), "mask {mask:05b}");
        }
    }
}
