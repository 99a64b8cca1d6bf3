//! The smq policy (dm-cache-policy-smq.c of Linux 6.1, spec §4.8), which
//! also implements `mq`, `cleaner` and `default`.
//!
//! One entry space holds, in this order: 128 writeback sentinels, 128
//! demote sentinels, the hotspot entries, and one entry per cache block
//! (entry index − first cache entry = cblock). Three multilevel queues use
//! them: the hotspot queue (blocks 16 × the cache block, tracking what is
//! missed often) and the clean and dirty queues of cache entries. Misses
//! climb the hotspot queue; a miss whose hotspot entry is high enough is
//! promoted; a full cache demotes the oldest clean entry of the lower half;
//! idle time writes back dirty entries.
//!
//! Time: the kernel reads `jiffies` in `tick` (and at creation). The model
//! takes the simulated time in nanoseconds and counts jiffies as
//! `now × HZ / 10^9`; periods end when jiffies pass their deadline
//! (`time_after`, strictly after).

use super::background::{BackgroundTracker, PolicyOp, PolicyWork};
use super::entry::{EntryAlloc, EntrySpace};
use super::hash::HashTable;
use super::queue::Queue;
use super::stats::{self, Stats, NR_CACHE_LEVELS, NR_HOTSPOT_LEVELS};
use super::{DataDir, Nanos, PolicyType};

/// Writeback sentinel set period (`WRITEBACK_PERIOD`), seconds.
pub const WRITEBACK_PERIOD_SECS: u64 = 10;
/// Demote sentinel set period (`DEMOTE_PERIOD`), seconds.
pub const DEMOTE_PERIOD_SECS: u64 = 60;
/// Hotspot statistics period (`HOTSPOT_UPDATE_PERIOD`), seconds.
pub const HOTSPOT_UPDATE_PERIOD_SECS: u64 = 1;
/// Cache statistics period (`CACHE_UPDATE_PERIOD`), seconds.
pub const CACHE_UPDATE_PERIOD_SECS: u64 = 60;
/// Percentage of the cache to keep clean when idle is not enough
/// (`CLEAN_TARGET`; unused by 6.1's code).
pub const CLEAN_TARGET: u32 = 25;
/// Percentage of the cache that demotions try to keep free (`FREE_TARGET`).
pub const FREE_TARGET: u32 = 25;
/// The background tracker's capacity smq creates it with.
pub const MAX_BACKGROUND_WORK: u32 = 4096;

/// Debian's kernel 6.1 `CONFIG_HZ`.
pub const DEFAULT_HZ: u32 = 250;

/// What a policy is created with (`dm_cache_policy_create` arguments plus
/// the model's knobs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmqParams {
    /// Which registered policy.
    pub policy: PolicyType,
    /// Cache blocks.
    pub cache_size: u32,
    /// Origin size in sectors (6.1.0: the origin device's size; later
    /// 6.1.y: the target length).
    pub origin_size: u64,
    /// Cache block size in sectors.
    pub cache_block_size: u64,
    /// The kernel's `HZ`.
    pub hz: u32,
    /// The `cleaner` flag of 6.1.y (upstream 1e4ab7b4c881, "dm cache policy
    /// smq: ensure IO doesn't prevent cleaner policy progress", in stable
    /// releases from August 2023): the cleaner writes back whether or not
    /// the device is idle. False gives 6.1.0, where the cleaner writes back
    /// only when the core reports idle.
    pub cleaner_ignores_idle: bool,
}

impl SmqParams {
    /// Parameters for `policy` on a cache, with Debian's HZ and 6.1.y's
    /// cleaner.
    pub fn new(policy: PolicyType, cache_size: u32, origin_size: u64, cache_block_size: u64) -> Self {
        SmqParams {
            policy,
            cache_size,
            origin_size,
            cache_block_size,
            hz: DEFAULT_HZ,
            cleaner_ignores_idle: true,
        }
    }
}

/// The hotspot geometry (`calc_hotspot_params`): hotspot block size (16 ×
/// the cache block, halved while the hotspot blocks would cover more than
/// the origin and it is still larger than a cache block) and the number of
/// hotspot blocks (max(cache blocks / 4, 1024)).
pub fn hotspot_params(origin_size: u64, cache_block_size: u64, nr_cache_blocks: u32) -> (u64, u32) {
    let mut size = cache_block_size * 16;
    let nr = (nr_cache_blocks / 4).max(1024);
    while size > cache_block_size && size * nr as u64 > origin_size {
        size /= 2;
    }
    (size, nr)
}

