//! The oracle: what a user of thin block devices may observe.
//!
//! A small reference of the user-visible semantics of dm-thin (kernel 6.1):
//! per thin device, per 512-byte sector, the set of [`Content`]s a read may
//! legally return. It knows nothing of the pool's internals (no mappings, no
//! data blocks). The simulator or test driver feeds it user-level events —
//! device creation, snapshots, deletes, and the submission and completion of
//! every read, write, discard and flush — and hands it the bytes of every
//! completed read, which it judges sector by sector with the stamped payload
//! codec ([`dmsim_traces::stamp`]).
//!
//! # Values
//!
//! A sector's legal set holds [`Content::Zeroes`], [`Content::Write`]`(w)` (the
//! data of write number `w`, as stamped by [`dmsim_traces::stamp::fill`]), or
//! [`Content::Anything`] (stale data from the data device; any bytes at all).
//! A decoded stamp counts as `Write(w)` only if its run is the oracle's run, its
//! sector is the sector being read (else the read is *misdirected*), and its
//! device is the device that submitted write `w` (the oracle records the
//! submitter of every write; after a snapshot, a read of the snapshot legally
//! returns stamps naming the origin). A sector that is neither zero nor an
//! intact stamp ([`SectorContent::Foreign`]: torn, damaged, garbage) is legal
//! only where `Anything` is.
//!
//! # Rules
//!
//! Every event gets a time from one logical clock; every operation that puts a
//! value into a sector's set (a write, a discard, a device creation) is an *op*
//! named by its submission time, and each entry of a set remembers the op that
//! put it there, so completions can tell which values they supersede.
//!
//! 1. **Concurrency.** A read may return any value legal at any moment between
//!    its submission and its completion (the oracle accumulates, per in-flight
//!    read, everything that became legal in its window). A write's value
//!    becomes possible at its submission and certain at its completion: when
//!    write `w` (submitted at time `T`) completes successfully, every value
//!    put there by an op that *completed before `T`* is dropped. What stays:
//!    `w` itself, writes (and discards) still in flight, and those that
//!    completed after `T` — they overlapped `w` and may have landed after it.
//!    A failed write (`ok = false`) drops nothing and stays possible until a
//!    write submitted after its failure completes: it may have partly landed.
//! 2. **Zeroing.** With zeroing on (the default), sectors never written read
//!    zeroes: a partial write to a new block zeroes the rest of the block.
//!    With zeroing off (`skip_block_zeroing`), once a write is submitted to a
//!    block (`sectors_per_block` sectors) of a device, every sector of that
//!    block not yet written (by a completed write since the device's creation
//!    or the block's last discard, with no discard of it in flight) may also
//!    read `Anything`, until a write to it completes. A discard submitted while
//!    a write to one of its blocks is in flight exposes that block again: the
//!    write may re-provision it after the unmapping. (Conservative: a sector
//!    exposed by another write while its own write was in flight may stay
//!    `Anything` until it is written again.)
//! 3. **Discards.** Only the whole blocks a discard covers are affected
//!    (dm-thin silently ignores partial blocks). A discarded sector reads zeroes
//!    or any of its previous legal values — from the discard's submission on,
//!    and after its completion too: the oracle also admits implementations that
//!    do nothing (read-only mode completes discards without unmapping).
//! 4. **Durability and crashes.** Each sector also has an *after-crash* set:
//!    what it may hold if the machine crashed now. Every value that becomes
//!    possible joins it; values leave it only when something was made durable:
//!    * a completed FUA write `w` drops from the after-crash set of its sectors
//!      what rule 1 drops from the legal set (ops completed before `w` was
//!      submitted);
//!    * a completed flush on device X, submitted at `T`, sets the after-crash
//!      set of every sector of X to the legal set as of `T` plus every value
//!      put there since `T` (writes completed before `T` are durable, anything
//!      in flight or later is not);
//!    * discards are never durable on their own: the old values stay.
//!
//!    [`Oracle::crash`]: every device's legal set becomes its after-crash set,
//!    and all in-flight I/O is forgotten (counted as failed). With zeroing off,
//!    "written" (rule 2) after a crash means written and made durable, and an
//!    in-flight discard counts as having unmapped its blocks.
//!    A snapshot starts with its origin's legal set, and (conservatively, though
//!    dm-thin commits and so flushes the data device when creating it) with the
//!    origin's after-crash set joined with the origin's legal set. Writes to the
//!    origin in flight at snapshot time stay possible on the snapshot until
//!    overwritten there; later writes to either never show on the other.
//! 5. **Reads narrow.** A read of a sector whose legal set holds no
//!    `Anything`, was settled (every op behind it completed) before the read was
//!    submitted and did not change until its completion, saw the sector's one
//!    fixed value: the legal set narrows to that value (after a crash, or after
//!    a failed write, successive reads must agree). The after-crash set does not
//!    narrow.
//! 6. **Deleted devices.** I/O submitted to a missing device is a bug of the
//!    driver: a [`UsageError`], never a panic. I/O in flight when its device is
//!    deleted may still complete; a read is then judged against the values it
//!    could have seen.
//!
//! Sectors are independent: nothing ties the values of two sectors together
//! (dm-thin promises no atomicity across sectors, so after a crash a write may
//! survive in part).
//!
//! Classification of a wrong read ([`ViolationKind`]): a stamp of a write the
//! reading device could never have seen — submitted to an unrelated device, or
//! to an ancestor after the snapshot was taken, or to an earlier device of the
//! same id — is a *leak from another device*; a stamp or zeroes the device could
//! have seen but not now (lost write, stale data after overwrite, a write
//! forgotten in a crash) is *wrong data*.
//!
//! # Cost
//!
//! State is kept per run of neighbouring sectors in the same state (a new
//! device is one run; a write, discard or flush splits runs only where its
//! range begins and ends, and runs left equal merge again), so an event
//! costs in proportion to the runs it touches, not the device's size. The
//! sets are small: a legal set holds one entry per op in
//! flight on that sector plus one per distinct settled value (usually one;
//! more after failed or overlapping writes). After-crash sets grow with every
//! write since the sector was last made durable; past [`DURABLE_CAP`] entries
//! the settled values that are no longer legal are folded into one
//! `Anything` (sound, but a crash can then no longer catch a lost write on that
//! sector until the next flush or FUA write). Bookkeeping per write (its
//! submitter and op times) is kept for the whole run, a few dozen bytes each.
//! An in-flight flush holds a copy of its device's legal sets (one per run).
//!
//! Deterministic: only ordered maps and vectors.

mod runs;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;

use runs::Runs;

use dmsim_traces::stamp::{self, SectorContent, SECTOR_SIZE};

/// Thin device id, as in the pool's `create_thin` / `create_snap` messages.
pub type DevId = u32;

/// After-crash sets larger than this fold their settled, no longer legal values
/// into one [`Content::Anything`].
pub const DURABLE_CAP: usize = 64;

/// A point on the oracle's logical clock (one tick per event).
type Time = u64;
/// One lifetime of a device id: ids can be reused after a delete.
type Incarnation = u64;

/// What a sector may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Content {
    /// All zero: never written, zeroed on provisioning, or discarded.
    Zeroes,
    /// The stamped data of this write (its sequence number).
    Write(u64),
    /// Anything at all: stale data of the data device (zeroing off).
    Anything,
}

impl fmt::Display for Content {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Content::Zeroes => f.write_str("zeroes"),
            Content::Write(w) => write!(f, "w{w}"),
            Content::Anything => f.write_str("anything"),
        }
    }
}

/// How the oracle is set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OracleConfig {
    /// Run id every stamp of this run carries.
    pub run: u64,
    /// The pool's data block size in sectors (the granularity of provisioning,
    /// zeroing and discards).
    pub sectors_per_block: u64,
    /// Block zeroing on provisioning (false: `skip_block_zeroing`).
    pub zeroing: bool,
    /// A discarded block's data is undefined until it is written again: its
    /// sectors may also read [`Content::Anything`] (dm-cache, whose discard
    /// only marks origin blocks discarded; a later promotion of one skips
    /// the copy, and the cache block it gets holds whatever it held).
    pub discard_undefined: bool,
}

impl OracleConfig {
    /// The usual configuration: zeroing on.
    pub fn new(run: u64, sectors_per_block: u64) -> Self {
        OracleConfig { run, sectors_per_block, zeroing: true, discard_undefined: false }
    }
}

/// Names one submitted I/O until its completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IoTicket(u64);

impl IoTicket {
    /// The number behind the ticket (the oracle's time of submission).
    pub fn id(self) -> u64 {
        self.0
    }
}

impl fmt::Display for IoTicket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "io#{}", self.0)
    }
}

/// The driver used the oracle wrongly (a bug of the driver, not of the device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageError {
    /// No such device (never created, or deleted).
    NoSuchDevice(DevId),
    /// `create_thin` / `create_snap` with an id in use.
    DeviceExists(DevId),
    /// I/O beyond the device's end.
    OutOfRange {
        /// The device.
        dev: DevId,
        /// First sector of the I/O.
        sector: u64,
        /// Its length in sectors.
        nr_sectors: u64,
        /// The device's size in sectors.
        size: u64,
    },
    /// A write sequence number submitted twice.
    DuplicateWrite(u64),
    /// The ticket is not in flight (already completed, or forgotten by a crash).
    UnknownTicket(IoTicket),
    /// The ticket names an I/O of another kind.
    WrongKind {
        /// The ticket.
        ticket: IoTicket,
        /// What the completion call expected.
        expected: &'static str,
    },
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UsageError::NoSuchDevice(d) => write!(f, "no thin device {d}"),
            UsageError::DeviceExists(d) => write!(f, "thin device {d} already exists"),
            UsageError::OutOfRange { dev, sector, nr_sectors, size } => {
                write!(f, "dev {dev}: sectors {sector}+{nr_sectors} beyond the device's {size} sectors")
            }
            UsageError::DuplicateWrite(w) => write!(f, "write w{w} submitted twice"),
            UsageError::UnknownTicket(t) => write!(f, "{t} is not in flight"),
            UsageError::WrongKind { ticket, expected } => write!(f, "{ticket} is not a {expected}"),
        }
    }
}

impl std::error::Error for UsageError {}

