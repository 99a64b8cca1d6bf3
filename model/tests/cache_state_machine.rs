//! State machines against plain in-memory references, across commit, abort
//! and reopen:
//!
//! * dm-array and dm-bitset directly on a transaction manager (a u64 array
//!   and a bitset whose roots live in a small superblock), the bitset's
//!   cached word included;
//! * the cache metadata (both versions): mappings, dirty bits, discards,
//!   hints, resizes, clean shutdowns — every lookup checked after every
//!   step, and the space map's reference counts audited after commits.

use dmsim_model::block_device::MemDevice;
use dmsim_model::pdata::array::ArrayInfo;
use dmsim_model::pdata::bitset::{nr_words, Bitset, WORDS};
use dmsim_model::pdata::layout::cache::{SB_DISCARD_ROOT, SB_MAPPING_ROOT, SB_METADATA_SM_ROOT};
use dmsim_model::pdata::layout::{get_u64, put_u64, BlockKind};
use dmsim_model::pdata::{PdataError, TransactionManager};
use proptest::prelude::*;

mod cache_common;

use cache_common::{audit_ref_counts, cache_op, CacheOp, Run};

const A: ArrayInfo = ArrayInfo::new(8);

#[derive(Debug, Clone)]
enum PdOp {
    Set(u32, u64),
    Get(u32),
    Resize(u32, u64),
    Rebuild(u64),
    SetBit(u32),
    ClearBit(u32),
    TestBit(u32),
    BitsetResize(u32, bool),
    Commit,
    Abort,
    Reopen,
}

fn pd_op() -> impl Strategy<Value = PdOp> {
    prop_oneof![
        8 => (any::<u32>(), any::<u64>()).prop_map(|(i, v)| PdOp::Set(i, v)),
        2 => any::<u32>().prop_map(PdOp::Get),
        2 => (0u32..4000, any::<u64>()).prop_map(|(n, v)| PdOp::Resize(n, v)),
        1 => any::<u64>().prop_map(PdOp::Rebuild),
        5 => any::<u32>().prop_map(PdOp::SetBit),
        3 => any::<u32>().prop_map(PdOp::ClearBit),
        2 => any::<u32>().prop_map(PdOp::TestBit),
        1 => (0u32..9000, any::<bool>()).prop_map(|(n, d)| PdOp::BitsetResize(n, d)),
        2 => Just(PdOp::Commit),
        1 => Just(PdOp::Abort),
        1 => Just(PdOp::Reopen),
    ]
}

/// Both structures' plain state: the array's values, the bitset's words
/// (whole words: a shrink keeps the bits of a partly used last word).
#[derive(Debug, Clone, PartialEq, Eq)]
struct PdRef {
    values: Vec<u64>,
    nr_bits: u32,
    words: Vec<u64>,
}

struct Pd {
    tm: Option<TransactionManager<MemDevice>>,
    array_root: u64,
    bits_root: u64,
    bits: Bitset,
    now: PdRef,
    committed: PdRef,
}

impl Pd {
    fn new() -> Self {
        let mut tm = TransactionManager::create(MemDevice::new(8 * 2048), 0).unwrap();
        let array_root = A.empty(&mut tm).unwrap();
        let bits_root = Bitset::empty(&mut tm).unwrap();
        tm.block_manager().write_zero(0, BlockKind::CacheSuperblock).unwrap();
        let r = PdRef { values: vec![], nr_bits: 0, words: vec![] };
        let mut pd =
            Pd { tm: Some(tm), array_root, bits_root, bits: Bitset::new(), now: r.clone(), committed: r };
        pd.commit();
        pd
    }

    fn commit(&mut self) {
        let (mut tm, mut root) = (self.tm.take().unwrap(), self.bits_root);
        self.bits.flush(&mut tm, &mut root).unwrap();
        self.bits_root = root;
        tm.pre_commit().unwrap();
        let sm = tm.metadata_sm_root();
        let sb = tm.write_locked(0, BlockKind::CacheSuperblock).unwrap();
        sm.encode(&mut sb[SB_METADATA_SM_ROOT..]);
        put_u64(sb, SB_MAPPING_ROOT, self.array_root);
        put_u64(sb, SB_DISCARD_ROOT, self.bits_root);
        tm.commit().unwrap();
        self.tm = Some(tm);
        self.committed = self.now.clone();
    }

    /// Reopens from the last commit: with `abort` the same device after
    /// dropping everything unwritten, else a fresh transaction manager.
    fn reopen(&mut self, abort: bool) {
        let mut tm = self.tm.take().unwrap();
        let mut tm = if abort {
            tm.reset();
            tm
        } else {
            TransactionManager::unopened(tm.into_device())
        };
        let sb = *tm.block_manager().read_raw(0).unwrap();
        tm.metadata_sm_open(&sb[SB_METADATA_SM_ROOT..SB_METADATA_SM_ROOT + 32]).unwrap();
        self.array_root = get_u64(&sb, SB_MAPPING_ROOT);
        self.bits_root = get_u64(&sb, SB_DISCARD_ROOT);
        self.bits = Bitset::new();
        self.tm = Some(tm);
        self.now = self.committed.clone();
    }

