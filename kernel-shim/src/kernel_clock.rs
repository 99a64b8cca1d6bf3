//! The kernel's clock during a thin replay, for the serialized simulator
//! to follow.
//!
//! dm-thin's waker runs about once a second (a delayed work; see
//! `dmsim_model::timer_wheel`) and its worker then commits if the
//! metadata changed and the last timed commit is more than a second old.
//! A serialized simulator that never ticks commits only on flushes,
//! messages and the teardown, so the kernel's crash images and block
//! placement drift from it. Every thin job reports its coarse clock (it
//! moves when jiffies do) around the pool's creation, every op, each
//! rebuild after a power cut and the teardown, and the absolute jiffy's
//! phase ([`crate::protocol::JIFFY_PHASE`]); the simulator then moves
//! time a jiffy at a time to where the kernel was, its waker placed as
//! the kernel's timer wheel places it.

use std::collections::BTreeMap;

use dmsim_sim::thin::{ThinFailure, ThinSim};
use dmsim_traces::Op;

use crate::protocol::{KernelResult, JIFFY_PHASE};

/// Simulated nanoseconds.
pub type Nanos = u64;

/// A thin job's coarse clock readings, in jiffies since the pool's
/// creation (the simulator's time 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThinClock {
    /// Milliseconds per jiffy.
    ms: u64,
    /// The absolute jiffy (mod 8) at the pool's creation, if known.
    phase: Option<u64>,
    /// Each op's (start, end).
    ops: BTreeMap<usize, (u64, u64)>,
    /// The pool rebuilt after the power cut at op `i`: when it was created.
    rebuilds: BTreeMap<usize, u64>,
    /// When the teardown began.
    teardown: Option<u64>,
}

impl ThinClock {
    /// The clock of a thin job's result, None when it carries none (an
    /// older agent, or a job that never created its pool).
    pub fn of(result: &KernelResult) -> Option<ThinClock> {
        let (t, res) = crate::protocol::coarse_readings(result)?;
        let j = |us: u64| (us + res / 2) / res;
        let origin = j(*t.get("create-b")?);
        let rel = |us: u64| j(us).saturating_sub(origin);
        let mut ops = BTreeMap::new();
        let mut rebuilds = BTreeMap::new();
        for (k, &v) in &t {
            if let Some(i) = k.strip_prefix("op-a-").and_then(|i| i.parse::<usize>().ok()) {
                if let Some(&b) = t.get(format!("op-b-{i}").as_str()) {
                    ops.insert(i, (rel(v), rel(b)));
                }
            } else if let Some(i) = k.strip_prefix("rebuild-b-").and_then(|i| i.parse::<usize>().ok()) {
                rebuilds.insert(i, rel(v));
            }
        }
        let phase = result.timings_ms.iter().find(|(k, _)| k == JIFFY_PHASE).map(|(_, p)| (p + origin) % 8);
        Some(ThinClock {
            ms: res / 1000,
            phase,
            ops,
            rebuilds,
            teardown: t.get("teardown-a").map(|&v| rel(v)),
        })
    }

    /// The phase the simulator's waker takes (0 when the agent could not
    /// read it: the waker's runs are then placed up to 7 jiffies off).
    pub fn wheel_phase(&self) -> u64 {
        self.phase.unwrap_or(0)
    }

    /// Whether the agent read the absolute jiffy's phase.
    pub fn phase_known(&self) -> bool {
        self.phase.is_some()
    }

    fn at(&self, jiffy: u64) -> Nanos {
        (jiffy * self.ms + self.ms / 2) * 1_000_000
    }

    /// When op `i` started, in simulated time.
    pub fn op_start(&self, i: usize) -> Option<Nanos> {
        self.ops.get(&i).map(|&(a, _)| self.at(a))
    }

    /// When op `i` ended, in simulated time.
    pub fn op_end(&self, i: usize) -> Option<Nanos> {
        self.ops.get(&i).map(|&(_, b)| self.at(b))
    }

    /// When the last op before `i` that the kernel ran ended.
    pub fn before(&self, i: usize) -> Option<Nanos> {
        self.ops.range(..i).next_back().map(|(_, &(_, b))| self.at(b))
    }

