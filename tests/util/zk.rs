//! Real ZooKeeper 3.8 servers for tests, from Debian's `zookeeper` package.
//!
//! Most tests use [`ZkServer::shared`]: one TLS-enabled standalone server per test binary,
//! started on first use, which every test shares by working under its own
//! [`ZkServer::chroot`]. Tests that freeze, kill or restart a server start their own with
//! [`ZkServer::start`].
//!
//! # How a server is run
//!
//! Each server gets a fresh directory under the test run directory (`zoo.cfg`, `data/`,
//! `zk.log`) and two loopback ports probed free by binding `127.0.0.1:0`: the plaintext
//! `clientPort` (always; four-letter words go there) and, with TLS, a `secureClientPort` that
//! demands a client certificate signed by the test CA (`ssl.clientAuth=need`). The JVM is
//! started directly with the explicit classpath of real-services.md §a.1; `zkServer.sh`
//! ignores our directories and its classpath lacks `netty-codec.jar`, without which the Netty
//! connection factory (needed for TLS) drops every connection.
//!
//! A server is ready when `ruok` on the plaintext port answers `imok`, `conf` shows our data
//! directory (so an unrelated server that grabbed the port is not mistaken for ours) and, with
//! TLS, the TLS port accepts TCP connections. Start-up fails with the log tail after 30 s, or
//! at once when the JVM exits; a lost race for a port is retried with new ports.
//!
//! # Lifetime
//!
//! CAUTION: every JVM is forked by one long-lived `zk-spawner` thread and carries
//! `PR_SET_PDEATHSIG(SIGKILL)`. The kernel sends that signal when the *thread* that forked
//! the child exits, not the process: forking from the test's own thread would kill the
//! server as soon as that test's thread ended (libtest runs each test in its own thread),
//! which breaks the shared server. The spawner thread lives as long as the process, so
//! servers die with the test binary however it ends (panic, abort, SIGKILL) and never
//! earlier. Dropping a [`ZkServer`] kills its JVM (SIGKILL, reaped) and removes its
//! directory; the shared server is never dropped and dies with the process, and its
//! directory is swept by a later run (see [`super::run_dir`]).

use std::collections::{BTreeMap, HashSet};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use super::{ensure_test_env, file_tail, poll_for, run_dir, sanitize};

/// How long a server may take to become ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Jars on the server's classpath; see real-services.md §a.1 for why each is there.
pub const CLASSPATH: [&str; 4] = [
    "/usr/share/java/zookeeper.jar",
    "/usr/share/java/netty-codec.jar",
    "/usr/share/java/netty-resolver.jar",
    "/usr/share/java/slf4j-simple.jar",
];

/// What kind of server to start.
#[derive(Clone, Copy, Debug)]
pub struct ZkOptions {
    /// Also serve a TLS port that requires a client certificate from [`Certs::ca`].
    pub tls: bool,
    /// `tickTime`. Session timeouts are clamped to `[2, 20] × tickTime`: the default of
    /// 500 ms allows sessions of 1–10 s.
    pub tick_time_ms: u32,
}

impl Default for ZkOptions {
    fn default() -> Self {
        ZkOptions {
            tls: false,
            tick_time_ms: 500,
        }
    }
}

impl ZkOptions {
    /// The defaults with TLS on.
    pub fn tls() -> Self {
        ZkOptions {
            tls: true,
            ..ZkOptions::default()
        }
    }
}

/// Test certificates, made once per test binary with the `openssl` command
/// (real-services.md §a.3). Every leaf has `subjectAltName=DNS:localhost,IP:127.0.0.1`.
#[derive(Debug)]
pub struct Certs {
    /// The directory holding all of them.
    pub dir: PathBuf,
    /// The test CA's certificate (the servers' trust store; what clients should trust).
    pub ca: PathBuf,
    /// The test CA's key.
    pub ca_key: PathBuf,
    /// A valid client certificate (CN=client), signed by [`Certs::ca`].
    pub cert: PathBuf,
    /// The key of [`Certs::cert`].
    pub key: PathBuf,
    /// The servers' certificate (CN=server), signed by [`Certs::ca`].
    pub server_cert: PathBuf,
    /// The key of [`Certs::server_cert`].
    pub server_key: PathBuf,
    /// Key and certificate in one PEM file: ZooKeeper's PEM key store.
    pub server_keystore: PathBuf,
    /// Another CA's certificate, which the servers do not trust.
    pub wrong_ca: PathBuf,
    /// A client certificate (CN=wrong-client) signed by [`Certs::wrong_ca`]: servers must
    /// reject it.
    pub wrong_ca_cert: PathBuf,
    /// The key of [`Certs::wrong_ca_cert`].
    pub wrong_ca_key: PathBuf,
}