/// Why a read sector is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ViolationKind {
    /// Zeroes or a write the device could have seen, but not legal in the read's
    /// window: a lost write, stale data after an overwrite, a write forgotten in a
    /// crash, a snapshot missing its origin's data.
    WrongData,
    /// An intact stamp of this run meant for another sector.
    Misdirected,
    /// Neither zeroes nor an intact stamp (torn, damaged, stale garbage).
    Foreign,
    /// A write the reading device could never have seen: submitted to an
    /// unrelated device, to an ancestor after the snapshot, or to an earlier
    /// device with the same id.
    LeakFromOtherDevice,
    /// An intact stamp of another run (stale data of earlier media).
    OtherRun,
    /// A stamp of this run naming a write the oracle never saw submitted.
    UnknownWrite,
    /// A stamp naming a device other than the one that submitted that write.
    WrongDevice,
    /// The read's data is not `nr_sectors` whole sectors.
    WrongLength,
}

impl fmt::Display for ViolationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ViolationKind::WrongData => "wrong data",
            ViolationKind::Misdirected => "misdirected",
            ViolationKind::Foreign => "foreign data",
            ViolationKind::LeakFromOtherDevice => "leak from another device",
            ViolationKind::OtherRun => "stamp of another run",
            ViolationKind::UnknownWrite => "unknown write",
            ViolationKind::WrongDevice => "stamp names the wrong device",
            ViolationKind::WrongLength => "wrong length",
        })
    }
}

/// A read returned something no correct thin device may return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The device read.
    pub dev: DevId,
    /// The first wrong sector.
    pub sector: u64,
    /// What it held.
    pub got: SectorContent,
    /// What it could legally have held during the read.
    pub legal: Vec<Content>,
    /// The diagnosis.
    pub kind: ViolationKind,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dev {} sector {}: {}: read ", self.dev, self.sector, self.kind)?;
        match self.got {
            SectorContent::Stamp(s) if self.kind != ViolationKind::OtherRun => {
                write!(f, "w{}@dev{}:s{}", s.write, s.device, s.sector)?
            }
            other => write!(f, "{other}")?,
        }
        f.write_str(", legal: {")?;
        for (i, c) in self.legal.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{c}")?;
        }
        f.write_str("}")
    }
}

impl std::error::Error for Violation {}

/// What [`Oracle::read_completed`] can report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// The device returned something illegal.
    Violation(Violation),
    /// The driver used the oracle wrongly.
    Usage(UsageError),
}

impl ReadError {
    /// The violation, if this is one.
    pub fn violation(&self) -> Option<&Violation> {
        match self {
            ReadError::Violation(v) => Some(v),
            ReadError::Usage(_) => None,
        }
    }
}

impl From<UsageError> for ReadError {
    fn from(e: UsageError) -> Self {
        ReadError::Usage(e)
    }
}

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Violation(v) => v.fmt(f),
            ReadError::Usage(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for ReadError {}

/// One value of a sector's set and the op that put it there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Entry {
    content: Content,
    op: Time,
}

/// Ops (writes, discards, creations) by submission time: their completion
/// time, `None` while in flight.
#[derive(Debug, Default)]
struct Ops {
    completed: BTreeMap<Time, Option<Time>>,
    in_flight: BTreeSet<Time>,
}

impl Ops {
    fn start(&mut self, t: Time) {
        self.completed.insert(t, None);
        self.in_flight.insert(t);
    }

    fn instant(&mut self, t: Time) {
        self.completed.insert(t, Some(t));
    }

    fn finish(&mut self, op: Time, at: Time) {
        self.completed.insert(op, Some(at));
        self.in_flight.remove(&op);
    }

    /// Completion time; `None` while in flight.
    fn completion(&self, op: Time) -> Option<Time> {
        self.completed.get(&op).copied().flatten()
    }

    /// Whether an entry survives the successful completion of write `write`,
    /// submitted at `t`: rule 1.
    fn survives(&self, e: &Entry, write: u64, t: Time) -> bool {
        if e.op == t {
            return e.content == Content::Write(write);
        }
        match self.completion(e.op) {
            Some(done) => done > t,
            None => true,
        }
    }

    /// Sorts and deduplicates, and of the settled entries with one content keeps
    /// only the one completed last: it outlives the others under every rule.
    ///
    /// Sorted, the entries of one content are adjacent: each run is
    /// settled in place, with no map (this runs for every sector an op
    /// touches).
    fn normalize(&self, set: &mut Vec<Entry>) {
        set.sort_unstable();
        set.dedup();
        let (mut kept, mut i) = (0, 0);
        while i < set.len() {
            let content = set[i].content;
            let end = i + set[i..].iter().take_while(|e| e.content == content).count();
            let latest = set[i..end].iter().filter_map(|e| self.completion(e.op)).max();
            // In flight: kept. Settled: only the one completed last, and
            // of two completed at the same time (only creations and folds,
            // which complete instantly) the first.
            let mut settled_kept = false;
            for k in i..end {
                let e = set[k];
                let keep = match self.completion(e.op) {
                    None => true,
                    Some(done) if Some(done) == latest && !settled_kept => {
                        settled_kept = true;
                        true
                    }
                    Some(_) => false,
                };
                if keep {
                    set[kept] = e;
                    kept += 1;
                }
            }
            i = end;
        }
        set.truncate(kept);
    }
}

fn contents(set: &[Entry]) -> Vec<Content> {
    let mut out: Vec<Content> = set.iter().map(|e| e.content).collect();
    out.sort_unstable();
    out.dedup();
    out
}

#[derive(Debug, Clone, PartialEq)]
struct SectorState {
    legal: Vec<Entry>,
    after_crash: Vec<Entry>,
    /// Zeroing off: written by a completed write since creation or the last
    /// discard of its block.
    written: bool,
    /// The same, as it would be after a crash.
    written_durable: bool,
    /// Last time a discard touched the sector (submission or completion).
    reset_at: Time,
    /// Discards in flight over the sector.
    discarding: u32,
}

impl SectorState {
    /// A sector that reads zeroes, now and after a crash, since op `t`.
    fn zeroes(t: u64) -> Self {
        let zeroes = vec![Entry { content: Content::Zeroes, op: t }];
        SectorState {
            legal: zeroes.clone(),
            after_crash: zeroes,
            written: false,
            written_durable: false,
            reset_at: 0,
            discarding: 0,
        }
    }
}

#[derive(Debug)]
struct DeviceState {
    /// Per sector, as runs of sectors in the same state.
    sectors: Runs<SectorState>,
}

#[derive(Debug, Clone, Copy)]
struct WriteRecord {
    dev: DevId,
    incarnation: Incarnation,
    submitted: Time,
}

#[derive(Debug)]
enum Pending {
    Write {
        incarnation: Incarnation,
        write: u64,
        sector: u64,
        nr_sectors: u64,
        fua: bool,
    },
    Discard {
        incarnation: Incarnation,
        first: u64,
        end: u64,
    },
    /// The device's legal sets and `written` flags at the submission.
    Flush {
        incarnation: Incarnation,
        view: Runs<(Vec<Entry>, bool)>,
    },
}

#[derive(Debug)]
struct PendingRead {
    incarnation: Incarnation,
    dev: DevId,
    sector: u64,
    /// Per sector of the read (counted from its first), everything legal
    /// at some moment since submission.
    seen: Runs<Vec<Content>>,
    /// In flight across a rollback: what it saw may predate the rollback,
    /// so it settles nothing.
    across_rollback: bool,
}

/// The reference of what reads of thin devices may return. See the module
/// documentation for the rules.
#[derive(Debug)]
pub struct Oracle {
    config: OracleConfig,
    now: Time,
    next_incarnation: Incarnation,
    devices: BTreeMap<DevId, Incarnation>,
    states: BTreeMap<Incarnation, DeviceState>,
    /// Per incarnation, the (ancestor, snapshot time) pairs whose earlier writes
    /// it may show; kept after deletes.
    lineage: BTreeMap<Incarnation, Vec<(Incarnation, Time)>>,
    writes: BTreeMap<u64, WriteRecord>,
    ops: Ops,
    pending: BTreeMap<IoTicket, Pending>,
    reads: BTreeMap<IoTicket, PendingRead>,
    /// Writes in flight when the target rolled back (see
    /// [`Oracle::rolled_back`]): even a success does not make them stick.
    rolled_back_writes: BTreeSet<IoTicket>,
}

