//! `cargo bench --bench checker`: `dmsim metadata check` against
//! `thin_check` on a large pool's metadata.
//!
//! The image is issue 19's: `thin_restore` (Debian's 0.9.0) of a generated
//! XML with 12 devices — 6 origins of 2.5M mappings in runs of 1,000
//! blocks (the origins' runs interleaved on the data device), and a
//! snapshot of each that shares 95% of its origin's mappings (every 20th
//! run remapped). That is 30M mappings, about 948 MiB of metadata.
//! The image is built once and kept in `target/bench-checker/`.
//!
//! Each checker runs as a child process, three times; the report is the
//! median of each of: CPU seconds (user + system, from `wait4`), wall
//! seconds, and peak resident memory, with the ratios of dmsim's to the
//! reference's. The reference is the Rust `thin_check` 1.x when it is
//! found (`DMSIM_THIN_CHECK_1X` names its `pdata_tools`, or the copy
//! `scripts/build-thinp` builds in `target/thinp/`), and Debian's C++
//! 0.9.0 always. Nothing asserts on speed.
//!
//! `DMSIM_BENCH_MAPPINGS=N` changes the mappings of each origin (default
//! 2,500,000; a multiple of 1,000).

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Blocks in a run of contiguous mappings.
const RUN: u64 = 1000;
/// Origins (and as many snapshots).
const ORIGINS: u64 = 6;

/// Writes the XML of the pool (see the module's documentation).
fn write_xml(path: &Path, per_origin: u64) -> std::io::Result<()> {
    let mut out = BufWriter::new(std::fs::File::create(path)?);
    let runs = per_origin / RUN;
    let nr_data_blocks = ORIGINS * per_origin + ORIGINS * runs.div_ceil(20) * RUN;
    writeln!(
        out,
        r#"<superblock uuid="" time="2" transaction="12" data_block_size="128" nr_data_blocks="{nr_data_blocks}">"#
    )?;
    let origin_run = |i: u64, r: u64| (r * ORIGINS + i) * RUN;
    for i in 0..ORIGINS {
        writeln!(
            out,
            r#"  <device dev_id="{i}" mapped_blocks="{per_origin}" transaction="{i}" creation_time="0" snap_time="1">"#
        )?;
        for r in 0..runs {
            writeln!(
                out,
                r#"    <range_mapping origin_begin="{}" data_begin="{}" length="{RUN}" time="0"/>"#,
                r * RUN,
                origin_run(i, r)
            )?;
        }
        writeln!(out, "  </device>")?;
    }
    let mut fresh = ORIGINS * per_origin;
    for i in 0..ORIGINS {
        let dev = ORIGINS + i;
        writeln!(
            out,
            r#"  <device dev_id="{dev}" mapped_blocks="{per_origin}" transaction="{dev}" creation_time="1" snap_time="1">"#
        )?;
        for r in 0..runs {
            let (data, time) = if r % 20 == i % 20 {
                fresh += RUN;
                (fresh - RUN, 1)
            } else {
                (origin_run(i, r), 0)
            };
            writeln!(
                out,
                r#"    <range_mapping origin_begin="{}" data_begin="{data}" length="{RUN}" time="{time}"/>"#,
                r * RUN
            )?;
        }
        writeln!(out, "  </device>")?;
    }
    writeln!(out, "</superblock>")?;
    out.flush()
}

/// What one run of a checker cost.
#[derive(Clone, Copy)]
struct Cost {
    cpu: Duration,
    wall: Duration,
    max_rss_kib: u64,
    status: i32,
}

/// Runs `cmd` to its end, with its resource use from `wait4` (which
/// reaps the child: `Child::wait` would not give the usage).
#[allow(clippy::zombie_processes)]
fn measure(cmd: &mut Command) -> Cost {
    let start = Instant::now();
    let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start the checker");
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value; wait4 fills it in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, writing into the locals above.
    let r = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    assert_eq!(r, child.id() as libc::pid_t, "wait4: {}", std::io::Error::last_os_error());
    let wall = start.elapsed();
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Cost {
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        wall,
        max_rss_kib: usage.ru_maxrss as u64,
        status: if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { -1 },
    }
}

/// The median of each measure over `n` runs.
fn median_of(n: usize, mut run: impl FnMut() -> Cost) -> Cost {
    let runs: Vec<Cost> = (0..n).map(|_| run()).collect();
    let mid = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let mut rss: Vec<u64> = runs.iter().map(|c| c.max_rss_kib).collect();
    rss.sort();
    Cost {
        cpu: mid(runs.iter().map(|c| c.cpu).collect()),
        wall: mid(runs.iter().map(|c| c.wall).collect()),
        max_rss_kib: rss[rss.len() / 2],
        status: runs.iter().map(|c| c.status).max().unwrap_or(0),
    }
}

