//! Exhaustive enumeration of small races in the thin pool's concurrent core.
//!
//! The pool exposes its concurrency as single steps ([`Pool::submit`] runs
//! the map path of one request, [`Pool::run_worker`] one worker pass,
//! [`Pool::complete_io`] one data I/O completion). Each scenario below sets a
//! pool up, then lets a few submitters race; the explorer enumerates *every*
//! order of the steps the single-step API allows and checks each execution
//! against the oracle ([`dmsim_sim::oracle`]) and the pool's own invariants.
//!
//! # The state space
//!
//! At each state the enabled steps are, in this order:
//!
//! - **submit** the next request of each submitter that still has one. A
//!   submitter submits in its program order; a submitter marked `wait`
//!   submits its next request only once its previous one has completed.
//! - **run the worker**, only when it has been woken ([`Pool::worker_wanted`]).
//!   The kernel's waker also runs it once a second without a reason, but
//!   every path that queues work for the worker (deferred bios and cells,
//!   prepared mappings and discards, flushes waiting for a commit) also wakes
//!   it, and simulated time never advances here (no periodic commit falls
//!   due), so such a pass would find nothing to do: it is left out. This
//!   keeps every execution finite (a pass clears the flag, and only new work
//!   sets it again). Should an execution end with requests still
//!   outstanding and the worker not woken (a lost wake-up: a liveness bug
//!   the waker would paper over after a second), the waker's pass is taken
//!   once, as a forced step, and counted; if that does not make progress
//!   either, the execution fails as stalled. No scenario needs one today.
//! - **complete** any one data I/O in flight, not only the oldest: this is
//!   where the reordering comes from.
//!
//! An execution ends when nothing is enabled. The pool is not `Clone`, so
//! the search is stateless: each execution replays a prefix of choices on a
//! fresh pool (everything is deterministic — the replay checks that it sees
//! the same number of choices at every step) and then takes the first choice
//! at every new state; backtracking bumps the deepest choice that has an
//! untried sibling. Every leaf of the choice tree is one execution; no
//! partial-order reduction is applied, so executions that differ only in the
//! order of independent steps are all counted (and all checked).
//!
//! Bounds: none of the scenarios needs one; the search is complete for each
//! of them (the largest, three submitters around a break-sharing copy, has
//! 4800 executions; all of them together run in about ten seconds in the
//! test profile). As a guard against a livelock in the pool, an execution of
//! more than [`MAX_DEPTH`] steps fails, and a scenario that grows beyond
//! [`MAX_EXECUTIONS`] executions fails instead of running for ever. Each
//! scenario asserts a lower bound on its number of executions (about half of
//! today's count), so that a change that collapses the search is noticed
//! without pinning the pool's exact step structure.
//!
//! # What is checked in each execution
//!
//! - every request completes exactly once, with success;
//! - every read (during the race and in the read-backs) is accepted by the
//!   oracle, which sees every submission and completion as it happens;
//! - a FUA write's blocks are mapped in the *committed* metadata when it
//!   completes;
//! - at the end, no bio and no data I/O is left in flight;
//! - after a commit the metadata passes [`check_thin_metadata`] (which
//!   compares every data block's reference count with the mapping trees);
//!   independently, each data block's reference count equals the number of
//!   mappings of the active devices pointing at it (found with
//!   `find_block`), and is 0 for a block nobody maps. One refinement: while
//!   an origin and its snapshot still share a mapping *leaf* (neither has
//!   changed its mappings since the snapshot), the leaf's entries are
//!   counted once, as dm-thin does; then a block mapped by both devices has
//!   a count between 1 and its number of mappings, and the counts sum to the
//!   checker's number of distinct leaf entries. In the scenarios as written
//!   every leaf is unshared by the end, so the counts are checked exactly;
//!   the refinement matters for the detector (where the mutated pool never
//!   unshares the leaf);
//! - every device reads back as the oracle allows;
//! - a fresh write to every block the scenario touched, on every device,
//!   completes (a cell left in the bio prison would hold it for ever), and
//!   the devices read back as the oracle allows once more.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Instant;

use dmsim_model::block_device::MemDevice;
use dmsim_model::mutation::Mutations;
use dmsim_model::thin::check::{check_thin_metadata, CheckOptions};
use dmsim_model::thin::metadata::ThinMetadata;
use dmsim_model::thin::pool::{BioId, BioRequest, IoInfo, Pool, PoolOptions};
use dmsim_model::thin::table::{PoolFeatures, PoolTable};
use dmsim_sim::oracle::{IoTicket, Oracle, OracleConfig, ReadError};
use dmsim_traces::stamp;

