//! Building images: the build pipeline of the real binary with a real ZooKeeper, running the
//! test image builder (`tests/fixtures/fake-dib`) as its DIB.
//!
//! * [`scheduling`]: when builds happen and what each is asked for (requests, rebuild age,
//!   pauses, formats, parents, two builders);
//! * [`failures`]: DIB failing, timing out, leaving files out; stops and session loss
//!   mid-build;
//! * [`local_disk`]: the free-space guard, a full file system, build-log retention.
//!
//! Elsewhere: the image builder programs themselves (real diskimage-builder and the test
//! script) in `dib`; the janitor's removal of builds in `cleanup`; builds under injected
//! ZooKeeper faults and crashes in `faults`.

mod failures;
mod local_disk;
mod scheduling;

use crate::util::site::ONE_IMAGE;
