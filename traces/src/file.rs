//! Trace files: reading with bounds, writing atomically.
//!
//! A trace file is text (the default) or binary, told apart by the binary
//! encoding's magic bytes when reading, and by the caller's choice when
//! writing ([`Encoding::for_output`]).
//!
//! Reading never takes more than [`MAX_TRACE_BYTES`] of input, and only
//! from a regular file: a FIFO, a character device (`/dev/zero`,
//! `/dev/urandom`), a socket or a directory is refused with an error that
//! says what the path is, before anything is read. Opening does not block
//! on a FIFO without a writer (the path is opened non-blocking and its
//! type taken from the open file, so a path swapped between a check and
//! the open cannot get past).
//!
//! Writing goes to a temporary file beside the target, renamed over it
//! when complete, so an interrupted write never leaves half a trace.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::binary::{from_bytes, to_bytes, MAGIC};
use crate::error::clip;
use crate::text::{from_text, to_text};
use crate::Trace;

/// The largest trace file read: 64 MiB. A decoded trace takes about 20
/// times its text in memory, so this keeps a hostile or mistaken input
/// under about 1.5 GiB. The longest run `dmsim run` makes
/// (`dmsim_sim::run::MAX_OPS` ops) writes well under it.
pub const MAX_TRACE_BYTES: u64 = 64 << 20;

/// Linux's `O_NONBLOCK`: opening a FIFO that has no writer returns at once.
const O_NONBLOCK: i32 = 0o4000;

/// The encoding of a trace file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// The line-oriented text encoding.
    Text,
    /// The compact binary encoding.
    Binary,
}

impl Encoding {
    /// The encoding to write `path` in: binary when asked for or when the
    /// file name ends in `.bin`, text otherwise.
    pub fn for_output(path: &Path, binary: bool) -> Encoding {
        if binary || path.extension().is_some_and(|e| e.eq_ignore_ascii_case("bin")) {
            Encoding::Binary
        } else {
            Encoding::Text
        }
    }

    /// Its name in messages: `text` or `binary`.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Text => "text",
            Encoding::Binary => "binary",
        }
    }
}

/// What kinds of file an input may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    /// Regular files only (traces, logs, packs).
    RegularFile,
    /// Regular files and block devices (metadata images).
    FileOrBlockDevice,
}

/// Opens `path` for reading, refusing what `accept` does not allow; the
/// error names the path and says what it is. Never blocks on a FIFO.
pub fn open_input(path: &Path, accept: Accept) -> Result<(File, u64), String> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let meta = file.metadata().map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
    let t = meta.file_type();
    let what = if t.is_dir() {
        Some("a directory")
    } else if t.is_fifo() {
        Some("a FIFO (named pipe)")
    } else if t.is_char_device() {
        Some("a character device")
    } else if t.is_socket() {
        Some("a socket")
    } else if t.is_block_device() && accept == Accept::RegularFile {
        Some("a block device")
    } else {
        None
    };
    if let Some(what) = what {
        let allowed = match accept {
            Accept::RegularFile => "a regular file",
            Accept::FileOrBlockDevice => "a regular file or a block device",
        };
        return Err(format!("{} is {what}; this input must be {allowed}", path.display()));
    }
    let len = if t.is_block_device() {
        // A block device's metadata says 0; its end says how big it is.
        use std::io::{Seek, SeekFrom};
        let mut f = &file;
        f.seek(SeekFrom::End(0)).map_err(|e| format!("cannot size {}: {e}", path.display()))?
    } else {
        meta.len()
    };
    Ok((file, len))
}

