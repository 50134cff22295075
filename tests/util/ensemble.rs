//! A three-member ZooKeeper 3.8 ensemble on loopback (real-services.md §a.6), each member
//! with a plaintext client port (four-letter words, the tests' own sessions) and a TLS client
//! port like [`super::zk::ZkServer`]'s (the builder only speaks TLS). Quorum and election
//! traffic stays plaintext on loopback.
//!
//! Members are numbered 1–3 (their `myid`). [`Ensemble::kill`] SIGKILLs one JVM and
//! [`Ensemble::restart`] starts it again on the same ports and data directory. The ensemble
//! is "serving" when every running member answers `srvr` with `Mode: leader` or
//! `Mode: follower` and exactly one of them leads. JVMs are forked through
//! [`super::zk::spawn_tied_to_process`], so they die with the test binary; dropping the value
//! kills them.

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nodepool_builder::zk::{Zk, ZkConfig};

use super::zk::{
    CLASSPATH, certs, ensure_zookeeper_installed, four_letter_to, free_port, spawn_tied_to_process,
};
use super::{file_tail, poll_for, run_dir, sanitize};

/// How long the ensemble may take to (re-)elect a leader with every running member in it.
pub const SERVE_TIMEOUT: Duration = Duration::from_secs(60);

struct Member {
    id: usize,
    plain_port: u16,
    tls_port: u16,
    quorum_port: u16,
    election_port: u16,
    child: Option<Child>,
}

/// Three ZooKeeper JVMs forming one ensemble.
pub struct Ensemble {
    members: Vec<Member>,
    tick_time_ms: u32,
    /// CAUTION: declared last so it is removed after `Drop::drop` has killed the JVMs.
    dir: tempfile::TempDir,
}

impl Ensemble {
    /// Starts three members with `tickTime` = `tick_time_ms` (sessions may last 2–20 ticks)
    /// and waits until they serve with one leader.
    pub fn start(name: &str, tick_time_ms: u32) -> Ensemble {
        ensure_zookeeper_installed();
        certs();
        let dir = tempfile::Builder::new()
            .prefix(&format!("zk-ensemble-{}-", sanitize(name)))
            .tempdir_in(run_dir())
            .unwrap_or_else(|e| panic!("cannot create an ensemble directory: {e}"));
        let members = (1..=3)
            .map(|id| Member {
                id,
                plain_port: free_port(),
                tls_port: free_port(),
                quorum_port: free_port(),
                election_port: free_port(),
                child: None,
            })
            .collect();
        let mut ens = Ensemble {
            members,
            tick_time_ms,
            dir,
        };
        for i in 1..=3 {
            ens.write_config(i);
        }
        for i in 1..=3 {
            ens.launch(i);
        }
        ens.wait_serving();
        ens
    }

    /// `(127.0.0.1, plaintext port)` of every member, for [`ZkConfig::hosts`].
    pub fn plain_hosts(&self) -> Vec<(String, u16)> {
        self.members
            .iter()
            .map(|m| ("127.0.0.1".to_string(), m.plain_port))
            .collect()
    }

    /// The TLS client port of every member.
    pub fn tls_ports(&self) -> Vec<u16> {
        self.members.iter().map(|m| m.tls_port).collect()
    }

    /// `[[zookeeper-servers]]` entries for a builder config: every member's TLS port, each
    /// with `chroot` (the builder uses the first chroot once for the whole session).
    pub fn servers_toml(&self, chroot: &str) -> String {
        self.tls_ports()
            .iter()
            .map(|p| {
                format!("[[zookeeper-servers]]\nhost = \"localhost\"\nport = {p}\nchroot = \"{chroot}\"\n\n")
            })
            .collect()
    }

    /// Creates a unique empty znode `/t-<name>-<random>` to be every client's chroot.
    pub fn chroot(&self, name: &str) -> String {
        let random = uuid::Uuid::new_v4().simple().to_string();
        let path = format!("/t-{}-{}", sanitize(name), &random[..12]);
        let zk = Zk::connect(ZkConfig {
            hosts: self.plain_hosts(),
            chroot: None,
            session_timeout: Duration::from_secs(10),
            tls: None,
            auth: None,
        });
        assert!(
            zk.wait_connected(Duration::from_secs(30)),
            "a session to the ensemble"
        );
        zk.retry(Duration::from_secs(30), |zk| zk.ensure_path(&path))
            .unwrap_or_else(|e| panic!("cannot create {path} on the ensemble: {e}"));
        zk.close();
        path
    }

