//! The checker's expected data reference counts: one counter per data
//! block, kept in chunks of [`CHUNK_BLOCKS`] allocated when a block of
//! theirs is first referenced.
//!
//! A mapping tree walk counts a reference for every mapping, millions on
//! a large pool; a counter found by two indexings costs a fraction of a
//! search tree's insert, and a chunk's 4 KiB of counters a fraction of
//! its nodes. The space map's second pass reads them back a bitmap's
//! worth at a time ([`DataCounts::fill`]).
//!
//! The chunk table grows only as far as the highest chunk referenced, and
//! no further than [`DIRECT_CHUNKS`]: a reference beyond (possible only
//! with a space map whose on-disk size is that large) is kept in a sparse
//! map, so that no on-disk value sizes an allocation.

use std::collections::BTreeMap;

/// Data blocks per chunk of counters.
pub const CHUNK_BLOCKS: usize = 1024;

/// Chunks addressed directly (blocks below 2^30: 8 MiB of table at most).
const DIRECT_CHUNKS: u64 = 1 << 20;

/// Per-block reference counts (see the module's documentation).
#[derive(Debug, Default, Clone)]
pub struct DataCounts {
    chunks: Vec<Option<Box<[u32; CHUNK_BLOCKS]>>>,
    beyond: BTreeMap<u64, u32>,
}

impl DataCounts {
    /// No references counted.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one more reference to `block` (saturating).
    pub fn add(&mut self, block: u64) {
        let chunk = block / CHUNK_BLOCKS as u64;
        if chunk >= DIRECT_CHUNKS {
            let c = self.beyond.entry(block).or_insert(0);
            *c = c.saturating_add(1);
            return;
        }
        let chunk = chunk as usize;
        if chunk >= self.chunks.len() {
            self.chunks.resize_with(chunk + 1, || None);
        }
        let counters = self.chunks[chunk].get_or_insert_with(|| Box::new([0; CHUNK_BLOCKS]));
        let c = &mut counters[block as usize % CHUNK_BLOCKS];
        *c = c.saturating_add(1);
    }

    /// The count of `block`.
    #[cfg(test)]
    pub fn get(&self, block: u64) -> u32 {
        let chunk = block / CHUNK_BLOCKS as u64;
        if chunk >= DIRECT_CHUNKS {
            return self.beyond.get(&block).copied().unwrap_or(0);
        }
        self.chunks
            .get(chunk as usize)
            .and_then(|c| c.as_ref())
            .map_or(0, |c| c[block as usize % CHUNK_BLOCKS])
    }

    /// Writes the counts of blocks `first..first + out.len()` into `out`.
    pub fn fill(&self, first: u64, out: &mut [u32]) {
        out.fill(0);
        let end = first.saturating_add(out.len() as u64);
        let mut b = first;
        while b < end {
            let chunk = b / CHUNK_BLOCKS as u64;
            let chunk_end = chunk.saturating_add(1).saturating_mul(CHUNK_BLOCKS as u64).min(end);
            if chunk >= DIRECT_CHUNKS {
                for (&k, &c) in self.beyond.range(b..end) {
                    out[(k - first) as usize] = c;
                }
                return;
            }
            if let Some(Some(counters)) = self.chunks.get(chunk as usize) {
                let from = (b % CHUNK_BLOCKS as u64) as usize;
                let n = (chunk_end - b) as usize;
                let at = (b - first) as usize;
                out[at..at + n].copy_from_slice(&counters[from..from + n]);
            }
            b = chunk_end;
        }
    }

    /// Every block with a non-zero count and its count, in block order.
    #[cfg(test)]
    pub fn iter(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        let direct = self.chunks.iter().enumerate().flat_map(|(i, c)| {
            c.iter().flat_map(move |counters| {
                counters
                    .iter()
                    .enumerate()
                    .filter(|(_, &n)| n != 0)
                    .map(move |(k, &n)| ((i * CHUNK_BLOCKS + k) as u64, n))
            })
        });
        direct.chain(self.beyond.iter().map(|(&b, &c)| (b, c)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The counts read back (one by one, by range, in order) are a
        /// search tree's counting the same references, near and far.
        #[test]
        fn counts_read_back_as_a_map_counting_the_same(
            refs in prop::collection::vec(
                prop_oneof![0u64..5000, (DIRECT_CHUNKS * CHUNK_BLOCKS as u64 - 3000)..(DIRECT_CHUNKS * CHUNK_BLOCKS as u64 + 3000), Just(u64::MAX)],
                0..300,
            ),
            window in (0u64..6000, 0usize..20_000),
        ) {
            let mut counts = DataCounts::new();
            let mut map = BTreeMap::new();
            for &b in &refs {
                counts.add(b);
                *map.entry(b).or_insert(0u32) += 1;
            }
            for &b in &refs {
                prop_assert_eq!(counts.get(b), map[&b]);
            }
            prop_assert_eq!(counts.iter().collect::<Vec<_>>(), map.iter().map(|(&b, &c)| (b, c)).collect::<Vec<_>>());
            for first in [window.0, DIRECT_CHUNKS * CHUNK_BLOCKS as u64 - 2000 + window.0] {
                let mut out = vec![7u32; window.1];
                counts.fill(first, &mut out);
                for (i, &c) in out.iter().enumerate() {
                    prop_assert_eq!(c, map.get(&(first + i as u64)).copied().unwrap_or(0));
                }
            }
        }
    }
}
