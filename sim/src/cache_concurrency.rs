//! Harnesses for the dm-cache target's I/O paths ([`dmsim_model::cache::core`])
//! on real threads, for loom (`RUSTFLAGS="--cfg loom"`, exhaustive up to a
//! preemption bound) and shuttle (the `shuttle` feature, randomized and PCT
//! schedules), in the style of the thin pool's [`crate::concurrency`].
//!
//! # The cache's own locks
//!
//! [`Cache`]'s entry points take `&self` and reach its state through
//! [`dmsim_model::sync`] locks, one per lock domain of the kernel's (the
//! prison's spinlock, `cache->lock` with the committer's and the
//! workqueue's, the target's metadata and policy, the bios' memory, the I/O
//! tracker and counters). The harness's threads call into the cache without
//! holding any lock of the harness, so the checker interleaves them between
//! any two of the cache's critical sections: two submitters' map paths, a
//! map path and a worker pass, a data I/O completion and either.
//!
//! The harness keeps its own book (the reference, what was sent and
//! completed) behind one lock, which no cache lock is ever held across.
//! A submitter announces its request to the reference under a provisional
//! id before it submits, then tells it the cache's id; a completion that
//! arrives in between waits for that.
//!
//! # Threads
//!
//! A [`Scenario`] first sets a cache up single-threaded until the race it
//! is about provably exists (a migration's copy in flight, a demotion
//! waiting for its last step), and asserts it got there; then it races:
//!
//! - one or two **submitters**, each running its program: submit a request,
//!   wait (idle) until it completed, next;
//! - the **worker**, which runs [`Cache::run_worker`] whenever the cache
//!   wants it;
//! - the **completion context**, which completes one data I/O in flight
//!   (copies, flushes and passdown discards included; which one is the
//!   checker's choice, [`Run::pick`]).
//!
//! Every thread loops until the run is over — all submitters done, no
//! request or data I/O in flight, the worker not wanted — and, when it has
//! nothing to do, either yields ([`Idle::Yield`], shuttle) or blocks on a
//! condition variable until another thread changed something
//! ([`Idle::Block`], loom, where two yielding threads could hand the
//! processor to each other for ever). A request that never completes shows
//! as a run that never ends (shuttle's step bound) or a deadlock (every
//! thread blocked), both reported by the checker.
//!
//! # What each execution checks
//!
//! - Every request completes exactly once, successfully.
//! - Every read returns what the reference allows, per sector: the data of
//!   the last write completed before the read was submitted, or of any
//!   write to that sector in flight at some point while the read was;
//!   anything at all in a sector a discard made undefined (dm-cache only
//!   marks discarded blocks, and promoting one copies nothing).
//! - When the threads have ended, the cache is idle (nothing in flight, no
//!   migration, no worker item); then every touched block is read back and
//!   judged the same way, [`Cache::check`] must pass, and after
//!   [`Cache::suspend`] every cache block the metadata records as clean
//!   holds the same bytes as its origin block, but in sectors a discard
//!   left undefined.
//!
//! A failed check panics with the scenario's name and every failure; loom
//! and shuttle report the panic with the schedule that led to it.

use std::collections::{BTreeMap, BTreeSet};

use dmsim_model::block_device::{MemDevice, SECTOR_SIZE};
use dmsim_model::cache::core::{
    BioId, BioRequest, Cache, CacheCompletion, CacheCounters, CacheDisk, CacheIoInfo, CacheIoKind,
    CacheOptions,
};
use dmsim_model::mutation::Mutations;
use dmsim_model::sync::{into_inner, lock, thread, wait, Arc, Condvar, Mutex, MutexGuard};
use dmsim_model::thin::pool::TargetError;

/// Cache block size of every harness cache, in sectors.
pub const BS: u64 = 64;

/// Cache blocks of every harness cache.
pub const CACHE_BLOCKS: u64 = 4;

/// Origin blocks of every harness cache.
pub const ORIGIN_BLOCKS: u64 = 8;

/// The origin block the scenarios race on (but read vs. demotion, whose
/// block is the one the policy demotes).
pub const X: u64 = 1;

/// What the cache device holds before anything is copied to it, so that a
/// cache block read before its copy reads as garbage.
const CACHE_GARBAGE: u8 = 0xc5;

/// Metadata device size in sectors.
const META_SECTORS: u64 = 2048;

/// One simulated second.
const SECOND: u64 = 1_000_000_000;

/// The cache type the harnesses run.
pub type HarnessCache = Cache<MemDevice, MemDevice, MemDevice>;

/// The table line of every harness cache: writeback, smq, a migration
/// threshold that never throttles.
pub fn table_line() -> String {
    format!("/dev/m /dev/c /dev/o {BS} 2 writeback metadata2 smq 2 migration_threshold 1000000")
}

/// One request of a submitter's program (or of a set-up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Req {
    /// A write of `nr` sectors at `sector`, stamped with a fresh write
    /// number.
    Write {
        /// First sector.
        sector: u64,
        /// Sectors.
        nr: u64,
    },
    /// A read, judged when it completes.
    Read {
        /// First sector.
        sector: u64,
        /// Sectors.
        nr: u64,
    },
    /// A discard.
    Discard {
        /// First sector.
        sector: u64,
        /// Sectors.
        nr: u64,
    },
    /// An empty flush (PREFLUSH).
    Flush,
}

