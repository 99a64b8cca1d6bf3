//! The workload generators: a seed and a [`RunConfig`] in, ops out.
//!
//! Each workload is a table of op weights plus a rule for where its I/O
//! goes; the seed's [`FaultSwarm`](dmsim_faults::FaultSwarm) adds crashes,
//! failed data I/O and armed disk faults with its own weights, aimed
//! faults before flushes and pool messages (which commit), and aimed
//! passdown faults before discards. Every choice comes from one ChaCha
//! stream, the aimed faults' from a second and the passdown aims' from a
//! third, so the same config gives the same ops.

use dmsim_model::prison::REGION_BLOCKS;
use dmsim_traces::{FaultAim, Op};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::run::{RunConfig, Workload};

/// Op weights of a workload, out of roughly a thousand.
#[derive(Debug, Clone, Copy)]
struct Weights {
    write: u32,
    read: u32,
    discard: u32,
    flush: u32,
    create_thin: u32,
    create_snap: u32,
    delete: u32,
    worker: u32,
    complete: u32,
    tick: u32,
    grow_metadata: u32,
}

fn weights(w: Workload) -> Weights {
    let base = Weights {
        write: 280,
        read: 180,
        discard: 70,
        flush: 30,
        create_thin: 20,
        create_snap: 30,
        delete: 10,
        worker: 140,
        complete: 200,
        tick: 20,
        grow_metadata: 0,
    };
    match w {
        Workload::Random => base,
        Workload::Sequential => {
            Weights { write: 350, read: 150, discard: 5, create_snap: 10, tick: 30, ..base }
        }
        Workload::SnapshotHeavy => Weights { write: 250, create_snap: 100, delete: 30, discard: 30, ..base },
        Workload::DiscardHeavy => Weights { write: 220, read: 120, discard: 250, ..base },
        Workload::FillToFull => Weights { write: 400, read: 80, discard: 20, flush: 10, tick: 60, ..base },
        Workload::ManySmallDevices => {
            Weights { create_thin: 80, delete: 60, create_snap: 40, write: 250, read: 150, ..base }
        }
        Workload::Durability => Weights { write: 300, flush: 50, tick: 10, ..base },
        Workload::MetadataPressure => Weights {
            write: 250,
            read: 80,
            create_thin: 300,
            create_snap: 80,
            delete: 10,
            discard: 30,
            flush: 60,
            grow_metadata: 12,
            ..base
        },
        Workload::RegionCrossing => Weights { write: 260, read: 160, discard: 150, ..base },
    }
}

/// The ops of `cfg`.
pub fn ops(cfg: &RunConfig) -> Vec<Op> {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let w = weights(cfg.workload);
    let swarm = &cfg.swarm;
    let block = cfg.thin.block_sectors;
    let size = cfg.thin.thin_blocks * block;
    let mut cursor = [0u64; 256];
    let durability = cfg.workload == Workload::Durability;
    // The durability workload crashes often even when its swarm does not.
    let crash_weight = if durability { swarm.crash_weight.max(40) } else { swarm.crash_weight };
    let (fua, preflush) = if durability { (0.3, 0.1) } else { (0.08, 0.04) };
    let table: [(u32, u8); 14] = [
        (w.write, 0),
        (w.read, 1),
        (w.discard, 2),
        (w.flush, 3),
        (w.create_thin, 4),
        (w.create_snap, 5),
        (w.delete, 6),
        (w.worker, 7),
        (w.complete, 8),
        (w.tick, 9),
        (crash_weight, 10),
        (swarm.fail_io_weight, 11),
        (swarm.metadata_fault_weight + swarm.data_fault_weight, 12),
        (w.grow_metadata, 13),
    ];
    let total: u32 = table.iter().map(|(w, _)| w).sum();
    // Aimed faults come from a stream of their own: a seed's other ops are
    // drawn as they would be without them (the last few fall off the end).
    let mut aim_rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ AIM_SALT);
    // The passdown aims from a third: the commit and abort aims stay those
    // drawn without them. Only a pool that passes discards down sends any.
    let mut passdown_rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ PASSDOWN_AIM_SALT);
    let passdown_percent =
        if cfg.thin.features.no_discard_passdown { 0 } else { swarm.aimed_percent / PASSDOWN_AIM_DIVISOR };
    let mut out = vec![Op::CreateThin];
    while out.len() < cfg.ops {
        let mut roll = rng.gen_range(0..total);
        let mut kind = 7;
        for (weight, k) in table {
            if roll < weight {
                kind = k;
                break;
            }
            roll -= weight;
        }
        let dev = rng.gen_range(0..cfg.thin.max_devices.max(1) as u8);
        let op = match kind {
            0..=2 => {
                let (sector, nr) = place(cfg, &mut rng, &mut cursor[dev as usize], kind, size, block);
                match kind {
                    0 => Op::Write {
                        dev,
                        sector,
                        nr_sectors: nr.clamp(1, u64::from(u16::MAX)) as u16,
                        fua: rng.gen_bool(fua),
                        preflush: rng.gen_bool(preflush),
                    },
                    1 => Op::Read { dev, sector, nr_sectors: nr.clamp(1, u64::from(u16::MAX)) as u16 },
                    _ => Op::Discard { dev, sector, nr_sectors: nr.clamp(1, u64::from(u32::MAX)) as u32 },
                }
            }
            3 => Op::Flush { dev },
            4 => Op::CreateThin,
            5 => Op::CreateSnap { origin: dev },
            6 => Op::Delete { dev },
            7 => Op::Worker,
            8 => Op::Complete { pick: rng.gen() },
            9 => {
                // Long steps now and then pass the no-space timeout.
                let millis =
                    if rng.gen_bool(0.1) { rng.gen_range(10_000..65_000) } else { rng.gen_range(1..1500) };
                Op::Tick { millis }
            }
            10 => Op::Crash { mode: swarm.pick_crash_mode(&mut rng), seed: rng.gen() },
            11 => Op::FailIo { pick: rng.gen() },
            12 => match swarm.pick_fault(&mut rng) {
                Some((disk, fault)) => Op::Fault { disk, fault },
                None => Op::Worker,
            },
            13 => Op::GrowMetadata { blocks: rng.gen_range(1..8), reload: rng.gen_bool(0.5) },
            _ => Op::Worker,
        };
        // Before a flush or a FUA write (each waits for a commit that
        // comes at a later worker step), and less often before a pool
        // message (which commits at once).
        let aim_percent = match op {
            Op::Flush { .. } => swarm.aimed_percent,
            Op::Write { fua: true, .. } | Op::Write { preflush: true, .. } => swarm.aimed_percent,
            Op::CreateThin | Op::CreateSnap { .. } | Op::Delete { .. } => swarm.aimed_percent / 3,
            _ => 0,
        };
        if aim_percent > 0 && aim_rng.gen_range(0..100) < aim_percent {
            out.push(aimed_fault(&mut aim_rng));
            if out.len() == cfg.ops {
                break;
            }
        }
        // Before a discard: its passdown to the data device (pass one)
        // fails, and pass two must run all the same.
        if matches!(op, Op::Discard { .. })
            && passdown_percent > 0
            && passdown_rng.gen_range(0..100) < passdown_percent
        {
            out.push(Op::AimFault { aim: FaultAim::Passdown });
            if out.len() == cfg.ops {
                break;
            }
        }
        out.push(op);
    }
    out
}

