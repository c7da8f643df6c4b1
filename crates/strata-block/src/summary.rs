//! Results in words: what a build, a commit, a push or a pull did, one
//! line each, the same for every front end (the names people gave are the
//! front end's to add).

use std::fmt;

use strata_ops::human_bytes as human;

use crate::Built;
use crate::artifact::{PullReport, PushReport};
use crate::served::Committed;

/// `ID (SIZE) was cached: build key K`, or `ID (SIZE) in S s: chunks`.
impl fmt::Display for Built {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.id, human(self.size))?;
        if self.cached {
            return write!(f, " was cached: build key {}", self.key.short());
        }
        write!(
            f,
            " in {:.2} s: {} chunks, {} new ({})",
            self.seconds,
            self.stats.chunks,
            self.stats.new_chunks,
            human(self.stats.new_bytes)
        )
    }
}

/// `ID: N chunks written, M new (BYTES), parent P`.
impl fmt::Display for Committed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} chunks written, {} new ({}), parent {}",
            self.id,
            self.written_chunks,
            self.new_chunks,
            human(self.new_bytes),
            self.parent
        )
    }
}

/// `MANIFEST: U of N chunks uploaded (BYTES), SKIPPED already there`.
impl fmt::Display for PushReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} of {} chunks uploaded ({} in {} of {} packs), {} already there",
            self.manifest_digest,
            self.uploaded,
            self.chunks,
            human(self.bytes_uploaded),
            self.packs_uploaded,
            self.packs,
            human(self.bytes_skipped)
        )?;
        if let Some(b) = &self.base {
            write!(f, "; {} packs of {b} reused", self.packs_reused)?;
            if self.packs_mounted > 0 {
                write!(f, " ({} mounted from its repository)", self.packs_mounted)?;
            }
        }
        Ok(())
    }
}

/// `ID: N chunks, L local, F fetched (BYTES)`, and where the rest come from.
impl fmt::Display for PullReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} chunks, {} local, {} fetched ({})",
            self.id,
            self.chunks,
            self.chunks_local,
            self.fetched,
            human(self.bytes_fetched)
        )?;
        if self.packs_fetched > 0 {
            write!(f, " from {} of {} packs", self.packs_fetched, self.packs)?;
        }
        if self.chunks_local + self.fetched < self.chunks {
            write!(f, "; the rest come on demand (`strata rootfs serve`)")?;
        }
        Ok(())
    }
}

/// `serving NAME (ID, SIZE) at FILE MODE (M of N chunks to fetch from R)`.
impl fmt::Display for crate::serve::ServeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "serving {} ({}, {}) at {} {} ({} of {} chunks to fetch",
            self.name,
            self.template,
            human(self.size),
            self.file.display(),
            if self.writable {
                "read-write (writes kept in an overlay: `strata rootfs commit`)"
            } else {
                "read-only"
            },
            self.chunks_missing,
            self.chunks_total,
        )?;
        if let Some(r) = &self.remote {
            write!(f, " from {r}")?;
        }
        write!(f, ")")
    }
}
