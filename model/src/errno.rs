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

    /// What a bio ended with this error reports (`errno_to_blk_status`
    /// then `blk_status_to_errno`): the errnos the block layer has a
    /// status for come back as they are, any other as `EIO` (a commit's
    /// `-EINVAL` in read-only mode fails a flush with `EIO`).
    pub fn as_bio_status(self) -> Errno {
        match self {
            Errno::EIO
            | Errno::ENOMEM
            | Errno::EBUSY
            | Errno::ENOSPC
            | Errno::ENODATA
            | Errno::EOPNOTSUPP => self,
            Errno::EPERM | Errno::EEXIST | Errno::EFBIG | Errno::EINVAL => Errno::EIO,
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

    #[test]
    fn a_bio_reports_eio_for_errors_the_block_layer_has_no_status_for() {
        assert_eq!(Errno::EINVAL.as_bio_status(), Errno::EIO);
        assert_eq!(Errno::EPERM.as_bio_status(), Errno::EIO);
        assert_eq!(Errno::ENOSPC.as_bio_status(), Errno::ENOSPC);
        assert_eq!(Errno::ENODATA.as_bio_status(), Errno::ENODATA);
    }
}
