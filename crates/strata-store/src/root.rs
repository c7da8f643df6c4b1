//! Where the store is when nobody says.

use std::path::PathBuf;

/// The default store directory: `/var/lib/strata` for root, else
/// `$XDG_DATA_HOME/strata` or `~/.local/share/strata`.
pub fn default_root() -> PathBuf {
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/var/lib/strata");
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(d).join("strata");
    }
    if let Some(h) = std::env::var_os("HOME") {
        return PathBuf::from(h).join(".local/share/strata");
    }
    PathBuf::from("/var/lib/strata")
}
