//! Seeded workloads of pool metadata operations.
//!
//! Each seed draws a [`Shape`] from its own stream, so that the seeds of
//! the original random shape keep their operations: random messages and
//! provisioning over small ranges; a device grown past a leaf and shrunk by
//! discards between snapshots and commits ([`Shape::Shrink`]: leaves merged
//! at their thresholds, roots left with a single child while a snapshot
//! shares them); and a device grown to a three-level tree
//! ([`Shape::Deep`]: keys below its minimum after the root split, snapshot
//! chains sharing internal nodes, large discards and deletes, metadata
//! blocks shared three ways and more, whose counts live in the metadata
//! space map's own btree).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Thin device ids the workloads use.
pub const DEVICES: u64 = 6;
/// Virtual blocks per device the random shape touches.
pub const VBLOCKS: u64 = 4000;
/// Virtual blocks per device the deep shape can reach.
pub const DEEP_VBLOCKS: u64 = 1 << 17;
/// Mappings of the deep shape's first device, provisioned in order: past
/// the 63,000 or so at which its mapping tree gets a third level (a leaf
/// holds 252 mappings, and the insert's rebalancing into the left sibling
/// leaves sequentially filled leaves full, so the root's 252 children are
/// full before it splits).
pub const DEEP_MAPPINGS: std::ops::Range<u64> = 92_000..100_000;

/// What a seed's workload aims at (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Random messages and provisioning over small ranges.
    Random,
    /// One device grown to two or three leaves, shrunk by discards between
    /// snapshots, commits and provisioning below its lowest key.
    Shrink,
    /// One device grown to a three-level tree, then keys below its minimum,
    /// snapshot chains, large discards and deletes.
    Deep,
}

impl Shape {
    /// Every shape.
    pub const ALL: [Shape; 3] = [Shape::Random, Shape::Shrink, Shape::Deep];

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Shape::Random => "random",
            Shape::Shrink => "shrink",
            Shape::Deep => "deep",
        }
    }

    /// The shape called `name`.
    pub fn from_name(name: &str) -> Option<Shape> {
        Shape::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The shape of `seed`: five seeds in eight random, two shrink, one
    /// deep. Drawn from a stream of its own.
    pub fn of_seed(seed: u64) -> Shape {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7368_6170_655f_6d64);
        match rng.gen_range(0..8) {
            0..=4 => Shape::Random,
            5 | 6 => Shape::Shrink,
            _ => Shape::Deep,
        }
    }

    /// The highest virtual block (excluded) the shape provisions.
    pub fn vblocks(self) -> u64 {
        match self {
            Shape::Random | Shape::Shrink => VBLOCKS,
            Shape::Deep => DEEP_VBLOCKS,
        }
    }

    /// Whether the seed runs the checker after every operation, on the open
    /// transaction as a commit would write it: one seed in four, drawn
    /// after the shape.
    pub fn check_every_op(seed: u64) -> bool {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7368_6170_655f_6d64);
        let _shape = rng.gen_range(0..8);
        rng.gen_range(0..4) == 0
    }
}

/// One step of a metadata workload, as the pool would perform it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetadataOp {
    /// `create_thin` message.
    CreateThin(u64),
    /// `create_snap` message.
    CreateSnap {
        /// New device.
        dev: u64,
        /// Its origin.
        origin: u64,
    },
    /// `delete` message.
    Delete(u64),
    /// Writes provisioning `len` blocks from `vblock`.
    Provision {
        /// Device.
        dev: u64,
        /// First virtual block.
        vblock: u64,
        /// Blocks.
        len: u64,
    },
    /// A discard unmapping `len` blocks from `vblock`.
    Discard {
        /// Device.
        dev: u64,
        /// First virtual block.
        vblock: u64,
        /// Blocks.
        len: u64,
    },
    /// `set_transaction_id` message moving the id on by one.
    BumpTransactionId,
    /// `reserve_metadata_snap` message.
    ReserveMetadataSnap,
    /// `release_metadata_snap` message.
    ReleaseMetadataSnap,
    /// A commit (periodic, or for a FLUSH).
    Commit,
}

