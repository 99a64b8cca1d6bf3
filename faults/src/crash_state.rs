//! Crash states of a [`SimDisk`] at the current moment: the durable image
//! plus what a power cut keeps of the volatile cache.
//!
//! A crash state is just bytes. The simulator rebuilds a fresh
//! [`SimDisk::from_image`] from it, so armed faults and permanent bad
//! sectors do not survive a crash (a simplification: a real medium error
//! outlives a power cycle).

use std::collections::BTreeSet;

use dmsim_model::block_device::SECTOR_SIZE;
use dmsim_traces::CrashMode;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::disk::{PendingWrite, SimDisk};
use crate::image::Image;

/// What a crash state kept of the volatile cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CrashSummary {
    /// Unflushed (non-FUA) writes that reached the disk, a torn one
    /// included.
    pub kept: u32,
    /// Unflushed (non-FUA) writes there were to choose from.
    pub unflushed: u32,
    /// One kept write reached the disk only in part.
    pub torn: bool,
}

/// Which unflushed writes a crash keeps, and which one is torn.
struct Choice {
    /// One entry per non-FUA write since the flush, in order.
    kept: Vec<bool>,
    /// Index among the non-FUA writes, and the sectors of it that landed.
    torn: Option<(usize, Vec<bool>)>,
}

impl SimDisk {
    /// The disk a power cut right now could leave, chosen by `mode` and
    /// `seed`: the durable image, plus in order the unflushed writes the mode
    /// keeps. FUA writes are always kept, and every write applies in its
    /// order, so where writes overlap the later kept one wins.
    ///
    /// - [`CrashMode::LoseAll`]: none (the durable image).
    /// - [`CrashMode::KeepAll`]: all (equals [`SimDisk::visible`]).
    /// - [`CrashMode::Prefix`]: the first `k` of them, `k` seeded in `0..=n`.
    /// - [`CrashMode::Subset`]: each one with probability one half.
    /// - [`CrashMode::Torn`]: as `Subset`, then one kept write of at least two
    ///   sectors (if there is one) keeps only a seeded non-empty proper
    ///   subset of its sectors.
    ///
    /// The same disk state, mode and seed always give the same result.
    pub fn crash_state(&self, mode: CrashMode, seed: u32) -> (Vec<u8>, CrashSummary) {
        let (image, summary) = self.crash_image_state(mode, seed);
        (image.to_vec(), summary)
    }

    /// [`Self::crash_state`] as an [`Image`] sharing the durable image's
    /// chunks: its cost is the writes it keeps, not the disk's size.
    pub fn crash_image_state(&self, mode: CrashMode, seed: u32) -> (Image, CrashSummary) {
        let mut rng = ChaCha8Rng::seed_from_u64(u64::from(seed));
        let pending = self.since_flush();
        let sizes: Vec<u64> = pending.iter().filter(|w| !w.fua).map(PendingWrite::nr_sectors).collect();
        let n = sizes.len();
        let kept: Vec<bool> = match mode {
            CrashMode::LoseAll => vec![false; n],
            CrashMode::KeepAll => vec![true; n],
            CrashMode::Prefix => {
                let k = rng.gen_range(0..=n);
                (0..n).map(|i| i < k).collect()
            }
            CrashMode::Subset | CrashMode::Torn => (0..n).map(|_| rng.gen_bool(0.5)).collect(),
        };
        let torn = if mode == CrashMode::Torn {
            let candidates: Vec<usize> = (0..n).filter(|&i| kept[i] && sizes[i] >= 2).collect();
            if candidates.is_empty() {
                None
            } else {
                let i = candidates[rng.gen_range(0..candidates.len())];
                Some((i, proper_subset(sizes[i] as usize, &mut rng)))
            }
        } else {
            None
        };
        let choice = Choice { kept, torn };
        let image = self.apply(&choice);
        (image, summary(&choice))
    }

    /// Every crash state a power cut right now could leave without tearing:
    /// the durable image plus each subset of the unflushed writes (applied
    /// in order), when there are at most `max_unflushed` of them (and fewer
    /// than 64); otherwise `None`. This is the bounded-exhaustive mode.
    ///
    /// Identical images are listed once, with the summary of the first
    /// subset that gave it. Subsets are enumerated as binary numbers (bit
    /// `i` keeps the `i`th unflushed write), so the first state is always the
    /// durable image and the result is deterministic.
    pub fn crash_states_exhaustive(&self, max_unflushed: usize) -> Option<Vec<(Vec<u8>, CrashSummary)>> {
        let n = self.unflushed();
        if n > max_unflushed || n >= 64 {
            return None;
        }
        // Only the sectors some pending write touches can differ between
        // states: deduplicate on those.
        let mut touched: Vec<(usize, usize)> = self
            .since_flush()
            .iter()
            .map(|w| {
                let s = (w.sector * SECTOR_SIZE) as usize;
                (s, s + w.data.len())
            })
            .collect();
        touched.sort_unstable();
        let mut ranges: Vec<(usize, usize)> = Vec::new();
        for (s, e) in touched {
            match ranges.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => ranges.push((s, e)),
            }
        }
        let mut seen: BTreeSet<Vec<u8>> = BTreeSet::new();
        let mut out = Vec::new();
        for mask in 0..(1u64 << n) {
            let choice = Choice { kept: (0..n).map(|i| mask >> i & 1 == 1).collect(), torn: None };
            let image = self.apply(&choice);
            let key: Vec<u8> = ranges.iter().flat_map(|&(s, e)| image.range(s..e)).collect();
            if seen.insert(key) {
                out.push((image.to_vec(), summary(&choice)));
            }
        }
        Some(out)
    }

    /// The durable image with the writes since the flush replayed in order:
    /// FUA ones always, the others as `choice` says.
    fn apply(&self, choice: &Choice) -> Image {
        let mut image = self.durable().clone();
        let sector = SECTOR_SIZE as usize;
        let mut n = 0;
        for w in self.since_flush() {
            let start = w.sector as usize * sector;
            if w.fua {
                image.write(start, &w.data);
                continue;
            }
            let this = n;
            n += 1;
            if !choice.kept[this] {
                continue;
            }
            match &choice.torn {
                Some((t, sectors)) if *t == this => {
                    for (k, _) in sectors.iter().enumerate().filter(|(_, &keep)| keep) {
                        let (s, e) = (k * sector, (k + 1) * sector);
                        image.write(start + s, &w.data[s..e]);
                    }
                }
                _ => image.write(start, &w.data),
            }
        }
        image
    }
}

fn summary(choice: &Choice) -> CrashSummary {
    CrashSummary {
        kept: choice.kept.iter().filter(|&&k| k).count() as u32,
        unflushed: choice.kept.len() as u32,
        torn: choice.torn.is_some(),
    }
}

/// A seeded non-empty proper subset of `n >= 2` sectors.
fn proper_subset(n: usize, rng: &mut impl Rng) -> Vec<bool> {
    let mut keep: Vec<bool> = (0..n).map(|_| rng.gen_bool(0.5)).collect();
    if keep.iter().all(|&k| k == keep[0]) {
        let i = rng.gen_range(0..n);
        keep[i] = !keep[i];
    }
    keep
}