impl Oracle {
    /// An oracle with no devices.
    ///
    /// # Panics
    ///
    /// If `config.sectors_per_block` is 0.
    pub fn new(config: OracleConfig) -> Self {
        assert!(config.sectors_per_block > 0, "oracle: sectors_per_block must be positive");
        Oracle {
            config,
            now: 0,
            next_incarnation: 0,
            devices: BTreeMap::new(),
            states: BTreeMap::new(),
            lineage: BTreeMap::new(),
            writes: BTreeMap::new(),
            ops: Ops::default(),
            pending: BTreeMap::new(),
            reads: BTreeMap::new(),
            rolled_back_writes: BTreeSet::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &OracleConfig {
        &self.config
    }

    fn tick(&mut self) -> Time {
        self.now += 1;
        self.now
    }

    fn incarnation(&self, dev: DevId) -> Result<Incarnation, UsageError> {
        self.devices.get(&dev).copied().ok_or(UsageError::NoSuchDevice(dev))
    }

    fn checked_range(&self, dev: DevId, sector: u64, nr_sectors: u64) -> Result<Incarnation, UsageError> {
        let inc = self.incarnation(dev)?;
        let size = self.states[&inc].sectors.len();
        match sector.checked_add(nr_sectors) {
            Some(end) if end <= size => Ok(inc),
            _ => Err(UsageError::OutOfRange { dev, sector, nr_sectors, size }),
        }
    }

    fn new_incarnation(&mut self, dev: DevId) -> Result<Incarnation, UsageError> {
        if self.devices.contains_key(&dev) {
            return Err(UsageError::DeviceExists(dev));
        }
        self.next_incarnation += 1;
        Ok(self.next_incarnation)
    }

    /// Creates thin device `dev` of `nr_sectors` sectors, all reading zeroes.
    pub fn create_thin(&mut self, dev: DevId, nr_sectors: u64) -> Result<(), UsageError> {
        let inc = self.new_incarnation(dev)?;
        let t = self.tick();
        self.ops.instant(t);
        let sectors = Runs::new(nr_sectors, SectorState::zeroes(t));
        self.devices.insert(dev, inc);
        self.states.insert(inc, DeviceState { sectors });
        self.lineage.insert(inc, Vec::new());
        Ok(())
    }

    /// Grows `dev` to `nr_sectors` (nothing if it is that large already):
    /// the new sectors read zeroes, now and after a crash — a device whose
    /// disk grows, zero-filled. A device never shrinks here: a target that
    /// presents fewer sectors than its disk holds keeps the rest as it was,
    /// and reads it again when it grows back.
    pub fn grow(&mut self, dev: DevId, nr_sectors: u64) -> Result<(), UsageError> {
        let inc = self.incarnation(dev)?;
        if self.states[&inc].sectors.len() >= nr_sectors {
            return Ok(());
        }
        let t = self.tick();
        self.ops.instant(t);
        let sector = SectorState::zeroes(t);
        self.states.get_mut(&inc).expect("live device").sectors.grow(nr_sectors, sector);
        Ok(())
    }

    /// Creates `dev` as a snapshot of `origin`: the origin's view, now and
    /// after a crash (rule 4).
    pub fn create_snap(&mut self, dev: DevId, origin: DevId) -> Result<(), UsageError> {
        let origin_inc = self.incarnation(origin)?;
        let inc = self.new_incarnation(dev)?;
        let t = self.tick();
        let ops = &self.ops;
        let sectors = self.states[&origin_inc].sectors.map(|s| {
            let mut after_crash = s.after_crash.clone();
            after_crash.extend_from_slice(&s.legal);
            ops.normalize(&mut after_crash);
            SectorState { after_crash, ..s.clone() }
        });
        let mut lineage = vec![(origin_inc, t)];
        lineage.extend_from_slice(&self.lineage[&origin_inc]);
        self.devices.insert(dev, inc);
        self.states.insert(inc, DeviceState { sectors });
        self.lineage.insert(inc, lineage);
        Ok(())
    }

    /// Deletes `dev`. I/O still in flight on it may complete; nothing new may
    /// be submitted.
    pub fn delete(&mut self, dev: DevId) -> Result<(), UsageError> {
        let inc = self.incarnation(dev)?;
        self.tick();
        self.devices.remove(&dev);
        self.states.remove(&inc);
        Ok(())
    }

    /// The ids of the existing devices.
    pub fn devices(&self) -> Vec<DevId> {
        self.devices.keys().copied().collect()
    }

    /// The size of `dev` in sectors, if it exists.
    pub fn nr_sectors(&self, dev: DevId) -> Option<u64> {
        let inc = self.devices.get(&dev)?;
        Some(self.states[inc].sectors.len())
    }

    /// How many I/Os are in flight.
    pub fn in_flight(&self) -> usize {
        self.pending.len() + self.reads.len()
    }

    /// Adds `content` (put there by `op`) to the legal and after-crash sets of
    /// the sectors `sectors`, and to the window of every read in flight over
    /// them.
    fn add(&mut self, inc: Incarnation, sectors: Range<u64>, content: Content, op: Time) {
        self.add_where(inc, sectors, content, op, |_| true);
    }

    /// [`Oracle::add`] to those of the sectors `sectors` whose state
    /// satisfies `to` (judged before the addition).
    fn add_where(
        &mut self,
        inc: Incarnation,
        sectors: Range<u64>,
        content: Content,
        op: Time,
        to: impl Fn(&SectorState) -> bool,
    ) {
        let entry = Entry { content, op };
        let mut added: Vec<Range<u64>> = Vec::new();
        let state = self.states.get_mut(&inc).expect("live device");
        state.sectors.update(sectors, |r, state| {
            if !to(state) {
                return;
            }
            for set in [&mut state.legal, &mut state.after_crash] {
                if !set.contains(&entry) {
                    set.push(entry);
                    set.sort_unstable();
                }
            }
            match added.last_mut() {
                Some(last) if last.end == r.start => last.end = r.end,
                _ => added.push(r),
            }
        });
        for read in self.reads.values_mut() {
            if read.incarnation != inc {
                continue;
            }
            let read_end = read.sector + read.seen.len();
            for r in &added {
                let (first, end) = (r.start.max(read.sector), r.end.min(read_end));
                if first >= end {
                    continue;
                }
                read.seen.update(first - read.sector..end - read.sector, |_, seen| {
                    if let Err(at) = seen.binary_search(&content) {
                        seen.insert(at, content);
                    }
                });
            }
        }
    }

    /// Keeps the sets of `sectors` small: normalizes sets that grew (sectors
    /// that are never written collect an entry per exposure or discard), and
    /// folds after-crash sets still beyond [`DURABLE_CAP`].
    fn cap(&mut self, inc: Incarnation, sectors: Range<u64>) {
        const NORMALIZE_AT: usize = 8;
        let mut fold: Vec<Range<u64>> = Vec::new();
        let ops = &self.ops;
        let state = self.states.get_mut(&inc).expect("live device");
        state.sectors.update(sectors, |r, sector| {
            if sector.legal.len() > NORMALIZE_AT {
                ops.normalize(&mut sector.legal);
            }
            if sector.after_crash.len() > NORMALIZE_AT {
                ops.normalize(&mut sector.after_crash);
                if sector.after_crash.len() > DURABLE_CAP {
                    fold.push(r);
                }
            }
        });
        for r in fold {
            // One fold op a run: the sectors of a run are independent, an
            // op apiece or one for all reads the same.
            let t = self.tick();
            self.ops.instant(t);
            let ops = &self.ops;
            let state = self.states.get_mut(&inc).expect("live device");
            state.sectors.update(r, |_, sector| {
                let legal = &sector.legal;
                sector.after_crash.retain(|e| ops.completion(e.op).is_none() || legal.contains(e));
                sector.after_crash.push(Entry { content: Content::Anything, op: t });
                ops.normalize(&mut sector.after_crash);
            });
        }
    }

    /// Blocks `[first, end)` in sectors, clipped to the device.
    fn block_span(&self, sector: u64, nr_sectors: u64, size: u64) -> std::ops::Range<u64> {
        let spb = self.config.sectors_per_block;
        let first = sector / spb * spb;
        let end = (sector + nr_sectors).div_ceil(spb) * spb;
        first..end.min(size)
    }

    /// A write of `nr_sectors` sectors at `sector` of `dev`, stamped as write
    /// number `write`, was submitted (with FUA if `fua`).
    pub fn write_submitted(
        &mut self,
        dev: DevId,
        sector: u64,
        nr_sectors: u64,
        write: u64,
        fua: bool,
    ) -> Result<IoTicket, UsageError> {
        let inc = self.checked_range(dev, sector, nr_sectors)?;
        if self.writes.contains_key(&write) {
            return Err(UsageError::DuplicateWrite(write));
        }
        let t = self.tick();
        self.ops.start(t);
        self.writes.insert(write, WriteRecord { dev, incarnation: inc, submitted: t });
        self.add(inc, sector..sector + nr_sectors, Content::Write(write), t);
        let size = self.states[&inc].sectors.len();
        let span = if nr_sectors > 0 { self.block_span(sector, nr_sectors, size) } else { 0..0 };
        if !self.config.zeroing {
            self.add_where(inc, span.clone(), Content::Anything, t, |s| !s.written || s.discarding > 0);
        }
        self.cap(inc, span);
        let ticket = IoTicket(t);
        self.pending.insert(ticket, Pending::Write { incarnation: inc, write, sector, nr_sectors, fua });
        Ok(ticket)
    }

    fn take(&mut self, ticket: IoTicket, expected: &'static str) -> Result<Pending, UsageError> {
        let pending = self.pending.remove(&ticket).ok_or(UsageError::UnknownTicket(ticket))?;
        let kind = match pending {
            Pending::Write { .. } => "write",
            Pending::Discard { .. } => "discard",
            Pending::Flush { .. } => "flush",
        };
        if kind != expected {
            self.pending.insert(ticket, pending);
            return Err(UsageError::WrongKind { ticket, expected });
        }
        Ok(pending)
    }

    /// The write of `ticket` completed, successfully or not.
    pub fn write_completed(&mut self, ticket: IoTicket, ok: bool) -> Result<(), UsageError> {
        // A write the rollback caught in flight may have landed in a block
        // whose mapping is gone: success or not, it may be lost. Not a FUA
        // write that succeeds: the kernel completes one only once its
        // block's mapping is committed (after the commit that inserted
        // it, or at once for a block the last commit maps), and a
        // rollback goes back to the last commit.
        let fua_write = matches!(self.pending.get(&ticket), Some(Pending::Write { fua: true, .. }));
        let excused = self.rolled_back_writes.remove(&ticket);
        let ok = ok && (!excused || fua_write);
        let Pending::Write { incarnation, write, sector, nr_sectors, fua } = self.take(ticket, "write")?
        else {
            unreachable!("take checked the kind");
        };
        let t = ticket.0;
        let done = self.tick();
        self.ops.finish(t, done);
        let Some(state) = self.states.get_mut(&incarnation) else { return Ok(()) };
        if !ok {
            return Ok(());
        }
        let ops = &self.ops;
        state.sectors.update(sector..sector + nr_sectors, |_, s| {
            s.legal.retain(|e| ops.survives(e, write, t));
            ops.normalize(&mut s.legal);
            let untouched = s.reset_at < t && s.discarding == 0;
            s.written |= untouched;
            if fua {
                s.after_crash.retain(|e| ops.survives(e, write, t));
                ops.normalize(&mut s.after_crash);
                s.written_durable |= untouched;
            }
        });
        Ok(())
    }

    /// A read of `nr_sectors` sectors at `sector` of `dev` was submitted.
    pub fn read_submitted(
        &mut self,
        dev: DevId,
        sector: u64,
        nr_sectors: u64,
    ) -> Result<IoTicket, UsageError> {
        let inc = self.checked_range(dev, sector, nr_sectors)?;
        let t = self.tick();
        let seen = Runs::from_runs(
            nr_sectors,
            self.states[&inc]
                .sectors
                .iter_range(sector..sector + nr_sectors)
                .map(|(r, s)| (r.start - sector, contents(&s.legal))),
        );
        let ticket = IoTicket(t);
        self.reads
            .insert(ticket, PendingRead { incarnation: inc, dev, sector, seen, across_rollback: false });
        Ok(ticket)
    }

    /// The read of `ticket` completed with `data` (ignored unless `ok`). Judges
    /// every sector; reports the first wrong one.
    pub fn read_completed(&mut self, ticket: IoTicket, ok: bool, data: &[u8]) -> Result<(), ReadError> {
        let decoded = if ok { stamp::decode(data) } else { Vec::new() };
        self.read_completed_decoded(ticket, ok, data.len(), &decoded)
    }

    /// [`Oracle::read_completed`] of data already decoded
    /// ([`stamp::decode`]): `len` bytes, `decoded` its sectors.
    pub fn read_completed_decoded(
        &mut self,
        ticket: IoTicket,
        ok: bool,
        len: usize,
        decoded: &[SectorContent],
    ) -> Result<(), ReadError> {
        if self.pending.contains_key(&ticket) {
            return Err(UsageError::WrongKind { ticket, expected: "read" }.into());
        }
        let read = self.reads.remove(&ticket).ok_or(UsageError::UnknownTicket(ticket))?;
        self.tick();
        if !ok {
            return Ok(());
        }
        for (r, legal) in read.seen.iter() {
            let end = r.end.min(decoded.len() as u64);
            for i in r.start..end {
                let (sector, got) = (read.sector + i, decoded[i as usize]);
                if let Some(kind) = self.judge(read.incarnation, sector, got, legal) {
                    let legal = legal.clone();
                    return Err(ReadError::Violation(Violation { dev: read.dev, sector, got, legal, kind }));
                }
            }
        }
        let n = read.seen.len() as usize;
        if len != n * SECTOR_SIZE {
            let at = (len / SECTOR_SIZE).min(n);
            return Err(ReadError::Violation(Violation {
                dev: read.dev,
                sector: read.sector + at as u64,
                got: SectorContent::Foreign,
                legal: read.seen.get(at as u64).cloned().unwrap_or_default(),
                kind: ViolationKind::WrongLength,
            }));
        }
        self.narrow(ticket.0, &read, decoded);
        Ok(())
    }

    /// Rule 5: a sector whose legal set was settled before the read was
    /// submitted and did not change since holds one fixed value, and the read
    /// saw it.
    fn narrow(&mut self, submitted: Time, read: &PendingRead, decoded: &[SectorContent]) {
        if read.across_rollback {
            return;
        }
        let Some(state) = self.states.get_mut(&read.incarnation) else { return };
        let ops = &self.ops;
        let observed = |got: &SectorContent| match got {
            SectorContent::Zeroes => Some(Content::Zeroes),
            SectorContent::Stamp(stamp) => Some(Content::Write(stamp.write)),
            SectorContent::Foreign => None,
        };
        // Neighbouring sectors that saw the same value with the same
        // window narrow as one range.
        for (r, seen) in read.seen.iter() {
            let end = r.end.min(decoded.len() as u64);
            let mut i = r.start;
            while i < end {
                let Some(value) = observed(&decoded[i as usize]) else {
                    i += 1;
                    continue;
                };
                let j = (i + 1..end).find(|&j| observed(&decoded[j as usize]) != Some(value)).unwrap_or(end);
                state.sectors.update(read.sector + i..read.sector + j, |_, sector| {
                    let settled = sector.legal.iter().all(|e| {
                        e.content != Content::Anything
                            && ops.completion(e.op).is_some_and(|done| done < submitted)
                    });
                    if settled && contents(&sector.legal) == *seen {
                        sector.legal.retain(|e| e.content == value);
                    }
                });
                i = j;
            }
        }
    }

    /// `None` if `got` is legal for `sector` given the contents `legal`.
    fn judge(
        &self,
        inc: Incarnation,
        sector: u64,
        got: SectorContent,
        legal: &[Content],
    ) -> Option<ViolationKind> {
        if legal.contains(&Content::Anything) {
            return None;
        }
        let stamp = match got {
            SectorContent::Zeroes => {
                return (!legal.contains(&Content::Zeroes)).then_some(ViolationKind::WrongData)
            }
            SectorContent::Foreign => return Some(ViolationKind::Foreign),
            SectorContent::Stamp(stamp) => stamp,
        };
        if stamp.run != self.config.run {
            return Some(ViolationKind::OtherRun);
        }
        if stamp.sector != sector {
            return Some(ViolationKind::Misdirected);
        }
        let Some(record) = self.writes.get(&stamp.write) else { return Some(ViolationKind::UnknownWrite) };
        if record.dev != stamp.device {
            return Some(ViolationKind::WrongDevice);
        }
        if legal.contains(&Content::Write(stamp.write)) {
            return None;
        }
        let visible = record.incarnation == inc
            || self.lineage[&inc]
                .iter()
                .any(|&(ancestor, at)| ancestor == record.incarnation && record.submitted < at);
        Some(if visible { ViolationKind::WrongData } else { ViolationKind::LeakFromOtherDevice })
    }

    /// A discard of `nr_sectors` sectors at `sector` of `dev` was submitted.
    /// Only the whole blocks it covers matter (rule 3).
    pub fn discard_submitted(
        &mut self,
        dev: DevId,
        sector: u64,
        nr_sectors: u64,
    ) -> Result<IoTicket, UsageError> {
        let inc = self.checked_range(dev, sector, nr_sectors)?;
        let t = self.tick();
        self.ops.start(t);
        let spb = self.config.sectors_per_block;
        let end = (sector + nr_sectors) / spb * spb;
        let first = (sector.div_ceil(spb) * spb).min(end);
        self.add(inc, first..end, Content::Zeroes, t);
        if self.config.discard_undefined {
            self.add(inc, first..end, Content::Anything, t);
        }
        self.states.get_mut(&inc).expect("live device").sectors.update(first..end, |_, state| {
            state.written = false;
            state.written_durable = false;
            state.reset_at = t;
            state.discarding += 1;
        });
        if !self.config.zeroing && first < end {
            // Writes in flight to these blocks may re-provision them after the
            // unmapping, showing stale data around themselves (rule 2). The
            // entries are the discard's: they appear now, and a write that
            // starts after the discard completed lands after any such
            // re-provisioning.
            let exposed: Vec<Range<u64>> = self
                .pending
                .values()
                .filter_map(|p| match *p {
                    Pending::Write { incarnation, sector, nr_sectors, .. }
                        if incarnation == inc && nr_sectors > 0 =>
                    {
                        let span = self.block_span(sector, nr_sectors, end);
                        Some(span.start.max(first)..span.end)
                    }
                    _ => None,
                })
                .collect();
            for sectors in exposed {
                self.add(inc, sectors, Content::Anything, t);
            }
        }
        self.cap(inc, first..end);
        let ticket = IoTicket(t);
        self.pending.insert(ticket, Pending::Discard { incarnation: inc, first, end });
        Ok(ticket)
    }

    /// The discard of `ticket` completed, successfully or not.
    pub fn discard_completed(&mut self, ticket: IoTicket, _ok: bool) -> Result<(), UsageError> {
        let Pending::Discard { incarnation, first, end } = self.take(ticket, "discard")? else {
            unreachable!("take checked the kind");
        };
        let done = self.tick();
        self.ops.finish(ticket.0, done);
        if let Some(state) = self.states.get_mut(&incarnation) {
            state.sectors.update(first..end, |_, s| {
                s.written = false;
                s.written_durable = false;
                s.reset_at = done;
                s.discarding = s.discarding.saturating_sub(1);
            });
        }
        Ok(())
    }

    /// An empty flush (PREFLUSH) on `dev` was submitted.
    pub fn flush_submitted(&mut self, dev: DevId) -> Result<IoTicket, UsageError> {
        let inc = self.incarnation(dev)?;
        let t = self.tick();
        let view = self.states[&inc].sectors.map(|s| (s.legal.clone(), s.written));
        let ticket = IoTicket(t);
        self.pending.insert(ticket, Pending::Flush { incarnation: inc, view });
        Ok(ticket)
    }

    /// The flush of `ticket` completed, successfully or not.
    pub fn flush_completed(&mut self, ticket: IoTicket, ok: bool) -> Result<(), UsageError> {
        let Pending::Flush { incarnation, view } = self.take(ticket, "flush")? else {
            unreachable!("take checked the kind");
        };
        self.tick();
        let t = ticket.0;
        let Some(state) = self.states.get_mut(&incarnation) else { return Ok(()) };
        if !ok {
            return Ok(());
        }
        let ops = &self.ops;
        // The sectors the device had then (it may have grown since).
        for (sectors, (legal_then, written_then)) in view.iter() {
            state.sectors.apply(sectors, |_, s| {
                let mut after_crash = legal_then.clone();
                after_crash.extend(s.after_crash.iter().filter(|e| e.op > t));
                ops.normalize(&mut after_crash);
                // What reads may return narrows too: a successful flush means
                // no rollback took back what it covered. (Without one between
                // the flush's submission and now, nothing changes: reads never
                // allow more than the flush's view and what came after it.)
                let kept = contents(&after_crash);
                let narrowed: Vec<Entry> =
                    s.legal.iter().filter(|e| kept.binary_search(&e.content).is_ok()).cloned().collect();
                if !narrowed.is_empty() {
                    s.legal = narrowed;
                }
                s.after_crash = after_crash;
                s.written_durable |= *written_then && s.reset_at < t;
            });
        }
        state.sectors.coalesce(0..view.len());
        Ok(())
    }

    /// The machine crashed and came back: every device's legal set becomes its
    /// after-crash set; all I/O in flight is forgotten (its tickets become
    /// unknown) and counts as failed.
    pub fn crash(&mut self) {
        let now = self.tick();
        for op in std::mem::take(&mut self.ops.in_flight) {
            self.ops.completed.insert(op, Some(now));
        }
        for pending in std::mem::take(&mut self.pending).into_values() {
            if let Pending::Discard { incarnation, first, end } = pending {
                if let Some(state) = self.states.get_mut(&incarnation) {
                    state.sectors.update(first..end, |_, s| {
                        s.written_durable = false;
                        s.reset_at = now;
                    });
                }
            }
        }
        self.reads.clear();
        self.rolled_back_writes.clear();
        let ops = &self.ops;
        for state in self.states.values_mut() {
            let all = 0..state.sectors.len();
            state.sectors.update(all, |_, s| {
                ops.normalize(&mut s.after_crash);
                s.legal = s.after_crash.clone();
                s.written = s.written_durable;
                s.discarding = 0;
            });
        }
    }

    /// The target rolled its metadata back to the last commit without a
    /// crash (a metadata error aborted the transaction): everything a crash
    /// could lose may now read as it would after one, and what is legal now
    /// stays legal. Requests in flight go on; reads in flight may see the
    /// rolled-back values too, and writes in flight may be lost even when
    /// they complete successfully (their block's new mapping may be among
    /// what was rolled back).
    pub fn rolled_back(&mut self) {
        for (ticket, pending) in &self.pending {
            if matches!(pending, Pending::Write { .. }) {
                self.rolled_back_writes.insert(*ticket);
            }
        }
        let ops = &self.ops;
        for state in self.states.values_mut() {
            let all = 0..state.sectors.len();
            state.sectors.update(all, |_, s| {
                ops.normalize(&mut s.after_crash);
                let mut union = s.legal.clone();
                union.extend(s.after_crash.iter().cloned());
                ops.normalize(&mut union);
                s.legal = union;
                s.written &= s.written_durable;
            });
        }
        for read in self.reads.values_mut() {
            read.across_rollback = true;
            let Some(state) = self.states.get(&read.incarnation) else { continue };
            let sectors = read.sector..read.sector + read.seen.len();
            for (r, s) in state.sectors.iter_range(sectors) {
                let legal = contents(&s.legal);
                read.seen.update(r.start - read.sector..r.end - read.sector, |_, seen| {
                    seen.extend(legal.iter().copied());
                    seen.sort_unstable();
                    seen.dedup();
                });
            }
        }
    }

    /// What a read of `sector` of `dev` may return now (empty if there is no
    /// such sector).
    pub fn legal(&self, dev: DevId, sector: u64) -> Vec<Content> {
        self.sector(dev, sector).map(|s| contents(&s.legal)).unwrap_or_default()
    }

    /// What `sector` of `dev` may hold after a crash now (empty if there is no
    /// such sector).
    pub fn after_crash(&self, dev: DevId, sector: u64) -> Vec<Content> {
        self.sector(dev, sector).map(|s| contents(&s.after_crash)).unwrap_or_default()
    }

    fn sector(&self, dev: DevId, sector: u64) -> Option<&SectorState> {
        let inc = self.devices.get(&dev)?;
        self.states[inc].sectors.get(sector)
    }

    /// The device a write was submitted to, if the oracle saw it.
    pub fn write_device(&self, write: u64) -> Option<DevId> {
        self.writes.get(&write).map(|r| r.dev)
    }
}

/// What a failed data I/O reaches under dm-thin's error paths (kernel 6.1,
/// `drivers/md/dm-thin.c`): the rules of the exact oracle under faults
/// that judge which requests may fail with EIO and which data blocks may
/// leak, shared by the thin campaign ([`crate::thin`]) and the concurrency
/// harnesses ([`crate::concurrency`]); see docs/campaign.md, "The oracle
/// under faults".
///
/// - A request whose own data I/O failed ends with EIO (DM core ends a
///   request with the error of its clone).
/// - A mapping whose zeroing, copy or whole-block overwrite failed
///   (`copy_complete`, `overwrite_endio`: `m->status`) is errored by the
///   worker (`process_prepared_mapping`: `cell_error`): every bio waiting in
///   its cell, or joining it before the worker gets there, fails — the
///   requests of its device that touch its virtual blocks
///   ([`RequestSpan::reached_by`]). Nothing else: a data error changes no
///   pool mode.
/// - The failed mapping's data block stays allocated (the error path frees
///   nothing), and the next commit counts it: a leak ([`is_leak`]) of
///   exactly that block.
pub mod faults {
    use dmsim_model::thin::check::{Problem, Severity, Structure};
    use dmsim_model::thin::metadata::ThinId;
    use dmsim_model::thin::pool::FailedMapping;

    /// Where a request sits: what a failed mapping can reach of it.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct RequestSpan {
        /// The thin device.
        pub thin: ThinId,
        /// The virtual blocks it touches, first and last.
        pub blocks: (u64, u64),
        /// It carries a PREFLUSH: its flush, an empty bio at sector 0,
        /// waits in block 0's cells.
        pub preflush: bool,
    }

    impl RequestSpan {
        /// The span of a request of `nr_sectors` (an empty flush: 0) at
        /// `sector` of device `thin`, on a pool of `block_sectors`-sector
        /// blocks.
        pub fn new(thin: ThinId, sector: u64, nr_sectors: u64, preflush: bool, block_sectors: u64) -> Self {
            let blocks = (sector / block_sectors, (sector + nr_sectors.max(1) - 1) / block_sectors);
            RequestSpan { thin, blocks, preflush }
        }

        /// Whether mapping `m`, whose preparation failed, reaches a request
        /// here that is in flight while `m` waits for the worker: it is on
        /// `m`'s device and touches `m`'s virtual blocks (it waits in `m`'s
        /// cell, or may join it), or its PREFLUSH waits in block 0's cells.
        pub fn reached_by(&self, m: &FailedMapping) -> bool {
            let touches = |first: u64, last: u64| first < m.virt_end && m.virt_begin <= last;
            self.thin == m.thin && (touches(self.blocks.0, self.blocks.1) || self.preflush && touches(0, 0))
        }
    }

    /// A checker problem that is a leaked data block — counted and mapped
    /// by nothing, which the checker (as thin_check) calls non-fatal. A
    /// crash, an abort or a failed mapping may leave one; a block counted
    /// more often than it is mapped is damage.
    pub fn is_leak(p: &Problem) -> bool {
        p.structure == Structure::DataSpaceMap && p.severity == Severity::NonFatal
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dmsim_traces::stamp::{fill, stamp_sector, Stamp};
    use proptest::prelude::*;
    use Content::{Anything, Zeroes};

    const RUN: u64 = 0xd15c_0a11;
    const SPB: u64 = 8;

    fn oracle() -> Oracle {
        Oracle::new(OracleConfig::new(RUN, SPB))
    }

    fn oracle_without_zeroing() -> Oracle {
        Oracle::new(OracleConfig { zeroing: false, ..OracleConfig::new(RUN, SPB) })
    }

    fn stamped(write: u64, dev: DevId, sector: u64, nr: u64) -> Vec<u8> {
        let mut buf = vec![0; nr as usize * SECTOR_SIZE];
        fill(&mut buf, RUN, write, dev, sector);
        buf
    }

    fn zeroes(nr: u64) -> Vec<u8> {
        vec![0; nr as usize * SECTOR_SIZE]
    }

    fn write(o: &mut Oracle, dev: DevId, sector: u64, nr: u64, w: u64, fua: bool) {
        let t = o.write_submitted(dev, sector, nr, w, fua).unwrap();
        o.write_completed(t, true).unwrap();
    }

    fn discard(o: &mut Oracle, dev: DevId, sector: u64, nr: u64) {
        let t = o.discard_submitted(dev, sector, nr).unwrap();
        o.discard_completed(t, true).unwrap();
    }

    fn flush(o: &mut Oracle, dev: DevId) {
        let t = o.flush_submitted(dev).unwrap();
        o.flush_completed(t, true).unwrap();
    }

    fn read(o: &mut Oracle, dev: DevId, sector: u64, data: &[u8]) -> Result<(), ReadError> {
        let t = o.read_submitted(dev, sector, (data.len() / SECTOR_SIZE) as u64).unwrap();
        o.read_completed(t, true, data)
    }

    #[track_caller]
    fn violation(result: Result<(), ReadError>) -> Violation {
        match result {
            Err(ReadError::Violation(v)) => v,
            other => panic!("expected a violation, got {other:?}"),
        }
    }

    fn w(n: u64) -> Content {
        Content::Write(n)
    }

    #[test]
    fn a_grown_device_reads_zeroes_past_its_old_end_and_keeps_the_rest() {
        let mut o = oracle();
        o.create_thin(0, 16).unwrap();
        write(&mut o, 0, 0, 16, 1, false);
        assert!(o.read_submitted(0, 16, 8).is_err(), "past the end");
        o.grow(0, 32).unwrap();
        o.grow(0, 8).unwrap();
        assert_eq!(o.nr_sectors(0), Some(32), "never shrinks");
        read(&mut o, 0, 16, &zeroes(16)).unwrap();
        assert_eq!(o.legal(0, 20), vec![Zeroes]);
        assert_eq!(o.after_crash(0, 20), vec![Zeroes]);
        read(&mut o, 0, 0, &stamped(1, 0, 0, 16)).unwrap();
        violation(read(&mut o, 0, 24, &stamped(1, 0, 24, 8)));
        assert!(o.grow(1, 8).is_err(), "no such device");
    }

    #[test]
    fn a_rollback_may_lose_what_a_crash_may_lose_and_writes_in_flight() {
        let mut o = oracle();
        o.create_thin(0, 64).unwrap();
        write(&mut o, 0, 0, 8, 0, false);
        write(&mut o, 0, 8, 8, 1, true);
        let in_flight = o.write_submitted(0, 16, 8, 2, false).unwrap();
        assert_eq!(o.legal(0, 0), vec![w(0)]);
        o.rolled_back();
        // Not flushed: may be gone. FUA: stays.
        assert_eq!(o.legal(0, 0), vec![Zeroes, w(0)]);
        assert_eq!(o.legal(0, 8), vec![w(1)]);
        // In flight at the rollback: even its success does not make it stick.
        o.write_completed(in_flight, true).unwrap();
        assert_eq!(o.legal(0, 16), vec![Zeroes, w(2)]);
        // A read in flight across the rollback saw the old mapping: it
        // settles nothing.
        let across = o.read_submitted(0, 0, 8).unwrap();
        o.rolled_back();
        o.read_completed(across, true, &stamped(0, 0, 0, 8)).unwrap();
        assert!(read(&mut o, 0, 0, &zeroes(8)).is_ok());
        assert!(read(&mut o, 0, 16, &zeroes(8)).is_ok());
        assert!(violation(read(&mut o, 0, 8, &zeroes(8))).to_string().contains("wrong data"));
    }

    // ---- one test per detector ----

    #[test]
    fn catches_a_lost_write() {
        let mut o = oracle();
        o.create_thin(0, 64).unwrap();
        write(&mut o, 0, 8, 2, 1, false);
        let v = violation(read(&mut o, 0, 8, &zeroes(2)));
        assert_eq!((v.kind, v.sector, v.legal.clone()), (ViolationKind::WrongData, 8, vec![w(1)]));
        read(&mut o, 0, 8, &stamped(1, 0, 8, 2)).unwrap();
    }

    #[test]
    fn catches_stale_data_after_an_overwrite() {
        let mut o = oracle();
        o.create_thin(0, 64).unwrap();
        write(&mut o, 0, 8, 4, 1, false);
        write(&mut o, 0, 10, 4, 2, false);
        let mut got = stamped(1, 0, 8, 4);
        got[..2 * SECTOR_SIZE].copy_from_slice(&stamped(1, 0, 8, 2));
        let v = violation(read(&mut o, 0, 8, &got));
        assert_eq!((v.kind, v.sector, v.legal.clone()), (ViolationKind::WrongData, 10, vec![w(2)]));
        let mut good = stamped(1, 0, 8, 2);
        good.extend(stamped(2, 0, 10, 4));
        read(&mut o, 0, 8, &good).unwrap();
    }

    #[test]
    fn catches_a_misdirected_sector() {
        let mut o = oracle();
        o.create_thin(0, 64).unwrap();
        write(&mut o, 0, 8, 2, 1, false);
        write(&mut o, 0, 16, 1, 2, false);
        // Sector 16 returns the data meant for sector 8.
        let v = violation(read(&mut o, 0, 16, &stamped(1, 0, 8, 1)));
        assert_eq!((v.kind, v.sector), (ViolationKind::Misdirected, 16));
    }

    #[test]
    fn catches_a_leak_from_another_device() {
        let mut o = oracle();
        o.create_thin(0, 64).unwrap();
        o.create_thin(1, 64).unwrap();
        write(&mut o, 0, 8, 1, 1, false);
        let v = violation(read(&mut o, 1, 8, &stamped(1, 0, 8, 1)));
        assert_eq!((v.kind, v.dev), (ViolationKind::LeakFromOtherDevice, 1));
        // A stamp claiming the wrong device is caught as such.
        let v = violation(read(&mut o, 0, 8, &stamped(1, 1, 8, 1)));
        assert_eq!(v.kind, ViolationKind::WrongDevice);
    }

    #[test]
    fn catches_a_new_blocks_unzeroed_remainder() {
        let mut o = oracle();
        o.create_thin(0, 64).unwrap();
        write(&mut o, 0, 16, 2, 1, false);
        let garbage = vec![0x5a; SECTOR_SIZE];
        let v = violation(read(&mut o, 0, 18, &garbage));
        assert_eq!((v.kind, v.sector, v.legal.clone()), (ViolationKind::Foreign, 18, vec![Zeroes]));
        let mut old_media = zeroes(1);
        let stale = Stamp { run: RUN ^ 1, write: 99, device: 0, sector: 18 };
        stamp_sector(&stale, (&mut old_media[..]).try_into().unwrap());
        assert_eq!(violation(read(&mut o, 0, 18, &old_media)).kind, ViolationKind::OtherRun);

        // With zeroing off the same reads are legal, but not in other blocks.
        let mut o = oracle_without_zeroing();
        o.create_thin(0, 64).unwrap();
        write(&mut o, 0, 16, 2, 1, false);
        read(&mut o, 0, 18, &garbage).unwrap();
        read(&mut o, 0, 23, &old_media).unwrap();
        assert_eq!(o.legal(0, 18), vec![Zeroes, Anything]);
        assert_eq!(o.legal(0, 16), vec![w(1)]);
        assert_eq!(violation(read(&mut o, 0, 24, &garbage)).kind, ViolationKind::Foreign);
        // Written sectors are no longer stale; a discard of the block exposes it again.
        write(&mut o, 0, 18, 1, 2, false);
        assert_eq!(o.legal(0, 18), vec![w(2)]);
        discard(&mut o, 0, 16, 8);
        write(&mut o, 0, 20, 1, 3, false);
        read(&mut o, 0, 18, &garbage).unwrap();
    }

    #[test]
    fn catches_a_snapshot_seeing_its_origins_later_write() {
        let mut o = oracle();
        o.create_thin(0, 64).unwrap();
        write(&mut o, 0, 8, 1, 1, false);
        o.create_snap(1, 0).unwrap();
        write(&mut o, 0, 8, 1, 2, false);
        let v = violation(read(&mut o, 1, 8, &stamped(2, 0, 8, 1)));
        assert_eq!((v.kind, v.legal.clone()), (ViolationKind::LeakFromOtherDevice, vec![w(1)]));
        read(&mut o, 1, 8, &stamped(1, 0, 8, 1)).unwrap();
        read(&mut o, 0, 8, &stamped(2, 0, 8, 1)).unwrap();
        // The snapshot's own writes do not show on the origin.
        write(&mut o, 1, 9, 1, 3, false);
        assert_eq!(
            violation(read(&mut o, 0, 9, &stamped(3, 1, 9, 1))).kind,
            ViolationKind::LeakFromOtherDevice
        );
        // A snapshot that lost its origin's data.
        assert_eq!(violation(read(&mut o, 1, 8, &zeroes(1))).kind, ViolationKind::WrongData);
    }

    #[test]
    fn catches_a_fua_write_lost_in_a_crash() {
        let mut o = oracle();
        o.create_thin(0, 64).unwrap();
        write(&mut o, 0, 8, 1, 1, true);
        write(&mut o, 0, 9, 1, 2, false);
        assert_eq!(o.after_crash(0, 8), vec![w(1)]);
        assert_eq!(o.after_crash(0, 9), vec![Zeroes, w(2)]);
        o.crash();
        let v = violation(read(&mut o, 0, 8, &zeroes(1)));
        assert_eq!((v.kind, v.legal.clone()), (ViolationKind::WrongData, vec![w(1)]));
        // The write without FUA may or may not have survived, but the sector
        // holds one of the two for good (rule 5).
        assert_eq!(o.legal(0, 9), vec![Zeroes, w(2)]);
        read(&mut o, 0, 9, &stamped(2, 0, 9, 1)).unwrap();
        assert_eq!(o.legal(0, 9), vec![w(2)]);
        assert_eq!(violation(read(&mut o, 0, 9, &zeroes(1))).kind, ViolationKind::WrongData);
        // Still, it is not durable.
        assert_eq!(o.after_crash(0, 9), vec![Zeroes, w(2)]);
    }

    #[test]
    fn catches_a_flushed_write_lost_in_a_crash() {
        let mut o = oracle();
        o.create_thin(0, 64).unwrap();
        o.create_thin(1, 64).unwrap();
        write(&mut o, 0, 8, 1, 1, false);
        write(&mut o, 1, 8, 1, 2, false);
        let f = o.flush_submitted(0).unwrap();
        write(&mut o, 0, 9, 1, 3, false); // completed after the flush was submitted
        o.flush_completed(f, true).unwrap();
        o.crash();
        let v = violation(read(&mut o, 0, 8, &zeroes(1)));
        assert_eq!((v.kind, v.legal.clone()), (ViolationKind::WrongData, vec![w(1)]));
        read(&mut o, 0, 9, &zeroes(1)).unwrap();
        // A flush of device 0 does not make device 1's writes durable.
        read(&mut o, 1, 8, &zeroes(1)).unwrap();
        // After the crash, the lost write stays lost.
        assert_eq!(violation(read(&mut o, 0, 9, &stamped(3, 0, 9, 1))).kind, ViolationKind::WrongData);
    }

    #[test]
    fn catches_a_torn_sector() {
        let mut o = oracle();
        o.create_thin(0, 64).unwrap();
        let t1 = o.write_submitted(0, 8, 1, 1, false).unwrap();
        let t2 = o.write_submitted(0, 8, 1, 2, false).unwrap();
        let mut torn = stamped(1, 0, 8, 1);
        torn[256..].copy_from_slice(&stamped(2, 0, 8, 1)[256..]);
        let v = violation(read(&mut o, 0, 8, &torn));
        assert_eq!((v.kind, v.legal.clone()), (ViolationKind::Foreign, vec![Zeroes, w(1), w(2)]));
        o.write_completed(t1, true).unwrap();
        o.write_completed(t2, true).unwrap();
        assert_eq!(violation(read(&mut o, 0, 8, &torn)).kind, ViolationKind::Foreign);
    }

    // ---- the rules ----

    #[test]
    fn reads_may_return_anything_legal_during_their_window() {
        let mut o = oracle();
        o.create_thin(0, 64).unwrap();
        let r1 = o.read_submitted(0, 8, 1).unwrap();
        let t = o.write_submitted(0, 8, 1, 1, false).unwrap();
        let r2 = o.read_submitted(0, 8, 1).unwrap();
        o.write_completed(t, true).unwrap();
        let r3 = o.read_submitted(0, 8, 1).unwrap();
        o.read_completed(r1, true, &stamped(1, 0, 8, 1)).unwrap();
        o.read_completed(r2, true, &zeroes(1)).unwrap();
        assert_eq!(violation(o.read_completed(r3, true, &zeroes(1))).kind, ViolationKind::WrongData);
        // A failed read checks nothing.
        let r4 = o.read_submitted(0, 8, 1).unwrap();
        o.read_completed(r4, false, &[]).unwrap();
    }

    #[test]
    fn overlapping_writes_may_land_in_either_order() {
        let mut o = oracle();
        o.create_thin(0, 64).unwrap();
        let t1 = o.write_submitted(0, 8, 1, 1, false).unwrap();
        let t2 = o.write_submitted(0, 8, 1, 2, false).unwrap();
        assert_eq!(o.legal(0, 8), vec![Zeroes, w(1), w(2)]);
        o.write_completed(t2, true).unwrap();
        assert_eq!(o.legal(0, 8), vec![w(1), w(2)]);
        o.write_completed(t1, true).unwrap();
        assert_eq!(o.legal(0, 8), vec![w(1), w(2)]);
        // A write submitted after both completed settles it.
        write(&mut o, 0, 8, 1, 3, false);
        assert_eq!(o.legal(0, 8), vec![w(3)]);
        // Writes in sequence: only the last.
        write(&mut o, 0, 8, 1, 4, false);
        write(&mut o, 0, 8, 1, 5, false);
        assert_eq!(o.legal(0, 8), vec![w(5)]);
    }

    #[test]
    fn a_failed_write_stays_possible_until_overwritten() {
        let mut o = oracle();
        o.create_thin(0, 64).unwrap();
        write(&mut o, 0, 8, 1, 1, false);
        let t = o.write_submitted(0, 8, 2, 2, false).unwrap();
        o.write_completed(t, false).unwrap();
        assert_eq!(o.legal(0, 8), vec![w(1), w(2)]);
        assert_eq!(o.legal(0, 9), vec![Zeroes, w(2)]);
        write(&mut o, 0, 8, 1, 3, false);
        assert_eq!(o.legal(0, 8), vec![w(3)]);
        assert_eq!(o.legal(0, 9), vec![Zeroes, w(2)]);
    }

    #[test]
    fn discards_affect_whole_blocks_only_and_may_do_nothing() {
        let mut o = oracle();
        o.create_thin(0, 64).unwrap();
        write(&mut o, 0, 0, 32, 1, false);
        // Sectors 4..28: whole blocks 8..16 and 16..24.
        let t = o.discard_submitted(0, 4, 24).unwrap();
        assert_eq!(o.legal(0, 7), vec![w(1)]);
        assert_eq!(o.legal(0, 8), vec![Zeroes, w(1)]);
        o.discard_completed(t, true).unwrap();
        assert_eq!(o.legal(0, 23), vec![Zeroes, w(1)]);
        assert_eq!(o.legal(0, 24), vec![w(1)]);
        // A smaller-than-a-block discard does nothing.
        discard(&mut o, 0, 25, 6);
        assert_eq!(o.legal(0, 26), vec![w(1)]);
        // A write after the discard settles the sector again.
        write(&mut o, 0, 8, 1, 2, false);
        assert_eq!(o.legal(0, 8), vec![w(2)]);
        assert_eq!(o.legal(0, 9), vec![Zeroes, w(1)]);
        // Discards are not durable until a flush; afterwards both stay possible.
        assert_eq!(o.after_crash(0, 9), vec![Zeroes, w(1)]);
        flush(&mut o, 0);
        assert_eq!(o.after_crash(0, 9), vec![Zeroes, w(1)]);
        assert_eq!(o.after_crash(0, 8), vec![w(2)]);
    }

    #[test]
    fn a_fua_write_overlapping_another_keeps_it_possible_after_a_crash() {
        let mut o = oracle();
        o.create_thin(0, 64).unwrap();
        write(&mut o, 0, 8, 1, 1, false);
        let t2 = o.write_submitted(0, 8, 1, 2, false).unwrap();
        let t3 = o.write_submitted(0, 8, 1, 3, true).unwrap();
        o.write_completed(t3, true).unwrap();
        assert_eq!(o.after_crash(0, 8), vec![w(2), w(3)]);
        o.write_completed(t2, true).unwrap();
        o.crash();
        assert_eq!(o.legal(0, 8), vec![w(2), w(3)]);
        // In-flight I/O is forgotten.
        assert_eq!(o.write_completed(t2, true), Err(UsageError::UnknownTicket(t2)));
    }

    #[test]
    fn writes_in_flight_at_a_crash_may_or_may_not_have_landed() {
        let mut o = oracle();
        o.create_thin(0, 64).unwrap();
        write(&mut o, 0, 8, 1, 1, true);
        let _lost = o.write_submitted(0, 8, 1, 2, true).unwrap();
        o.crash();
        assert_eq!(o.legal(0, 8), vec![w(1), w(2)]);
        write(&mut o, 0, 8, 1, 3, false);
        assert_eq!(o.legal(0, 8), vec![w(3)]);
        assert_eq!(o.after_crash(0, 8), vec![w(1), w(2), w(3)]);
    }

    #[test]
    fn snapshots_copy_both_views() {
        let mut o = oracle();
        o.create_thin(0, 64).unwrap();
        write(&mut o, 0, 8, 1, 1, true);
        write(&mut o, 0, 8, 1, 2, false);
        o.create_snap(1, 0).unwrap();
        o.create_snap(2, 1).unwrap();
        assert_eq!(o.legal(2, 8), vec![w(2)]);
        assert_eq!(o.after_crash(2, 8), vec![w(1), w(2)]);
        read(&mut o, 2, 8, &stamped(2, 0, 8, 1)).unwrap();
        write(&mut o, 1, 8, 1, 3, false);
        assert_eq!(
            violation(read(&mut o, 2, 8, &stamped(3, 1, 8, 1))).kind,
            ViolationKind::LeakFromOtherDevice
        );
        o.crash();
        read(&mut o, 2, 8, &stamped(1, 0, 8, 1)).unwrap();
    }

    #[test]
    fn deleted_devices_and_reused_ids() {
        let mut o = oracle();
        o.create_thin(0, 64).unwrap();
        write(&mut o, 0, 8, 1, 1, false);
        let r = o.read_submitted(0, 8, 1).unwrap();
        o.delete(0).unwrap();
        assert_eq!(o.read_submitted(0, 8, 1), Err(UsageError::NoSuchDevice(0)));
        assert_eq!(o.write_submitted(0, 8, 1, 2, false), Err(UsageError::NoSuchDevice(0)));
        assert_eq!(o.delete(0), Err(UsageError::NoSuchDevice(0)));
        // The read in flight is still judged.
        o.read_completed(r, true, &stamped(1, 0, 8, 1)).unwrap();
        o.create_thin(0, 64).unwrap();
        assert_eq!(o.create_thin(0, 64), Err(UsageError::DeviceExists(0)));
        let v = violation(read(&mut o, 0, 8, &stamped(1, 0, 8, 1)));
        assert_eq!(v.kind, ViolationKind::LeakFromOtherDevice);
        // Other misuse.
        assert!(matches!(o.read_submitted(0, 60, 8), Err(UsageError::OutOfRange { .. })));
        assert_eq!(o.write_submitted(0, 8, 1, 1, false), Err(UsageError::DuplicateWrite(1)));
        let f = o.flush_submitted(0).unwrap();
        assert_eq!(o.write_completed(f, true), Err(UsageError::WrongKind { ticket: f, expected: "write" }));
        o.flush_completed(f, true).unwrap();
        assert_eq!(o.read_completed(f, true, &[]), Err(ReadError::Usage(UsageError::UnknownTicket(f))));
    }

    #[test]
    fn unknown_writes_other_runs_and_short_reads() {
        let mut o = oracle();
        o.create_thin(0, 64).unwrap();
        assert_eq!(violation(read(&mut o, 0, 8, &stamped(7, 0, 8, 1))).kind, ViolationKind::UnknownWrite);
        let mut other = zeroes(1);
        fill(&mut other, RUN + 1, 7, 0, 8);
        assert_eq!(violation(read(&mut o, 0, 8, &other)).kind, ViolationKind::OtherRun);
        let r = o.read_submitted(0, 8, 2).unwrap();
        let v = violation(o.read_completed(r, true, &zeroes(1)));
        assert_eq!((v.kind, v.sector), (ViolationKind::WrongLength, 9));
    }

    #[test]
    fn a_violation_reads_as_one_line() {
        let mut o = oracle();
        o.create_thin(0, 64).unwrap();
        o.create_thin(1, 64).unwrap();
        write(&mut o, 1, 17, 1, 40, false);
        let t = o.write_submitted(1, 17, 1, 41, false).unwrap();
        o.write_completed(t, false).unwrap();
        write(&mut o, 0, 17, 1, 42, false);
        let v = violation(read(&mut o, 1, 17, &stamped(42, 0, 17, 1)));
        assert_eq!(
            v.to_string(),
            "dev 1 sector 17: leak from another device: read w42@dev0:s17, legal: {w40, w41}"
        );
        let mut other = zeroes(1);
        fill(&mut other, 5, 42, 0, 17);
        let v = violation(read(&mut o, 1, 17, &other));
        assert_eq!(
            v.to_string(),
            "dev 1 sector 17: stamp of another run: read w42@dev0:s17 (run 0x5), legal: {w40, w41}"
        );
    }

    #[test]
    fn sets_stay_small() {
        let mut o = oracle_without_zeroing();
        o.create_thin(0, 16).unwrap();
        for n in 0..1000 {
            write(&mut o, 0, 0, 1, n, false);
            if n % 10 == 0 {
                discard(&mut o, 0, 8, 8);
            }
        }
        for s in [7, 8] {
            let sector = o.states[&o.devices[&0]].sectors.get(s).unwrap();
            assert!(sector.legal.len() <= 8 && sector.after_crash.len() <= 8, "{sector:?}");
        }
        assert_eq!(o.legal(0, 7), vec![Zeroes, Anything]);
    }

    #[test]
    fn after_crash_sets_are_capped() {
        let mut o = oracle();
        o.create_thin(0, 16).unwrap();
        for n in 0..(DURABLE_CAP as u64 + 10) {
            write(&mut o, 0, 8, 1, n, false);
        }
        let after = o.after_crash(0, 8);
        assert!(after.len() <= DURABLE_CAP + 1, "{after:?}");
        assert!(after.contains(&Anything));
        assert_eq!(o.legal(0, 8), vec![w(DURABLE_CAP as u64 + 9)]);
        flush(&mut o, 0);
        assert_eq!(o.after_crash(0, 8), vec![w(DURABLE_CAP as u64 + 9)]);
    }

    // ---- an ideal thin device must never be flagged ----

    /// What one sector of the ideal device holds.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Val {
        Zero,
        Data {
            write: u64,
            dev: DevId,
            sector: u64,
        },
        /// Stale data of the data device: garbage, another run's stamp, or a
        /// stamp of this run meant elsewhere.
        Stale(u64),
    }

    impl Val {
        fn put(self, out: &mut [u8]) {
            let out: &mut [u8; SECTOR_SIZE] = out.try_into().unwrap();
            match self {
                Val::Zero => out.fill(0),
                Val::Data { write, dev, sector } => {
                    stamp_sector(&Stamp { run: RUN, write, device: dev, sector }, out)
                }
                Val::Stale(n) => match n % 3 {
                    0 => out.fill(0xa5),
                    1 => stamp_sector(&Stamp { run: RUN + 1, write: n, device: 7, sector: n }, out),
                    _ => stamp_sector(&Stamp { run: RUN, write: n, device: 0, sector: n + 1 }, out),
                },
            }
        }

        fn allowed_by(self, legal: &[Content]) -> bool {
            legal.contains(&Anything)
                || match self {
                    Val::Zero => legal.contains(&Zeroes),
                    Val::Data { write, .. } => legal.contains(&Content::Write(write)),
                    Val::Stale(_) => false,
                }
        }
    }

    #[derive(Clone, Debug)]
    struct IdealSector {
        cur: Val,
        durable: Val,
        /// Values landed since the sector was last made durable.
        history: Vec<Val>,
    }

    impl IdealSector {
        fn set(&mut self, v: Val) {
            self.cur = v;
            self.history.push(v);
        }

        fn persist(&mut self) {
            self.durable = self.cur;
            self.history.clear();
        }
    }

    /// A correct thin device, as simple as possible: writes land whole at one
    /// moment between submission and completion (a failed one lands a prefix
    /// or nothing), reads sample one moment, a volatile cache per sector, FUA
    /// and flushes persist when they land, discards zero whole blocks or do
    /// nothing, and with zeroing off a write to an unprovisioned block fills
    /// the block with stale data first. A crash keeps, per sector, the durable
    /// value or any value landed since.
    #[derive(Clone, Debug)]
    struct IdealDevice {
        sectors: Vec<IdealSector>,
        provisioned: Vec<bool>,
    }

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        fn coin(&mut self) -> bool {
            self.next() & 1 == 1
        }
    }

