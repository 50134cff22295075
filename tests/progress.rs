//! Progress of long work (issue 17, item 3), with the real daemon: a build held in the test
//! image builder logs its elapsed time and its build log's last line every
//! `progress-interval`, and the SIGUSR2 dump's activity line shows the same; a failed DIB
//! run's error line carries the build log's last lines; an upload through a command logs how
//! long it runs, and one streamed to the real Glance logs bytes sent of the total, MB/s and
//! ETA.

use std::net::SocketAddr;

use nix::sys::signal::Signal;
use nodepool_builder::model::{BuildState, UploadState};

use crate::util::builder::BuilderProcess;
use crate::util::faultproxy::{Fault, FaultProxy, Rule};
use crate::util::glance::GlanceServer;
use crate::util::site::{TestSite, WAIT};

const FEDORA: &str = "\n[[diskimages]]\nname = \"fedora\"\ndib-cmd = \"{fake_dib}\"\n";
/// `fedora` with a format of its own, so it is built without any provider.
const FEDORA_RAW: &str =
    "\n[[diskimages]]\nname = \"fedora\"\ndib-cmd = \"{fake_dib}\"\nformats = [\"raw\"]\n";

/// The text of the last complete SIGUSR2 dump in `log`.
fn last_dump(log: &str) -> &str {
    let begin = log.rfind("Beginning debug handler").expect("a dump began");
    let dump = &log[begin..];
    let end = dump.find("End debug handler").expect("the dump ended");
    &dump[..end]
}

/// Asks for a dump and returns it.
fn dump(b: &mut BuilderProcess) -> String {
    let before = b.log().matches("End debug handler").count();
    b.signal(Signal::SIGUSR2);
    crate::util::wait_until(WAIT, "the SIGUSR2 dump", || {
        b.log().matches("End debug handler").count() > before
    });
    last_dump(&b.log()).to_string()
}

#[test]
fn a_running_build_logs_its_elapsed_time_and_last_log_line_and_the_dump_shows_it() {
    let site = TestSite::new("progress_build");
    site.config(0, "progress-interval = 1.0", FEDORA_RAW);
    let pause = site.control(0, "fake-dib.pause", "");
    let mut b = site.start(0, &[]);
    let build = site
        .wait_builds("fedora", BuildState::Building, 1)
        .remove(0);
    let line = format!("Build fedora-{} running for ", build.id);
    b.wait_for_log(WAIT, &line);
    // The build log's last line is the fake DIB saying it waits on the pause file.
    let log = b.log();
    let progress = log
        .lines()
        .find(|l| l.contains(&line))
        .expect("a progress line");
    assert!(
        progress.contains(": fake-dib: paused ("),
        "the line ends with the build log's last line: {progress}"
    );
    assert!(progress.contains(" INFO "), "{progress}");

    let dump = dump(&mut b);
    let want = format!("activity: building fedora {}, dib pid ", build.id);
    let activity = dump
        .lines()
        .find(|l| l.contains(&want))
        .unwrap_or_else(|| panic!("build-0's breadcrumb:\n{dump}"));
    assert!(
        activity.contains(&format!("; {line}")) && activity.contains(": fake-dib: paused ("),
        "the breadcrumb carries the progress line: {activity}"
    );

    std::fs::remove_file(pause).unwrap();
    site.wait_builds("fedora", BuildState::Ready, 1);
}

#[test]
fn a_failed_dib_run_puts_the_build_logs_last_lines_into_the_daemon_error() {
    let site = TestSite::new("progress_dib_fail");
    site.config(0, "", FEDORA_RAW);
    site.control(0, "fake-dib.fail", "");
    let mut b = site.start(0, &[]);
    let build = site.wait_builds("fedora", BuildState::Failed, 1).remove(0);
    let first = format!(
        "image=fedora build={}: DIB failed creating fedora (127) (timeout=False)",
        build.id
    );
    b.wait_for_log(WAIT, &first);
    let log = b.log();
    let lines: Vec<&str> = log.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.contains(&first))
        .expect("the error line");
    // Upstream's message stays the first line, with nothing after it on that line.
    assert!(lines[at].ends_with("(timeout=False)"), "{}", lines[at]);
    assert!(lines[at].contains(" ERROR "), "{}", lines[at]);
    let log_name = format!("fedora-{}.log", build.id);
    assert!(
        lines[at + 1].contains(" ERROR ")
            && lines[at + 1].contains("Last ")
            && lines[at + 1].contains(&log_name),
        "a header naming the build log follows:\n{}",
        lines[at..].join("\n")
    );
    let tail: Vec<&str> = lines[at + 2..]
        .iter()
        .take_while(|l| l.contains(" ERROR "))
        .copied()
        .collect();
    assert!(
        !tail.is_empty() && tail.len() <= 20,
        "at most 20 lines: {tail:#?}"
    );
    assert!(
        tail.iter().any(|l| l.contains("fake-dib: failing (")),
        "DIB's last words are there: {tail:#?}"
    );
    assert!(
        tail.last().unwrap().ends_with("Exit code: 127"),
        "the log's very last line ends the tail: {tail:#?}"
    );
}

