//! The benchmark's scenarios, once each at small sizes, so the harness cannot rot (the full
//! run is `cargo bench --bench builder`). Figures are printed, not asserted.

#[path = "../benches/scenarios.rs"]
mod scenarios;

#[test]
fn every_benchmark_scenario_runs_at_small_sizes() {
    let figures = scenarios::run_all(scenarios::Sizes::QUICK);
    let (table, _) = scenarios::render(&figures);
    eprintln!("{table}");
    assert!(figures.len() >= 18, "{table}");
    assert!(
        figures.iter().all(|f| f.value.is_finite()),
        "every figure was measured:\n{table}"
    );
}