/// The test certificates, generated on first use.
pub fn certs() -> &'static Certs {
    static CERTS: OnceLock<Result<Certs, String>> = OnceLock::new();
    match CERTS.get_or_init(|| catch_panic(make_certs)) {
        Ok(certs) => certs,
        Err(e) => panic!("test certificates are unavailable: {e}"),
    }
}

/// One ZooKeeper server (a JVM running `QuorumPeerMain` standalone) and its directory.
#[derive(Debug)]
pub struct ZkServer {
    opts: ZkOptions,
    plain_port: u16,
    tls_port: Option<u16>,
    /// The running JVM; `None` after [`ZkServer::kill`].
    child: Option<Child>,
    /// The pid of the current or last JVM.
    pid: u32,
    /// How many JVMs this server has run (1 + restarts).
    generation: u32,
    /// CAUTION: declared last so it is removed after `Drop::drop` has killed the JVM.
    dir: tempfile::TempDir,
}

impl ZkServer {
    /// Starts a dedicated server and waits until it is ready. Panics with the reason (and
    /// the server's log tail) when it cannot.
    pub fn start(opts: ZkOptions) -> ZkServer {
        ensure_zookeeper_installed();
        if opts.tls {
            certs();
        }
        let mut last_error = String::new();
        for _attempt in 0..3 {
            let dir = tempfile::Builder::new()
                .prefix("zk-")
                .tempdir_in(run_dir())
                .unwrap_or_else(|e| panic!("cannot create a ZooKeeper directory: {e}"));
            let plain_port = free_port();
            let tls_port = opts.tls.then(free_port);
            let mut server = ZkServer {
                opts,
                plain_port,
                tls_port,
                child: None,
                pid: 0,
                generation: 0,
                dir,
            };
            server.write_config();
            match server.launch() {
                Ok(()) => return server,
                Err(StartError::PortTaken(e)) => last_error = e,
                Err(StartError::Fatal(e)) => panic!("{e}"),
            }
        }
        panic!("ZooKeeper could not get free ports in 3 attempts; last failure:\n{last_error}")
    }

