//! The `nodepool-builder` binary: a thin layer over the library.
fn main() {}
