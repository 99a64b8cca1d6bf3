//! The kernel error numbers the targets return, by name.
//!
//! Bio completions, message replies and table loads report these, so that a
//! model result can be compared with what the kernel returned to userland.

use std::fmt;

/// A kernel errno as the device-mapper targets use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Errno {
    /// Operation not permitted (1).
    EPERM,
    /// I/O error (5).
    EIO,
    /// Out of memory (12).
    ENOMEM,
    /// Device or resource busy (16).
    EBUSY,
    /// File exists (17).
    EEXIST,
    /// File too large (27): dm-cache's preresume when a shrunk origin
    /// would drop a dirty cache block.
    EFBIG,
    /// Invalid argument (22).
    EINVAL,
    /// No space left on device (28).
    ENOSPC,
    /// No data available (61).
    ENODATA,
    /// Operation not supported (95).
    EOPNOTSUPP,
}

impl Errno {
    /// The positive errno value (x86-64 numbering, as in asm-generic).
    pub fn code(self) -> i32 {
        match self {
            Errno::EPERM => 1,
            Errno::EIO => 5,
            Errno::ENOMEM => 12,
            Errno::EBUSY => 16,
            Errno::EEXIST => 17,
            Errno::EFBIG => 27,
            Errno::EINVAL => 22,
            Errno::ENOSPC => 28,
            Errno::ENODATA => 61,
            Errno::EOPNOTSUPP => 95,
        }
    }

    /// The errno for a positive value, if it is one the targets use.
    pub fn from_code(code: i32) -> Option<Errno> {
        [
            Errno::EPERM,
            Errno::EIO,
            Errno::ENOMEM,
            Errno::EBUSY,
            Errno::EEXIST,
            Errno::EFBIG,
            Errno::EINVAL,
            Errno::ENOSPC,
            Errno::ENODATA,
            Errno::EOPNOTSUPP,
        ]
        .into_iter()
        .find(|e| e.code() == code)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for code in 0..200 {
            if let Some(e) = Errno::from_code(code) {
                assert_eq!(e.code(), code);
            }
        }
        assert_eq!(Errno::from_code(28), Some(Errno::ENOSPC));
        assert_eq!(Errno::from_code(2), None);
    }
}
