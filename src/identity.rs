//! Who this builder is: its `builder_id.txt`, host name and fully qualified host name.
//!
//! nodepool keeps a random UUID in `<images-dir>/builder_id.txt` (written without a trailing
//! newline, read back verbatim) and records `socket.getfqdn()` as a build's `builder`.

use std::ffi::CStr;
use std::io;
use std::path::Path;

use crate::local;

/// Reads `<images_dir>/builder_id.txt`, creating it with a new UUID4 (canonical dashed form,
/// no newline) when absent. The images directory must already exist, as upstream requires.
pub fn builder_id(images_dir: &Path) -> io::Result<String> {
    let path = local::builder_id_file(images_dir);
    match std::fs::read_to_string(&path) {
        Ok(id) => Ok(id),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let id = uuid::Uuid::new_v4().hyphenated().to_string();
            std::fs::write(&path, &id).map_err(|e| {
                io::Error::new(e.kind(), format!("writing {}: {e}", path.display()))
            })?;
            Ok(id)
        }
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("reading {}: {e}", path.display()),
        )),
    }
}

/// The short host name (`socket.gethostname()`).
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// The fully qualified host name, like Python's `socket.getfqdn()`: the canonical name the
/// resolver gives for the host name, or the host name itself.
pub fn fqdn() -> String {
    let host = hostname();
    let Ok(c_host) = std::ffi::CString::new(host.clone()) else {
        return host;
    };
    // SAFETY: getaddrinfo with a valid C string and zeroed hints; the result list is freed below.
    unsafe {
        let mut hints: libc::addrinfo = std::mem::zeroed();
        hints.ai_flags = libc::AI_CANONNAME;
        hints.ai_family = libc::AF_UNSPEC;
        let mut res: *mut libc::addrinfo = std::ptr::null_mut();
        if libc::getaddrinfo(c_host.as_ptr(), std::ptr::null(), &hints, &mut res) != 0
            || res.is_null()
        {
            return host;
        }
        let name = if (*res).ai_canonname.is_null() {
            host
        } else {
            CStr::from_ptr((*res).ai_canonname)
                .to_string_lossy()
                .into_owned()
        };
        libc::freeaddrinfo(res);
        name
    }
}

/// The version string we register: our version plus the git revision when known.
pub fn version() -> String {
    match option_env!("NODEPOOL_BUILDER_GIT_REV") {
        Some(rev) if !rev.is_empty() => format!("{} {rev}", env!("CARGO_PKG_VERSION")),
        _ => env!("CARGO_PKG_VERSION").to_string(),
    }
}