    /// The TLS-enabled server shared by every test of this binary, started on first use.
    /// Isolate each test with [`ZkServer::chroot`]; never freeze, kill or restart it (the
    /// `&mut self` methods make that impossible).
    pub fn shared() -> &'static ZkServer {
        static SHARED: OnceLock<Result<ZkServer, String>> = OnceLock::new();
        // A failed start is remembered, so later tests fail at once with the same reason
        // instead of each waiting for the start-up deadline again.
        match SHARED.get_or_init(|| catch_panic(|| ZkServer::start(ZkOptions::tls()))) {
            Ok(server) => server,
            Err(e) => panic!("the shared ZooKeeper server could not be started: {e}"),
        }
    }

    /// The plaintext client port (four-letter words, tree dumps, plaintext clients).
    pub fn plain_port(&self) -> u16 {
        self.plain_port
    }

    /// The TLS client port, if the server has one.
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    /// `127.0.0.1:<plaintext port>`.
    pub fn plain_hosts(&self) -> String {
        format!("127.0.0.1:{}", self.plain_port)
    }

    /// `127.0.0.1:<TLS port>`. Panics for a server without TLS.
    pub fn tls_hosts(&self) -> String {
        let port = self
            .tls_port
            .expect("tls_hosts() on a ZooKeeper server started without TLS");
        format!("127.0.0.1:{port}")
    }

    /// The test certificates (the same for every server of this binary).
    pub fn certs(&self) -> &'static Certs {
        certs()
    }

    /// The server's session-timeout bounds, `[2, 20] × tickTime`.
    pub fn session_timeout_range(&self) -> (Duration, Duration) {
        let tick = Duration::from_millis(u64::from(self.opts.tick_time_ms));
        (tick * 2, tick * 20)
    }

    /// Creates a unique, empty znode `/t-<test_name>-<random>` (open ACL, like nodepool's
    /// test fixtures do for their chroots) and returns its path, to be used as the chroot of
    /// every client of the test.
    pub fn chroot(&self, test_name: &str) -> String {
        let random = uuid::Uuid::new_v4().simple().to_string();
        let path = format!("/t-{}-{}", sanitize(test_name), &random[..12]);
        self.ensure_path(&path);
        path
    }

    /// Creates `path` and any missing parents as empty persistent znodes with open ACLs,
    /// through the plaintext port. Panics on failure.
    pub fn ensure_path(&self, path: &str) {
        let options = zookeeper_client::CreateMode::Persistent
            .with_acls(zookeeper_client::Acls::anyone_all());
        self.with_client(&format!("creating {path}"), |client| async move {
            client.mkdir(path, &options).await
        });
    }

    /// Makes ZooKeeper refuse creates under `path` (an absolute path, no chroot), as an
    /// operator's ACL mistake would: anyone may read it and change its ACL, nothing more.
    /// Panics on failure.
    pub fn refuse_creates_under(&self, path: &str) {
        use zookeeper_client::{Acl, AuthId, Permission};
        self.set_acl(
            path,
            &[Acl::new(
                Permission::READ | Permission::ADMIN,
                AuthId::anyone(),
            )],
        );
    }

    /// Gives `path` the open ACL again (undoes [`ZkServer::refuse_creates_under`]).
    pub fn allow_creates_under(&self, path: &str) {
        self.set_acl(path, &zookeeper_client::Acls::anyone_all());
    }

    fn set_acl(&self, path: &str, acls: &[zookeeper_client::Acl]) {
        self.with_client(&format!("setting the ACL of {path}"), |client| async move {
            client.set_acl(path, acls, None).await.map(|_| ())
        });
    }

    /// Every znode under `root` (inclusive) with its data, one per line in depth-first
    /// order, as `path = data` (data shown as lossy UTF-8, cut at 200 bytes). For failure
    /// messages. Reads through the plaintext port; never panics.
    pub fn tree(&self, root: &str) -> String {
        let result = catch_panic(|| {
            self.with_client(&format!("dumping {root}"), |client| async move {
                let mut out = String::new();
                let mut stack = vec![root.to_string()];
                while let Some(path) = stack.pop() {
                    let (data, _) = match client.get_data(&path).await {
                        Ok(v) => v,
                        Err(zookeeper_client::Error::NoNode) => continue,
                        Err(e) => return Err(e),
                    };
                    let shown = String::from_utf8_lossy(&data[..data.len().min(200)]).into_owned();
                    out.push_str(&format!("{path} = {shown}\n"));
                    let mut children = match client.list_children(&path).await {
                        Ok(c) => c,
                        Err(zookeeper_client::Error::NoNode) => continue,
                        Err(e) => return Err(e),
                    };
                    children.sort();
                    let base = if path == "/" { "" } else { path.as_str() };
                    stack.extend(children.iter().rev().map(|c| format!("{base}/{c}")));
                }
                Ok(out)
            })
        });
        result.unwrap_or_else(|e| format!("<cannot dump the ZooKeeper tree under {root}: {e}>"))
    }

    /// The pid of the running JVM. Panics after [`ZkServer::kill`].
    pub fn pid(&self) -> u32 {
        assert!(
            self.child.is_some(),
            "pid() of a ZooKeeper server that is not running"
        );
        self.pid
    }

    /// Whether the JVM is running (it may be frozen).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Stops the JVM with SIGSTOP: its connections stay open and silent. Returns once
    /// every thread of the JVM is stopped (signal delivery is asynchronous).
    pub fn freeze(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
        let pid = self.pid;
        super::wait_until(
            Duration::from_secs(10),
            &format!("every thread of ZooKeeper pid {pid} to stop"),
            || thread_states(pid).iter().all(|&s| s == 'T'),
        );
    }

    /// Resumes a frozen JVM with SIGCONT. Returns once no thread of it is stopped any more.
    pub fn thaw(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
        let pid = self.pid;
        super::wait_until(
            Duration::from_secs(10),
            &format!("ZooKeeper pid {pid} to resume"),
            || !thread_states(pid).contains(&'T'),
        );
    }

    /// Kills the JVM with SIGKILL and reaps it. The directory and ports are kept for
    /// [`ZkServer::restart`]. Does nothing when it is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills the JVM if it is running, starts a new one on the same ports and data
    /// directory, and waits until it is ready. ZooKeeper restores its tree and sessions from
    /// the data directory.
    pub fn restart(&mut self) {
        self.kill();
        match self.launch() {
            Ok(()) => {}
            Err(StartError::PortTaken(e)) | Err(StartError::Fatal(e)) => {
                panic!("restart failed: {e}")
            }
        }
    }

    /// Sends a four-letter word to the plaintext port and returns the answer. Panics (with
    /// the log tail) if there is no answer within 10 s.
    pub fn four_letter(&self, cmd: &str) -> String {
        self.try_four_letter(cmd, Duration::from_secs(10))
            .unwrap_or_else(|e| {
                panic!(
                    "four-letter word {cmd:?} to {} failed: {e}\nZooKeeper log tail:\n{}",
                    self.plain_hosts(),
                    self.log_tail(30)
                )
            })
    }

    /// Sends a four-letter word to the plaintext port; `Err` when the server does not
    /// connect, answer and close within `timeout` (a frozen server accepts the connection
    /// but never answers).
    pub fn try_four_letter(&self, cmd: &str, timeout: Duration) -> io::Result<String> {
        four_letter_to(self.plain_port, cmd, timeout)
    }

    /// Whether `ruok` is answered with `imok` within `timeout`.
    pub fn is_ok(&self, timeout: Duration) -> bool {
        matches!(self.try_four_letter("ruok", timeout).as_deref(), Ok("imok"))
    }

    /// The `mntr` metrics (`zk_server_state`, `zk_znode_count`, …).
    pub fn mntr(&self) -> BTreeMap<String, String> {
        self.four_letter("mntr")
            .lines()
            .filter_map(|line| line.split_once('\t'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect()
    }

    /// The last `n` lines of the server's log (all JVMs it has run, appended).
    pub fn log_tail(&self, n: usize) -> String {
        file_tail(&self.log_path(), n)
    }

    /// The server's directory (`zoo.cfg`, `data/`, `zk.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// ZooKeeper's `dataDir`.
    pub fn data_dir(&self) -> PathBuf {
        self.dir().join("data")
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir().join("zk.log")
    }

    /// The server's configuration file.
    pub fn config_path(&self) -> PathBuf {
        self.dir().join("zoo.cfg")
    }

    fn signal(&mut self, signal: nix::sys::signal::Signal) {
        let pid = self.pid();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)
            .unwrap_or_else(|e| panic!("cannot send {signal} to ZooKeeper pid {pid}: {e}"));
    }

    fn write_config(&self) {
        let mut cfg = format!(
            "# Written by tests/util/zk.rs.\n\
             tickTime={tick}\n\
             dataDir={data}\n\
             clientPort={plain}\n\
             clientPortAddress=127.0.0.1\n\
             4lw.commands.whitelist=*\n\
             admin.enableServer=false\n\
             # Many tests share one server from 127.0.0.1; the default limit is 60.\n\
             maxClientCnxns=0\n\
             # Tests do not need durability against power loss; fsync would slow every write.\n\
             forceSync=no\n",
            tick = self.opts.tick_time_ms,
            data = self.data_dir().display(),
            plain = self.plain_port,
        );
        if let Some(tls_port) = self.tls_port {
            cfg.push_str(&tls_config_lines(tls_port));
        }
        std::fs::create_dir_all(self.data_dir())
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", self.data_dir().display()));
        std::fs::write(self.config_path(), cfg)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", self.config_path().display()));
    }

    /// The command line that starts this server's JVM.
    fn command(&self) -> Command {
        let mut cmd = Command::new("java");
        cmd.arg("-Xmx256m")
            // Start-up speed over peak throughput, and fewer GC threads on a 2-core machine.
            .args(["-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"])
            .arg("-cp")
            .arg(CLASSPATH.join(":"))
            .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
            .arg(self.config_path())
            .current_dir(self.dir());
        cmd
    }

    /// Starts a JVM for this server's config and waits until it is ready.
    fn launch(&mut self) -> Result<(), StartError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log_path().display()));
        self.generation += 1;
        let _ = writeln!(
            &log,
            "==== tests/util/zk.rs: starting JVM #{} ====",
            self.generation
        );
        let mut cmd = self.command();
        let described = format!("{cmd:?}");
        cmd.stdin(Stdio::null())
            .stdout(
                log.try_clone()
                    .expect("cannot duplicate the log file descriptor"),
            )
            .stderr(log);
        let child = spawn_tied_to_process(cmd).map_err(|e| {
            StartError::Fatal(format!(
                "cannot start ZooKeeper ({described}): {e}\n(is `java` installed? run scripts/test-env.sh zookeeper)"
            ))
        })?;
        self.pid = child.id();
        self.child = Some(child);

        let started = Instant::now();
        let mut last_problem = String::from("nothing checked yet");
        let ready = poll_for(START_TIMEOUT, || match self.readiness() {
            Ok(()) => Some(Ok(())),
            Err(Readiness::Exited(status)) => Some(Err(status)),
            Err(Readiness::NotYet(problem)) => {
                last_problem = problem;
                None
            }
        });
        match ready {
            Some(Ok(())) => {
                eprintln!(
                    "ZooKeeper pid {} ready on {}{} after {:.1?} (dir {})",
                    self.pid,
                    self.plain_hosts(),
                    self.tls_port
                        .map(|p| format!(" + TLS 127.0.0.1:{p}"))
                        .unwrap_or_default(),
                    started.elapsed(),
                    self.dir().display()
                );
                Ok(())
            }
            Some(Err(status)) => {
                self.child = None;
                let msg = self.failure_report(
                    format!("ZooKeeper exited during start-up ({status})"),
                    &described,
                );
                if self.log_tail(200).contains("Address already in use") {
                    Err(StartError::PortTaken(msg))
                } else {
                    Err(StartError::Fatal(msg))
                }
            }
            None => {
                self.kill();
                let headline = format!(
                    "ZooKeeper was not ready within {START_TIMEOUT:?}; last check: {last_problem}"
                );
                let msg = self.failure_report(headline, &described);
                if last_problem.contains("another server") {
                    Err(StartError::PortTaken(msg))
                } else {
                    Err(StartError::Fatal(msg))
                }
            }
        }
    }

    /// A start-up failure with everything needed to understand it.
    fn failure_report(&self, headline: String, command: &str) -> String {
        format!(
            "{headline}\ncommand: {command}\nconfig {}:\n{}\nlog tail ({}):\n{}",
            self.config_path().display(),
            std::fs::read_to_string(self.config_path()).unwrap_or_default(),
            self.log_path().display(),
            self.log_tail(40)
        )
    }

    /// One readiness check: `ruok`, our own data directory in `conf`, the TLS port.
    fn readiness(&mut self) -> Result<(), Readiness> {
        if let Some(child) = &mut self.child
            && let Ok(Some(status)) = child.try_wait()
        {
            return Err(Readiness::Exited(status.to_string()));
        }
        let probe = Duration::from_secs(1);
        match self.try_four_letter("ruok", probe) {
            Ok(answer) if answer == "imok" => {}
            Ok(answer) => return Err(Readiness::NotYet(format!("ruok answered {answer:?}"))),
            Err(e) => {
                return Err(Readiness::NotYet(format!(
                    "ruok on {}: {e}",
                    self.plain_hosts()
                )));
            }
        }
        let conf = self
            .try_four_letter("conf", probe)
            .map_err(|e| Readiness::NotYet(format!("conf on {}: {e}", self.plain_hosts())))?;
        let ours = format!("dataDir={}", self.data_dir().display());
        if !conf.lines().any(|l| l.starts_with(&ours)) {
            return Err(Readiness::NotYet(format!(
                "another server answers on {} (its conf does not show {ours})",
                self.plain_hosts()
            )));
        }
        if let Some(port) = self.tls_port {
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            TcpStream::connect_timeout(&addr, probe)
                .map_err(|e| Readiness::NotYet(format!("TLS port {addr}: {e}")))?;
        }
        Ok(())
    }

    /// Runs `f` with a fresh plaintext client (no chroot), with a 20 s deadline for the
    /// whole exchange; panics with `what` and the error.
    fn with_client<T, F, Fut>(&self, what: &str, f: F) -> T
    where
        F: FnOnce(zookeeper_client::Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, zookeeper_client::Error>>,
    {
        use futures::FutureExt;
        let deadline = Duration::from_secs(20);
        let hosts = self.plain_hosts();
        let work = async {
            let client = zookeeper_client::Client::connector()
                .with_session_timeout(self.session_timeout_range().1)
                .connect(&hosts)
                .await?;
            f(client).await
        };
        let result = futures::executor::block_on(async {
            futures::select! {
                r = work.fuse() => Some(r),
                _ = async_io::Timer::after(deadline).fuse() => None,
            }
        });
        match result {
            Some(Ok(v)) => v,
            Some(Err(e)) => panic!(
                "ZooKeeper {hosts}: {what}: {e}\nlog tail:\n{}",
                self.log_tail(20)
            ),
            None => panic!(
                "ZooKeeper {hosts}: {what}: no result within {deadline:?}\nlog tail:\n{}",
                self.log_tail(20)
            ),
        }
    }
}