impl Req {
    /// The sectors it touches, if any.
    fn range(&self) -> Option<(u64, u64)> {
        match *self {
            Req::Write { sector, nr } | Req::Read { sector, nr } | Req::Discard { sector, nr } => {
                Some((sector, nr))
            }
            Req::Flush => None,
        }
    }
}

/// Sectors `off..off + nr` of origin block `block`, written.
pub fn write(block: u64, off: u64, nr: u64) -> Req {
    Req::Write { sector: block * BS + off, nr }
}

/// Origin block `block`, read whole.
pub fn read(block: u64) -> Req {
    Req::Read { sector: block * BS, nr: BS }
}

/// Origin block `block`, discarded whole.
pub fn discard(block: u64) -> Req {
    Req::Discard { sector: block * BS, nr: BS }
}

/// What a scenario's set-up leaves in flight for the race.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Race {
    /// A promotion of [`X`] by copy, its copy to the cache device in
    /// flight.
    Promotion,
    /// [`X`] dirty in the cache, its writeback's copy to the origin in
    /// flight.
    Writeback,
    /// A demotion of a clean block, its mapping removed and committed, its
    /// last step (completion, releasing the block's cell) waiting for the
    /// worker.
    Demotion,
    /// [`X`] cached and clean (promoted by overwrite, then written back),
    /// nothing in flight.
    Clean,
}

/// A race to check.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Shown in every failure.
    pub name: &'static str,
    /// What the set-up leaves in flight.
    pub race: Race,
    /// One program per submitter thread; [`Req`]s naming block
    /// [`X`] are aimed at the demoted block in [`Race::Demotion`].
    pub submitters: Vec<Vec<Req>>,
}

impl Scenario {
    /// Threads one execution spawns besides the one that calls
    /// [`execute`] (which plays the completion context) with `background`.
    pub fn threads(&self, background: Background) -> usize {
        self.submitters.len() + usize::from(background == Background::Separate)
    }

    /// This scenario with its submitters' programs run one after the other
    /// by one submitter (a smaller loom model).
    pub fn one_submitter(&self) -> Scenario {
        Scenario { submitters: vec![self.submitters.concat()], ..self.clone() }
    }
}

/// How an idle harness thread waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// Yields to the checker and looks again (shuttle).
    Yield,
    /// Blocks until another thread changed something (loom).
    Block,
}

/// How one execution runs.
#[derive(Debug, Clone, Copy)]
pub struct Run {
    /// Deliberate bugs (the locking ones are what the harnesses catch).
    pub mutations: Mutations,
    /// Given how many data I/Os are in flight, which one completes next.
    /// Loom explores thread orders, not values, so its runs complete the
    /// oldest; shuttle's pick at random from its own seeded generator.
    pub pick: fn(usize) -> usize,
    /// How idle threads wait.
    pub idle: Idle,
    /// How the cache's own contexts are laid out on threads.
    pub background: Background,
}

/// Which threads run the cache's own contexts beside the submitters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Background {
    /// A worker thread and a completion context of their own (shuttle).
    Separate,
    /// One thread that runs a worker pass when the cache wants one, else
    /// completes a data I/O (loom's models: one thread fewer). Submissions
    /// still race both; what this drops is a completion chosen over a
    /// wanted worker pass.
    Combined,
}

impl Run {
    /// No mutations, oldest I/O first, idle threads yield.
    pub fn new() -> Self {
        Run {
            mutations: Mutations::default(),
            pick: |_| 0,
            idle: Idle::Yield,
            background: Background::Separate,
        }
    }
}

impl Default for Run {
    fn default() -> Self {
        Self::new()
    }
}

// ----------------------------------------------------------------------
// The reference

/// What a sector may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Val {
    /// Anything (a discard made it undefined).
    Undefined,
    /// The data of write number `n` (0: zeroes, the origin's first
    /// contents).
    Written(u64),
}

/// The bytes write `w` puts in `sector`: its number, the sector and a fill
/// derived from both, so that every sector of every write differs.
fn stamp(w: u64, sector: u64) -> [u8; SECTOR_SIZE as usize] {
    let mut s = [((w * 131 + sector * 7) % 251) as u8 | 1; SECTOR_SIZE as usize];
    s[..8].copy_from_slice(&w.to_le_bytes());
    s[8..16].copy_from_slice(&sector.to_le_bytes());
    s
}

/// Which write's data `bytes` are at `sector`: `Some(0)` for zeroes, `None`
/// for anything no write put there.
fn decode(bytes: &[u8], sector: u64) -> Option<u64> {
    if bytes.iter().all(|b| *b == 0) {
        return Some(0);
    }
    let w = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    (w > 0 && bytes == stamp(w, sector)).then_some(w)
}

#[derive(Debug)]
struct WriteRec {
    w: u64,
    sector: u64,
    nr: u64,
    /// Writes overlapping this one in flight with it: either may land last.
    concurrent: BTreeSet<u64>,
    /// A discard overlapping it was in flight with it: its sectors may end
    /// undefined.
    saw_discard: bool,
}

#[derive(Debug)]
struct ReadRec {
    sector: u64,
    /// What each sector may hold.
    allowed: Vec<BTreeSet<Val>>,
}

