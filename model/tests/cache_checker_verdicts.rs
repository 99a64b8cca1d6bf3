//! The cache checker's verdict (clean or not) against Debian's
//! `cache_check` 0.9.0 on images `cache_restore` builds from the fixtures
//! in `tests/fixtures/cache/` and on model-written images, metadata
//! versions 1 and 2, intact and damaged. Under `CI=true` the tools must be
//! installed.
//!
//! 0.9.0 is weaker in known places, so the verdicts are compared only
//! over what both look at: problems in the version 2 dirty bitset (0.9.0
//! never reads it), in the discard bitset (0.9.0 prints "examining
//! discard bitset" but passes a bad checksum in its btree root or its
//! array blocks) and reference-count problems (0.9.0 does not audit them)
//! are left out of our side of the comparison, and each is asserted
//! separately where it arises.

mod cache_common;
#[path = "../../tests/support/mod.rs"]
mod support;

use cache_common::{cache_op, CacheOp, Run};
use dmsim_model::block_device::MemDevice;
use dmsim_model::cache::check::{
    check_cache_metadata, CacheCheckOptions, CacheCheckReport, Problem, Severity, Structure,
};
use dmsim_model::cache::inspect::read_image;
use dmsim_model::pdata::layout::array::value_offset;
use dmsim_model::pdata::layout::cache::{
    pack_mapping, M_VALID, SB_CACHE_BLOCKS, SB_INCOMPAT_FLAGS, SB_METADATA_BLOCK_SIZE, SB_VERSION,
};
use dmsim_model::pdata::layout::{get_u32, put_u32, put_u64, BlockKind};
use proptest::prelude::*;
use support::{fixtures_dir, require_tool, run_tool, temp_path, Image, TempFile};

const FIXTURES: [(&str, u32); 4] =
    [("v1_dirty_hints.xml", 1), ("v1_clean.xml", 1), ("v2_hints.xml", 2), ("v2_dirty_hints.xml", 2)];

/// cache_check's verdict: Some(true) for exit status 0; None when the
/// tool is missing outside CI.
fn cache_check_clean(img: &Image) -> Option<bool> {
    let f = TempFile::with_bytes("cc.img", &img.0);
    run_tool("cache_check", &[f.path().as_os_str()]).map(|(s, _, _)| s.success())
}

fn ours(img: &Image) -> CacheCheckReport {
    check_cache_metadata(&mut MemDevice::from_bytes(img.0.clone()), &CacheCheckOptions::default())
        .expect("usable image")
}

/// Whether 0.9.0 looks at what `p` is about.
fn cache_check_looks_at(p: &Problem) -> bool {
    let count = p.structure == Structure::MetadataSpaceMap && p.message.contains("count on disk");
    !matches!(p.structure, Structure::DirtyBitset | Structure::DiscardBitset) && !count
}

/// Our verdict over what 0.9.0 also looks at.
fn comparable_clean(r: &CacheCheckReport) -> bool {
    !r.problems.iter().any(cache_check_looks_at)
}

fn show(r: &CacheCheckReport) -> String {
    r.problems.iter().map(|p| format!("  {p}\n")).collect()
}

/// Whether our report notes a hint array whose length is not the cache's
/// where the kernel does not use it (after an unclean shutdown: the normal
/// lag behind a resize).
fn stale_hints(r: &CacheCheckReport) -> bool {
    r.notes.iter().any(|n| n.contains("hint array holds"))
}

/// Asserts the verdicts agree; returns our report.
#[track_caller]
fn agree(img: &Image, what: &str) -> CacheCheckReport {
    let r = ours(img);
    if let Some(theirs) = cache_check_clean(img) {
        if stale_hints(&r) {
            // 0.9.0 rejects any hint array whose length differs from
            // nr_cache_blocks ("missing mappings [old, new]"), even after
            // an unclean shutdown, where the kernel ignores hints: the
            // kernel's own metadata after a resize and a crash.
            assert!(!theirs, "{what}: cache_check 0.9.0 was expected to reject a stale hint array");
        } else {
            assert_eq!(
                comparable_clean(&r),
                theirs,
                "{what}: cache_check says clean={theirs}; we found:\n{}",
                show(&r)
            );
        }
    }
    r
}

