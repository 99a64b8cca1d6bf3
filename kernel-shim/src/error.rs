//! [`ShimError`]: everything the shim reports, with its context.

use thiserror::Error;

/// Why the kernel shim could not do what it was asked.
#[derive(Debug, Error)]
pub enum ShimError {
    /// A prerequisite is missing on this machine (qemu, the kernel image,
    /// its modules, cargo to build the agent). Tests skip on this outside
    /// CI.
    #[error("missing prerequisite: {0}")]
    Missing(String),
    /// A file or device operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A device-mapper ioctl failed.
    #[error("device-mapper {what}: {source}")]
    Dm {
        /// The request and the device.
        what: String,
        /// The kernel's errno.
        #[source]
        source: std::io::Error,
    },
    /// Input that cannot be used (a bad trace header, a malformed reply,
    /// a name too long for the ABI).
    #[error("invalid input: {0}")]
    Invalid(String),
    /// The process is shutting down (SIGINT or SIGTERM): nothing new is
    /// started (see [`crate::cleanup`]).
    #[error("interrupted: the process is shutting down")]
    Interrupted,
    /// Building the static agent failed.
    #[error("building the agent failed: {0}")]
    Build(String),
    /// The VM did not finish in time; the console's tail is included.
    #[error("the VM did not finish within {seconds} s; console tail:\n{console}")]
    Timeout {
        /// The limit.
        seconds: u64,
        /// The last lines the VM printed.
        console: String,
    },
    /// The VM ended without a result, or the agent reported a failure.
    #[error("the kernel run failed: {what}; console tail:\n{console}")]
    Vm {
        /// What went wrong.
        what: String,
        /// The last lines the VM printed.
        console: String,
    },
}

impl From<dmsim_engine::EngineError> for ShimError {
    fn from(e: dmsim_engine::EngineError) -> ShimError {
        match e {
            dmsim_engine::EngineError::Io { what, source } => ShimError::Io { what, source },
            // As a device-mapper ioctl's refusal, so that callers treat
            // the engine's refusals as the kernel's.
            dmsim_engine::EngineError::Refused { errno, message } => ShimError::Dm {
                what: format!("(engine) {message}"),
                source: std::io::Error::from_raw_os_error(errno.code()),
            },
            e => ShimError::Invalid(e.to_string()),
        }
    }
}

impl ShimError {
    /// An I/O error with what was being done.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> ShimError {
        ShimError::Io { what: what.into(), source }
    }

    /// Whether this is a missing prerequisite (a test may skip on it).
    pub fn is_missing(&self) -> bool {
        matches!(self, ShimError::Missing(_))
    }
}