/// `time_after(a, b)`: a is strictly after b (wrapping).
fn time_after(a: u64, b: u64) -> bool {
    (b.wrapping_sub(a) as i64) < 0
}

/// The smq policy's state (`struct smq_policy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmqPolicy {
    params: SmqParams,
    hotspot_block_size: u64,
    nr_hotspot_blocks: u32,
    cache_blocks_per_hotspot_block: u32,
    hotspot_level_jump: u32,

    es: EntrySpace,
    writeback_sentinel_alloc: EntryAlloc,
    demote_sentinel_alloc: EntryAlloc,
    hotspot_alloc: EntryAlloc,
    cache_alloc: EntryAlloc,

    hotspot_hit_bits: Vec<bool>,
    cache_hit_bits: Vec<bool>,

    hotspot: Queue,
    clean: Queue,
    dirty: Queue,

    hotspot_stats: Stats,
    cache_stats: Stats,
    ticks: u32,

    table: HashTable,
    hotspot_table: HashTable,

    current_writeback_sentinels: bool,
    next_writeback_period: u64,
    current_demote_sentinels: bool,
    next_demote_period: u64,

    write_promote_level: u32,
    read_promote_level: u32,
    next_hotspot_period: u64,
    next_cache_period: u64,

    bg_work: BackgroundTracker,
    migrations_allowed: bool,
    cleaner: bool,
}

impl SmqPolicy {
    /// Creates the policy at time `now` (`__smq_create`).
    pub fn new(params: SmqParams, now: Nanos) -> Self {
        let cache_size = params.cache_size;
        let (hotspot_block_size, nr_hotspot_blocks) =
            hotspot_params(params.origin_size, params.cache_block_size, cache_size);
        let cbphb = (hotspot_block_size / params.cache_block_size) as u32;
        let per_queue = 2 * NR_CACHE_LEVELS;
        let total_sentinels = 2 * per_queue;
        let hotspot_end = total_sentinels + nr_hotspot_blocks;
        let mut es = EntrySpace::new((hotspot_end + cache_size) as usize);

        let writeback_sentinel_alloc = EntryAlloc::new(&mut es, 0, per_queue);
        let demote_sentinel_alloc = EntryAlloc::new(&mut es, per_queue, total_sentinels);
        for i in 0..total_sentinels {
            es.get_mut(i).sentinel = true;
        }
        let hotspot_alloc = EntryAlloc::new(&mut es, total_sentinels, hotspot_end);
        let cache_alloc = EntryAlloc::new(&mut es, hotspot_end, hotspot_end + cache_size);

        let mut hotspot = Queue::new(NR_HOTSPOT_LEVELS);
        hotspot.nr_top_levels = 8;
        hotspot.nr_in_top_levels = (nr_hotspot_blocks / NR_HOTSPOT_LEVELS).min(cache_size / cbphb);

        let jiffies = Self::jiffies_at(params.hz, now);
        let (cleaner, migrations_allowed) = match params.policy {
            PolicyType::Cleaner => (params.cleaner_ignores_idle, false),
            _ => (false, true),
        };
        let mut mq = SmqPolicy {
            params,
            hotspot_block_size,
            nr_hotspot_blocks,
            cache_blocks_per_hotspot_block: cbphb,
            hotspot_level_jump: 1,
            es,
            writeback_sentinel_alloc,
            demote_sentinel_alloc,
            hotspot_alloc,
            cache_alloc,
            hotspot_hit_bits: vec![false; nr_hotspot_blocks as usize],
            cache_hit_bits: vec![false; cache_size as usize],
            hotspot,
            clean: Queue::new(NR_CACHE_LEVELS),
            dirty: Queue::new(NR_CACHE_LEVELS),
            hotspot_stats: Stats::new(NR_HOTSPOT_LEVELS),
            cache_stats: Stats::new(NR_CACHE_LEVELS),
            ticks: 0,
            table: HashTable::new(cache_size),
            hotspot_table: HashTable::new(nr_hotspot_blocks),
            current_writeback_sentinels: false,
            next_writeback_period: 0,
            current_demote_sentinels: false,
            next_demote_period: 0,
            write_promote_level: NR_HOTSPOT_LEVELS,
            read_promote_level: NR_HOTSPOT_LEVELS,
            next_hotspot_period: jiffies,
            next_cache_period: jiffies,
            bg_work: BackgroundTracker::new(MAX_BACKGROUND_WORK),
            migrations_allowed,
            cleaner,
        };
        mq.sentinels_init(jiffies);
        mq
    }

