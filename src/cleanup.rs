//! The janitor (`cleanup` thread): retention, orphans, removed images and providers, local
//! files. Filled in by the cleanup work.