    /// The `Mode:` a running member reports (`leader`, `follower`, …), or why there is none.
    pub fn mode(&self, id: usize) -> Result<String, String> {
        let m = &self.members[id - 1];
        let answer = four_letter_to(m.plain_port, "srvr", Duration::from_secs(2))
            .map_err(|e| format!("member {id}: srvr: {e}"))?;
        answer
            .lines()
            .find_map(|l| l.strip_prefix("Mode: "))
            .map(|s| s.trim().to_string())
            .ok_or_else(|| format!("member {id}: {}", answer.trim()))
    }

    /// Ids of the running members.
    pub fn running(&self) -> Vec<usize> {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| m.id)
            .collect()
    }

    /// Waits until every running member serves and exactly one leads; returns the leader.
    #[track_caller]
    pub fn wait_serving(&self) -> usize {
        let mut last = String::new();
        let found = poll_for(SERVE_TIMEOUT, || {
            let mut leaders = Vec::new();
            for id in self.running() {
                match self.mode(id) {
                    Ok(mode) if mode == "leader" => leaders.push(id),
                    Ok(mode) if mode == "follower" => {}
                    Ok(mode) => {
                        last = format!("member {id} is in mode {mode}");
                        return None;
                    }
                    Err(e) => {
                        last = e;
                        return None;
                    }
                }
            }
            if leaders.len() == 1 {
                Some(leaders[0])
            } else {
                last = format!("leaders: {leaders:?}");
                None
            }
        });
        found.unwrap_or_else(|| {
            panic!(
                "timed out after {SERVE_TIMEOUT:?}: waiting for the ensemble to serve with one leader (last: {last})\n{}",
                self.log_tails(30)
            )
        })
    }

    /// The current leader (waits until the ensemble serves).
    pub fn leader(&self) -> usize {
        self.wait_serving()
    }

    /// SIGKILLs member `id` and reaps it.
    pub fn kill(&mut self, id: usize) {
        if let Some(mut child) = self.members[id - 1].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `id` again (killing it first if it runs) and waits until the ensemble
    /// serves with it.
    pub fn restart(&mut self, id: usize) {
        self.kill(id);
        self.launch(id);
        self.wait_serving();
    }

    /// The last `n` lines of every member's log.
    pub fn log_tails(&self, n: usize) -> String {
        self.members
            .iter()
            .map(|m| {
                format!(
                    "--- ZooKeeper member {} log (tail) ---\n{}\n",
                    m.id,
                    file_tail(&self.member_dir(m.id).join("zk.log"), n)
                )
            })
            .collect()
    }

    fn member_dir(&self, id: usize) -> std::path::PathBuf {
        self.dir.path().join(format!("member{id}"))
    }

    fn write_config(&self, id: usize) {
        let m = &self.members[id - 1];
        let dir = self.member_dir(id);
        let data = dir.join("data");
        std::fs::create_dir_all(&data)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", data.display()));
        std::fs::write(data.join("myid"), format!("{id}\n")).expect("write myid");
        let servers: String = self
            .members
            .iter()
            .map(|o| {
                format!(
                    "server.{}=127.0.0.1:{}:{}\n",
                    o.id, o.quorum_port, o.election_port
                )
            })
            .collect();
        let cfg = format!(
            "# Written by tests/util/ensemble.rs.\n\
             tickTime={tick}\n\
             initLimit=10\n\
             syncLimit=5\n\
             dataDir={data}\n\
             clientPort={plain}\n\
             clientPortAddress=127.0.0.1\n\
             {servers}\
             4lw.commands.whitelist=*\n\
             admin.enableServer=false\n\
             maxClientCnxns=0\n\
             forceSync=no\n\
             {tls}",
            tick = self.tick_time_ms,
            data = data.display(),
            plain = m.plain_port,
            tls = super::zk::tls_config_lines(m.tls_port),
        );
        std::fs::write(dir.join("zoo.cfg"), cfg).expect("write zoo.cfg");
    }

    fn launch(&mut self, id: usize) {
        let dir = self.member_dir(id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("zk.log"))
            .expect("open the member's log");
        let _ = writeln!(
            &log,
            "==== tests/util/ensemble.rs: starting member {id} ===="
        );
        let mut cmd = Command::new("java");
        cmd.arg("-Xmx192m")
            .args(["-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"])
            .arg("-cp")
            .arg(CLASSPATH.join(":"))
            .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
            .arg(dir.join("zoo.cfg"))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup the log"))
            .stderr(log);
        let child = spawn_tied_to_process(cmd)
            .unwrap_or_else(|e| panic!("cannot start ZooKeeper member {id}: {e}"));
        self.members[id - 1].child = Some(child);
    }
}

impl Drop for Ensemble {
    fn drop(&mut self) {
        for id in 1..=3 {
            self.kill(id);
        }
    }
}
