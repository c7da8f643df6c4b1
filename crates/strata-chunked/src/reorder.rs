//! Place chosen entries first in a layer tar ("prefetch first"), as
//! eStargz does with prioritized files.
//!
//! A lazy mount fetches the files a workload reads at start-up before the
//! rest; with them at the front of the blob that is one plain range
//! request per layer, which also works through CDNs and proxies that
//! refuse multi-range requests. The tar changes (so does its diff_id),
//! but it extracts to the same tree: entries keep their exact bytes and
//! only move ahead of the others, together with what they depend on:
//!
//! - the directory entries of their ancestors, the root's included (an
//!   extractor sees a directory before its contents, with its own mode
//!   and owner);
//! - the target of a hard link (it must precede the link);
//! - an opaque whiteout (`.wh..wh..opq`) in any of those directories
//!   (extractors that act on it when they meet it must meet it before
//!   the directory's new entries, as in the original order).
//!
//! Moved entries keep their relative order, and so do the others. The
//! entry's padding moves with it; the end-of-archive blocks stay last.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};

use crate::ChunkedError;
use crate::gotar::{GoTarReader, Next};
use crate::writer::clean;

/// `name` as [`plan_first`] compares names: without `.`/`..` parts and
/// leading or trailing slashes (`./usr/bin/` is `usr/bin`).
pub fn clean_name(name: &str) -> String {
    clean(name)
}

/// What [`write_first`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placed {
    /// Entries written ahead of the others (the wanted ones and what they
    /// depend on).
    pub moved: usize,
    /// Cleaned names of the moved entries, in order.
    pub names: Vec<String>,
    /// Bytes written (the same as read).
    pub bytes: u64,
}

/// One entry of the scan.
struct Scanned {
    name: String,
    typeflag: u8,
    link: String,
}

fn padding(len: u64) -> usize {
    ((512 - len % 512) % 512) as usize
}

/// The root (`""`), then each parent directory of `name`.
fn ancestors(name: &str) -> impl Iterator<Item = &str> {
    std::iter::once("").chain(
        name.char_indices()
            .filter(|(_, c)| *c == '/')
            .map(move |(i, _)| &name[..i]),
    )
}

fn opaque_marker(dir: &str) -> String {
    if dir.is_empty() {
        ".wh..wh..opq".into()
    } else {
        format!("{dir}/.wh..wh..opq")
    }
}

/// Which entries move, given the scan and the wanted (cleaned) names.
fn plan(entries: &[Scanned], wanted: &HashSet<String>) -> Vec<bool> {
    let by_name: HashMap<&str, usize> = entries
        .iter()
        .enumerate()
        .map(|(i, e)| (e.name.as_str(), i))
        .collect();
    let mut moved = vec![false; entries.len()];
    let mut dirs: HashSet<&str> = HashSet::new();
    let mut todo: Vec<usize> = wanted
        .iter()
        .filter_map(|w| by_name.get(w.as_str()).copied())
        .collect();
    while let Some(i) = todo.pop() {
        if std::mem::replace(&mut moved[i], true) {
            continue;
        }
        let e = &entries[i];
        for a in ancestors(&e.name) {
            if dirs.insert(a) {
                if let Some(&j) = by_name.get(a) {
                    todo.push(j);
                }
                if let Some(&j) = by_name.get(opaque_marker(a).as_str()) {
                    todo.push(j);
                }
            }
        }
        if e.typeflag == b'1'
            && let Some(&j) = by_name.get(e.link.as_str())
        {
            todo.push(j);
        }
    }
    moved
}

/// Which entries of a tar move, from [`plan_first`].
#[derive(Debug, Clone)]
pub struct Plan {
    names: Vec<String>,
    moved: Vec<bool>,
}

impl Plan {
    /// Entries that move.
    pub fn moved(&self) -> usize {
        self.moved.iter().filter(|m| **m).count()
    }
}

