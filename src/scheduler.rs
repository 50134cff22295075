//! The `scheduler` thread: the only owner of scheduling state.
//!
//! Home of the one `select!` loop over ZooKeeper events, worker outcomes, timers and control
//! signals (see shared design notes). Filled in by the build-pipeline work.