    #[derive(Debug)]
    enum Io {
        Write { dev: DevId, sector: u64, nr: u64, write: u64, fua: bool, landed: bool },
        Read { dev: DevId, sector: u64, nr: u64, data: Option<Vec<u8>> },
        Discard { dev: DevId, sector: u64, nr: u64, landed: bool },
        Flush { dev: DevId, landed: bool },
    }

    struct Harness {
        oracle: Oracle,
        zeroing: bool,
        devs: BTreeMap<DevId, IdealDevice>,
        pending: Vec<(IoTicket, Io)>,
        rng: Rng,
        next_write: u64,
        next_dev: DevId,
    }

    impl Harness {
        fn new(zeroing: bool, seed: u64) -> Self {
            let oracle = Oracle::new(OracleConfig { zeroing, ..OracleConfig::new(RUN, SPB) });
            let mut h = Harness {
                oracle,
                zeroing,
                devs: BTreeMap::new(),
                pending: Vec::new(),
                rng: Rng(seed),
                next_write: 1,
                next_dev: 0,
            };
            h.create(44);
            h
        }

        fn create(&mut self, size: u64) {
            let dev = self.next_dev;
            self.next_dev += 1;
            self.oracle.create_thin(dev, size).unwrap();
            let sector = IdealSector { cur: Val::Zero, durable: Val::Zero, history: Vec::new() };
            let device = IdealDevice {
                sectors: vec![sector; size as usize],
                provisioned: vec![false; size.div_ceil(SPB) as usize],
            };
            self.devs.insert(dev, device);
        }

