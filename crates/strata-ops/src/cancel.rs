//! Cancellation: a shared flag checked between units of work.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A cancel token. Clones share one flag; [`Cancel::cancel`] on any clone
/// is seen by all. A token may also carry a deadline, after which it
/// counts as cancelled.
#[derive(Debug, Clone, Default)]
pub struct Cancel {
    flag: Arc<AtomicBool>,
    deadline: Option<Instant>,
}

/// The error of an operation that was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cancelled")]
pub struct Cancelled;

impl Cancel {
    /// A token nobody has cancelled yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A clone of this token that also counts as cancelled once `after`
    /// has passed (the earlier of two deadlines wins).
    pub fn with_timeout(&self, after: Duration) -> Self {
        let d = Instant::now() + after;
        Cancel {
            flag: self.flag.clone(),
            deadline: Some(self.deadline.map_or(d, |old| old.min(d))),
        }
    }

    /// Ask every holder to stop.
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::SeqCst);
    }

    /// Whether the operation should stop.
    pub fn is_cancelled(&self) -> bool {
        self.flag.load(Ordering::Relaxed) || self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// `Err(Cancelled)` once cancelled: `cancel.check()?` between units.
    pub fn check(&self) -> Result<(), Cancelled> {
        if self.is_cancelled() {
            Err(Cancelled)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_the_flag() {
        let a = Cancel::new();
        let b = a.clone();
        assert!(b.check().is_ok());
        a.cancel();
        assert_eq!(b.check(), Err(Cancelled));
    }

    #[test]
    fn a_deadline_cancels() {
        let a = Cancel::new();
        let t = a.with_timeout(Duration::from_millis(0));
        assert!(t.is_cancelled());
        assert!(!a.is_cancelled(), "the parent has no deadline");
        let long = a.with_timeout(Duration::from_secs(3600));
        assert!(!long.is_cancelled());
        a.cancel();
        assert!(long.is_cancelled(), "the flag is shared with the parent");
    }
}