/// Reads at most `cap` bytes of the regular file at `path`; a larger file
/// is refused before it is read, naming the cap.
pub fn read_capped(path: &Path, cap: u64, what: &str) -> Result<Vec<u8>, String> {
    let (file, len) = open_input(path, Accept::RegularFile)?;
    let too_big = |n: u64| {
        format!("{} is {n} bytes, more than the {} MiB a {what} may have", path.display(), cap >> 20)
    };
    if len > cap {
        return Err(too_big(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // The file may grow while it is read: take one byte past the cap to
    // tell.
    file.take(cap + 1).read_to_end(&mut bytes).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if bytes.len() as u64 > cap {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Decodes a trace held in memory, whichever its encoding; the error says
/// where the input went wrong.
pub fn decode(bytes: &[u8]) -> Result<(Trace, Encoding), String> {
    if bytes.starts_with(&MAGIC) {
        return from_bytes(bytes).map(|t| (t, Encoding::Binary)).map_err(|e| format!("binary trace: {e}"));
    }
    if bytes.is_empty() {
        return Err("empty file: not a trace".to_string());
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        format!(
            "not a trace: neither the binary magic nor UTF-8 text (invalid byte at offset {})",
            e.valid_up_to()
        )
    })?;
    if let Some(at) = text.find('\0') {
        return Err(format!(
            "not a trace: a NUL byte at offset {at} (text traces have none); it begins {:?}",
            clip(&text[..text.len().min(64)])
        ));
    }
    from_text(text).map(|t| (t, Encoding::Text)).map_err(|e| e.to_string())
}

/// Reads and decodes the trace file at `path`, within
/// [`MAX_TRACE_BYTES`]; the error names the file.
pub fn read(path: &Path) -> Result<(Trace, Encoding), String> {
    let bytes = read_capped(path, MAX_TRACE_BYTES, "trace file")?;
    decode(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// Encodes `trace`.
pub fn encode(trace: &Trace, encoding: Encoding) -> Vec<u8> {
    match encoding {
        Encoding::Text => to_text(trace).into_bytes(),
        Encoding::Binary => to_bytes(trace),
    }
}

/// Whether a trace can be written at `path`, judged before the work that
/// makes it: not a folder, and in a folder that exists.
pub fn check_output_path(path: &Path) -> Result<(), String> {
    if path.is_dir() {
        return Err(format!("{} is a folder; give a file name for the trace", path.display()));
    }
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(format!(
            "cannot write {}: the folder {} does not exist",
            path.display(),
            parent.display()
        ));
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically: into a temporary file in the same
/// folder, renamed over `path` once written and synced.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp: PathBuf = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| -> io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}: {e}", path.display())
    })
}

/// Writes `trace` to `path` in `encoding`, atomically; the error names the
/// file.
pub fn write(path: &Path, trace: &Trace, encoding: Encoding) -> Result<(), String> {
    write_atomic(path, &encode(trace, encoding))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dmsim-traces-file-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn refuses_what_is_not_a_regular_file() {
        let dir = temp("kinds");
        let e = read(&dir).unwrap_err();
        assert!(e.contains("is a directory"), "{e}");
        let e = read(Path::new("/dev/zero")).unwrap_err();
        assert!(e.contains("is a character device"), "{e}");
        let fifo = dir.join("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo runs");
        assert!(made.success());
        // No writer: a blocking open would hang here.
        let e = read(&fifo).unwrap_err();
        assert!(e.contains("is a FIFO"), "{e}");
        let e = read(&dir.join("missing")).unwrap_err();
        assert!(e.contains("cannot open") && e.contains("missing"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_files_over_the_cap_before_reading_them() {
        let dir = temp("cap");
        let p = dir.join("big");
        let f = File::create(&p).unwrap();
        f.set_len(MAX_TRACE_BYTES + 1).unwrap(); // sparse: nothing to read
        let e = read(&p).unwrap_err();
        assert!(e.contains("more than the 64 MiB a trace file may have"), "{e}");
        let small = dir.join("small");
        std::fs::write(&small, b"0123456789").unwrap();
        let e = read_capped(&small, 4, "test input").unwrap_err();
        assert!(e.contains("10 bytes"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn empty_and_nul_inputs_are_not_traces() {
        assert_eq!(decode(b"").unwrap_err(), "empty file: not a trace");
        let e = decode(&[0u8; 4096]).unwrap_err();
        assert!(e.contains("NUL byte at offset 0"), "{e}");
    }

    #[test]
    fn output_paths_are_judged_before_the_work() {
        let dir = temp("out");
        assert!(check_output_path(&dir).unwrap_err().contains("is a folder"));
        assert!(check_output_path(&dir.join("a/b.trace")).unwrap_err().contains("does not exist"));
        assert_eq!(check_output_path(&dir.join("t.trace")), Ok(()));
        assert_eq!(check_output_path(Path::new("relative.trace")), Ok(()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn writes_are_atomic_and_leave_no_temporary_file() {
        let dir = temp("write");
        let p = dir.join("t.trace");
        write_atomic(&p, b"abc").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"abc");
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let e = write_atomic(&dir.join("no-such-folder").join("t"), b"x").unwrap_err();
        assert!(e.contains("cannot write"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
