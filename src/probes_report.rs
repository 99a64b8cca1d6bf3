//! The coverage probes' part of `dmsim check`'s thin summary: how many
//! seeds reached each probe, and the seeds that alone reached a rare one
//! (`dmsim_sim::probes`), as text and as JSON. Both list the probes in
//! their fixed order, so the same seeds give the same bytes.

use dmsim_sim::probes::{ProbeTally, RARE_SEEDS};

/// A list of seeds, as `3, 17, 40`.
fn seed_list(seeds: &[u64]) -> String {
    seeds.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
}

/// Prints the probe table and the seeds to keep, indented under the thin
/// campaign's rows.
pub fn print(tally: &ProbeTally) {
    println!("  coverage probes                       seeds        times");
    for r in tally.rows() {
        println!("    {:<32} {:>8} {:>12}", r.name, r.seeds.len(), r.count);
    }
    let rare = tally.rare(RARE_SEEDS);
    if rare.is_empty() {
        println!("  rare probes (reached by 1 to {RARE_SEEDS} seeds): none");
        return;
    }
    println!("  rare probes (reached by 1 to {RARE_SEEDS} seeds), and the seeds that reached them");
    for r in &rare {
        let word = if r.seeds.len() == 1 { "seed" } else { "seeds" };
        println!("    {:<32} {word} {}", r.name, seed_list(&r.seeds));
    }
    println!("  seeds to keep: {}", seed_list(&tally.keep(RARE_SEEDS)));
}

/// The probes as JSON: `probes` (each probe's seeds and times, by name),
/// `rare` (the rare probes' seeds, in report order), `keep_seeds` and
/// `rare_max_seeds`.
pub fn to_json(tally: &ProbeTally) -> serde_json::Value {
    let probes: serde_json::Map<String, serde_json::Value> = tally
        .rows()
        .iter()
        .map(|r| (r.name.to_string(), serde_json::json!({ "seeds": r.seeds.len(), "times": r.count })))
        .collect();
    let rare: Vec<_> = tally
        .rare(RARE_SEEDS)
        .iter()
        .map(|r| serde_json::json!({ "probe": r.name, "seeds": r.seeds }))
        .collect();
    serde_json::json!({
        "probes": probes,
        "rare": rare,
        "rare_max_seeds": RARE_SEEDS,
        "keep_seeds": tally.keep(RARE_SEEDS),
    })
}
