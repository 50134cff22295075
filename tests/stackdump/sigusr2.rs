//! SIGUSR2 stack dumps of the real daemon: every registered thread shows where it waits, a
//! burst of signals neither crashes nor wedges it, and no job is lost. The capture itself is
//! tested in-process in [`super::in_process`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nodepool_builder::model::BuildState;

use crate::util::site::{TestSite, WAIT};
use crate::util::{process_alive, wait_for, wait_until};

const ONE_IMAGE: &str = r#"
[[diskimages]]
name = "fedora"
dib-cmd = "{fake_dib}"
elements = ["fedora", "vm"]
formats = ["raw"]
"#;

/// The dump records in a log: every record on `nodepool.stack_dump`, in order. Each line of
/// a record is a log line of its own (nodepool's format repeats the prefix); the message of
/// a continuation line is indented by two spaces, which are removed here.
fn dump_records(log: &str) -> Vec<String> {
    let mut records: Vec<String> = Vec::new();
    for line in log.lines() {
        let Some((_, message)) = line.split_once(" nodepool.stack_dump: ") else {
            continue;
        };
        match (message.strip_prefix("  "), records.last_mut()) {
            (Some(continued), Some(last)) => {
                last.push('\n');
                last.push_str(continued);
            }
            _ => records.push(message.to_owned()),
        }
    }
    records
}

/// The `Thread:` records of the last complete dump, by thread name.
fn last_dump(log: &str) -> BTreeMap<String, String> {
    let records = dump_records(log);
    let end = records
        .iter()
        .rposition(|r| r.starts_with("End debug handler"))
        .expect("a complete dump");
    let begin = records[..end]
        .iter()
        .rposition(|r| r.starts_with("Beginning debug handler"))
        .expect("its beginning");
    records[begin + 1..end]
        .iter()
        .filter(|r| r.starts_with("Thread: "))
        .map(|r| (r.split_whitespace().nth(2).unwrap().to_owned(), r.clone()))
        .collect()
}

