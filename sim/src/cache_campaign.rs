//! The cache metadata crash campaign: the metadata crash campaign of
//! [`crate::campaign`] for dm-cache.
//!
//! For each seed: a metadata version (1 or 2), a cache block size and a
//! cache size (now and then large enough for a two-level array btree), and
//! a workload of cache metadata operations ([`crate::cache_workload`]) run
//! on the model over a [`SimDisk`] whose acknowledged writes are volatile
//! until a flush. Every window in which the metadata device is written —
//! each commit, each clean shutdown, each reopen that clears
//! CLEAN_SHUTDOWN in place — is recorded request by request; at every
//! request a seeded crash state is rebuilt (a random subset of the
//! unflushed writes, sometimes one torn at sector granularity) and must
//! (1) open as cache metadata, (2) pass the metadata checker, and (3) dump
//! (`cache_dump` XML) exactly as the state before the window or the state
//! after it. After each commit the committed image must also hold exactly
//! what a plain reference says: every mapping, dirty bit, discard bit and
//! saved hint.
//!
//! The outcome types are the thin metadata campaign's ([`SeedOutcome`],
//! [`Violation`], [`ViolationKind`]), so the two report alike.

use std::collections::{BTreeMap, BTreeSet};

use dmsim_faults::{
    CrashOverlay, CrashPoint, DistinctStates, Image, JudgedStates, OverlayDevice, SimDisk, TearMode,
};
use dmsim_model::cache::inspect::read_image;
use dmsim_model::cache::mapping::{discard_geometry, PolicyHints, ShutdownState};
use dmsim_model::cache::superblock::CacheStats;
use dmsim_model::cache::{CacheError, CacheMetadata, OpenOptions};
use dmsim_model::pdata::PdataError;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::cache_workload::{self, resolve, CacheOp};
use crate::campaign::{CampaignConfig, SeedOutcome, Violation, ViolationKind};

/// What the model holds, as a user of the metadata would see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Reference {
    cache_blocks: u32,
    /// Cache block → origin block.
    map: BTreeMap<u32, u64>,
    /// Origin blocks mapped (each by one cache block).
    mapped_origin: BTreeSet<u64>,
    /// Dirty cache blocks (always mapped ones).
    dirty: BTreeSet<u32>,
    discards: Vec<bool>,
    /// The hints last saved, if any (the hint array is rebuilt only then).
    hints: Option<Vec<u32>>,
    stats: CacheStats,
}

/// The shape a seed draws.
#[derive(Debug, Clone, Copy)]
struct Shape {
    version: u32,
    block_sectors: u32,
    cache_blocks: u32,
    origin_blocks: u64,
}

impl Shape {
    fn draw(rng: &mut ChaCha8Rng) -> Shape {
        let version = if rng.gen_bool(0.5) { 1 } else { 2 };
        let block_sectors = [64, 128, 512][rng.gen_range(0..3)];
        // Now and then a cache past one leaf of array blocks (252 blocks of
        // 509 mappings): a two-level array btree.
        let cache_blocks =
            if rng.gen_ratio(1, 16) { rng.gen_range(128_400..132_000) } else { rng.gen_range(16..3000) };
        let origin_blocks = u64::from(cache_blocks) * rng.gen_range(2..16);
        Shape { version, block_sectors, cache_blocks, origin_blocks }
    }

    fn open_options(&self, read_only: bool) -> OpenOptions {
        OpenOptions { may_format: false, read_only, ..OpenOptions::new(self.block_sectors, self.version) }
    }
}

struct Run<'a> {
    cfg: &'a CampaignConfig,
    seed: u64,
    rng: ChaCha8Rng,
    shape: Shape,
    md: Option<CacheMetadata<SimDisk>>,
    now: Reference,
    committed: Reference,
    /// cache_dump XML of the last committed state.
    committed_dump: String,
    outcome: SeedOutcome,
}

