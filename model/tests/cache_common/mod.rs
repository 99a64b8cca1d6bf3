//! Shared by the cache test files: an operation language over the cache
//! metadata, a plain in-memory reference of what it must hold, a runner
//! that applies both and compares, and a reference-count audit of images.

#![allow(dead_code)]

use std::collections::BTreeMap;

use dmsim_model::block_device::MemDevice;
use dmsim_model::cache::inspect::read_image;
use dmsim_model::cache::mapping::{discard_geometry, PolicyHints, ShutdownState};
use dmsim_model::cache::superblock::CacheStats;
use dmsim_model::cache::{CacheError, CacheMetadata, OpenOptions};
use dmsim_model::pdata::layout::cache::SB_METADATA_SM_ROOT;
use dmsim_model::pdata::layout::space_map::{bitmap_get, IndexEntry, SmRoot, ENTRIES_PER_BITMAP};
use dmsim_model::pdata::layout::{get_u32, node, BLOCK_SIZE};
use proptest::prelude::*;

/// Cache block size used throughout (64 KiB).
pub const DATA_BLOCK_SIZE: u32 = 128;
/// Origin blocks of the simulated origin device.
pub const ORIGIN_BLOCKS: u64 = 1 << 20;

/// Proptest cases: `PROPTEST_CASES` from the environment if set, else `default`.
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The discard geometry of the simulated origin.
pub fn geometry() -> (u64, u64) {
    discard_geometry(u64::from(DATA_BLOCK_SIZE), ORIGIN_BLOCKS * u64::from(DATA_BLOCK_SIZE))
}

/// One step of a history. Cache and discard block numbers are taken modulo
/// the current sizes.
#[derive(Debug, Clone)]
pub enum CacheOp {
    /// Map a cache block (skipped if mapped, or if the origin block is
    /// mapped elsewhere: the tools reject an origin block mapped twice).
    Insert { cblock: u32, oblock: u64 },
    /// Write back (if dirty) and unmap, like a demotion.
    Remove { cblock: u32 },
    /// Map `len` consecutive cache blocks to consecutive origin blocks.
    InsertRun { cblock: u32, oblock: u64, len: u32 },
    /// Set a mapped block dirty or clean.
    SetDirty { cblock: u32, dirty: bool },
    /// Set or clear a discard bit.
    Discard { dblock: u64, on: bool },
    /// Resize the cache (a shrink with dirty blocks is refused).
    Resize { cache_blocks: u32 },
    /// An ordinary commit.
    Commit,
    /// The target's clean shutdown: dirty bits, discards, stats, hints,
    /// commit with CLEAN_SHUTDOWN.
    CleanShutdown,
    /// Close without committing and open again.
    Reopen,
    /// Abort the open transaction.
    Abort,
}

/// A random operation.
pub fn cache_op() -> impl Strategy<Value = CacheOp> {
    prop_oneof![
        6 => (any::<u32>(), 0..ORIGIN_BLOCKS).prop_map(|(cblock, oblock)| CacheOp::Insert { cblock, oblock }),
        2 => (any::<u32>(), 0..ORIGIN_BLOCKS, 1u32..2000)
            .prop_map(|(cblock, oblock, len)| CacheOp::InsertRun { cblock, oblock, len }),
        3 => any::<u32>().prop_map(|cblock| CacheOp::Remove { cblock }),
        4 => (any::<u32>(), any::<bool>()).prop_map(|(cblock, dirty)| CacheOp::SetDirty { cblock, dirty }),
        3 => (any::<u64>(), any::<bool>()).prop_map(|(dblock, on)| CacheOp::Discard { dblock, on }),
        1 => (1u32..6000).prop_map(|cache_blocks| CacheOp::Resize { cache_blocks }),
        2 => Just(CacheOp::Commit),
        1 => Just(CacheOp::CleanShutdown),
        1 => Just(CacheOp::Reopen),
        1 => Just(CacheOp::Abort),
    ]
}

/// What the metadata must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reference {
    /// Per cache block: the origin block if mapped.
    pub mappings: Vec<Option<u64>>,
    /// Per cache block: dirty (only ever set for mapped blocks).
    pub dirty: Vec<bool>,
    /// Discard bits.
    pub discards: Vec<bool>,
    /// Origin block → cache block.
    pub by_oblock: BTreeMap<u64, u32>,
    /// Hints saved by the last clean shutdown.
    pub hints: Vec<u32>,
    /// Clean shutdowns so far (varies hints and stats).
    pub shutdowns: u32,
}

impl Reference {
    fn resize(&mut self, n: u32) {
        for c in n as usize..self.mappings.len() {
            if let Some(o) = self.mappings[c] {
                self.by_oblock.remove(&o);
            }
        }
        self.mappings.resize(n as usize, None);
        self.dirty.resize(n as usize, false);
    }