    /// When the pool the power cut at op `i` left was rebuilt.
    pub fn rebuild(&self, i: usize) -> Option<Nanos> {
        self.rebuilds.get(&i).map(|&j| self.at(j))
    }

    /// When the teardown began.
    pub fn teardown(&self) -> Option<Nanos> {
        self.teardown.map(|j| self.at(j))
    }

    /// Moves `sim`'s time forward to `to`, a jiffy at a time, running its
    /// worker after each step (so that the waker runs, and a timed commit
    /// lands, in the jiffy it did in the kernel). `now` is the simulator's
    /// time, updated.
    pub fn advance(&self, sim: &mut ThinSim, now: &mut Nanos, to: Nanos) -> Result<(), ThinFailure> {
        let step = self.ms * 1_000_000;
        while to > *now {
            let d = (to - *now).min(step);
            let millis = (d / 1_000_000).max(1);
            sim.apply(&Op::Tick { millis: millis as u16 })?;
            sim.quiesce()?;
            *now += millis * 1_000_000;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The clock readings of a four-op trace (a create, a write, a read,
    /// a crash) whose ops 0 and 1 took a jiffy each and whose op 2 began
    /// `op2_at` jiffies after the pool was created (4 ms jiffies).
    fn clocked(op2_at: u64) -> KernelResult {
        let j = |jiffy: u64| jiffy * 4000;
        result(&[
            ("coarse-us-res", 4000),
            ("coarse-us-create-b", 0),
            ("coarse-us-op-a-0", j(1)),
            ("coarse-us-op-b-0", j(2)),
            ("coarse-us-op-a-1", j(3)),
            ("coarse-us-op-b-1", j(4)),
            ("coarse-us-op-a-2", j(op2_at)),
            ("coarse-us-op-b-2", j(op2_at + 1)),
            ("coarse-us-rebuild-b-3", j(op2_at + 100)),
            (JIFFY_PHASE, 0),
        ])
    }

    /// A write to device 0 of `nr` whole blocks of `bs` sectors from
    /// block `block`.
    fn block_write(bs: u64, block: u64, nr: u64) -> Op {
        Op::Write {
            dev: 0,
            sector: (block * bs) as u32,
            nr_sectors: (nr * bs) as u16,
            fua: false,
            preflush: false,
        }
    }

    /// A trace of `ops` under `cfg`'s header.
    fn trace(cfg: &dmsim_sim::run::RunConfig, ops: &[Op]) -> dmsim_traces::Trace {
        dmsim_traces::Trace {
            header: cfg.header(),
            events: ops.iter().map(|op| dmsim_traces::Event::Op(*op)).collect(),
        }
    }

    /// A kernel run of `result` alone (no images, console or log).
    fn kernel_run(result: KernelResult) -> crate::vm::KernelRun {
        crate::vm::KernelRun::from_result(result)
    }

    fn result(entries: &[(&str, u64)]) -> KernelResult {
        KernelResult {
            timings_ms: entries.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            ..KernelResult::default()
        }
    }

    #[test]
    fn readings_become_jiffies_since_the_pool_was_created() {
        let c = ThinClock::of(&result(&[
            ("coarse-us-res", 4000),
            ("coarse-us-create-a", 8000),
            ("coarse-us-create-b", 12000),
            ("coarse-us-op-a-0", 16000),
            ("coarse-us-op-b-0", 24000),
            ("coarse-us-op-a-2", 28000),
            ("coarse-us-op-b-2", 28000),
            ("coarse-us-rebuild-b-1", 400000),
            ("coarse-us-teardown-a", 1012000),
            (JIFFY_PHASE, 5),
        ]))
        .expect("a clock");
        // Created at jiffy 3 (absolute phase 5 + 3 = 0 mod 8).
        assert_eq!(c.wheel_phase(), 0);
        assert_eq!(c.op_start(0), Some(1_000_000 * (4 + 2)));
        assert_eq!(c.op_end(0), Some(1_000_000 * (3 * 4 + 2)));
        assert_eq!(c.op_end(1), None);
        assert_eq!(c.before(2), Some(1_000_000 * (3 * 4 + 2)), "op 0 ended at jiffy 3");
        assert_eq!(c.op_start(1), None, "no reading: a crash op");
        assert_eq!(c.rebuild(1), Some(1_000_000 * (97 * 4 + 2)));
        assert_eq!(c.teardown(), Some(1_000_000 * (250 * 4 + 2)));
    }

    #[test]
    fn no_clock_without_a_resolution_or_a_creation() {
        assert_eq!(ThinClock::of(&result(&[("coarse-us-create-b", 4000)])), None);
        assert_eq!(ThinClock::of(&result(&[("coarse-us-res", 4000)])), None);
        assert_eq!(ThinClock::of(&result(&[("coarse-us-res", 10), ("coarse-us-create-b", 0)])), None);
        let far = [("coarse-us-res", 4000), ("coarse-us-create-b", 0), ("coarse-us-teardown-a", u64::MAX)];
        assert_eq!(ThinClock::of(&result(&far)), None, "a reading past a day: no clock to tick towards");
    }

    /// A write, then (1.2 s later on the kernel's clock) a read, then a
    /// power cut that loses every unflushed write: followed, the kernel's
    /// waker commits in between (flushing the data first), so the write
    /// survives; not followed, it is lost.
    #[test]
    fn a_timed_commit_between_ops_lands_when_the_kernels_did() {
        use dmsim_sim::run::{CampaignSettings, RunConfig};
        use dmsim_traces::{CrashMode, Event, Trace};

        use crate::equivalence::{simulate_following, simulate_serialized_crashing};

        let cfg = RunConfig::for_seed(1, 10, &CampaignSettings::default());
        let ops = [
            Op::CreateThin,
            Op::Write { dev: 0, sector: 0, nr_sectors: 8, fua: false, preflush: false },
            Op::Read { dev: 0, sector: 0, nr_sectors: 8 },
            Op::Crash { mode: CrashMode::LoseAll, seed: 0 },
        ];
        let trace = Trace { header: cfg.header(), events: ops.iter().map(|op| Event::Op(*op)).collect() };
        let run = kernel_run(clocked(300));
        let followed = simulate_following(&trace, true, &run).expect("runs");
        let plain = simulate_serialized_crashing(&trace).expect("runs");
        let mapped = |r: &crate::equivalence::SimulatedRun| {
            r.crashes[0].state.mapped.values().map(|m| m.len()).sum::<usize>()
        };
        assert_eq!(mapped(&followed), 1, "the waker's commit made the mapping durable");
        assert_eq!(mapped(&plain), 0, "without the kernel's clock nothing was committed");
        assert_eq!(followed.crashes[0].data.1, 0, "the commit flushed the data write first");
    }

    /// A kernel result that says where the kernel committed
    /// (`commit-superblocks`) takes the simulator's timer out: the
    /// simulator commits where the kernel did, wherever the kernel's clock
    /// was. The kernel's keys come from the simulator's own run of the
    /// trace with a flush after the write (the same commit a timed one
    /// makes there).
    #[test]
    fn a_kernel_commit_is_placed_where_the_kernel_made_it_and_only_there() {
        use dmsim_sim::run::{CampaignSettings, RunConfig};
        use dmsim_traces::{CrashMode, Event, Trace};

        use crate::equivalence::{simulate_following, simulate_serialized_crashing, CommitPlacement};
        use crate::protocol::{COMMIT_OPS_NOTE, COMMIT_SUPERBLOCKS_NOTE};

        let cfg = RunConfig::for_seed(1, 10, &CampaignSettings::default());
        let trace_of = |ops: &[Op]| Trace {
            header: cfg.header(),
            events: ops.iter().map(|op| Event::Op(*op)).collect(),
        };
        let write = Op::Write { dev: 0, sector: 0, nr_sectors: 8, fua: false, preflush: false };
        let read = Op::Read { dev: 0, sector: 0, nr_sectors: 8 };
        let crash = Op::Crash { mode: CrashMode::LoseAll, seed: 0 };
        let flushed = simulate_serialized_crashing(&trace_of(&[Op::CreateThin, write, Op::Flush { dev: 0 }]))
            .expect("runs");
        let (k0, k2) = (flushed.superblocks[&0], flushed.superblocks[&2]);
        assert_ne!(k0, k2, "the flush committed the write's mapping");
        let trace = trace_of(&[Op::CreateThin, write, read, crash]);
        let run = |commits: &[(usize, u64)], op2_at: u64| {
            let mut result = clocked(op2_at);
            let ops = commits.iter().map(|(i, _)| i.to_string()).collect::<Vec<_>>().join(" ");
            let keys = commits.iter().map(|(i, k)| format!("{i}:{k:016x}")).collect::<Vec<_>>().join(" ");
            result.notes.push((COMMIT_OPS_NOTE.into(), ops));
            result.notes.push((COMMIT_SUPERBLOCKS_NOTE.into(), keys));
            kernel_run(result)
        };
        let mapped = |r: &crate::equivalence::SimulatedRun| {
            r.crashes[0].state.mapped.values().map(|m| m.len()).sum::<usize>()
        };
        // The kernel committed during the write (its clock crossed no
        // period): so does the simulator, and the mapping survives the cut.
        let followed = simulate_following(&trace, true, &run(&[(0, k0), (1, k2)], 5)).expect("runs");
        assert!(followed.commit_placements.contains_key(&1), "{:?}", followed.commit_placements);
        assert!(followed.commit_ops.contains(&1), "{:?}", followed.commit_ops);
        assert_eq!(followed.superblocks[&1], k2);
        assert_eq!(mapped(&followed), 1, "the placed commit made the mapping durable");
        // The kernel's clock crossed the commit period before the read,
        // but the kernel did not commit: neither does the simulator.
        let quiet = simulate_following(&trace, true, &run(&[(0, k0)], 300)).expect("runs");
        assert!(quiet.commit_placements.is_empty(), "{:?}", quiet.commit_placements);
        assert!(!quiet.commit_ops.contains(&2), "{:?}", quiet.commit_ops);
        assert_eq!(mapped(&quiet), 0, "no commit: the power cut lost the mapping");
        // Before the write nothing had changed: the commit came after it.
        assert_ne!(followed.commit_placements[&1], CommitPlacement::BeforeOp);
    }

    /// A commit the kernel made in the middle of an op that changes no
    /// metadata (an overwrite of two mapped blocks): its key is the same
    /// wherever the simulator places it in the op, but the data disk's
    /// unflushed writes at the next power cut are not. The kernel's flush
    /// came after the first block's write, so only the second block's is
    /// unflushed there (the campaign's seed 125): the simulator places its
    /// commit after one data completion too, and its power cut chooses
    /// among the same writes. Without the kernel's record of them the
    /// first placement that agrees otherwise (before the op) is kept.
    #[test]
    fn a_kernel_commit_between_an_ops_writes_is_placed_by_the_crashs_unflushed_writes() {
        use dmsim_sim::run::{CampaignSettings, RunConfig};
        use dmsim_traces::CrashMode;

        use crate::equivalence::{simulate_following, simulate_serialized_crashing, CommitPlacement};
        use crate::protocol::{CrashRecord, PoolSpec, COMMIT_OPS_NOTE, COMMIT_SUPERBLOCKS_NOTE};

        let cfg = RunConfig::for_seed(1, 10, &CampaignSettings::default());
        let bs = PoolSpec::from_header(&cfg.header()).expect("a pool").block_sectors;
        let whole = |block: u64, nr: u64| block_write(bs, block, nr);
        let trace_of = |ops: &[Op]| trace(&cfg, ops);
        // The kernel's commits: the message's (op 0) and one in the
        // overwrite (op 3), of both blocks' mappings.
        let provisioned = [Op::CreateThin, whole(0, 1), whole(1, 1), Op::Flush { dev: 0 }];
        let sim = simulate_serialized_crashing(&trace_of(&provisioned)).expect("runs");
        let (k0, k3) = (sim.superblocks[&0], sim.superblocks[&3]);
        let trace = trace_of(&[
            Op::CreateThin,
            whole(0, 1),
            whole(1, 1),
            whole(0, 2),
            Op::Crash { mode: CrashMode::LoseAll, seed: 0 },
        ]);
        // The overwrite is the third write (w2); its second block's piece
        // lands on data block 1.
        let mut second = vec![0u8; (bs * 512) as usize];
        dmsim_traces::stamp::fill(&mut second, cfg.thin.run, 2, 0, bs);
        let unflushed = dmsim_faults::PendingKey {
            sector: bs,
            nr_sectors: bs,
            fua: false,
            fnv: dmsim_faults::fnv64(&second),
        };
        let run = |pending: Vec<dmsim_faults::PendingKey>| {
            let mut result = clocked(3);
            result.notes.push((COMMIT_OPS_NOTE.into(), "0 3".into()));
            result.notes.push((COMMIT_SUPERBLOCKS_NOTE.into(), format!("0:{k0:016x} 3:{k3:016x}")));
            result.crashes.push(CrashRecord {
                op: 4,
                data: (0, 1),
                data_pending: pending,
                ..CrashRecord::default()
            });
            kernel_run(result)
        };
        let followed = simulate_following(&trace, true, &run(vec![unflushed])).expect("runs");
        assert_eq!(followed.commit_placements.get(&3), Some(&CommitPlacement::AfterData(1)));
        assert_eq!(followed.pending_agree.get(&4), Some(&true));
        assert_eq!(followed.crashes[0].data, (0, 1), "one unflushed write, lost");
        let blind = simulate_following(&trace, true, &run(Vec::new())).expect("runs");
        assert_eq!(blind.commit_placements.get(&3), Some(&CommitPlacement::BeforeOp));
        assert_eq!(blind.crashes[0].data, (0, 2), "both of the overwrite's writes unflushed");
    }

    /// The kernel's worker committed between the two pieces of a write
    /// into a full pool (the first failed with ENOSPC, the commit made a
    /// block freed in the transaction allocatable, the second took it):
    /// the same superblock as a commit after its pieces, but the status
    /// line's free data blocks after the op tell the two apart, and the
    /// simulator places its commit after the first piece (the campaign's
    /// seed 93). (Before the op it commits another superblock: the first
    /// piece allocates, and the second, finding no free block, commits
    /// it.) Without the status lines the first placement that agrees
    /// (after the pieces) is kept.
    #[test]
    fn a_kernel_commit_between_a_requests_pieces_is_placed_by_the_free_data_blocks() {
        use dmsim_sim::run::{CampaignSettings, RunConfig};

        use crate::equivalence::{simulate_following, simulate_serialized_crashing, CommitPlacement};
        use crate::protocol::{COMMIT_OPS_NOTE, COMMIT_SUPERBLOCKS_NOTE};

        let mut cfg = RunConfig::for_seed(1, 10, &CampaignSettings::default());
        cfg.thin.data_blocks = 4;
        cfg.thin.thin_blocks = 8;
        cfg.thin.features.error_if_no_space = true;
        let bs = cfg.thin.block_sectors;
        let write = |block: u64, nr: u64| block_write(bs, block, nr);
        let trace_of = |ops: &[Op]| trace(&cfg, ops);
        // The pool filled and committed, then block 0 discarded.
        let mut ops =
            vec![Op::CreateThin, write(0, 1), write(1, 1), write(2, 1), write(3, 1), Op::Flush { dev: 0 }];
        ops.push(Op::Discard { dev: 0, sector: 0, nr_sectors: bs as u32 });
        // The kernel's commit at op 7 commits the discard alone: the key a
        // flush there gives.
        let keys =
            simulate_serialized_crashing(&trace_of(&[ops.clone(), vec![Op::Flush { dev: 0 }]].concat()))
                .expect("runs")
                .superblocks;
        ops.extend([write(4, 2), Op::Read { dev: 0, sector: 0, nr_sectors: 8 }]);
        let trace = trace_of(&ops);
        let run = |status: bool| {
            let mut timings =
                vec![("coarse-us-res".to_string(), 4000), ("coarse-us-create-b".to_string(), 0)];
            for i in 0..ops.len() as u64 {
                timings.push((format!("coarse-us-op-a-{i}"), 4000 * (i + 1)));
                timings.push((format!("coarse-us-op-b-{i}"), 4000 * (i + 1)));
            }
            timings.push((JIFFY_PHASE.to_string(), 0));
            let mut result = KernelResult { timings_ms: timings, ..KernelResult::default() };
            result.notes.push((COMMIT_OPS_NOTE.into(), "0 5 7".into()));
            let key = |i: usize| format!("{i}:{:016x}", keys[&i]);
            result.notes.push((COMMIT_SUPERBLOCKS_NOTE.into(), format!("{} {} {}", key(0), key(5), key(7))));
            if status {
                // After the write: every block used, the pool writable.
                for i in [7, 8] {
                    result
                        .op_status
                        .push((i, "2 20/512 4/4 - rw discard_passdown error_if_no_space - 128 ".into()));
                }
            }
            kernel_run(result)
        };
        let followed = simulate_following(&trace, true, &run(true)).expect("runs");
        assert_eq!(followed.commit_placements.get(&7), Some(&CommitPlacement::AfterPieces(1)));
        assert!(followed.piece_commit_ops.contains(&7));
        assert_eq!(followed.data_free.get(&7), Some(&0), "the second piece took the freed block");
        assert_eq!(followed.superblocks[&7], keys[&7]);
        let blind = simulate_following(&trace, true, &run(false)).expect("runs");
        assert_eq!(blind.commit_placements.get(&7), Some(&CommitPlacement::AfterData(0)));
        assert_eq!(blind.data_free.get(&7), Some(&1), "both pieces failed, the freed block stayed free");
    }

    /// A kernel commit between a passdown discard's two passes (its timer
    /// due while the worker ran the first): a block the discard unmapped
    /// from a snapshot and that the origin still maps is held with an
    /// extra count, and the commit makes that count durable. It leaves the
    /// superblock a commit before the discard leaves (the same totals), so
    /// only what the commit holds (`commit-contents`) places it: the
    /// simulator commits at the end of the discard's first worker pass (or,
    /// while the discard waits for the data device, once the worker
    /// settled), and the power cut after it leaves the over-counted block
    /// as the kernel's did. Both with a block passed down (the second pass
    /// waits for the data device) and without (the worker's next pass
    /// runs it). Without the contents (an older agent), a discard that
    /// passes nothing down has its commit placed after both passes (the
    /// same superblock), and nothing is over-counted.
    #[test]
    fn a_commit_between_a_passdown_discards_passes_is_placed_by_what_it_holds() {
        use dmsim_sim::run::{CampaignSettings, RunConfig};
        use dmsim_sim::thin::ThinSim;
        use dmsim_traces::CrashMode;

        use crate::equivalence::{simulate_following, CommitPlacement};
        use crate::protocol::{
            commit_contents_key, commit_key, PoolSpec, COMMIT_CONTENTS_NOTE, COMMIT_OPS_NOTE,
            COMMIT_SUPERBLOCKS_NOTE, SUPERBLOCK_BYTES,
        };

        let mut cfg = RunConfig::for_seed(1, 10, &CampaignSettings::default());
        cfg.thin.options.fixes.passdown_holds_blocks_in_core = false;
        // The kernel's default features: discards passed down.
        cfg.thin.features = Default::default();
        let header = cfg.header();
        assert_eq!(header.param("fix.passdown_holds_blocks_in_core"), Some("0"));
        let bs = PoolSpec::from_header(&header).expect("a pool").block_sectors;
        const DISCARD: usize = 6;
        // The snapshot's blocks 0 (the origin's too: not passed down) and,
        // with `passed_down`, 1 (its own since the origin's write).
        for passed_down in [true, false] {
            let blocks = if passed_down { 2 } else { 1 };
            let ops = [
                Op::CreateThin,
                block_write(bs, 0, 2),
                Op::Flush { dev: 0 },
                Op::CreateSnap { origin: 0 },
                block_write(bs, 1, 1),
                Op::Flush { dev: 0 },
                Op::Discard { dev: 1, sector: 0, nr_sectors: (blocks * bs) as u32 },
                Op::Read { dev: 0, sector: 0, nr_sectors: 8 },
                Op::Crash { mode: CrashMode::LoseAll, seed: 0 },
            ];
            let trace = trace(&cfg, &ops);
            // The kernel's commits: the simulator's own, with one at the
            // end of the discard's `pass`-th worker pass.
            let commits = |pass: usize| {
                let mut sim = ThinSim::new(RunConfig::from_header(&trace.header).expect("header").thin);
                let image = |sim: &ThinSim| {
                    sim.pool().with_metadata(|md| {
                        md.transaction_manager().block_manager().device().visible().to_vec()
                    })
                };
                let mut last = image(&sim)[..SUPERBLOCK_BYTES].to_vec();
                let mut out = Vec::new();
                for (i, op) in ops.iter().enumerate().take(DISCARD + 2) {
                    sim.plan_commit(None);
                    if i == DISCARD {
                        sim.plan_commit_in_pass(pass);
                    }
                    sim.apply(op).and_then(|()| sim.quiesce()).expect("runs");
                    let now = image(&sim);
                    if now[..SUPERBLOCK_BYTES] != last[..] {
                        out.push((
                            i,
                            commit_key(&now),
                            commit_contents_key(&mut dmsim_model::block_device::SliceDevice::new(&now)),
                        ));
                        last = now[..SUPERBLOCK_BYTES].to_vec();
                    }
                }
                out
            };
            let at = |c: &[(usize, u64, u64)]| c.iter().find(|&&(i, _, _)| i == DISCARD).copied();
            assert!(at(&commits(usize::MAX)).is_none(), "no commit in the discard of its own");
            let (pass, kernel) = (1..8)
                .map(|p| (p, commits(p)))
                .find(|(_, c)| at(c).is_some())
                .expect("a pass of the discard commits");
            let (_, key, contents) = at(&kernel).expect("the discard committed");
            let run = |with_contents: bool| {
                let mut result = clocked(3);
                let list = |f: &dyn Fn(&(usize, u64, u64)) -> String| {
                    kernel.iter().map(f).collect::<Vec<_>>().join(" ")
                };
                result.notes.push((COMMIT_OPS_NOTE.into(), list(&|c| c.0.to_string())));
                result
                    .notes
                    .push((COMMIT_SUPERBLOCKS_NOTE.into(), list(&|c| format!("{}:{:016x}", c.0, c.1))));
                if with_contents {
                    result
                        .notes
                        .push((COMMIT_CONTENTS_NOTE.into(), list(&|c| format!("{}:{:016x}", c.0, c.2))));
                }
                kernel_run(result)
            };
            let over_counted = |r: &crate::equivalence::SimulatedRun| {
                r.end_check_finding.as_deref().is_some_and(|f| f.contains("count on disk 2, expected 1"))
            };
            let followed = simulate_following(&trace, true, &run(true)).expect("runs");
            let placed = followed.commit_placements.get(&DISCARD).copied();
            if passed_down {
                assert!(
                    matches!(placed, Some(CommitPlacement::AfterData(0) | CommitPlacement::InPass(_))),
                    "{placed:?}"
                );
            } else {
                assert_eq!(
                    placed,
                    Some(CommitPlacement::InPass(pass)),
                    "only a pass's end is between the passes"
                );
            }
            assert_eq!(followed.superblocks.get(&DISCARD), Some(&key));
            assert_eq!(followed.contents.get(&DISCARD), Some(&contents));
            assert!(
                over_counted(&followed),
                "the power cut kept the held count: {:?}",
                followed.end_check_finding
            );
            // The detector: without the contents, a commit once the worker
            // settled after a discard that passes nothing down (both
            // passes done) leaves the same superblock, and is tried first.
            if !passed_down {
                let blind = simulate_following(&trace, true, &run(false)).expect("runs");
                assert_eq!(blind.commit_placements.get(&DISCARD), Some(&CommitPlacement::AfterData(0)));
                assert_ne!(blind.contents.get(&DISCARD), Some(&contents));
                assert!(!over_counted(&blind), "{:?}", blind.end_check_finding);
            }
        }
    }
}
