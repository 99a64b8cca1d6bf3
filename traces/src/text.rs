//! The text encoding of a [`Trace`]: human-readable, diff-friendly, one
//! event per line. This documentation is the format's reference.
//!
//! # Example
//!
//! ```text
//! dmsim-trace 1
//! seed 42
//! workload random
//! param block-size 128
//! param note "two words, and a \"quote\""
//! # comments and blank lines are ignored
//! create-thin
//! write dev=0 sector=257 nr=256 fua preflush
//! worker
//! complete pick=3
//! done bio=5 dev=0 ok
//! read dev=0 sector=0 nr=8        # a comment may also end a line
//! done bio=6 dev=0 EIO read="w3x4 zero x4"
//! crash subset seed=17
//! crashed metadata=2/5 data=0/3 torn
//! violation oracle "dev 0 sector 256: wrong data"
//! ```
//!
//! # Lines
//!
//! The input is split into lines at `\n`; a `\r` just before it is dropped
//! (so CRLF files read the same). Each line is a sequence of *tokens*
//! separated by whitespace. A `#` where a token could start begins a
//! comment that runs to the end of the line. Lines with no tokens (blank or
//! comment-only) are ignored everywhere, including before the first line.
//!
//! # Tokens
//!
//! A token is a *value*, or a *key* immediately followed by `=` and a value
//! (`dev=0`, `read="w3 x4"`; no spaces around the `=`). A value is either
//!
//! - a **bare word**: one or more characters, none of which is whitespace,
//!   a control character, an invisible format character (soft hyphen,
//!   zero-width and bidirectional marks, U+2060–U+2064, U+FEFF), `"`, `\`,
//!   `=` or `#`. Anything else printable is allowed, unicode included:
//!   `ok`, `read-only`, `-8`, `2/5`, `héllo`; or
//! - a **quoted string**: `"` … `"`, in which `\\` is a backslash, `\"` a
//!   quote, `\n`, `\r`, `\t` and `\0` the usual control characters, and
//!   `\u{H…}` (1 to 6 hex digits) any unicode scalar value. Any other
//!   character stands for itself; a quoted string cannot span lines.
//!
//! A key is a bare word (without `=`, by the rule above). The writer emits a
//! string as a bare word when it can and quoted otherwise (always for the
//! empty string), escaping in quotes `\`, `"`, every control and whitespace
//! character other than the space, and the invisible characters above, so a
//! written trace shows every character it holds. Readers accept either form
//! for every string, and for numbers and keywords too.
//!
//! Numbers are decimal and must fit their field (`dev` 0..=255, `nr` of a
//! write 0..=65535, …). In the grammar below `N` is a number, `S` any
//! string, `[x]` an optional keyword, and `a|b` a choice of keywords.
//! Keyed tokens may come in any order and at most once each; unkeyed
//! tokens (positional values and keywords) keep the order shown, except
//! that the flags of `write` may come in any order. The writer uses
//! exactly the order shown.
//!
//! # Header
//!
//! The first three lines (that are not ignored) are, in this order:
//!
//! ```text
//! dmsim-trace 1      the magic word and the format version (FORMAT_VERSION)
//! seed N             Header::seed (u64)
//! workload S         Header::workload
//! ```
//!
//! then one `param S S` line (key, value) per entry of `Header::params`, in
//! order. A version other than 1 is reported as
//! [`TraceError::UnsupportedVersion`]. `param` lines after the first event
//! are an error.
//!
//! # Events
//!
//! One per line, after the header, in order:
//!
//! ```text
//! write dev=N sector=N nr=N [fua] [preflush]     Op::Write
//! read dev=N sector=N nr=N                       Op::Read
//! discard dev=N sector=N nr=N                    Op::Discard
//! flush dev=N                                    Op::Flush
//! create-thin                                    Op::CreateThin
//! create-snap origin=N                           Op::CreateSnap
//! delete dev=N                                   Op::Delete
//! worker                                         Op::Worker
//! complete pick=N                                Op::Complete
//! fail-io pick=N                                 Op::FailIo
//! fault DISK read-error permanent|transient      Op::Fault, DiskFault::ReadError
//! fault DISK write-error permanent|transient     Op::Fault, DiskFault::WriteError
//! fault DISK bit-flip bit=N                      Op::Fault, DiskFault::BitFlip
//! fault DISK misdirect offset=N                  Op::Fault, DiskFault::Misdirect (N signed)
//! tick ms=N                                      Op::Tick
//! crash MODE seed=N                              Op::Crash
//! reload mode=IOMODE policy=POLICY               Op::Reload (cache traces only)
//! invalidate cblock=N nr=N                       Op::Invalidate (cache traces only)
//! status                                         Op::Status (cache traces only)
//! resize cache=N origin=N                        Op::Resize (cache traces only; N in blocks)
//! grow-metadata blocks=N [reload]                Op::GrowMetadata (thin traces only; 4 KiB blocks)
//! aim-fault commit request=N                     Op::AimFault, FaultAim::Commit (thin traces only)
//! aim-fault abort                                Op::AimFault, FaultAim::Abort (thin traces only)
//! aim-fault passdown                             Op::AimFault, FaultAim::Passdown (thin traces only)
//! done bio=N dev=N S [read=S]                    Event::Done (S = result)
//! fault-fired DISK S                             Event::FaultFired
//! crashed metadata=N/N data=N/N [torn]           Event::Crashed (kept/unflushed)
//! mode S                                         Event::Mode
//! violation S S                                  Event::Violation (kind, message)
//! ```
//!
//! `DISK` is `metadata` or `data` in thin traces, `metadata`, `cache` or
//! `origin` in cache traces ([`DiskId::name`]); `MODE` is one of
//! `lose-all`, `keep-all`, `prefix`, `subset`, `torn` ([`CrashMode::name`]);
//! `IOMODE` is one of `writeback`, `writethrough`, `passthrough`
//! ([`CacheIoMode::name`]); `POLICY` is `smq` or `cleaner`
//! ([`CachePolicyKind::name`]).
//!
//! # Errors
//!
//! [`from_text`] never panics. Its errors ([`TraceError::Text`]) carry the
//! 1-based line number, the offending line and what was expected there.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::str::FromStr;

