//! Partial pulls of zstd:chunked layers: fetch only the files the store
//! lacks.
//!
//! 1. The TOC and tar-split are fetched by range (located by the layer's
//!    annotations, which the manifest digest covers) and verified: the TOC
//!    against the annotation's checksum, the tar-split against the TOC's
//!    `tarSplitDigest`.
//! 2. Every regular file the tar-split names must be in the TOC with the
//!    same size (c/storage's lesson of 2024: a TOC that disagrees with the
//!    tar could show TOC readers other files than tar readers see).
//! 3. Files whose SHA-256 the store has are read from objects/; the others'
//!    frames are fetched by range (near ranges merged), decompressed and
//!    checked against their digests.
//! 4. The tar is rebuilt from the tar-split and the contents, imported like
//!    any layer (objects re-hashed), and its SHA-256 must be the config's
//!    diff_id before the layer is committed. Anything else commits nothing.
//!
//! When partial pulling cannot help (old layout without tar-split, most of
//! the layer missing, a registry without ranges) the caller pulls in full
//! and the reason is reported.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};
use strata_chunked::reader::{self, Layout};
use strata_digest::Digest;
use strata_store::Store;

use crate::{Descriptor, ImageSource, OciError};

/// Ranges closer than this are fetched as one.
const MERGE_GAP: u64 = 64 * 1024;

/// Why a layer is pulled in full after all.
pub(crate) struct Fallback(pub String);

/// A verified plan: what to read from where.
pub(crate) struct Fetched {
    /// The rebuilt layer tar, streamed by a thread.
    pub tar: Vec<TarPiece>,
    /// Contents fetched, by digest.
    pub fetched: HashMap<Digest, Vec<u8>>,
    /// Bytes downloaded (metadata + ranges).
    pub downloaded: u64,
    /// Files fetched / taken from the store.
    pub files_fetched: usize,
    /// Files taken from the store.
    pub files_local: usize,
}

/// One piece of the rebuilt tar.
pub(crate) enum TarPiece {
    Raw(Vec<u8>),
    File { digest: Digest, size: u64 },
}

fn bad(desc: &Descriptor, reason: impl Into<String>) -> OciError {
    OciError::Format {
        what: format!("zstd:chunked layer {}", desc.digest),
        reason: reason.into(),
    }
}

fn chunked(desc: &Descriptor) -> impl Fn(strata_chunked::ChunkedError) -> OciError + '_ {
    move |e| bad(desc, e.to_string())
}

