//! The cache campaign (`dmsim_sim::cache_run`): default seeds run clean,
//! runs are deterministic, traces replay byte for byte, every deliberately
//! broken cache target is caught and minimized, and each kernel behaviour
//! the candidate fixes address is caught when its fix is off; Debian's
//! `cache_check` runs where it should, changes no trace, and its verdict is
//! recorded and minimizes.

use std::path::PathBuf;

use dmsim_model::mutation::Mutations;
use dmsim_sim::cache_run::{self, CacheCampaignSettings, CacheRunConfig, CacheWorkload};
use dmsim_sim::cache_sim::CacheStats;
use dmsim_sim::run::{violation_signature, Checkers};
use dmsim_traces::binary::to_bytes;
use dmsim_traces::text::to_text;

const OPS: usize = 300;

fn outcome(seed: u64, settings: &CacheCampaignSettings) -> cache_run::CacheRunOutcome {
    cache_run::run_config(&CacheRunConfig::for_seed(seed, OPS, settings), &Checkers::default())
}

#[test]
fn default_seeds_run_clean_and_reach_every_migration() {
    let settings = CacheCampaignSettings::default();
    let mut total = CacheStats::default();
    for seed in 0..32 {
        let out = outcome(seed, &settings);
        if let Some(v) = &out.violation {
            panic!("seed {seed} ({}): {v}\n{}", out.trace.header.workload, to_text(&out.trace));
        }
        total.add(&out.stats);
    }
    eprintln!("{total:?}");
    assert!(total.reads_checked > 1000, "{total:?}");
    assert!(
        total.migrations.iter().all(|&m| m > 0),
        "promotions, demotions and writebacks all happen: {total:?}"
    );
    assert!(total.overwrites > 0 && total.crashes > 0 && total.reloads > 0, "{total:?}");
    assert!(total.reloads_refused > 0, "passthrough refused with dirty blocks: {total:?}");
    assert!(
        total.resizes > total.resizes_refused && total.resizes_refused > 0,
        "resizes taken and refused: {total:?}"
    );
    assert!(total.clean_checks > 0 && total.io_errors > 0, "{total:?}");
}

#[test]
fn a_seed_gives_the_same_trace_every_time() {
    let settings = CacheCampaignSettings::default();
    for seed in [3, 11, 42] {
        let a = outcome(seed, &settings);
        let b = outcome(seed, &settings);
        assert_eq!(to_text(&a.trace), to_text(&b.trace), "seed {seed}");
        assert_eq!(to_bytes(&a.trace), to_bytes(&b.trace), "seed {seed}");
    }
}

#[test]
fn a_trace_replays_byte_for_byte_from_its_header() {
    let settings = CacheCampaignSettings::default();
    for seed in [5, 21] {
        let out = outcome(seed, &settings);
        let r = cache_run::replay(&out.trace, &Checkers::default()).unwrap();
        assert_eq!(r.first_difference, None, "seed {seed}");
    }
}

/// The first seed (of `limit`) on which `cfg_for` fails, and its outcome.
fn first_failure(
    limit: u64,
    cfg_for: impl Fn(u64) -> CacheRunConfig,
) -> Option<(u64, cache_run::CacheRunOutcome)> {
    (0..limit)
        .map(|s| (s, cache_run::run_config(&cfg_for(s), &Checkers::default())))
        .find(|(_, o)| o.violation.is_some())
}

