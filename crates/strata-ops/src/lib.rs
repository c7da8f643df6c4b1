//! What every long strata operation shares.
//!
//! The CLI, the containerd snapshotter and the HTTP service drive the same
//! library calls (pull, partial pull, convert, lazy prepare and prefetch,
//! template build/resize/push/pull/serve, gc, fsck, verify). Each such call
//! takes an [`Ctl`]: an [`EventSink`] that receives typed [`Event`]s (the
//! CLI draws bars from them, `--json` prints them as lines, a server keeps
//! them as job status) and a [`Cancel`] token checked at every unit of work.
//! A cancelled call returns an error whose [`ErrorKind`] is
//! [`ErrorKind::Cancelled`] and leaves nothing half-visible in the store.
//!
//! Errors of every strata crate answer [`HasKind::kind`], so a server maps
//! them to HTTP status codes and gRPC codes without parsing text.
//!
//! [`par_map`] is the one bounded worker pool: it stops handing out work at
//! the first error or on cancel.
//!
//! This crate does no I/O.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod cancel;
mod event;
mod kind;
mod par;

pub use cancel::{Cancel, Cancelled};
pub use event::{Collect, Ctl, Event, EventSink, NoEvents, Op, Unit, Warning};
pub use kind::{ErrorKind, HasKind};
pub use par::{default_jobs, par_map};

/// A byte count for people: `512 B`, `1.5 KiB`, `3.2 GiB`.
pub fn human_bytes(n: u64) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_picks_the_unit() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
        assert_eq!(human_bytes(1 << 50), "1024.0 TiB");
    }
}
