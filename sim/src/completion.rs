//! What the thin and cache simulators ([`crate::thin`], [`crate::cache_sim`])
//! share about a request in flight: the oracle's tickets for it, the trace
//! event of its completion, and telling the oracle how it completed. What
//! differs between the two — which errors are legal, what a completion
//! makes durable, how the target is settled — stays with each simulator.
//! And a panic of the model during a step, turned into a violation.

use std::cell::{Cell, RefCell};

use dmsim_model::errno::Errno;
use dmsim_traces::stamp::SectorContent;
use dmsim_traces::Event;

use crate::oracle::{IoTicket, Oracle};
use crate::thin::summarize_decoded;

thread_local! {
    /// Whether this thread is inside [`catching`].
    static CATCHING: Cell<bool> = const { Cell::new(false) };
    /// Where the panic [`catching`] caught happened, when the hook of
    /// [`quiet_caught_panics`] is installed.
    static LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Runs `f`, a step of a simulator over the model; a panic in it (an
/// `expect` of the model, an arithmetic overflow: release builds check
/// the model's) comes back as `Err` with its message (and where, with
/// [`quiet_caught_panics`]), so that the run fails as a violation with its
/// trace instead of the campaign process dying.
pub(crate) fn catching<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    CATCHING.with(|c| c.set(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(false));
    r.map_err(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".to_string());
        match LOCATION.with(|l| l.borrow_mut().take()) {
            Some(at) => format!("model panicked at {at}: {message}"),
            None => format!("model panicked: {message}"),
        }
    })
}

/// Installs a panic hook that keeps quiet about the panics the simulators
/// catch and report as violations (see [`catching`]; a minimization can
/// replay one many times), noting where each happened for the report;
/// other panics go to the hook installed before. For a program such as
/// the `dmsim` command: the hook is the process's.
pub fn quiet_caught_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if CATCHING.with(|c| c.get()) {
            let at = info.location().map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
            LOCATION.with(|l| *l.borrow_mut() = at);
        } else {
            previous(info);
        }
    }));
}

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

    /// What it is, in a word: `write`, `read`, `discard` or `flush`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Pending::Write(..) => "write",
            Pending::Read(_) => "read",
            Pending::Discard(_) => "discard",
            Pending::Flush(_) => "flush",
        }
    }

    /// The trace event of its completion: request `bio` on device `dev`
    /// ended with `result`; a read's data (`decoded`) summarized (empty
    /// when it failed).
    pub(crate) fn done_event(
        &self,
        bio: u64,
        dev: u32,
        result: Result<(), Errno>,
        decoded: &[SectorContent],
    ) -> Event {
        Event::Done {
            bio,
            dev,
            result: match result {
                Ok(()) => "ok".to_string(),
                Err(e) => e.to_string(),
            },
            read: self.is_read().then(|| {
                if result.is_ok() {
                    summarize_decoded(decoded)
                } else {
                    String::new()
                }
            }),
        }
    }

    /// Tells the oracle it completed: `ok`, whether it succeeded;
    /// `durable`, whether a write or a flush made anything durable (a
    /// write's PREFLUSH completes first); `data`, what a read returned: its
    /// length in bytes and its sectors decoded.
    /// `Err((kind, message))`: `misuse` when the oracle refuses the call,
    /// `oracle` when a read returned what no legal order allows.
    pub(crate) fn settle(
        self,
        oracle: &mut Oracle,
        ok: bool,
        durable: bool,
        data: (usize, &[SectorContent]),
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
                let (len, decoded) = data;
                oracle.read_completed_decoded(ticket, ok, len, decoded).map_err(|e| ("oracle", e.to_string()))
            }
            Pending::Discard(ticket) => oracle.discard_completed(ticket, ok).map_err(|e| misuse(&e)),
            Pending::Flush(ticket) => oracle.flush_completed(ticket, durable).map_err(|e| misuse(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::catching;

    #[test]
    fn a_panic_of_the_model_comes_back_as_a_message() {
        assert_eq!(catching(|| 7), Ok(7));
        assert_eq!(
            catching(|| -> u8 { panic!("cell {} has no holder", 3) }),
            Err("model panicked: cell 3 has no holder".into())
        );
        // An overflow, as the model's checked arithmetic panics (its crate
        // has overflow checks in release builds too). This crate's own
        // code has them with debug assertions (the test profile), not
        // under `cargo test --release`: there the panic is made as the
        // check would make it.
        let zero = std::hint::black_box(0u32);
        let r = if cfg!(debug_assertions) {
            catching(|| zero - 1)
        } else {
            catching(|| zero.checked_sub(1).unwrap_or_else(|| panic!("attempt to subtract with overflow")))
        };
        assert!(r.as_ref().is_err_and(|e| e.ends_with("attempt to subtract with overflow")), "{r:?}");
        // With the quiet hook, where it happened.
        super::quiet_caught_panics();
        let r = catching(|| -> u8 { panic!("no holder") });
        assert!(
            r.as_ref().is_err_and(|e| e.starts_with("model panicked at sim/src/completion.rs:")),
            "{r:?}"
        );
        assert!(r.unwrap_err().ends_with(": no holder"));
    }
}
