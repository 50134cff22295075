//! The ZooKeeper layer against a real ZooKeeper 3.8 (plain and TLS) and Python kazoo:
//! data operations, byte-exact records read back by kazoo, kazoo-compatible locks in both
//! directions, component registration, and the session under faults.

use std::time::{Duration, Instant};

use nodepool_builder::model::BuildState;
use nodepool_builder::zk::{
    self, ConnState, Mode, WatchKind, Zk, ZkConfig, ZkError, ZkTlsFiles, component, lock, paths,
    schema,
};

use crate::util::python::{KazooChild, kz_args, kz_tls_args, run_kazoo, run_kazoo_ok};
use crate::util::wait_until;
use crate::util::zk::{ZkOptions, ZkServer};
use crate::util::zkproxy::{self, ZkProxy};

const CONNECT: Duration = Duration::from_secs(30);

fn plain_cfg(server: &ZkServer, chroot: &str, timeout: Duration) -> ZkConfig {
    ZkConfig {
        hosts: vec![("127.0.0.1".into(), server.plain_port())],
        chroot: Some(chroot.to_string()),
        session_timeout: timeout,
        tls: None,
        auth: None,
    }
}

fn tls_cfg(server: &ZkServer, chroot: &str) -> ZkConfig {
    let certs = server.certs();
    ZkConfig {
        hosts: vec![("localhost".into(), server.tls_port().expect("tls server"))],
        chroot: Some(chroot.to_string()),
        session_timeout: Duration::from_secs(6),
        tls: Some(ZkTlsFiles {
            ca: certs.ca.clone(),
            cert: certs.cert.clone(),
            key: certs.key.clone(),
            verify_hostname: false,
        }),
        auth: None,
    }
}

/// A connected facade that closes its session when dropped.
struct Session(Zk);

impl std::ops::Deref for Session {
    type Target = Zk;
    fn deref(&self) -> &Zk {
        &self.0
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.0.close();
    }
}

fn connect(cfg: ZkConfig) -> Session {
    let zk = Session(Zk::connect(cfg.clone()));
    assert!(
        zk.wait_connected(CONNECT),
        "waiting for a zookeeper session to {}",
        cfg.connect_string()
    );
    zk
}

#[test]
fn data_operations_round_trip_under_a_chroot() {
    let server = ZkServer::shared();
    let chroot = server.chroot("data_ops");
    let zk = connect(plain_cfg(server, &chroot, Duration::from_secs(6)));

    zk.ensure_path("/nodepool/images/a/builds").unwrap();
    zk.ensure_path("/nodepool/images/a/builds").unwrap();
    assert_eq!(
        zk.get_children("/nodepool/images").unwrap(),
        Some(vec!["a".to_string()])
    );
    assert_eq!(
        zk.get_data("/nodepool/images/a").unwrap().unwrap().0,
        b"",
        "structural znodes are empty"
    );
    assert_eq!(zk.get_data("/nodepool/missing").unwrap(), None);
    assert_eq!(zk.get_children("/nodepool/missing").unwrap(), None);
    assert!(zk.exists("/nodepool/missing").unwrap().is_none());

    let p = zk
        .create_with_parents(
            "/nodepool/images/a/builds/b1/providers/p/images/lock",
            b"",
            Mode::Persistent,
        )
        .unwrap();
    assert_eq!(p, "/nodepool/images/a/builds/b1/providers/p/images/lock");
    // Upload ids are the parent's sequence counter, bumped by the `lock` sibling: 0000000001.
    let up = zk
        .create(
            "/nodepool/images/a/builds/b1/providers/p/images/",
            b"{}",
            Mode::PersistentSequential,
        )
        .unwrap();
    assert_eq!(
        up,
        "/nodepool/images/a/builds/b1/providers/p/images/0000000001"
    );
    let stat = zk.set_data(&up, b"x", None).unwrap();
    assert_eq!(stat.version, 1);
    assert_eq!(zk.set_data(&up, b"y", Some(0)), Err(ZkError::BadVersion));
    assert_eq!(
        zk.create(&up, b"", Mode::Persistent),
        Err(ZkError::NodeExists)
    );
    assert_eq!(
        zk.delete("/nodepool/images/a/builds/b1", None),
        Err(ZkError::NotEmpty)
    );
    zk.delete_recursive("/nodepool/images/a/builds/b1").unwrap();
    zk.delete_recursive("/nodepool/images/a/builds/b1").unwrap();
    assert!(zk.exists("/nodepool/images/a/builds/b1").unwrap().is_none());

    // The chroot is real: seen from the root, everything is below it.
    let out = run_kazoo_ok(
        "kz.py",
        &[
            "--hosts",
            &server.plain_hosts(),
            "ls",
            &format!("{chroot}/nodepool/images/a"),
        ],
    );
    assert_eq!(out.trim(), "builds");
}