/// An image built by Debian's cache_restore from a fixture.
fn restore(xml: &str, version: u32) -> Option<Image> {
    let tool = require_tool("cache_restore")?;
    let img = TempFile(temp_path("cc-restore.img"));
    std::fs::File::create(img.path()).and_then(|f| f.set_len(4 << 20)).expect("create image");
    let out = std::process::Command::new(tool)
        .arg("-i")
        .arg(fixtures_dir().join("cache").join(xml))
        .arg("-o")
        .arg(img.path())
        .arg("--metadata-version")
        .arg(version.to_string())
        .output()
        .expect("run cache_restore");
    assert!(out.status.success(), "cache_restore {xml}: {}", String::from_utf8_lossy(&out.stderr));
    Some(Image(std::fs::read(img.path()).expect("read image")))
}

/// A model-written image with mappings, dirty blocks, discards and hints.
fn model_image(version: u32, clean_shutdown: bool) -> Image {
    let mut run = Run::new(version, 1024, 2500);
    run.apply(&CacheOp::InsertRun { cblock: 7, oblock: 100, len: 900 });
    run.apply(&CacheOp::Commit);
    for c in [7u32, 8, 500] {
        run.apply(&CacheOp::SetDirty { cblock: c, dirty: true });
    }
    run.apply(&CacheOp::Discard { dblock: 3, on: true });
    run.apply(&CacheOp::Remove { cblock: 9 });
    let dev = if clean_shutdown {
        run.finish().0
    } else {
        run.apply(&CacheOp::Commit);
        run.md.take().expect("open").close()
    };
    Image(dev.into_bytes())
}

/// Damage both checkers look at, applied to a copy of `img`.
fn damaged_variants(img: &Image) -> Vec<(&'static str, Image)> {
    let d = read_image(&mut MemDevice::from_bytes(img.0.clone())).expect("decodes");
    let mut out = Vec::new();
    let mut sb = img.clone();
    sb.flip_bit(0, 240, 1);
    out.push(("superblock bit flip", sb));
    // Superblock fields, re-sealed: a version that does not exist, a
    // metadata block size other than 8, an incompatible feature, fewer
    // cache blocks than the mapping array holds.
    for (what, off, value) in [
        ("superblock version 3", SB_VERSION, 3),
        ("superblock metadata block size 16", SB_METADATA_BLOCK_SIZE, 16),
        ("superblock incompat flag", SB_INCOMPAT_FLAGS, 2),
        ("superblock cache_blocks too small", SB_CACHE_BLOCKS, get_u32(img.block(0), SB_CACHE_BLOCKS) - 1),
    ] {
        let mut sb = img.clone();
        put_u32(sb.block_mut(0), off, value);
        sb.reseal(0, BlockKind::CacheSuperblock);
        out.push((what, sb));
    }
    let mut ab = img.clone();
    ab.flip_bit(d.blocks.mapping.ablocks[0], 100, 4);
    out.push(("mapping array block bit flip", ab));
    let mut node = img.clone();
    node.flip_bit(d.blocks.mapping.nodes[0], 64, 0);
    out.push(("mapping array btree bit flip", node));
    let mut disc = img.clone();
    // (cache_restore writes an empty discard bitset: its btree root then.)
    let b = d.blocks.discard.ablocks.first().copied().unwrap_or(d.blocks.discard.nodes[0]);
    disc.flip_bit(b, 30, 0);
    out.push(("discard bitset block bit flip", disc));
    // Two cache blocks mapping one origin block (re-sealed).
    let valid: Vec<usize> =
        d.mappings.iter().enumerate().filter(|(_, m)| m.valid()).map(|(c, _)| c).collect();
    if valid.len() >= 2 {
        let mut twice = img.clone();
        let (c1, c2) = (valid[0], valid[valid.len() - 1]);
        let b = d.blocks.mapping.ablocks[c2 / 509];
        put_u64(twice.block_mut(b), value_offset(8, c2 % 509), pack_mapping(d.mappings[c1].oblock, M_VALID));
        twice.reseal(b, BlockKind::Array);
        out.push(("an origin block mapped twice", twice));
    }
    out
}

