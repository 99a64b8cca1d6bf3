//! The race the loom and shuttle tests of prison v2 explore: an I/O thread
//! taking shared locks (`get` … `put`) on one cell against a migration thread
//! that exclusively locks it, quiesces, promotes, quiesces again and unlocks,
//! the way dm-cache's migrations do (spec §4.7). Continuations run in whichever
//! thread the prison hands them to: the migration thread when the prison says
//! "run now", the I/O thread when its `put` is the last one.
//!
//! Checked on every schedule:
//! - no bio whose level the exclusive lock blocks is between its grant and its
//!   put while a migration step runs (the quiesce property), in both
//!   directions: a step starting with such a bio in flight, or such a bio
//!   granted during a step;
//! - every continuation runs exactly once, none is orphaned or replaced;
//! - every bio completes exactly once (granted at once, or queued and handed
//!   back by `unlock`, then re-issued);
//! - the prison ends empty, its invariants hold throughout.
//!
//! The bookkeeping log is a `std` mutex held only around plain data (no
//! checker operation inside), so it adds no scheduling points: loom and
//! shuttle switch threads only at their own operations.

use std::sync::Mutex as StdMutex;

use dmsim_model::prison_v2::{origin_key, BioPrisonV2, Get, Quiesce};
use dmsim_model::sync::{thread, Arc};

/// The migration's steps, as the continuation values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// After the first quiesce: "copy" at the first level, then promote.
    Copy,
    /// After the second quiesce: "update metadata" at the promoted level,
    /// then unlock.
    Update,
}

/// One race: the I/O thread issues `bios` bios at `io_level`; the migration
/// locks at `lock_level` and promotes to `promote_level`.
#[derive(Debug, Clone, Copy)]
pub struct Race {
    /// Number of bios the I/O thread issues one after the other.
    pub bios: u32,
    /// Their lock level (0 write, 1 read).
    pub io_level: u32,
    /// The migration's first exclusive level.
    pub lock_level: u32,
    /// The level it promotes to before its second step.
    pub promote_level: u32,
}

#[derive(Default)]
struct Log {
    /// Granted bios not yet put: (bio, level).
    in_flight: Vec<(u32, u32)>,
    /// The level of the migration step running, if one is.
    step_level: Option<u32>,
    /// Steps run, in order.
    steps: Vec<Step>,
    /// Bios completed (put after their I/O).
    completed: Vec<u32>,
}

struct Shared {
    prison: BioPrisonV2<u32, Step>,
    log: StdMutex<Log>,
    race: Race,
}

const BLOCK: u64 = 7;

impl Shared {
    fn log(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_table(&self) {
        self.prison.with_table(|t| t.check()).expect("prison invariants");
    }

    /// Issues `bio`: on a grant, does its "I/O" and puts it, running a
    /// continuation the put hands back. A queued bio is left to the unlocker.
    fn issue(&self, bio: u32) {
        let level = self.race.io_level;
        match self.prison.get(origin_key(BLOCK), level, bio) {
            Get::Granted { cell, .. } => {
                {
                    let mut log = self.log();
                    if let Some(step) = log.step_level {
                        assert!(level > step, "bio {bio} at level {level} granted during a step at {step}");
                    }
                    log.in_flight.push((bio, level));
                }
                self.check_table();
                {
                    let mut log = self.log();
                    log.in_flight.retain(|&(b, _)| b != bio);
                    log.completed.push(bio);
                }
                let out = self.prison.put(cell).expect("put a granted bio");
                assert_eq!(out.orphaned, None, "orphaned continuation");
                if let Some(step) = out.run {
                    self.run(cell_of(&self.prison), step);
                }
            }
            Get::Queued { .. } => {}
        }
    }

    /// Runs a migration step: the continuation.
    fn run(&self, cell: dmsim_model::prison_v2::CellId, step: Step) {
        let level = match step {
            Step::Copy => self.race.lock_level,
            Step::Update => self.race.promote_level,
        };
        {
            let mut log = self.log();
            assert!(
                log.in_flight.iter().all(|&(_, l)| l > level),
                "step {step:?} at level {level} with {:?} in flight",
                log.in_flight
            );
            log.step_level = Some(level);
            log.steps.push(step);
        }
        self.check_table();
        match step {
            Step::Copy => {
                self.log().step_level = None;
                let must_quiesce = self.prison.lock_promote(cell, self.race.promote_level).expect("promote");
                self.continue_after(cell, must_quiesce, Step::Update);
            }
            Step::Update => {
                self.log().step_level = None;
                let unlocked = self.prison.unlock(cell).expect("unlock");
                for bio in unlocked.bios {
                    self.issue(bio);
                }
            }
        }
    }

    /// Runs `step` now if nothing needs quiescing, else hands it to the
    /// prison.
    fn continue_after(&self, cell: dmsim_model::prison_v2::CellId, must_quiesce: bool, step: Step) {
        if !must_quiesce {
            return self.run(cell, step);
        }
        match self.prison.quiesce(cell, step).expect("quiesce") {
            Quiesce::RunNow(step) => self.run(cell, step),
            Quiesce::Deferred { replaced } => assert_eq!(replaced, None, "continuation replaced"),
        }
    }
}

/// The one live cell's handle (the continuation's context in dm-cache holds
/// it; here there is only one cell).
fn cell_of(prison: &BioPrisonV2<u32, Step>) -> dmsim_model::prison_v2::CellId {
    prison.with_table(|t| t.lookup(&origin_key(BLOCK))).expect("a continuation's cell is live")
}

/// Runs `race` once: call inside `loom::model` or a shuttle check.
pub fn run(race: Race) {
    let shared = Arc::new(Shared { prison: BioPrisonV2::new(), log: StdMutex::new(Log::default()), race });

    let io = {
        let shared = shared.clone();
        thread::spawn(move || {
            for bio in 1..=shared.race.bios {
                shared.issue(bio);
            }
        })
    };
    let migration = {
        let shared = shared.clone();
        thread::spawn(move || {
            let locked = shared.prison.lock(origin_key(BLOCK), shared.race.lock_level).expect("lock");
            shared.continue_after(locked.cell, locked.must_quiesce, Step::Copy);
        })
    };
    io.join().expect("I/O thread");
    migration.join().expect("migration thread");

    let log = shared.log();
    assert_eq!(log.steps, [Step::Copy, Step::Update], "each step exactly once, in order");
    let mut completed = log.completed.clone();
    completed.sort_unstable();
    assert_eq!(completed, (1..=race.bios).collect::<Vec<_>>(), "each bio completed once");
    assert!(log.in_flight.is_empty());
    assert!(shared.prison.with_table(|t| t.is_empty()), "prison empty at the end");
}

/// The races both checkers run: a write against a migration that blocks
/// writes then everything (dm-cache's promotion and writeback), and a read
/// that the first level lets through.
pub fn races(bios: u32) -> [Race; 2] {
    [
        Race { bios, io_level: 0, lock_level: 0, promote_level: 1 },
        Race { bios, io_level: 1, lock_level: 0, promote_level: 1 },
    ]
}