/// Data block size in sectors.
const BLOCK: u64 = 128;
/// Data blocks in the pool: room for every scenario plus the final fresh
/// writes, so no scenario runs out of space.
const DATA_BLOCKS: u64 = 16;
/// Blocks of each thin device.
const THIN_BLOCKS: u64 = 4;
const THIN_SECTORS: u64 = THIN_BLOCKS * BLOCK;
/// Metadata device size in sectors (512 KiB, 128 metadata blocks: plenty
/// for a handful of mappings, and cheap to copy for the checker).
const META_SECTORS: u64 = 1024;
/// What the data device holds before anything is written, so that a missing
/// zeroing or copy shows as foreign data.
const GARBAGE: u8 = 0xa7;
/// The run id in every stamp.
const RUN: u64 = 0x7e57_e8a5;
/// Longest execution, in steps, before it counts as a livelock.
const MAX_DEPTH: usize = 200;
/// Most executions of one scenario before the search counts as exploded.
const MAX_EXECUTIONS: usize = 100_000;

type TestPool = Pool<MemDevice, MemDevice>;

// ---- scenarios ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Write { fua: bool },
    Read,
    Discard,
}

/// One request of a submitter.
#[derive(Debug, Clone, Copy)]
struct Req {
    dev: u32,
    op: Op,
    sector: u64,
    nr_sectors: u64,
}

impl fmt::Display for Req {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.op {
            Op::Write { fua: false } => "write",
            Op::Write { fua: true } => "write+fua",
            Op::Read => "read",
            Op::Discard => "discard",
        };
        write!(f, "{op} dev{} {}+{}", self.dev, self.sector, self.nr_sectors)
    }
}

fn write(dev: u32, sector: u64, nr_sectors: u64) -> Req {
    Req { dev, op: Op::Write { fua: false }, sector, nr_sectors }
}

fn fua_write(dev: u32, sector: u64, nr_sectors: u64) -> Req {
    Req { dev, op: Op::Write { fua: true }, sector, nr_sectors }
}

fn read(dev: u32, sector: u64, nr_sectors: u64) -> Req {
    Req { dev, op: Op::Read, sector, nr_sectors }
}

fn discard(dev: u32, sector: u64, nr_sectors: u64) -> Req {
    Req { dev, op: Op::Discard, sector, nr_sectors }
}

/// A set-up step, run to completion before the race.
#[derive(Debug, Clone, Copy)]
enum Setup {
    /// `create_thin dev` and activate it.
    Thin(u32),
    /// `create_snap dev origin` and activate it.
    Snap(u32, u32),
    /// A request, settled.
    Io(Req),
}

#[derive(Debug, Clone)]
struct Submitter {
    name: &'static str,
    reqs: Vec<Req>,
    /// Each request waits for the previous one's completion.
    wait: bool,
}

fn sub(name: &'static str, reqs: Vec<Req>) -> Submitter {
    Submitter { name, reqs, wait: true }
}

#[derive(Debug, Clone)]
struct Scenario {
    name: String,
    features: PoolFeatures,
    mutations: Mutations,
    setup: Vec<Setup>,
    submitters: Vec<Submitter>,
    /// Virtual blocks the scenario touches (checked with fresh writes).
    blocks: Vec<u64>,
}

impl Scenario {
    fn new(name: impl Into<String>, setup: Vec<Setup>, submitters: Vec<Submitter>, blocks: Vec<u64>) -> Self {
        Scenario {
            name: name.into(),
            features: PoolFeatures::default(),
            mutations: Mutations::default(),
            setup,
            submitters,
            blocks,
        }
    }

    fn with_features(mut self, features: PoolFeatures) -> Self {
        self.features = features;
        self
    }

    fn with_mutations(mut self, mutations: Mutations) -> Self {
        self.mutations = mutations;
        self
    }
}

// ---- one execution ----

/// Where in an execution a check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Race,
    End,
    ReadBack,
    FreshWrites,
}

#[derive(Debug, Clone)]
struct Failure {
    stage: Stage,
    /// The oracle rejected a read.
    oracle: bool,
    message: String,
}

fn fail<T>(stage: Stage, message: impl Into<String>) -> Result<T, Failure> {
    Err(Failure { stage, oracle: false, message: message.into() })
}

/// A step the explorer can choose.
#[derive(Debug, Clone, Copy)]
enum Choice {
    Submit(usize),
    Worker,
    Complete(IoInfo),
}

/// A request submitted and not yet completed.
#[derive(Debug)]
struct Outstanding {
    req: Req,
    ticket: IoTicket,
    /// The submitter (None: set-up or final checks).
    submitter: Option<usize>,
    label: String,
}

