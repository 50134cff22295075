//! A small tmpfs mounted by a test, for a file system that really fills up (`ENOSPC`).
//!
//! Mounting needs root (the tests run as root locally and in CI); without it the fixture
//! fails with a message saying so, never skips. The mount is made before the builder starts,
//! so the builder sees it. Dropping the value unmounts it (lazily, should something still
//! hold a file open).

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `mib` MiB on the existing, empty directory `dir`.
    pub fn mount(dir: &Path, mib: u64) -> Tmpfs {
        assert!(
            nix::unistd::geteuid().is_root(),
            "mounting a tmpfs on {} needs root; run the disk tests as root (CI does)",
            dir.display()
        );
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0755"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount: {e}"));
        assert!(
            out.status.success(),
            "mount -t tmpfs on {} failed ({}): {}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs {
            dir: dir.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Free bytes on the file system.
    pub fn free(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(&self.dir).expect("statvfs of the tmpfs");
        st.blocks_available() as u64 * st.fragment_size() as u64
    }

    /// Writes a file of `bytes` zero bytes (tmpfs allocates them: no holes).
    pub fn fill(&self, name: &str, bytes: u64) -> PathBuf {
        let path = self.dir.join(name);
        std::fs::write(&path, vec![0u8; bytes as usize])
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).output();
    }
}