/// What every sector of the origin may hold, and the requests in flight.
#[derive(Debug)]
struct Reference {
    sectors: Vec<BTreeSet<Val>>,
    writes: BTreeMap<BioId, WriteRec>,
    reads: BTreeMap<BioId, ReadRec>,
    discards: BTreeMap<BioId, (u64, u64)>,
    /// Every write, by number: its range.
    ranges: BTreeMap<u64, (u64, u64)>,
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

impl Reference {
    fn new() -> Self {
        Reference {
            sectors: vec![BTreeSet::from([Val::Written(0)]); (ORIGIN_BLOCKS * BS) as usize],
            writes: BTreeMap::new(),
            reads: BTreeMap::new(),
            discards: BTreeMap::new(),
            ranges: BTreeMap::new(),
        }
    }

    /// A request registered under a provisional id before it was
    /// submitted now has the id the cache gave it.
    fn rekey(&mut self, from: BioId, to: BioId) {
        if let Some(w) = self.writes.remove(&from) {
            self.writes.insert(to, w);
        }
        if let Some(r) = self.reads.remove(&from) {
            self.reads.insert(to, r);
        }
        if let Some(d) = self.discards.remove(&from) {
            self.discards.insert(to, d);
        }
    }

    fn write_submitted(&mut self, id: BioId, w: u64, sector: u64, nr: u64) {
        let mut concurrent = BTreeSet::new();
        for other in self.writes.values_mut() {
            if overlaps((sector, nr), (other.sector, other.nr)) {
                other.concurrent.insert(w);
                concurrent.insert(other.w);
            }
        }
        let saw_discard = self.discards.values().any(|&d| overlaps(d, (sector, nr)));
        for r in self.reads.values_mut() {
            for s in sector..sector + nr {
                if let Some(a) = s.checked_sub(r.sector).and_then(|k| r.allowed.get_mut(k as usize)) {
                    a.insert(Val::Written(w));
                }
            }
        }
        self.ranges.insert(w, (sector, nr));
        self.writes.insert(id, WriteRec { w, sector, nr, concurrent, saw_discard });
    }

    fn write_completed(&mut self, id: BioId) {
        let Some(rec) = self.writes.remove(&id) else { return };
        for s in rec.sector..rec.sector + rec.nr {
            let mut now = BTreeSet::from([Val::Written(rec.w)]);
            for c in &rec.concurrent {
                let (cs, cn) = self.ranges[c];
                if (cs..cs + cn).contains(&s) {
                    now.insert(Val::Written(*c));
                }
            }
            if rec.saw_discard {
                now.insert(Val::Undefined);
            }
            self.sectors[s as usize] = now;
        }
    }

    fn discard_submitted(&mut self, id: BioId, sector: u64, nr: u64) {
        for w in self.writes.values_mut() {
            if overlaps((sector, nr), (w.sector, w.nr)) {
                w.saw_discard = true;
            }
        }
        for r in self.reads.values_mut() {
            for s in sector..sector + nr {
                if let Some(a) = s.checked_sub(r.sector).and_then(|k| r.allowed.get_mut(k as usize)) {
                    a.insert(Val::Undefined);
                }
            }
        }
        self.discards.insert(id, (sector, nr));
    }

    fn discard_completed(&mut self, id: BioId) {
        let Some((sector, nr)) = self.discards.remove(&id) else { return };
        for s in sector..sector + nr {
            self.sectors[s as usize] = BTreeSet::from([Val::Undefined]);
        }
    }

    fn read_submitted(&mut self, id: BioId, sector: u64, nr: u64) {
        let mut allowed: Vec<BTreeSet<Val>> =
            (sector..sector + nr).map(|s| self.sectors[s as usize].clone()).collect();
        for w in self.writes.values() {
            for s in w.sector..w.sector + w.nr {
                if let Some(a) = s.checked_sub(sector).and_then(|k| allowed.get_mut(k as usize)) {
                    a.insert(Val::Written(w.w));
                }
            }
        }
        for &(ds, dn) in self.discards.values() {
            for s in ds..ds + dn {
                if let Some(a) = s.checked_sub(sector).and_then(|k| allowed.get_mut(k as usize)) {
                    a.insert(Val::Undefined);
                }
            }
        }
        self.reads.insert(id, ReadRec { sector, allowed });
    }

    /// Judges a completed read; `Err` names the first sector that no
    /// schedule allows.
    fn read_completed(&mut self, id: BioId, data: &[u8]) -> Result<(), String> {
        let Some(rec) = self.reads.remove(&id) else { return Ok(()) };
        judge(rec.sector, &rec.allowed, data)
    }

