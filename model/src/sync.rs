//! The one place the pool's concurrent core gets its synchronisation types.
//!
//! Everything the map path, the worker, completion handlers and the message
//! path share is reached through these names, so the same code runs on std
//! threads (the default, and single-stepped by the simulator), under loom
//! (`RUSTFLAGS="--cfg loom"`, exhaustive) and under shuttle (the `shuttle`
//! feature, randomized). The loom and shuttle switches arrive with the
//! concurrency harnesses; until then this re-exports std.
//!
//! [`lock`] hides lock poisoning: a panic while a pool lock is held is a bug
//! in the model, and the harnesses want that panic, not a second one.

pub use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
pub use std::sync::{Arc, Mutex, MutexGuard};

/// Takes `mutex`, ignoring poisoning (see the module docs).
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