        fn snap(&mut self, origin: DevId) {
            let dev = self.next_dev;
            self.next_dev += 1;
            self.oracle.create_snap(dev, origin).unwrap();
            let mut copy = self.devs[&origin].clone();
            if self.rng.coin() {
                copy.sectors.iter_mut().for_each(IdealSector::persist);
            }
            self.devs.insert(dev, copy);
        }

        fn land_write(&mut self, dev: DevId, sector: u64, nr: u64, write: u64, fua: bool) {
            let Some(d) = self.devs.get_mut(&dev) else { return };
            let size = d.sectors.len() as u64;
            for s in sector..sector + nr {
                let block = s / SPB;
                if !d.provisioned[block as usize] {
                    d.provisioned[block as usize] = true;
                    if !self.zeroing {
                        for x in block * SPB..((block + 1) * SPB).min(size) {
                            d.sectors[x as usize].set(Val::Stale(self.rng.below(1000)));
                        }
                    }
                }
                let sector = &mut d.sectors[s as usize];
                sector.set(Val::Data { write, dev, sector: s });
                if fua {
                    sector.persist();
                }
            }
        }

        fn land_discard(&mut self, dev: DevId, sector: u64, nr: u64) {
            let Some(d) = self.devs.get_mut(&dev) else { return };
            if self.rng.coin() {
                return; // like read-only mode
            }
            for block in sector.div_ceil(SPB)..(sector + nr) / SPB {
                d.provisioned[block as usize] = false;
                for s in block * SPB..(block + 1) * SPB {
                    d.sectors[s as usize].set(Val::Zero);
                }
            }
        }

