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
//! This crate does no I/O of its own: [`JsonLines`] writes events to the
//! writer it is given; [`log`] (feature `log`) is a daemon's log and the
//! event sink that writes to it.
//!
//! # The async boundary (decided)
//!
//! The daemons (a containerd snapshotter on tonic, a conversion service on
//! axum) are tokio programs at their edges; the core stays **blocking** and
//! is called from them through `tokio::task::spawn_blocking` (or a bounded
//! pool of their own), with every call taking a [`Ctl`] and registry
//! options that share one connection-reusing HTTP client
//! (`strata_oci::RegistryOptions::client`). Why:
//! - the core's work is CPU and file-system bound (SHA-256 at 1.6 GB/s,
//!   zstd/gzip, tar parsing, fsync'd commits, mke2fs): async buys nothing
//!   there and a blocking pool keeps it off the reactor;
//! - the FUSE servers of lazy mounts and served templates are thread-based
//!   (fuser) and must outlive the manager anyway (a process each);
//! - cancellation is a token checked between units, which works the same
//!   from a terminal's Ctrl-C, a gRPC deadline or an HTTP client going away;
//! - the one place where async would pay, many concurrent registry reads,
//!   is served by the shared client's pool: 50 concurrent 64 KiB range reads
//!   take 2.2x less time through one shared client than with a client per
//!   request on loopback (BENCHMARKS.md, "Shared registry client"), before
//!   any TLS handshake is counted.
//!
//! # What a daemon calls
//!
//! | operation | call |
//! | --- | --- |
//! | pull (full or partial) | `strata_oci::pull::pull_from(store, source, name, opts, ctl)` |
//! | convert | `strata_oci::convert::convert(store, image, dest, opts, ctl)` / `convert_to_layout` |
//! | lazy mount | `strata_lazy::mount(store, source, name, target, opts, events)` -> `LazyMount` (`status`, `wait`, `unmount`); after a restart `strata_lazy::attach` / `list`; cleanup `strata_lazy::cleanup` |
//! | lazy mount served by this process | `strata_lazy::daemon::start(root, DaemonRequest)` -> `Serving` (`report`, `wait`) |
//! | template served by this process | `strata_block::served_daemon::prepare()`, then `served_daemon::start(store, request, events, cancel)` -> (`ServedTemplate`, `ServeReport`) |
//! | daemon lifecycle | `strata_sys::daemon::start_and_wait(what, extra, env, log)` -> `Started` (pid, log, `Report`) or `DaemonError::Failed`; in the daemon `report_ready(&Report)` / `report_failed(&err)`; stop `daemon::stop`; log `strata_ops::log::{init, LogEvents}` (feature `log`) |
//! | an image in the store, else pulled | `strata_oci::store_or_pull::image_or_pull(store, text, opts, ctl)` |
//! | events as JSON lines | `JsonLines::new(writer)` |
//! | template build | `strata_block::build(store, request, ctl)` |
//! | template serve / commit | `strata_block::served::serve_with(store, request, events, cancel)` -> `ServedTemplate` (cancel unmounts); `served::commit(store, file, name)`; `served::list` / `cleanup` |
//! | template push / pull | `strata_block::artifact::push(store, id, ref, opts, jobs, ctl)` / `pull(store, ref, opts, all, jobs, ctl)` |
//! | gc | `Store::open_for_gc(root)?.gc(dry_run, ctl)` (only an `ExclusiveStore` can; waits for running operations, not for idle handles) |
//! | several writes as one operation for gc | `let _work = store.work()?;` (the calls above take it themselves; a daemon opens its store with `Store::open` and never holds one between operations) |
//! | fsck | `Store::fsck(ctl)` |
//! | verify | `Store::verify_image(digest, ctl)` |
//! | in use | `Store::lease(holder, roots)` / `lease_for_mount`: kept by gc while live |
//! | credentials per request | `RegistryOptions::with_credentials(Arc<StaticCredentials>)` |
//! | error -> status | `HasKind::kind(&err).http_status()` / `.grpc_code()` |

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod cancel;
mod event;
mod json_lines;
mod kind;
#[cfg(feature = "log")]
pub mod log;
mod par;

pub use cancel::{Cancel, Cancelled};
pub use event::{Collect, Ctl, Event, EventSink, NoEvents, Op, Unit, Warning};
pub use json_lines::JsonLines;
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