struct Run<'a> {
    sc: &'a Scenario,
    pool: TestPool,
    oracle: Oracle,
    next_write: u64,
    /// Per submitter: next request to submit, requests outstanding.
    next: Vec<usize>,
    pending: Vec<usize>,
    outstanding: BTreeMap<BioId, Outstanding>,
    completed: BTreeSet<BioId>,
    stage: Stage,
    /// The steps taken, for failure reports.
    log: Vec<String>,
    /// Forced waker passes (lost wake-ups).
    waker_passes: usize,
}

fn table(features: PoolFeatures) -> PoolTable {
    PoolTable {
        metadata_dev: "/dev/meta".into(),
        data_dev: "/dev/data".into(),
        data_block_size: BLOCK as u32,
        low_water_mark: 0,
        features,
    }
}

impl<'a> Run<'a> {
    fn new(sc: &'a Scenario) -> Self {
        let mut data = MemDevice::new(DATA_BLOCKS * BLOCK);
        data.as_bytes_mut().fill(GARBAGE);
        let options = PoolOptions { mutations: sc.mutations, ..PoolOptions::default() };
        let pool = Pool::create(
            table(sc.features),
            DATA_BLOCKS * BLOCK,
            MemDevice::new(META_SECTORS),
            data,
            options,
        )
        .expect("pool loads");
        let mut run = Run {
            sc,
            pool,
            oracle: Oracle::new(OracleConfig::new(RUN, BLOCK)),
            next_write: 1,
            next: vec![0; sc.submitters.len()],
            pending: vec![0; sc.submitters.len()],
            outstanding: BTreeMap::new(),
            completed: BTreeSet::new(),
            stage: Stage::Race,
            log: Vec::new(),
            waker_passes: 0,
        };
        for step in &sc.setup {
            match *step {
                Setup::Thin(dev) => {
                    run.pool.message(&format!("create_thin {dev}")).expect("create_thin");
                    run.oracle.create_thin(dev, THIN_SECTORS).expect("oracle create_thin");
                    run.pool.activate_thin(u64::from(dev), THIN_SECTORS).expect("activate");
                }
                Setup::Snap(dev, origin) => {
                    run.pool.message(&format!("create_snap {dev} {origin}")).expect("create_snap");
                    run.oracle.create_snap(dev, origin).expect("oracle create_snap");
                    run.pool.activate_thin(u64::from(dev), THIN_SECTORS).expect("activate");
                }
                Setup::Io(req) => {
                    let r = run.submit(req, None).and_then(|_| run.settle());
                    if let Err(f) = r {
                        panic!("{}: set-up {req} failed: {}", sc.name, f.message);
                    }
                }
            }
        }
        assert!(run.outstanding.is_empty(), "{}: set-up left requests outstanding", sc.name);
        run.log.clear();
        run
    }

    fn fail<T>(&self, message: impl Into<String>) -> Result<T, Failure> {
        fail(self.stage, message)
    }

    /// Submits `req` to the oracle and then to the pool.
    fn submit(&mut self, req: Req, submitter: Option<usize>) -> Result<BioId, Failure> {
        let (ticket, request, label) = match req.op {
            Op::Write { fua } => {
                let w = self.next_write;
                self.next_write += 1;
                let mut data = vec![0; (req.nr_sectors * 512) as usize];
                stamp::fill(&mut data, RUN, w, req.dev, req.sector);
                let ticket = self.oracle.write_submitted(req.dev, req.sector, req.nr_sectors, w, fua);
                let mut request = BioRequest::write(req.sector, data);
                if fua {
                    request = request.with_fua();
                }
                (ticket, request, format!("{req} (w{w})"))
            }
            Op::Read => (
                self.oracle.read_submitted(req.dev, req.sector, req.nr_sectors),
                BioRequest::read(req.sector, req.nr_sectors),
                req.to_string(),
            ),
            Op::Discard => (
                self.oracle.discard_submitted(req.dev, req.sector, req.nr_sectors),
                BioRequest::discard(req.sector, req.nr_sectors),
                req.to_string(),
            ),
        };
        let ticket = ticket.unwrap_or_else(|e| panic!("oracle refused {label}: {e}"));
        let id = match self.pool.submit(u64::from(req.dev), request) {
            Ok(id) => id,
            Err(e) => return self.fail(format!("submit {label} refused: {e}")),
        };
        if self.outstanding.contains_key(&id) || self.completed.contains(&id) {
            return self.fail(format!("bio id {id:?} reused"));
        }
        self.outstanding.insert(id, Outstanding { req, ticket, submitter, label });
        self.harvest()?;
        Ok(id)
    }