    fn jiffies_at(hz: u32, now: Nanos) -> u64 {
        (now as u128 * hz as u128 / 1_000_000_000) as u64
    }

    fn jiffies(&self, now: Nanos) -> u64 {
        Self::jiffies_at(self.params.hz, now)
    }

    fn secs(&self, s: u64) -> u64 {
        s * self.params.hz as u64
    }

    // ---- sentinels ----

    fn sentinel(alloc: &EntryAlloc, level: u32, which: bool) -> u32 {
        alloc.entry(if which { level } else { NR_CACHE_LEVELS + level })
    }

    fn sentinels_init(&mut self, jiffies: u64) {
        self.next_writeback_period = jiffies + self.secs(WRITEBACK_PERIOD_SECS);
        self.next_demote_period = jiffies + self.secs(DEMOTE_PERIOD_SECS);
        for which in [false, true] {
            self.current_writeback_sentinels = which;
            self.current_demote_sentinels = which;
            for level in 0..NR_CACHE_LEVELS {
                let s = Self::sentinel(&self.writeback_sentinel_alloc, level, which);
                self.es.get_mut(s).level = level;
                self.dirty.push(&mut self.es, s);
                let s = Self::sentinel(&self.demote_sentinel_alloc, level, which);
                self.es.get_mut(s).level = level;
                self.clean.push(&mut self.es, s);
            }
        }
    }

    fn update_sentinels(&mut self, jiffies: u64) {
        if time_after(jiffies, self.next_writeback_period) {
            self.next_writeback_period = jiffies + self.secs(WRITEBACK_PERIOD_SECS);
            self.current_writeback_sentinels = !self.current_writeback_sentinels;
            for level in 0..NR_CACHE_LEVELS {
                let s =
                    Self::sentinel(&self.writeback_sentinel_alloc, level, self.current_writeback_sentinels);
                self.dirty.del(&mut self.es, s);
                self.dirty.push(&mut self.es, s);
            }
        }
        if time_after(jiffies, self.next_demote_period) {
            self.next_demote_period = jiffies + self.secs(DEMOTE_PERIOD_SECS);
            self.current_demote_sentinels = !self.current_demote_sentinels;
            for level in 0..NR_CACHE_LEVELS {
                let s = Self::sentinel(&self.demote_sentinel_alloc, level, self.current_demote_sentinels);
                self.clean.del(&mut self.es, s);
                self.clean.push(&mut self.es, s);
            }
        }
    }

    // ---- cache entries on the clean/dirty queues ----

    fn del_queue(&mut self, e: u32) {
        let q = if self.es.get(e).dirty { &mut self.dirty } else { &mut self.clean };
        q.del(&mut self.es, e);
    }

    fn push_queue(&mut self, e: u32) {
        let q = if self.es.get(e).dirty { &mut self.dirty } else { &mut self.clean };
        q.push(&mut self.es, e);
    }

    fn push_queue_front(&mut self, e: u32) {
        let q = if self.es.get(e).dirty { &mut self.dirty } else { &mut self.clean };
        q.push_front(&mut self.es, e);
    }

    fn infer_cblock(&self, e: u32) -> u32 {
        self.cache_alloc.index_of(e)
    }

    /// A hit's requeue (`requeue`): the first hit of a cache period moves
    /// the entry up one level; entries with pending work are off the queues.
    fn requeue(&mut self, e: u32) {
        if self.es.get(e).pending_work {
            return;
        }
        let cblock = self.infer_cblock(e) as usize;
        if std::mem::replace(&mut self.cache_hit_bits[cblock], true) {
            return;
        }
        if !self.es.get(e).dirty {
            self.clean.requeue(&mut self.es, e, 1, None);
            return;
        }
        let level = self.es.get(e).level;
        let cur = self.current_writeback_sentinels;
        let s1 = Self::sentinel(&self.writeback_sentinel_alloc, level, !cur);
        let s2 = Self::sentinel(&self.writeback_sentinel_alloc, level, cur);
        self.dirty.requeue(&mut self.es, e, 1, Some((s1, s2)));
    }

