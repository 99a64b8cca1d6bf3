//! The storage fault model (not yet built; see issue "deterministic
//! simulator"): the simulated disk with a volatile write cache and
//! FLUSH/FUA durability, crash-state construction (prefixes, subsets, torn
//! sectors), I/O errors, misdirected writes and bit flips — every fault
//! decided by the seed.
//!
//! Today it offers only what the model's tests need from it: nothing yet.
#![warn(missing_docs)]