impl Drop for ZkServer {
    fn drop(&mut self) {
        // SIGKILL works on a frozen JVM too. The directory goes when `dir` drops after this.
        self.kill();
    }
}

enum StartError {
    /// The server lost a race for its ports; try again with others.
    PortTaken(String),
    Fatal(String),
}

enum Readiness {
    Exited(String),
    NotYet(String),
}

/// Sends `cmd` to `127.0.0.1:port` and reads the answer until the server closes.
pub fn four_letter_to(port: u16, cmd: &str, timeout: Duration) -> io::Result<String> {
    let deadline = Instant::now() + timeout;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.write_all(cmd.as_bytes())?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no complete answer within {timeout:?}"),
            ));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no complete answer within {timeout:?}"),
                ));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// A loopback port that was free a moment ago and that this process has not handed out
/// before (two servers of one test binary never get the same port).
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("cannot bind 127.0.0.1:0");
        let port = listener
            .local_addr()
            .expect("local_addr of a bound listener")
            .port();
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if handed_out.get_or_insert_with(HashSet::new).insert(port) {
            return port;
        }
    }
}

/// Spawns `cmd` from the `zk-spawner` thread with `PR_SET_PDEATHSIG(SIGKILL)`, in its own
/// process group, so that the child dies with this process and only with it (see the
/// module documentation).
pub fn spawn_tied_to_process(mut cmd: Command) -> io::Result<Child> {
    struct Request {
        cmd: Command,
        reply: mpsc::Sender<io::Result<Child>>,
    }
    static SPAWNER: OnceLock<mpsc::Sender<Request>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        // Test tooling cannot use the crate's spawn wrapper, and this thread must never be
        // joined.
        #[allow(clippy::disallowed_methods)]
        std::thread::Builder::new()
            .name("zk-spawner".into())
            .spawn(move || {
                // `tx` lives in the static, so this loop never ends; the thread must outlive
                // every child it forked.
                for mut req in rx {
                    let _ = req.reply.send(req.cmd.spawn());
                }
                loop {
                    std::thread::park();
                }
            })
            .expect("cannot start the zk-spawner thread");
        tx
    });
    let parent = std::process::id();
    cmd.process_group(0);
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // system calls (prctl, getppid, raise).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died before prctl took effect.
            if libc::getppid() as u32 != parent {
                libc::raise(libc::SIGKILL);
            }
            Ok(())
        });
    }
    let (reply, answer) = mpsc::channel();
    spawner
        .send(Request { cmd, reply })
        .expect("the zk-spawner thread is gone");
    answer
        .recv()
        .expect("the zk-spawner thread dropped a request")
}

