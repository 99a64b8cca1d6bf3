//! `dmsim metadata check|dump` on dm-cache metadata images: recognised by
//! their superblock, checked by the cache checker and dumped as
//! `cache_dump` does (held against Debian's cache_dump 0.9.0 on version 1
//! images and on version 2 images without dirty blocks), with the common
//! exit statuses and `--json`. And the cache campaign on the command line:
//! `check --campaign cache`, its failures folder, and `run`, `replay`,
//! `minimize`, `show` of cache traces.

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
    // A dirty bit on an unmapped cache block (2 is unmapped: 0, 3, 6... are):
    // reported, but not damage — every unclean shutdown can leave one (dirty
    // bits are written only by a clean shutdown): exit 1 as for any
    // non-fatal problem, "damaged" false.
    let d = read_image(&mut MemDevice::from_bytes(img.0.clone())).unwrap();
    let b = d.blocks.dirty.as_ref().unwrap().ablocks[0];
    let mut bad = img.clone();
    bad.block_mut(b)[24] |= 1 << 2;
    bad.reseal(b, BlockKind::Array);
    let f = TempFile::with_bytes("cache-json-bad.img", &bad.0);
    let out = metadata("check", f.path(), &["--json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(v["damaged"], false);
    let p = &v["problems"][0];
    assert_eq!(p["structure"], "dirty bitset");
    assert_eq!(p["block"], b);
    assert_eq!(p["severity"], "non-fatal");
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
        // cache_restore 0.9.0 leaks a block in version 1 and, in version 2,
        // sets the dirty bit of every unmapped cache block: both non-fatal
        // (the kernel leaves such dirty bits after an unclean shutdown).
        let out = metadata("check", f.path(), &["--ignore-non-fatal-errors"]);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{xml}: {err}");
        if version == 2 {
            assert!(err.contains("[non-fatal] dirty bitset"), "{xml}: {err}");
        } else {
            assert!(err.contains("leaked"), "{xml}: {err}");
        }
        assert_eq!(metadata("check", f.path(), &[]).status.code(), Some(1), "{xml}");
    }
}

// ---- The cache campaign on the command line ----

fn dmsim_str(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dmsim")).args(args).output().expect("run dmsim")
}

