//! `dmsim metadata check|dump` against Debian's thin_check / thin_dump
//! (thin-provisioning-tools 0.9.0) on images made by thin_restore.

mod support;

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Output};

use dmsim_model::pdata::layout::{put_u64, BlockKind, BLOCK_SIZE};
use support::{restore, run_tool, thin_check_clean, Image, TempFile};

const SIZE: u64 = 4 << 20;
const FIXTURES: [&str; 5] = ["empty.xml", "two_devices.xml", "snapshots.xml", "many.xml", "empty_device.xml"];

fn dmsim(args: &[&OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dmsim")).args(args).output().expect("run dmsim")
}

fn dmsim_check(img: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<&OsStr> = vec![OsStr::new("metadata"), OsStr::new("check")];
    args.extend(extra.iter().map(OsStr::new));
    args.push(img.as_os_str());
    dmsim(&args)
}

/// dmsim's verdict judged as thin_check judges (space-map totals are
/// not checked by thin_check, and thin_restore writes them inconsistently).
fn dmsim_clean(img: &Image) -> bool {
    let f = TempFile::with_bytes("cli.img", &img.0);
    let out = dmsim_check(f.path(), &["--ignore-space-map-totals"]);
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        other => panic!("unexpected exit status {other:?}: {}", String::from_utf8_lossy(&out.stderr)),
    }
}

fn thin_dump(img: &Image, extra: &[&str]) -> Option<Output> {
    let f = TempFile::with_bytes("td.img", &img.0);
    let mut args: Vec<&OsStr> = extra.iter().map(OsStr::new).collect();
    args.push(f.path().as_os_str());
    run_tool("thin_dump", &args).map(|(status, stdout, stderr)| Output {
        status,
        stdout,
        stderr: stderr.into_bytes(),
    })
}

fn dmsim_dump(img: &Image, extra: &[&str]) -> Output {
    let f = TempFile::with_bytes("dd.img", &img.0);
    let mut args: Vec<&OsStr> = vec![OsStr::new("metadata"), OsStr::new("dump")];
    args.extend(extra.iter().map(OsStr::new));
    args.push(f.path().as_os_str());
    dmsim(&args)
}

#[test]
fn verdicts_match_thin_check_on_fixtures() {
    for xml in FIXTURES {
        let Some(img) = restore(xml, SIZE) else { return };
        let Some(theirs) = thin_check_clean(&img, &[]) else { return };
        assert!(theirs, "thin_check rejects {xml}");
        assert_eq!(dmsim_clean(&img), theirs, "{xml}");
    }
}

#[test]
fn verdicts_match_thin_check_after_corruption() {
    let Some(base) = restore("many.xml", SIZE) else { return };
    let mut cases: Vec<(&str, Image)> = Vec::new();
    let mut leaf_flip = base.clone();
    let leaf = leaf_flip.device_root(5);
    leaf_flip.flip_bit(leaf, 200, 0);
    cases.push(("bottom-level leaf bit flip", leaf_flip));
    let mut details_flip = base.clone();
    let d = details_flip.details_root();
    details_flip.flip_bit(d, 33, 1);
    cases.push(("details root bit flip", details_flip));
    let mut leak = base.clone();
    let b = leak.free_metadata_block(200);
    leak.set_metadata_count(b, 1);
    cases.push(("leak", leak));
    let mut overcount = base.clone();
    let r = overcount.device_root(3);
    overcount.set_metadata_count(r, 2);
    cases.push(("metadata count too high", overcount));
    let mut undercount = base.clone();
    let r = undercount.mapping_root();
    undercount.set_metadata_count(r, 0);
    cases.push(("metadata count too low", undercount));
    let mut bitmap_flip = base.clone();
    let bm = bitmap_flip.metadata_index_entry(0).blocknr;
    bitmap_flip.flip_bit(bm, 100, 2);
    cases.push(("metadata bitmap bit flip", bitmap_flip));
    let mut dangling = base.clone();
    let top = dangling.mapping_root();
    let off = dangling.value_offset(top, 0);
    put_u64(dangling.block_mut(top), off, 3000);
    dangling.reseal(top, BlockKind::BtreeNode);
    cases.push(("subtree root past the device", dangling));
    for (what, img) in cases {
        let Some(theirs) = thin_check_clean(&img, &[]) else { return };
        assert!(!theirs, "thin_check should reject: {what}");
        assert_eq!(dmsim_clean(&img), theirs, "{what}");
    }
}

#[test]
fn dump_is_byte_identical_to_thin_dump() {
    for xml in FIXTURES {
        let Some(img) = restore(xml, SIZE) else { return };
        let Some(theirs) = thin_dump(&img, &[]) else { return };
        assert!(theirs.status.success());
        let ours = dmsim_dump(&img, &[]);
        assert!(ours.status.success(), "{}", String::from_utf8_lossy(&ours.stderr));
        assert_eq!(String::from_utf8_lossy(&ours.stdout), String::from_utf8_lossy(&theirs.stdout), "{xml}");
    }
}

