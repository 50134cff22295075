//! Permissions of the files that hold secrets: the secure file (`-s`), and the files each
//! provider's driver says it reads secrets from (`provider::secret_files`: for OpenStack the
//! `secure.yaml` and a `clouds.yaml` with a password, secret or token in it, found as the
//! driver finds them).
//!
//! nodepool checks nothing here. To stay a drop-in replacement we do not refuse files that
//! others can read (deployments often use `0640 root:nodepool`); we warn once per file,
//! naming it and its mode. A secret file that everyone may *write* is refused: whoever can
//! change it controls the credentials (and, for the secure file, the ZooKeeper servers) the
//! daemon uses. `check-config` reports the same.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::provider;

/// A secret file that others may read or write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub path: PathBuf,
    /// The permission bits (`mode & 0o7777`).
    pub mode: u32,
}

impl Finding {
    /// Everyone may write it: the daemon refuses to start.
    pub fn is_fatal(&self) -> bool {
        self.mode & 0o002 != 0
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_fatal() {
            return write!(
                f,
                "secret file {} is writable by everyone (mode {:04o}); refusing to use it (chmod o-w, better 600)",
                self.path.display(),
                self.mode
            );
        }
        let who = match (self.mode & 0o040 != 0, self.mode & 0o004 != 0) {
            (true, true) => "its group and everyone",
            (false, true) => "everyone",
            _ => "its group",
        };
        write!(
            f,
            "secret file {} is readable by {who} (mode {:04o}); it should be readable by its owner only (chmod 600)",
            self.path.display(),
            self.mode
        )
    }
}

/// The secret files of this configuration that others may read or write, each once.
pub fn check(cfg: &Config, secure: Option<&Path>) -> Vec<Finding> {
    let mut files: Vec<PathBuf> = secure.map(Path::to_path_buf).into_iter().collect();
    for p in &cfg.providers {
        for file in provider::secret_files(p) {
            if !files.contains(&file) {
                files.push(file);
            }
        }
    }
    let mut findings: Vec<Finding> = Vec::new();
    for path in files {
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o046 != 0 && !findings.iter().any(|f| f.path == path) {
            findings.push(Finding { path, mode });
        }
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_are_described_by_who_may_do_what() {
        let f = |mode| Finding {
            path: "/etc/nodepool/secure.conf".into(),
            mode,
        };
        assert!(
            f(0o644)
                .to_string()
                .contains("readable by its group and everyone (mode 0644)")
        );
        assert!(
            f(0o604)
                .to_string()
                .contains("readable by everyone (mode 0604)")
        );
        assert!(
            f(0o640)
                .to_string()
                .contains("readable by its group (mode 0640)")
        );
        assert!(f(0o666).is_fatal() && f(0o666).to_string().contains("writable by everyone"));
        assert!(!f(0o664).is_fatal());
    }
}
