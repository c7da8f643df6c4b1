//! Terminal rendering of library events: one bar per layer (bytes, rate,
//! ETA) on a terminal, warnings as `strata: warning: ...` lines, and with
//! `--json` every event as a JSON line on stderr (stdout keeps the result).

use std::collections::HashMap;
use std::io::{IsTerminal, Stderr};
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use strata_ops::{Event, EventSink, JsonLines, Unit};

/// How events are shown.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Bars (when stderr is a terminal) and warnings.
    Term,
    /// JSON lines on stderr.
    Json,
    /// Nothing but warnings.
    Quiet,
}

/// Renders events for one command.
pub struct Render {
    mode: Mode,
    multi: Option<MultiProgress>,
    bars: Mutex<HashMap<usize, ProgressBar>>,
    json: JsonLines<Stderr>,
}

impl Render {
    /// A renderer for the global flags.
    pub fn new(quiet: bool, json: bool) -> Self {
        let mode = if json {
            Mode::Json
        } else if quiet {
            Mode::Quiet
        } else {
            Mode::Term
        };
        let bars_on = mode == Mode::Term && std::io::stderr().is_terminal();
        Render {
            mode,
            multi: bars_on.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            bars: Mutex::new(HashMap::new()),
            json: JsonLines::new(std::io::stderr()),
        }
    }

    /// Clear the bars.
    pub fn finish(&self) {
        if let Some(m) = &self.multi {
            let _ = m.clear();
        }
    }

    fn bar(&self, index: usize, total: u64, prefix: String, reused: bool) {
        let Some(m) = &self.multi else { return };
        let bar = m.add(ProgressBar::new(total));
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(prefix);
        if reused {
            bar.set_position(total);
            bar.finish_with_message("already in store");
        }
        self.bars
            .lock()
            .expect("no panics while held")
            .insert(index, bar);
    }
}

impl EventSink for Render {
    fn event(&self, e: &Event) {
        match self.mode {
            Mode::Json => return self.json.event(e),
            Mode::Quiet | Mode::Term => {}
        }
        match e {
            Event::Warning { warning, .. } => {
                if let Some(m) = &self.multi {
                    let _ = m.println(format!("strata: warning: {warning}"));
                } else {
                    eprintln!("strata: warning: {warning}");
                }
            }
            Event::UnitStarted {
                unit: Unit::Layer { index, digest },
                total,
                reused,
                ..
            } => self.bar(*index, total.unwrap_or(0), digest.short(), *reused),
            Event::Progress {
                unit: Unit::Layer { index, .. },
                done,
                ..
            } => {
                if let Some(bar) = self.bars.lock().expect("no panics while held").get(index) {
                    bar.set_position(*done);
                }
            }
            Event::UnitDone {
                unit: Unit::Layer { index, .. },
                ..
            } => {
                if let Some(bar) = self.bars.lock().expect("no panics while held").get(index)
                    && !bar.is_finished()
                {
                    bar.finish_with_message("done");
                }
            }
            _ => {}
        }
    }
}

/// `v` (a JSON object) with the keys of `extra` (an object) added: a
/// library result with what the command knows besides (a name, seconds).
pub fn json_with(v: &impl serde::Serialize, extra: serde_json::Value) -> serde_json::Value {
    let mut v = serde_json::to_value(v).unwrap_or_default();
    if let (Some(o), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
        o.extend(extra);
    }
    v
}