    /// Whether `sector` may hold anything.
    fn undefined(&self, sector: u64) -> bool {
        self.sectors[sector as usize].contains(&Val::Undefined)
    }
}

/// Checks `data`, read at `first`, against what each sector may hold.
fn judge(first: u64, allowed: &[BTreeSet<Val>], data: &[u8]) -> Result<(), String> {
    if data.len() as u64 != allowed.len() as u64 * SECTOR_SIZE {
        return Err(format!("read at sector {first} returned {} bytes", data.len()));
    }
    for (k, a) in allowed.iter().enumerate() {
        if a.contains(&Val::Undefined) {
            continue;
        }
        let s = first + k as u64;
        let bytes = &data[k * SECTOR_SIZE as usize..(k + 1) * SECTOR_SIZE as usize];
        let got = decode(bytes, s);
        if !got.is_some_and(|w| a.contains(&Val::Written(w))) {
            let got = got.map_or("foreign data".to_string(), |w| format!("write {w}"));
            return Err(format!("sector {s} (origin block {}) holds {got}, allowed {a:?}", s / BS));
        }
    }
    Ok(())
}

// ----------------------------------------------------------------------
// The cache and the harness's book

/// What the harness keeps about the cache's requests: behind the harness's
/// own lock, which no cache lock is ever held across (the cache never calls
/// the harness), so the order is always this lock, then the cache's.
#[derive(Debug)]
struct Book {
    reference: Reference,
    next_write: u64,
    /// Requests completed, with how many times.
    completed: BTreeMap<BioId, usize>,
    /// Requests submitted.
    sent: BTreeSet<BioId>,
    /// Origin blocks any request touched.
    touched: BTreeSet<u64>,
    submitters_done: usize,
    /// Threads inside a cache entry point, outside this lock: the run is
    /// not over while one is.
    busy: usize,
    /// Provisional ids handed out so far (counting down from the top, where
    /// the cache's own never reach).
    provisional: u64,
    /// Completions of requests whose submission has not returned yet.
    early: Vec<CacheCompletion>,
    failures: Vec<String>,
}

impl Book {
    fn new() -> Self {
        Book {
            reference: Reference::new(),
            next_write: 0,
            completed: BTreeMap::new(),
            sent: BTreeSet::new(),
            touched: BTreeSet::new(),
            submitters_done: 0,
            busy: 0,
            provisional: 0,
            early: Vec::new(),
            failures: Vec::new(),
        }
    }

    fn fail(&mut self, what: String) {
        self.failures.push(what);
    }

    /// Submits `req` to `cache` single-threaded ([`Self::announce`], the
    /// submission, [`Self::submitted`]).
    fn submit(&mut self, cache: &HarnessCache, req: Req) -> Option<BioId> {
        let (bio, provisional) = self.announce(cache, req);
        let r = cache.submit(bio);
        self.submitted(cache, req, provisional, r)
    }

    /// Tells the reference of `req` before it is submitted, under a
    /// provisional id (so that the reference knows of it before any thread
    /// can see it complete), and returns the request to submit. What
    /// completed before is fed to the reference first.
    fn announce(&mut self, cache: &HarnessCache, req: Req) -> (BioRequest, BioId) {
        if let Some((sector, nr)) = req.range() {
            self.touched.extend(sector / BS..(sector + nr).div_ceil(BS));
        }
        self.drain(cache);
        self.provisional += 1;
        let provisional = BioId(u64::MAX - self.provisional);
        let bio = match req {
            Req::Write { sector, nr } => {
                self.next_write += 1;
                let w = self.next_write;
                self.reference.write_submitted(provisional, w, sector, nr);
                let data: Vec<u8> = (sector..sector + nr).flat_map(|s| stamp(w, s)).collect();
                BioRequest::write(sector, data)
            }
            Req::Read { sector, nr } => {
                self.reference.read_submitted(provisional, sector, nr);
                BioRequest::read(sector, nr)
            }
            Req::Discard { sector, nr } => {
                self.reference.discard_submitted(provisional, sector, nr);
                BioRequest::discard(sector, nr)
            }
            Req::Flush => BioRequest::flush(),
        };
        (bio, provisional)
    }

    /// The submission of `req`, announced as `provisional`, returned `r`:
    /// the reference learns its id, and any completion of it that came
    /// early is judged now.
    fn submitted(
        &mut self,
        cache: &HarnessCache,
        req: Req,
        provisional: BioId,
        r: Result<BioId, TargetError>,
    ) -> Option<BioId> {
        let id = match r {
            Ok(id) => id,
            Err(e) => {
                self.fail(format!("{req:?}: submit refused: {e}"));
                return None;
            }
        };
        self.sent.insert(id);
        self.reference.rekey(provisional, id);
        let early = std::mem::take(&mut self.early);
        self.judge(early);
        self.drain(cache);
        Some(id)
    }

    /// Feeds finished requests to the reference.
    fn drain(&mut self, cache: &HarnessCache) {
        let done = cache.take_completions();
        self.judge(done);
    }

    /// Judges completions; those of requests whose submission has not
    /// returned wait in `early`.
    fn judge(&mut self, done: Vec<CacheCompletion>) {
        for c in done {
            if !self.sent.contains(&c.id) {
                self.early.push(c);
                continue;
            }
            *self.completed.entry(c.id).or_default() += 1;
            if let Err(e) = c.result {
                self.fail(format!("request {:?} failed: {e}", c.id));
            }
            if self.reference.reads.contains_key(&c.id) {
                if let Err(e) = self.reference.read_completed(c.id, &c.data) {
                    self.fail(format!("read {:?}: {e}", c.id));
                }
            } else if self.reference.writes.contains_key(&c.id) {
                self.reference.write_completed(c.id);
            } else {
                self.reference.discard_completed(c.id);
            }
        }
    }

