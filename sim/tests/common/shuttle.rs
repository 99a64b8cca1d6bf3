//! What the shuttle tests share (`concurrency_shuttle.rs` for the pool,
//! `cache_concurrency_shuttle.rs` for the cache): the iteration budget,
//! PCT's depth, the completion context's random pick, and running a
//! harness under PCT and the random scheduler with failing schedules saved
//! to a folder, caught, and replayed to the same failure.

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use shuttle::scheduler::{PctScheduler, RandomScheduler, ReplayScheduler, Scheduler};
use shuttle::{Config, FailurePersistence, MaxSteps, Runner};

/// Iterations per harness and scheduler: `DMSIM_SHUTTLE_ITERATIONS`, or
/// 1,000.
pub fn iterations() -> usize {
    std::env::var("DMSIM_SHUTTLE_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(1000)
}

/// PCT's bug depth: the number of priority changes per execution.
pub const PCT_DEPTH: usize = 3;

/// The completion context's choice: any data I/O in flight, drawn from
/// shuttle's generator so that replaying a schedule draws the same.
pub fn pick_random(n: usize) -> usize {
    use shuttle::rand::{thread_rng, Rng};
    thread_rng().gen_range(0..n)
}

/// The detector tests of one test binary run one at a time, so that a new
/// file in the schedule folder is theirs.
static DETECTORS: Mutex<()> = Mutex::new(());

/// One test binary's shuttle settings.
#[derive(Clone)]
pub struct Shuttle {
    /// Its schedule folder under `CARGO_TARGET_TMPDIR`: one per test
    /// binary, as shuttle installs its panic hook (and with it the folder)
    /// once per process, so that every test of the binary shares it.
    pub schedules: &'static str,
    /// Steps after which an execution counts as livelocked (a lost
    /// wake-up, a cell never released).
    pub max_steps: usize,
}

impl Shuttle {
    /// Where shuttle saves failing schedules.
    pub fn schedule_dir(&self) -> PathBuf {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(self.schedules);
        std::fs::create_dir_all(&dir).expect("create the schedule folder");
        dir
    }

    fn saved_schedules(&self) -> BTreeSet<PathBuf> {
        std::fs::read_dir(self.schedule_dir())
            .expect("schedule folder")
            .map(|e| e.expect("folder entry").path())
            .collect()
    }

    fn config(&self) -> Config {
        let mut config = Config::new();
        // The metadata code recurses through btrees: more than shuttle's
        // default 60 KiB of stack per thread.
        config.stack_size = 1 << 20;
        config.failure_persistence = FailurePersistence::File(Some(self.schedule_dir()));
        config.max_steps = MaxSteps::FailAfter(self.max_steps);
        config
    }

    /// Runs `body` under `scheduler`.
    pub fn run_with<S: Scheduler + 'static>(&self, scheduler: S, body: impl Fn() + Send + Sync + 'static) {
        Runner::new(scheduler, self.config()).run(body);
    }

    /// Runs `body` under PCT, then under the random scheduler, `iterations`
    /// each.
    pub fn both(&self, iterations: usize, body: impl Fn() + Clone + Send + Sync + 'static) {
        self.run_with(PctScheduler::new(PCT_DEPTH, iterations), body.clone());
        self.run_with(RandomScheduler::new(iterations), body);
    }

    /// Runs `body` (a broken variant: `what`) under both schedulers, ten
    /// times `iterations()` each, until one fails; returns the schedule
    /// saved for the failure and its message.
    fn catch(&self, what: &str, body: impl Fn() + Clone + Send + Sync + 'static) -> (PathBuf, String) {
        let before = self.saved_schedules();
        let caught = catch_unwind(AssertUnwindSafe(|| self.both(10 * iterations(), body)));
        let message = match caught {
            Ok(()) => panic!("{what} was not caught by shuttle"),
            Err(e) => panic_message(e),
        };
        let new: Vec<PathBuf> = self.saved_schedules().difference(&before).cloned().collect();
        assert_eq!(new.len(), 1, "one schedule saved for the failure, found {new:?}");
        (new[0].clone(), message)
    }

    /// Replays `schedule` on `body` and returns the failure's message.
    fn replay(&self, schedule: &Path, body: impl Fn() + Send + Sync + 'static) -> String {
        let scheduler = ReplayScheduler::new_from_file(schedule).expect("read the saved schedule");
        let caught = catch_unwind(AssertUnwindSafe(|| self.run_with(scheduler, body)));
        match caught {
            Ok(()) => panic!("the saved schedule {} did not fail again", schedule.display()),
            Err(e) => panic_message(e),
        }
    }

    /// A detector: `body` (a broken variant, described by `what`) is
    /// caught, and the schedule saved for its failure replays to the same
    /// failure. One detector of the binary at a time.
    ///
    /// The catch and the replay each run on a thread of their own. Shuttle
    /// (0.9) skips saving a failing schedule whose length equals that of the
    /// last one saved on the same thread (a thread-local meant to stop one
    /// failure being saved twice), so a second catch on one thread (the
    /// next locking design of a detector test) could fail without a file,
    /// when its schedule happened to be as long as the previous one.
    pub fn detector(&self, what: &str, body: impl Fn() + Clone + Send + Sync + 'static) {
        let _one_at_a_time = DETECTORS.lock().unwrap_or_else(|p| p.into_inner());
        let (schedule, first) = {
            let (this, what, body) = (self.clone(), what.to_string(), body.clone());
            on_a_fresh_thread(move || this.catch(&what, body))
        };
        println!("{what} caught: {first}\n  schedule saved to {}", schedule.display());
        let before = self.saved_schedules();
        let again = {
            let (this, schedule, body) = (self.clone(), schedule.clone(), body);
            on_a_fresh_thread(move || this.replay(&schedule, body))
        };
        assert_eq!(again, first, "the replay failed differently");
        println!("  replayed: {again}");
        // The replay's own failure saved the same schedule again.
        for extra in self.saved_schedules().difference(&before) {
            let _ = std::fs::remove_file(extra);
        }
    }
}

/// Runs `f` on a new thread and returns its result, or resumes its panic.
fn on_a_fresh_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(f).join().unwrap_or_else(|e| std::panic::resume_unwind(e))
}

fn panic_message(e: Box<dyn std::any::Any + Send>) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic without a message".to_string())
}
