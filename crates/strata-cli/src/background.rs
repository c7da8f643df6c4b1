//! The CLI side of daemons (lazy mounts, served templates): start one and
//! show what it reported. The lifecycle and the readiness protocol are
//! `strata_sys::daemon`; a daemon's log is `strata_ops::log`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;
use strata_sys::daemon::{self, Report};

use crate::Ctx;

/// Start this command again as a daemon logging to `log`; show what it
/// reported once ready, or fail with its error.
pub fn started(ctx: &Ctx, what: &str, log: &Path) -> Result<ExitCode> {
    let root = [("STRATA_ROOT", ctx.root.as_os_str())];
    let s = daemon::start_and_wait(what, &["--foreground"], &root, log)?;
    let pid_log = format!(" (daemon pid {}, log {})", s.pid, log.display());
    show(ctx, &s.report, &pid_log);
    Ok(ExitCode::SUCCESS)
}

/// Say a foreground command is ready: to the waiting parent when this is
/// a daemon, else on the terminal.
pub fn ready(ctx: &Ctx, report: &impl serde::Serialize) {
    let report = Report::new(report);
    if !daemon::report_ready(&report) {
        show(ctx, &report, "");
    }
}

/// A daemon could not start: tell the waiting parent, which fails with it.
pub fn failed(e: anyhow::Error) -> anyhow::Error {
    daemon::report_failed(e.as_ref());
    e
}

/// A report's notes on stderr, then it as JSON with --json, else its
/// message and `then` unless --quiet.
fn show(ctx: &Ctx, report: &Report, then: &str) {
    report.notes().for_each(|n| eprintln!("strata: {n}"));
    if ctx.json {
        println!("{}", report.json());
    } else {
        ctx.say(format!("{report}{then}"));
    }
}