/// The scheduler state letter (`R`, `S`, `T`, …) of every thread of process `pid`; empty
/// when it is gone.
fn thread_states(pid: u32) -> Vec<char> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("stat")).ok())
        // The state follows the command name in parentheses, which may itself contain ')'.
        .filter_map(|stat| {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
        })
        .collect()
}

/// Makes sure java and the jars are there, running `scripts/test-env.sh zookeeper` once if
/// not. Panics with what is missing.
pub fn ensure_zookeeper_installed() {
    static CHECKED: OnceLock<Result<(), String>> = OnceLock::new();
    let result = CHECKED.get_or_init(|| {
        if zookeeper_missing().is_empty() {
            return Ok(());
        }
        catch_panic(|| ensure_test_env(&["zookeeper"]))?;
        let missing = zookeeper_missing();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "still missing after scripts/test-env.sh zookeeper: {}",
                missing.join(", ")
            ))
        }
    });
    if let Err(e) = result {
        panic!("ZooKeeper is not installed: {e}");
    }
}

fn zookeeper_missing() -> Vec<String> {
    let mut missing: Vec<String> = CLASSPATH
        .iter()
        .filter(|jar| !Path::new(jar).is_file())
        .map(|jar| jar.to_string())
        .collect();
    if find_in_path("java").is_none() {
        missing.push("java (not on PATH)".into());
    }
    missing
}

