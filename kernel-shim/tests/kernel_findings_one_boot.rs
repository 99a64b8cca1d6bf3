//! Kernel findings shown on the real kernel with the pool (or the cache)
//! on controlled disks, all in one boot: four thin races, a metadata
//! fault, and two cache findings (a metadata fault, a race).
//!
//! The races: each a trace that orders the race on the simulator with
//! `worker` and `complete` ops, and a race job (`Job::Race`) that gives
//! stock 6.1 the same order — some ops in the background, the data disk's
//! requests held at a gate until the steps serve them. The kernel's
//! devices are held at L1 against the simulator's run of the trace as
//! stock 6.1 (which shows the damage), and, as the detector, against the
//! run with the candidate fix (which does not).
//!
//! **`discard_spares_blocks_being_unshared`** (trace
//! `no-passdown-discard-races-break-sharing.trace`): a thin device's block
//! is shared with a snapshot. A partial write to it breaks sharing: the
//! pool allocates a new block and copies the shared one there (kcopyd),
//! the write waiting in the data block's cell; the virtual block's cell is
//! already released. A no-passdown discard of the block takes the virtual
//! cell, does not look at the data cell, and removes the mapping at once.
//! A second write to the block finds it unmapped, provisions another block
//! and is acknowledged. Then the copy finishes: its mapping replaces the
//! second write's, and the acknowledged write is gone.
//!
//! **`read_only_deferred_bios_take_cells`** (trace
//! `out-of-data-space-fua-write-past-a-discard-race.trace`): a full pool
//! with `error_if_no_space` is out of data space. A write X to a mapped
//! block is in flight; a no-passdown discard of another block B takes B's
//! virtual cell and waits for X (`all_io_ds`); a FUA write W to B is
//! deferred to the worker, which in out-of-data-space mode remaps it
//! without taking the cell (`process_bio_read_only`) and issues it to B.
//! X completes, the discard unmaps and frees B, a flush commits (the pool
//! is back in write mode), another device's write provisions B and
//! completes; then W lands on B: the other device reads the first
//! device's data.
//!
//! **`shared_read_defers_waiting_writes`** (trace
//! `out-of-data-space-write-behind-a-shared-read-race.trace`): a full
//! pool (`error_if_no_space`) out of data space, every block of the
//! origin shared with a snapshot. A discard changes the origin's mapping,
//! so the pool's 1 s timer makes the worker commit, and the commit's
//! flush of the data device is held, so the worker waits in it. A read of
//! the snapshot's block 0 (shared) is deferred to the worker holding the
//! block's virtual cell; a write to the same block arrives and waits in
//! that cell. The flush is served: the worker, out of data space, handles
//! the read with `process_bio_read_only`, which issues the read to the
//! shared block — and the write waiting in its cell too
//! (`inc_remap_and_issue_cell`). The origin reads the snapshot's write.
//!
//! **`refcount_errors_fail_the_operation`** (trace
//! `refcount-error-leaves-a-bitmap-without-overflow.trace`, found by the
//! campaign, seed 1800, minimized to 13 ops): a bit flipped in the read
//! of the data space map's overflow-tree root while a shared block's
//! count goes from 2 to 3. 6.1 sets the bitmap entry to "3 or more", then
//! the overflow insert fails: its shadow of the root has already
//! allocated a new block and dropped the root's reference
//! (`__shadow_block` reads the original last), and the btree value type
//! only logs the error ("ref count insert failed"). The next commit
//! persists both: a bitmap saying 3 or more with no overflow entry, and a
//! metadata block in use counted free (which a later allocation can hand
//! out again). Replayed as a ublk job, the kernel's final metadata has
//! the same damage as the model's (and the same blocks: L3 identical when
//! the commits fall alike); judged against the model with the fix (the
//! failed count fails the operation), the same run differs.
//!
//! **`failed_message_aborts`, the refcount fix's companion** (trace
//! `create-snap-after-a-refcount-error.trace`, the campaign's seed 2546,
//! minimized): a `create-snap` whose origin-root inc meets a read error.
//! On 6.1 (`dm_tm_inc` returns nothing) the snapshot is made and the
//! refcount finding's damage committed: the kernel's run is L1-, L2- and
//! L3-identical to the model as 6.1; the model with the refcount fix
//! fails the message instead, which the kernel's run does not match.
//!
//! **dm-cache `read_only_flushes_fail`** (refuted on 6.1): a flush after
//! the cache aborted a failed commit and went read-only fails with EIO on
//! the kernel, as the corrected model says.
//!
//! **dm-cache `writethrough_pairs_one_at_a_time`** (trace
//! `cache-writethrough-pairs-race.trace`, a cache race:
//! `dmsim_kernel_shim::cache_race`): origin block 8 cached and clean, two
//! one-sector writethrough writes to it in flight together; the origin
//! disk serves A then B, the cache disk B then A. The block stays
//! recorded clean with the cache holding A and the origin B: a read
//! returns A, and after a reload in passthrough mode the same read
//! returns B, with no write in between.
//!
//! Needs what `kernel_ublk_crash` needs (qemu, `linux-image-amd64`,
//! `linux-source-6.1`, `linux-headers-<release>`). Without them the VM
//! part prints SKIPPED, or fails under `CI=true`; the model's part runs
//! everywhere.

