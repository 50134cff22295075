//! One worker pool for builds and uploads: `n` named threads take jobs from a bounded channel,
//! run each to completion and send exactly one outcome per job back to the scheduler.
//!
//! Builds and uploads used to have a pool each, near copies of each other: one joined its
//! threads, the other detached them after polling `is_finished` every 20 ms. The shared
//! parts live here; what differs is said once, at [`WorkerPool::start`]:
//!
//! * the work ([`Work`]): how a job runs, and what a job reports when its run panics (cargo's
//!   "a job reports `Finish` even when it panics": the scheduler counts jobs in flight and
//!   must hear of every one);
//! * the stop policy ([`Stop`]): builds are waited for (their DIB runs are cancelled first by
//!   the scheduler), uploads only for a grace period, because an upload can take hours and
//!   nodepool 11's shutdown does not wait for uploads either. An upload still running after
//!   the grace is detached; its record stays `uploading` with a free lock, and the janitor of
//!   any builder removes it.
//!
//! # Shutdown without polling
//!
//! Closing the job channel (dropping its sender) is the stop signal: a worker finishes its
//! current job and returns. Each worker holds the sending half of its own zero-capacity
//! "alive" channel and never sends on it; the channel disconnects when the worker's closure
//! ends (normally or by unwinding). Waiting for a worker with a deadline is therefore one
//! `recv_deadline` on its alive channel: no sleeps, no polling, and the workers are all
//! waited for against the same deadline.
//!
//! Stopping happens in [`WorkerPool::shutdown`] and, the same way, when the pool is dropped
//! (a scheduler unwinding from a panic still stops its workers by the policy).
//!
//! # Hazards
//!
//! * CAUTION: the job sender is taken (dropped) before any worker is waited for; waiting
//!   first would wait forever, since idle workers block on the channel.
//! * A worker whose outcome channel is gone (the scheduler has stopped) stops after its
//!   current job: nobody would hear of further ones.

use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use log::warn;

use crate::registry;
use crate::thread::{self, JoinHandle, ThreadKind};

/// What the workers of a pool do with a job. Each worker gets its own clone.
pub trait Work: Clone + Send + 'static {
    type Job: Send + 'static;
    type Outcome: Send + 'static;

    /// Runs one job to completion.
    fn run(&mut self, job: &Self::Job) -> Self::Outcome;

    /// The outcome of a job whose [`Work::run`] panicked (the panic is logged by the hook of
    /// `thread::install_panic_hook`).
    fn panicked(&mut self, job: &Self::Job) -> Self::Outcome;
}

/// How a pool stops (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Wait for every worker to finish its current job.
    Join,
    /// Wait at most this long, then leave workers still busy to end with the process.
    GraceThenDetach(Duration),
}

/// How one worker ended when its pool stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerEnd {
    /// It finished and was joined.
    Joined,
    /// It was still busy after the grace period and was left running.
    Detached,
}

struct Worker {
    handle: JoinHandle<()>,
    /// Disconnects when the worker's closure ends; nothing is ever sent on it.
    alive: Receiver<()>,
}

/// `n` worker threads running jobs of one kind; outcomes go to the channel given at start.
pub struct WorkerPool<Job, Outcome> {
    /// `None` once stopping.
    jobs: Option<Sender<Job>>,
    workers: Vec<Worker>,
    stop: Stop,
    _outcome: PhantomData<fn() -> Outcome>,
}

impl<Job: Send + 'static, Outcome: Send + 'static> WorkerPool<Job, Outcome> {
    /// Starts `n` workers named `<prefix>-0`, `<prefix>-1`, ... of `kind`, each running a
    /// clone of `work`; every job's outcome goes to `outcomes`.
    pub fn start<W>(
        kind: ThreadKind,
        prefix: &str,
        n: usize,
        work: W,
        outcomes: Sender<Outcome>,
        stop: Stop,
    ) -> Self
    where
        W: Work<Job = Job, Outcome = Outcome>,
    {
        let (job_tx, job_rx) = crossbeam_channel::bounded::<Job>(n);
        let workers = (0..n)
            .map(|i| {
                let (alive_tx, alive) = crossbeam_channel::bounded::<()>(0);
                let (work, jobs, outcomes) = (work.clone(), job_rx.clone(), outcomes.clone());
                let handle = thread::spawn(kind, format!("{prefix}-{i}"), move || {
                    let _alive = alive_tx;
                    worker_loop(work, jobs, outcomes)
                });
                Worker { handle, alive }
            })
            .collect();
        WorkerPool {
            jobs: Some(job_tx),
            workers,
            stop,
            _outcome: PhantomData,
        }
    }