#[test]
fn every_cache_mutation_is_caught_and_minimized() {
    for (name, _) in Mutations::CACHE_TARGET {
        let settings =
            CacheCampaignSettings { mutations: Mutations::by_name(name).unwrap(), ..Default::default() };
        // 128 seeds: one in six is a resize seed, whose workload some of
        // the older mutations need luck to show in.
        let (seed, out) = first_failure(128, |s| CacheRunConfig::for_seed(s, OPS, &settings))
            .unwrap_or_else(|| panic!("{name}: no seed of 128 catches it"));
        let v = out.violation.as_ref().unwrap();
        let m = cache_run::minimize(&out.trace, &Checkers::default(), |_, _| {}).unwrap();
        eprintln!("{name}: seed {seed}: {v}; minimized {} -> {} ops", m.ops_before, m.ops_after);
        assert!(m.ops_after < m.ops_before && m.ops_after <= 40, "{name}: {} ops left", m.ops_after);
        let (kind, message) = m.trace.violation().expect("the minimized trace fails");
        assert_eq!(violation_signature(kind, message), m.signature, "{name}");
        // The same trace on the unbroken model passes.
        let mut header = m.trace.header.clone();
        for (k, v) in &mut header.params {
            if k == "mutations" {
                v.clear();
            }
        }
        let cfg = CacheRunConfig::from_header(&header).unwrap();
        let ops: Vec<_> = m.trace.ops().collect();
        let clean = cache_run::run_ops(&cfg, &ops, &Checkers::default());
        assert!(clean.violation.is_none(), "{name}: the minimized trace fails without the mutation too");
    }
}

/// Each candidate fix guards against a kernel behaviour the campaign
/// catches: with the fix off (as the kernel is), a seed that passes with it
/// fails.
#[test]
fn each_kernel_behaviour_is_caught_with_its_fix_off() {
    type Off = fn(&mut dmsim_model::cache::core::CacheFixes);
    let fixes: [(&str, Off); 4] = [
        ("resume_clears_clean_shutdown", |f| f.resume_clears_clean_shutdown = false),
        ("flush_before_commit", |f| f.flush_before_commit = false),
        ("fua_overwrite_waits_for_commit", |f| f.fua_overwrite_waits_for_commit = false),
        ("writethrough_pairs_one_at_a_time", |f| f.writethrough_pairs_one_at_a_time = false),
    ];
    let settings = CacheCampaignSettings::default();
    for (name, off) in fixes {
        let cfg_for = |s| {
            let mut cfg = CacheRunConfig::for_seed(s, OPS, &settings);
            off(&mut cfg.cache.options.fixes);
            cfg
        };
        let (seed, out) =
            first_failure(400, cfg_for).unwrap_or_else(|| panic!("{name}: nothing caught in 400 seeds"));
        eprintln!("{name} off: seed {seed}: {}", out.violation.as_ref().unwrap());
        let with_fix = outcome(seed, &settings);
        assert!(with_fix.violation.is_none(), "{name}: seed {seed} fails with the fix on too");
    }
}

/// A withdrawn model finding (`read_only_flushes_fail`, from the
/// campaign's seed 677 with --kernel-as-is; minimized): after a metadata
/// write error at a reload's clean shutdown the cache aborts and goes
/// read-only; a write to a block the aborted transaction had promoted goes
/// to the cache block; then a flush. The model used to clear `changed` at
/// the abort, so the flush found nothing to commit, succeeded, and a crash
/// lost the flushed write. 6.1's abort keeps `changed` (it does not re-read
/// the superblock's fields), so the flush asks for a commit, which
/// read-only mode refuses: the flush fails with EIO — on the stock kernel
/// too (`kernel-shim/tests/kernel_findings_one_boot.rs`). The model now
/// does the same, with the candidate fix or without; nothing is lost.
#[test]
fn a_read_only_flush_after_an_abort_fails_as_on_the_stock_kernel() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/cache-read-only-flush-of-a-dropped-mapping.trace");
    let recorded = dmsim_traces::text::from_text(&std::fs::read_to_string(path).unwrap()).unwrap();
    let run = |on: bool| {
        let mut header = recorded.header.clone();
        for (k, v) in &mut header.params {
            if k == "fix.read_only_flushes_fail" {
                *v = if on { "1" } else { "0" }.to_string();
            }
        }
        let cfg = CacheRunConfig::from_header(&header).unwrap();
        let ops: Vec<_> = recorded.ops().collect();
        cache_run::run_ops(&cfg, &ops, &Checkers::default())
    };
    for fix in [false, true] {
        let out = run(fix);
        assert_eq!(out.violation.as_ref().map(|v| v.to_string()), None, "fix {fix}: nothing is lost");
        let text = dmsim_traces::to_text(&out.trace);
        assert!(text.contains("\nflush dev=0\n"), "{text}");
        // The flush is bio 2; it fails.
        assert!(text.contains("done bio=2 dev=0 EIO"), "fix {fix}: the flush fails:\n{text}");
    }
}

