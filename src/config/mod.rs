//! Placeholder; replaced by the config work.
