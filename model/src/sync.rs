//! The one place the pool's concurrent core gets its synchronisation types.
//!
//! Everything the map path, the worker, completion handlers and the message
//! path share is reached through these names, so the same code runs on
//! three substrates:
//!
//! - **std** (the default): real threads, and single-stepped by the
//!   simulator, which calls one entry point at a time;
//! - **loom** (`RUSTFLAGS="--cfg loom"`): every interleaving of the threads
//!   of a small model up to a preemption bound, exhaustively;
//! - **shuttle** (the `shuttle` feature): randomized and PCT schedules of
//!   larger models, thousands of iterations, replayable from a saved
//!   schedule.
//!
//! Under loom and shuttle every type here must be created inside the
//! checker's execution (`loom::model`, `shuttle::check_*`): a pool built
//! outside one panics on its first lock. With both switches on, loom wins.
//!
//! [`lock`] hides lock poisoning: a panic while a pool lock is held is a bug
//! in the model, and the harnesses want that panic, not a second one.
//! [`thread`] gives the harnesses threads and a yield that the checkers
//! understand (a spin loop must yield to them, or it never ends);
//! [`Condvar`] lets a harness thread block until something changed, which
//! loom needs: two threads spinning with yields can hand the processor to
//! each other for ever, so loom's paths never end.

#[cfg(loom)]
pub use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
#[cfg(loom)]
pub use loom::sync::{Arc, Condvar, Mutex, MutexGuard};

#[cfg(all(feature = "shuttle", not(loom)))]
pub use shuttle::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
#[cfg(all(feature = "shuttle", not(loom)))]
pub use shuttle::sync::{Arc, Condvar, Mutex, MutexGuard};

#[cfg(not(any(loom, feature = "shuttle")))]
pub use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(any(loom, feature = "shuttle")))]
pub use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Takes `mutex`, ignoring poisoning (see the module docs).
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Waits on `condvar` with `guard`, ignoring poisoning.
pub fn wait<'a, T>(condvar: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    condvar.wait(guard).unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The value of a mutex the caller holds exclusively (no lock taken),
/// ignoring poisoning.
pub fn get_mut<T>(mutex: &mut Mutex<T>) -> &mut T {
    mutex.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Consumes `mutex` and returns its value, ignoring poisoning.
pub fn into_inner<T>(mutex: Mutex<T>) -> T {
    mutex.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Threads of the substrate in use: the harnesses spawn the pool's
/// submitters, worker and completion contexts with these.
pub mod thread {
    #[cfg(loom)]
    pub use loom::thread::{yield_now, JoinHandle};

    /// Stack of a thread under loom: its coroutines' default is too small
    /// for the metadata code, which recurses through btrees.
    #[cfg(loom)]
    pub const LOOM_STACK: usize = 8 << 20;

    /// `spawn`, with a stack of [`LOOM_STACK`] bytes.
    #[cfg(loom)]
    pub fn spawn<F, T>(f: F) -> JoinHandle<T>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        loom::thread::Builder::new().stack_size(LOOM_STACK).spawn(f).expect("loom spawns")
    }

    #[cfg(all(feature = "shuttle", not(loom)))]
    pub use shuttle::thread::{spawn, yield_now, JoinHandle};

    #[cfg(not(any(loom, feature = "shuttle")))]
    pub use std::thread::{spawn, yield_now, JoinHandle};
}

/// Which substrate this build uses: `"std"`, `"loom"` or `"shuttle"`.
pub const SUBSTRATE: &str = if cfg!(loom) {
    "loom"
} else if cfg!(feature = "shuttle") {
    "shuttle"
} else {
    "std"
};
