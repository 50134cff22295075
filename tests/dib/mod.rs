//! The image builder programs the builder runs as `dib-cmd`, checked against what the builder
//! expects of `disk-image-create` (its arguments, environment, output files, checksums, exit
//! codes):
//!
//! * [`real`]: one real diskimage-builder build through the daemon (slow, minutes);
//! * [`test_script`]: `tests/fixtures/fake-dib`, the stand-in every other build test runs,
//!   on its own through the subprocess runner.
//!
//! How the daemon schedules builds and records their outcomes is in `builds`.

mod real;
mod test_script;