#[test]
fn a_running_command_upload_logs_how_long_it_has_been_running() {
    let site = TestSite::new("progress_cmd_upload");
    let hold = site.path("hold-upload");
    std::fs::write(&hold, "").unwrap();
    let dir_cloud = crate::util::repo_root().join("etc/quickstart/dir-cloud");
    let cloud = site.cloud_dir("slow");
    // The upload command waits while the hold file exists, then uploads for real.
    let body = format!(
        "{FEDORA}\n[[providers]]\nname = \"slow\"\ndriver = \"command\"\nimage-format = \"raw\"\n\
         upload-command = [\"sh\", \"-c\", \"while [ -e {h} ]; do sleep 0.1; done; exec {s} upload {c} \\\"$1\\\" \\\"$2\\\"\", \"sh\", \"{{file}}\", \"{{external_name}}\"]\n\
         delete-command = [\"{s}\", \"delete\", \"{c}\", \"{{external_id}}\"]\n\
         [[providers.diskimages]]\nname = \"fedora\"\n",
        h = hold.display(),
        s = dir_cloud.display(),
        c = cloud.display(),
    );
    site.config(0, "progress-interval = 1.0", &body);
    let mut b = site.start(0, &[]);
    let build = site.wait_builds("fedora", BuildState::Ready, 1).remove(0);
    let line = format!("Upload of fedora-{} to slow: running for ", build.id);
    b.wait_for_log(WAIT, &line);
    let dump = dump(&mut b);
    assert!(
        dump.lines()
            .any(|l| l.contains("activity: uploading fedora-") && l.contains(&line)),
        "an upload worker's breadcrumb carries the line:\n{dump}"
    );
    std::fs::remove_file(&hold).unwrap();
    site.wait_uploads("fedora", "slow", UploadState::Ready, 1);
}

#[test]
fn a_streamed_glance_upload_logs_bytes_sent_of_the_total_rate_and_eta() {
    let glance = GlanceServer::shared();
    // Glance takes the first 4 MiB of the image, then takes no more: the upload stays
    // running part-way, its writes blocked.
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], glance.port())));
    proxy.set(vec![Rule::data(Fault::Hold(4 << 20))]);
    let site = TestSite::new("progress_glance");
    let clouds = site.path("clouds.yaml");
    std::fs::write(
        &clouds,
        format!(
            "clouds:\n  held:\n    auth_type: none\n    image_endpoint_override: {}\n",
            proxy.url()
        ),
    )
    .unwrap();
    // 48 MiB of random data: far more than the loopback socket buffers hold.
    let body = format!(
        "{FEDORA}[diskimages.env-vars]\nFAKE_DIB_SIZE_MB = \"48\"\n\
         \n[[providers]]\nname = \"progress-glance\"\ncloud = \"held\"\nrate = 0.0\n\
         [[providers.diskimages]]\nname = \"fedora\"\n"
    );
    site.config(0, "progress-interval = 1.0", &body);
    let mut b = site.start_with_env(
        0,
        &[],
        &[("OS_CLIENT_CONFIG_FILE", clouds.to_str().unwrap())],
    );
    let build = site.wait_builds("fedora", BuildState::Ready, 1).remove(0);
    let start = format!("Upload of fedora-{} to progress-glance: ", build.id);
    b.wait_for_log(WAIT, &start);
    b.wait_for_log(WAIT, " MB/s, ETA ");
    let file = site
        .images_dir(0)
        .join(format!("fedora-{}.qcow2", build.id));
    let total = nodepool_builder::progress::bytes(std::fs::metadata(&file).unwrap().len());
    let log = b.log();
    // e.g. "…: 9.1 MiB of 48.0 MiB (18%), 9.0 MB/s, ETA 4s"
    let line = log
        .lines()
        .find(|l| l.contains(&start) && l.contains(" MB/s, ETA "))
        .unwrap();
    eprintln!("progress line: {line}");
    let figures = line.split(&start).nth(1).unwrap();
    let (sent, rest) = figures.split_once(" of ").expect("sent of total");
    assert!(sent.ends_with("MiB"), "{line}");
    assert!(
        rest.starts_with(&format!("{total} (")),
        "the total is the file's size, {total}: {line}"
    );
    let percent: u32 = rest
        .split_once(" (")
        .and_then(|(_, r)| r.split_once("%)"))
        .and_then(|(p, _)| p.parse().ok())
        .expect("a percentage");
    assert!(
        (1..100).contains(&percent),
        "part-way, not all of it: {line}"
    );
    let dump = dump(&mut b);
    assert!(
        dump.lines()
            .any(|l| l.contains("activity: uploading fedora-") && l.contains(&start)),
        "an upload worker's breadcrumb carries the line:\n{dump}"
    );
}
