//! Typed events of long operations.
//!
//! Libraries never print: they hand [`Event`]s to an [`EventSink`]. Counts
//! are cumulative (`done` of `total`), so a sink that drops events (a
//! terminal redrawing at 10 Hz, a job record keeping the last one) still
//! shows the truth.

use std::fmt;
use std::sync::Mutex;

use serde::Serialize;
use strata_digest::Digest;

use crate::Cancel;

/// Which long operation an event belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Pull an image (full or partial) into the store.
    Pull,
    /// Convert an image's layers (zstd:chunked, zstd) and write or push it.
    Convert,
    /// Read TOCs and tar-splits and build a lazy image's tree.
    LazyPrepare,
    /// Background fetching of a lazy mount.
    Prefetch,
    /// Build a VM template from an image.
    TemplateBuild,
    /// Build a VM template from another (resize, add files).
    TemplateResize,
    /// Push a VM template to a registry.
    TemplatePush,
    /// Pull a VM template from a registry.
    TemplatePull,
    /// Serve a VM template as a file.
    TemplateServe,
    /// Sweep what no name reaches.
    Gc,
    /// Check the whole store.
    Fsck,
    /// Rebuild and check one image.
    Verify,
}

/// What a count is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Unit {
    /// A layer of an image, by position (bottom = 0) and blob digest.
    Layer {
        /// Position in the manifest.
        index: usize,
        /// The layer blob's digest.
        digest: Digest,
    },
    /// A chunk of a VM template.
    Chunk {
        /// Chunk number.
        index: u64,
    },
    /// Objects (file contents, chunks) of the store.
    Objects,
    /// Layers of the store.
    Layers,
    /// Images of the store.
    Images,
    /// Files of an image.
    Files,
}

/// Something worth saying that does not stop the operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "warning", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Warning {
    /// A layer that could be fetched piecewise (zstd:chunked) was pulled in
    /// full, or a lazy mount became a full pull.
    FullPull {
        /// Position in the manifest.
        index: usize,
        /// The layer blob's digest.
        digest: Digest,
        /// Why.
        reason: String,
    },
    /// A registry answered a multi-range request with one range at a time
    /// or the whole blob.
    MultiRangeRefused {
        /// The registry.
        host: String,
    },
    /// A conversion wrote a layer as plain zstd (no TOC): it cannot be read
    /// lazily.
    PlainZstd {
        /// Position in the manifest.
        index: usize,
        /// Why.
        reason: String,
    },
    /// The image is stored but its tree cannot become an EROFS image, so it
    /// cannot be mounted (export still works).
    NotMountable {
        /// Why.
        reason: String,
    },
    /// Layers were reordered (files placed first), so their diff_ids changed.
    DiffIdsChanged {
        /// How many layers.
        layers: usize,
    },
    /// A chunk of a served template could not be fetched: the read that
    /// wanted it failed (EIO); a later read tries again.
    ChunkFetchFailed {
        /// Chunk number.
        index: u64,
        /// The chunk's digest.
        digest: Digest,
        /// Why.
        reason: String,
    },
    /// A lazy mount refused a content: it does not match its tar-split
    /// entry (or its TOC entry); reads of it fail (EIO).
    ContentRefused {
        /// The content (as the TOC names it).
        digest: Digest,
        /// Why.
        reason: String,
    },
    /// A lazy mount's contents failed their layer's diff_id: the mount is
    /// inconsistent and every read of it fails (EIO).
    LazyInconsistent {
        /// Why.
        reason: String,
    },
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Warning::FullPull {
                index,
                digest,
                reason,
            } => write!(f, "layer {index} ({digest}) pulled in full: {reason}"),
            Warning::MultiRangeRefused { host } => write!(
                f,
                "{host} does not answer multi-range requests: ranges are fetched one by one"
            ),
            Warning::PlainZstd { index, reason } => {
                write!(
                    f,
                    "layer {index} written as plain zstd (not lazy): {reason}"
                )
            }
            Warning::NotMountable { reason } => write!(f, "the image cannot be mounted: {reason}"),
            Warning::DiffIdsChanged { layers } => write!(
                f,
                "{layers} layers were reordered: their diff_ids (and the config) changed"
            ),
            Warning::ChunkFetchFailed {
                index,
                digest,
                reason,
            } => write!(f, "chunk {index} ({digest}) could not be fetched: {reason}"),
            Warning::ContentRefused { digest, reason } => {
                write!(f, "content {digest} refused (reads fail): {reason}")
            }
            Warning::LazyInconsistent { reason } => {
                write!(f, "the lazy mount is inconsistent (reads fail): {reason}")
            }
        }
    }
}

