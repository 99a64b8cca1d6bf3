//! Support shared by the sim crate's test targets (`mod common;`).

#[cfg(feature = "shuttle")]
pub mod shuttle;