/// Salt of the aimed faults' stream.
const AIM_SALT: u64 = 0x6169_6d5f_666c_7573;

/// Salt of the passdown aims' stream.
const PASSDOWN_AIM_SALT: u64 = 0x7061_7373_646f_776e;

/// Before a discard a seed aims a passdown fault with this fraction of its
/// swarm's [`FaultSwarm::aimed_percent`](dmsim_faults::FaultSwarm::aimed_percent).
const PASSDOWN_AIM_DIVISOR: u32 = 1;

/// An aimed fault: two in three at a request of the next commit (its
/// first to its eighth write: a small commit writes a few blocks, so a
/// later request may fall in a later commit), one in three at the commit
/// and then its abort.
fn aimed_fault(rng: &mut ChaCha8Rng) -> Op {
    let aim = if rng.gen_range(0..3) < 2 {
        FaultAim::Commit { request: rng.gen_range(0..4) }
    } else {
        FaultAim::Abort
    };
    Op::AimFault { aim }
}

/// Where a read, write (`kind` 0/1) or discard (2) goes, and its length.
fn place(
    cfg: &RunConfig,
    rng: &mut ChaCha8Rng,
    cursor: &mut u64,
    kind: u8,
    size: u64,
    block: u64,
) -> (u32, u64) {
    let sector = match cfg.workload {
        Workload::Sequential => {
            let s = *cursor % size;
            *cursor += block;
            s
        }
        // Clustered: collisions between requests are where bugs live.
        Workload::Random | Workload::SnapshotHeavy if rng.gen_bool(0.7) => rng.gen_range(0..size.min(1024)),
        // Within eight blocks of the prison region boundary; now and then
        // a discard of most of the region, up to just past the boundary.
        Workload::RegionCrossing => {
            let edge = REGION_BLOCKS * block;
            if kind == 2 && rng.gen_bool(0.15) {
                let sector = rng.gen_range(0..edge - 8 * block);
                let end = edge + rng.gen_range(0..8 * block);
                return (sector as u32, end - sector);
            }
            edge - 8 * block + rng.gen_range(0..16 * block)
        }
        _ => rng.gen_range(0..size),
    };
    let sector = if rng.gen_bool(0.5) { sector - sector % block } else { sector };
    let nr = match kind {
        2 => {
            if rng.gen_bool(0.5) {
                block * rng.gen_range(1..4)
            } else {
                rng.gen_range(1..block * 4)
            }
        }
        _ => match cfg.workload {
            Workload::Sequential | Workload::FillToFull if rng.gen_bool(0.7) => block,
            _ if rng.gen_bool(0.2) => block * rng.gen_range(1..3),
            _ => rng.gen_range(1..300),
        },
    };
    (sector as u32, nr)
}