    /// Feeds the pool's completions to the oracle and checks them.
    fn harvest(&mut self) -> Result<(), Failure> {
        for c in self.pool.take_completions() {
            let Some(o) = self.outstanding.remove(&c.id) else {
                return if self.completed.contains(&c.id) {
                    self.fail(format!("request {:?} completed twice", c.id))
                } else {
                    self.fail(format!("completion of unknown request {:?}", c.id))
                };
            };
            self.completed.insert(c.id);
            if let Some(s) = o.submitter {
                self.pending[s] -= 1;
            }
            self.log.push(format!("    -> {} completes: {:?}", o.label, c.result));
            if c.thin != u64::from(o.req.dev) {
                return self.fail(format!("{} completed on thin {}", o.label, c.thin));
            }
            if let Err(e) = c.result {
                return self.fail(format!("{} failed: {e:?}", o.label));
            }
            match o.req.op {
                Op::Write { fua } => {
                    self.oracle.write_completed(o.ticket, true).expect("oracle write_completed");
                    if fua {
                        self.check_committed_mapping(&o)?;
                    }
                }
                Op::Discard => {
                    self.oracle.discard_completed(o.ticket, true).expect("oracle discard_completed")
                }
                Op::Read => match self.oracle.read_completed(o.ticket, true, &c.data) {
                    Ok(()) => {}
                    Err(ReadError::Violation(v)) => {
                        return Err(Failure {
                            stage: self.stage,
                            oracle: true,
                            message: format!("oracle rejects {}: {v}", o.label),
                        })
                    }
                    Err(ReadError::Usage(e)) => panic!("oracle misused: {e}"),
                },
            }
        }
        Ok(())
    }

    /// A completed FUA write: its blocks must be mapped in the committed
    /// metadata (nothing in these scenarios unmaps them concurrently).
    fn check_committed_mapping(&self, o: &Outstanding) -> Result<(), Failure> {
        let image = self.pool.with_metadata(|md| md.transaction_manager().block_manager().device().clone());
        let dev = u64::from(o.req.dev);
        let r = (|| {
            let mut md = ThinMetadata::open(image, BLOCK as u32, false)?;
            md.open_thin(dev)?;
            let first = o.req.sector / BLOCK;
            let last = (o.req.sector + o.req.nr_sectors - 1) / BLOCK;
            (first..=last)
                .map(|b| md.find_block(dev, b).map(|f| (b, f.is_some())))
                .collect::<Result<Vec<_>, _>>()
        })();
        match r {
            Ok(found) => match found.iter().find(|(_, mapped)| !mapped) {
                Some((b, _)) => self.fail(format!(
                    "{} completed, but block {b} is not mapped in the committed metadata",
                    o.label
                )),
                None => Ok(()),
            },
            Err(e) => self.fail(format!("committed metadata unreadable after {}: {e}", o.label)),
        }
    }

    fn enabled(&self) -> Vec<Choice> {
        let mut choices = Vec::new();
        for (k, s) in self.sc.submitters.iter().enumerate() {
            if self.next[k] < s.reqs.len() && (!s.wait || self.pending[k] == 0) {
                choices.push(Choice::Submit(k));
            }
        }
        if self.pool.worker_wanted() {
            choices.push(Choice::Worker);
        }
        choices.extend(self.pool.in_flight_io().into_iter().map(Choice::Complete));
        choices
    }

    fn describe(&self, c: Choice) -> String {
        match c {
            Choice::Submit(k) => {
                let s = &self.sc.submitters[k];
                format!("{} submits {}", s.name, s.reqs[self.next[k]])
            }
            Choice::Worker => "worker pass".to_string(),
            Choice::Complete(io) => format!(
                "complete data io#{} ({:?} {}+{}{})",
                io.id.0,
                io.kind,
                io.sector,
                io.nr_sectors,
                if io.fua { " fua" } else { "" }
            ),
        }
    }

    fn step(&mut self, c: Choice) -> Result<(), Failure> {
        self.log.push(self.describe(c));
        match c {
            Choice::Submit(k) => {
                let req = self.sc.submitters[k].reqs[self.next[k]];
                self.next[k] += 1;
                self.pending[k] += 1;
                self.submit(req, Some(k))?;
            }
            Choice::Worker => {
                self.pool.run_worker();
                self.harvest()?;
            }
            Choice::Complete(io) => {
                if let Err(e) = self.pool.complete_io(io.id) {
                    return self.fail(format!("complete_io({}) refused: {e}", io.id.0));
                }
                self.harvest()?;
            }
        }
        Ok(())
    }

