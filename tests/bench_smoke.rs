//! The benchmark's scenarios, once each at small sizes, so the harness cannot rot (the full
//! run is `cargo bench --bench builder`), for this builder and for nodepool-builder 11.
//! Figures are printed, not asserted.

#[path = "../benches/scenarios.rs"]
mod scenarios;

#[test]
fn every_benchmark_scenario_runs_at_small_sizes() {
    let figures = scenarios::run_all(scenarios::Sizes::QUICK, &[]);
    let (table, _) = scenarios::render(&figures);
    eprintln!("{table}");
    assert!(figures.len() >= 20, "{table}");
    assert!(
        figures
            .iter()
            .all(|f| f.ours.is_finite() && f.reference.is_none_or(f64::is_finite)),
        "every figure was measured:\n{table}"
    );
    assert!(
        figures.iter().filter(|f| f.reference.is_some()).count() >= 16,
        "nodepool-builder 11 ran beside this builder:\n{table}"
    );
}
