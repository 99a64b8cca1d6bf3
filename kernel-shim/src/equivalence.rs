//! Level-1 equivalence (logical): every thin device reads the same stamps,
//! block by block, and the same blocks are mapped, on the kernel and on
//! the simulator.
//!
//! The kernel runs each request to completion before the next, so the
//! simulator is run the same way for the comparison
//! ([`simulate_serialized`]): after every op it quiesces (worker passes and
//! completions, oldest first, until nothing moves), and the trace's own
//! scheduling ops (`worker`, `complete`, `fail-io`, `tick`) are not
//! replayed. What is compared is one legal schedule on both sides, not the
//! trace's recorded interleaving.

use std::collections::{BTreeMap, BTreeSet};

use dmsim_sim::run::RunConfig;
use dmsim_sim::thin::ThinSim;
use dmsim_traces::{Event, Op, Trace};

use crate::error::ShimError;
use crate::vm::{dump, mapped_blocks, KernelRun};

/// The end state L1 compares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FinalState {
    /// Live devices in creation order: id and one stamp summary per block.
    pub devices: Vec<(u32, Vec<String>)>,
    /// Mapped virtual blocks per device id.
    pub mapped: BTreeMap<u32, BTreeSet<u64>>,
}

impl FinalState {
    /// The kernel's end state.
    pub fn of_kernel(run: &KernelRun) -> FinalState {
        FinalState {
            devices: run.result.devices.iter().map(|d| (d.id, d.blocks.clone())).collect(),
            mapped: run.mapped.clone(),
        }
    }
}

/// Whether an op is replayed on the kernel (the rest are scheduling ops,
/// faults and crashes).
pub fn kernel_replays(op: &Op) -> bool {
    !matches!(
        op,
        Op::Worker
            | Op::Complete { .. }
            | Op::FailIo { .. }
            | Op::Tick { .. }
            | Op::Fault { .. }
            | Op::Crash { .. }
    )
}

/// Runs `trace` on the simulator one request at a time, as the kernel
/// shim does, and reads every device back. Faults and crashes are refused
/// (the kernel shim does not replay them yet).
pub fn simulate_serialized(trace: &Trace) -> Result<FinalState, ShimError> {
    let cfg = RunConfig::from_header(&trace.header).map_err(ShimError::Invalid)?;
    if let Some(op) = trace.ops().find(|op| matches!(op, Op::Fault { .. } | Op::Crash { .. })) {
        return Err(ShimError::Invalid(format!("the serialized comparison does not support {op:?} yet")));
    }
    let mut sim = ThinSim::new(cfg.thin);
    let fail = |f: dmsim_sim::thin::ThinFailure| ShimError::Invalid(format!("simulator: {f}"));
    for op in trace.ops().filter(kernel_replays) {
        sim.apply(&op).map_err(fail)?;
        sim.quiesce().map_err(fail)?;
    }
    let before = sim.events().len();
    sim.finish().map_err(fail)?;
    let mut devices: Vec<(u32, Vec<String>)> = Vec::new();
    for e in &sim.events()[before..] {
        if let Event::Done { dev, read: Some(summary), .. } = e {
            match devices.iter_mut().find(|(d, _)| d == dev) {
                Some((_, blocks)) => blocks.push(summary.clone()),
                None => devices.push((*dev, vec![summary.clone()])),
            }
        }
    }
    let xml = dump(&sim.metadata_image())
        .map_err(|e| ShimError::Invalid(format!("dump of the model's metadata: {e}")))?;
    Ok(FinalState { devices, mapped: mapped_blocks(&xml) })
}

/// The differences between two end states, the first ones first (empty
/// when L1-equal). Each names the device and block, and both sides.
pub fn compare_l1(sim: &FinalState, kernel: &FinalState) -> Vec<String> {
    let mut out = Vec::new();
    let ids = |s: &FinalState| s.devices.iter().map(|(d, _)| *d).collect::<Vec<_>>();
    if ids(sim) != ids(kernel) {
        out.push(format!("live devices: simulator {:?}, kernel {:?}", ids(sim), ids(kernel)));
    }
    for (id, sim_blocks) in &sim.devices {
        let Some((_, k_blocks)) = kernel.devices.iter().find(|(d, _)| d == id) else { continue };
        for (b, (s, k)) in sim_blocks.iter().zip(k_blocks).enumerate() {
            if s != k {
                out.push(format!("dev {id} block {b}: simulator reads {s}, kernel reads {k}"));
            }
        }
        if sim_blocks.len() != k_blocks.len() {
            out.push(format!("dev {id}: simulator {} blocks, kernel {}", sim_blocks.len(), k_blocks.len()));
        }
    }
    let empty = BTreeSet::new();
    let all: BTreeSet<u32> = sim.mapped.keys().chain(kernel.mapped.keys()).copied().collect();
    for id in all {
        let (s, k) = (sim.mapped.get(&id).unwrap_or(&empty), kernel.mapped.get(&id).unwrap_or(&empty));
        if s != k {
            let only_sim: Vec<u64> = s.difference(k).copied().collect();
            let only_kernel: Vec<u64> = k.difference(s).copied().collect();
            out.push(format!(
                "dev {id} mappings: mapped only on the simulator {only_sim:?}, only on the kernel {only_kernel:?}"
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn differences_name_device_and_block() {
        let a = FinalState {
            devices: vec![(0, vec!["w0*128".into(), "0*128".into()])],
            mapped: [(0, [0u64].into_iter().collect())].into_iter().collect(),
        };
        let mut b = a.clone();
        assert!(compare_l1(&a, &b).is_empty());
        b.devices[0].1[1] = "w1*128".into();
        b.mapped.get_mut(&0).unwrap().insert(1);
        let d = compare_l1(&a, &b);
        assert_eq!(d[0], "dev 0 block 1: simulator reads 0*128, kernel reads w1*128");
        assert!(d[1].contains("only on the kernel [1]"));
    }
}