    /// Whether nothing more can happen.
    fn finished(&self, cache: &HarnessCache, submitters: usize) -> bool {
        self.submitters_done == submitters
            && self.busy == 0
            && self.early.is_empty()
            && cache.bios_in_flight() == 0
            && cache.in_flight_io().is_empty()
            && !cache.worker_wanted()
    }
}

/// A cache and its book, single-threaded: the set-up before a race and the
/// checks after it.
#[derive(Debug)]
struct World {
    cache: HarnessCache,
    book: Book,
}

impl World {
    fn new(mutations: Mutations) -> Self {
        let cache = MemDevice::from_bytes(vec![CACHE_GARBAGE; (CACHE_BLOCKS * BS * SECTOR_SIZE) as usize]);
        let origin = MemDevice::new(ORIGIN_BLOCKS * BS);
        let opts = CacheOptions { mutations, ..CacheOptions::default() };
        let cache = Cache::create(&table_line(), MemDevice::new(META_SECTORS), cache, origin, 0, opts)
            .expect("a fresh cache loads");
        World { cache, book: Book::new() }
    }

    fn fail(&mut self, what: String) {
        self.book.fail(what);
    }

    fn submit(&mut self, req: Req) -> Option<BioId> {
        self.book.submit(&self.cache, req)
    }

    fn drain(&mut self) {
        self.book.drain(&self.cache);
    }

    fn complete(&mut self, io: CacheIoInfo) {
        if let Err(e) = self.cache.complete_io(io.id) {
            self.fail(format!("complete_io {io:?}: {e}"));
        }
        self.drain();
    }

    /// Single-threaded: runs the worker and completes data I/O, oldest
    /// first but never one `hold` names, until `done` or nothing can run.
    fn drive(
        &mut self,
        done: &mut dyn FnMut(&mut World) -> bool,
        hold: &dyn Fn(&CacheIoInfo) -> bool,
    ) -> bool {
        for _ in 0..10_000 {
            self.drain();
            if done(self) {
                return true;
            }
            if self.cache.worker_wanted() {
                self.cache.run_worker();
            } else if let Some(io) = self.cache.in_flight_io().into_iter().find(|io| !hold(io)) {
                self.complete(io);
            } else {
                return done(self);
            }
        }
        false
    }

    /// Single-threaded: submits `req` and drives the cache until it
    /// completed, holding back the I/O `hold` names.
    fn do_io(&mut self, req: Req, hold: &dyn Fn(&CacheIoInfo) -> bool) {
        let Some(id) = self.submit(req) else { return };
        if !self.drive(&mut |w| w.book.completed.contains_key(&id), hold) {
            panic!("set-up: {req:?} never completed");
        }
    }

    /// Runs the worker and completes everything until idle.
    fn settle(&mut self) {
        if !self.drive(&mut |w| w.cache.is_idle() && !w.cache.worker_wanted(), &|_| false) {
            self.fail("the cache never settled".to_string());
        }
    }

    fn counters(&self) -> CacheCounters {
        self.cache.counters()
    }
}

/// Cache blocks the in-core dirty bits mark dirty.
fn dirty_blocks(world: &World) -> usize {
    (0..CACHE_BLOCKS as u32).filter(|&cb| world.cache.target().is_dirty(cb)).count()
}

/// Idle time, two seconds at a time from `now`, until the worker wrote
/// every dirty block back (ten steps at most); returns the time reached.
fn write_back_all(world: &mut World, mut now: u64) -> u64 {
    for _ in 0..10 {
        if dirty_blocks(world) == 0 {
            break;
        }
        now += 2 * SECOND;
        world.cache.set_time(now);
        world.settle();
    }
    now
}

/// A copy to `disk` of a migration.
fn copy_to(disk: CacheDisk) -> impl Fn(&CacheIoInfo) -> bool {
    move |io| io.kind == CacheIoKind::Copy && io.disk == disk
}

/// What a set-up reached: asserted, and shown by the tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reached {
    /// The cache's counters when the race starts.
    pub counters: CacheCounters,
    /// The origin block the race is about.
    pub block: u64,
    /// The copies in flight when the race starts.
    pub copies_in_flight: usize,
}