/// A fresh, empty folder of its own for one test.
fn scratch(tag: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("cache-cli-{}-{n}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch folder");
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

#[test]
fn check_campaign_cache_passes_and_prints_the_cache_summary() {
    let dir = scratch("check");
    let failures = dir.join("failures");
    let out = dmsim_str(&["check", "--campaign", "cache", "--seeds", "0..6", "--failures", s(&failures)]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", text(&out.stderr));
    for needle in [
        "dmsim check: seeds 0..6 (6 seeds), campaigns: cache\n",
        "cache campaign: 300 ops per seed, workload each seed's own",
        "requests",
        "reads checked",
        "crashes",
        "reloads",
        "refused",
        "promotions",
        "by overwrite",
        "demotions",
        "writebacks",
        "metadata commits",
        "clean-block checks",
        "cache_check runs",
        "faults fired",
        "crash-torn",
        "cache-modes",
        "no violations",
    ] {
        assert!(stdout.contains(needle), "{needle:?} missing from:\n{stdout}");
    }
    assert!(!stdout.contains("thin campaign"), "only the cache campaign ran:\n{stdout}");
    assert!(!failures.exists(), "no failures, no folder");
    // A thin workload with the cache campaign alone is refused, not ignored.
    let out = dmsim_str(&["check", "--campaign", "cache", "--workload", "random", "--seeds", "0..1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("is a thin workload"), "{}", text(&out.stderr));
}

/// `--campaign all` (the default) includes the cache campaign.
#[test]
fn the_default_campaign_includes_the_cache_campaign() {
    let out = dmsim_str(&["check", "--seeds", "0..1", "--ops", "100", "--metadata-ops", "20", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
    assert_eq!(v["cache"]["seeds"], 1, "{v}");
    assert_eq!(v["thin"]["seeds"], 1, "{v}");
    assert_eq!(v["cache_metadata"]["seeds"], 1, "{v}");
}

/// The same seeds give the same bytes, whatever the thread count; the
/// determinism check covers cache seeds.
#[test]
fn the_cache_campaign_is_deterministic() {
    let args = ["check", "--campaign", "cache", "--seeds", "0..4", "--json"];
    let first = dmsim_str(&[&args[..], &["--jobs", "1"]].concat());
    let second = dmsim_str(&[&args[..], &["--jobs", "2"]].concat());
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
    assert_eq!(first.stdout, second.stdout, "two runs of the same seeds differ");
    let v: serde_json::Value = serde_json::from_slice(&first.stdout).expect("JSON summary");
    let cache = &v["cache"];
    assert_eq!(cache["seeds"], 4, "{v}");
    assert_eq!(cache["ops"], 1200, "{v}");
    assert!(cache["reads_checked"].as_u64().unwrap() > 0, "{cache}");
    assert!(cache["requests"].as_u64().unwrap() > 0, "{cache}");
    assert_eq!(cache["violations"], 0);
    assert!(v["thin"].is_null() && v["metadata"].is_null() && v["cache_metadata"].is_null(), "{v}");
    // cache_check on every final image (and at any recovery of seed 0).
    if require_tool("cache_check").is_some() {
        assert_eq!(cache["cache_check_installed"], true, "{cache}");
        assert!(cache["cache_check_runs"].as_u64().unwrap() >= 4, "{cache}");
    }
    let out = dmsim_str(&[&args[..], &["--check-determinism"]].concat());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON summary");
    assert_eq!(v["determinism"]["checked"], true);
    assert_eq!(v["determinism"]["differences"].as_array().map(Vec::len), Some(0));
}

/// A broken cache (a demotion that frees a dirty block) is caught: the
/// failing trace and its minimized trace are written; the minimized one
/// replays to the same violation, minimizes again, shows, and is refused
/// by the kernel replay; the reproduce line reruns the seed.
#[test]
fn a_broken_cache_is_caught_minimized_replayed_and_shown() {
    let dir = scratch("mutation");
    let failures = dir.join("failures");
    let out = dmsim_str(&[
        "check",
        "--mutation",
        "cache-demote-frees-dirty",
        "--campaign",
        "cache",
        "--seeds",
        "0..128",
        "--failures",
        s(&failures),
        "--minimize-max",
        "1",
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains("(with a deliberately broken model: cache-demote-frees-dirty)"), "{stdout}");
    let line = stdout.lines().find(|l| l.starts_with("FAILED cache seed ")).expect("a FAILED line");
    let seed: u64 = line["FAILED cache seed ".len()..].split(' ').next().unwrap().parse().unwrap();
    let trace = failures.join(format!("cache-seed-{seed}.trace"));
    let min = failures.join(format!("cache-seed-{seed}.min.trace"));
    assert!(trace.is_file(), "{stdout}");
    assert!(min.is_file(), "{stdout}");
    assert!(stdout.contains(&format!("replay it: dmsim replay {}", min.display())), "{stdout}");

    let out = dmsim_str(&["replay", s(&min)]);
    let replayed = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{replayed}\n{}", text(&out.stderr));
    assert!(replayed.contains("the recorded violation recurs"), "{replayed}");
    assert!(replayed.contains("byte-identical to the recording"), "{replayed}");
    assert!(replayed.contains("promotions"), "{replayed}");

    let out = dmsim_str(&["show", s(&min)]);
    let shown = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(shown.contains("(a cache trace)"), "{shown}");
    assert!(shown.contains("*** VIOLATION ("), "{shown}");
    assert!(shown.contains("the run ended with a violation"), "{shown}");

    // A cache trace with a crash: the serialized kernel replay refuses it
    // (exit 2) before any VM is needed (on a shape it takes otherwise).
    let header: String = std::fs::read_to_string(&min)
        .unwrap()
        .lines()
        .filter(|l| ["dmsim-trace", "seed ", "workload ", "param "].iter().any(|p| l.starts_with(p)))
        .map(|l| match l.split(' ').nth(1) {
            Some("block_sectors") => "param block_sectors 128".to_string(),
            Some("discard_passdown") => "param discard_passdown 1".to_string(),
            Some("policy") => "param policy smq".to_string(),
            _ => l.to_string(),
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let crashing = dir.join("crashing.trace");
    std::fs::write(&crashing, format!("{header}write dev=0 sector=0 nr=8\ncrash lose-all seed=0\n")).unwrap();
    let out = dmsim_str(&["replay", "--on", "kernel", s(&crashing)]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(err.contains("takes no crashes or faults"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let again = dir.join("again.min.trace");
    let out = dmsim_str(&["minimize", s(&min), "-o", s(&again)]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(again.is_file());

    // The reproduce line reruns the seed: the same trace, the same verdict.
    let reproduce = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("reproduce: dmsim "))
        .expect("a reproduce line")
        .to_string();
    let rerun = dir.join("rerun.trace");
    let mut args: Vec<&str> = reproduce.split(' ').collect();
    let at = args.iter().position(|a| *a == "--trace").expect("--trace");
    args[at + 1] = s(&rerun);
    assert!(args.contains(&"--workload"), "{reproduce}");
    let out = dmsim_str(&args);
    assert_eq!(out.status.code(), Some(1), "{}\n{}", text(&out.stdout), text(&out.stderr));
    assert!(
        text(&out.stdout).starts_with(&format!("dmsim run: cache seed {seed}, ")),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(std::fs::read(&rerun).unwrap(), std::fs::read(&trace).unwrap(), "the rerun's trace differs");
}

/// Without cache_check on `PATH`, the cache campaign is judged by the
/// model's checker only, and says so; under `CI=true` it is an error.
#[test]
fn a_missing_cache_check_is_an_error_under_ci_only() {
    let empty = scratch("no-path");
    let run = |ci: Option<&str>| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_dmsim"));
        c.args(["check", "--seeds", "0..1", "--campaign", "cache"]).env("PATH", &empty);
        match ci {
            Some(v) => c.env("CI", v),
            None => c.env_remove("CI"),
        };
        c.output().expect("run dmsim")
    };
    let out = run(Some("true"));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("cache_check is not installed"), "{}", text(&out.stderr));
    let out = run(None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr)
            .contains("cache_check is not installed; cache runs are judged by the model's checker only"),
        "{}",
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert!(
        stdout.lines().any(|l| l.contains("cache_check runs") && l.ends_with("not installed")),
        "{stdout}"
    );
}

/// `dmsim run` of a cache seed says how many images cache_check checked.
#[test]
fn a_cache_run_reports_its_cache_check_runs() {
    if require_tool("cache_check").is_none() {
        return;
    }
    // Seed 0 checks every recovery.
    let out = dmsim_str(&["run", "--seed", "0", "--workload", "cache-durability"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", text(&out.stderr));
    let line =
        stdout.lines().find(|l| l.trim_start().starts_with("cache_check: ")).expect("a cache_check line");
    let n: u64 = line
        .trim()
        .strip_prefix("cache_check: ran on ")
        .and_then(|r| r.split(' ').next())
        .map_or(0, |n| n.parse().unwrap());
    assert!(n > 1, "{stdout}");
}
