//! `dmsim check`: the default campaign, in-process, no root.
//!
//! Today it runs the metadata crash campaign of `dmsim_sim::campaign` over a
//! range of seeds: every seed a reproducible workload of pool metadata
//! operations, every commit's crash states judged by the independent
//! checker. Seeds run on all cores; results are reported in seed order, so
//! the output does not depend on thread timing.

use std::ops::Range;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use clap::Args;
use dmsim_model::mutation::Mutations;
use dmsim_sim::campaign::{run_seed, CampaignConfig, SeedOutcome, ViolationKind};
use indicatif::{ProgressBar, ProgressStyle};

/// Options of `dmsim check`.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Seeds to run, as A..B (B excluded). Ranges shard a campaign across
    /// machines: every seed is independent and reproducible.
    #[arg(long, default_value = "0..64", value_parser = parse_seeds)]
    pub seeds: Range<u64>,
    /// Metadata operations per seed.
    #[arg(long, default_value_t = 60)]
    pub ops: usize,
    /// Crash states judged at each request of every commit.
    #[arg(long, default_value_t = 1)]
    pub crashes_per_point: usize,
    /// Worker threads (default: all cores). Results do not depend on it.
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Run with a deliberately broken model, to see a detector fire:
    /// superblock-before-flush, reuse-freed-before-commit.
    #[arg(long, hide = true, value_parser = parse_mutation)]
    pub mutation: Option<Mutations>,
}

fn parse_seeds(s: &str) -> Result<Range<u64>, String> {
    let err = || format!("expected a seed range like 0..64, got {s:?}");
    let (a, b) = s.split_once("..").ok_or_else(err)?;
    let a: u64 = a.trim().parse().map_err(|_| err())?;
    let b: u64 = b.trim().parse().map_err(|_| err())?;
    if a >= b {
        return Err(format!("empty seed range {s:?}: the end is excluded, so use {a}..{}", a + 1));
    }
    Ok(a..b)
}

fn parse_mutation(s: &str) -> Result<Mutations, String> {
    Mutations::by_name(s).ok_or_else(|| {
        let names: Vec<_> = Mutations::ALL.iter().map(|(n, _)| *n).collect();
        format!("unknown mutation {s:?}; known: {}", names.join(", "))
    })
}

/// Runs the campaign; exit 1 on any violation.
pub fn run(args: CheckArgs) -> ExitCode {
    let cfg = CampaignConfig {
        seeds: args.seeds.clone(),
        ops_per_seed: args.ops,
        crashes_per_point: args.crashes_per_point,
        mutations: args.mutation.unwrap_or_default(),
        ..CampaignConfig::default()
    };
    let jobs =
        args.jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    let nr_seeds = cfg.seeds.end - cfg.seeds.start;
    let bar = ProgressBar::new(nr_seeds);
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:40}] {pos}/{len} seeds {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let next = AtomicU64::new(cfg.seeds.start);
    let results = Mutex::new(Vec::with_capacity(nr_seeds as usize));
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::Relaxed);
                if seed >= cfg.seeds.end {
                    break;
                }
                let outcome = run_seed(&cfg, seed);
                let failed = !outcome.violations.is_empty();
                let mut r = results.lock().expect("results lock");
                r.push(outcome);
                let bad = r.iter().filter(|o| !o.violations.is_empty()).count();
                drop(r);
                if failed || bad > 0 {
                    bar.set_message(format!("({bad} failing)"));
                }
                bar.inc(1);
            });
        }
    });
    bar.finish_and_clear();
    let mut outcomes = results.into_inner().expect("results lock");
    outcomes.sort_by_key(|o| o.seed);
    let summary = Summary::of(&outcomes);
    if args.json {
        println!("{}", summary.to_json(&cfg, &outcomes));
    } else {
        summary.print(&cfg, &outcomes);
    }
    if summary.failing_seeds.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

#[derive(Debug, Default)]
struct Summary {
    seeds: usize,
    ops: usize,
    commits: usize,
    mappings: u64,
    crash_states: usize,
    torn_writes: usize,
    out_of_metadata_space: usize,
    known: usize,
    failing_seeds: Vec<u64>,
}

