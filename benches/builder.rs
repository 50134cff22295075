//! `cargo bench --bench builder [-- [--quick] [--only steady,latency,upload,janitor,scale,endpoint,aws]]`: measures this builder against real ZooKeeper
//! servers (started by the test tooling) and prints one table; the raw figures go to
//! `target/bench/builder.json`. A scenario that cannot run panics, so the exit status is
//! non-zero.
//!
//! Every scenario runs for this builder and then for nodepool-builder 11.0.0 from PyPI on the
//! same ZooKeeper and Glance; the table gives both figures and the ratio (how many times
//! better this builder is). Scenarios: empty ZooKeeper → 3×2 and 20×3 all built and uploaded,
//! then idle ZooKeeper requests per minute (`mntr` packet counters, probes subtracted), CPU
//! per idle minute and RSS after the idle minute; request → `building` latency and request →
//! all uploads `ready` (p50/p95 over manual requests); a 1 GiB upload next to openstacksdk's
//! `create_image`; the cost of one janitor pass over a tree of 1,000 builds / 10,000
//! uploads next to one ten times smaller (no reference); and, for this builder only, a scale
//! guard: 30 diskimages × 15 command-driver directory clouds built and uploaded, idle
//! requests, CPU and RSS, then the whole-tree re-read after a new ZooKeeper session and the
//! janitor's full pass after it; and the optional HTTP endpoint on, scraped every second
//! through the idle window (RSS, idle requests, the time of one `/metrics` scrape); and a
//! 1 GiB raw image to EC2 through `ebs-direct` against moto's server, next to nodepool 11's
//! builder (boto3) doing the same (upload time, peak RSS).

#[allow(unused_imports)]
#[path = "../tests/util/mod.rs"]
mod util;

mod scenarios;

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let sizes = if quick {
        scenarios::Sizes::QUICK
    } else {
        scenarios::Sizes::FULL
    };
    // `-- --only steady,latency,upload,janitor,scale,endpoint,aws` runs a subset.
    let args: Vec<String> = std::env::args().collect();
    let only: Vec<String> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    let figures = scenarios::run_all(sizes, &only);
    let (table, json) = scenarios::render(&figures);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&dir).expect("create target/bench");
    std::fs::write(dir.join("builder.json"), json).expect("write target/bench/builder.json");
    println!(
        "nodepool-builder benchmark ({}), {} cores",
        if quick { "quick" } else { "full" },
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    print!("{table}");
}
