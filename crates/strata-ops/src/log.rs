//! A daemon's log (a lazy mount's, a served template's, a snapshotter's):
//! tracing to stderr, which the daemon's start points at its log file.

use crate::{Event, EventSink};

/// Log to stderr at `$STRATA_LOG` (default `info`); once per process
/// (later calls do nothing).
pub fn init() {
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
