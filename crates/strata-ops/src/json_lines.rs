//! Events as JSON lines (`strata --json` on stderr, a server's progress
//! stream): every event, with a warning's text as `message`, and progress
//! at most 5 times a second per unit (its last step always).

use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::{Event, EventSink};

/// Least time between two progress lines of one unit.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// A sink writing each event as one JSON line to `W`.
pub struct JsonLines<W> {
    out: Mutex<W>,
    /// When each unit's last progress line was written.
    last: Mutex<HashMap<String, Instant>>,
}

impl<W: Write + Send> JsonLines<W> {
    /// Lines to `out`.
    pub fn new(out: W) -> Self {
        JsonLines {
            out: Mutex::new(out),
            last: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `e` is to be written (progress is thinned out).
    fn due(&self, e: &Event) -> bool {
        let Event::Progress {
            unit, done, total, ..
        } = e
        else {
            return true;
        };
        let key = serde_json::to_string(unit).unwrap_or_default();
        let mut last = self.last.lock().expect("no panics while held");
        let now = Instant::now();
        let due = last
            .get(&key)
            .is_none_or(|t| now.duration_since(*t) >= PROGRESS_EVERY);
        if due || Some(*done) == *total {
            last.insert(key, now);
            return true;
        }
        false
    }
}

impl<W: Write + Send> EventSink for JsonLines<W> {
    fn event(&self, e: &Event) {
        if !self.due(e) {
            return;
        }
        let mut v = serde_json::to_value(e).unwrap_or_default();
        if let Event::Warning { warning, .. } = e {
            v["message"] = serde_json::json!(warning.to_string());
        }
        let mut out = self.out.lock().expect("no panics while held");
        let _ = writeln!(out, "{v}");
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Op, Unit, Warning};

    #[test]
    fn progress_is_thinned_out_but_not_its_last_step() {
        let sink = JsonLines::new(Vec::new());
        let unit = Unit::Chunk { index: 0 };
        for done in 1..=10 {
            let total = Some(10);
            let (op, unit) = (Op::Pull, unit.clone());
            sink.event(&Event::Progress {
                op,
                unit,
                done,
                total,
            });
        }
        let warning = Warning::NotMountable { reason: "r".into() };
        sink.event(&Event::Warning {
            op: Op::Pull,
            warning,
        });
        let out = String::from_utf8(sink.out.into_inner().unwrap()).unwrap();
        let lines: Vec<serde_json::Value> = out
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert_eq!(lines[1]["done"], 10);
        assert!(
            lines[2]["message"]
                .as_str()
                .unwrap()
                .contains("cannot be mounted")
        );
    }
}