    /// Whether requests remain (submitted or not).
    fn unfinished(&self) -> bool {
        !self.outstanding.is_empty()
            || self.sc.submitters.iter().zip(&self.next).any(|(s, &n)| n < s.reqs.len())
    }

    /// Runs the worker when woken, else completes the oldest data I/O, until
    /// nothing is left to do.
    fn settle(&mut self) -> Result<(), Failure> {
        for _ in 0..10_000 {
            if self.pool.worker_wanted() {
                self.pool.run_worker();
            } else if let Some(io) = self.pool.in_flight_io().first() {
                if let Err(e) = self.pool.complete_io(io.id) {
                    return self.fail(format!("complete_io({}) refused: {e}", io.id.0));
                }
            } else {
                self.harvest()?;
                if let Some(o) = self.outstanding.values().next() {
                    return self.fail(format!("{} never completes (settled pool)", o.label));
                }
                return Ok(());
            }
            self.harvest()?;
        }
        self.fail("the pool never settles")
    }

    /// The checks at the end of an execution.
    fn finish(&mut self) -> Result<(), Failure> {
        self.stage = Stage::End;
        if let Some(o) = self.outstanding.values().next() {
            return self.fail(format!("{} never completed", o.label));
        }
        if self.pool.bios_in_flight() != 0 {
            return self.fail(format!("{} bios still in flight", self.pool.bios_in_flight()));
        }
        if !self.pool.in_flight_io().is_empty() {
            return self.fail(format!("data I/O still in flight: {:?}", self.pool.in_flight_io()));
        }
        self.check_metadata()?;

        self.stage = Stage::ReadBack;
        let devs = self.pool.active_thins();
        for &dev in &devs {
            self.submit(read(dev as u32, 0, THIN_SECTORS), None)?;
            self.settle()?;
        }

        self.stage = Stage::FreshWrites;
        for &dev in &devs {
            for &b in &self.sc.blocks {
                self.submit(write(dev as u32, b * BLOCK + 3, 2), None)?;
                self.settle()?;
            }
        }
        for &dev in &devs {
            self.submit(read(dev as u32, 0, THIN_SECTORS), None)?;
            self.settle()?;
        }
        if self.oracle.in_flight() != 0 {
            return self.fail(format!("the oracle still has {} requests in flight", self.oracle.in_flight()));
        }
        Ok(())
    }

    /// Commits, runs the checker over the metadata device and compares each
    /// data block's reference count with the mappings pointing at it.
    fn check_metadata(&self) -> Result<(), Failure> {
        let devs = self.pool.active_thins();
        let r = self.pool.with_metadata(|md| -> Result<Result<(), String>, String> {
            md.commit().map_err(|e| format!("commit: {e}"))?;
            let mut image = md.transaction_manager().block_manager().device().clone();
            let report =
                check_thin_metadata(&mut image, &CheckOptions::default()).map_err(|e| e.to_string())?;
            if !report.is_clean() {
                return Ok(Err(format!("metadata not clean: {report:?}")));
            }
            let mut refs = vec![0u32; DATA_BLOCKS as usize];
            for &dev in &devs {
                for v in 0..THIN_BLOCKS {
                    if let Some(found) = md.find_block(dev, v).map_err(|e| e.to_string())? {
                        match refs.get_mut(found.block as usize) {
                            Some(n) => *n += 1,
                            None => {
                                return Ok(Err(format!(
                                    "dev {dev} block {v} maps to data block {}",
                                    found.block
                                )))
                            }
                        }
                    }
                }
            }
            // Exact when no mapping leaf is shared between an origin and a
            // snapshot (the checker's distinct leaf entries equal the
            // mappings); a shared leaf counts its entries once.
            let mappings: u64 = refs.iter().map(|&n| u64::from(n)).sum();
            let exact = report.mapping_entries == mappings;
            let mut total = 0;
            for (b, &expected) in refs.iter().enumerate() {
                let count = md.data_block_count(b as u64).map_err(|e| e.to_string())?;
                total += u64::from(count);
                let ok =
                    if exact || expected == 0 { count == expected } else { (1..=expected).contains(&count) };
                if !ok {
                    return Ok(Err(format!(
                        "data block {b}: reference count {count}, but {expected} mappings point at it{}",
                        if exact { "" } else { " (some through a shared leaf)" }
                    )));
                }
            }
            if total != report.mapping_entries {
                return Ok(Err(format!(
                    "data reference counts sum to {total}, but the trees hold {} distinct mapping entries",
                    report.mapping_entries
                )));
            }
            Ok(Ok(()))
        });
        match r {
            Ok(Ok(())) => Ok(()),
            Ok(Err(m)) | Err(m) => self.fail(m),
        }
    }
}

// ---- the explorer ----