#[test]
fn records_written_over_tls_are_byte_exact_for_kazoo() {
    let server = ZkServer::shared();
    let chroot = server.chroot("records_tls");
    let zk = connect(tls_cfg(server, &chroot));
    let build = schema::ImageBuild::building(
        "localhost",
        "3944b9cd-b957-4139-810a-3a54f033edae",
        &["qcow2".to_string()],
        1795536810.9756422,
    );
    let path = paths::image_build_path("test-image-2", "4d71e1096b2248c3899a5665643b5044");
    zk.create_with_parents(&path, &build.to_json(), Mode::Persistent)
        .unwrap();
    let upload = schema::ImageUpload::from_json(br#"{"state": "ready", "state_time": 1795536820.7704952, "external_id": "ab1f6b3464d147e28a759f6d5570997a", "external_name": "test-image-2-1795536820", "format": "qcow2", "username": "zuul", "python_path": "auto", "shell_type": null}"#).unwrap();
    let upath = paths::image_upload_path(
        "test-image-2",
        "4d71e1096b2248c3899a5665643b5044",
        "fake-provider-1",
        "0000000001",
    );
    zk.create_with_parents(&upath, &upload.to_json(), Mode::Persistent)
        .unwrap();

    let conn = kz_tls_args(server, &chroot);
    let got = run_kazoo_ok("kz.py", &kz_args(&conn, &["get", &path]));
    assert_eq!(
        got,
        r#"{"state": "building", "state_time": 1795536810.9756422, "builder": "localhost", "builder_id": "3944b9cd-b957-4139-810a-3a54f033edae", "formats": "qcow2", "username": null, "python_path": null, "shell_type": null}"#
    );
    let got = run_kazoo_ok("kz.py", &kz_args(&conn, &["get", &upath]));
    assert_eq!(
        got,
        r#"{"state": "ready", "state_time": 1795536820.7704952, "external_id": "ab1f6b3464d147e28a759f6d5570997a", "external_name": "test-image-2-1795536820", "format": "qcow2", "username": "zuul", "python_path": "auto", "shell_type": null}"#
    );
    // And what kazoo writes, we read.
    let kpath = paths::image_build_path("test-image-2", "0000000001");
    run_kazoo_ok(
        "kz.py",
        &kz_args(
            &conn,
            &[
                "create",
                &kpath,
                r#"{"state": "ready", "state_time": 1.0, "formats": "qcow2,raw"}"#,
                "--makepath",
            ],
        ),
    );
    let (data, _) = zk.get_data(&kpath).unwrap().unwrap();
    let b = schema::ImageBuild::from_json(&data).unwrap();
    assert_eq!(b.state, BuildState::Ready);
    assert_eq!(b.formats, vec!["qcow2", "raw"]);
}

#[test]
fn component_registration_matches_upstream_and_is_ephemeral() {
    let server = ZkServer::shared();
    let chroot = server.chroot("component");
    let zk = Session(Zk::new(tls_cfg(server, &chroot)));
    let reg = component::register_on_every_session(&zk, "vm".into(), "0.1.0".into());
    zk.start();
    let node = reg.wait(&zk, CONNECT).expect("component registered");
    assert!(
        node.starts_with("/nodepool/components/builder/vm"),
        "{node}"
    );
    assert_eq!(
        node.len(),
        "/nodepool/components/builder/vm".len() + 10,
        "10-digit sequence: {node}"
    );
    let conn = kz_tls_args(server, &chroot);
    assert_eq!(
        run_kazoo_ok("kz.py", &kz_args(&conn, &["get", &node])),
        r#"{"hostname": "vm", "kind": "builder", "model_api": 0, "state": "stopped", "version": "0.1.0"}"#
    );
    let roots = run_kazoo_ok("kz.py", &kz_args(&conn, &["ls", "/nodepool/components"]));
    assert_eq!(
        roots.lines().collect::<Vec<_>>(),
        ["builder", "launcher", "pool"]
    );
    zk.close();
    let out = run_kazoo_ok("kz.py", &kz_args(&conn, &["exists", &node]));
    assert_eq!(
        out.trim(),
        "no",
        "closing the session removes the component node at once"
    );
}

#[test]
fn tls_with_a_certificate_from_another_ca_never_connects() {
    let server = ZkServer::shared();
    let certs = server.certs();
    let mut cfg = tls_cfg(server, "/unused");
    cfg.session_timeout = Duration::from_secs(2);
    if let Some(tls) = cfg.tls.as_mut() {
        tls.cert = certs.wrong_ca_cert.clone();
        tls.key = certs.wrong_ca_key.clone();
    }
    let zk = Session(Zk::connect(cfg));
    assert!(
        !zk.wait_connected(Duration::from_secs(5)),
        "a client certificate from an untrusted CA must be refused"
    );
    assert_eq!(zk.state(), ConnState::Connecting);
    assert!(matches!(zk.get_data("/"), Err(ZkError::ConnectionLoss(_))));
}

#[test]
fn kazoo_holding_a_lock_blocks_ours_until_it_releases() {
    let server = ZkServer::shared();
    let chroot = server.chroot("lock_kazoo_holds");
    let zk = connect(tls_cfg(server, &chroot));
    let path = paths::image_build_lock_path("img");
    let conn = kz_tls_args(server, &chroot);
    let mut holder = KazooChild::spawn("kz.py", &kz_args(&conn, &["lock-hold", &path]));
    holder.expect_line(Duration::from_secs(30), "held");

    assert!(
        lock::try_lock(&zk, &path).unwrap().is_none(),
        "kazoo holds the lock"
    );
    assert_eq!(
        lock::contenders(&zk, &path).unwrap().len(),
        1,
        "a failed try leaves no contender behind"
    );
    assert!(lock::is_locked(&zk, &path).unwrap());
    match lock::lock(&zk, &path, Duration::from_millis(500)) {
        Err(lock::LockError::Timeout { .. }) => {}
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(
        lock::contenders(&zk, &path).unwrap().len(),
        1,
        "a timed-out wait leaves no contender behind"
    );

    // Blocking acquire succeeds as soon as kazoo releases.
    let zk2 = zk.0.clone();
    let p2 = path.clone();
    let waiter = nodepool_builder::thread::spawn(
        nodepool_builder::thread::ThreadKind::Other,
        "lock-waiter",
        move || {
            lock::lock(&zk2, &p2, Duration::from_secs(30))
                .map(|g| (Instant::now(), g.node().to_string()))
        },
    );
    wait_until(
        Duration::from_secs(10),
        "our waiter to queue behind kazoo",
        || lock::contenders(&zk, &path).unwrap().len() == 2,
    );
    holder.close_stdin();
    holder.expect_line(Duration::from_secs(10), "released");
    let (_, node) = waiter
        .join()
        .unwrap()
        .expect("acquired after kazoo released");
    assert!(node.contains("__lock__"), "{node}");
    wait_until(
        Duration::from_secs(10),
        "our lock to be released by drop",
        || !lock::is_locked(&zk, &path).unwrap(),
    );
}

#[test]
fn our_lock_blocks_kazoo_both_ways() {
    let server = ZkServer::shared();
    let chroot = server.chroot("lock_we_hold");
    let zk = connect(tls_cfg(server, &chroot));
    let path = paths::image_upload_lock_path("img", "00ff", "prov");
    let conn = kz_tls_args(server, &chroot);
    let guard = lock::try_lock(&zk, &path).unwrap().expect("free lock");
    assert!(guard.is_valid());
    let name = guard.node().rsplit('/').next().unwrap().to_string();
    assert_eq!(
        name.len(),
        32 + "__lock__".len() + 10,
        "uuid4hex__lock__seq: {name}"
    );
    assert!(
        name[..32]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );

    assert_eq!(
        run_kazoo_ok("kz.py", &kz_args(&conn, &["lock-try", &path])).trim(),
        "not-acquired"
    );
    assert_eq!(
        run_kazoo_ok("kz.py", &kz_args(&conn, &["lock-timeout", &path, "1"])).trim(),
        "timeout"
    );
    let contenders = run_kazoo_ok("kz.py", &kz_args(&conn, &["contenders", &path]));
    assert_eq!(
        contenders.lines().count(),
        1,
        "kazoo sees exactly our contender: {contenders:?}"
    );
    // A second thread of ours does not get it either (the recipe is not re-entrant).
    assert!(lock::try_lock(&zk, &path).unwrap().is_none());

    drop(guard);
    assert_eq!(
        run_kazoo_ok("kz.py", &kz_args(&conn, &["lock-try", &path])).trim(),
        "acquired"
    );
    // Contender names from both sides sort into one sequence.
    let ours = lock::try_lock(&zk, &path).unwrap().expect("free again");
    let mut kazoo = KazooChild::spawn(
        "kz.py",
        &kz_args(&conn, &["lock-hold", &path, "--acquire-timeout", "30"]),
    );
    wait_until(Duration::from_secs(20), "kazoo to queue behind us", || {
        lock::contenders(&zk, &path).unwrap().len() == 2
    });
    let order = lock::contenders(&zk, &path).unwrap();
    assert!(
        order[0].ends_with(ours.node().rsplit('/').next().unwrap()),
        "we hold it, so we are first: {order:?}"
    );
    let seqs: Vec<&str> = order.iter().map(|c| &c[c.len() - 10..]).collect();
    assert!(seqs[0] < seqs[1]);
    drop(ours);
    kazoo.expect_line(Duration::from_secs(20), "held");
    kazoo.close_stdin();
    kazoo.expect_line(Duration::from_secs(10), "released");
}

#[test]
fn lost_replies_of_lock_creates_and_deletes_leave_no_orphan_contender() {
    // A contender whose create or delete reply is lost would, if left behind, hold the
    // lock for as long as our session lives: for a daemon, for ever.
    let server = ZkServer::shared();
    let chroot = server.chroot("lock_lost_replies");
    let proxy = ZkProxy::start(server.plain_port());
    let zk = connect(ZkConfig {
        hosts: vec![("127.0.0.1".into(), proxy.port())],
        ..plain_cfg(server, &chroot, Duration::from_secs(6))
    });
    let other = connect(plain_cfg(server, &chroot, Duration::from_secs(6)));
    let path = paths::image_build_lock_path("img");
    let names = |zk: &Zk| lock::contenders(zk, &path).unwrap();
    let node_name = |g: &lock::LockGuard| g.node().rsplit('/').next().unwrap().to_string();

    // The lock is free and the reply to our contender's create is lost: we adopt the node.
    proxy.cut_reply_of(zkproxy::CREATE, "__lock__");
    let guard = lock::try_lock(&zk, &path)
        .expect("a lost create reply is not an error")
        .expect("the free lock is ours");
    assert_eq!(proxy.cuts(), 1, "the create's reply was lost");
    assert_eq!(
        names(&other),
        vec![node_name(&guard)],
        "one contender: ours"
    );

    // The reply to the release's delete is lost: the release still completes.
    proxy.cut_reply_of(zkproxy::DELETE, "__lock__");
    drop(guard);
    assert_eq!(proxy.cuts(), 2, "the delete's reply was lost");
    assert!(names(&other).is_empty(), "released: {:?}", names(&other));

    // Another builder holds the lock; the replies to our try's create and then to its
    // delete are lost: we report "held by another" and leave nothing behind.
    let holder = lock::try_lock(&other, &path).unwrap().expect("free lock");
    proxy.cut_reply_of(zkproxy::CREATE, "__lock__");
    assert!(lock::try_lock(&zk, &path).unwrap().is_none(), "held");
    assert_eq!(proxy.cuts(), 3);
    assert_eq!(names(&other), vec![node_name(&holder)]);
    proxy.cut_reply_of(zkproxy::DELETE, "__lock__");
    assert!(lock::try_lock(&zk, &path).unwrap().is_none(), "held");
    assert_eq!(proxy.cuts(), 4);
    assert_eq!(names(&other), vec![node_name(&holder)]);

    // Once the holder lets go, the lock is ours at once: nothing of ours blocks it.
    drop(holder);
    let guard = lock::try_lock(&zk, &path).unwrap().expect("free again");
    assert_eq!(names(&other), vec![node_name(&guard)]);
    assert_eq!(
        zk.session().generation,
        1,
        "all of it within the first session"
    );
}

#[test]
fn a_lost_reply_to_the_component_registration_does_not_register_twice() {
    let server = ZkServer::shared();
    let chroot = server.chroot("component_lost_reply");
    let proxy = ZkProxy::start(server.plain_port());
    proxy.cut_reply_of(zkproxy::CREATE, "/nodepool/components/builder/");
    let zk = Session(Zk::new(ZkConfig {
        hosts: vec![("127.0.0.1".into(), proxy.port())],
        ..plain_cfg(server, &chroot, Duration::from_secs(6))
    }));
    let reg = component::register_on_every_session(&zk, "vm".into(), "0.1.0".into());
    zk.start();
    let node = reg.wait(&zk, CONNECT).expect("component registered");
    assert_eq!(proxy.cuts(), 1, "the registration's reply was lost");
    let other = connect(plain_cfg(server, &chroot, Duration::from_secs(6)));
    let root = paths::component_kind_path("builder");
    let children = other.get_children(&root).unwrap().unwrap_or_default();
    assert_eq!(
        children
            .iter()
            .map(|c| format!("{root}/{c}"))
            .collect::<Vec<_>>(),
        vec![node],
        "one registration, the one the builder knows"
    );
    assert_eq!(zk.session().generation, 1, "within the first session");
}

/// Regression (issue 14, item 8): a registration ZooKeeper refused was given up for the
/// rest of the session (the retry covered only connection losses, for one session timeout),
/// and the daemon waited for it for ever. It is now retried for as long as the session lives.
#[test]
fn a_refused_component_registration_is_retried_while_the_session_lives() {
    let server = ZkServer::shared();
    let chroot = server.chroot("component_refused");
    // A read-only builder root (an operator's ACL mistake): ZooKeeper refuses the create.
    let root = format!("{chroot}{}", paths::component_kind_path("builder"));
    server.ensure_path(&root);
    server.refuse_creates_under(&root);
    let timeout = Duration::from_secs(2);
    let zk = Session(Zk::new(plain_cfg(server, &chroot, timeout)));
    let reg = component::register_on_every_session(&zk, "vm".into(), "0.1.0".into());
    zk.start();
    assert!(zk.wait_connected(CONNECT), "connected");
    assert_eq!(
        reg.wait(&zk, timeout * 2),
        None,
        "not registered while ZooKeeper refuses"
    );
    assert!(
        reg.last_error()
            .is_some_and(|e| e.contains("not authorized")),
        "the refusal is reported: {:?}",
        reg.last_error()
    );
    server.allow_creates_under(&root);
    let node = reg
        .wait(&zk, CONNECT)
        .expect("registered once ZooKeeper allows it");
    assert!(zk.exists(&node).unwrap().is_some());
    assert_eq!(reg.last_error(), None, "no error left once registered");
    assert_eq!(zk.session().generation, 1, "within the first session");
}

#[test]
fn frozen_server_means_lost_session_then_a_new_one_with_registration() {
    let mut server = ZkServer::start(ZkOptions::default());
    let timeout = Duration::from_secs(4);
    let zk = Session(Zk::new(plain_cfg(&server, "/fault", timeout)));
    let reg = component::register_on_every_session(&zk, "vm".into(), "0.1.0".into());
    let states = zk.subscribe();
    zk.start();
    let first = reg
        .wait(&zk, CONNECT)
        .expect("registered in the first session");
    let gen1 = zk.session().generation;
    let guard = lock::try_lock(&zk, &paths::image_build_lock_path("img"))
        .unwrap()
        .expect("lock");
    assert!(guard.is_valid());

    server.freeze();
    let frozen_at = Instant::now();
    let lost = loop {
        let ev = states
            .recv_timeout(Duration::from_secs(20))
            .expect("a session state change while frozen");
        if ev.state == ConnState::Lost {
            break frozen_at.elapsed();
        }
    };
    // A frozen server may still hold the session once it runs again, so it is kept for twice
    // the negotiated timeout after the silence is noticed (the connection timeout, 3/5 of the
    // session timeout, after the last receive, which is at most one ping interval before the
    // freeze), and then given up: the server has surely expired it by then.
    assert!(
        lost >= timeout * 2 && lost <= timeout.mul_f64(2.7) + Duration::from_millis(500),
        "Lost after {lost:?}"
    );
    assert!(
        !guard.is_valid(),
        "a lock guard must not claim to be held after the session is lost"
    );
    server.thaw();

    wait_until(Duration::from_secs(30), "a new session", || {
        zk.session().generation > gen1 && zk.state() == ConnState::Connected
    });
    let second = reg
        .wait(&zk, CONNECT)
        .expect("registered again in the new session");
    assert_ne!(
        first, second,
        "a new sequential node: the old one may linger until the server expires it"
    );
    assert!(zk.exists(&second).unwrap().is_some());
    // A create bound to the lost session (a lock contender sent just as the session was
    // replaced) must not land in the new one, where it would outlive its guard.
    assert_eq!(
        zk.create_in(gen1, "/late-contender", b"", Mode::Ephemeral),
        Err(ZkError::SessionLost)
    );
    assert!(zk.exists("/late-contender").unwrap().is_none());
    let now = zk.session().generation;
    zk.create_in(now, "/late-contender", b"", Mode::Ephemeral)
        .expect("a create bound to the current session");
    drop(guard);
    wait_until(
        Duration::from_secs(20),
        "the old session's ephemerals to expire on the server",
        || zk.exists(&first).unwrap().is_none(),
    );
    assert!(
        lock::try_lock(&zk, &paths::image_build_lock_path("img"))
            .unwrap()
            .is_some(),
        "the old lock is gone with its session"
    );
}

#[test]
fn short_drop_keeps_the_session_and_watches_fire() {
    let mut server = ZkServer::start(ZkOptions::default());
    let zk = connect(plain_cfg(&server, "/blip", Duration::from_secs(10)));
    let gen1 = zk.session().generation;
    let session_events = zk.subscribe();
    zk.ensure_path("/nodepool/images/a").unwrap();
    let (children, watch) = zk
        .get_children_watch("/nodepool/images/a")
        .unwrap()
        .unwrap();
    assert!(children.is_empty());
    let (tx, rx) = crossbeam_channel::unbounded();
    zk.forward(watch, tx);
    let (stat, exists_watch) = zk.exists_watch("/nodepool/images/a/request-build").unwrap();
    assert!(stat.is_none());

    server.kill();
    // Only Suspended may come first; a repeat of Connected from the connect itself is allowed.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ev = session_events
            .recv_timeout(left)
            .expect("suspended after the server died");
        match ev.state {
            ConnState::Suspended => break,
            ConnState::Connected if ev.generation == gen1 => continue,
            other => panic!("expected Suspended after the server died, got {other:?}"),
        }
    }
    server.restart();
    wait_until(Duration::from_secs(30), "the connection to resume", || {
        zk.state() == ConnState::Connected
    });
    assert_eq!(
        zk.session().generation,
        gen1,
        "the same ZooKeeper session resumed"
    );

    zk.create("/nodepool/images/a/request-build", b"", Mode::Persistent)
        .unwrap();
    let fired = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the child watch fires after the blip");
    assert_eq!(
        fired,
        zk::WatchEvent {
            path: "/nodepool/images/a".into(),
            kind: WatchKind::ChildrenChanged
        }
    );
    let fired = zk
        .wait_watch(exists_watch, Duration::from_secs(10))
        .expect("the exists watch fires after the blip");
    assert_eq!(fired.kind, WatchKind::Created);
}

/// zookeeper-client expires a session on its own 7/5 of the timeout after its last receive,
/// without asking the server, and a standalone server restarted from its data directory
/// restores its sessions with a fresh timeout. The facade re-attaches to the session after
/// the client's own expiry: the server, not the client, decides. The same session resumes
/// with its lock and ephemeral node.
#[test]
fn the_session_resumes_after_the_clients_own_expiry_if_the_restarted_server_kept_it() {
    let mut server = ZkServer::start(ZkOptions::default());
    // tickTime 500 ms: the server grants the 10 s asked for.
    let timeout = Duration::from_secs(10);
    let zk = connect(plain_cfg(&server, "/reattach", timeout));
    assert_eq!(zk.session_timeout(), timeout, "the negotiated timeout");
    let states = zk.subscribe();
    let generation = zk.session().generation;
    let id = zk.session_id().expect("a session");
    let guard = lock::try_lock(&zk, &paths::image_build_lock_path("img"))
        .unwrap()
        .expect("lock");
    zk.create("/mine", b"", Mode::Ephemeral).unwrap();

    server.kill();
    let killed = Instant::now();
    // The client gives the session up 14 s after its last receive; the facade then has no
    // client while it asks the server, which is down.
    wait_until(
        Duration::from_secs(20),
        "the client's own expiry (the facade re-attaching)",
        || zk.session_id().is_none(),
    );
    assert_eq!(zk.state(), ConnState::Suspended, "still only suspended");
    assert!(guard.is_valid(), "the lock may still be ours");
    let restarted_after = killed.elapsed();
    server.restart();
    wait_until(Duration::from_secs(30), "the session to resume", || {
        zk.state() == ConnState::Connected
    });
    let resumed_after = killed.elapsed();
    // Said with every failure below: which states the facade went through, and when.
    let seen: Vec<ConnState> = states.try_iter().map(|ev| ev.state).collect();
    let story = format!(
        "states {seen:?}; connected again {resumed_after:?} after the kill, the server restarted {restarted_after:?} after it"
    );
    assert_eq!(zk.session_id(), Some(id), "the same session; {story}");
    assert_eq!(
        zk.session().generation,
        generation,
        "the same generation; {story}"
    );
    assert!(!seen.contains(&ConnState::Lost), "never lost: {story}");
    assert!(guard.is_valid());
    let owner = zk
        .exists("/mine")
        .unwrap()
        .expect("the ephemeral node survived");
    assert_eq!(owner.ephemeral_owner, id);
    assert_eq!(
        lock::contenders(&zk, &paths::image_build_lock_path("img")).unwrap(),
        vec![guard.node().rsplit('/').next().unwrap().to_string()],
        "our contender is still there"
    );
    assert!(
        resumed_after > timeout.mul_f64(1.4),
        "resumed after the client's own expiry ({resumed_after:?})"
    );
    drop(guard);
    assert!(
        lock::contenders(&zk, &paths::image_build_lock_path("img"))
            .unwrap()
            .is_empty(),
        "released"
    );
}

#[test]
fn unreachable_server_is_retried_until_it_appears() {
    let mut server = ZkServer::start(ZkOptions::default());
    server.kill();
    let zk = Session(Zk::connect(plain_cfg(
        &server,
        "/late",
        Duration::from_secs(2),
    )));
    assert!(!zk.wait_connected(Duration::from_secs(3)));
    server.restart();
    assert!(zk.wait_connected(CONNECT), "connects once the server is up");
    let out = run_kazoo(
        "kz.py",
        &["--hosts", &server.plain_hosts(), "exists", "/late"],
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "yes",
        "the chroot was created"
    );
}

/// Regression (CI of 2026-12-07: `cleanup::orphans_of_a_killed_builder_are_cleaned_and_the_work_redone`
/// waited a minute for the janitor to see an orphaned upload record it was never told of).
/// The watcher reads a znode's children and, finding none, watches for its creation; a
/// znode created between those two requests made the existence watch a data watch, which
/// never fires for new children, and the path counted as watched: records created under it
/// stayed unseen. The proxy holds back the "no node" reply while the znode is created.
#[test]
fn a_znode_created_between_the_children_read_and_the_creation_watch_is_watched_for_children() {
    use nodepool_builder::zk::watcher::{Watcher, ZkEvent};

    let server = ZkServer::shared();
    let chroot = server.chroot("watch_created_between_reads");
    let proxy = ZkProxy::start(server.plain_port());
    let other = connect(plain_cfg(server, &chroot, Duration::from_secs(6)));
    let build = schema::ImageBuild::building("localhost", "builder-id", &["raw".into()], 1.0);
    other
        .create_with_parents(
            &paths::image_build_path("img", "0000000001"),
            &build.to_json(),
            Mode::Persistent,
        )
        .unwrap();
    let providers = paths::image_providers_path("img", "0000000001");
    proxy.hold_reply_of(zkproxy::GET_CHILDREN, &providers);
    let zk = connect(ZkConfig {
        hosts: vec![("127.0.0.1".into(), proxy.port())],
        ..plain_cfg(server, &chroot, Duration::from_secs(6))
    });
    let (tx, events) = crossbeam_channel::unbounded();
    let _watcher = Watcher::start(&zk, ["img".to_string()].into(), tx);
    assert!(
        proxy.wait_held(CONNECT),
        "waiting for the watcher's read of {providers} to be answered"
    );
    other.ensure_path(&providers).unwrap();
    proxy.release();
    let deadline = Instant::now() + CONNECT;
    loop {
        match events.recv_deadline(deadline) {
            Ok(ZkEvent::Resynced) => break,
            Ok(_) => {}
            Err(e) => panic!("waiting for the watcher's first full read: {e}"),
        }
    }

    let upload = schema::ImageUpload::from_json(br#"{"state": "ready", "state_time": 2.0, "external_id": "cloud-image-1", "external_name": "img-1", "format": "raw", "username": "zuul", "python_path": "auto", "shell_type": null}"#).unwrap();
    other
        .create_with_parents(
            &paths::image_upload_path("img", "0000000001", "cloud", "0000000001"),
            &upload.to_json(),
            Mode::Persistent,
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match events.recv_deadline(deadline) {
            Ok(ZkEvent::Builds { image, builds, .. })
                if image == "img"
                    && builds
                        .iter()
                        .any(|b| b.uploads.iter().any(|u| u.upload == upload)) =>
            {
                break;
            }
            Ok(_) => {}
            Err(e) => panic!(
                "waiting for the watcher to report the upload created under {providers} \
                 (which appeared between its two reads): {e}"
            ),
        }
    }
}