    // ---- periods ----

    fn update_promote_levels(&mut self) {
        let level = stats::promote_level(self.cache_alloc.is_empty(), &self.cache_stats, &self.hotspot_stats);
        self.read_promote_level = level;
        self.write_promote_level = level;
    }

    fn end_hotspot_period(&mut self, jiffies: u64) {
        self.hotspot_hit_bits.fill(false);
        self.update_promote_levels();
        if time_after(jiffies, self.next_hotspot_period) {
            self.hotspot_level_jump = stats::level_jump(&self.hotspot_stats);
            self.hotspot.redistribute(&mut self.es);
            self.hotspot_stats.reset();
            self.next_hotspot_period = jiffies + self.secs(HOTSPOT_UPDATE_PERIOD_SECS);
        }
    }

    fn end_cache_period(&mut self, jiffies: u64) {
        if time_after(jiffies, self.next_cache_period) {
            self.cache_hit_bits.fill(false);
            self.dirty.redistribute(&mut self.es);
            self.clean.redistribute(&mut self.es);
            self.cache_stats.reset();
            self.next_cache_period = jiffies + self.secs(CACHE_UPDATE_PERIOD_SECS);
        }
    }

    // ---- targets and background work ----

    fn clean_target_met(&self, idle: bool) -> bool {
        if idle || self.cleaner {
            self.dirty.size() == 0
        } else {
            true
        }
    }

    fn free_target_met(&self) -> bool {
        let nr_free = self.params.cache_size - self.cache_alloc.nr_allocated;
        let target = (self.params.cache_size as u64 * FREE_TARGET as u64 / 100) as u32;
        nr_free + self.bg_work.nr_demotions_queued() >= target
    }

    fn mark_pending(&mut self, e: u32) {
        let ent = self.es.get_mut(e);
        assert!(!ent.sentinel && ent.allocated && !ent.pending_work);
        ent.pending_work = true;
    }

    fn clear_pending(&mut self, e: u32) {
        let ent = self.es.get_mut(e);
        assert!(ent.pending_work, "clearing pending work that is not pending");
        ent.pending_work = false;
    }

    fn work_for(&self, op: PolicyOp, e: u32) -> PolicyWork {
        PolicyWork { op, oblock: self.es.get(e).oblock, cblock: self.infer_cblock(e) }
    }

    /// Queues a writeback of the oldest dirty entry (`queue_writeback`),
    /// crossing sentinels only when `idle`.
    fn queue_writeback(&mut self, idle: bool) {
        let Some(e) = self.dirty.peek(&self.es, NR_CACHE_LEVELS, idle) else { return };
        self.mark_pending(e);
        self.dirty.del(&mut self.es, e);
        let work = self.work_for(PolicyOp::Writeback, e);
        if self.bg_work.queue(work, false).is_err() {
            self.clear_pending(e);
            self.dirty.push_front(&mut self.es, e);
        }
    }

    /// Queues a demotion of the oldest clean entry of the lower half of
    /// the levels, or a writeback if there is none (`queue_demotion`).
    fn queue_demotion(&mut self) {
        if !self.migrations_allowed {
            return; // the kernel's WARN_ON_ONCE
        }
        let Some(e) = self.clean.peek(&self.es, NR_CACHE_LEVELS / 2, true) else {
            if !self.clean_target_met(true) {
                self.queue_writeback(false);
            }
            return;
        };
        self.mark_pending(e);
        self.clean.del(&mut self.es, e);
        let work = self.work_for(PolicyOp::Demote, e);
        if self.bg_work.queue(work, false).is_err() {
            self.clear_pending(e);
            self.clean.push_front(&mut self.es, e);
        }
    }