#[derive(Debug, Default)]
struct Stats {
    executions: usize,
    /// Longest execution (race steps).
    max_depth: usize,
    waker_passes: usize,
    failures: usize,
    oracle_failures: usize,
    /// Oracle violations seen during the race itself (not the read-backs).
    race_oracle_failures: usize,
    /// The first failure, with its schedule.
    first_failure: Option<String>,
}

/// Enumerates every execution of `sc`. With `stop_at_failure`, stops at the
/// first failing one.
fn explore(sc: &Scenario, stop_at_failure: bool) -> Stats {
    let mut stats = Stats::default();
    // The choices of the previous execution: (index taken, choices there).
    let mut prefix: Vec<(usize, usize)> = Vec::new();
    loop {
        let mut run = Run::new(sc);
        let mut trace: Vec<(usize, usize)> = Vec::new();
        let mut result = Ok(());
        loop {
            let mut choices = run.enabled();
            if choices.is_empty() && run.unfinished() {
                // A lost wake-up: the waker's periodic pass.
                run.log.push("waker pass (worker not woken)".to_string());
                run.waker_passes += 1;
                run.pool.run_worker();
                if let Err(f) = run.harvest() {
                    result = Err(f);
                    break;
                }
                choices = run.enabled();
                if choices.is_empty() {
                    break;
                }
            }
            if choices.is_empty() {
                break;
            }
            let depth = trace.len();
            let idx = match prefix.get(depth) {
                Some(&(idx, n)) => {
                    assert_eq!(n, choices.len(), "{}: replay diverged at step {depth}", sc.name);
                    idx
                }
                None => 0,
            };
            trace.push((idx, choices.len()));
            if trace.len() > MAX_DEPTH {
                result = fail(Stage::Race, format!("more than {MAX_DEPTH} steps: a livelock?"));
                break;
            }
            if let Err(f) = run.step(choices[idx]) {
                result = Err(f);
                break;
            }
        }
        let result = result.and_then(|()| run.finish());
        stats.executions += 1;
        stats.max_depth = stats.max_depth.max(trace.len());
        stats.waker_passes += run.waker_passes;
        if let Err(f) = result {
            stats.failures += 1;
            if f.oracle {
                stats.oracle_failures += 1;
                if f.stage == Stage::Race {
                    stats.race_oracle_failures += 1;
                }
            }
            if stats.first_failure.is_none() {
                stats.first_failure = Some(format!(
                    "{} ({:?}): {}\nschedule:\n  {}",
                    sc.name,
                    f.stage,
                    f.message,
                    run.log.join("\n  ")
                ));
            }
            if stop_at_failure {
                return stats;
            }
        }
        assert!(
            stats.executions < MAX_EXECUTIONS,
            "{}: more than {MAX_EXECUTIONS} executions; bound the scenario",
            sc.name
        );
        // Backtrack to the deepest choice with an untried sibling.
        loop {
            match trace.pop() {
                Some((idx, n)) if idx + 1 < n => {
                    trace.push((idx + 1, n));
                    break;
                }
                Some(_) => {}
                None => return stats,
            }
        }
        prefix = trace;
    }
}

/// Explores every scenario, prints the counts, fails on the first failing
/// execution, and checks each scenario's count against its lower bound.
fn check_all(scenarios: &[(Scenario, usize)]) {
    for (sc, min) in scenarios {
        let start = Instant::now();
        let stats = explore(sc, true);
        println!(
            "{}: {} executions (longest {} steps, {} forced waker passes) in {:.2?}",
            sc.name,
            stats.executions,
            stats.max_depth,
            stats.waker_passes,
            start.elapsed()
        );
        if let Some(f) = &stats.first_failure {
            panic!("{f}");
        }
        assert!(
            stats.executions >= *min,
            "{}: only {} executions, expected at least {min}: the search collapsed",
            sc.name,
            stats.executions
        );
    }
}

// ---- the scenarios ----

/// A race between submitters, each with its requests in program order (a
/// request waits for the previous one of its submitter to complete).
fn race(name: &str, setup: Vec<Setup>, subs: Vec<Vec<Req>>, blocks: Vec<u64>) -> Scenario {
    const NAMES: [&str; 4] = ["A", "B", "C", "D"];
    let submitters = subs.into_iter().zip(NAMES).map(|(reqs, name)| sub(name, reqs)).collect();
    Scenario::new(name, setup, submitters, blocks)
}

fn features_passdown(passdown: bool) -> PoolFeatures {
    PoolFeatures { no_discard_passdown: !passdown, ..PoolFeatures::default() }
}