#[path = "common/thin_tools.rs"]
mod thin_tools;

use std::sync::OnceLock;

use thin_tools::skip_or_fail;

use dmsim_kernel_shim::cache_crash::judge_ublk_crash_states;
use dmsim_kernel_shim::cache_race::{judge_race, race_plan};
use dmsim_kernel_shim::cache_replay::{ublk_plan, CachePlan};
use dmsim_kernel_shim::equivalence::{compare_l1, simulate_as_written, FinalState};
use dmsim_kernel_shim::thin_replay::{judge, parse_race_steps, Verdict};
use dmsim_kernel_shim::{Job, KernelRun, KernelShim, ShimError};
use dmsim_model::cache::core::CacheFixes;
use dmsim_sim::cache_run::{self, CacheRunConfig};
use dmsim_sim::run::Checkers;
use dmsim_traces::{Op, Trace};

/// One finding's race: its trace, its fix and the kernel's steps (as
/// `dmsim replay --on kernel --race` takes them).
struct Race {
    fixture: &'static str,
    fix: &'static str,
    steps: &'static str,
}

/// The race's job: its trace as stock 6.1, its steps parsed and checked
/// against the trace.
fn race_job(race: &Race) -> Job {
    let trace = trace(race, false);
    let steps = parse_race_steps(race.steps, &trace).unwrap_or_else(|e| panic!("{}: {e}", race.fixture));
    Job::Race { trace, steps }
}

const DISCARD_BREAK_SHARING: Race = Race {
    fixture: "no-passdown-discard-races-break-sharing.trace",
    fix: "fix.discard_spares_blocks_being_unshared",
    // The partial write that breaks sharing (op 3) in the background until
    // its copy's read is held; the discard (op 5) and the second write
    // (op 7); then the copy.
    steps: "0,1,2,hold-reads,bg3,held=1,5,7,release,join",
};

const FUA_PAST_DISCARD: Race = Race {
    fixture: "out-of-data-space-fua-write-past-a-discard-race.trace",
    fix: "fix.read_only_deferred_bios_take_cells",
    // Four blocks provisioned, the fifth write fails (ENOSPC, out of data
    // space). X (op 20) held; the discard (op 21) waits for it in the
    // pool — nothing outside the kernel sees it arrive, hence the pause —
    // then W (op 23) held; X served, the discard done; the flush (op 27)
    // commits; Y (op 29) provisions the freed block and is served; W last.
    steps: "0,1,2,6,10,14,18,hold-writes,bg20,held=1,bg21,pause=300,bg23,held=2,serve=0,wait21,27,bg29,held=2,serve=1,wait29,release,join",
};

fn trace(race: &Race, fix: bool) -> Trace {
    let path = format!("{}/../sim/tests/fixtures/{}", env!("CARGO_MANIFEST_DIR"), race.fixture);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let (off, on) = (format!("param {} 0", race.fix), format!("param {} 1", race.fix));
    assert!(text.contains(&off), "{path} runs the model as stock 6.1");
    let text = if fix { text.replace(&off, &on) } else { text };
    dmsim_traces::text::from_text(&text).expect("a trace")
}

const WRITE_BEHIND_SHARED_READ: Race = Race {
    fixture: "out-of-data-space-write-behind-a-shared-read-race.trace",
    fix: "fix.shared_read_defers_waiting_writes",
    // Four blocks written, the snapshot, the fifth write fails (ENOSPC:
    // out of data space), the discard (op 20) changes the origin; with the
    // data disk's flushes held, the commit timer's commit (within 1 s: the
    // only flush the data disk then receives is that commit's) holds the
    // worker; the read (op 22) and the write (op 23) of the snapshot's
    // block 0 arrive meanwhile — the write reaches the read's cell in
    // `thin_bio_map`, which nothing outside the kernel sees, hence the
    // pause — then the commit's flush is served. The read must take the
    // cell first (started first, it waits for the commit's lock with the
    // cell held), hence the pause between the two: with the write first,
    // the write holds the cell and fails with ENOSPC, as it should.
    // (An explicit flush of the
    // origin would race the timer: had the timer committed the discard
    // first, the flush would not commit and the worker would not wait.)
    steps: "0,1,5,9,13,17,18,20,hold-flushes,held=1,bg22,pause=100,bg23,pause=300,release,join",
};

