//! What the thin and cache simulators ([`crate::thin`], [`crate::cache_sim`])
//! share about a request in flight: the oracle's tickets for it, the trace
//! event of its completion, and telling the oracle how it completed. What
//! differs between the two — which errors are legal, what a completion
//! makes durable, how the target is settled — stays with each simulator.

use dmsim_model::errno::Errno;
use dmsim_traces::Event;

use crate::oracle::{IoTicket, Oracle};
use crate::thin::summarize;

/// A request submitted to the target, with the oracle's tickets for it.
pub(crate) enum Pending {
    /// A write, and the flush of its PREFLUSH if it has one.
    Write(IoTicket, Option<IoTicket>),
    /// A read.
    Read(IoTicket),
    /// A discard.
    Discard(IoTicket),
    /// A flush.
    Flush(IoTicket),
}

impl Pending {
    /// Whether it is a read.
    pub(crate) fn is_read(&self) -> bool {
        matches!(self, Pending::Read(_))
    }

    /// The trace event of its completion: request `bio` on device `dev`
    /// ended with `result`; a read's data summarized (empty when it
    /// failed).
    pub(crate) fn done_event(&self, bio: u64, dev: u32, result: Result<(), Errno>, data: &[u8]) -> Event {
        Event::Done {
            bio,
            dev,
            result: match result {
                Ok(()) => "ok".to_string(),
                Err(e) => e.to_string(),
            },
            read: self.is_read().then(|| if result.is_ok() { summarize(data) } else { String::new() }),
        }
    }

    /// Tells the oracle it completed: `ok`, whether it succeeded;
    /// `durable`, whether a write or a flush made anything durable (a
    /// write's PREFLUSH completes first); `data`, what a read returned.
    /// `Err((kind, message))`: `misuse` when the oracle refuses the call,
    /// `oracle` when a read returned what no legal order allows.
    pub(crate) fn settle(
        self,
        oracle: &mut Oracle,
        ok: bool,
        durable: bool,
        data: &[u8],
    ) -> Result<(), (&'static str, String)> {
        let misuse = |e: &dyn std::fmt::Display| ("misuse", format!("oracle misuse: {e}"));
        match self {
            Pending::Write(write, flush) => {
                if let Some(flush) = flush {
                    oracle.flush_completed(flush, durable).map_err(|e| misuse(&e))?;
                }
                oracle.write_completed(write, durable).map_err(|e| misuse(&e))
            }
            Pending::Read(ticket) => {
                oracle.read_completed(ticket, ok, data).map_err(|e| ("oracle", e.to_string()))
            }
            Pending::Discard(ticket) => oracle.discard_completed(ticket, ok).map_err(|e| misuse(&e)),
            Pending::Flush(ticket) => oracle.flush_completed(ticket, durable).map_err(|e| misuse(&e)),
        }
    }
}