/// Sets `race` up single-threaded on a fresh cache; panics unless it got
/// there.
fn set_up(world: &mut World, race: Race) -> Reached {
    let name = format!("{race:?} set-up");
    let block = match race {
        Race::Promotion => {
            // X holds data (a partial write goes to the origin: no
            // promotion by overwrite), then reads of X and seconds of idle
            // time make it hot until the migration worker promotes it by
            // copy; the copy to the cache device is held back.
            let hold = copy_to(CacheDisk::Cache);
            world.do_io(write(X, 0, BS / 2), &hold);
            let mut now = 0;
            for _ in 0..20 {
                if world.cache.in_flight_io().iter().any(&hold) {
                    break;
                }
                world.do_io(read(X), &hold);
                now += SECOND;
                world.cache.set_time(now);
                world.drive(&mut |w| w.cache.in_flight_io().iter().any(&hold), &hold);
            }
            let k = world.counters();
            assert!(
                k.started == [1, 0, 0] && k.succeeded == [0, 0, 0] && k.overwrites == 0,
                "{name}: one promotion by copy under way, got {k:?}"
            );
            X
        }
        Race::Writeback => {
            // A whole-block write promotes X by overwrite (dirty); a second
            // and more of idle time later the migration worker writes it
            // back; its copy to the origin is held back.
            let hold = copy_to(CacheDisk::Origin);
            world.do_io(write(X, 0, BS), &hold);
            let k = world.counters();
            assert!(k.overwrites == 1 && k.succeeded[0] == 1, "{name}: X promoted by overwrite, got {k:?}");
            let mut now = 0;
            for _ in 0..5 {
                now += 2 * SECOND;
                world.cache.set_time(now);
                if world.drive(&mut |w| w.cache.in_flight_io().iter().any(&hold), &hold) {
                    break;
                }
            }
            let k = world.counters();
            assert!(k.started[2] == 1 && k.succeeded[2] == 0, "{name}: one writeback under way, got {k:?}");
            X
        }
        Race::Clean => {
            // A whole-block write promotes X by overwrite (dirty); idle
            // seconds write it back.
            world.do_io(write(X, 0, BS), &|_| false);
            write_back_all(world, 0);
            let k = world.counters();
            assert!(
                dirty_blocks(world) == 0 && k.succeeded == [1, 0, 1] && k.overwrites == 1,
                "{name}: X promoted and written back, clean, got {k:?}"
            );
            X
        }
        Race::Demotion => {
            // Whole-block writes promote blocks 0..CACHE_BLOCKS by overwrite
            // (dirty), idle seconds write them all back (clean), then a
            // whole-block write to a new block finds the cache full and
            // queues a demotion; the set-up stops when the demotion has
            // removed its mapping and committed, its last step waiting.
            for b in 0..CACHE_BLOCKS {
                world.do_io(write(b, 0, BS), &|_| false);
            }
            let mut now = write_back_all(world, 0);
            assert_eq!(dirty_blocks(world), 0, "{name}: the cache written back");
            let before: Vec<Option<u64>> = (0..CACHE_BLOCKS as u32)
                .map(|cb| world.cache.metadata().lookup(cb).ok().flatten().map(|(ob, _)| ob))
                .collect();
            // Reads of a block the cache does not hold, a tenth of a second
            // apart, until the policy wants it in the full cache and queues
            // a demotion. A demotion's last step waits in the
            // worker's queue: the worker stops once one has started, and
            // the data I/O in flight then is completed.
            let started = |w: &World| w.counters().started[1] > w.counters().succeeded[1];
            'rounds: for _ in 0..400 {
                {
                    let id = world.submit(read(CACHE_BLOCKS)).expect("submitted");
                    for _ in 0..1000 {
                        world.drain();
                        if started(world) {
                            while let Some(io) = world.cache.in_flight_io().first().copied() {
                                world.complete(io);
                            }
                            break 'rounds;
                        }
                        if world.book.completed.contains_key(&id) {
                            break;
                        }
                        if world.cache.worker_wanted() {
                            world.cache.run_worker();
                        } else if let Some(io) = world.cache.in_flight_io().first().copied() {
                            world.complete(io);
                        }
                    }
                }
                now += SECOND / 10;
                world.cache.set_time(now);
                if world.cache.worker_wanted() {
                    world.cache.run_worker();
                }
                if started(world) {
                    while let Some(io) = world.cache.in_flight_io().first().copied() {
                        world.complete(io);
                    }
                    break;
                }
            }
            let k = world.counters();
            assert!(k.started[1] == 1 && k.succeeded[1] == 0, "{name}: one demotion under way, got {k:?}");
            let after: Vec<Option<u64>> = (0..CACHE_BLOCKS as u32)
                .map(|cb| world.cache.metadata().lookup(cb).ok().flatten().map(|(ob, _)| ob))
                .collect();
            let gone: Vec<u64> = before
                .iter()
                .zip(&after)
                .filter(|(b, a)| b.is_some() && a.is_none())
                .map(|(b, _)| b.unwrap())
                .collect();
            assert_eq!(gone.len(), 1, "{name}: the demotion removed one mapping: {before:?} -> {after:?}");
            gone[0]
        }
    };
    let copies_in_flight =
        world.cache.in_flight_io().iter().filter(|io| io.kind == CacheIoKind::Copy).count();
    if matches!(race, Race::Promotion | Race::Writeback) {
        assert_eq!(copies_in_flight, 1, "{name}: the copy in flight");
    }
    if let Err(e) = world.cache.check() {
        panic!("{name}: the model's self-check: {e}");
    }
    assert!(world.book.failures.is_empty(), "{name}: {}", world.book.failures.join("; "));
    Reached { counters: world.counters(), block, copies_in_flight }
}

/// Runs `scenario`'s set-up alone and reports what it reached (the tests
/// show it; every execution asserts it).
pub fn reach(scenario: &Scenario) -> Reached {
    let mut world = World::new(Mutations::default());
    set_up(&mut world, scenario.race)
}

// ----------------------------------------------------------------------
// The threads

struct Shared {
    /// The cache: its entry points take `&self` and reach its state through
    /// its own locks.
    cache: HarnessCache,
    book: Mutex<Book>,
    changed: Condvar,
    idle: Idle,
    submitters: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Book> {
        lock(&self.book)
    }