use crate::error::{clip, Location, TraceError};
use crate::op::{CacheIoMode, CachePolicyKind, CrashMode, DiskFault, DiskId, FaultAim, Op};
use crate::trace::{Event, Header, Trace, FORMAT_VERSION};

/// The first word of a text trace.
pub const MAGIC: &str = "dmsim-trace";

// ---------------------------------------------------------------------------
// Writing

/// Characters that are not shown by most terminals and editors: always
/// escaped in quoted strings, never allowed in bare words.
fn is_invisible(c: char) -> bool {
    matches!(c, '\u{ad}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{2064}' | '\u{feff}')
}

/// Whether `c` may appear in a bare word.
fn is_bare_char(c: char) -> bool {
    !c.is_whitespace() && !c.is_control() && !is_invisible(c) && !matches!(c, '"' | '\\' | '=' | '#')
}

/// `s` as a token value: bare if possible, quoted otherwise.
fn word(s: &str) -> Cow<'_, str> {
    if !s.is_empty() && s.chars().all(is_bare_char) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\0' => out.push_str("\\0"),
            ' ' => out.push(' '),
            c if c.is_control() || c.is_whitespace() || is_invisible(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    Cow::Owned(out)
}

/// The text line of one event (without the line terminator).
pub fn event_to_line(event: &Event) -> String {
    match event {
        Event::Op(op) => op_to_line(op),
        Event::Done { bio, dev, result, read } => {
            let mut s = format!("done bio={bio} dev={dev} {}", word(result));
            if let Some(read) = read {
                let _ = write!(s, " read={}", word(read));
            }
            s
        }
        Event::FaultFired { disk, what } => format!("fault-fired {} {}", disk.name(), word(what)),
        Event::Crashed { metadata, data, torn } => format!(
            "crashed metadata={}/{} data={}/{}{}",
            metadata.0,
            metadata.1,
            data.0,
            data.1,
            if *torn { " torn" } else { "" }
        ),
        Event::Mode(mode) => format!("mode {}", word(mode)),
        Event::Violation { kind, message } => format!("violation {} {}", word(kind), word(message)),
    }
}