impl MetadataOp {
    /// Whether the pool treats this as a message (commits right after).
    pub fn is_message(&self) -> bool {
        !matches!(self, MetadataOp::Provision { .. } | MetadataOp::Discard { .. } | MetadataOp::Commit)
    }
}

/// A workload of `len` operations of `shape` drawn from `rng`.
pub fn generate_shaped(shape: Shape, rng: &mut impl Rng, len: usize) -> Vec<MetadataOp> {
    match shape {
        Shape::Random => generate(rng, len),
        Shape::Shrink => shrink(rng, len),
        Shape::Deep => deep(rng, len),
    }
}

/// The devices a shaped workload has made.
struct Devices {
    live: Vec<u64>,
}

impl Devices {
    fn pick(&self, rng: &mut impl Rng) -> u64 {
        self.live[rng.gen_range(0..self.live.len())]
    }

    /// A snapshot of `origin` under the lowest free id, while ids last;
    /// else a commit.
    fn snapshot(&mut self, origin: u64) -> MetadataOp {
        let Some(dev) = (0..DEVICES).find(|d| !self.live.contains(d)) else {
            return MetadataOp::Commit;
        };
        self.live.push(dev);
        MetadataOp::CreateSnap { dev, origin }
    }

    /// Deletes a live device, keeping at least one.
    fn delete(&mut self, rng: &mut impl Rng) -> MetadataOp {
        if self.live.len() < 2 {
            return MetadataOp::Commit;
        }
        let i = rng.gen_range(0..self.live.len());
        MetadataOp::Delete(self.live.remove(i))
    }
}

/// The messages that do not shape the trees.
fn other_message(rng: &mut impl Rng, held: &mut bool) -> MetadataOp {
    if rng.gen_bool(0.5) {
        return MetadataOp::BumpTransactionId;
    }
    *held = !*held;
    if *held {
        MetadataOp::ReserveMetadataSnap
    } else {
        MetadataOp::ReleaseMetadataSnap
    }
}

/// A virtual block at most `below` under `base` half of the time (a key
/// below the tree's lowest), else one in `base..base + total`.
fn below_or_within(rng: &mut impl Rng, base: u64, total: u64, below: u64) -> u64 {
    if rng.gen_bool(0.5) {
        base - rng.gen_range(1..=base.min(below))
    } else {
        base + rng.gen_range(0..total)
    }
}

/// [`Shape::Shrink`].
///
/// Two leaves merge when a removal's descent finds fewer than 170 mappings
/// in them; when that descent is the last of its discard, the root is left
/// with a single child until the next removal collapses it, and a snapshot
/// taken in between shares that child. So the device is first discarded
/// down to just above 170, and then mostly one block at a time, with
/// snapshots of the device last discarded.
fn shrink(rng: &mut impl Rng, len: usize) -> Vec<MetadataOp> {
    let base = rng.gen_range(50..2000);
    // Two leaves: 252 mappings fill one.
    let total = rng.gen_range(253..300);
    let first = total - rng.gen_range(171..176);
    let mut out = vec![
        MetadataOp::CreateThin(0),
        MetadataOp::Provision { dev: 0, vblock: base, len: total },
        MetadataOp::Commit,
        MetadataOp::Discard { dev: 0, vblock: base, len: first },
    ];
    let mut devs = Devices { live: vec![0] };
    let mut held = false;
    // Where each device's discards from the front have reached; a
    // snapshot starts where its origin is.
    let mut front = [first; DEVICES as usize];
    let mut last = 0;
    while out.len() < len {
        let dev = devs.pick(rng);
        let op = match rng.gen_range(0..100) {
            0..=44 => {
                let len = match rng.gen_range(0..20) {
                    0..=11 => 1,
                    12..=16 => rng.gen_range(2..10),
                    _ => rng.gen_range(10..45),
                };
                let vblock = if rng.gen_bool(0.8) {
                    let f = &mut front[dev as usize];
                    let at = *f;
                    *f += len;
                    base + at % total
                } else {
                    base + rng.gen_range(0..total)
                };
                last = dev;
                MetadataOp::Discard { dev, vblock, len }
            }
            45..=56 => MetadataOp::Commit,
            57..=81 => {
                let origin = if rng.gen_bool(0.7) && devs.live.contains(&last) { last } else { dev };
                let op = devs.snapshot(origin);
                if let MetadataOp::CreateSnap { dev, origin } = op {
                    front[dev as usize] = front[origin as usize];
                }
                op
            }
            82..=87 => devs.delete(rng),
            88..=93 => {
                let vblock = below_or_within(rng, base, total, 50);
                MetadataOp::Provision { dev, vblock, len: rng.gen_range(1..20) }
            }
            _ => other_message(rng, &mut held),
        };
        out.push(op);
    }
    out.truncate(len);
    out
}