/// Plan placing the entries named in `wanted` (cleaned names: no leading
/// `./` or `/`) and what they depend on first in the tar read from `tar`.
/// `None` when nothing would change: no wanted entry in the tar, or they
/// lead already.
///
/// Fails with [`ChunkedError::Unsupported`] where the writer would (a name
/// twice, sparse files, ...).
pub fn plan_first(tar: impl Read, wanted: &HashSet<String>) -> Result<Option<Plan>, ChunkedError> {
    let mut entries: Vec<Scanned> = Vec::new();
    let mut seen = HashSet::new();
    let mut r = GoTarReader::new(tar);
    let mut sink = vec![0u8; 64 * 1024];
    loop {
        match r.next_header()? {
            Next::End { .. } => break,
            Next::Entry { header, .. } => {
                let name = clean(&header.name);
                if !seen.insert(name.clone()) {
                    return Err(ChunkedError::Unsupported(format!(
                        "{} appears twice in the tar",
                        header.name
                    )));
                }
                while r.read_data(&mut sink)? > 0 {}
                entries.push(Scanned {
                    name,
                    typeflag: header.typeflag,
                    link: clean(&header.linkname),
                });
            }
        }
    }
    let moved = plan(&entries, wanted);
    let k = moved.iter().filter(|m| **m).count();
    if k == 0 || moved[..k].iter().all(|m| *m) {
        return Ok(None);
    }
    Ok(Some(Plan {
        names: entries.into_iter().map(|e| e.name).collect(),
        moved,
    }))
}

/// Copy the tar read from `open()` to `out` in the order of `plan`: the
/// moved entries, then the others, then the end of the archive. `open`
/// is called twice and must give the tar the plan was made from each time
/// (else [`ChunkedError::Tar`]).
pub fn write_first<R: Read>(
    open: &mut dyn FnMut() -> Result<R, ChunkedError>,
    plan: &Plan,
    mut out: impl Write,
) -> Result<Placed, ChunkedError> {
    let Plan { names, moved } = plan;
    let k = plan.moved();
    let mut placed = Placed {
        moved: k,
        names: names
            .iter()
            .zip(moved)
            .filter(|(_, m)| **m)
            .map(|(n, _)| n.clone())
            .collect(),
        bytes: 0,
    };
    let mut put = |b: &[u8], n: &mut u64| -> Result<(), ChunkedError> {
        out.write_all(b).map_err(|e| ChunkedError::Io {
            action: "writing the reordered tar".into(),
            source: e,
        })?;
        *n += b.len() as u64;
        Ok(())
    };
    let mut buf = vec![0u8; 256 * 1024];
    let mut read = 0u64;
    for first in [true, false] {
        let mut r = GoTarReader::new(open()?);
        // the entry before: whether this pass writes it, and its padding
        let mut prev: Option<(bool, usize)> = None;
        let mut i = 0usize;
        loop {
            let next = r.next_header()?;
            let raw = match &next {
                Next::Entry { raw, .. } | Next::End { raw, .. } => raw,
            };
            let pad = prev.map_or(0, |(_, p)| p).min(raw.len());
            if let Some((true, _)) = prev {
                put(&raw[..pad], &mut placed.bytes)?;
            }
            match next {
                Next::End { raw, trailing } => {
                    if !first {
                        put(&raw[pad..], &mut placed.bytes)?;
                        put(&trailing, &mut placed.bytes)?;
                        read = r.offset();
                    }
                    break;
                }
                Next::Entry { raw, header } => {
                    if names.get(i) != Some(&clean(&header.name)) {
                        return Err(tar_changed(r.offset()));
                    }
                    let write = moved[i] == first;
                    if write {
                        put(&raw[pad..], &mut placed.bytes)?;
                    }
                    loop {
                        let n = r.read_data(&mut buf)?;
                        if n == 0 {
                            break;
                        }
                        if write {
                            put(&buf[..n], &mut placed.bytes)?;
                        }
                    }
                    prev = Some((write, padding(header.data_len())));
                    i += 1;
                }
            }
        }
        if i != names.len() {
            return Err(tar_changed(r.offset()));
        }
    }
    if placed.bytes != read {
        return Err(tar_changed(read));
    }
    Ok(placed)
}

fn tar_changed(offset: u64) -> ChunkedError {
    ChunkedError::Tar {
        offset,
        reason: "the tar changed between passes".into(),
    }
}