/// The text line of one op (without the line terminator).
pub fn op_to_line(op: &Op) -> String {
    match *op {
        Op::Write { dev, sector, nr_sectors, fua, preflush } => format!(
            "write dev={dev} sector={sector} nr={nr_sectors}{}{}",
            if fua { " fua" } else { "" },
            if preflush { " preflush" } else { "" }
        ),
        Op::Read { dev, sector, nr_sectors } => format!("read dev={dev} sector={sector} nr={nr_sectors}"),
        Op::Discard { dev, sector, nr_sectors } => {
            format!("discard dev={dev} sector={sector} nr={nr_sectors}")
        }
        Op::Flush { dev } => format!("flush dev={dev}"),
        Op::CreateThin => "create-thin".to_string(),
        Op::CreateSnap { origin } => format!("create-snap origin={origin}"),
        Op::Delete { dev } => format!("delete dev={dev}"),
        Op::Worker => "worker".to_string(),
        Op::Complete { pick } => format!("complete pick={pick}"),
        Op::FailIo { pick } => format!("fail-io pick={pick}"),
        Op::Fault { disk, fault } => {
            let what = match fault {
                DiskFault::ReadError { permanent } => format!("read-error {}", permanence(permanent)),
                DiskFault::WriteError { permanent } => format!("write-error {}", permanence(permanent)),
                DiskFault::BitFlip { bit } => format!("bit-flip bit={bit}"),
                DiskFault::Misdirect { offset } => format!("misdirect offset={offset}"),
            };
            format!("fault {} {what}", disk.name())
        }
        Op::Tick { millis } => format!("tick ms={millis}"),
        Op::Crash { mode, seed } => format!("crash {} seed={seed}", mode.name()),
        Op::Reload { mode, policy } => format!("reload mode={} policy={}", mode.name(), policy.name()),
        Op::Invalidate { cblock, nr } => format!("invalidate cblock={cblock} nr={nr}"),
        Op::Status => "status".to_string(),
        Op::Resize { cache_blocks, origin_blocks } => {
            format!("resize cache={cache_blocks} origin={origin_blocks}")
        }
        Op::GrowMetadata { blocks, reload } => {
            format!("grow-metadata blocks={blocks}{}", if reload { " reload" } else { "" })
        }
        Op::AimFault { aim: FaultAim::Commit { request } } => format!("aim-fault commit request={request}"),
        Op::AimFault { aim: FaultAim::Abort } => "aim-fault abort".to_string(),
        Op::AimFault { aim: FaultAim::Passdown } => "aim-fault passdown".to_string(),
    }
}

fn permanence(permanent: bool) -> &'static str {
    if permanent {
        "permanent"
    } else {
        "transient"
    }
}