// ---- Debian's cache_check at recoveries and at the end ----

/// `cache_check` from `PATH`. Missing: a panic under `CI=true` (CI
/// installs thin-provisioning-tools), otherwise a loud SKIPPED and `None`.
fn require_cache_check() -> Option<PathBuf> {
    let found = Checkers::from_path().cache_check;
    if found.is_none() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("cache_check is not installed, and CI=true: apt-get install -y thin-provisioning-tools");
        }
        eprintln!("SKIPPED: cache_check not installed (apt-get install -y thin-provisioning-tools)");
    }
    found
}

/// The campaign path runs cache_check on every final image and, for the
/// seeds `cache_check_at_recoveries` picks, at every recovery; it accepts
/// every image of the clean model, and the traces are those of runs without
/// it.
#[test]
fn cache_check_runs_at_recoveries_and_changes_no_trace() {
    let Some(tool) = require_cache_check() else { return };
    let checkers = Checkers { cache_check: Some(tool), ..Checkers::default() };
    let settings = CacheCampaignSettings::default();
    let (mut sampled, mut sampled_checks, mut sampled_crashes) = (0, 0, 0);
    for seed in 0..24 {
        let cfg = CacheRunConfig::for_seed(seed, OPS, &settings);
        let with = cache_run::run_config(&cfg, &checkers);
        let without = cache_run::run_config(&cfg, &Checkers::default());
        if let Some(v) = &with.violation {
            panic!("seed {seed}: {v}");
        }
        assert_eq!(
            to_text(&with.trace),
            to_text(&without.trace),
            "seed {seed}: cache_check changed the trace"
        );
        assert_eq!(without.cache_checked, 0);
        if cache_run::cache_check_at_recoveries(seed) {
            sampled += 1;
            sampled_checks += with.cache_checked;
            sampled_crashes += with.stats.crashes;
        } else {
            assert_eq!(with.cache_checked, 1, "seed {seed}: the final image only");
        }
    }
    // Every final image, and the recoveries but those of a cache of 0
    // blocks (a crash before the first commit; 0.9.0 rejects that).
    eprintln!("{sampled} seeds at every recovery: {sampled_checks} images, {sampled_crashes} crashes");
    assert!(sampled >= 4 && sampled_crashes >= 10, "{sampled} seeds, {sampled_crashes} crashes");
    assert!(sampled_checks > sampled + sampled_crashes / 2, "{sampled_checks} images checked");
}

/// The function recoveries use reports an image cache_check rejects as a
/// `cache_check` failure carrying cache_check's output.
#[test]
fn cache_check_rejecting_an_image_is_a_violation_with_its_output() {
    use dmsim_model::cache::superblock::CacheSuperblock;
    use dmsim_sim::cache_sim::{CacheCheck, CacheSim, CacheSimConfig};
    use dmsim_traces::Op;

    let Some(tool) = require_cache_check() else { return };
    let mut sim = CacheSim::new(CacheSimConfig::default()).unwrap();
    for i in 0..24u8 {
        let write =
            Op::Write { dev: 0, sector: u32::from(i % 8) * 64, nr_sectors: 64, fua: false, preflush: false };
        for op in [write, Op::Worker, Op::Complete { pick: i }, Op::Complete { pick: 0 }] {
            sim.apply(&op).unwrap();
        }
    }
    sim.finish().unwrap();
    let clean = sim.metadata_image();
    assert_eq!(sim.run_cache_check(&clean), Ok(false), "not set: not run");
    sim.set_cache_check(Some(CacheCheck { tool, at_recoveries: true }));
    assert_eq!(sim.run_cache_check(&clean), Ok(true));
    // The mapping array's root block overwritten with zeroes.
    let mut broken = clean.clone();
    let root = CacheSuperblock::decode(&clean[..4096]).mapping_root as usize;
    assert!(root > 0);
    broken[root * 4096..(root + 1) * 4096].fill(0);
    let f = sim.run_cache_check(&broken).unwrap_err();
    eprintln!("{f}");
    assert_eq!(f.kind, "cache_check");
    assert!(f.what.starts_with("cache_check rejects a metadata image the model's checker accepts: "), "{f}");
    assert!(f.what.contains("examining superblock; examining mapping array"), "its output: {f}");
    assert_eq!(sim.cache_checked(), 2);
}

