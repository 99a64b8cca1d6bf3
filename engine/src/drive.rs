//! [`settle`]: the model's pool driven by the engine — its worker run
//! until it has nothing to do, its data I/O on a [`DataRing`].

use std::collections::BTreeSet;

use dmsim_model::block_device::BlockDevice;
use dmsim_model::thin::pool::{IoId, Pool};

use crate::data_ring::DataRing;
use crate::uring::EngineError;

/// Why the engine stopped driving a pool.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    /// The ring failed (not a data I/O: those end with their error).
    #[error("the data ring: {0}")]
    Ring(#[from] EngineError),
    /// The pool refused to end a data I/O the ring completed (a bug: the
    /// pool named it in flight).
    #[error("the pool: {0}")]
    Pool(String),
    /// The pool kept moving for a million steps.
    #[error("the pool never settled")]
    Unsettled,
}

/// Runs `pool`'s worker and its data I/O until nothing moves: every data
/// I/O the pool has in flight is submitted to `ring` at once
/// ([`Pool::data_request`]), and each is ended ([`Pool::end_io`]) when the
/// ring completes it, in the ring's order — not the order the pool issued
/// them, which is what the simulator's `complete pick=N` ops and the
/// kernel's block layer vary too. `submitted` holds the I/Os on the ring
/// between calls (start with an empty set). Requests that wait for data
/// space stay queued, as in the simulator's quiesce.
pub fn settle<M: BlockDevice, D: BlockDevice>(
    pool: &Pool<M, D>,
    ring: &mut DataRing,
    submitted: &mut BTreeSet<IoId>,
) -> Result<(), DriveError> {
    for _ in 0..1_000_000 {
        if pool.worker_wanted() {
            pool.run_worker();
            continue;
        }
        for io in pool.in_flight_io() {
            if submitted.contains(&io.id) {
                continue;
            }
            let Some(request) = pool.data_request(io.id) else { continue };
            ring.submit(io.id, request)?;
            submitted.insert(io.id);
        }
        if ring.in_flight() == 0 {
            return Ok(());
        }
        for done in ring.reap(1)? {
            submitted.remove(&done.id);
            pool.end_io(done.id, done.result, done.read.as_deref())
                .map_err(|e| DriveError::Pool(format!("data I/O {}: {e}", done.id.0)))?;
        }
    }
    Err(DriveError::Unsettled)
}
