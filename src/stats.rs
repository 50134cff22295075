//! statsd keys of nodepool's builder, names exactly as upstream. Filled in by the daemon work.