/// Thin 0, nothing mapped.
fn empty_setup() -> Vec<Setup> {
    vec![Setup::Thin(0)]
}

/// Thin 0 with block 0 mapped.
fn mapped_setup() -> Vec<Setup> {
    vec![Setup::Thin(0), Setup::Io(write(0, 0, BLOCK))]
}

/// Block 0 of thin 0 written, then snapshotted as thin 1: block 0 is shared.
fn shared_setup() -> Vec<Setup> {
    vec![Setup::Thin(0), Setup::Io(write(0, 0, BLOCK)), Setup::Snap(1, 0)]
}

/// Scenario 2: writes and reads during the copy that breaks the sharing of
/// block 0 between thin 0 (the origin) and thin 1 (its snapshot).
fn break_sharing_scenarios() -> Vec<(Scenario, usize)> {
    let s = |name: &str, subs: Vec<Vec<Req>>, min| {
        (race(&format!("2{name}"), shared_setup(), subs, vec![0]), min)
    };
    vec![
        s(
            "a: partial write || second partial write, other sectors (origin)",
            vec![vec![write(0, 5, 2)], vec![write(0, 60, 4)]],
            13,
        ),
        s(
            "a: partial write || partial write, same sectors (origin)",
            vec![vec![write(0, 5, 2)], vec![write(0, 5, 2)]],
            13,
        ),
        s(
            "a: partial write || whole-block write (origin)",
            vec![vec![write(0, 5, 2)], vec![write(0, 0, BLOCK)]],
            9,
        ),
        s(
            "b: partial write, read back || read (origin)",
            vec![vec![write(0, 5, 2), read(0, 0, 8)], vec![read(0, 0, BLOCK)]],
            20,
        ),
        s(
            "c: partial write (origin) || read (snapshot)",
            vec![vec![write(0, 5, 2)], vec![read(1, 0, BLOCK)]],
            12,
        ),
        s(
            "c: whole-block overwrite (origin) || read (snapshot)",
            vec![vec![write(0, 0, BLOCK)], vec![read(1, 0, BLOCK)]],
            8,
        ),
        s(
            "d: partial write (origin) || partial write (snapshot)",
            vec![vec![write(0, 5, 2)], vec![write(1, 9, 2)]],
            38,
        ),
        s(
            "e: partial write, read back || second write (origin) || read (snapshot)",
            vec![vec![write(0, 5, 2), read(0, 0, 8)], vec![write(0, 6, 4)], vec![read(1, 0, BLOCK)]],
            2400,
        ),
        s(
            "e: partial write || read (origin) || read (snapshot)",
            vec![vec![write(0, 5, 2)], vec![read(0, 0, BLOCK)], vec![read(1, 0, BLOCK)]],
            540,
        ),
    ]
}

/// Scenario 1: two writes (and a reader) to one unprovisioned block.
#[test]
fn two_writes_to_one_unprovisioned_block() {
    let s =
        |name: &str, subs: Vec<Vec<Req>>, min| (race(&format!("1{name}"), empty_setup(), subs, vec![1]), min);
    check_all(&[
        s("a: partial || partial, other sectors", vec![vec![write(0, 130, 4)], vec![write(0, 200, 8)]], 18),
        s("b: partial || partial, same sectors", vec![vec![write(0, 140, 4)], vec![write(0, 140, 4)]], 18),
        s("c: partial || whole block", vec![vec![write(0, 130, 4)], vec![write(0, BLOCK, BLOCK)]], 13),
        s(
            "d: whole block || whole block",
            vec![vec![write(0, BLOCK, BLOCK)], vec![write(0, BLOCK, BLOCK)]],
            8,
        ),
        s(
            "e: partial, read back || partial, read back",
            vec![vec![write(0, 130, 4), read(0, BLOCK, 16)], vec![write(0, 132, 4), read(0, BLOCK, 16)]],
            190,
        ),
        s(
            "f: partial || whole block || read",
            vec![vec![write(0, 130, 4)], vec![write(0, BLOCK, BLOCK)], vec![read(0, BLOCK, BLOCK)]],
            260,
        ),
        (
            Scenario::new(
                "1g: two partial writes queued without waiting || whole block",
                empty_setup(),
                vec![
                    Submitter { name: "A", reqs: vec![write(0, 130, 4), write(0, 140, 4)], wait: false },
                    sub("B", vec![write(0, BLOCK, BLOCK)]),
                ],
                vec![1],
            ),
            200,
        ),
    ]);
}

/// Scenario 2.
#[test]
fn writes_and_reads_during_break_sharing() {
    check_all(&break_sharing_scenarios());
}

