//! Terminal rendering of pull progress: one bar per layer (bytes, rate, ETA).

use std::io::IsTerminal;
use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use strata_digest::Digest;
use strata_oci::Descriptor;
use strata_oci::pull::Progress;

/// Renders progress bars when stderr is a terminal and output is wanted.
pub struct TermProgress {
    multi: Option<MultiProgress>,
    bars: Mutex<Vec<Option<ProgressBar>>>,
}

impl TermProgress {
    pub fn new(wanted: bool) -> Self {
        let on = wanted && std::io::stderr().is_terminal();
        TermProgress {
            multi: on.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            bars: Mutex::new(Vec::new()),
        }
    }

    pub fn finish(&self) {
        if let Some(m) = &self.multi {
            let _ = m.clear();
        }
    }
}

impl Progress for TermProgress {
    fn resolved(&self, _manifest_digest: &Digest, layers: usize) {
        if let Ok(mut b) = self.bars.lock() {
            b.resize(layers, None);
        }
    }

    fn layer_start(&self, index: usize, desc: &Descriptor, reused: bool) {
        let Some(m) = &self.multi else { return };
        let bar = m.add(ProgressBar::new(desc.size));
        let style = ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(desc.digest.short());
        if reused {
            bar.set_position(desc.size);
            bar.finish_with_message("already in store");
        }
        if let Ok(mut b) = self.bars.lock()
            && index < b.len()
        {
            b[index] = Some(bar);
        }
    }

    fn layer_bytes(&self, index: usize, n: u64) {
        if let Ok(b) = self.bars.lock()
            && let Some(Some(bar)) = b.get(index)
        {
            bar.inc(n);
        }
    }

    fn layer_done(&self, index: usize) {
        if let Ok(b) = self.bars.lock()
            && let Some(Some(bar)) = b.get(index)
            && !bar.is_finished()
        {
            bar.finish_with_message("done");
        }
    }
}
