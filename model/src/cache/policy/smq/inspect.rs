//! Read-only views of smq's state for tests, traces and the simulator, and
//! a consistency check of its lists.

use super::{SmqParams, SmqPolicy, NR_CACHE_LEVELS};
use crate::cache::policy::background::{BackgroundTracker, PolicyOp};

/// A cache block's entry as the policy holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheEntryView {
    /// The cache block.
    pub cblock: u32,
    /// The origin block (meaningful once promoted or loaded).
    pub oblock: u64,
    /// The level in its queue.
    pub level: u32,
    /// Dirty (on the dirty queue) or clean.
    pub dirty: bool,
    /// Background work is queued or in flight (the entry is on no queue).
    pub pending_work: bool,
}

/// One element of a clean or dirty queue level, head (oldest) first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueItem {
    /// A cache block.
    Block(u32),
    /// A sentinel: which set (the kernel's `which` flag) it belongs to.
    Sentinel(bool),
}

impl SmqPolicy {
    /// The creation parameters.
    pub fn params(&self) -> &SmqParams {
        &self.params
    }

    /// Hotspot block size in sectors.
    pub fn hotspot_block_size(&self) -> u64 {
        self.hotspot_block_size
    }

    /// Number of hotspot entries.
    pub fn nr_hotspot_blocks(&self) -> u32 {
        self.nr_hotspot_blocks
    }

    /// The read and write promote levels.
    pub fn promote_levels(&self) -> (u32, u32) {
        (self.read_promote_level, self.write_promote_level)
    }

    /// Levels a hotspot entry climbs on its first hit in a tick.
    pub fn hotspot_level_jump(&self) -> u32 {
        self.hotspot_level_jump
    }

    /// Whether promotions and demotions are allowed.
    pub fn migrations_allowed(&self) -> bool {
        self.migrations_allowed
    }

    /// Ticks seen.
    pub fn ticks(&self) -> u32 {
        self.ticks
    }

    /// The background tracker.
    pub fn tracker(&self) -> &BackgroundTracker {
        &self.bg_work
    }

    /// The background tracker, for fault injection
    /// ([`BackgroundTracker::fail_next_allocs`]).
    pub fn tracker_mut(&mut self) -> &mut BackgroundTracker {
        &mut self.bg_work
    }

    /// Non-sentinel entries on the clean and dirty queues.
    pub fn queue_sizes(&self) -> (u32, u32) {
        (self.clean.size(), self.dirty.size())
    }

    /// Cache block `cblock`'s entry, if allocated.
    pub fn entry(&self, cblock: u32) -> Option<CacheEntryView> {
        let i = self.cache_entry(cblock);
        let e = self.es.get(i);
        e.allocated.then_some(CacheEntryView {
            cblock,
            oblock: e.oblock,
            level: e.level,
            dirty: e.dirty,
            pending_work: e.pending_work,
        })
    }

    /// The cache block mapping `oblock` (a mapping whose promotion has
    /// completed or that was loaded), without touching any state.
    pub fn mapped(&self, oblock: u64) -> Option<u32> {
        let b = self.table.bucket(oblock);
        self.table.chain(&self.es, b).find(|&e| self.es.get(e).oblock == oblock).map(|e| self.infer_cblock(e))
    }

    /// Level `level` of the clean (`dirty` false) or dirty queue, oldest
    /// first, sentinels included.
    pub fn queue_level(&self, dirty: bool, level: u32) -> Vec<QueueItem> {
        let q = if dirty { &self.dirty } else { &self.clean };
        let alloc = if dirty { &self.writeback_sentinel_alloc } else { &self.demote_sentinel_alloc };
        q.level(level)
            .iter(&self.es)
            .map(|i| {
                if self.es.get(i).sentinel {
                    QueueItem::Sentinel(alloc.index_of(i) < NR_CACHE_LEVELS)
                } else {
                    QueueItem::Block(self.infer_cblock(i))
                }
            })
            .collect()
    }

    /// The cache blocks of the clean or dirty queue in demotion / writeback
    /// order (lowest level first, oldest first), sentinels skipped.
    pub fn queue_order(&self, dirty: bool) -> Vec<u32> {
        (0..NR_CACHE_LEVELS)
            .flat_map(|l| self.queue_level(dirty, l))
            .filter_map(|q| match q {
                QueueItem::Block(c) => Some(c),
                QueueItem::Sentinel(_) => None,
            })
            .collect()
    }

    /// The hotspot level of the hotspot block holding `oblock`, if tracked.
    pub fn hotspot_level(&self, oblock: u64) -> Option<u32> {
        let hb = oblock / self.cache_blocks_per_hotspot_block as u64;
        let b = self.hotspot_table.bucket(hb);
        self.hotspot_table
            .chain(&self.es, b)
            .find(|&e| self.es.get(e).oblock == hb)
            .map(|e| self.es.get(e).level)
    }

    /// Checks the structure: queue counts match their lists, every entry's
    /// level is the level it is listed at, each allocated cache entry is on
    /// the queue matching its dirty bit unless it has pending work, every
    /// mapped entry is in the hash table, every sentinel is on its queue.
    /// Returns a description of the first inconsistency.
    pub fn check(&self) -> Result<(), String> {
        let mut on_queue = vec![None; self.params.cache_size as usize];
        for (dirty, q) in [(false, &self.clean), (true, &self.dirty)] {
            let mut n = 0;
            let mut sentinels = 0;
            for level in 0..NR_CACHE_LEVELS {
                let mut per_level = 0;
                for i in q.level(level).iter(&self.es) {
                    let e = self.es.get(i);
                    if e.level != level {
                        return Err(format!("entry {i} at level {level} says {}", e.level));
                    }
                    if e.sentinel {
                        sentinels += 1;
                        continue;
                    }
                    per_level += 1;
                    let c = self.infer_cblock(i) as usize;
                    if on_queue[c].replace(dirty).is_some() {
                        return Err(format!("cblock {c} queued twice"));
                    }
                    if e.dirty != dirty || e.pending_work || !e.allocated {
                        return Err(format!("cblock {c} on the wrong queue or not allocated"));
                    }
                }
                if per_level != q.level(level).nr_elts {
                    return Err(format!("level {level} count {} != {per_level}", q.level(level).nr_elts));
                }
                n += per_level;
            }
            if n != q.size() || sentinels != 2 * NR_CACHE_LEVELS {
                return Err(format!("queue size {} != {n} or {sentinels} sentinels", q.size()));
            }
        }
        let mut allocated = 0;
        for c in 0..self.params.cache_size {
            let i = self.cache_entry(c);
            let e = self.es.get(i);
            if !e.allocated {
                continue;
            }
            allocated += 1;
            let queued = on_queue[c as usize].is_some();
            if e.pending_work == queued {
                return Err(format!("cblock {c}: pending {} but queued {queued}", e.pending_work));
            }
            if self.mapped(e.oblock) != Some(c) {
                let promoting = self
                    .bg_work
                    .issued()
                    .chain(self.bg_work.queued())
                    .any(|w| w.cblock == c && w.op == PolicyOp::Promote);
                if !promoting {
                    return Err(format!("cblock {c} (oblock {}) not in the hash table", e.oblock));
                }
            }
        }
        if allocated != self.cache_alloc.nr_allocated {
            return Err(format!("{allocated} allocated, allocator says {}", self.cache_alloc.nr_allocated));
        }
        Ok(())
    }
}