/// Scenario 3: a whole-block discard racing a write that provisions the
/// block, a write to a mapped block, a write to a shared block; with and
/// without passdown.
#[test]
fn discards_racing_provisioning_and_mapped_writes() {
    let mut scenarios = Vec::new();
    for passdown in [true, false] {
        let tag = if passdown { "passdown" } else { "no_discard_passdown" };
        let s = |name: &str, setup, subs, blocks, min| {
            (
                race(&format!("3{name} [{tag}]"), setup, subs, blocks)
                    .with_features(features_passdown(passdown)),
                min,
            )
        };
        scenarios.extend([
            s(
                "a: discard || partial write provisioning the block",
                empty_setup(),
                vec![vec![write(0, 130, 4)], vec![discard(0, BLOCK, BLOCK)]],
                vec![1],
                12,
            ),
            s(
                "a: discard || whole-block write provisioning the block",
                empty_setup(),
                vec![vec![write(0, BLOCK, BLOCK)], vec![discard(0, BLOCK, BLOCK)]],
                vec![1],
                7,
            ),
            s(
                "a: discard || partial write, read back || read",
                empty_setup(),
                vec![
                    vec![write(0, 130, 4), read(0, BLOCK, 8)],
                    vec![discard(0, BLOCK, BLOCK)],
                    vec![read(0, BLOCK, 8)],
                ],
                vec![1],
                800,
            ),
            s(
                "b: discard of a mapped block || write to it",
                mapped_setup(),
                vec![vec![write(0, 5, 2)], vec![discard(0, 0, BLOCK)]],
                vec![0],
                3,
            ),
            s(
                "b: discard of a mapped block || write to it, read back || read",
                mapped_setup(),
                vec![vec![write(0, 5, 2), read(0, 0, 8)], vec![discard(0, 0, BLOCK)], vec![read(0, 0, 8)]],
                vec![0],
                220,
            ),
            s(
                "c: discard of a mapped and an unprovisioned block || write provisioning the second",
                mapped_setup(),
                vec![vec![write(0, 130, 4)], vec![discard(0, 0, 2 * BLOCK)]],
                vec![0, 1],
                6,
            ),
            s(
                "d: discard of a shared block (origin) || partial write to it (origin) || read (snapshot)",
                shared_setup(),
                vec![vec![write(0, 5, 2)], vec![discard(0, 0, BLOCK)], vec![read(1, 0, BLOCK)]],
                vec![0],
                170,
            ),
        ]);
    }
    check_all(&scenarios);
}

/// Scenario 4: a FUA write racing a normal write to one unprovisioned block.
#[test]
fn fua_write_racing_a_normal_write() {
    let s =
        |name: &str, subs: Vec<Vec<Req>>, min| (race(&format!("4{name}"), empty_setup(), subs, vec![1]), min);
    check_all(&[
        s(
            "a: fua partial || partial, other sectors",
            vec![vec![fua_write(0, 130, 4)], vec![write(0, 136, 4)]],
            33,
        ),
        s(
            "b: fua partial || partial, same sectors",
            vec![vec![fua_write(0, 140, 4)], vec![write(0, 140, 4)]],
            33,
        ),
        s(
            "c: fua whole block || partial",
            vec![vec![fua_write(0, BLOCK, BLOCK)], vec![write(0, 130, 4)]],
            29,
        ),
        s(
            "d: partial || fua whole block",
            vec![vec![write(0, 130, 4)], vec![fua_write(0, BLOCK, BLOCK)]],
            29,
        ),
        s(
            "e: fua partial || partial || read",
            vec![vec![fua_write(0, 130, 4)], vec![write(0, 136, 4)], vec![read(0, BLOCK, 16)]],
            860,
        ),
    ]);
}

/// The enumeration can fail: with writes to shared blocks going in place,
/// the snapshot shows the origin's new data.
#[test]
fn detector_write_to_shared_in_place() {
    let mutations = Mutations::by_name("write-to-shared-in-place").expect("mutation exists");
    let mut total = 0;
    let mut race_total = 0;
    for (sc, _) in break_sharing_scenarios() {
        let sc = sc.with_mutations(mutations);
        let stats = explore(&sc, false);
        println!(
            "{} [write-to-shared-in-place]: {} of {} executions fail, {} oracle violations ({} during the race)",
            sc.name, stats.failures, stats.executions, stats.oracle_failures, stats.race_oracle_failures
        );
        if let Some(f) = &stats.first_failure {
            println!("  first: {f}");
        }
        total += stats.oracle_failures;
        race_total += stats.race_oracle_failures;
    }
    assert!(total > 0, "the oracle never caught write-to-shared-in-place");
    assert!(race_total > 0, "no read during a race caught write-to-shared-in-place");
}
