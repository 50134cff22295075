//! Uploading images: the upload pipeline of the real binary, from a `ready` build (made by the
//! test image builder) to one `ready` upload per provider, with a real ZooKeeper and real
//! clouds:
//!
//! * [`command_driver`]: the command driver and a directory "cloud"; the upload-side
//!   upstream tests that do not need Glance, retries, hooks, stops and process groups;
//! * [`glance`]: the OpenStack driver to a real Glance through clouds.yaml;
//! * [`glance_faults`]: Glance behind a fault-injecting proxy (500, 503, 415, stalls, gone);
//! * [`glance_tls`]: Glance over https with a private CA, each way of trusting it.
//!
//! Elsewhere: the drivers called directly (no daemon) in `cloud_drivers`; removing uploads
//! and cloud images in `cleanup`; uploads under ZooKeeper faults and crashes in `faults`;
//! uploads shared with nodepool-builder 11 in `mixed_fleet`.

mod command_driver;
mod glance;
mod glance_faults;
mod glance_tls;
