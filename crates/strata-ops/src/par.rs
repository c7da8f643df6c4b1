//! The one bounded worker pool.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{Cancel, Cancelled};

/// Worker threads for CPU-bound work: the machine's parallelism, at most
/// `max` (at least 1).
pub fn default_jobs(max: usize) -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(max)
        .max(1)
}

/// `f` over `items` on at most `jobs` scoped threads, results in item
/// order. The first error stops handing out items (items already running
/// finish) and is returned; so is [`Cancelled`] once `cancel` fires. With
/// one job or one item, runs on the calling thread.
pub fn par_map<T, R, E, F>(items: &[T], jobs: usize, cancel: &Cancel, f: F) -> Result<Vec<R>, E>
where
    T: Sync,
    R: Send,
    E: Send + From<Cancelled>,
    F: Fn(usize, &T) -> Result<R, E> + Sync,
{
    let jobs = jobs.clamp(1, items.len().max(1));
    if jobs == 1 {
        let mut out = Vec::with_capacity(items.len());
        for (i, t) in items.iter().enumerate() {
            cancel.check()?;
            out.push(f(i, t)?);
        }
        return Ok(out);
    }
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<(usize, E)>> = Mutex::new(None);
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| {
                loop {
                    if failed.lock().map(|f| f.is_some()).unwrap_or(true) {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= items.len() {
                        return;
                    }
                    let r = match cancel.check() {
                        Ok(()) => f(i, &items[i]),
                        Err(c) => Err(E::from(c)),
                    };
                    match r {
                        Ok(r) => {
                            if let Ok(mut v) = results.lock() {
                                v[i] = Some(r);
                            }
                        }
                        Err(e) => {
                            if let Ok(mut f) = failed.lock() {
                                // the lowest failing item wins: the same
                                // input gives the same error
                                if f.as_ref().is_none_or(|(j, _)| i < *j) {
                                    *f = Some((i, e));
                                }
                            }
                            return;
                        }
                    }
                }
            });
        }
    });
    if let Some((_, e)) = failed.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    Ok(results
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .map(|r| r.expect("every item ran: no error was recorded"))
        .collect())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::*;

    #[derive(Debug, PartialEq)]
    enum E {
        Bad(usize),
        Cancelled,
    }
    impl From<Cancelled> for E {
        fn from(_: Cancelled) -> E {
            E::Cancelled
        }
    }

    #[test]
    fn keeps_order_and_bounds_threads() {
        let running = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        let items: Vec<usize> = (0..64).collect();
        let out = par_map(&items, 3, &Cancel::new(), |_, &x| {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(1));
            running.fetch_sub(1, Ordering::SeqCst);
            Ok::<_, E>(x * 2)
        })
        .expect("no errors");
        assert_eq!(out, items.iter().map(|x| x * 2).collect::<Vec<_>>());
        assert!(peak.load(Ordering::SeqCst) <= 3);
        assert!(peak.load(Ordering::SeqCst) >= 2, "ran in parallel");
    }

    #[test]
    fn first_error_stops_the_rest() {
        let ran = AtomicUsize::new(0);
        let items: Vec<usize> = (0..1000).collect();
        let r = par_map(&items, 2, &Cancel::new(), |_, &x| {
            ran.fetch_add(1, Ordering::SeqCst);
            if x == 5 { Err(E::Bad(x)) } else { Ok(x) }
        });
        assert_eq!(r, Err(E::Bad(5)));
        assert!(ran.load(Ordering::SeqCst) < 100, "stopped handing out work");
    }

    #[test]
    fn cancel_stops_with_cancelled() {
        let cancel = Cancel::new();
        let items: Vec<usize> = (0..1000).collect();
        let ran = AtomicUsize::new(0);
        let r = par_map(&items, 2, &cancel, |_, &x| {
            if ran.fetch_add(1, Ordering::SeqCst) == 10 {
                cancel.cancel();
            }
            Ok::<_, E>(x)
        });
        assert_eq!(r, Err(E::Cancelled));
        assert!(ran.load(Ordering::SeqCst) < 100);
        // one job: the same on the calling thread
        let r = par_map(&items, 1, &cancel, |_, &x| Ok::<_, E>(x));
        assert_eq!(r, Err(E::Cancelled));
    }
}