fn dump_image(image: &Image) -> Result<String, String> {
    dmsim_model::cache::dump::dump_string(&mut image.clone()).map_err(|e| e.to_string())
}

/// Judges a crash state: it must pass the checker (mappings bounded by
/// `origin_blocks`), dump as the state before the window (`committed`) or
/// after it (`new_dump`), and open with `open`.
fn judge_crash_state(
    mut dev: OverlayDevice<'_>,
    origin_blocks: u64,
    open: OpenOptions,
    committed: &str,
    new_dump: &str,
) -> Result<(), (ViolationKind, String)> {
    crate::cache_check::judge(&mut dev, origin_blocks).map_err(|(unusable, e)| {
        (if unusable { ViolationKind::CrashUnopenable } else { ViolationKind::CrashDamaged }, e)
    })?;
    let got = dmsim_model::cache::dump::dump_string(&mut dev)
        .map_err(|e| (ViolationKind::CrashUnopenable, e.to_string()))?;
    if got != committed && got != new_dump {
        return Err((
            ViolationKind::CrashTorn,
            "the metadata reads as neither the old nor the new state".into(),
        ));
    }
    CacheMetadata::open(dev, open).map(|_| ()).map_err(|e| (ViolationKind::CrashUnopenable, e.to_string()))
}

/// Whether `e` is the metadata device running out of space (the target
/// would go read-only: not a failure of the model).
fn out_of_space(e: &CacheError) -> bool {
    matches!(e, CacheError::Pdata(PdataError::NoSpace(_)))
}