/// The first `name` on `PATH` that is a file.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

fn make_certs() -> Certs {
    if find_in_path("openssl").is_none() {
        ensure_test_env(&["openssl"]);
    }
    let dir = run_dir().join("certs");
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap_or_else(|e| panic!("cannot write san.ext: {e}"));
    let self_signed_ca = |name: &str, cn: &str| {
        openssl(
            &dir,
            &[
                "req",
                "-new",
                "-x509",
                "-nodes",
                "-days",
                "3650",
                "-newkey",
                "rsa:2048",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.pem"),
                "-subj",
                &format!("/CN={cn}"),
            ],
        )
    };
    let leaf = |name: &str, ca: &str| {
        openssl(
            &dir,
            &[
                "req",
                "-new",
                "-nodes",
                "-newkey",
                "rsa:2048",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "3650",
                "-extfile",
                "san.ext",
            ],
        );
    };
    self_signed_ca("ca", "nodepool-test-ca");
    self_signed_ca("wrong-ca", "nodepool-test-wrong-ca");
    leaf("server", "ca");
    leaf("client", "ca");
    leaf("wrong-client", "wrong-ca");
    let keystore = [dir.join("server.key"), dir.join("server.pem")]
        .iter()
        .map(|p| {
            std::fs::read_to_string(p)
                .unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
        })
        .collect::<String>();
    std::fs::write(dir.join("server-keystore.pem"), keystore)
        .unwrap_or_else(|e| panic!("cannot write server-keystore.pem: {e}"));
    Certs {
        ca: dir.join("ca.pem"),
        ca_key: dir.join("ca.key"),
        cert: dir.join("client.pem"),
        key: dir.join("client.key"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        server_keystore: dir.join("server-keystore.pem"),
        wrong_ca: dir.join("wrong-ca.pem"),
        wrong_ca_cert: dir.join("wrong-client.pem"),
        wrong_ca_key: dir.join("wrong-client.key"),
        dir,
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run openssl (run scripts/test-env.sh openssl): {e}"));
    if !out.status.success() {
        panic!(
            "openssl {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Runs `f`, turning a panic into its message.
fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "<non-string panic>".into())
    })
}

/// zoo.cfg lines of a TLS client port on loopback with the test certificates: client
/// certificates required, x509 authentication (shared by single servers and ensembles).
pub fn tls_config_lines(tls_port: u16) -> String {
    let certs = certs();
    format!(
        "secureClientPort={tls_port}\n\
         secureClientPortAddress=127.0.0.1\n\
         serverCnxnFactory=org.apache.zookeeper.server.NettyServerCnxnFactory\n\
         ssl.keyStore.location={keystore}\n\
         ssl.keyStore.type=PEM\n\
         ssl.trustStore.location={ca}\n\
         ssl.trustStore.type=PEM\n\
         ssl.clientAuth=need\n\
         authProvider.x509=org.apache.zookeeper.server.auth.X509AuthenticationProvider\n",
        keystore = certs.server_keystore.display(),
        ca = certs.ca.display(),
    )
}