/// A stand-in for cache_check that rejects every image: the campaign path
/// records its verdict as the violation of the first recovery it checks
/// (or of the end of the run), with its output; the trace up to there is
/// the clean run's; and the failing trace minimizes with it.
#[test]
fn a_cache_check_verdict_is_recorded_where_it_ran_and_minimizes() {
    use std::os::unix::fs::PermissionsExt;

    use dmsim_traces::{Event, Op};

    let dir =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("fake-ccheck-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fake = dir.join("cache_check");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho examining superblock\necho 'fake: mapping array damaged' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let checkers = Checkers { cache_check: Some(fake), ..Checkers::default() };
    let settings = CacheCampaignSettings::default();
    let mut at_recovery = None;
    let mut at_end = None;
    for seed in 0..64 {
        let cfg = CacheRunConfig::for_seed(seed, OPS, &settings);
        let out = cache_run::run_config(&cfg, &checkers);
        let v = out.violation.as_ref().unwrap_or_else(|| panic!("seed {seed}: the fake accepted something"));
        assert_eq!(v.kind, "cache_check", "seed {seed}: {v}");
        assert_eq!(
            v.what,
            "cache_check rejects a metadata image the model's checker accepts: examining superblock; \
             fake: mapping array damaged"
        );
        assert_eq!(out.cache_checked, 1, "seed {seed}: the run stops at the first verdict");
        // Up to the violation, the events are those of the run without it.
        let clean = cache_run::run_config(&cfg, &Checkers::default());
        let n = out.trace.events.len() - 1;
        assert!(matches!(&out.trace.events[n], Event::Violation { kind, .. } if kind == "cache_check"));
        assert_eq!(out.trace.events[..n], clean.trace.events[..n], "seed {seed}");
        let ops: Vec<Op> = out.trace.ops().collect();
        if v.step <= OPS {
            assert!(cache_run::cache_check_at_recoveries(seed), "seed {seed}: a recovery checked: {v}");
            assert!(matches!(ops[v.step - 1], Op::Crash { .. }), "seed {seed}: step {} is a crash", v.step);
            at_recovery.get_or_insert((seed, out));
        } else {
            assert_eq!(v.step, OPS + 1, "seed {seed}: the end of the run");
            at_end.get_or_insert(seed);
        }
        if at_recovery.is_some() && at_end.is_some() {
            break;
        }
    }
    let (seed, out) = at_recovery.expect("a seed whose recovery cache_check rejects");
    assert!(at_end.is_some(), "a seed that reaches its end");
    let m = cache_run::minimize(&out.trace, &checkers, |_, _| {}).unwrap();
    eprintln!("seed {seed}: minimized {} -> {} ops", m.ops_before, m.ops_after);
    assert!(m.signature.starts_with("cache_check: "), "{}", m.signature);
    let (kind, _) = m.trace.violation().expect("the minimized trace fails");
    assert_eq!(kind, "cache_check");
    assert!(m.ops_after < m.ops_before);
    // Without the checker the minimized trace passes, and replays.
    let r = cache_run::replay(&m.trace, &Checkers::default()).unwrap();
    assert!(r.outcome.violation.is_none());
    let r = cache_run::replay(&m.trace, &checkers).unwrap();
    assert_eq!(r.first_difference, None);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resize_seeds_run_clean_and_reach_every_outcome() {
    let settings = CacheCampaignSettings { workload: Some(CacheWorkload::Resize), ..Default::default() };
    let mut total = CacheStats::default();
    for seed in 0..24 {
        let out = outcome(seed, &settings);
        if let Some(v) = &out.violation {
            panic!("seed {seed}: {v}\n{}", to_text(&out.trace));
        }
        total.add(&out.stats);
    }
    eprintln!("{total:?}");
    assert!(total.resizes > 2 * total.resizes_refused, "{total:?}");
    assert!(total.resizes_refused > 0 && total.repairs > 0, "{total:?}");
}

/// A hand-written resize story on the simulator: a refused cache shrink
/// (dirty blocks; the metadata repaired), a grown cache and origin (the
/// new origin reads zeroes), a refused origin shrink (a dirty block past
/// the end), then a clean one; the oracle judges every read.
#[test]
fn a_resize_story_on_the_simulator() {
    use dmsim_sim::cache_sim::{CacheSim, CacheSimConfig};
    use dmsim_traces::Op;
    let run = |options| -> Result<(CacheStats, (u64, u64)), String> {
        let cfg = CacheSimConfig { options, ..CacheSimConfig::default() };
        let bs = cfg.block_sectors as u32;
        let mut sim = CacheSim::new(cfg).map_err(|f| f.to_string())?;
        let mut ops = vec![Op::Discard { dev: 0, sector: 0, nr_sectors: 32 * bs }];
        // Whole-block writes to discarded blocks: promoted by overwrite,
        // dirty in cache blocks 0..8 (origin blocks 0..8).
        for b in 0..8 {
            ops.push(Op::Write {
                dev: 0,
                sector: b * bs,
                nr_sectors: bs as u16,
                fua: false,
                preflush: false,
            });
        }
        ops.extend([
            Op::Resize { cache_blocks: 2, origin_blocks: 32 },
            Op::Resize { cache_blocks: 16, origin_blocks: 64 },
            Op::Read { dev: 0, sector: 50 * bs, nr_sectors: bs as u16 },
            Op::Resize { cache_blocks: 16, origin_blocks: 4 },
            Op::Reload {
                mode: dmsim_traces::op::CacheIoMode::Writeback,
                policy: dmsim_traces::op::CachePolicyKind::Cleaner,
            },
        ]);
        for op in &ops {
            sim.apply(op).map_err(|f| f.to_string())?;
            sim.quiesce().map_err(|f| f.to_string())?;
        }
        for _ in 0..6 {
            sim.apply(&Op::Tick { millis: 1000 }).map_err(|f| f.to_string())?;
            sim.quiesce().map_err(|f| f.to_string())?;
        }
        sim.apply(&Op::Resize { cache_blocks: 4, origin_blocks: 6 }).map_err(|f| f.to_string())?;
        for b in 0..6 {
            sim.apply(&Op::Read { dev: 0, sector: b * bs, nr_sectors: bs as u16 })
                .map_err(|f| f.to_string())?;
            sim.quiesce().map_err(|f| f.to_string())?;
        }
        sim.finish().map_err(|f| f.to_string())?;
        Ok((sim.stats(), sim.geometry()))
    };
    let (stats, geometry) = run(Default::default()).unwrap();
    assert_eq!((stats.resizes, stats.resizes_refused, stats.repairs), (4, 2, 1), "{stats:?}");
    assert_eq!(geometry, (4, 6));
    // With the shrink that drops dirty blocks, the oracle (or the
    // simulator's own expectation of the kernel's refusal) objects.
    let broken = dmsim_model::cache::core::CacheOptions {
        mutations: Mutations::by_name("cache-shrink-drops-dirty").unwrap(),
        ..Default::default()
    };
    let e = run(broken).unwrap_err();
    assert!(e.contains("resize to 2 cache blocks and 32 origin blocks was taken"), "{e}");
}
