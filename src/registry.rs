//! Placeholder; replaced by the thread-registry work.
