//! Placeholder; replaced by the stack-dump work.