    /// The target's in-core state at a clean shutdown.
    pub fn shutdown_state(&self) -> ShutdownState {
        let n = self.shutdowns;
        ShutdownState {
            dirty: self.dirty.clone(),
            discard_block_size: geometry().0,
            discards: self.discards.clone(),
            stats: CacheStats { read_hits: n, read_misses: 2 * n, write_hits: 3 * n, write_misses: 4 * n },
            policy: PolicyHints {
                name: "smq".into(),
                version: [2, 0, 0],
                hint_size: 4,
                hints: (0..self.mappings.len() as u32).map(|c| (c * 7 + n) % 64).collect(),
            },
        }
    }
}

/// Model and reference side by side, with the last commit's reference.
pub struct Run {
    /// The model.
    pub md: Option<CacheMetadata<MemDevice>>,
    /// Now.
    pub now: Reference,
    /// As of the last commit.
    pub committed: Reference,
    /// Metadata version.
    pub version: u32,
}

/// Opens existing metadata with the test's table parameters.
pub fn open(dev: MemDevice) -> CacheMetadata<MemDevice> {
    let opts = OpenOptions { may_format: false, ..OpenOptions::new(DATA_BLOCK_SIZE, 1) };
    CacheMetadata::open(dev, opts).expect("open")
}

impl Run {
    /// Formats a metadata device of `metadata_blocks` blocks, sizes the cache
    /// to `cache_blocks` and the discard bitset to the origin, commits.
    pub fn new(version: u32, metadata_blocks: u64, cache_blocks: u32) -> Self {
        let dev = MemDevice::new(metadata_blocks * 8);
        let mut md = CacheMetadata::format(dev, DATA_BLOCK_SIZE, version).expect("format");
        md.resize(cache_blocks).expect("resize");
        let (dbs, nr) = geometry();
        md.discard_bitset_resize(dbs, nr).expect("discard resize");
        md.commit(false).expect("commit");
        let mut now = Reference::default();
        now.resize(cache_blocks);
        now.discards = vec![false; nr as usize];
        Run { md: Some(md), committed: now.clone(), now, version }
    }

    fn md(&mut self) -> &mut CacheMetadata<MemDevice> {
        self.md.as_mut().expect("open")
    }

    /// Applies one operation to both sides.
    pub fn apply(&mut self, op: &CacheOp) {
        let n = self.now.mappings.len() as u32;
        match *op {
            CacheOp::Insert { cblock, oblock } if n > 0 => self.insert(cblock % n, oblock),
            CacheOp::InsertRun { cblock, oblock, len } if n > 0 => {
                for i in 0..len.min(n) {
                    self.insert((cblock % n + i) % n, (oblock + u64::from(i)) % ORIGIN_BLOCKS);
                }
            }
            CacheOp::Remove { cblock } if n > 0 => {
                let c = cblock % n;
                if let Some(o) = self.now.mappings[c as usize] {
                    if self.now.dirty[c as usize] {
                        self.md().set_dirty(c, false).expect("clean before demotion");
                        self.now.dirty[c as usize] = false;
                    }
                    self.md().remove_mapping(c).expect("remove");
                    self.now.mappings[c as usize] = None;
                    self.now.by_oblock.remove(&o);
                }
            }
            CacheOp::SetDirty { cblock, dirty } if n > 0 => {
                let c = cblock % n;
                if self.now.mappings[c as usize].is_some() {
                    self.md().set_dirty(c, dirty).expect("set dirty");
                    self.now.dirty[c as usize] = dirty;
                }
            }
            CacheOp::Discard { dblock, on } => {
                let d = dblock % self.now.discards.len() as u64;
                self.md().set_discard(d, on).expect("discard");
                self.now.discards[d as usize] = on;
            }
            CacheOp::Resize { cache_blocks } => {
                let first_dirty = self.now.dirty.iter().skip(cache_blocks as usize).position(|&d| d);
                match self.md().resize(cache_blocks) {
                    Ok(()) => {
                        assert!(first_dirty.is_none(), "a shrink over dirty blocks was allowed");
                        self.now.resize(cache_blocks);
                    }
                    Err(CacheError::ShrinkDirty(b)) => {
                        assert_eq!(Some(b as usize), first_dirty.map(|p| p + cache_blocks as usize))
                    }
                    Err(e) => panic!("resize: {e}"),
                }
            }
            CacheOp::Commit => {
                self.md().commit(false).expect("commit");
                self.committed = self.now.clone();
            }
            CacheOp::CleanShutdown => {
                self.now.shutdowns += 1;
                let s = self.now.shutdown_state();
                self.md().clean_shutdown(&s).expect("clean shutdown");
                self.now.hints = s.policy.hints;
                self.committed = self.now.clone();
            }
            CacheOp::Reopen => {
                let dev = self.md.take().expect("open").close();
                self.md = Some(open(dev));
                self.now = self.committed.clone();
            }
            CacheOp::Abort => {
                self.md().abort().expect("abort");
                self.now = self.committed.clone();
            }
            _ => {}
        }
    }

