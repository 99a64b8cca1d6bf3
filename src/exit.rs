//! The exit statuses of every dmsim command, and the table `--help` and
//! the README print.
//!
//! One meaning each, whatever the command: 0 nothing wrong was found, 1
//! problems were found (what counts as a problem is the command's own: a
//! violation, a divergence, damaged metadata), 2 the input could not be
//! used (options, files, traces, images, a prerequisite missing under
//! `CI=true`), and 128 + the signal's number when SIGINT or SIGTERM ended
//! the run, after it removed what it had made.

/// Nothing wrong was found.
pub const CLEAN: u8 = 0;
/// Problems were found.
pub const PROBLEMS: u8 = 1;
/// The input could not be used.
pub const UNUSABLE: u8 = 2;

/// The exit-status table, as every command's `--help` ends (a literal, for
/// `concat!`).
#[macro_export]
macro_rules! exit_table {
    () => {
        "Exit status (the same for every dmsim command):
  0    nothing wrong was found
  1    problems were found (above: what counts for this command)
  2    bad or unusable input: options, files, traces, images, or a
       prerequisite missing under CI=true
  130  interrupted by SIGINT; 143 by SIGTERM (what the run made, such as
       temporary folders and the VM, is removed first)"
    };
}

/// A command's `--help` epilogue: its own words on status 1 (and more),
/// then the table.
#[macro_export]
macro_rules! exit_help {
    ($specific:literal) => {
        concat!($specific, "\n\n", $crate::exit_table!())
    };
}