/// The text encoding of `trace` (see the [module documentation](self)).
/// Every line, the last included, ends with `\n`.
pub fn to_text(trace: &Trace) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{MAGIC} {FORMAT_VERSION}");
    let _ = writeln!(out, "seed {}", trace.header.seed);
    let _ = writeln!(out, "workload {}", word(&trace.header.workload));
    for (k, v) in &trace.header.params {
        let _ = writeln!(out, "param {} {}", word(k), word(v));
    }
    for event in &trace.events {
        out.push_str(&event_to_line(event));
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------
// Reading

/// One token of a line.
#[derive(Debug)]
struct Token {
    key: Option<String>,
    value: String,
}

/// Splits a line into tokens; on error, what was expected.
fn tokenize(line: &str) -> Result<Vec<Token>, String> {
    let mut toks = Vec::new();
    let mut chars = line.char_indices().peekable();
    loop {
        while chars.next_if(|&(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(_, c)) = chars.peek() else { break };
        if c == '#' {
            break;
        }
        let token = if c == '"' {
            Token { key: None, value: quoted(&mut chars)? }
        } else if is_bare_char(c) {
            let first = bare(&mut chars);
            if chars.next_if(|&(_, c)| c == '=').is_some() {
                let value = match chars.peek() {
                    Some(&(_, '"')) => quoted(&mut chars)?,
                    Some(&(_, c)) if is_bare_char(c) => bare(&mut chars),
                    _ => return Err(format!("a value after `{first}=`")),
                };
                Token { key: Some(first), value }
            } else {
                Token { key: None, value: first }
            }
        } else {
            return Err(format!("a word, a quoted string or a comment, not the character {c:?}"));
        };
        toks.push(token);
        match chars.peek() {
            None => break,
            Some(&(_, c)) if c.is_whitespace() => {}
            Some(&(_, c)) => return Err(format!("whitespace between tokens, not the character {c:?}")),
        }
    }
    Ok(toks)
}

type Chars<'a> = std::iter::Peekable<std::str::CharIndices<'a>>;

fn bare(chars: &mut Chars<'_>) -> String {
    let mut s = String::new();
    while let Some((_, c)) = chars.next_if(|&(_, c)| is_bare_char(c)) {
        s.push(c);
    }
    s
}

/// A quoted string; `chars` is at its opening quote.
fn quoted(chars: &mut Chars<'_>) -> Result<String, String> {
    chars.next();
    let mut s = String::new();
    loop {
        match chars.next() {
            None => return Err("a closing `\"` (quoted strings end on the line they start)".into()),
            Some((_, '"')) => return Ok(s),
            Some((_, '\\')) => match chars.next() {
                Some((_, '\\')) => s.push('\\'),
                Some((_, '"')) => s.push('"'),
                Some((_, 'n')) => s.push('\n'),
                Some((_, 'r')) => s.push('\r'),
                Some((_, 't')) => s.push('\t'),
                Some((_, '0')) => s.push('\0'),
                Some((_, 'u')) => s.push(unicode_escape(chars)?),
                _ => return Err("an escape: \\\\, \\\", \\n, \\r, \\t, \\0 or \\u{HEX}".into()),
            },
            Some((_, c)) => s.push(c),
        }
    }
}

/// The rest of a `\u{H…}` escape, after the `u`.
fn unicode_escape(chars: &mut Chars<'_>) -> Result<char, String> {
    let bad = || "a unicode escape \\u{H…}: 1 to 6 hex digits naming a unicode scalar value".to_string();
    if chars.next_if(|&(_, c)| c == '{').is_none() {
        return Err(bad());
    }
    let mut v: u32 = 0;
    let mut digits = 0;
    while let Some((_, c)) = chars.next_if(|&(_, c)| c.is_ascii_hexdigit()) {
        digits += 1;
        if digits > 6 {
            return Err(bad());
        }
        v = v * 16 + c.to_digit(16).unwrap_or(0);
    }
    if digits == 0 || chars.next_if(|&(_, c)| c == '}').is_none() {
        return Err(bad());
    }
    char::from_u32(v).ok_or_else(bad)
}

/// A significant (non-ignored) line.
struct Line<'a> {
    no: usize,
    text: &'a str,
    toks: Vec<Token>,
}

impl Line<'_> {
    fn err(&self, expected: impl Into<String>) -> TraceError {
        TraceError::Text { line: self.no, text: self.text.to_string(), expected: expected.into() }
    }

    /// The first token, if it is a plain word (no key).
    fn keyword(&self) -> Option<&str> {
        match self.toks.first() {
            Some(Token { key: None, value }) => Some(value),
            _ => None,
        }
    }
}

