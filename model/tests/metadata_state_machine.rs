//! State-machine tests: random operation sequences drive the thin metadata
//! (its btrees and space maps) and a plain in-memory reference side by
//! side, across commits, aborts and reopening from the image. After every
//! commit the independent checker must find the image clean.

use dmsim_model::block_device::MemDevice;
use dmsim_model::thin::ThinMetadata;
use proptest::prelude::*;

mod common;
use common::{map_op, run_mappings};

use common::{reopen, DATA_BLOCK_SIZE};

// ---------------------------------------------------------------------------
// The data space map against a vector of reference counts.

#[derive(Debug, Clone)]
enum SmOp {
    Alloc,
    Inc { block: u64, len: u64 },
    Dec { block: u64, len: u64 },
    Commit,
    Reopen,
    Abort,
}

fn sm_op(nr_blocks: u64) -> impl Strategy<Value = SmOp> {
    prop_oneof![
        6 => Just(SmOp::Alloc),
        4 => (0..nr_blocks, 1..40u64).prop_map(|(block, len)| SmOp::Inc { block, len }),
        4 => (0..nr_blocks, 1..40u64).prop_map(|(block, len)| SmOp::Dec { block, len }),
        1 => Just(SmOp::Commit),
        1 => Just(SmOp::Reopen),
        1 => Just(SmOp::Abort),
    ]
}

/// Space maps need several bitmaps (16320 blocks each) to exercise the index
/// tree and its cache, and runs of increments to reach the overflow tree.
const SM_BLOCKS: u64 = 40_000;

fn run_space_map(ops: &[SmOp]) {
    let mut md = ThinMetadata::format(MemDevice::new(16 * 2048), DATA_BLOCK_SIZE).unwrap();
    md.resize_data_dev(SM_BLOCKS).unwrap();
    md.commit().unwrap();
    let mut counts = vec![0u32; SM_BLOCKS as usize];
    let mut committed = counts.clone();
    let mut touched = Vec::new();
    for op in ops {
        match *op {
            SmOp::Alloc => {
                let b = md.alloc_data_block().unwrap();
                assert_eq!(counts[b as usize], 0, "allocated block {b} is in use");
                assert_eq!(committed[b as usize], 0, "allocated block {b} was freed this transaction");
                counts[b as usize] = 1;
                touched.push(b);
            }
            SmOp::Inc { block, len } => {
                // Only references to blocks in use, as the pool makes them.
                let e = (block + len).min(SM_BLOCKS);
                if (block..e).any(|b| counts[b as usize] == 0) {
                    continue;
                }
                md.inc_data_range(block, e).unwrap();
                (block..e).for_each(|b| counts[b as usize] += 1);
                touched.extend(block..e);
            }
            SmOp::Dec { block, len } => {
                let e = (block + len).min(SM_BLOCKS);
                if (block..e).any(|b| counts[b as usize] == 0) {
                    continue;
                }
                md.dec_data_range(block, e).unwrap();
                (block..e).for_each(|b| counts[b as usize] -= 1);
                touched.extend(block..e);
            }
            SmOp::Commit => {
                md.commit().unwrap();
                committed = counts.clone();
            }
            SmOp::Reopen => {
                md.commit().unwrap();
                committed = counts.clone();
                md = reopen(md);
            }
            SmOp::Abort => {
                md.abort().unwrap();
                counts = committed.clone();
            }
        }
        for &b in touched.iter().rev().take(50) {
            assert_eq!(
                md.data_block_count(b).unwrap(),
                counts[b as usize],
                "count of block {b} after {op:?}"
            );
        }
        let in_use = counts.iter().filter(|&&c| c > 0).count() as u64;
        assert_eq!(md.free_data_blocks().unwrap(), SM_BLOCKS - in_use, "free count after {op:?}");
    }
    md.commit().unwrap();
    let mut md = reopen(md);
    for b in 0..SM_BLOCKS {
        assert_eq!(md.data_block_count(b).unwrap(), counts[b as usize], "count of block {b} after reopen");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(128), ..ProptestConfig::default() })]

    #[test]
    fn data_space_map_counts_match_a_reference(ops in prop::collection::vec(sm_op(SM_BLOCKS), 1..120)) {
        run_space_map(&ops);
    }
}

/// Many references to the same few blocks push counts far past 3, through
/// the overflow tree and back.
#[test]
fn counts_climb_through_the_overflow_tree_and_back() {
    let mut ops = vec![SmOp::Alloc; 30];
    for round in 0..40 {
        ops.push(SmOp::Inc { block: 0, len: 30 });
        if round % 7 == 0 {
            ops.push(SmOp::Commit);
        }
    }
    ops.push(SmOp::Reopen);
    for _ in 0..41 {
        ops.push(SmOp::Dec { block: 0, len: 30 });
    }
    run_space_map(&ops);
}

// ---------------------------------------------------------------------------
// Devices and mappings against a map per device (the runner is shared with
// the thin-tools interop tests).

proptest! {
    #![proptest_config(ProptestConfig { cases: common::cases(128), ..ProptestConfig::default() })]

    #[test]
    fn mappings_match_a_reference(ops in prop::collection::vec(map_op(), 1..50)) {
        run_mappings(&ops, 200_000);
    }

    #[test]
    fn a_full_pool_refuses_allocation_cleanly(ops in prop::collection::vec(map_op(), 1..30)) {
        run_mappings(&ops, 700);
    }
}