    /// Hands a job to an idle worker; false (the job dropped) when every worker is busy.
    pub fn try_submit(&self, job: Job) -> bool {
        self.jobs
            .as_ref()
            .is_some_and(|tx| tx.try_send(job).is_ok())
    }
}

impl<Job, Outcome> WorkerPool<Job, Outcome> {
    /// Stops taking jobs and stops the workers by the pool's [`Stop`] policy; says how each
    /// worker ended, in worker order.
    pub fn shutdown(mut self) -> Vec<WorkerEnd> {
        self.stop_workers()
    }

    fn stop_workers(&mut self) -> Vec<WorkerEnd> {
        // CAUTION: first close the job channel, so idle workers return (module docs).
        self.jobs.take();
        let deadline = match self.stop {
            Stop::Join => None,
            Stop::GraceThenDetach(grace) => Some(Instant::now() + grace),
        };
        self.workers
            .drain(..)
            .map(|w| {
                let ended = match deadline {
                    None => true,
                    Some(deadline) => !matches!(
                        w.alive.recv_deadline(deadline),
                        Err(RecvTimeoutError::Timeout)
                    ),
                };
                if ended {
                    // Its closure has returned; the join only waits for the thread's exit.
                    let _ = w.handle.join();
                    WorkerEnd::Joined
                } else {
                    if let Stop::GraceThenDetach(grace) = self.stop {
                        warn!(
                            "{} is still busy after the {grace:?} grace period; not waiting for it",
                            w.handle.thread_name()
                        );
                    }
                    w.handle.detach();
                    WorkerEnd::Detached
                }
            })
            .collect()
    }
}

impl<Job, Outcome> Drop for WorkerPool<Job, Outcome> {
    fn drop(&mut self) {
        // After `shutdown` there is nothing left to stop.
        self.stop_workers();
    }
}