/// The 1.x `pdata_tools`, if there is one.
fn thinp_1x(root: &Path) -> Option<PathBuf> {
    let p = match std::env::var_os("DMSIM_THIN_CHECK_1X") {
        Some(p) => PathBuf::from(p),
        None => root.join("target/thinp/release/pdata_tools"),
    };
    p.is_file().then_some(p)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let per_origin: u64 = std::env::var("DMSIM_BENCH_MAPPINGS")
        .ok()
        .and_then(|s| s.replace('_', "").parse().ok())
        .map(|n: u64| (n / RUN).max(1) * RUN)
        .unwrap_or(2_500_000);
    let dir = root.join("target/bench-checker");
    std::fs::create_dir_all(&dir).expect("create target/bench-checker");
    let xml = dir.join(format!("pool-{per_origin}.xml"));
    let image = dir.join(format!("pool-{per_origin}.img"));
    if !image.is_file() {
        if Command::new("thin_restore").arg("-V").output().is_err() {
            eprintln!("checker bench: thin_restore is not installed (Debian: apt-get install thin-provisioning-tools)");
            std::process::exit(1);
        }
        eprintln!("checker bench: writing {} ...", xml.display());
        write_xml(&xml, per_origin).expect("write the XML");
        // thin_restore 0.9.0 needs about 32 bytes of metadata a mapping.
        let size = (2 * ORIGINS * per_origin * 40).max(8 << 20);
        let partial = image.with_extension("partial");
        let f = std::fs::File::create(&partial).expect("create the image");
        f.set_len(size).expect("size the image");
        eprintln!(
            "checker bench: thin_restore of {} mappings (about a minute at the default size) ...",
            2 * ORIGINS * per_origin
        );
        let st = Command::new("thin_restore")
            .arg("-i")
            .arg(&xml)
            .arg("-o")
            .arg(&partial)
            .status()
            .expect("run thin_restore");
        assert!(st.success(), "thin_restore failed: {st}");
        std::fs::rename(&partial, &image).expect("keep the image");
    }
    let used = std::fs::metadata(&image).map(|m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks() * 512
    });
    println!(
        "image: {} (12 devices, {} mappings, {:.0} MiB in use)",
        image.display(),
        2 * ORIGINS * per_origin,
        used.unwrap_or(0) as f64 / (1 << 20) as f64
    );

    let dmsim = env!("CARGO_BIN_EXE_dmsim");
    let mut rows: Vec<(String, Cost)> = Vec::new();
    // thin_restore 0.9.0 leaves the space maps' totals off (see
    // docs/metadata.md), which thin_check does not look at.
    let c = median_of(3, || {
        measure(Command::new(dmsim).args(["metadata", "check", "--ignore-space-map-totals"]).arg(&image))
    });
    rows.push(("dmsim metadata check".into(), c));
    let one_x = thinp_1x(&root);
    if let Some(p) = &one_x {
        let c = median_of(3, || measure(Command::new(p).args(["thin_check", "-q"]).arg(&image)));
        rows.push(("thin_check 1.x (Rust)".into(), c));
    } else {
        println!("thin_check 1.x: not found (scripts/build-thinp builds it; or set DMSIM_THIN_CHECK_1X)");
    }
    if Command::new("thin_check").arg("-V").output().is_ok() {
        let c = median_of(3, || measure(Command::new("thin_check").arg(&image)));
        rows.push(("thin_check 0.9.0 (C++, Debian)".into(), c));
    }

    println!();
    println!(
        "{:<40} {:>8} {:>8} {:>10} {:>7}",
        "checker (median of 3)", "CPU s", "wall s", "peak MiB", "exit"
    );
    for (name, c) in &rows {
        println!(
            "{:<40} {:>8.2} {:>8.2} {:>10.1} {:>7}",
            name,
            c.cpu.as_secs_f64(),
            c.wall.as_secs_f64(),
            c.max_rss_kib as f64 / 1024.0,
            c.status
        );
    }
    let ours = rows[0].1;
    for (name, c) in &rows[1..] {
        println!(
            "dmsim / {:<32} {:>7.2}x {:>7.2}x {:>9.2}x",
            name,
            ours.cpu.as_secs_f64() / c.cpu.as_secs_f64().max(1e-9),
            ours.wall.as_secs_f64() / c.wall.as_secs_f64().max(1e-9),
            ours.max_rss_kib as f64 / c.max_rss_kib.max(1) as f64
        );
    }
}
