//! Leases: what is in use, recorded in the store.
//!
//! A long-lived user of the store (a lazy mount's daemon, a served
//! template, soon a containerd snapshot or a service job) takes a [`Lease`]
//! naming the images, templates and objects it needs. gc keeps everything
//! a live lease names, whichever process runs gc. Between its operations
//! such a holder has no lock on the store (see `work.rs`): the lease is
//! what keeps its contents. It is written under a [`crate::Work`] and gc
//! reads leases under the exclusive lock, so a lease either existed when a
//! gc marked or was taken after that gc swept. A lease is a file
//! `leases/<pid>-<n>.json` written by rename before the holder relies on
//! it and removed when the [`Lease`] is dropped; a lease whose process is
//! gone (checked by pid and the process's start time, so a reused pid does
//! not keep it alive) is stale: gc ignores it and removes it.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use strata_digest::Digest;

use crate::{Result, StoreError, io_err, sync_dir};

static LEASE_SEQ: AtomicU64 = AtomicU64::new(0);

/// What a lease keeps.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct LeaseRoots {
    /// Images (and through them their layers and objects).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<Digest>,
    /// Templates (and their chunks).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub templates: Vec<Digest>,
    /// Objects by themselves (contents a lazy mount fetches before any
    /// image names them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub objects: Vec<Digest>,
}

/// A lease on record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// The holder's pid.
    pub pid: u32,
    /// The holder's start time (clock ticks since boot, /proc/PID/stat).
    pub start_time: u64,
    /// What holds it, for people: `lazy mount /mnt/x`.
    pub holder: String,
    /// What it keeps.
    pub roots: LeaseRoots,
    /// A mount point whose mount reads what the lease keeps: the lease
    /// stays live while it is mounted, even when its process is gone (a
    /// lazy mount whose daemon was killed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mount: Option<PathBuf>,
}

impl LeaseRecord {
    /// Whether the process that took it still runs.
    pub fn holder_runs(&self) -> bool {
        process_start_time(self.pid) == Some(self.start_time)
    }

    /// Whether it keeps its roots: its process runs or its mount point is
    /// among `mounted`.
    pub fn is_live(&self, mounted: &[PathBuf]) -> bool {
        self.holder_runs() || self.mount.as_ref().is_some_and(|m| mounted.contains(m))
    }
}

/// A lease held by this process; dropping it ends it.
#[derive(Debug)]
pub struct Lease {
    path: PathBuf,
}

impl Lease {
    /// The lease's file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// The start time of `pid` (field 22 of /proc/PID/stat), `None` when it
/// does not run (zombies do not count).
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) S ppid ...": fields after the last ')'
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // state is field 3; starttime is field 22
    fields.nth(18)?.parse().ok()
}

pub(crate) fn take(
    root: &Path,
    holder: &str,
    roots: LeaseRoots,
    mount: Option<PathBuf>,
) -> Result<Lease> {
    let dir = root.join("leases");
    fs::create_dir_all(&dir).map_err(io_err("creating leases dir", &dir))?;
    let pid = std::process::id();
    let record = LeaseRecord {
        pid,
        start_time: process_start_time(pid).unwrap_or(0),
        holder: holder.to_string(),
        roots,
        mount,
    };
    let name = format!("{pid}-{}", LEASE_SEQ.fetch_add(1, Ordering::Relaxed));
    let path = dir.join(format!("{name}.json"));
    let tmp = dir.join(format!("{name}.tmp"));
    let bytes = serde_json::to_vec(&record).map_err(|e| StoreError::Corrupt {
        what: "lease",
        path: path.clone(),
        reason: e.to_string(),
    })?;
    crate::write_durable(&tmp, &bytes)?;
    fs::rename(&tmp, &path).map_err(io_err("committing lease", &path))?;
    sync_dir(&dir)?;
    Ok(Lease { path })
}

/// Every lease on record, live or stale. A lease file that cannot be read
/// is an error: gc must not guess what is in use.
pub(crate) fn all(root: &Path) -> Result<Vec<(PathBuf, LeaseRecord)>> {
    let dir = root.join("leases");
    let rd = match fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("reading leases", &dir)(e)),
    };
    let mut out = Vec::new();
    for e in rd {
        let e = e.map_err(io_err("reading leases", &dir))?;
        let p = e.path();
        if p.extension().is_some_and(|x| x == "tmp") {
            // an unfinished lease: its taker has not relied on it yet
            continue;
        }
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            // ended while we listed
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("reading lease", &p)(e)),
        };
        let r: LeaseRecord = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
            what: "lease",
            path: p.clone(),
            reason: e.to_string(),
        })?;
        out.push((p, r));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_live_and_a_reused_pid_is_not() {
        let me = std::process::id();
        let t = process_start_time(me).expect("this process runs");
        let r = LeaseRecord {
            pid: me,
            start_time: t,
            holder: "test".into(),
            roots: LeaseRoots::default(),
            mount: None,
        };
        assert!(r.is_live(&[]));
        let reused = LeaseRecord {
            start_time: t + 1,
            ..r.clone()
        };
        assert!(!reused.is_live(&[]), "same pid, other start time");
        let mounted = LeaseRecord {
            mount: Some("/mnt/x".into()),
            ..reused.clone()
        };
        assert!(mounted.is_live(&["/mnt/x".into()]), "its mount is there");
        assert!(!mounted.is_live(&["/mnt/y".into()]));
        let mut c = std::process::Command::new("true")
            .spawn()
            .expect("true runs");
        let pid = c.id();
        c.wait().expect("reaped");
        assert_eq!(process_start_time(pid), None);
    }
}