/// One event of a long operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The operation began; `subject` names what it works on.
    Started {
        /// The operation.
        op: Op,
        /// A reference, image, template or store path.
        subject: String,
    },
    /// An image was resolved: its manifest digest and layer count.
    Resolved {
        /// The operation.
        op: Op,
        /// The manifest's digest.
        manifest_digest: Digest,
        /// Layers in the manifest.
        layers: usize,
    },
    /// Work on a unit began. `reused`: nothing needs doing (already stored).
    UnitStarted {
        /// The operation.
        op: Op,
        /// What.
        unit: Unit,
        /// Bytes (or items) expected, when known.
        total: Option<u64>,
        /// Already in the store: nothing will be fetched.
        reused: bool,
    },
    /// Cumulative progress of a unit.
    Progress {
        /// The operation.
        op: Op,
        /// What.
        unit: Unit,
        /// Bytes (or items) done.
        done: u64,
        /// Bytes (or items) expected, when known.
        total: Option<u64>,
    },
    /// A unit is finished and committed.
    UnitDone {
        /// The operation.
        op: Op,
        /// What.
        unit: Unit,
    },
    /// Something the user should know.
    Warning {
        /// The operation.
        op: Op,
        /// What.
        warning: Warning,
    },
    /// The operation finished (successfully: failures are returned errors).
    Finished {
        /// The operation.
        op: Op,
    },
}

/// Receives events. Called from worker threads: implementations must be
/// cheap and must not block for long.
pub trait EventSink: Send + Sync {
    /// One event.
    fn event(&self, event: &Event);
}

/// A sink that drops everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoEvents;

impl EventSink for NoEvents {
    fn event(&self, _: &Event) {}
}

/// A sink that keeps every event (tests, job records).
#[derive(Debug, Default)]
pub struct Collect(Mutex<Vec<Event>>);

impl Collect {
    /// An empty collector.
    pub fn new() -> Self {
        Self::default()
    }

    /// The events so far.
    pub fn events(&self) -> Vec<Event> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// The warnings so far.
    pub fn warnings(&self) -> Vec<Warning> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Warning { warning, .. } => Some(warning),
                _ => None,
            })
            .collect()
    }
}

impl EventSink for Collect {
    fn event(&self, event: &Event) {
        if let Ok(mut v) = self.0.lock() {
            v.push(event.clone());
        }
    }
}

impl<T: EventSink + ?Sized> EventSink for &T {
    fn event(&self, event: &Event) {
        (**self).event(event)
    }
}

impl<T: EventSink + ?Sized> EventSink for std::sync::Arc<T> {
    fn event(&self, event: &Event) {
        (**self).event(event)
    }
}

/// What a long operation is handed: where its events go and its cancel
/// token.
#[derive(Clone, Copy)]
pub struct Ctl<'a> {
    /// Events.
    pub events: &'a dyn EventSink,
    /// Cancellation.
    pub cancel: &'a Cancel,
}

impl<'a> Ctl<'a> {
    /// Events to `events`, cancelled through `cancel`.
    pub fn new(events: &'a dyn EventSink, cancel: &'a Cancel) -> Self {
        Ctl { events, cancel }
    }

    /// No events, never cancelled (tests, simple callers).
    pub fn none() -> Ctl<'static> {
        static NEVER: std::sync::OnceLock<Cancel> = std::sync::OnceLock::new();
        Ctl {
            events: &NoEvents,
            cancel: NEVER.get_or_init(Cancel::new),
        }
    }

    /// Send one event.
    pub fn emit(&self, event: Event) {
        self.events.event(&event);
    }

    /// Send a warning of `op`.
    pub fn warn(&self, op: Op, warning: Warning) {
        self.events.event(&Event::Warning { op, warning });
    }
}

impl fmt::Debug for Ctl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ctl")
            .field("cancelled", &self.cancel.is_cancelled())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialize_as_tagged_json_lines() {
        let d = Digest::sha256_of(b"x");
        let e = Event::Progress {
            op: Op::Pull,
            unit: Unit::Layer {
                index: 2,
                digest: d,
            },
            done: 10,
            total: Some(20),
        };
        let v: serde_json::Value = serde_json::to_value(&e).expect("serializable");
        assert_eq!(v["event"], "progress");
        assert_eq!(v["op"], "pull");
        assert_eq!(v["unit"]["kind"], "layer");
        assert_eq!(v["unit"]["index"], 2);
        assert_eq!(v["unit"]["digest"], d.to_string());
        assert_eq!(v["done"], 10);
        let w = Event::Warning {
            op: Op::Pull,
            warning: Warning::MultiRangeRefused {
                host: "h:5000".into(),
            },
        };
        let v = serde_json::to_value(&w).expect("serializable");
        assert_eq!(v["warning"]["warning"], "multi_range_refused");
        assert_eq!(v["warning"]["host"], "h:5000");
    }

    #[test]
    fn collect_keeps_warnings() {
        let c = Collect::new();
        let cancel = Cancel::new();
        let ctl = Ctl::new(&c, &cancel);
        ctl.emit(Event::Finished { op: Op::Gc });
        ctl.warn(Op::Gc, Warning::NotMountable { reason: "r".into() });
        assert_eq!(c.events().len(), 2);
        assert_eq!(
            c.warnings(),
            vec![Warning::NotMountable { reason: "r".into() }]
        );
    }
}
