//! One module per subcommand.

pub mod completions;
pub mod convert;
pub mod export;
pub mod fsck;
pub mod gc;
pub mod images;
pub mod inspect;
pub mod lazy;
pub mod mount;
pub mod pull;
pub mod rm;
pub mod rootfs;
pub mod rootfs_artifact;
pub mod rootfs_serve;
pub mod tag;
pub mod verify;

/// Human-readable byte count.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