        fn crash(&mut self) {
            self.oracle.crash();
            self.pending.clear();
            for d in self.devs.values_mut() {
                for s in &mut d.sectors {
                    let k = self.rng.below(s.history.len() as u64 + 1) as usize;
                    s.cur = if k == 0 { s.durable } else { s.history[k - 1] };
                    s.persist();
                }
                for (block, sectors) in d.sectors.chunks(SPB as usize).enumerate() {
                    d.provisioned[block] |= sectors.iter().any(|s| s.cur != Val::Zero);
                }
            }
        }

        fn advance(&mut self, index: usize, fail: bool) {
            let (ticket, mut io) = self.pending.swap_remove(index);
            let done = match &mut io {
                Io::Write { dev, sector, nr, write, fua, landed } => {
                    if *landed {
                        self.oracle.write_completed(ticket, !fail).unwrap();
                        true
                    } else if fail && self.rng.coin() {
                        let part = self.rng.below(*nr + 1);
                        self.land_write(*dev, *sector, part, *write, *fua);
                        self.oracle.write_completed(ticket, false).unwrap();
                        true
                    } else {
                        self.land_write(*dev, *sector, *nr, *write, *fua);
                        *landed = true;
                        false
                    }
                }
                Io::Read { dev, sector, nr, data } => match (fail, data.as_ref(), self.devs.get(dev)) {
                    (false, Some(bytes), _) => {
                        if let Err(e) = self.oracle.read_completed(ticket, true, bytes) {
                            panic!("{e}");
                        }
                        true
                    }
                    (false, None, Some(d)) => {
                        let mut bytes = zeroes(*nr);
                        for (i, out) in bytes.chunks_exact_mut(SECTOR_SIZE).enumerate() {
                            d.sectors[*sector as usize + i].cur.put(out);
                        }
                        *data = Some(bytes);
                        false
                    }
                    _ => {
                        self.oracle.read_completed(ticket, false, &[]).unwrap();
                        true
                    }
                },
                Io::Discard { dev, sector, nr, landed } => {
                    if *landed {
                        self.oracle.discard_completed(ticket, !fail).unwrap();
                        true
                    } else {
                        self.land_discard(*dev, *sector, *nr);
                        *landed = true;
                        false
                    }
                }
                Io::Flush { dev, landed } => {
                    if *landed {
                        self.oracle.flush_completed(ticket, !fail).unwrap();
                        true
                    } else {
                        if let Some(d) = self.devs.get_mut(dev) {
                            d.sectors.iter_mut().for_each(IdealSector::persist);
                        }
                        *landed = true;
                        false
                    }
                }
            };
            if !done {
                self.pending.push((ticket, io));
            }
        }