fn count(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

#[test]
fn sigusr2_dumps_every_thread_of_the_daemon_and_survives_a_burst() {
    let site = TestSite::new("stackdump_daemon");
    let cfg = site.config(0, "", ONE_IMAGE);
    let hang = site.control(0, "fake-dib.hang", "");
    let log_path = site.path("builder.log");
    let mut b = crate::util::builder::BuilderProcess::start(
        &["-f", "-c", cfg.to_str().unwrap()],
        &[("NODEPOOL_BUILDER_LOG", "info,nodepool.stack_dump=debug")],
        &log_path,
    );
    b.wait_for_log(WAIT, "ready: builder_id=");
    let hang_pids = site.images_dir(0).join("fake-dib.fedora.hang-pids");
    let pids: Vec<i32> = wait_for(WAIT, "the build to hang in the fake DIB", || {
        let p: Vec<i32> = std::fs::read_to_string(&hang_pids)
            .ok()?
            .split_whitespace()
            .filter_map(|s| s.parse().ok())
            .collect();
        (p.len() == 2).then_some(p)
    });
    let building = site
        .wait_builds("fedora", BuildState::Building, 1)
        .remove(0);

    b.signal(Signal::SIGUSR2);
    b.wait_for_log(WAIT, "End debug handler");
    let log = b.log();
    let threads = last_dump(&log);
    let names: Vec<&String> = threads.keys().collect();
    let mut expected: Vec<String> = [
        "main",
        "signals",
        "stackdump",
        "zk-session",
        "zk-events",
        "zk-watch",
        "scheduler",
        "build-0",
    ]
    .map(String::from)
    .to_vec();
    expected.extend((0..4).map(|i| format!("upload-{i}")));
    for name in &expected {
        assert!(
            threads.contains_key(name),
            "no Thread: record for {name}; got {names:?}\n{log}"
        );
    }
    assert!(
        names.iter().any(|n| n.starts_with("dib-out-")),
        "the DIB output reader is dumped: {names:?}"
    );
    for (name, record) in &threads {
        assert!(
            record.contains("nodepool_builder::"),
            "{name} has no frame of ours:\n{record}"
        );
        assert!(
            !record.contains("<no stack"),
            "{name} did not answer:\n{record}"
        );
    }
    let build = &threads["build-0"];
    assert!(
        build.contains(&format!(
            "activity: building fedora {}, dib pid {}",
            building.id, pids[0]
        )),
        "build-0's breadcrumb names the build and the DIB pid:\n{build}"
    );
    assert!(
        build.contains("nodepool_builder::command"),
        "build-0 waits on the child inside the runner:\n{build}"
    );
    for i in 0..4 {
        let upload = &threads[&format!("upload-{i}")];
        assert!(upload.contains("activity: idle"), "{upload}");
        assert!(
            upload.contains("crossbeam_channel") && upload.contains("recv"),
            "an idle upload worker waits in recv:\n{upload}"
        );
    }

    // A burst while the build hangs and the other threads go about their business.
    let started = Instant::now();
    for _ in 0..200 {
        b.signal(Signal::SIGUSR2);
        std::thread::sleep(Duration::from_millis(3));
    }
    let burst = started.elapsed();
    assert!(
        process_alive(b.pid()),
        "alive after the burst:\n{}",
        crate::util::file_tail(&log_path, 40)
    );
    // Wait until the dumper is idle again (no new dump for a second), then ask once more.
    let mut last = (count(&b.log(), "End debug handler"), Instant::now());
    wait_until(WAIT, "the dumps of the burst to finish", || {
        let n = count(&b.log(), "End debug handler");
        if n != last.0 {
            last = (n, Instant::now());
        }
        last.1.elapsed() > Duration::from_secs(1)
    });
    let settled = last.0;
    eprintln!("200 SIGUSR2 in {burst:?} gave {} dumps", settled - 1);
    b.signal(Signal::SIGUSR2);
    wait_until(WAIT, "an answer to the final SIGUSR2", || {
        count(&b.log(), "End debug handler") > settled
    });
    let threads = last_dump(&b.log());
    assert!(
        threads["build-0"].contains(&format!("dib pid {}", pids[0])),
        "{}",
        threads["build-0"]
    );

    // No lost job: end the hung build, ask for another, and it is built.
    std::fs::remove_file(&hang).unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pids[0]), Signal::SIGKILL).unwrap();
    site.wait_builds("fedora", BuildState::Failed, 1);
    site.request_build("fedora");
    site.wait_builds("fedora", BuildState::Ready, 1);
    wait_until(WAIT, "the request to be served", || {
        !site.request_pending("fedora")
    });
    let log = b.log();
    assert!(!log.contains("panicked"), "{log}");
    b.signal(Signal::SIGTERM);
    assert!(
        b.wait_exit(Duration::from_secs(20)).success(),
        "{}",
        b.log()
    );
}

/// Waits until at least `at_least` dumps have ended, then until every dump that began has
/// ended and none began for three seconds (a dump logs its beginning only once the stacks
/// are captured and symbolized, which takes a while on a busy machine); returns the number
/// of dumps.
fn settled_dump_count(b: &crate::util::builder::BuilderProcess, at_least: usize) -> usize {
    wait_until(WAIT, &format!("{at_least} dump(s) to end"), || {
        count(&b.log(), "End debug handler") >= at_least
    });
    let mut last = (usize::MAX, Instant::now());
    wait_until(WAIT, "the dumps to settle", || {
        let log = b.log();
        let (begun, ended) = (
            count(&log, "Beginning debug handler"),
            count(&log, "End debug handler"),
        );
        if begun != last.0 || begun != ended {
            last = (begun, Instant::now());
        }
        last.1.elapsed() > Duration::from_secs(3)
    });
    last.0
}