    fn apply(&mut self, op: &PdOp) {
        let n = self.now.values.len() as u32;
        let nb = self.now.nr_bits;
        let mut tm = self.tm.take().unwrap();
        let (mut ar, mut br) = (self.array_root, self.bits_root);
        match *op {
            PdOp::Set(i, v) if n > 0 => {
                A.set(&mut tm, &mut ar, i % n, &v.to_le_bytes()).unwrap();
                self.now.values[(i % n) as usize] = v;
            }
            PdOp::Set(i, v) => {
                // An empty array has no block to shadow.
                assert_eq!(A.set(&mut tm, &mut ar, i, &v.to_le_bytes()), Err(PdataError::NoData));
            }
            PdOp::Get(i) => {
                let mut b = [0u8; 8];
                let r = A.get(&mut tm, ar, i % (n + 1), &mut b);
                if i % (n + 1) == n {
                    assert_eq!(r, Err(PdataError::NoData));
                } else {
                    r.unwrap();
                    assert_eq!(u64::from_le_bytes(b), self.now.values[(i % (n + 1)) as usize]);
                }
            }
            PdOp::Resize(m, v) => {
                ar = A.resize(&mut tm, ar, n, m, &v.to_le_bytes()).unwrap();
                self.now.values.resize(m as usize, v);
            }
            PdOp::Rebuild(seed) => {
                A.del(&mut tm, ar).unwrap();
                let vals: Vec<u64> = (0..n as u64).map(|i| i.wrapping_mul(seed) ^ seed).collect();
                ar = A
                    .new_array(&mut tm, n, |i, b| {
                        b.copy_from_slice(&vals[i as usize].to_le_bytes());
                        Ok(())
                    })
                    .unwrap();
                self.now.values = vals;
            }
            PdOp::SetBit(i) | PdOp::ClearBit(i) | PdOp::TestBit(i) if nb > 0 => {
                let i = i % nb;
                let (w, m) = ((i / 64) as usize, 1u64 << (i % 64));
                match op {
                    PdOp::SetBit(_) => {
                        self.bits.set_bit(&mut tm, &mut br, i).unwrap();
                        self.now.words[w] |= m;
                    }
                    PdOp::ClearBit(_) => {
                        self.bits.clear_bit(&mut tm, &mut br, i).unwrap();
                        self.now.words[w] &= !m;
                    }
                    _ => assert_eq!(
                        self.bits.test_bit(&mut tm, &mut br, i).unwrap(),
                        self.now.words[w] & m != 0
                    ),
                }
            }
            PdOp::BitsetResize(m, d) => {
                // Callers flush the cached word before a resize.
                self.bits.flush(&mut tm, &mut br).unwrap();
                br = Bitset::resize(&mut tm, br, nb, m, d).unwrap();
                self.now.words.resize(nr_words(m) as usize, if d { !0 } else { 0 });
                self.now.nr_bits = m;
            }
            _ => {}
        }
        self.tm = Some(tm);
        (self.array_root, self.bits_root) = (ar, br);
        match op {
            PdOp::Commit => self.commit(),
            PdOp::Abort => self.reopen(true),
            PdOp::Reopen => self.reopen(false),
            _ => {}
        }
    }

    /// Everything as stored (the bitset after a flush of its cached word).
    fn check(&mut self) {
        let (mut tm, mut br, ar) = (self.tm.take().unwrap(), self.bits_root, self.array_root);
        let vals: Vec<u64> = A
            .values(&mut tm, ar)
            .unwrap()
            .iter()
            .map(|v| u64::from_le_bytes(v[..].try_into().unwrap()))
            .collect();
        assert_eq!(vals, self.now.values);
        self.bits.flush(&mut tm, &mut br).unwrap();
        let words: Vec<u64> = WORDS
            .values(&mut tm, br)
            .unwrap()
            .iter()
            .map(|v| u64::from_le_bytes(v[..].try_into().unwrap()))
            .collect();
        assert_eq!(words, self.now.words);
        let blocks = A.blocks(&mut tm, ar).unwrap();
        assert_eq!(blocks.ablocks.len(), self.now.values.len().div_ceil(509));
        self.bits_root = br;
        self.tm = Some(tm);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cache_common::cases(64), ..ProptestConfig::default() })]

    #[test]
    fn array_and_bitset_match_a_plain_reference(ops in prop::collection::vec(pd_op(), 1..80)) {
        let mut pd = Pd::new();
        for op in &ops {
            pd.apply(op);
        }
        pd.check();
        pd.commit();
        pd.reopen(false);
        pd.check();
    }

    #[test]
    fn v1_cache_metadata_matches_a_plain_reference(
        ops in prop::collection::vec(cache_op(), 1..60),
        cache_blocks in 1u32..3000,
    ) {
        run_cache(1, &ops, cache_blocks);
    }

    #[test]
    fn v2_cache_metadata_matches_a_plain_reference(
        ops in prop::collection::vec(cache_op(), 1..60),
        cache_blocks in 1u32..3000,
    ) {
        run_cache(2, &ops, cache_blocks);
    }
}

