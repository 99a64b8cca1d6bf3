//! `dmsim metadata check|dump` on dm-cache metadata images: recognised by
//! their superblock, checked by the cache checker and dumped as
//! `cache_dump` does (held against Debian's cache_dump 0.9.0 on version 1
//! images and on version 2 images without dirty blocks), with the common
//! exit statuses and `--json`.

mod support;

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

use dmsim_model::block_device::MemDevice;
use dmsim_model::cache::dump::dump_string;
use dmsim_model::cache::inspect::read_image;
use dmsim_model::cache::mapping::{discard_geometry, PolicyHints, ShutdownState};
use dmsim_model::cache::superblock::CacheStats;
use dmsim_model::cache::CacheMetadata;
use dmsim_model::pdata::layout::space_map::{bitmap_set, IndexEntry, SmRoot};
use dmsim_model::pdata::layout::{cache::SB_METADATA_SM_ROOT, BlockKind, BLOCK_SIZE};
use support::{fixtures_dir, require_tool, run_tool, temp_path, Image, TempFile};

fn dmsim(args: &[&OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dmsim")).args(args).output().expect("run dmsim")
}

fn metadata(cmd: &str, img: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<&OsStr> = vec![OsStr::new("metadata"), OsStr::new(cmd)];
    args.extend(extra.iter().map(OsStr::new));
    args.push(img.as_os_str());
    dmsim(&args)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A model-written cache image: 2,000 cache blocks of 64 KiB, 600 mapped,
/// `dirty` of them dirty, a discard, then a clean shutdown (hints saved).
fn model_image(version: u32, dirty: &[u32]) -> Image {
    let mut md = CacheMetadata::format(MemDevice::new(8 * 1024), 128, version).expect("format");
    md.resize(2000).expect("resize");
    for c in 0..600u32 {
        md.insert_mapping(c * 3, 10_000 + u64::from(c)).expect("insert");
    }
    md.commit(false).expect("commit");
    let mut dirty_bits = vec![false; 2000];
    for &c in dirty {
        dirty_bits[c as usize] = true;
    }
    let (dbs, nr) = discard_geometry(128, 1 << 26);
    let mut discards = vec![false; nr as usize];
    discards[7] = true;
    let state = ShutdownState {
        dirty: dirty_bits,
        discard_block_size: dbs,
        discards,
        stats: CacheStats { read_hits: 1, read_misses: 2, write_hits: 3, write_misses: 4 },
        policy: PolicyHints {
            name: "smq".into(),
            version: [2, 0, 0],
            hint_size: 4,
            hints: (0..2000).map(|c| c % 64).collect(),
        },
    };
    md.clean_shutdown(&state).expect("clean shutdown");
    Image(md.close().into_bytes())
}

#[test]
fn a_clean_cache_image_checks_clean_and_dumps_like_cache_dump() {
    for (version, dirty) in [(1, &[0u32, 3, 300][..]), (2, &[][..])] {
        let img = model_image(version, dirty);
        let f = TempFile::with_bytes("cache-cli.img", &img.0);
        let out = metadata("check", f.path(), &[]);
        assert_eq!(out.status.code(), Some(0), "v{version}: {}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert!(stdout.contains(&format!("CACHE_METADATA_VERSION={version}\n")), "{stdout}");
        assert!(stdout.contains("MAPPED_BLOCKS=600\n"), "{stdout}");
        assert!(stdout.contains(&format!("DIRTY_BLOCKS={}\n", dirty.len())), "{stdout}");
        assert!(text(&out.stderr).ends_with("clean\n"));
        let out = metadata("dump", f.path(), &[]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let ours = text(&out.stdout);
        assert_eq!(ours, dump_string(&mut MemDevice::from_bytes(img.0.clone())).unwrap());
        assert_eq!(ours.matches("<mapping ").count(), 600);
        assert_eq!(ours.matches("dirty=\"true\"").count(), dirty.len());
        if let Some((status, theirs, err)) = run_tool("cache_dump", &[f.path().as_os_str()]) {
            assert!(status.success(), "{err}");
            assert_eq!(ours, text(&theirs), "v{version}: dmsim's dump differs from cache_dump's");
        }
    }
}

/// Version 2 with dirty blocks: dmsim prints the dirty bitset as stored;
/// 0.9.0's cache_dump prints every block clean. Otherwise equal.
#[test]
fn a_v2_dump_prints_the_dirty_bitset_cache_dump_0_9_0_does_not_read() {
    let img = model_image(2, &[3, 6, 1197]);
    let f = TempFile::with_bytes("cache-cli-v2.img", &img.0);
    let out = metadata("dump", f.path(), &[]);
    assert_eq!(out.status.code(), Some(0));
    let ours = text(&out.stdout);
    assert!(ours.contains("<mapping cache_block=\"6\" origin_block=\"10002\" dirty=\"true\"/>"), "{ours}");
    assert_eq!(ours.matches("dirty=\"true\"").count(), 3);
    if let Some((_, theirs, _)) = run_tool("cache_dump", &[f.path().as_os_str()]) {
        assert_eq!(ours.replace("dirty=\"true\"", "dirty=\"false\""), text(&theirs));
    }
}

#[test]
fn damage_leaks_and_unusable_inputs_give_1_1_and_2() {
    let img = model_image(1, &[3]);
    let d = read_image(&mut MemDevice::from_bytes(img.0.clone())).unwrap();
    // A flipped bit in a mapping array block: damage, named.
    let mut bad = img.clone();
    let b = d.blocks.mapping.ablocks[1];
    bad.flip_bit(b, 200, 3);
    let f = TempFile::with_bytes("cache-bad.img", &bad.0);
    let out = metadata("check", f.path(), &["--ignore-non-fatal-errors"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("[damage] mapping array, block {b}: array block 1: bad checksum")),
        "{err}"
    );
    let out = metadata("dump", f.path(), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    if let Some((status, _, _)) = run_tool("cache_check", &[f.path().as_os_str()]) {
        assert!(!status.success(), "cache_check calls it damage too");
    }
    // A leak: 1, or 0 with --ignore-non-fatal-errors (space map totals
    // left alone so that only the count is wrong).
    let mut leak = img.clone();
    let sm = SmRoot::decode(&leak.block(0)[SB_METADATA_SM_ROOT..SB_METADATA_SM_ROOT + 32]);
    let bitmap = IndexEntry::decode(&leak.block(sm.bitmap_root)[16..32]).blocknr;
    bitmap_set(&mut leak.block_mut(bitmap)[16..], sm.nr_blocks - 1, 1);
    leak.reseal(bitmap, BlockKind::Bitmap);
    let f = TempFile::with_bytes("cache-leak.img", &leak.0);
    let out = metadata("check", f.path(), &["--ignore-space-map-totals"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("leaked"), "{}", text(&out.stderr));
    let out = metadata("check", f.path(), &["--ignore-space-map-totals", "--ignore-non-fatal-errors"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // Mappings past a given origin size.
    let f = TempFile::with_bytes("cache-origin.img", &img.0);
    assert_eq!(metadata("check", f.path(), &["--origin-blocks", "10600"]).status.code(), Some(0));
    let out = metadata("check", f.path(), &["--origin-blocks", "10599"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("past the origin's 10599 blocks"));
    // --origin-blocks is for caches only.
    if let Some(thin) = support::restore("two_devices.xml", 4 << 20) {
        let t = TempFile::with_bytes("thin-origin.img", &thin.0);
        let out = metadata("check", t.path(), &["--origin-blocks", "5"]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    }
    // A cache has no metadata snapshot to dump.
    assert_eq!(metadata("dump", f.path(), &["-m"]).status.code(), Some(2));
    // Not metadata at all: 2 for both commands.
    let zeros = TempFile::with_bytes("cache-zero.img", &vec![0u8; 64 * 1024]);
    assert_eq!(metadata("check", zeros.path(), &[]).status.code(), Some(2));
    assert_eq!(metadata("dump", zeros.path(), &[]).status.code(), Some(2));
    // A cache superblock with a bad checksum is still a (damaged) cache.
    let mut sb = img.clone();
    sb.flip_bit(0, 300, 0);
    let f = TempFile::with_bytes("cache-sb.img", &sb.0);
    let out = metadata("check", f.path(), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("[damage] cache superblock, block 0: bad checksum"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(metadata("dump", f.path(), &[]).status.code(), Some(1));
}

/// Block 0 overwritten by a btree node of the cache: damage (1), as for
/// a pool.
#[test]
fn an_overwritten_cache_superblock_is_damage() {
    let mut img = model_image(1, &[]);
    let d = read_image(&mut MemDevice::from_bytes(img.0.clone())).unwrap();
    let node = d.blocks.mapping.nodes[0] as usize;
    img.0.copy_within(node * BLOCK_SIZE..(node + 1) * BLOCK_SIZE, 0);
    let f = TempFile::with_bytes("cache-over.img", &img.0);
    let out = metadata("check", f.path(), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("overwritten"));
    assert_eq!(metadata("dump", f.path(), &[]).status.code(), Some(1));
}

#[test]
fn json_report_of_a_cache_image() {
    let img = model_image(2, &[0, 9]);
    let f = TempFile::with_bytes("cache-json.img", &img.0);
    let out = metadata("check", f.path(), &["--json"]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(v["metadata"], "cache");
    assert_eq!(v["clean"], true);
    assert_eq!(v["version"], 2);
    assert_eq!(v["cache_blocks"], 2000);
    assert_eq!(v["mapped_blocks"], 600);
    assert_eq!(v["dirty_blocks"], 2);
    assert_eq!(v["policy"], "smq");
    assert_eq!(v["problems"].as_array().map(Vec::len), Some(0));
    // A dirty bit on an unmapped cache block (2 is unmapped: 0, 3, 6... are).
    let d = read_image(&mut MemDevice::from_bytes(img.0.clone())).unwrap();
    let b = d.blocks.dirty.as_ref().unwrap().ablocks[0];
    let mut bad = img.clone();
    bad.block_mut(b)[24] |= 1 << 2;
    bad.reseal(b, BlockKind::Array);
    let f = TempFile::with_bytes("cache-json-bad.img", &bad.0);
    let out = metadata("check", f.path(), &["--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(v["damaged"], true);
    let p = &v["problems"][0];
    assert_eq!(p["structure"], "dirty bitset");
    assert_eq!(p["block"], b);
    assert_eq!(p["severity"], "damage");
    assert!(p["message"].as_str().unwrap().contains("unmapped cache block 2"), "{p}");
}

/// Images cache_restore builds from the fixtures (those whose dump is the
/// fixture itself): the dump is the fixture; the check reports what
/// cache_restore 0.9.0 gets wrong.
#[test]
fn restored_fixtures_check_and_dump() {
    let Some(tool) = require_tool("cache_restore") else { return };
    for (xml, version) in [("v1_dirty_hints.xml", 1), ("v1_clean.xml", 1), ("v2_hints.xml", 2)] {
        let f = TempFile(temp_path("cache-cli-restore.img"));
        std::fs::File::create(f.path()).and_then(|h| h.set_len(4 << 20)).unwrap();
        let fixture = fixtures_dir().join("cache").join(xml);
        let st = Command::new(&tool)
            .arg("-i")
            .arg(&fixture)
            .arg("-o")
            .arg(f.path())
            .arg("--metadata-version")
            .arg(version.to_string())
            .status()
            .unwrap();
        assert!(st.success());
        let out = metadata("dump", f.path(), &[]);
        assert_eq!(out.status.code(), Some(0));
        assert_eq!(text(&out.stdout), std::fs::read_to_string(&fixture).unwrap(), "{xml}");
        // cache_restore 0.9.0 leaks a block in version 1 (non-fatal) and,
        // in version 2, sets the dirty bit of every unmapped cache block
        // (damage).
        let out = metadata("check", f.path(), &["--ignore-non-fatal-errors"]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(if version == 2 { 1 } else { 0 }), "{xml}: {err}");
        if version == 2 {
            assert!(err.contains("[damage] dirty bitset"), "{xml}: {err}");
        } else {
            assert!(err.contains("leaked"), "{xml}: {err}");
            assert_eq!(metadata("check", f.path(), &[]).status.code(), Some(1));
        }
    }
}
