//! Cloud drivers behind one trait: OpenStack (Glance v2 + Keystone) and the command driver.
//! Filled in by the upload-pipeline work.