/// The arguments of a line after its first word, taken one by one.
struct Args<'l, 'a> {
    line: &'l Line<'a>,
    syntax: &'static str,
    positional: std::collections::VecDeque<String>,
    keyed: Vec<(String, String)>,
}

impl<'l, 'a> Args<'l, 'a> {
    fn new(line: &'l Line<'a>, syntax: &'static str) -> Result<Self, TraceError> {
        let mut positional = std::collections::VecDeque::new();
        let mut keyed: Vec<(String, String)> = Vec::new();
        for t in &line.toks[1..] {
            match &t.key {
                None => positional.push_back(t.value.clone()),
                Some(k) => {
                    if keyed.iter().any(|(k2, _)| k2 == k) {
                        return Err(line.err(format!("`{k}=` only once (syntax: `{syntax}`)")));
                    }
                    keyed.push((k.clone(), t.value.clone()));
                }
            }
        }
        Ok(Args { line, syntax, positional, keyed })
    }

    fn err(&self, what: impl std::fmt::Display) -> TraceError {
        self.line.err(format!("{what} (syntax: `{}`)", self.syntax))
    }

    fn take_key(&mut self, key: &str) -> Option<String> {
        let i = self.keyed.iter().position(|(k, _)| k == key)?;
        Some(self.keyed.remove(i).1)
    }

    fn num<T: FromStr + Bounds>(&mut self, key: &str) -> Result<T, TraceError> {
        let v = self.take_key(key).ok_or_else(|| self.err(format!("`{key}=N`")))?;
        parse_num::<T>(&v).ok_or_else(|| self.err(format!("`{key}=` a number in {}", T::RANGE)))
    }

    /// `key=A/B`.
    fn pair(&mut self, key: &str) -> Result<(u32, u32), TraceError> {
        let v = self.take_key(key).ok_or_else(|| self.err(format!("`{key}=N/N`")))?;
        let parsed = v.split_once('/').and_then(|(a, b)| Some((parse_num(a)?, parse_num(b)?)));
        parsed.ok_or_else(|| self.err(format!("`{key}=` two numbers in {} separated by `/`", u32::RANGE)))
    }

    fn next(&mut self, what: &str) -> Result<String, TraceError> {
        self.positional.pop_front().ok_or_else(|| self.err(what))
    }

    /// Removes the keyword `name` from the positional values, if present.
    fn flag(&mut self, name: &str) -> bool {
        match self.positional.iter().position(|v| v == name) {
            Some(i) => {
                self.positional.remove(i);
                true
            }
            None => false,
        }
    }

    fn disk(&mut self) -> Result<DiskId, TraceError> {
        const DISKS: &str = "a disk: `metadata` or `data` (thin), `metadata`, `cache` or `origin` (cache)";
        let v = self.next(DISKS)?;
        DiskId::from_name(&v).ok_or_else(|| self.err(format!("{DISKS}, not {:?}", clip(&v))))
    }

    /// `key=NAME`, one of `names`' values (`what` names them in messages).
    fn named<T: Copy>(&mut self, key: &str, what: &str, names: &[(T, &str)]) -> Result<T, TraceError> {
        let list = names.iter().map(|(_, n)| format!("`{n}`")).collect::<Vec<_>>().join(", ");
        let v = self.take_key(key).ok_or_else(|| self.err(format!("`{key}=` {what}: {list}")))?;
        names
            .iter()
            .find(|(_, n)| *n == v)
            .map(|&(t, _)| t)
            .ok_or_else(|| self.err(format!("`{key}=` {what}: {list}; not {:?}", clip(&v))))
    }