    /// Nothing to do: yields, or waits for a change (consuming `guard`).
    fn idle<'a>(&'a self, guard: MutexGuard<'a, Book>) {
        match self.idle {
            Idle::Yield => {
                drop(guard);
                thread::yield_now();
            }
            Idle::Block => {
                drop(wait(&self.changed, guard));
            }
        }
    }

    fn bump(&self) {
        if self.idle == Idle::Block {
            self.changed.notify_all();
        }
    }

    /// Runs `step` on the cache outside the book's lock (the thread counts
    /// as busy meanwhile), then feeds what completed to the reference and
    /// wakes the others. `book` is the guard under which the step was
    /// chosen.
    fn outside<'a>(
        &'a self,
        mut book: MutexGuard<'a, Book>,
        step: impl FnOnce(&HarnessCache) -> Option<String>,
    ) {
        book.busy += 1;
        drop(book);
        let failure = step(&self.cache);
        let mut book = self.lock();
        book.busy -= 1;
        if let Some(f) = failure {
            book.fail(f);
        }
        book.drain(&self.cache);
        self.bump();
    }
}

fn submitter_thread(shared: &Shared, program: &[Req]) {
    for &req in program {
        // The submission runs outside the book's lock, so that two
        // submitters' map paths interleave with each other too.
        let (bio, provisional) = {
            let mut book = shared.lock();
            book.busy += 1;
            book.announce(&shared.cache, req)
        };
        let r = shared.cache.submit(bio);
        let id = {
            let mut book = shared.lock();
            book.busy -= 1;
            let id = book.submitted(&shared.cache, req, provisional, r);
            shared.bump();
            id
        };
        let Some(id) = id else { continue };
        loop {
            let book = shared.lock();
            if book.completed.contains_key(&id) {
                break;
            }
            shared.idle(book);
        }
    }
    shared.lock().submitters_done += 1;
    shared.bump();
}

fn worker_thread(shared: &Shared) {
    loop {
        let book = shared.lock();
        if shared.cache.worker_wanted() {
            shared.outside(book, |c| {
                c.run_worker();
                None
            });
        } else if book.finished(&shared.cache, shared.submitters) {
            return;
        } else {
            shared.idle(book);
        }
    }
}

fn completion_thread(shared: &Shared, pick: fn(usize) -> usize, with_worker: bool) {
    loop {
        let book = shared.lock();
        let ios = shared.cache.in_flight_io();
        if with_worker && shared.cache.worker_wanted() {
            shared.outside(book, |c| {
                c.run_worker();
                None
            });
        } else if !ios.is_empty() {
            // Only this thread completes data I/O: `io` is still in flight
            // when the step runs.
            let io = ios[pick(ios.len()) % ios.len()];
            shared.outside(book, |c| c.complete_io(io.id).err().map(|e| format!("complete_io {io:?}: {e}")));
        } else if book.finished(&shared.cache, shared.submitters) {
            // The worker may be waiting for this very state.
            shared.bump();
            return;
        } else {
            shared.idle(book);
        }
    }
}

/// One execution of `scenario`: the body of a `loom::model` or a shuttle
/// check. The calling thread sets the cache up, plays the completion
/// context (and the worker, [`Background::Combined`]), then runs the
/// checks. Panics with every failed check.
pub fn execute(scenario: &Scenario, run: Run) {
    let mut world = World::new(run.mutations);
    let reached = set_up(&mut world, scenario.race);
    let x = reached.block;
    let aim = |req: Req| match req {
        Req::Write { sector, nr } if sector / BS == X => Req::Write { sector: x * BS + sector % BS, nr },
        Req::Read { sector, nr } if sector / BS == X => Req::Read { sector: x * BS + sector % BS, nr },
        Req::Discard { sector, nr } if sector / BS == X => Req::Discard { sector: x * BS + sector % BS, nr },
        other => other,
    };
    let World { cache, book } = world;
    let shared = Arc::new(Shared {
        cache,
        book: Mutex::new(book),
        changed: Condvar::new(),
        idle: run.idle,
        submitters: scenario.submitters.len(),
    });
    let mut threads = Vec::new();
    for program in &scenario.submitters {
        let program: Vec<Req> = program.iter().map(|r| aim(*r)).collect();
        let s = shared.clone();
        threads.push(thread::spawn(move || submitter_thread(&s, &program)));
    }
    let combined = run.background == Background::Combined;
    if !combined {
        let s = shared.clone();
        threads.push(thread::spawn(move || worker_thread(&s)));
    }
    completion_thread(&shared, run.pick, combined);
    for t in threads {
        t.join().expect("a harness thread panicked");
    }
    // The checks run on the world taken out of the checker's lock: a
    // failure panics with no checker object alive.
    let Ok(shared) = Arc::try_unwrap(shared) else {
        panic!("{}: a harness thread outlived the run", scenario.name)
    };
    let Shared { cache, book, changed, .. } = shared;
    // Under loom the condvar is a checker object (and has a Drop); with
    // std types it is plain data.
    #[allow(clippy::drop_non_drop)]
    drop(changed);
    let mut world = World { cache, book: into_inner(book) };
    finish(scenario, &mut world);
}