fn worker_loop<W: Work>(mut work: W, jobs: Receiver<W::Job>, outcomes: Sender<W::Outcome>) {
    registry::set_activity("idle");
    for job in jobs.iter() {
        let outcome = catch_unwind(AssertUnwindSafe(|| work.run(&job)))
            .unwrap_or_else(|_| work.panicked(&job));
        registry::set_activity("idle");
        if outcomes.send(outcome).is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crossbeam_channel::{bounded, unbounded};

    enum Job {
        Echo(u32),
        Panic,
        /// Says it started, then runs until `release` says so or is dropped.
        Block {
            started: Sender<()>,
            release: Receiver<()>,
        },
    }

    #[derive(Debug, PartialEq)]
    enum Outcome {
        Echoed(u32),
        Panicked,
        Released,
    }

    #[derive(Clone)]
    struct TestWork;

    impl Work for TestWork {
        type Job = Job;
        type Outcome = Outcome;
        fn run(&mut self, job: &Job) -> Outcome {
            match job {
                Job::Echo(n) => Outcome::Echoed(*n),
                Job::Panic => panic!("a job that panics (expected by this test)"),
                Job::Block { started, release } => {
                    started.send(()).unwrap();
                    let _ = release.recv();
                    Outcome::Released
                }
            }
        }
        fn panicked(&mut self, _job: &Job) -> Outcome {
            Outcome::Panicked
        }
    }

    const LONG: Duration = Duration::from_secs(10);

    fn pool(n: usize, stop: Stop) -> (WorkerPool<Job, Outcome>, Receiver<Outcome>) {
        let (tx, rx) = unbounded();
        (
            WorkerPool::start(ThreadKind::Other, "pool-test", n, TestWork, tx, stop),
            rx,
        )
    }

    /// Submits a blocking job and waits until a worker runs it.
    fn block(pool: &WorkerPool<Job, Outcome>) -> Sender<()> {
        let (started, started_rx) = bounded(1);
        let (release_tx, release) = bounded(1);
        assert!(pool.try_submit(Job::Block { started, release }));
        started_rx
            .recv_timeout(LONG)
            .expect("a worker to start the blocking job");
        release_tx
    }

    #[test]
    fn every_job_reports_one_outcome_even_when_it_panics() {
        let (pool, outcomes) = pool(1, Stop::Join);
        assert!(pool.try_submit(Job::Panic));
        assert_eq!(outcomes.recv_timeout(LONG), Ok(Outcome::Panicked));
        // The worker survives its job's panic and takes the next job.
        assert!(pool.try_submit(Job::Echo(7)));
        assert_eq!(outcomes.recv_timeout(LONG), Ok(Outcome::Echoed(7)));
        assert_eq!(pool.shutdown(), [WorkerEnd::Joined]);
        assert!(outcomes.try_recv().is_err(), "no outcome without a job");
    }

    #[test]
    fn a_job_is_refused_when_every_worker_is_busy() {
        let (pool, outcomes) = pool(1, Stop::Join);
        let release = block(&pool);
        // The channel holds as many waiting jobs as there are workers, not more.
        assert!(pool.try_submit(Job::Echo(1)));
        assert!(!pool.try_submit(Job::Echo(2)), "every worker is busy");
        drop(release);
        assert_eq!(outcomes.recv_timeout(LONG), Ok(Outcome::Released));
        assert_eq!(outcomes.recv_timeout(LONG), Ok(Outcome::Echoed(1)));
    }

    #[test]
    fn join_policy_waits_for_the_running_job() {
        let (pool, outcomes) = pool(2, Stop::Join);
        let release = block(&pool);
        // A shutdown on another thread waits for the running job to end.
        let (ends_tx, ends) = bounded(1);
        let stopper = thread::spawn(ThreadKind::Other, "pool-stopper", move || {
            ends_tx.send(pool.shutdown()).unwrap();
        });
        assert!(
            ends.recv_timeout(Duration::from_millis(200)).is_err(),
            "shutdown returned while a job was running"
        );
        drop(release);
        assert_eq!(
            ends.recv_timeout(LONG),
            Ok(vec![WorkerEnd::Joined, WorkerEnd::Joined])
        );
        assert_eq!(outcomes.recv_timeout(LONG), Ok(Outcome::Released));
        stopper.join().unwrap();
    }

    #[test]
    fn grace_policy_detaches_a_worker_still_busy_after_the_grace() {
        let grace = Duration::from_millis(300);
        let (pool, outcomes) = pool(2, Stop::GraceThenDetach(grace));
        let release = block(&pool);
        let started = Instant::now();
        let mut ends = pool.shutdown();
        let waited = started.elapsed();
        ends.sort_by_key(|e| *e == WorkerEnd::Detached);
        assert_eq!(ends, [WorkerEnd::Joined, WorkerEnd::Detached]);
        assert!(waited >= grace, "waited only {waited:?}");
        assert!(waited < LONG, "waited {waited:?}");
        // The detached worker finishes its job and still reports it.
        drop(release);
        assert_eq!(outcomes.recv_timeout(LONG), Ok(Outcome::Released));
    }

    #[test]
    fn grace_policy_does_not_wait_for_the_grace_when_the_workers_are_idle() {
        let (pool, _outcomes) = pool(3, Stop::GraceThenDetach(LONG));
        let started = Instant::now();
        assert_eq!(pool.shutdown(), [WorkerEnd::Joined; 3]);
        assert!(started.elapsed() < LONG / 2, "{:?}", started.elapsed());
    }

    #[test]
    fn dropping_the_pool_stops_it_by_its_policy() {
        let grace = Duration::from_millis(300);
        let (pool, outcomes) = pool(1, Stop::GraceThenDetach(grace));
        let release = block(&pool);
        let started = Instant::now();
        drop(pool);
        assert!(started.elapsed() >= grace);
        drop(release);
        assert_eq!(outcomes.recv_timeout(LONG), Ok(Outcome::Released));
    }
}