const READ_DURING_A_COPY: Race = Race {
    fixture: "out-of-data-space-read-of-a-block-being-unshared-race.trace",
    fix: "fix.read_only_shared_reads_wait_for_copies",
    // Two blocks written, the snapshot, a second thin device, the
    // snapshot's whole-block write (op 11: block 0 is now the origin's
    // alone, still shared by its time). With the data disk's reads held:
    // the origin's partial write (op 15) breaks sharing, its copy's read
    // held; the write to block 2 (op 17) finds no space (ENOSPC, out of
    // data space); the origin's read of block 0 (op 19) is remapped to the
    // old block, held; the copy served, the partial write done (the old
    // block's last reference gone); the flush (op 24) commits — the old
    // block free, the pool back in write mode; the other device's
    // whole-block write (op 27) provisions it and completes; the read last.
    steps: "0,1,5,9,10,11,hold-reads,bg15,held=1,17,bg19,held=2,serve=0,wait15,24,27,release,join",
};

/// The refcount finding's trace, found by the campaign (seed 1800).
const REFCOUNT_FIXTURE: &str = "refcount-error-leaves-a-bitmap-without-overflow.trace";
/// Its candidate fix.
const REFCOUNT_FIX: &str = "fix.refcount_errors_fail_the_operation";
/// The two damages, as dmsim's checker words them.
const OVERFLOW_DAMAGE: &str = "bitmap says block 1 has 3 or more references, overflow tree has no entry";
const UNDERCOUNT_DAMAGE: &str = "block 5 count on disk 0, expected 1";

fn refcount_trace(fix: bool) -> Trace {
    refcount_fixture(REFCOUNT_FIXTURE, fix)
}