        fn step(&mut self, kind: u8, a: u32, b: u32, c: u8) {
            let devs: Vec<DevId> = self.devs.keys().copied().collect();
            if devs.is_empty() {
                self.create(40);
                return;
            }
            let dev = devs[a as usize % devs.len()];
            let size = self.devs[&dev].sectors.len() as u64;
            let sector = u64::from(b) % size;
            match kind % 20 {
                0..=3 => {
                    let nr = (1 + u64::from(c) % 12).min(size - sector);
                    let write = self.next_write;
                    self.next_write += 1;
                    let fua = c.is_multiple_of(5);
                    let ticket = self.oracle.write_submitted(dev, sector, nr, write, fua).unwrap();
                    self.pending.push((ticket, Io::Write { dev, sector, nr, write, fua, landed: false }));
                }
                4 | 5 => {
                    let nr = (1 + u64::from(c) % 16).min(size - sector);
                    let ticket = self.oracle.read_submitted(dev, sector, nr).unwrap();
                    self.pending.push((ticket, Io::Read { dev, sector, nr, data: None }));
                }
                6 => {
                    let nr = (1 + u64::from(c) * 2 % 40).min(size - sector);
                    let ticket = self.oracle.discard_submitted(dev, sector, nr).unwrap();
                    self.pending.push((ticket, Io::Discard { dev, sector, nr, landed: false }));
                }
                7 => {
                    let ticket = self.oracle.flush_submitted(dev).unwrap();
                    self.pending.push((ticket, Io::Flush { dev, landed: false }));
                }
                15 if devs.len() < 4 => self.create(40 + u64::from(b % 3) * 4),
                16 if devs.len() < 4 => self.snap(dev),
                17 if devs.len() > 1 && c.is_multiple_of(2) => {
                    self.oracle.delete(dev).unwrap();
                    self.devs.remove(&dev);
                }
                18 if c.is_multiple_of(3) => self.crash(),
                _ if !self.pending.is_empty() => {
                    let index = b as usize % self.pending.len();
                    self.advance(index, c.is_multiple_of(6));
                }
                _ => {}
            }
        }