/// Plan and fetch. `Ok(Err(fallback))`: pull in full instead.
pub(crate) fn fetch(
    store: &Store,
    source: &dyn ImageSource,
    desc: &Descriptor,
    counter: &AtomicU64,
) -> Result<Result<Fetched, Fallback>, OciError> {
    let Some(loc) = reader::locate(&desc.annotations) else {
        return Ok(Err(Fallback("not zstd:chunked".into())));
    };
    let loc = loc.map_err(chunked(desc))?;
    let Some(ts_range) = loc.tar_split.filter(|_| loc.layout == Layout::Current) else {
        return Ok(Err(Fallback(
            "old zstd:chunked layout: no tar-split to rebuild the tar from".into(),
        )));
    };
    let mut downloaded = 0u64;
    let mut get = |offset: u64, len: u64| -> Result<Result<Vec<u8>, Fallback>, OciError> {
        if offset.checked_add(len).is_none_or(|e| e > desc.size) {
            return Err(bad(
                desc,
                "a range in the annotations lies outside the blob",
            ));
        }
        match source.read_range(desc, offset, len) {
            Ok(b) => {
                downloaded += b.len() as u64;
                counter.fetch_add(b.len() as u64, Ordering::Relaxed);
                Ok(Ok(b))
            }
            Err(OciError::NoRanges { action, reason }) => Ok(Err(Fallback(format!(
                "{action}: the registry does not serve byte ranges ({reason})"
            )))),
            Err(e) => Err(e),
        }
    };
    let toc_z = match get(loc.toc.offset, loc.toc.len)? {
        Ok(b) => b,
        Err(f) => return Ok(Err(f)),
    };
    let toc = reader::read_toc(&toc_z, &loc).map_err(chunked(desc))?;
    let ts_z = match get(ts_range.offset, ts_range.len)? {
        Ok(b) => b,
        Err(f) => return Ok(Err(f)),
    };
    let ts = reader::read_tar_split(&ts_z, &toc, &ts_range).map_err(chunked(desc))?;

    // TOC files by name: (digest, size, frames).
    struct TocFile {
        digest: Digest,
        size: u64,
        offset: u64,
        end: u64,
    }
    let mut files: HashMap<&str, TocFile> = HashMap::new();
    for e in &toc.entries {
        if e.kind != "reg" || e.size <= 0 {
            continue;
        }
        let digest: Digest = e
            .digest
            .parse()
            .map_err(|_| bad(desc, format!("{}: bad digest {:?}", e.name, e.digest)))?;
        if e.offset <= 0 || e.end_offset <= e.offset || e.end_offset as u64 > desc.size {
            return Err(bad(desc, format!("{}: bad offsets", e.name)));
        }
        let f = TocFile {
            digest,
            size: e.size as u64,
            offset: e.offset as u64,
            end: e.end_offset as u64,
        };
        if files.insert(e.name.as_str(), f).is_some() {
            return Err(bad(desc, format!("{} appears twice in the TOC", e.name)));
        }
    }
    // The tar-split decides the tar; the TOC only says where contents are.
    let mut pieces = Vec::new();
    let mut wanted: HashMap<Digest, (u64, u64, u64)> = HashMap::new();
    let (mut files_local, mut files_fetched) = (0, 0);
    for t in &ts {
        match t.kind {
            2 => pieces.push(TarPiece::Raw(t.payload_bytes().map_err(chunked(desc))?)),
            1 if t.size > 0 => {
                let name = t.name.as_deref().unwrap_or("");
                let f = files.get(name).ok_or_else(|| {
                    bad(
                        desc,
                        format!("the tar-split names {name:?}, which the TOC lacks"),
                    )
                })?;
                if f.size != t.size as u64 {
                    return Err(bad(
                        desc,
                        format!(
                            "{name}: the TOC says {} bytes, the tar-split {}",
                            f.size, t.size
                        ),
                    ));
                }
                if store.has_object(&f.digest) {
                    files_local += 1;
                } else if wanted.insert(f.digest, (f.offset, f.end, f.size)).is_none() {
                    files_fetched += 1;
                }
                pieces.push(TarPiece::File {
                    digest: f.digest,
                    size: f.size,
                });
            }
            1 => {}
            k => return Err(bad(desc, format!("tar-split entry of unknown type {k}"))),
        }
    }
    let need: u64 = wanted.values().map(|(o, e, _)| e - o).sum();
    if need > desc.size / 2 {
        return Ok(Err(Fallback(format!(
            "{need} of the blob's {} bytes are missing: a full pull is cheaper",
            desc.size
        ))));
    }
    // Fetch merged ranges, then cut each file's frames out of them.
    let mut spans: Vec<(u64, u64, Digest, u64)> = wanted
        .iter()
        .map(|(d, (o, e, s))| (*o, *e, *d, *s))
        .collect();
    spans.sort_by_key(|s| s.0);
    let mut merged: Vec<(u64, u64, usize, usize)> = Vec::new(); // start, end, spans[i..j]
    let mut i = 0;
    while i < spans.len() {
        let start = spans[i].0;
        let mut end = spans[i].1;
        let mut j = i + 1;
        while j < spans.len() && spans[j].0 <= end + MERGE_GAP {
            end = end.max(spans[j].1);
            j += 1;
        }
        merged.push((start, end, i, j));
        i = j;
    }
    let asks: Vec<(u64, u64)> = merged.iter().map(|(s, e, _, _)| (*s, e - s)).collect();
    let answers = match source.read_ranges(desc, &asks) {
        Ok(a) => a,
        Err(OciError::NoRanges { action, reason }) => {
            return Ok(Err(Fallback(format!(
                "{action}: the registry does not serve byte ranges ({reason})"
            ))));
        }
        Err(e) => return Err(e),
    };
    let got: u64 = answers.iter().map(|a| a.len() as u64).sum();
    downloaded += got;
    counter.fetch_add(got, Ordering::Relaxed);
    let mut fetched = HashMap::new();
    for ((start, _, i, j), bytes) in merged.iter().zip(&answers) {
        for (o, e, d, size) in &spans[*i..*j] {
            let frames = &bytes[(o - start) as usize..(e - start) as usize];
            let mut content = Vec::with_capacity(*size as usize);
            zstd::stream::read::Decoder::new(frames)
                .and_then(|dec| dec.take(size + 1).read_to_end(&mut content))
                .map_err(|e| bad(desc, format!("frames of {d} do not decompress: {e}")))?;
            let got = Digest::sha256_from_bytes(Sha256::digest(&content).into());
            if content.len() as u64 != *size || got != *d {
                return Err(OciError::DigestMismatch {
                    what: format!("a file fetched from zstd:chunked layer {}", desc.digest),
                    expected: *d,
                    actual: got,
                });
            }
            fetched.insert(*d, content);
        }
    }
    Ok(Ok(Fetched {
        tar: pieces,
        fetched,
        downloaded,
        files_fetched,
        files_local,
    }))
}

/// Write the rebuilt tar to `out`.
pub(crate) fn write_tar(store: &Store, f: &Fetched, out: &mut dyn Write) -> io::Result<()> {
    for p in &f.tar {
        match p {
            TarPiece::Raw(b) => out.write_all(b)?,
            TarPiece::File { digest, size } => match f.fetched.get(digest) {
                Some(b) => out.write_all(b)?,
                None => {
                    let file = store
                        .open_object(digest)
                        .map_err(|e| io::Error::other(e.to_string()))?;
                    let n = io::copy(&mut file.take(*size), out)?;
                    if n != *size {
                        return Err(io::Error::other(format!("object {digest} is short")));
                    }
                }
            },
        }
    }
    Ok(())
}