impl Run<'_> {
    fn md(&mut self) -> &mut CacheMetadata<SimDisk> {
        self.md.as_mut().expect("metadata open")
    }

    fn disk(&mut self) -> &mut SimDisk {
        self.md().transaction_manager().block_manager().device_mut()
    }

    fn violation(&mut self, op_index: usize, kind: ViolationKind, detail: String) {
        self.outcome.violations.push(Violation { seed: self.seed, op_index, kind, detail });
    }

    fn failed(&mut self, op_index: usize, what: &str, e: CacheError) -> bool {
        if out_of_space(&e) {
            self.outcome.out_of_metadata_space = true;
            return false;
        }
        self.violation(op_index, ViolationKind::OperationFailed, format!("{what}: {e}"));
        false
    }

    /// Runs `write` (a commit, a clean shutdown, a reopen) with the disk
    /// recording, then judges crash states at the requests it made
    /// ([`crash_points`]).
    fn window(
        &mut self,
        op_index: usize,
        what: &str,
        write: impl FnOnce(&mut Self) -> Result<(), CacheError>,
    ) -> bool {
        let base = self.disk().start_recording();
        if let Err(e) = write(self) {
            return self.failed(op_index, what, e);
        }
        let disk = self.disk();
        let log = disk.take_log();
        let after = disk.durable().clone();
        if log.is_empty() {
            return true;
        }
        self.outcome.commits += 1;
        let new_dump = match dump_image(&after) {
            Ok(d) => d,
            Err(e) => {
                self.violation(
                    op_index,
                    ViolationKind::CrashDamaged,
                    format!("{what}: the new state does not dump: {e}"),
                );
                return false;
            }
        };
        let mut memo = JudgedStates::new(16);
        let (origin_blocks, open_options) = (self.shape.origin_blocks, self.shape.open_options(true));
        let committed = self.committed_dump.clone();
        let mut seen = DistinctStates::new();
        for point in crash_points(log.len(), &mut self.rng) {
            for _ in 0..self.cfg.crashes_per_point {
                let crash = CrashPoint::random(&log, point, TearMode::Sectors, &mut self.rng);
                let overlay = CrashOverlay::of_crash(&base, &log, &crash);
                if !seen.first_time(&base, &overlay) {
                    continue;
                }
                if crash.torn.is_some() {
                    self.outcome.torn_writes += 1;
                }
                self.outcome.crash_states += 1;
                let (verdict, answered) = memo.judge(&base, overlay, |dev| {
                    judge_crash_state(dev, origin_blocks, open_options, &committed, &new_dump)
                });
                self.outcome.memo_hits += usize::from(answered);
                if let Err((kind, detail)) = verdict {
                    let detail = format!("{what}: crash after request {point} of {}: {detail}", log.len());
                    self.violation(op_index, kind, detail);
                    return false;
                }
            }
        }
        self.committed_dump = new_dump;
        true
    }

    /// Commits; the committed image must hold the reference.
    fn commit(&mut self, op_index: usize) -> bool {
        if !self.window(op_index, "commit", |r| r.md().commit(false)) {
            return false;
        }
        self.committed = self.now.clone();
        self.check_reference(op_index)
    }

    /// The committed image against the reference.
    fn check_reference(&mut self, op_index: usize) -> bool {
        let mut durable = self.disk().durable().clone();
        let img = match read_image(&mut durable) {
            Ok(img) => img,
            Err(e) => {
                self.violation(
                    op_index,
                    ViolationKind::ReferenceMismatch,
                    format!("the committed image does not read: {e}"),
                );
                return false;
            }
        };
        let r = &self.committed;
        let mut mismatch = None;
        if img.superblock.cache_blocks != r.cache_blocks {
            mismatch =
                Some(format!("cache_blocks {}, reference {}", img.superblock.cache_blocks, r.cache_blocks));
        }
        for (c, m) in img.mappings.iter().enumerate() {
            if mismatch.is_some() {
                break;
            }
            let c32 = c as u32;
            let got = m.valid().then_some(m.oblock);
            if got != r.map.get(&c32).copied() {
                mismatch = Some(format!("cache block {c}: maps {got:?}, reference {:?}", r.map.get(&c32)));
            } else if img.is_dirty(c) != r.dirty.contains(&c32) {
                mismatch = Some(format!(
                    "cache block {c}: dirty {}, reference {}",
                    img.is_dirty(c),
                    r.dirty.contains(&c32)
                ));
            }
        }
        if mismatch.is_none() && img.discards != r.discards {
            mismatch = Some("the discard bitset differs from the reference".to_string());
        }
        if let (None, Some(want)) = (&mismatch, &r.hints) {
            let got: Option<Vec<u32>> = img
                .hints
                .as_ref()
                .map(|h| h.iter().map(|v| u32::from_le_bytes([v[0], v[1], v[2], v[3]])).collect());
            if got.as_ref() != Some(want) {
                mismatch = Some(format!(
                    "the saved hints differ from the reference (first of {}: {:?} vs {:?})",
                    want.len(),
                    got.as_ref().and_then(|g| g.first()),
                    want.first()
                ));
            }
        }
        if mismatch.is_none() && img.superblock.stats != r.stats {
            mismatch = Some("the statistics differ from the reference".to_string());
        }
        match mismatch {
            Some(m) => {
                self.violation(op_index, ViolationKind::ReferenceMismatch, m);
                false
            }
            None => true,
        }
    }

    fn shutdown_state(&self) -> ShutdownState {
        let r = &self.now;
        let (discard_block_size, _) = discard_geometry(
            u64::from(self.shape.block_sectors),
            self.shape.origin_blocks * u64::from(self.shape.block_sectors),
        );
        let hints = r.hints.clone().unwrap_or_default();
        ShutdownState {
            dirty: (0..r.cache_blocks).map(|c| r.dirty.contains(&c)).collect(),
            discard_block_size,
            discards: r.discards.clone(),
            stats: r.stats,
            policy: PolicyHints {
                name: "smq".into(),
                version: [2, 0, 0],
                hint_size: 4,
                hints: (0..r.cache_blocks as usize).map(|c| hints.get(c).copied().unwrap_or(0)).collect(),
            },
        }
    }

    /// Applies one operation; false on a violation (or out of space).
    fn apply(&mut self, i: usize, op: &CacheOp) -> bool {
        let r: Result<(), CacheError> = match *op {
            CacheOp::Insert { cblock, oblock } => {
                let unmapped = u64::from(self.now.cache_blocks) - self.now.map.len() as u64;
                if unmapped == 0 {
                    return true;
                }
                // The n-th unmapped cache block.
                let mut n = resolve(cblock, unmapped as usize) as u32;
                let mut c = 0;
                for b in 0..self.now.cache_blocks {
                    if !self.now.map.contains_key(&b) {
                        if n == 0 {
                            c = b;
                            break;
                        }
                        n -= 1;
                    }
                }
                let o = resolve(oblock, self.shape.origin_blocks as usize) as u64;
                if self.now.mapped_origin.contains(&o) {
                    return true;
                }
                let r = self.md().insert_mapping(c, o);
                if r.is_ok() {
                    self.now.map.insert(c, o);
                    self.now.mapped_origin.insert(o);
                    self.outcome.mappings += 1;
                }
                r
            }
            CacheOp::Remove { pick } => {
                let Some(c) = self.pick_mapped(pick) else { return true };
                // A dirty block is written back (cleaned) before it goes.
                let r = if self.now.dirty.contains(&c) { self.md().set_dirty(c, false) } else { Ok(()) };
                let r = r.and_then(|()| self.md().remove_mapping(c));
                if r.is_ok() {
                    let o = self.now.map.remove(&c).expect("mapped");
                    self.now.mapped_origin.remove(&o);
                    self.now.dirty.remove(&c);
                }
                r
            }
            CacheOp::SetDirty { pick, dirty } => {
                let Some(c) = self.pick_mapped(pick) else { return true };
                let r = self.md().set_dirty(c, dirty);
                if r.is_ok() {
                    if dirty {
                        self.now.dirty.insert(c);
                    } else {
                        self.now.dirty.remove(&c);
                    }
                }
                r
            }
            CacheOp::SetDirtyBits { percent, seed } => {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let dirty: BTreeSet<u32> =
                    self.now.map.keys().copied().filter(|_| rng.gen_range(0..100) < percent).collect();
                let bits: Vec<bool> = (0..self.now.cache_blocks).map(|c| dirty.contains(&c)).collect();
                let r = self.md().set_dirty_bits(&bits);
                if r.is_ok() {
                    self.now.dirty = dirty;
                }
                r
            }
            CacheOp::SetDiscard { pick, discarded } => {
                if self.now.discards.is_empty() {
                    return true;
                }
                let d = resolve(pick, self.now.discards.len());
                let r = self.md().set_discard(d as u64, discarded);
                if r.is_ok() {
                    self.now.discards[d] = discarded;
                }
                r
            }
            CacheOp::SaveHints { seed } => {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let hints: Vec<u32> = (0..self.now.cache_blocks).map(|_| rng.gen_range(0..64)).collect();
                let policy = PolicyHints {
                    name: "smq".into(),
                    version: [2, 0, 0],
                    hint_size: 4,
                    hints: hints.clone(),
                };
                let r = self.md().write_hints(&policy);
                if r.is_ok() {
                    self.now.hints = Some(hints);
                }
                r
            }
            CacheOp::BumpStats => {
                let s = &mut self.now.stats;
                s.read_hits = s.read_hits.wrapping_add(7);
                s.read_misses = s.read_misses.wrapping_add(3);
                s.write_hits = s.write_hits.wrapping_add(5);
                s.write_misses = s.write_misses.wrapping_add(1);
                let stats = *s;
                self.md().set_stats(stats)
            }
            CacheOp::Resize { percent } => {
                let new =
                    ((u64::from(self.now.cache_blocks) * u64::from(percent)) / 100).clamp(16, 150_000) as u32;
                match self.md().resize(new) {
                    Ok(()) => {
                        let dropped: Vec<u32> = self.now.map.range(new..).map(|(&c, _)| c).collect();
                        for c in dropped {
                            let o = self.now.map.remove(&c).expect("mapped");
                            self.now.mapped_origin.remove(&o);
                        }
                        self.now.dirty.retain(|&c| c < new);
                        self.now.cache_blocks = new;
                        Ok(())
                    }
                    // The kernel refuses too; nothing changed.
                    Err(CacheError::ShrinkDirty(c)) if self.now.dirty.range(new..).next() == Some(&c) => {
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            CacheOp::Commit => return self.commit(i),
            CacheOp::Abort => {
                let r = self.md().abort();
                if r.is_ok() {
                    self.now = self.committed.clone();
                }
                r
            }
            CacheOp::CleanShutdownAndReopen => return self.clean_shutdown_and_reopen(i),
        };
        match r {
            Ok(()) => true,
            Err(e) => self.failed(i, &format!("{op:?}"), e),
        }
    }

    fn pick_mapped(&self, pick: u32) -> Option<u32> {
        if self.now.map.is_empty() {
            return None;
        }
        self.now.map.keys().nth(resolve(pick, self.now.map.len())).copied()
    }

    fn clean_shutdown_and_reopen(&mut self, i: usize) -> bool {
        let state = self.shutdown_state();
        if !self.window(i, "clean shutdown", |r| r.md().clean_shutdown(&state)) {
            return false;
        }
        self.now.hints = Some(state.policy.hints.clone());
        self.committed = self.now.clone();
        if !self.check_reference(i) {
            return false;
        }
        // The table is reloaded: the metadata closes and opens again, which
        // clears CLEAN_SHUTDOWN in place — one more window, whose crash
        // states must all read as the committed state.
        let opts = self.shape.open_options(false);
        self.window(i, "reopen", |r| {
            let disk = r.md.take().expect("open").close();
            let mut md = CacheMetadata::open(disk, opts)?;
            md.set_mutations(r.cfg.mutations);
            r.md = Some(md);
            Ok(())
        })
    }
}

/// The most crash points judged in one window: a commit of a large cache
/// writes hundreds of blocks, and each of its crash states costs a full
/// read of the image.
pub const MAX_POINTS_PER_WINDOW: usize = 40;

/// The points of a window of `requests` requests at which crashes are
/// judged: every one (0 = before the first request, `requests` = after
/// the last) when there are at most [`MAX_POINTS_PER_WINDOW`], otherwise
/// the last one and the seed's choice of the others, in order.
fn crash_points(requests: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    if requests < MAX_POINTS_PER_WINDOW {
        return (0..=requests).collect();
    }
    let mut chosen: BTreeSet<usize> = BTreeSet::from([requests]);
    while chosen.len() < MAX_POINTS_PER_WINDOW {
        chosen.insert(rng.gen_range(0..requests));
    }
    chosen.into_iter().collect()
}

/// Runs one seed of the cache metadata crash campaign (`cfg.seeds`,
/// `cfg.ops_per_seed`, `cfg.crashes_per_point`, `cfg.metadata_sectors`
/// and `cfg.mutations` apply; `cfg.data_blocks` does not).
pub fn run_seed(cfg: &CampaignConfig, seed: u64) -> SeedOutcome {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6361_6368_655f_6d64);
    let shape = Shape::draw(&mut rng);
    let ops = cache_workload::generate(&mut rng, cfg.ops_per_seed);
    let mut run = Run {
        cfg,
        seed,
        rng,
        shape,
        md: None,
        now: Reference::default(),
        committed: Reference::default(),
        committed_dump: String::new(),
        outcome: SeedOutcome { seed, ..SeedOutcome::default() },
    };
    let opts = OpenOptions::new(shape.block_sectors, shape.version);
    match CacheMetadata::open(SimDisk::new(cfg.metadata_sectors), opts) {
        Ok(mut md) => {
            md.set_mutations(cfg.mutations);
            run.md = Some(md);
        }
        Err(e) => {
            run.failed(0, "format", e);
            return run.outcome;
        }
    }
    run.committed_dump = dump_image(run.disk().durable()).unwrap_or_default();
    // The target's first resume: the cache device's size and the discard
    // bitset, then a commit.
    let (dbs, dnr) = discard_geometry(
        u64::from(shape.block_sectors),
        shape.origin_blocks * u64::from(shape.block_sectors),
    );
    let setup = run.md().resize(shape.cache_blocks).and_then(|()| run.md().discard_bitset_resize(dbs, dnr));
    if let Err(e) = setup {
        run.failed(0, "first resize", e);
        return run.outcome;
    }
    run.now.cache_blocks = shape.cache_blocks;
    run.now.discards = vec![false; dnr as usize];
    if !run.commit(0) {
        return run.outcome;
    }
    for (i, op) in ops.iter().enumerate() {
        run.outcome.ops += 1;
        if !run.apply(i, op) {
            break;
        }
    }
    run.outcome
}

#[cfg(test)]
mod tests {
    use dmsim_model::mutation::Mutations;

    use super::*;

    fn small() -> CampaignConfig {
        CampaignConfig { seeds: 0..12, ops_per_seed: 60, ..CampaignConfig::default() }
    }

    #[test]
    fn the_model_survives_every_crash_state() {
        let cfg = small();
        let mut states = 0;
        let mut versions = BTreeSet::new();
        for seed in cfg.seeds.clone() {
            let out = run_seed(&cfg, seed);
            assert!(out.violations.is_empty(), "seed {seed}: {:?}", out.violations);
            assert!(out.commits > 0, "seed {seed} committed");
            states += out.crash_states;
            versions
                .insert(Shape::draw(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x6361_6368_655f_6d64)).version);
        }
        assert!(states > 200, "{states} crash states");
        assert_eq!(versions.len(), 2, "both metadata versions ran");
    }

    #[test]
    fn a_seed_runs_the_same_every_time() {
        let cfg = small();
        assert_eq!(run_seed(&cfg, 5), run_seed(&cfg, 5));
    }

    /// The first violation of `mutation` in seeds 0..16.
    fn first_violation(mutation: &str) -> Violation {
        let cfg =
            CampaignConfig { seeds: 0..16, mutations: Mutations::by_name(mutation).unwrap(), ..small() };
        cfg.seeds
            .clone()
            .find_map(|seed| run_seed(&cfg, seed).violations.into_iter().next())
            .unwrap_or_else(|| panic!("mutation {mutation} was not caught"))
    }

    #[test]
    fn detector_checker_catches_a_superblock_written_before_the_flush() {
        let v = first_violation("superblock-before-flush");
        assert!(matches!(v.kind, ViolationKind::CrashDamaged | ViolationKind::CrashUnopenable), "{v:?}");
    }

    #[test]
    fn detector_checker_catches_blocks_reused_before_the_commit() {
        let v = first_violation("reuse-freed-before-commit");
        assert!(
            matches!(
                v.kind,
                ViolationKind::CrashDamaged | ViolationKind::CrashTorn | ViolationKind::CrashUnopenable
            ),
            "{v:?}"
        );
    }

    #[test]
    fn detector_old_or_new_catches_an_array_written_in_place() {
        let v = first_violation("array-set-in-place");
        assert_eq!(v.kind, ViolationKind::CrashTorn, "{v:?}");
    }

    #[test]
    fn detector_reference_catches_a_commit_that_forgets_the_statistics() {
        let v = first_violation("cache-commit-forgets-stats");
        assert_eq!(v.kind, ViolationKind::ReferenceMismatch, "{v:?}");
        assert!(v.detail.contains("statistics"), "{v:?}");
    }
}