    fn insert(&mut self, c: u32, o: u64) {
        if self.now.mappings[c as usize].is_some() || self.now.by_oblock.contains_key(&o) {
            return;
        }
        self.md().insert_mapping(c, o).expect("insert");
        self.now.mappings[c as usize] = Some(o);
        self.now.by_oblock.insert(o, c);
        if self.version == 1 {
            // v1 stores the dirty flag in the mapping: an insert is clean.
            self.now.dirty[c as usize] = false;
        }
    }

    /// Checks every lookup of the model against the reference.
    pub fn check_lookups(&mut self) {
        let n = self.now.mappings.len() as u32;
        assert_eq!(self.md().cache_blocks(), n);
        for c in 0..n {
            let want = self.now.mappings[c as usize].map(|o| (o, self.now.dirty[c as usize]));
            assert_eq!(self.md().lookup(c).expect("lookup"), want, "cache block {c}");
        }
        let (dbs, nr) = geometry();
        assert_eq!(self.md().discard_geometry(), (dbs, nr));
    }

    /// Commits, writes a clean shutdown (so that dirty bits, discards and
    /// hints are on disk), closes, and returns the device.
    pub fn finish(mut self) -> (MemDevice, Reference) {
        self.apply(&CacheOp::CleanShutdown);
        let r = self.now.clone();
        (self.md.take().expect("open").close(), r)
    }
}

/// Checks a closed image against the reference: every structure as stored.
pub fn check_image(dev: &mut MemDevice, r: &Reference) {
    let img = read_image(dev).expect("read image");
    assert_eq!(img.superblock.cache_blocks as usize, r.mappings.len());
    for (c, m) in img.mappings.iter().enumerate() {
        assert_eq!(m.valid().then_some(m.oblock), r.mappings[c], "mapping of cache block {c}");
        assert_eq!(img.is_dirty(c), r.dirty[c], "dirty bit of cache block {c}");
    }
    assert_eq!(img.discards, r.discards);
    let hints: Vec<u32> = img.hints.expect("hints").iter().map(|h| get_u32(h, 0)).collect();
    assert_eq!(hints, r.hints);
}

/// Audits the metadata space map of a committed image: every block
/// reachable from the superblock has count 1 and every other block count 0
/// (cache metadata shares nothing), and nr_allocated agrees.
pub fn audit_ref_counts(dev: &mut MemDevice) {
    let img = read_image(dev).expect("read image");
    let bytes = dev.as_bytes();
    let block = |b: u64| &bytes[b as usize * BLOCK_SIZE..(b as usize + 1) * BLOCK_SIZE];
    let sm = SmRoot::decode(&block(0)[SB_METADATA_SM_ROOT..]);
    let mut reachable = vec![0u64, sm.bitmap_root];
    let nr_bitmaps = sm.nr_blocks.div_ceil(ENTRIES_PER_BITMAP) as usize;
    let index: Vec<IndexEntry> =
        (0..nr_bitmaps).map(|i| IndexEntry::decode(&block(sm.bitmap_root)[16 + 16 * i..])).collect();
    reachable.extend(index.iter().map(|e| e.blocknr));
    // The overflow tree: nodes and (block → count) entries.
    let mut overflow = BTreeMap::new();
    let mut stack = vec![sm.ref_count_root];
    while let Some(b) = stack.pop() {
        reachable.push(b);
        let d = block(b);
        let nr = get_u32(d, node::NR_ENTRIES) as usize;
        let max = get_u32(d, node::MAX_ENTRIES) as usize;
        let vs = get_u32(d, node::VALUE_SIZE) as usize;
        for i in 0..nr {
            let v = &d[node::value_offset(max, vs, i)..];
            if get_u32(d, node::FLAGS) & node::INTERNAL != 0 {
                stack.push(u64::from_le_bytes(v[..8].try_into().unwrap()));
            } else {
                let k =
                    u64::from_le_bytes(d[node::key_offset(i)..node::key_offset(i) + 8].try_into().unwrap());
                overflow.insert(k, get_u32(v, 0));
            }
        }
    }
    reachable.extend(img.blocks.all());
    let mut want = vec![0u32; sm.nr_blocks as usize];
    for b in reachable {
        want[b as usize] += 1;
    }
    let mut allocated = 0;
    for (b, &w) in want.iter().enumerate() {
        let e = index[b / ENTRIES_PER_BITMAP as usize];
        let raw = bitmap_get(&block(e.blocknr)[16..], b as u64 % ENTRIES_PER_BITMAP);
        let count = if raw == 3 { overflow[&(b as u64)] } else { raw };
        assert_eq!(count, w, "reference count of metadata block {b}");
        allocated += u64::from(count > 0);
    }
    assert_eq!(allocated, sm.nr_allocated, "nr_allocated");
}