impl Summary {
    fn of(outcomes: &[SeedOutcome]) -> Self {
        let mut s = Summary { seeds: outcomes.len(), ..Summary::default() };
        for o in outcomes {
            s.ops += o.ops;
            s.commits += o.commits;
            s.mappings += o.mappings;
            s.crash_states += o.crash_states;
            s.torn_writes += o.torn_writes;
            s.out_of_metadata_space += usize::from(o.out_of_metadata_space);
            s.known += o.known_kernel_behaviours.len();
            if !o.violations.is_empty() {
                s.failing_seeds.push(o.seed);
            }
        }
        s
    }

    fn print(&self, cfg: &CampaignConfig, outcomes: &[SeedOutcome]) {
        println!("dmsim check: metadata crash campaign, seeds {}..{}", cfg.seeds.start, cfg.seeds.end);
        if cfg.mutations.any() {
            println!("  (with a deliberately broken model: {:?})", cfg.mutations);
        }
        let rows: [(&str, String); 9] = [
            ("seeds", self.seeds.to_string()),
            ("metadata operations", self.ops.to_string()),
            ("commits", self.commits.to_string()),
            ("mappings made", self.mappings.to_string()),
            ("crash states judged", self.crash_states.to_string()),
            ("  with a torn write", self.torn_writes.to_string()),
            ("seeds out of metadata space", self.out_of_metadata_space.to_string()),
            ("known kernel behaviours seen", self.known.to_string()),
            ("failing seeds", self.failing_seeds.len().to_string()),
        ];
        for (k, v) in rows {
            println!("  {k:<30} {v:>10}");
        }
        if self.known > 0 {
            let first = outcomes.iter().flat_map(|o| &o.known_kernel_behaviours).next();
            if let Some(k) = first {
                println!(
                    "\nknown kernel behaviour (not a failure), first seen in seed {}:\n  {}",
                    k.seed, k.detail
                );
            }
        }
        for o in outcomes.iter().filter(|o| !o.violations.is_empty()) {
            let v = &o.violations[0];
            println!(
                "\nFAILED seed {} at operation {}: {}\n  {}",
                v.seed,
                v.op_index,
                v.kind.name(),
                v.detail
            );
            println!(
                "  reproduce: dmsim check --seeds {}..{} --ops {}",
                v.seed,
                v.seed + 1,
                cfg.ops_per_seed
            );
        }
        if self.failing_seeds.is_empty() {
            println!("\nno violations");
        }
    }

    fn to_json(&self, cfg: &CampaignConfig, outcomes: &[SeedOutcome]) -> String {
        let failures: Vec<_> = outcomes
            .iter()
            .flat_map(|o| o.violations.first())
            .map(|v| {
                serde_json::json!({
                    "seed": v.seed,
                    "op_index": v.op_index,
                    "kind": kind_id(v.kind),
                    "detail": v.detail,
                })
            })
            .collect();
        serde_json::json!({
            "seeds": { "start": cfg.seeds.start, "end": cfg.seeds.end },
            "ops_per_seed": cfg.ops_per_seed,
            "operations": self.ops,
            "commits": self.commits,
            "mappings": self.mappings,
            "crash_states": self.crash_states,
            "torn_writes": self.torn_writes,
            "seeds_out_of_metadata_space": self.out_of_metadata_space,
            "known_kernel_behaviours": self.known,
            "failing_seeds": self.failing_seeds,
            "failures": failures,
        })
        .to_string()
    }
}

fn kind_id(k: ViolationKind) -> &'static str {
    match k {
        ViolationKind::OperationFailed => "operation_failed",
        ViolationKind::ReferenceMismatch => "reference_mismatch",
        ViolationKind::CrashUnopenable => "crash_unopenable",
        ViolationKind::CrashDamaged => "crash_damaged",
        ViolationKind::CrashTorn => "crash_torn",
        ViolationKind::KnownKernelBehaviour => "known_kernel_behaviour",
    }
}