    fn finish<T>(self, value: T) -> Result<T, TraceError> {
        if let Some(v) = self.positional.front() {
            return Err(self.err(format!("nothing more, not {:?}", clip(v))));
        }
        if let Some((k, _)) = self.keyed.first() {
            return Err(self.err(format!("nothing more, not `{k}=`")));
        }
        Ok(value)
    }
}

/// Numbers and their ranges, for messages.
trait Bounds {
    const RANGE: &'static str;
}
impl Bounds for u8 {
    const RANGE: &'static str = "0..=255";
}
impl Bounds for u16 {
    const RANGE: &'static str = "0..=65535";
}
impl Bounds for u32 {
    const RANGE: &'static str = "0..=4294967295";
}
impl Bounds for u64 {
    const RANGE: &'static str = "0..=18446744073709551615";
}
impl Bounds for i32 {
    const RANGE: &'static str = "-2147483648..=2147483647";
}

/// A decimal number: ASCII digits, with an optional leading `-`.
fn parse_num<T: FromStr>(s: &str) -> Option<T> {
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

const EVENTS: &str = "an event: write, read, discard, flush, create-thin, create-snap, delete, worker, \
     complete, fail-io, fault, tick, crash, reload, invalidate, status, resize, grow-metadata, done, \
     fault-fired, crashed, mode or violation";

fn parse_event(line: &Line<'_>) -> Result<Event, TraceError> {
    let Some(name) = line.keyword() else {
        return Err(line.err(EVENTS));
    };
    let syntax = match name {
        "write" => "write dev=N sector=N nr=N [fua] [preflush]",
        "read" => "read dev=N sector=N nr=N",
        "discard" => "discard dev=N sector=N nr=N",
        "flush" => "flush dev=N",
        "create-thin" => "create-thin",
        "create-snap" => "create-snap origin=N",
        "delete" => "delete dev=N",
        "worker" => "worker",
        "complete" => "complete pick=N",
        "fail-io" => "fail-io pick=N",
        "fault" => {
            "fault DISK read-error|write-error permanent|transient, or fault DISK bit-flip bit=N, \
                    or fault DISK misdirect offset=N"
        }
        "tick" => "tick ms=N",
        "crash" => "crash lose-all|keep-all|prefix|subset|torn seed=N",
        "reload" => "reload mode=writeback|writethrough|passthrough policy=smq|cleaner",
        "invalidate" => "invalidate cblock=N nr=N",
        "status" => "status",
        "resize" => "resize cache=N origin=N",
        "grow-metadata" => "grow-metadata blocks=N [reload]",
        "aim-fault" => "aim-fault commit request=N | aim-fault abort | aim-fault passdown",
        "done" => "done bio=N dev=N RESULT [read=S]",
        "fault-fired" => "fault-fired DISK WHAT",
        "crashed" => "crashed metadata=N/N data=N/N [torn]",
        "mode" => "mode S",
        "violation" => "violation KIND MESSAGE",
        "param" => return Err(line.err(format!("{EVENTS} (`param` lines belong in the header)"))),
        _ => return Err(line.err(EVENTS)),
    };
    let mut a = Args::new(line, syntax)?;
    let op = |op: Op| Event::Op(op);
    match name {
        "write" => {
            let (dev, sector, nr_sectors) = (a.num("dev")?, a.num("sector")?, a.num("nr")?);
            let (fua, preflush) = (a.flag("fua"), a.flag("preflush"));
            a.finish(op(Op::Write { dev, sector, nr_sectors, fua, preflush }))
        }
        "read" => {
            let (dev, sector, nr_sectors) = (a.num("dev")?, a.num("sector")?, a.num("nr")?);
            a.finish(op(Op::Read { dev, sector, nr_sectors }))
        }
        "discard" => {
            let (dev, sector, nr_sectors) = (a.num("dev")?, a.num("sector")?, a.num("nr")?);
            a.finish(op(Op::Discard { dev, sector, nr_sectors }))
        }
        "flush" => {
            let dev = a.num("dev")?;
            a.finish(op(Op::Flush { dev }))
        }
        "create-thin" => a.finish(op(Op::CreateThin)),
        "create-snap" => {
            let origin = a.num("origin")?;
            a.finish(op(Op::CreateSnap { origin }))
        }
        "delete" => {
            let dev = a.num("dev")?;
            a.finish(op(Op::Delete { dev }))
        }
        "worker" => a.finish(op(Op::Worker)),
        "complete" => {
            let pick = a.num("pick")?;
            a.finish(op(Op::Complete { pick }))
        }
        "fail-io" => {
            let pick = a.num("pick")?;
            a.finish(op(Op::FailIo { pick }))
        }
        "fault" => {
            let disk = a.disk()?;
            let kind = a.next("a fault: read-error, write-error, bit-flip or misdirect")?;
            let fault = match kind.as_str() {
                "read-error" | "write-error" => {
                    let p = a.next("`permanent` or `transient`")?;
                    let permanent = match p.as_str() {
                        "permanent" => true,
                        "transient" => false,
                        _ => return Err(a.err(format!("`permanent` or `transient`, not {:?}", clip(&p)))),
                    };
                    if kind == "read-error" {
                        DiskFault::ReadError { permanent }
                    } else {
                        DiskFault::WriteError { permanent }
                    }
                }
                "bit-flip" => DiskFault::BitFlip { bit: a.num("bit")? },
                "misdirect" => DiskFault::Misdirect { offset: a.num("offset")? },
                _ => {
                    return Err(a.err(format!(
                        "a fault: read-error, write-error, bit-flip or misdirect, not {:?}",
                        clip(&kind)
                    )))
                }
            };
            a.finish(op(Op::Fault { disk, fault }))
        }
        "tick" => {
            let millis = a.num("ms")?;
            a.finish(op(Op::Tick { millis }))
        }
        "crash" => {
            let m = a.next("a crash mode")?;
            let mode =
                CrashMode::from_name(&m).ok_or_else(|| a.err(format!("a crash mode, not {:?}", clip(&m))))?;
            let seed = a.num("seed")?;
            a.finish(op(Op::Crash { mode, seed }))
        }
        "reload" => {
            let modes = CacheIoMode::ALL.map(|m| (m, m.name()));
            let mode = a.named("mode", "a cache I/O mode", &modes)?;
            let policies = CachePolicyKind::ALL.map(|p| (p, p.name()));
            let policy = a.named("policy", "a cache policy", &policies)?;
            a.finish(op(Op::Reload { mode, policy }))
        }
        "invalidate" => {
            let (cblock, nr) = (a.num("cblock")?, a.num("nr")?);
            a.finish(op(Op::Invalidate { cblock, nr }))
        }
        "status" => a.finish(op(Op::Status)),
        "resize" => {
            let (cache_blocks, origin_blocks) = (a.num("cache")?, a.num("origin")?);
            a.finish(op(Op::Resize { cache_blocks, origin_blocks }))
        }
        "grow-metadata" => {
            let blocks = a.num("blocks")?;
            let reload = a.flag("reload");
            a.finish(op(Op::GrowMetadata { blocks, reload }))
        }
        "aim-fault" => {
            let aim = a.next("an aim: `commit`, `abort` or `passdown`")?;
            let aim = match aim.as_str() {
                "commit" => FaultAim::Commit { request: a.num("request")? },
                "abort" => FaultAim::Abort,
                "passdown" => FaultAim::Passdown,
                _ => {
                    return Err(
                        a.err(format!("an aim: `commit`, `abort` or `passdown`, not {:?}", clip(&aim)))
                    )
                }
            };
            a.finish(op(Op::AimFault { aim }))
        }
        "done" => {
            let (bio, dev) = (a.num("bio")?, a.num("dev")?);
            let result = a.next("a result (`ok` or an errno name)")?;
            let read = a.take_key("read");
            a.finish(Event::Done { bio, dev, result, read })
        }
        "fault-fired" => {
            let disk = a.disk()?;
            let what = a.next("a description of the fault")?;
            a.finish(Event::FaultFired { disk, what })
        }
        "crashed" => {
            let (metadata, data) = (a.pair("metadata")?, a.pair("data")?);
            let torn = a.flag("torn");
            a.finish(Event::Crashed { metadata, data, torn })
        }
        "mode" => {
            let mode = a.next("a pool mode")?;
            a.finish(Event::Mode(mode))
        }
        "violation" => {
            let kind = a.next("the detector's name")?;
            let message = a.next("a message")?;
            a.finish(Event::Violation { kind, message })
        }
        _ => Err(line.err(EVENTS)),
    }
}

/// The event on one line of text (the line alone, as in the events part of
/// a trace; comments allowed). `Ok(None)` for a blank or comment-only line.
/// Errors name line 1.
pub fn event_from_line(text: &str) -> Result<Option<Event>, TraceError> {
    let toks =
        tokenize(text).map_err(|expected| TraceError::Text { line: 1, text: text.to_string(), expected })?;
    if toks.is_empty() {
        return Ok(None);
    }
    parse_event(&Line { no: 1, text, toks }).map(Some)
}

/// Parses a text trace (see the [module documentation](self)). Never
/// panics; every error names the line it was found on.
pub fn from_text(s: &str) -> Result<Trace, TraceError> {
    let mut lines = Vec::new();
    let mut last_no = 0;
    for (i, raw) in s.split('\n').enumerate() {
        let text = raw.strip_suffix('\r').unwrap_or(raw);
        let no = i + 1;
        last_no = no;
        let toks = tokenize(text).map_err(|expected| TraceError::Text {
            line: no,
            text: text.to_string(),
            expected,
        })?;
        if !toks.is_empty() {
            lines.push(Line { no, text, toks });
        }
    }
    let mut lines = lines.into_iter();
    let eof =
        |expected: &str| TraceError::Text { line: last_no, text: String::new(), expected: expected.into() };

    // dmsim-trace 1
    let magic_syntax = format!("the first line `{MAGIC} {FORMAT_VERSION}`");
    let first = lines.next().ok_or_else(|| eof(&magic_syntax))?;
    if first.keyword() != Some(MAGIC) {
        return Err(first.err(magic_syntax));
    }
    let mut a = Args::new(&first, "dmsim-trace 1")?;
    let version = a.next("a format version")?;
    if parse_num::<u64>(&version) != Some(u64::from(FORMAT_VERSION)) {
        return Err(TraceError::UnsupportedVersion {
            at: Location::Line(first.no),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    a.finish(())?;

    // seed N
    let line = lines.next().ok_or_else(|| eof("`seed N`"))?;
    if line.keyword() != Some("seed") {
        return Err(line.err("`seed N` (the second line of the header)"));
    }
    let mut a = Args::new(&line, "seed N")?;
    let v = a.next("a seed")?;
    let seed = parse_num::<u64>(&v).ok_or_else(|| a.err(format!("a seed in {}", u64::RANGE)))?;
    a.finish(())?;

    // workload S
    let line = lines.next().ok_or_else(|| eof("`workload NAME`"))?;
    if line.keyword() != Some("workload") {
        return Err(line.err("`workload NAME` (the third line of the header)"));
    }
    let mut a = Args::new(&line, "workload NAME")?;
    let workload = a.next("a workload name")?;
    a.finish(())?;

    let mut header = Header { seed, workload, params: Vec::new() };
    let mut events = Vec::new();
    for line in lines {
        if events.is_empty() && line.keyword() == Some("param") {
            let mut a = Args::new(&line, "param KEY VALUE")?;
            let key = a.next("a parameter name")?;
            let value = a.next("a parameter value")?;
            header.params.push(a.finish((key, value))?);
        } else {
            events.push(parse_event(&line)?);
        }
    }
    Ok(Trace { header, events })
}