#[test]
fn verdicts_match_cache_check_on_restored_fixtures() {
    for (xml, version) in FIXTURES {
        let Some(img) = restore(xml, version) else { return };
        let r = agree(&img, xml);
        assert!(comparable_clean(&r), "{xml}:\n{}", show(&r));
        // What 0.9.0's cache_restore gets wrong, found here: it leaves an
        // empty array btree leaf allocated but unreferenced (a leak), and
        // (version 2) writes the dirty bitset all ones, so that every
        // unmapped cache block's dirty bit is set (non-fatal: the kernel
        // leaves such bits after an unclean shutdown too). 0.9.0's
        // cache_check audits neither.
        let leak = |p: &Problem| {
            p.severity == Severity::NonFatal
                && p.structure == Structure::MetadataSpaceMap
                && p.message.contains("leaked")
        };
        let unmapped_dirty = |p: &Problem| {
            version == 2
                && p.severity == Severity::NonFatal
                && p.structure == Structure::DirtyBitset
                && p.message.contains("unmapped")
        };
        assert!(r.problems.iter().all(|p| leak(p) || unmapped_dirty(p)), "{xml}:\n{}", show(&r));
        if version == 2 {
            assert!(r.problems.iter().any(unmapped_dirty), "{xml}:\n{}", show(&r));
        }
        for (what, bad) in damaged_variants(&img) {
            let r = agree(&bad, &format!("{xml}, {what}"));
            assert!(r.has_damage(), "{xml}, {what}:\n{}", show(&r));
        }
    }
}

#[test]
fn verdicts_match_cache_check_on_model_images() {
    for version in [1, 2] {
        for clean_shutdown in [true, false] {
            let img = model_image(version, clean_shutdown);
            let what = format!("v{version}, clean shutdown {clean_shutdown}");
            let r = agree(&img, &what);
            assert!(r.is_clean(), "{what}:\n{}", show(&r));
            for (damage, bad) in damaged_variants(&img) {
                let r = agree(&bad, &format!("{what}, {damage}"));
                assert!(r.has_damage(), "{what}, {damage}:\n{}", show(&r));
            }
        }
    }
}

/// Runs a random history on the model and stops it either with a clean
/// shutdown or by closing without a commit (what a crash leaves, with the
/// uncommitted blocks written back): the image on disk is the last
/// commit, which the checker must find clean, with cache_check agreeing.
fn history_is_clean(version: u32, ops: &[CacheOp], cache_blocks: u32, clean_shutdown: bool) {
    let mut run = Run::new(version, 2048, cache_blocks);
    for op in ops {
        run.apply(op);
    }
    let dev = if clean_shutdown { run.finish().0 } else { run.md.take().expect("open").close() };
    let img = Image(dev.into_bytes());
    let r = agree(&img, "a model history");
    assert!(r.is_clean(), "v{version}, clean shutdown {clean_shutdown}:\n{}", show(&r));
    if clean_shutdown {
        let d = read_image(&mut MemDevice::from_bytes(img.0.clone())).expect("decodes");
        assert_eq!(r.mapped_blocks, d.mappings.iter().filter(|m| m.valid()).count() as u64);
        let dirty = (0..d.mappings.len()).filter(|&c| d.mappings[c].valid() && d.is_dirty(c)).count();
        assert_eq!(r.dirty_blocks, dirty as u64);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cache_common::cases(16), ..ProptestConfig::default() })]

    #[test]
    fn model_histories_check_clean(
        version in 1u32..=2,
        ops in prop::collection::vec(cache_op(), 1..50),
        cache_blocks in 1u32..4000,
        clean_shutdown in any::<bool>(),
    ) {
        history_is_clean(version, &ops, cache_blocks, clean_shutdown);
    }
}
