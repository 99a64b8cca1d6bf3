//! The checker's expected data reference counts: one counter per data
//! block, kept in chunks of [`CHUNK_BLOCKS`] allocated when a block of
//! theirs is first referenced.
//!
//! A mapping tree walk counts a reference for every mapping, millions on
//! a large pool; a counter found by two indexings costs a fraction of a
//! search tree's insert, and a chunk's 1 KiB of counters a fraction of
//! its nodes. The space map's second pass reads them back a bitmap's
//! worth at a time ([`DataCounts::fill`]).
//!
//! A counter is one byte: almost every data block is referenced by one
//! to a few devices, and a pool of 16M data blocks then costs 16 MiB, not
//! 64. A count past [`u8::MAX`] keeps the byte at the maximum and the rest
//! in a sparse map of overflows (many snapshots sharing one block).
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
    chunks: Vec<Option<Box<[u8; CHUNK_BLOCKS]>>>,
    /// Counts of blocks past the directly addressed chunks.
    beyond: BTreeMap<u64, u32>,
    /// For a block whose byte is saturated: its count less [`u8::MAX`].
    overflow: BTreeMap<u64, u32>,
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
        if *c < u8::MAX {
            *c += 1;
        } else {
            let o = self.overflow.entry(block).or_insert(0);
            *o = o.saturating_add(1);
        }
    }

    /// The count kept for `block` whose byte in its chunk is `byte`.
    #[cfg(test)]
    fn full_count(&self, block: u64, byte: u8) -> u32 {
        if byte < u8::MAX {
            u32::from(byte)
        } else {
            u32::from(u8::MAX).saturating_add(self.overflow.get(&block).copied().unwrap_or(0))
        }
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
            .map_or(0, |c| self.full_count(block, c[block as usize % CHUNK_BLOCKS]))
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
                break;
            }
            if let Some(Some(counters)) = self.chunks.get(chunk as usize) {
                let from = (b % CHUNK_BLOCKS as u64) as usize;
                let n = (chunk_end - b) as usize;
                let at = (b - first) as usize;
                for (o, &c) in out[at..at + n].iter_mut().zip(&counters[from..from + n]) {
                    *o = u32::from(c);
                }
            }
            b = chunk_end;
        }
        for (&k, &extra) in self.overflow.range(first..end) {
            out[(k - first) as usize] = u32::from(u8::MAX).saturating_add(extra);
        }
    }

    /// Every block with a non-zero count and its count, in block order.
    #[cfg(test)]
    pub fn iter(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        let direct = self.chunks.iter().enumerate().flat_map(move |(i, c)| {
            c.iter().flat_map(move |counters| {
                counters.iter().enumerate().filter(|(_, &n)| n != 0).map(move |(k, &n)| {
                    let b = (i * CHUNK_BLOCKS + k) as u64;
                    (b, self.full_count(b, n))
                })
            })
        });
        direct.chain(self.beyond.iter().map(|(&b, &c)| (b, c)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_count_past_a_byte_is_kept_whole() {
        let mut counts = DataCounts::new();
        for _ in 0..300 {
            counts.add(1025);
        }
        counts.add(1026);
        assert_eq!(counts.get(1025), 300);
        let mut out = [0u32; 4];
        counts.fill(1024, &mut out);
        assert_eq!(out, [0, 300, 1, 0]);
        assert_eq!(counts.iter().collect::<Vec<_>>(), vec![(1025, 300), (1026, 1)]);
    }

    proptest! {
        /// The counts read back (one by one, by range, in order) are a
        /// search tree's counting the same references, near and far.
        #[test]
        fn counts_read_back_as_a_map_counting_the_same(
            refs in prop::collection::vec(
                prop_oneof![4 => 0u64..5000, 4 => Just(77u64), 1 => Just(1500u64), 1 => (DIRECT_CHUNKS * CHUNK_BLOCKS as u64 - 3000)..(DIRECT_CHUNKS * CHUNK_BLOCKS as u64 + 3000), 1 => Just(u64::MAX)],
                0..1500,
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
