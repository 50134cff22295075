//! SIGUSR2 stack dumps (`src/stackdump.rs`):
//!
//! * [`in_process`]: the capture in this test process, on threads the tests start;
//! * [`sigusr2`]: the real daemon signalled, its dump in the log, bursts of signals.

mod in_process;
mod sigusr2;
