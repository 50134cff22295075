//! Domain vocabulary shared by every layer: build and upload states, build ids.
//!
//! Nothing here knows JSON or ZooKeeper paths (that is `zk::schema` and `zk::paths`); these
//! are the words nodepool uses, as Rust types.

use std::fmt;

/// State of an image build record (`/nodepool/images/<image>/builds/<build_id>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BuildState {
    Building,
    Ready,
    Deleting,
    Failed,
}

/// State of an image upload record (`…/providers/<provider>/images/<upload_id>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UploadState {
    Uploading,
    Ready,
    Deleting,
    Failed,
}

impl BuildState {
    /// The string nodepool writes into the record.
    pub fn as_str(self) -> &'static str {
        match self {
            BuildState::Building => "building",
            BuildState::Ready => "ready",
            BuildState::Deleting => "deleting",
            BuildState::Failed => "failed",
        }
    }

    /// Parses a state string; unknown states are `None` (the record is skipped by readers).
    pub fn parse(s: &str) -> Option<BuildState> {
        Some(match s {
            "building" => BuildState::Building,
            "ready" => BuildState::Ready,
            "deleting" => BuildState::Deleting,
            "failed" => BuildState::Failed,
            _ => return None,
        })
    }
}

impl UploadState {
    /// The string nodepool writes into the record.
    pub fn as_str(self) -> &'static str {
        match self {
            UploadState::Uploading => "uploading",
            UploadState::Ready => "ready",
            UploadState::Deleting => "deleting",
            UploadState::Failed => "failed",
        }
    }

    /// Parses a state string; unknown states are `None` (the record is skipped by readers).
    pub fn parse(s: &str) -> Option<UploadState> {
        Some(match s {
            "uploading" => UploadState::Uploading,
            "ready" => UploadState::Ready,
            "deleting" => UploadState::Deleting,
            "failed" => UploadState::Failed,
            _ => return None,
        })
    }
}

impl fmt::Display for BuildState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for UploadState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A new build id as nodepool 9+ makes them: uuid4 as 32 lowercase hex digits.
pub fn new_build_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Whether `id` can be a build id: lowercase hex (uuid ids and legacy 10-digit sequence ids
/// both qualify), never the `lock` child that shares the `builds` directory.
pub fn is_build_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Current time as nodepool's `state_time`: float seconds since the epoch.
pub fn now_epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Exponential back-off after `failures` consecutive failures: `initial × 2^(failures-1)`
/// seconds, at most `max`.
pub fn backoff(initial: f64, max: f64, failures: u32) -> std::time::Duration {
    let exp = 2f64.powi(failures.saturating_sub(1).min(30) as i32);
    std::time::Duration::from_secs_f64((initial * exp).min(max).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        use std::time::Duration;
        assert_eq!(backoff(5.0, 600.0, 1), Duration::from_secs(5));
        assert_eq!(backoff(5.0, 600.0, 2), Duration::from_secs(10));
        assert_eq!(backoff(5.0, 600.0, 4), Duration::from_secs(40));
        assert_eq!(backoff(5.0, 600.0, 20), Duration::from_secs(600));
        assert_eq!(backoff(5.0, 600.0, 1000), Duration::from_secs(600));
    }

    #[test]
    fn build_ids_are_uuid_hex_and_legacy_ids_are_accepted() {
        let id = new_build_id();
        assert_eq!(id.len(), 32);
        assert!(is_build_id(&id));
        assert!(is_build_id("0000000001"));
        assert!(!is_build_id("lock"));
        assert!(!is_build_id(""));
        assert!(!is_build_id("ABCDEF"));
    }

    #[test]
    fn states_round_trip() {
        for s in [
            BuildState::Building,
            BuildState::Ready,
            BuildState::Deleting,
            BuildState::Failed,
        ] {
            assert_eq!(BuildState::parse(s.as_str()), Some(s));
        }
        for s in [
            UploadState::Uploading,
            UploadState::Ready,
            UploadState::Deleting,
            UploadState::Failed,
        ] {
            assert_eq!(UploadState::parse(s.as_str()), Some(s));
        }
        assert_eq!(BuildState::parse("paused"), None);
    }
}