/// The checks once the threads have ended.
fn finish(scenario: &Scenario, w: &mut World) {
    if !w.cache.is_idle() || w.cache.worker_wanted() {
        let what = format!(
            "not idle at the end: {} requests, {} data I/Os in flight, worker wanted: {}",
            w.cache.bios_in_flight(),
            w.cache.in_flight_io().len(),
            w.cache.worker_wanted()
        );
        w.fail(what);
        w.settle();
    }
    let unfinished: Vec<BioId> =
        w.book.sent.iter().filter(|id| w.book.completed.get(id) != Some(&1)).copied().collect();
    if !unfinished.is_empty() {
        w.fail(format!("requests not completed exactly once: {unfinished:?}"));
    }
    let touched: Vec<u64> = w.book.touched.iter().copied().collect();
    for b in touched {
        let Some(id) = w.submit(read(b)) else { continue };
        w.settle();
        if w.book.completed.get(&id) != Some(&1) {
            w.fail(format!("the read-back of block {b} did not complete"));
        }
    }
    if let Err(e) = w.cache.check() {
        w.fail(format!("Cache::check: {e}"));
    }
    match w.cache.suspend() {
        Err(e) => w.fail(format!("suspend: {e}")),
        Ok(()) => {
            for cb in 0..CACHE_BLOCKS as u32 {
                let Ok(Some((ob, dirty))) = w.cache.metadata().lookup(cb) else { continue };
                if dirty {
                    continue;
                }
                let len = (BS * SECTOR_SIZE) as usize;
                let cs = (u64::from(cb) * BS * SECTOR_SIZE) as usize;
                let os = (ob * BS * SECTOR_SIZE) as usize;
                let cached = w.cache.cache_device().as_bytes()[cs..cs + len].to_vec();
                let origin = w.cache.origin_device().as_bytes()[os..os + len].to_vec();
                let differs = (0..BS).find(|&k| {
                    let r = (k * SECTOR_SIZE) as usize..((k + 1) * SECTOR_SIZE) as usize;
                    !w.book.reference.undefined(ob * BS + k) && cached[r.clone()] != origin[r]
                });
                if let Some(k) = differs {
                    w.fail(format!(
                        "cache block {cb} is recorded clean for origin block {ob} but the devices differ at sector {}",
                        ob * BS + k
                    ));
                }
            }
        }
    }
    if !w.book.failures.is_empty() {
        panic!("{} ({}): {}", scenario.name, dmsim_model::sync::SUBSTRATE, w.book.failures.join("; "));
    }
}

/// The scenarios.
pub mod scenarios {
    use super::*;

    /// A write to part of [`X`] while X's promotion by copy has its copy in
    /// flight; a second submitter reads X.
    pub fn write_vs_promotion() -> Scenario {
        Scenario {
            name: "write vs. promotion",
            race: Race::Promotion,
            submitters: vec![vec![write(X, 8, 8)], vec![read(X)]],
        }
    }

    /// A write to part of [`X`] while X's writeback has its copy to the
    /// origin in flight.
    pub fn writeback_vs_write() -> Scenario {
        Scenario {
            name: "writeback vs. re-dirtying write",
            race: Race::Writeback,
            submitters: vec![vec![write(X, 8, 8)], vec![read(X)]],
        }
    }

    /// An empty flush and a read of [`X`] while X's promotion has its copy
    /// in flight.
    pub fn flush_during_migration() -> Scenario {
        Scenario {
            name: "flush during a migration",
            race: Race::Promotion,
            submitters: vec![vec![Req::Flush], vec![read(X)]],
        }
    }

    /// A discard of [`X`], then a write to part of it, while X's promotion
    /// has its copy in flight.
    pub fn discard_during_migration() -> Scenario {
        Scenario {
            name: "discard during a migration",
            race: Race::Promotion,
            submitters: vec![vec![discard(X), write(X, 8, 8)]],
        }
    }

    /// A read of the block a demotion is removing from the cache, while
    /// the demotion (mapping removed and committed) waits for its last
    /// step. Dm-cache demotes only clean blocks, so there is no copy: the
    /// race is between the read's map path and the worker step that ends
    /// the demotion and releases the block's cell.
    pub fn read_vs_demotion() -> Scenario {
        Scenario { name: "read vs. demotion", race: Race::Demotion, submitters: vec![vec![read(X)]] }
    }

    /// Two writes to different sectors of [`X`], cached and clean: both
    /// map at once under shared locks and both dirty the block (the dirty
    /// bit's test and set must be one step).
    pub fn two_writes_dirty_a_clean_block() -> Scenario {
        Scenario {
            name: "two writes dirty a clean block",
            race: Race::Clean,
            submitters: vec![vec![write(X, 0, 8)], vec![write(X, 8, 8)]],
        }
    }

    /// Every scenario.
    pub fn all() -> Vec<Scenario> {
        vec![
            write_vs_promotion(),
            writeback_vs_write(),
            flush_during_migration(),
            discard_during_migration(),
            read_vs_demotion(),
            two_writes_dirty_a_clean_block(),
        ]
    }
}

#[cfg(all(test, not(any(loom, feature = "shuttle"))))]
mod tests {
    use super::*;

    #[test]
    fn every_set_up_reaches_its_race() {
        for s in scenarios::all() {
            let r = reach(&s);
            println!("{}: {r:?}", s.name);
        }
    }

    #[test]
    fn every_scenario_runs_on_std_threads() {
        for s in scenarios::all() {
            execute(&s, Run::new());
        }
    }
}
