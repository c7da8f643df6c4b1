//! A template served by the process that serves it (`strata rootfs
//! serve`'s daemon or its `--foreground` run): malloc for a long-lived
//! process, a log on stderr, [`served::serve_with`], and the report a
//! waiting parent gets.

use std::sync::Arc;
use std::time::Instant;

use strata_ops::{Cancel, EventSink};
use strata_store::Store;

use crate::BlockError;
use crate::served::{self, ServeRequest, ServedTemplate};

/// What a served template reports once ready.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ServeReport {
    /// One line for people: what is served, how, how fast it was ready.
    pub message: String,
    /// The template's id.
    pub template: String,
}

/// Tune malloc for a daemon (before any thread starts) and log to stderr.
pub fn prepare() {
    strata_sys::malloc::tune_for_daemon();
    strata_ops::log::init();
}

/// Serve `req` (see [`served::serve_with`]; call [`prepare`] first) and
/// say how it went.
pub fn start(
    store: Arc<Store>,
    req: &ServeRequest,
    events: Arc<dyn EventSink>,
    cancel: Cancel,
) -> Result<(ServedTemplate, ServeReport), BlockError> {
    let started = Instant::now();
    let s = served::serve_with(store, req, events, cancel)?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let message = format!("{}, ready in {ms:.0} ms", s.status());
    tracing::info!("{message}");
    let template = req.template.to_string();
    Ok((s, ServeReport { message, template }))
}
