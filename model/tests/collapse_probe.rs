//! A kernel behaviour of 6.1 before 6.1.175 (spec §1.8, listed there as
//! unverified; found reachable here), now a test-only mutation of the model
//! (`collapse-forgets-shared-child`).
//!
//! Btree removal in the older source collapses a root that has one entry by copying its only
//! child over it (`rebalance_children` in dm-btree-remove.c), without giving
//! the child's children — for a thin device's tree, its data blocks — the
//! extra reference the copy now holds. If that child is shared with a
//! snapshot at that moment, their counts are one short, and the next
//! unmapping in either device frees a block the other still maps.
//!
//! Reachable through dm-thin: a discard leaves a device's tree with one
//! child under the root (the removal's final probe descent merges the last
//! two leaves), the pool commits, a snapshot is taken, and any further
//! discard on the origin collapses the shared root. Debian's thin_check
//! 0.9.0 does not compare data block counts and passes such metadata;
//! dmsim's checker flags it. The model followed the 6.1.166 source line by
//! line.
//!
//! **Refuted on the stock kernel** (Debian's 6.1.192):
//! `kernel-shim/tests/kernel_finding_collapse_shared_child.rs` runs this
//! history through dm-thin. The root is left with a single child exactly as
//! here and collapses when shared, but the counts come out right. 6.1.192's
//! `rebalance_children` calls `inc_children` on a shared child before the
//! copy, probably since 6.1.175 ("dm-thin: fix metadata refcount
//! underflow", CVE-2026-46107). The model's one-entry branch in
//! `model/src/pdata/btree/remove.rs` now takes that step too; the older
//! behaviour is the mutation. The metadata campaign's shrink workload
//! reaches this state (see docs/campaign.md). See docs/findings.md,
//! finding 10.

use dmsim_model::block_device::MemDevice;
use dmsim_model::mutation::Mutations;
use dmsim_model::thin::check::{check_thin_metadata, CheckOptions, Structure};
use dmsim_model::thin::ThinMetadata;

#[path = "../../tests/support/mod.rs"]
mod support;

/// The history above; `n` blocks discarded first; `old` runs the older
/// source (the mutation).
fn history_with(n: u64, old: bool) -> MemDevice {
    let mut md = ThinMetadata::format(MemDevice::new(8 * 2048), 128).unwrap();
    if old {
        md.set_mutations(Mutations::by_name("collapse-forgets-shared-child").unwrap());
    }
    md.resize_data_dev(10_000).unwrap();
    md.create_thin(0).unwrap();
    md.commit().unwrap();
    md.open_thin(0).unwrap();
    for v in 0..300 {
        let d = md.alloc_data_block().unwrap();
        md.insert_block(0, v, d).unwrap();
    }
    md.commit().unwrap();
    md.remove_range(0, 0, n).unwrap();
    md.commit().unwrap();
    md.create_snap(1, 0).unwrap();
    md.commit().unwrap();
    md.remove_range(0, n, n + 1).unwrap();
    md.close_thin(0).unwrap();
    md.commit().unwrap();
    md.close().map_err(|(_, e)| e).unwrap()
}

/// The history as 6.1 before 6.1.175 ran it.
fn history(n: u64) -> MemDevice {
    history_with(n, true)
}

#[test]
fn collapsing_a_shared_only_child_undercounts_its_data_blocks() {
    // 300 mappings fill two leaves; after 131 removals the last probe
    // descent merges them, leaving the root with a single child.
    let mut dev = history(131);
    let report = check_thin_metadata(&mut dev, &CheckOptions::default()).unwrap();
    let data: Vec<_> = report.problems_in(Structure::DataSpaceMap).collect();
    assert!(!data.is_empty(), "expected the kernel's undercount: {:#?}", report.problems);
    // The block unmapped from the origin is freed though the snapshot maps it.
    assert!(
        data.iter().any(|p| p.block == Some(131) && p.message.contains("on disk 0, expected 1")),
        "{data:#?}"
    );
    assert!(report.problems.iter().all(|p| p.structure == Structure::DataSpaceMap), "{:#?}", report.problems);
    // Debian's thin_check 0.9.0 does not look at data block counts.
    let image = support::Image(dev.as_bytes().to_vec());
    if let Some(clean) = support::thin_check_clean(&image, &[]) {
        assert!(clean, "thin_check 0.9.0 was expected to miss this");
    }
}

#[test]
fn without_the_single_child_state_the_same_history_is_clean() {
    for n in [100, 130, 132, 200] {
        let mut dev = history(n);
        let report = check_thin_metadata(&mut dev, &CheckOptions::default()).unwrap();
        assert!(report.is_clean(), "n={n}: {:#?}", report.problems);
    }
}

#[test]
fn the_model_as_the_stock_kernel_counts_the_shared_childs_children() {
    for n in [100, 130, 131, 132, 200] {
        let mut dev = history_with(n, false);
        let report = check_thin_metadata(&mut dev, &CheckOptions::default()).unwrap();
        assert!(report.is_clean(), "n={n}: {:#?}", report.problems);
    }
}