    /// Reserves a cache block and queues (or, with `issue_now`, hands back)
    /// a promotion of `oblock` (`queue_promotion`). A full cache queues a
    /// demotion instead, if the free target is not met.
    fn queue_promotion(&mut self, oblock: u64, issue_now: bool) -> Option<PolicyWork> {
        if !self.migrations_allowed {
            return None;
        }
        if self.cache_alloc.is_empty() {
            if !self.free_target_met() {
                self.queue_demotion();
            }
            return None;
        }
        if self.bg_work.promotion_already_present(oblock) {
            return None;
        }
        let e = self.cache_alloc.alloc(&mut self.es).expect("allocator not empty");
        self.es.get_mut(e).pending_work = true;
        let work = PolicyWork { op: PolicyOp::Promote, oblock, cblock: self.infer_cblock(e) };
        match self.bg_work.queue(work, issue_now) {
            Ok(w) => w,
            Err(_) => {
                self.cache_alloc.free(&mut self.es, e);
                None
            }
        }
    }

    /// Whether a miss is promoted (`should_promote`): a write that may
    /// overwrite a whole block is promoted at once while a cache block is
    /// free; otherwise the hotspot entry must have reached the promote level.
    fn should_promote(&self, hs_e: u32, dir: DataDir, fast_promote: bool) -> bool {
        let level = self.es.get(hs_e).level;
        match dir {
            DataDir::Write => {
                (!self.cache_alloc.is_empty() && fast_promote) || level >= self.write_promote_level
            }
            DataDir::Read => level >= self.read_promote_level,
        }
    }

    /// Counts a miss against the hotspot block holding `b`
    /// (`update_hotspot_queue`).
    fn update_hotspot_queue(&mut self, b: u64) -> u32 {
        let hb = b / self.cache_blocks_per_hotspot_block as u64;
        if let Some(e) = self.hotspot_table.lookup(&mut self.es, hb) {
            self.hotspot_stats.level_accessed(self.es.get(e).level);
            let hi = self.hotspot_alloc.index_of(e) as usize;
            let seen = std::mem::replace(&mut self.hotspot_hit_bits[hi], true);
            let extra = if seen { 0 } else { self.hotspot_level_jump };
            self.hotspot.requeue(&mut self.es, e, extra, None);
            return e;
        }
        self.hotspot_stats.miss();
        let e = match self.hotspot_alloc.alloc(&mut self.es) {
            Some(e) => e,
            None => {
                let e = self.hotspot.pop(&mut self.es).expect("hotspot queue holds every hotspot entry");
                self.hotspot_table.remove(&mut self.es, e);
                let hi = self.hotspot_alloc.index_of(e) as usize;
                self.hotspot_hit_bits[hi] = false;
                e
            }
        };
        self.es.get_mut(e).oblock = hb;
        self.hotspot.push(&mut self.es, e);
        self.hotspot_table.insert(&mut self.es, e);
        e
    }

    /// `__lookup`: (cblock on a hit, work handed back, background_queued).
    fn lookup_inner(
        &mut self,
        oblock: u64,
        dir: DataDir,
        fast_copy: bool,
        issue_now: bool,
    ) -> (Option<u32>, Option<PolicyWork>, bool) {
        if let Some(e) = self.table.lookup(&mut self.es, oblock) {
            self.cache_stats.level_accessed(self.es.get(e).level);
            self.requeue(e);
            return (Some(self.infer_cblock(e)), None, false);
        }
        self.cache_stats.miss();
        let hs_e = self.update_hotspot_queue(oblock);
        if self.should_promote(hs_e, dir, fast_copy) {
            let work = self.queue_promotion(oblock, issue_now);
            return (None, work, true);
        }
        (None, None, false)
    }

    fn cache_entry(&self, cblock: u32) -> u32 {
        assert!(cblock < self.params.cache_size, "cblock {cblock} beyond the cache");
        self.cache_alloc.entry(cblock)
    }

    fn set_clear_dirty(&mut self, cblock: u32, set: bool) {
        let e = self.cache_entry(cblock);
        assert!(self.es.get(e).allocated, "dirty state of unmapped cblock {cblock}");
        if self.es.get(e).pending_work {
            self.es.get_mut(e).dirty = set;
        } else {
            self.del_queue(e);
            self.es.get_mut(e).dirty = set;
            self.push_queue(e);
        }
    }
}

pub mod inspect;
pub mod ops;
