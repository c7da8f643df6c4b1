//! The CLI side of daemons (lazy mounts, served templates): start one and
//! show what it reported, report readiness from one, log its events.
//! The mechanics (re-exec, process group, readiness pipe, stop) are
//! `strata_sys::daemon`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Result, bail};
use strata_ops::{Event, EventSink};
use strata_sys::daemon;

use crate::Ctx;

/// Start this command again as a daemon logging to `log`; print what it
/// reported once ready (a JSON object with `message` and `notes`), or fail
/// with its `error`.
pub fn started(ctx: &Ctx, what: &str, log: &Path) -> Result<ExitCode> {
    let spawned = daemon::spawn_self(
        what,
        &["--foreground"],
        &[("STRATA_ROOT", ctx.root.as_os_str())],
        log,
    )?;
    let v: serde_json::Value = match serde_json::from_str(&spawned.line) {
        Ok(v) => v,
        Err(_) => bail!(
            "the {what} daemon reported {:?}; see {}",
            spawned.line,
            log.display()
        ),
    };
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("{e}");
    }
    print_notes(&v);
    if ctx.json {
        println!("{v}");
    } else if !ctx.quiet {
        println!(
            "{} (daemon pid {}, log {})",
            v["message"].as_str().unwrap_or("started"),
            spawned.pid,
            log.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Say a foreground command is ready: to the waiting parent when this is
/// a daemon, else on the terminal.
pub fn ready(ctx: &Ctx, report: &impl serde::Serialize) {
    let report = serde_json::to_value(report).unwrap_or_default();
    if daemon::is_daemon() {
        daemon::notify(&report.to_string());
        return;
    }
    print_notes(&report);
    if ctx.json {
        println!("{report}");
    } else if !ctx.quiet {
        println!("{}", report["message"].as_str().unwrap_or("started"));
    }
}

/// A daemon could not start: tell the waiting parent, which fails with it.
pub fn failed(e: anyhow::Error) -> anyhow::Error {
    if daemon::is_daemon() {
        daemon::notify(&serde_json::json!({ "error": format!("{e:#}") }).to_string());
    }
    e
}

/// A report's `notes` (warnings for people) on stderr.
fn print_notes(report: &serde_json::Value) {
    let notes = report.get("notes").and_then(|n| n.as_array());
    for n in notes.into_iter().flatten().filter_map(|n| n.as_str()) {
        eprintln!("strata: {n}");
    }
}

/// Log to stderr (a daemon's log file) at `$STRATA_LOG` (default info).
pub fn init_log() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
}

/// A daemon's events: warnings and phase changes to its log.
pub struct LogEvents;

impl EventSink for LogEvents {
    fn event(&self, e: &Event) {
        match e {
            Event::Warning { op, warning } => tracing::warn!("{op:?}: {warning}"),
            Event::Started { op, subject } => tracing::info!("{op:?} of {subject} started"),
            Event::Finished { op } => tracing::info!("{op:?} finished"),
            _ => {}
        }
    }
}