        /// The ideal device's state is within the oracle's sets, now and after
        /// a crash.
        fn check(&self) {
            for (&dev, d) in &self.devs {
                for (s, sector) in d.sectors.iter().enumerate() {
                    let legal = self.oracle.legal(dev, s as u64);
                    assert!(
                        sector.cur.allowed_by(&legal),
                        "dev {dev} sector {s}: holds {:?}, legal {legal:?}",
                        sector.cur
                    );
                    let after_crash = self.oracle.after_crash(dev, s as u64);
                    for v in std::iter::once(&sector.durable).chain(&sector.history) {
                        assert!(
                            v.allowed_by(&after_crash),
                            "dev {dev} sector {s}: may keep {v:?} after a crash, oracle allows {after_crash:?}"
                        );
                    }
                }
            }
        }

        fn drain(&mut self) {
            while !self.pending.is_empty() {
                self.advance(0, false);
            }
        }
    }

    fn run_ideal(zeroing: bool, seed: u64, steps: &[(u8, u32, u32, u8)]) {
        let mut h = Harness::new(zeroing, seed);
        for &(kind, a, b, c) in steps {
            h.step(kind, a, b, c);
            h.check();
        }
        h.drain();
        h.check();
        // Everything completed: a full read of every device must pass.
        for (dev, d) in h.devs.clone() {
            let nr = d.sectors.len() as u64;
            let mut bytes = zeroes(nr);
            for (i, out) in bytes.chunks_exact_mut(SECTOR_SIZE).enumerate() {
                d.sectors[i].cur.put(out);
            }
            let t = h.oracle.read_submitted(dev, 0, nr).unwrap();
            if let Err(e) = h.oracle.read_completed(t, true, &bytes) {
                panic!("{e}");
            }
        }
    }

    fn steps() -> impl Strategy<Value = Vec<(u8, u32, u32, u8)>> {
        prop::collection::vec(any::<(u8, u32, u32, u8)>(), 1..300)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        #[test]
        fn an_ideal_device_is_never_flagged(seed in any::<u64>(), steps in steps()) {
            run_ideal(true, seed, &steps);
        }

        #[test]
        fn an_ideal_device_without_zeroing_is_never_flagged(seed in any::<u64>(), steps in steps()) {
            run_ideal(false, seed, &steps);
        }
    }

    /// Longer, fixed-seed runs of the ideal device (`ORACLE_SEEDS=n` for more).
    #[test]
    fn long_ideal_runs() {
        let seeds: u64 = std::env::var("ORACLE_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(16);
        for seed in 0..seeds {
            let mut rng = Rng(seed ^ 0xabcd);
            let steps: Vec<_> = (0..3000)
                .map(|_| {
                    let x = rng.next();
                    (x as u8, (x >> 8) as u32, (x >> 24) as u32, (x >> 56) as u8)
                })
                .collect();
            run_ideal(seed % 2 == 0, seed, &steps);
        }
    }
}