/// [`Shape::Deep`].
fn deep(rng: &mut impl Rng, len: usize) -> Vec<MetadataOp> {
    const CHUNK: u64 = 4000;
    let base = rng.gen_range(10_000..20_000);
    let total = rng.gen_range(DEEP_MAPPINGS);
    let mut out = vec![MetadataOp::CreateThin(0)];
    let mut at = 0;
    while at < total {
        let n = CHUNK.min(total - at);
        out.push(MetadataOp::Provision { dev: 0, vblock: base + at, len: n });
        at += n;
        if rng.gen_bool(0.5) {
            out.push(MetadataOp::Commit);
        }
    }
    out.push(MetadataOp::Commit);
    let mut devs = Devices { live: vec![0] };
    let mut held = false;
    // The end is kept for a teardown: each device but one deleted, with a
    // commit after each.
    while out.len() + 2 * (devs.live.len() - 1) < len {
        let dev = devs.pick(rng);
        let op = match rng.gen_range(0..100) {
            0..=29 => {
                let len = if rng.gen_bool(0.3) { rng.gen_range(500..5000) } else { rng.gen_range(1..500) };
                MetadataOp::Discard { dev, vblock: base + rng.gen_range(0..total), len }
            }
            30..=44 => MetadataOp::Commit,
            45..=62 => devs.snapshot(dev),
            63..=67 => devs.delete(rng),
            68..=89 => {
                // Below the lowest key, or into a snapshot's shared range.
                let vblock = below_or_within(rng, base, total, 3000);
                MetadataOp::Provision { dev, vblock, len: rng.gen_range(1..300) }
            }
            _ => other_message(rng, &mut held),
        };
        out.push(op);
    }
    // Deleting a device whose copies of internal nodes are its own drops
    // the counts of the leaves below them from three to two: the metadata
    // space map's overflow tree loses entries and merges.
    while devs.live.len() > 1 {
        out.push(devs.delete(rng));
        out.push(MetadataOp::Commit);
    }
    out.truncate(len);
    out
}

/// A workload of `len` operations of the random shape drawn from `rng`.
pub fn generate(rng: &mut impl Rng, len: usize) -> Vec<MetadataOp> {
    (0..len)
        .map(|_| match rng.gen_range(0..100) {
            0..=7 => MetadataOp::CreateThin(rng.gen_range(0..DEVICES)),
            8..=15 => {
                MetadataOp::CreateSnap { dev: rng.gen_range(0..DEVICES), origin: rng.gen_range(0..DEVICES) }
            }
            16..=19 => MetadataOp::Delete(rng.gen_range(0..DEVICES)),
            20..=54 => MetadataOp::Provision {
                dev: rng.gen_range(0..DEVICES),
                vblock: rng.gen_range(0..VBLOCKS),
                len: rng.gen_range(1..300),
            },
            55..=74 => MetadataOp::Discard {
                dev: rng.gen_range(0..DEVICES),
                vblock: rng.gen_range(0..VBLOCKS),
                len: rng.gen_range(1..800),
            },
            75..=77 => MetadataOp::BumpTransactionId,
            78..=80 => MetadataOp::ReserveMetadataSnap,
            81..=83 => MetadataOp::ReleaseMetadataSnap,
            _ => MetadataOp::Commit,
        })
        .collect()
}