#[test]
fn a_burst_of_1000_sigusr2_gives_a_few_dumps_and_requests_are_served_throughout() {
    let site = TestSite::new("sigusr2_storm");
    let cfg = site.config(0, "", ONE_IMAGE);
    let log_path = site.path("builder.log");
    let mut b = crate::util::builder::BuilderProcess::start(
        &["-f", "-c", cfg.to_str().unwrap()],
        &[("NODEPOOL_BUILDER_LOG", "info,nodepool.stack_dump=debug")],
        &log_path,
    );
    b.wait_for_log(WAIT, "ready: builder_id=");
    let first = site.wait_builds("fedora", BuildState::Ready, 1).remove(0);
    let before = settled_dump_count(&b, 0);
    assert_eq!(before, 0, "no dump before the storm");

    // A tight loop of kill(2) mostly coalesces in the kernel (a standard signal is pending
    // at most once); a pause of 100 µs between signals lets nearly each one reach the
    // handler, which is the storm the dumper has to absorb.
    let pid = nix::unistd::Pid::from_raw(b.pid());
    let started = Instant::now();
    for i in 0..1000 {
        if i == 500 {
            site.request_build("fedora");
        }
        nix::sys::signal::kill(pid, Signal::SIGUSR2).expect("signal the builder");
        std::thread::sleep(Duration::from_micros(100));
    }
    let burst = started.elapsed();
    let mut known = vec![first.id.clone()];
    let second = site.wait_new_ready("fedora", &mut known);
    let served = started.elapsed();
    wait_until(WAIT, "the request to be served", || {
        !site.request_pending("fedora")
    });
    let dumps = settled_dump_count(&b, 1);
    eprintln!(
        "1000 SIGUSR2 in {burst:?} gave {dumps} dumps; the build requested during the storm \
         ({}) was ready {served:?} after it began",
        second.id
    );
    assert!(process_alive(b.pid()), "alive after the storm");
    assert!(
        (1..=10).contains(&dumps),
        "a burst coalesces into a few dumps, got {dumps}"
    );
    assert!(
        served < Duration::from_secs(30),
        "the request was served during the storm: {served:?}"
    );
    b.signal(Signal::SIGTERM);
    assert!(
        b.wait_exit(Duration::from_secs(20)).success(),
        "{}",
        b.log()
    );
}

/// Starts the builder with the log filter `filter`, sends one SIGUSR2 and returns the log
/// once `until` is in it.
fn one_dump_with_filter(name: &str, filter: &str, until: &str) -> String {
    let site = TestSite::new(name);
    let cfg = site.config(0, "", "");
    let mut b = crate::util::builder::BuilderProcess::start(
        &["-f", "-c", cfg.to_str().unwrap()],
        &[("NODEPOOL_BUILDER_LOG", filter)],
        &site.path("builder.log"),
    );
    b.wait_for_log(WAIT, "ready: builder_id=");
    b.signal(Signal::SIGUSR2);
    b.wait_for_log(WAIT, until);
    b.log()
}

#[test]
fn sigusr2_logs_the_dump_at_info_when_its_target_is_not_enabled_at_debug() {
    // The default filter (`info`): the dump is still logged, at INFO.
    let log = one_dump_with_filter("sigusr2_info", "info", "End debug handler");
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" nodepool.stack_dump: "))
        .collect();
    assert!(
        lines.iter().any(|l| l.contains("Beginning debug handler"))
            && lines.iter().any(|l| l.contains("Thread: ")),
        "a full dump: {log}"
    );
    assert!(
        lines
            .iter()
            .all(|l| l.contains(" INFO nodepool.stack_dump: ")),
        "at INFO: {lines:#?}"
    );
    assert!(!log.contains("WARN"), "no warning: {log}");

    // With debug enabled for the target, at DEBUG as upstream.
    let log = one_dump_with_filter(
        "sigusr2_debug",
        "info,nodepool.stack_dump=debug",
        "End debug handler",
    );
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(" nodepool.stack_dump: "))
        .collect();
    assert!(
        !lines.is_empty()
            && lines
                .iter()
                .all(|l| l.contains(" DEBUG nodepool.stack_dump: ")),
        "at DEBUG: {lines:#?}"
    );

    // Switched off explicitly: one warning naming the variable that switches it on.
    let log = one_dump_with_filter(
        "sigusr2_off",
        "info,nodepool.stack_dump=off",
        "stack dump requested",
    );
    let warning = log
        .lines()
        .find(|l| l.contains("stack dump requested"))
        .unwrap();
    assert!(
        warning.contains(" WARNING ")
            && warning.contains("NODEPOOL_BUILDER_LOG=")
            && !warning.contains("RUST_LOG"),
        "{warning}"
    );
    assert!(!log.contains("Beginning debug handler"), "{log}");
}