fn run_cache(version: u32, ops: &[CacheOp], cache_blocks: u32) {
    let mut run = Run::new(version, 2048, cache_blocks);
    for op in ops {
        run.apply(op);
        run.check_lookups();
        if matches!(op, CacheOp::Commit | CacheOp::CleanShutdown) {
            let mut dev = run.md.as_mut().unwrap().transaction_manager().block_manager().device().clone();
            audit_ref_counts(&mut dev);
        }
    }
    run.apply(&CacheOp::Reopen);
    run.check_lookups();
}

/// The kernel's lifecycle flags: format leaves CLEAN_SHUTDOWN clear after
/// the open's in-place update; a clean shutdown sets it; the next open
/// sees it and clears it on disk at once; NEEDS_CHECK set in place reaches
/// the disk with the next flush and survives commits; an abort goes back
/// to the last commit.
#[test]
fn clean_shutdown_and_needs_check_flags_follow_the_kernel() {
    use dmsim_model::cache::inspect::read_image;
    for version in [1, 2] {
        let mut run = Run::new(version, 1024, 100);
        run.apply(&CacheOp::Insert { cblock: 3, oblock: 9 });
        let mut dev = run.md.as_mut().unwrap().transaction_manager().block_manager().device().clone();
        assert!(!read_image(&mut dev).unwrap().superblock.clean_shutdown());
        run.apply(&CacheOp::CleanShutdown);
        let dev = run.md.take().unwrap().close();
        let mut copy = dev.clone();
        assert!(read_image(&mut copy).unwrap().superblock.clean_shutdown());
        let mut md = cache_common::open(dev);
        assert!(md.clean_when_opened());
        let mut copy = md.transaction_manager().block_manager().device().clone();
        let sb = read_image(&mut copy).unwrap().superblock;
        assert!(!sb.clean_shutdown(), "open clears CLEAN_SHUTDOWN on disk at once");
        assert_eq!(sb.stats.read_hits, 1);
        md.set_needs_check().unwrap();
        md.insert_mapping(4, 10).unwrap();
        md.abort().unwrap();
        assert_eq!(md.lookup(4).unwrap(), None);
        assert_eq!(md.lookup(3).unwrap(), Some((9, false)));
        md.set_needs_check().unwrap();
        md.commit(true).unwrap();
        let mut dev = md.close();
        let sb = read_image(&mut dev).unwrap().superblock;
        assert!(sb.needs_check() && sb.clean_shutdown());
        let md = cache_common::open(dev);
        assert!(md.needs_check());
    }
}

/// Opening refuses what the kernel refuses, with the reason.
#[test]
fn open_rejects_bad_superblocks() {
    use dmsim_model::cache::{CacheError, CacheMetadata, OpenOptions};
    use dmsim_model::pdata::checksum;
    use dmsim_model::pdata::layout::cache::{SB_INCOMPAT_FLAGS, SB_MAGIC, SB_VERSION};
    use dmsim_model::pdata::layout::put_u32;
    let run = Run::new(1, 512, 10);
    let good = run.md.unwrap().close();
    let opts = OpenOptions { may_format: false, ..OpenOptions::new(cache_common::DATA_BLOCK_SIZE, 1) };
    let patched = |f: &dyn Fn(&mut [u8])| {
        let mut d = good.clone();
        f(&mut d.as_bytes_mut()[..4096]);
        checksum::seal(&mut d.as_bytes_mut()[..4096], BlockKind::CacheSuperblock.salt());
        d
    };
    let e = CacheMetadata::open(patched(&|b| put_u64(b, SB_MAGIC, 42)), opts).unwrap_err();
    assert!(matches!(&e, CacheError::BadSuperblock(m) if m.contains("magic")), "{e}");
    let e = CacheMetadata::open(patched(&|b| put_u32(b, SB_VERSION, 3)), opts).unwrap_err();
    assert!(matches!(&e, CacheError::BadSuperblock(m) if m.contains("version 3")), "{e}");
    let e = CacheMetadata::open(patched(&|b| put_u32(b, SB_INCOMPAT_FLAGS, 1)), opts).unwrap_err();
    assert!(matches!(&e, CacheError::BadSuperblock(m) if m.contains("incompatible")), "{e}");
    let e = CacheMetadata::open(good.clone(), OpenOptions { data_block_size: 64, ..opts }).unwrap_err();
    assert_eq!(e, CacheError::DataBlockSize { on_disk: 128, table: 64 });
    let e = CacheMetadata::open(MemDevice::new(8 * 64), opts).unwrap_err();
    assert_eq!(e, CacheError::Unformatted);
    let mut bad = good.clone();
    bad.as_bytes_mut()[300] ^= 1;
    assert!(matches!(CacheMetadata::open(bad, opts), Err(CacheError::Pdata(PdataError::Checksum { .. }))));
}
