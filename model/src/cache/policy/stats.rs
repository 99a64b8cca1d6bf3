//! smq's hit statistics and what it derives from them: the confidence in
//! the hotspot queue, the promote levels and the hotspot level jump.
//! Counters wrap as the kernel's `unsigned` arithmetic does.

/// Levels in the hotspot queue (`NR_HOTSPOT_LEVELS`).
pub const NR_HOTSPOT_LEVELS: u32 = 64;
/// Levels in the clean and dirty queues (`NR_CACHE_LEVELS`).
pub const NR_CACHE_LEVELS: u32 = 64;

const FP_SHIFT: u32 = 8;
const SIXTEENTH: u32 = 1 << (FP_SHIFT - 4);
const EIGHTH: u32 = 1 << (FP_SHIFT - 3);

/// Hit/miss counts of a queue (`struct stats`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Accesses at or above this level count as hits (3/4 of the levels).
    pub hit_threshold: u32,
    /// Hits since the last reset.
    pub hits: u32,
    /// Misses since the last reset.
    pub misses: u32,
}

/// How well a queue predicts accesses (`enum performance`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Performance {
    /// Hits below 1/16 of accesses.
    Poor,
    /// Hits below 1/8.
    Fair,
    /// Otherwise.
    Well,
}

impl Stats {
    /// Zero counts for a queue of `nr_levels` (`stats_init`).
    pub fn new(nr_levels: u32) -> Self {
        Stats { hit_threshold: nr_levels * 3 / 4, hits: 0, misses: 0 }
    }

    /// Clears the counts (`stats_reset`).
    pub fn reset(&mut self) {
        self.hits = 0;
        self.misses = 0;
    }

    /// An access to an entry at `level` (`stats_level_accessed`).
    pub fn level_accessed(&mut self, level: u32) {
        if level >= self.hit_threshold {
            self.hits = self.hits.wrapping_add(1);
        } else {
            self.misses = self.misses.wrapping_add(1);
        }
    }

    /// An access to a block not in the queue (`stats_miss`).
    pub fn miss(&mut self) {
        self.misses = self.misses.wrapping_add(1);
    }

    /// The confidence class (`stats_assess`): hits/(hits+misses) in 8-bit
    /// fixed point against 1/16 and 1/8; no accesses is "poor".
    pub fn assess(&self) -> Performance {
        let total = self.hits.wrapping_add(self.misses);
        let confidence = (self.hits << FP_SHIFT).checked_div(total).unwrap_or(0);
        if confidence < SIXTEENTH {
            Performance::Poor
        } else if confidence < EIGHTH {
            Performance::Fair
        } else {
            Performance::Well
        }
    }
}

/// The threshold the cache's own hit ratio would choose when the cache is
/// full (`default_promote_level`); overridden by the maximum with 64 in
/// [`promote_level`], so it never takes effect in 6.1.
pub fn default_promote_level(cache_stats: &Stats) -> u32 {
    const TABLE: [u32; 17] = [1, 1, 1, 2, 4, 6, 7, 8, 7, 6, 4, 4, 3, 3, 2, 2, 1];
    let total = cache_stats.hits.wrapping_add(cache_stats.misses);
    let index = (cache_stats.hits << 4).checked_div(total).unwrap_or(0);
    TABLE[index as usize]
}

/// The hotspot level a missed block's hotspot entry must reach to be
/// promoted (`update_promote_levels`; reads and writes use the same):
/// 64 − threshold, where the threshold is max(…, 64) = 64, divided by 4
/// for poor hotspot confidence and by 2 for fair — so 48, 32 or 0.
pub fn promote_level(cache_full: bool, cache_stats: &Stats, hotspot_stats: &Stats) -> u32 {
    let mut threshold = if cache_full { default_promote_level(cache_stats) } else { NR_HOTSPOT_LEVELS / 2 };
    threshold = threshold.max(NR_HOTSPOT_LEVELS);
    match hotspot_stats.assess() {
        Performance::Poor => threshold /= 4,
        Performance::Fair => threshold /= 2,
        Performance::Well => {}
    }
    NR_HOTSPOT_LEVELS - threshold
}

/// How many levels a hotspot entry climbs on its first hit in a period
/// (`update_level_jump`): 4, 2 or 1 for poor, fair, well.
pub fn level_jump(hotspot_stats: &Stats) -> u32 {
    match hotspot_stats.assess() {
        Performance::Poor => 4,
        Performance::Fair => 2,
        Performance::Well => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats(hits: u32, misses: u32) -> Stats {
        Stats { hit_threshold: 48, hits, misses }
    }

    #[test]
    fn confidence_classes() {
        assert_eq!(stats(0, 0).assess(), Performance::Poor);
        assert_eq!(stats(1, 16).assess(), Performance::Poor); // 256/17 = 15
        assert_eq!(stats(1, 15).assess(), Performance::Fair); // 16
        assert_eq!(stats(1, 8).assess(), Performance::Fair); // 28
        assert_eq!(stats(1, 7).assess(), Performance::Well); // 32
    }

    #[test]
    fn promote_level_is_48_32_or_0() {
        let c = stats(5, 5);
        assert_eq!(promote_level(false, &c, &stats(0, 0)), 48);
        assert_eq!(promote_level(true, &c, &stats(0, 0)), 48);
        assert_eq!(promote_level(true, &c, &stats(1, 10)), 32);
        assert_eq!(promote_level(false, &c, &stats(10, 1)), 0);
        assert_eq!(level_jump(&stats(0, 0)), 4);
        assert_eq!(level_jump(&stats(1, 10)), 2);
        assert_eq!(level_jump(&stats(10, 1)), 1);
        assert_eq!(default_promote_level(&stats(8, 8)), 7);
    }

    #[test]
    fn level_access_counts_against_three_quarters() {
        let mut s = Stats::new(64);
        assert_eq!(s.hit_threshold, 48);
        s.level_accessed(47);
        s.level_accessed(48);
        s.miss();
        assert_eq!((s.hits, s.misses), (1, 2));
    }
}
