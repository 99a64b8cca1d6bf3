//! Replay of traces against the real kernel targets — natively where the
//! host has device-mapper, otherwise in a qemu VM booting Debian's stock
//! kernel — and against the io_uring userland engine (not yet built).
#![warn(missing_docs)]