#[test]
fn metadata_snapshot_dump_is_byte_identical_to_thin_dump() {
    let Some(mut img) = restore("snapshots.xml", SIZE) else { return };
    // No snapshot yet: both refuse.
    if let Some(theirs) = thin_dump(&img, &["-m"]) {
        assert!(!theirs.status.success());
        assert!(!dmsim_dump(&img, &["-m"]).status.success());
    }
    img.take_metadata_snapshot();
    let Some(theirs) = thin_dump(&img, &["-m"]) else { return };
    assert!(theirs.status.success(), "{}", String::from_utf8_lossy(&theirs.stderr));
    let ours = dmsim_dump(&img, &["--metadata-snap"]);
    assert!(ours.status.success(), "{}", String::from_utf8_lossy(&ours.stderr));
    assert_eq!(String::from_utf8_lossy(&ours.stdout), String::from_utf8_lossy(&theirs.stdout));
    // 0.9.0 prints nr_data_blocks="0" for a snapshot (the copy's space maps are wiped).
    assert!(String::from_utf8_lossy(&ours.stdout).contains("nr_data_blocks=\"0\""));
    assert_eq!(thin_check_clean(&img, &[]), Some(true));
    assert!(dmsim_clean(&img));
}

#[test]
fn dump_to_a_file() {
    let Some(img) = restore("two_devices.xml", SIZE) else { return };
    let f = TempFile::with_bytes("o.img", &img.0);
    let out_path = TempFile(support::temp_path("out.xml"));
    let out = dmsim(&[
        OsStr::new("metadata"),
        OsStr::new("dump"),
        f.path().as_os_str(),
        OsStr::new("-o"),
        out_path.path().as_os_str(),
    ]);
    assert!(out.status.success());
    assert!(out.stdout.is_empty());
    let text = std::fs::read_to_string(out_path.path()).unwrap();
    assert!(text.starts_with("<superblock uuid=\"\" time=\"1\" transaction=\"2\" flags=\"0\" version=\"1\""));
}

#[test]
fn leak_exit_status_follows_thin_check_0_9() {
    let Some(mut img) = restore("two_devices.xml", SIZE) else { return };
    let b = img.free_metadata_block(20);
    img.set_metadata_count(b, 1);
    let f = TempFile::with_bytes("leak.img", &img.0);
    let out = dmsim_check(f.path(), &["--ignore-space-map-totals"]);
    assert_eq!(out.status.code(), Some(1), "a leak alone exits 1, as thin_check 0.9.0 does");
    assert!(String::from_utf8_lossy(&out.stderr).contains("leaked"));
    let out = dmsim_check(f.path(), &["--ignore-space-map-totals", "--ignore-non-fatal-errors"]);
    assert_eq!(out.status.code(), Some(0));
    if let Some(clean) = thin_check_clean(&img, &[]) {
        assert!(!clean);
        assert_eq!(thin_check_clean(&img, &["--ignore-non-fatal-errors"]), Some(true));
    }
}

#[test]
fn check_prints_summary_and_json() {
    let Some(img) = restore("two_devices.xml", SIZE) else { return };
    let f = TempFile::with_bytes("sum.img", &img.0);
    let out = dmsim_check(f.path(), &[]);
    // thin_restore's inconsistent totals are reported by default.
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("TRANSACTION_ID=2\n"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("metadata space map"));
    let out = dmsim_check(f.path(), &["--json", "--ignore-space-map-totals"]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(v["clean"], true);
    assert_eq!(v["transaction_id"], 2);
    assert_eq!(v["devices"].as_array().map(|a| a.len()), Some(2));
}

#[test]
fn unusable_inputs_exit_2_with_context() {
    let out = dmsim_check(Path::new("/nonexistent/meta.img"), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot open /nonexistent/meta.img"));
    let zeros = TempFile::with_bytes("zero.img", &vec![0u8; 64 * 1024]);
    let out = dmsim_check(zeros.path(), &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a thin-pool superblock"));
    let tiny = TempFile::with_bytes("tiny.img", b"<superblock");
    let out = dmsim_check(tiny.path(), &[]);
    assert_eq!(out.status.code(), Some(2));
    // The dump judges unusable input exactly as the checker does.
    let out = dmsim(&[OsStr::new("metadata"), OsStr::new("dump"), zeros.path().as_os_str()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("all zeroes"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A superblock overwritten by another metadata block is damage to a pool
/// (1) for both `check` and `dump`, not unusable input (2); a dump to the
/// image itself is refused.
#[test]
fn an_overwritten_superblock_is_damage_for_check_and_dump() {
    let Some(mut img) = restore("two_devices.xml", SIZE) else { return };
    let node = (1..img.0.len() / BLOCK_SIZE)
        .find(|&b| {
            let block = &img.0[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE];
            dmsim_model::pdata::checksum::salt_of(block) == Some(BlockKind::BtreeNode.salt())
        })
        .expect("the image has a btree node");
    img.0.copy_within(node * BLOCK_SIZE..(node + 1) * BLOCK_SIZE, 0);
    let f = TempFile::with_bytes("overwritten.img", &img.0);
    let out = dmsim_check(f.path(), &[]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("the superblock is overwritten: block 0 holds a valid btree node block"), "{err}");
    let out = dmsim(&[OsStr::new("metadata"), OsStr::new("dump"), f.path().as_os_str()]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    if let Some(clean) = thin_check_clean(&img, &[]) {
        assert!(!clean, "thin_check calls it damage too");
    }
    let out = dmsim(&[
        OsStr::new("metadata"),
        OsStr::new("dump"),
        f.path().as_os_str(),
        OsStr::new("-o"),
        f.path().as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(std::fs::read(f.path()).unwrap(), img.0, "the image is untouched");
}