/// A fixture run as 6.1, or with the refcount fix.
fn refcount_fixture(name: &str, fix: bool) -> Trace {
    let path = format!("{}/../sim/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let off = format!("param {REFCOUNT_FIX} 0");
    assert!(text.contains(&off), "{path} runs the model as stock 6.1");
    let text = if fix { text.replace(&off, &format!("param {REFCOUNT_FIX} 1")) } else { text };
    dmsim_traces::text::from_text(&text).expect("a trace")
}

/// A create-snap whose root inc fails on a metadata read error (the
/// campaign's seed 2546, minimized).
const CREATE_SNAP_FIXTURE: &str = "create-snap-after-a-refcount-error.trace";

/// The cache finding `read_only_flushes_fail`'s recorded trace (the
/// cache campaign's seed 677).
const READ_ONLY_FLUSH_FIXTURE: &str = "cache-read-only-flush-of-a-dropped-mapping.trace";
/// Its candidate fix.
const READ_ONLY_FLUSH_FIX: &str = "fix.read_only_flushes_fail";
/// The recorded trace's ops on 128-sector cache blocks (the shim's disk
/// layout takes multiples of 128): a whole-block write to origin block 8
/// (smq promotes it, over the write: no copy), a metadata write error
/// armed, a reload (its clean shutdown's commit fails: the cache aborts to
/// its last commit and goes read-only, the promotion's mapping still in
/// use in core), a one-sector write to the block (to the cache block), a
/// reload, a flush (the aborted transaction's `changed` still set: it asks
/// for a commit, which read-only mode refuses).
const READ_ONLY_FLUSH_OPS: &str = "write dev=0 sector=1024 nr=128
fault metadata write-error transient
reload mode=writeback policy=smq
write dev=0 sector=1024 nr=1
reload mode=writeback policy=smq
flush dev=0
worker
complete pick=0
complete pick=0
";
/// The flush's op index.
const READ_ONLY_FLUSH_OP: usize = 5;

/// [`READ_ONLY_FLUSH_OPS`] under the recorded trace's header, its fix on
/// or off, then `tail` (a crash, for the simulator's own check).
fn read_only_flush_trace(fix: bool, tail: &str) -> Trace {
    let path = format!("{}/../sim/tests/fixtures/{READ_ONLY_FLUSH_FIXTURE}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let off = format!("param {READ_ONLY_FLUSH_FIX} 0");
    assert!(text.contains(&off), "{path} runs the model as stock 6.1");
    let header: String = text
        .lines()
        .take_while(|l| !l.starts_with("write "))
        .map(|l| match l {
            "param block_sectors 64" => "param block_sectors 128\n".to_string(),
            l if l == off && fix => format!("param {READ_ONLY_FLUSH_FIX} 1\n"),
            l => format!("{l}\n"),
        })
        .collect();
    assert!(header.contains("param block_sectors 128"), "{header}");
    dmsim_traces::text::from_text(&format!("{header}{READ_ONLY_FLUSH_OPS}{tail}")).expect("a trace")
}

/// The kernel job of [`read_only_flush_trace`]: the cache on controlled
/// disks, the fault armed on the metadata disk; the model as stock 6.1.
fn read_only_flush_plan() -> CachePlan {
    let mut plan = ublk_plan(&read_only_flush_trace(false, "")).expect("a plan");
    plan.cfg.cache.options.fixes = CacheFixes::default();
    plan
}

const WRITETHROUGH_PAIRS: Race = Race {
    fixture: "cache-writethrough-pairs-race.trace",
    fix: "fix.writethrough_pairs_one_at_a_time",
    // The whole-block write (op 0) promotes block 8; the cleaner (op 4)
    // writes it back within the tick's sleep (op 5); the status (op 14)
    // shows it clean. Writethrough (op 15). With the cache and origin
    // disks' writes held: A (op 17) until each disk holds its half, then
    // B (op 18); the origin serves A then B, the cache B then A. The
    // flush (op 23), the read (op 27), passthrough (op 29), the read
    // (op 30). No pause: every step waits on something a disk sees.
    steps: "0,4,5,14,15,16,cache:hold-writes,origin:hold-writes,bg17,origin:held=1,cache:held=1,bg18,\
            origin:held=2,cache:held=2,origin:serve=0,origin:serve=0,cache:serve=1,cache:serve=0,join,\
            release,23,27,29,30",
};

/// The writethrough race's kernel job (the model as stock 6.1: every
/// candidate fix off in the fixture's header).
fn writethrough_plan() -> CachePlan {
    race_plan(&trace(&WRITETHROUGH_PAIRS, false), WRITETHROUGH_PAIRS.steps).expect("a plan")
}

/// Every job in one boot (two races, the refcount trace as a ublk job,
/// the third race, the fourth race, the cache's read-only flush, the
/// cache's writethrough race, the create-snap trace as a ublk job):
/// `None` when the VM's prerequisites are missing (and not under CI).
fn kernel_runs() -> Option<&'static [KernelRun]> {
    static RUNS: OnceLock<Option<Vec<KernelRun>>> = OnceLock::new();
    RUNS.get_or_init(|| {
        let shim = match KernelShim::prepare_with_ublk() {
            Ok(s) => s,
            Err(e @ ShimError::Missing(_)) => {
                skip_or_fail("races on the kernel", &e.to_string());
                return None;
            }
            Err(e) => panic!("preparing the VM: {e}"),
        };
        let jobs = vec![
            race_job(&DISCARD_BREAK_SHARING),
            race_job(&FUA_PAST_DISCARD),
            Job::Ublk(refcount_trace(false)),
            race_job(&WRITE_BEHIND_SHARED_READ),
            race_job(&READ_DURING_A_COPY),
            read_only_flush_plan().job,
            writethrough_plan().job,
            Job::Ublk(refcount_fixture(CREATE_SNAP_FIXTURE, false)),
        ];
        Some(shim.run_jobs(&jobs).unwrap_or_else(|e| panic!("the VM: {e}")))
    })
    .as_deref()
}

fn block(state: &FinalState, id: u32, b: usize) -> &str {
    let (_, blocks) = state.devices.iter().find(|(d, _)| *d == id).expect("the device");
    &blocks[b]
}

fn outcome(run: &KernelRun, i: usize) -> &str {
    run.result.ops.iter().find(|o| o.index == i).map_or("(no answer)", |o| o.outcome.as_str())
}

/// The model as 6.1 objects (`damage` in its oracle's words), the model
/// with the fix does not; then, when the VM runs, the kernel's devices
/// are L1-equal to the first and differ from the second. Returns both
/// models' states and the kernel's.
fn hold_against_the_kernel(
    race: &Race,
    job: usize,
    damage: &str,
) -> Option<(FinalState, FinalState, FinalState)> {
    let stock = trace(race, false);
    let model = simulate_as_written(&stock).expect("the simulator");
    let objection = model.oracle_violation.as_deref().expect("the model as 6.1 shows the damage");
    assert!(objection.contains(damage), "{objection}");
    let fixed = simulate_as_written(&trace(race, true)).expect("the simulator with the fix");
    assert_eq!(fixed.oracle_violation, None, "the fix");

    let run = &kernel_runs()?[job];
    assert_eq!(run.result.error, None, "console:\n{}", run.console);
    let kernel = FinalState::of_kernel(run);
    let d = compare_l1(&model.state, &kernel);
    assert!(d.is_empty(), "the kernel agrees with the model as 6.1: {d:?}");
    let d = compare_l1(&fixed.state, &kernel);
    assert!(!d.is_empty(), "the same kernel run differs from the model with the fix");
    Some((model.state, fixed.state, kernel))
}

#[test]
fn a_no_passdown_discard_racing_break_sharing_loses_a_write_on_the_stock_kernel() {
    let ops: Vec<Op> = trace(&DISCARD_BREAK_SHARING, false).ops().collect();
    assert!(matches!(ops[3], Op::Write { dev: 0, nr_sectors: 8, .. }), "{:?}", ops[3]);
    assert!(matches!(ops[5], Op::Discard { dev: 0, .. }), "{:?}", ops[5]);
    assert!(matches!(ops[7], Op::Write { dev: 0, nr_sectors: 1, .. }), "{:?}", ops[7]);
    // Writes are stamped in trace order: the second write to the block is w2.
    let Some((model, fixed, kernel)) = hold_against_the_kernel(&DISCARD_BREAK_SHARING, 0, "wrong data")
    else {
        return;
    };
    assert!(block(&fixed, 0, 1).starts_with("w2"), "the fix keeps it: {}", block(&fixed, 0, 1));
    let run = &kernel_runs().expect("ran")[0];
    for i in [1, 3, 5, 7] {
        assert_eq!(outcome(run, i), "ok", "op {i}: every write and the discard were acknowledged");
    }
    eprintln!("dev 0 block 1: kernel {}, model {}", block(&kernel, 0, 1), block(&model, 0, 1));
    // The damage on the kernel: the acknowledged second write is gone.
    assert!(!block(&kernel, 0, 1).starts_with("w2"), "{}", block(&kernel, 0, 1));
}

#[test]
fn a_fua_write_passes_a_discard_out_of_data_space_on_the_stock_kernel() {
    let ops: Vec<Op> = trace(&FUA_PAST_DISCARD, false).ops().collect();
    assert!(matches!(ops[21], Op::Discard { dev: 0, sector: 128, .. }), "{:?}", ops[21]);
    assert!(matches!(ops[23], Op::Write { dev: 0, sector: 128, fua: true, .. }), "{:?}", ops[23]);
    assert!(matches!(ops[29], Op::Write { dev: 1, sector: 128, .. }), "{:?}", ops[29]);
    // W is the seventh write (w6), Y the eighth (w7).
    let Some((model, fixed, kernel)) =
        hold_against_the_kernel(&FUA_PAST_DISCARD, 1, "leak from another device")
    else {
        return;
    };
    assert!(block(&fixed, 1, 1).starts_with("w7"), "the fix: {}", block(&fixed, 1, 1));
    let run = &kernel_runs().expect("ran")[1];
    assert_eq!(outcome(run, 18), "ENOSPC", "the pool ran out of data space");
    for i in [20, 21, 23, 27, 29] {
        assert_eq!(outcome(run, i), "ok", "op {i}");
    }
    eprintln!("dev 1 block 1: kernel {}, model {}", block(&kernel, 1, 1), block(&model, 1, 1));
    // The damage on the kernel: dev 1's block holds dev 0's FUA write.
    assert!(block(&kernel, 1, 1).starts_with("w6"), "{}", block(&kernel, 1, 1));
}

#[test]
fn a_failed_refcount_update_is_committed_by_the_stock_kernel() {
    // The model as 6.1 ends with both damages; with the fix, neither.
    let stock = refcount_trace(false);
    let model = dmsim_kernel_shim::equivalence::simulate_serialized_crashing(&stock).expect("the simulator");
    let found = model.end_check_finding.as_deref().expect("the model's final metadata is damaged");
    assert!(found.contains(OVERFLOW_DAMAGE) && found.contains(UNDERCOUNT_DAMAGE), "{found}");
    let fixed =
        dmsim_kernel_shim::equivalence::simulate_serialized_crashing(&refcount_trace(true)).expect("fixed");
    assert_eq!(fixed.end_check_finding, None, "with the fix");

    let Some(runs) = kernel_runs() else { return };
    let run = &runs[2];
    assert!(run.console.contains("ref count insert failed"), "the kernel says so:\n{}", run.console);
    let r = judge(&stock, true, run).unwrap_or_else(|e| panic!("judging: {e}"));
    eprintln!(
        "refcount: {:?}, L3 identical {}, first difference {:?}",
        r.verdict(),
        r.l3.is_identical(),
        r.first_difference()
    );
    assert_eq!(r.verdict(), Verdict::Equal, "{:?}", r.first_difference());
    let kernel = r.kernel_end_check.as_deref().expect("the kernel's final metadata is damaged");
    assert!(kernel.contains(OVERFLOW_DAMAGE), "the kernel's metadata: {kernel}");
    assert!(kernel.contains(UNDERCOUNT_DAMAGE), "the kernel's metadata: {kernel}");

    // The detector: the same kernel run against the model with the fix.
    let f = judge(&refcount_trace(true), true, run).unwrap_or_else(|e| panic!("judging with the fix: {e}"));
    assert_eq!(f.end_check_finding, None, "with the fix the model's metadata is clean");
    assert_ne!(f.verdict(), Verdict::Equal, "and the kernel's run differs from it");
}

#[test]
fn a_write_behind_a_shared_read_changes_the_other_device_on_the_stock_kernel() {
    let ops: Vec<Op> = trace(&WRITE_BEHIND_SHARED_READ, false).ops().collect();
    assert!(matches!(ops[17], Op::CreateSnap { origin: 0 }), "{:?}", ops[17]);
    assert!(matches!(ops[20], Op::Discard { dev: 0, .. }), "{:?}", ops[20]);
    assert!(matches!(ops[22], Op::Read { dev: 1, sector: 0, .. }), "{:?}", ops[22]);
    assert!(matches!(ops[23], Op::Write { dev: 1, sector: 0, nr_sectors: 8, .. }), "{:?}", ops[23]);
    // The snapshot's write is the sixth write (w5).
    let Some((model, fixed, kernel)) =
        hold_against_the_kernel(&WRITE_BEHIND_SHARED_READ, 3, "leak from another device")
    else {
        return;
    };
    assert!(block(&fixed, 0, 0).starts_with("w0"), "the fix: {}", block(&fixed, 0, 0));
    let run = &kernel_runs().expect("ran")[3];
    assert_eq!(outcome(run, 18), "ENOSPC", "the pool ran out of data space");
    for i in [20, 22, 23] {
        assert_eq!(outcome(run, i), "ok", "op {i}");
    }
    eprintln!("dev 0 block 0: kernel {}, model {}", block(&kernel, 0, 0), block(&model, 0, 0));
    // The damage on the kernel: the origin's block holds the snapshot's write.
    assert!(block(&kernel, 0, 0).starts_with("w5"), "{}", block(&kernel, 0, 0));
}

#[test]
fn a_read_of_a_block_being_unshared_returns_another_devices_data_on_the_stock_kernel() {
    let race = &READ_DURING_A_COPY;
    let ops: Vec<Op> = trace(race, false).ops().collect();
    assert!(matches!(ops[11], Op::Write { dev: 1, sector: 0, nr_sectors: 128, .. }), "{:?}", ops[11]);
    assert!(matches!(ops[15], Op::Write { dev: 0, sector: 0, nr_sectors: 8, .. }), "{:?}", ops[15]);
    assert!(matches!(ops[19], Op::Read { dev: 0, sector: 0, nr_sectors: 128 }), "{:?}", ops[19]);
    assert!(matches!(ops[24], Op::Flush { dev: 0 }), "{:?}", ops[24]);
    assert!(matches!(ops[27], Op::Write { dev: 2, sector: 0, nr_sectors: 128, .. }), "{:?}", ops[27]);
    // The other device's write is the sixth (w5; the failed one is w4).
    let model = simulate_as_written(&trace(race, false)).expect("the simulator");
    let objection = model.oracle_violation.as_deref().expect("the model as 6.1 shows the damage");
    assert!(objection.contains("leak from another device: read w5@dev2"), "{objection}");
    let fixed = simulate_as_written(&trace(race, true)).expect("the simulator with the fix");
    assert_eq!(fixed.oracle_violation, None, "the fix");

    let Some(runs) = kernel_runs() else { return };
    let run = &runs[4];
    assert_eq!(run.result.error, None, "console:\n{}", run.console);
    assert_eq!(outcome(run, 17), "ENOSPC", "the pool ran out of data space");
    for i in [11, 15, 19, 24, 27] {
        assert_eq!(outcome(run, i), "ok", "op {i}");
    }
    let kernel = FinalState::of_kernel(run);
    let d = compare_l1(&model.state, &kernel);
    assert!(d.is_empty(), "the devices at the end agree with the model as 6.1: {d:?}");
    // The damage is in what the read returned (the devices at rest are
    // the same with the fix): the origin's block 0 read the other
    // device's whole-block write, not its own data (w0, w3).
    let read = run.result.ops.iter().find(|o| o.index == 19).and_then(|o| o.read.as_deref());
    eprintln!("the origin's read of block 0 on the kernel: {read:?}");
    assert_eq!(read, Some("w5*128"), "the kernel's read returned another device's data");
}

#[test]
fn a_read_only_cache_fails_a_flush_after_an_abort_on_the_stock_kernel() {
    // The model as 6.1 (its abort keeps `changed`, as 6.1's does): the
    // flush asks for a commit, read-only mode refuses it, the flush fails
    // with EIO, and a crash loses nothing that was acknowledged — with the
    // candidate fix or without.
    let crash = "crash lose-all seed=0\n";
    for fix in [false, true] {
        let t = read_only_flush_trace(fix, crash);
        let cfg = CacheRunConfig::from_header(&t.header).expect("a config");
        let ops: Vec<Op> = t.ops().collect();
        let out = cache_run::run_ops(&cfg, &ops, &Checkers::default());
        assert_eq!(out.violation.map(|v| v.to_string()), None, "fix {fix}");
        let text = dmsim_traces::to_text(&out.trace);
        assert!(text.contains("done bio=2 dev=0 EIO"), "fix {fix}: the flush fails:\n{text}");
    }

    let Some(runs) = kernel_runs() else { return };
    let run = &runs[5];
    assert_eq!(run.result.error, None, "console:\n{}", run.console);
    let fired: Vec<&(String, String)> =
        run.result.notes.iter().filter(|(k, _)| k.starts_with("fired.")).collect();
    eprintln!("read-only flush: fired {fired:?}; ops {:?}", &run.result.ops[..6]);
    assert!(
        fired.iter().any(|(op, what)| op == "fired.2"
            && what.starts_with("metadata write")
            && what.contains("write-error")),
        "the metadata write error fired on the controlled disk in the reload's clean shutdown: {fired:?}"
    );
    for said in ["aborting current metadata transaction", "Unable to get write access to metadata"] {
        assert!(run.console.contains(said), "the kernel says {said:?}; console:\n{}", run.console);
    }
    // Both reloads are refused (the abort set needs_check); the writes
    // are acknowledged; the flush fails.
    let outcomes: Vec<&str> = (0..=READ_ONLY_FLUSH_OP).map(|i| outcome(run, i)).collect();
    assert_eq!(outcomes, ["ok", "ok", "EINVAL", "ok", "EINVAL", "EIO"], "the kernel's outcomes");
    // And every crash state the run recorded is one the oracle allows
    // (the flush claimed nothing).
    let plan = read_only_flush_plan();
    let r = judge_ublk_crash_states(&plan, run).unwrap_or_else(|e| panic!("judging: {e}"));
    eprintln!(
        "read-only flush: {} marks, {} matching the model, L1 {:?}, first difference {:?}",
        r.marks, r.matching, r.l1_violations, r.first_difference
    );
    assert!(r.marks >= 3, "marks after the reloads and the flush: {}", r.marks);
    assert_eq!(r.l1_violations, Vec::<String>::new());
    assert_eq!(r.first_difference, None, "the model as 6.1 leaves the same crash states");
}

#[test]
fn two_writethrough_writes_leave_a_clean_block_two_copies_on_the_stock_kernel() {
    // The model as 6.1: the block is clean, its copies differ (the cache
    // w1, the origin w2); with the fix the pairs go one at a time.
    let run_model = |fix: bool| {
        let t = trace(&WRITETHROUGH_PAIRS, fix);
        let cfg = CacheRunConfig::from_header(&t.header).expect("a config");
        let ops: Vec<Op> = t.ops().collect();
        cache_run::run_ops(&cfg, &ops, &Checkers::default())
    };
    let stock = run_model(false);
    let objection = stock.violation.as_ref().map(|v| v.to_string()).expect("the model as 6.1 objects");
    assert!(
        objection.contains("cache block 0 is clean for origin block 8")
            && objection.contains("cache [w1*1 w0*127], origin [w2*1 w0*127]"),
        "{objection}"
    );
    let fixed = run_model(true);
    assert_eq!(fixed.violation.map(|v| v.to_string()), None, "the fix");

    let Some(runs) = kernel_runs() else { return };
    let run = &runs[6];
    assert_eq!(run.result.error, None, "console:\n{}", run.console);
    // The job's ops: the trace's without `worker` and `complete` (0 the
    // promoting write, 1 the cleaner, 2 the tick, 3 the status, 4
    // writethrough, 5 the status, 6 A, 7 B, 8 the flush, 9 the read, 10
    // passthrough, 11 the read), then the read-back.
    for i in 0..=11 {
        assert_eq!(outcome(run, i), "ok", "op {i}: {:?}", run.result.ops.iter().find(|o| o.index == i));
    }
    let status = |i: usize| {
        run.result.ops.iter().find(|o| o.index == i).and_then(|o| o.read.clone()).expect("a status line")
    };
    let field =
        |line: &str, f: usize| dmsim_kernel_shim::protocol::cache_status_field(line, f).map(str::to_string);
    let before = status(5);
    eprintln!("writethrough race: the status before the race: {before}");
    assert_eq!(field(&before, 3).as_deref(), Some("1"), "one block resident: {before}");
    assert_eq!(field(&before, 10).as_deref(), Some("0"), "and clean: {before}");
    let read = |i: usize| run.result.ops.iter().find(|o| o.index == i).and_then(|o| o.read.clone());
    eprintln!("writethrough race: reads {:?} then {:?}", read(9), read(11));
    // The damage on the kernel, seen by an application: two reads of the
    // same sectors with no write between return different data.
    assert_eq!(read(9).as_deref(), Some("w1*1 w0*7"), "the cache's copy");
    assert_eq!(
        read(11).as_deref(),
        Some("w2*1 w0*7"),
        "the origin's copy, once the cache stopped serving it"
    );
    // And at rest: the block recorded clean, its two copies different.
    let image = dmsim_model::cache::inspect::read_image(
        &mut dmsim_model::block_device::MemDevice::from_bytes(run.metadata_image.clone()),
    )
    .expect("the kernel's metadata decodes");
    let c = image.mappings.iter().position(|m| m.valid() && m.oblock == 8).expect("origin block 8 is cached");
    assert!(!image.is_dirty(c), "recorded clean");
    let data = run.cache_data.as_ref().expect("the cache's disks");
    let sector = |disk: &[u8], s: usize| dmsim_sim::thin::summarize(&disk[s * 512..(s + 1) * 512]);
    let (cached, origin) = (sector(&data.cache, c * 128), sector(&data.origin, 8 * 128));
    eprintln!("writethrough race: cache block {c} holds {cached}, origin block 8 {origin}");
    assert_eq!((cached.as_str(), origin.as_str()), ("w1*1", "w2*1"));
    // What `dmsim replay --on kernel --race` reports: the oracle, fed the
    // race as it ran (A and B in flight together), allows the first read
    // either write and then pins it; the second read breaks L1. And the
    // clean block's two copies differ at rest.
    let r = judge_race(&writethrough_plan(), &trace(&WRITETHROUGH_PAIRS, false), run).expect("judged");
    eprintln!("writethrough race judged: {r:?}");
    assert!(r.model_objection.as_deref().is_some_and(|o| o.contains("is clean for origin block 8")));
    assert_eq!(r.failed_requests, Vec::<String>::new());
    // The second read, and the read-back of block 8 after it.
    assert_eq!(r.l1_violations.len(), 2, "{:?}", r.l1_violations);
    assert!(
        r.l1_violations[0].starts_with("op 11 (read 1024+8): kernel read [w2*1 w0*7]"),
        "{:?}",
        r.l1_violations
    );
    assert!(r.l1_violations[1].starts_with("op 20 (read 1024+128)"), "{:?}", r.l1_violations);
    assert_eq!(r.clean_copies_differ.len(), 1, "{:?}", r.clean_copies_differ);
    assert!(
        r.clean_copies_differ[0].starts_with("cache block 0 (origin block 8): cache [w1*1"),
        "{:?}",
        r.clean_copies_differ
    );
}

#[test]
fn a_create_snap_whose_root_inc_fails_is_made_and_committed_by_the_stock_kernel() {
    // The model as 6.1 (`dm_tm_inc` returns nothing): the snapshot is
    // made and the damage committed; with the refcount fix the message
    // fails instead (and `failed_message_aborts` must then abort it:
    // sim/tests/thin_campaign.rs).
    let stock = refcount_fixture(CREATE_SNAP_FIXTURE, false);
    let model = dmsim_kernel_shim::equivalence::simulate_serialized_crashing(&stock).expect("the simulator");
    let found = model.end_check_finding.as_deref().expect("the model's final metadata is damaged");
    assert!(found.contains("block 2 count on disk 0, expected 1"), "{found}");

    let Some(runs) = kernel_runs() else { return };
    let run = &runs[7];
    assert!(run.console.contains("ref count insert failed"), "the kernel says so:\n{}", run.console);
    assert_eq!(outcome(run, 7), "ok", "the second create-snap succeeds on the kernel");
    let r = judge(&stock, true, run).unwrap_or_else(|e| panic!("judging: {e}"));
    eprintln!(
        "create-snap: {:?}, L3 identical {}, first difference {:?}",
        r.verdict(),
        r.l3.is_identical(),
        r.first_difference()
    );
    assert_eq!(r.verdict(), Verdict::Equal, "{:?}", r.first_difference());
    assert!(r.l3.is_identical(), "block for block");
    let kernel = r.kernel_end_check.as_deref().expect("the kernel's final metadata is damaged");
    assert!(kernel.contains("block 2 count on disk 0, expected 1"), "{kernel}");
    assert!(kernel.contains("overflow tree has no entry"), "{kernel}");
    // Judged again from what the kernel campaign saves (the answer's
    // text and the final metadata image): the same judgement.
    let saved = KernelRun::from_saved(
        dmsim_kernel_shim::KernelResult::from_text(&run.result.to_text()).expect("the answer reads back"),
        run.metadata_image.clone(),
    );
    let again = judge(&stock, true, &saved).expect("judged again");
    assert_eq!((again.verdict(), again.first_difference()), (r.verdict(), r.first_difference()));
    assert!(again.l3.is_identical() && again.kernel_end_check == r.kernel_end_check);
    // The detector: the model with the refcount fix fails the message
    // (no snapshot), which the kernel's run does not match.
    let f = judge(&refcount_fixture(CREATE_SNAP_FIXTURE, true), true, run).expect("judged");
    assert_ne!(f.verdict(), Verdict::Equal, "the fixed model differs from the kernel");
}
