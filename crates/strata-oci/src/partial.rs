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
use strata_ops::{Cancel, Ctl, Event, Op, Unit};
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

/// Where one chunk of a file lies in a zstd:chunked blob.
#[derive(Debug, Clone)]
pub struct RemoteChunk {
    /// Offset of the chunk in the file.
    pub file_offset: u64,
    /// Uncompressed length.
    pub size: u64,
    /// Blob range of the chunk's zstd frames.
    pub blob_offset: u64,
    /// End of that range.
    pub blob_end: u64,
    /// SHA-256 of the uncompressed chunk (for a file of one chunk: the
    /// file's digest).
    pub digest: Digest,
    /// A run of zeros: nothing needs fetching.
    pub zeros: bool,
}

/// A regular file of a zstd:chunked layer.
#[derive(Debug, Clone)]
pub struct RemoteFile {
    /// Path as the tar names it.
    pub name: String,
    /// SHA-256 of the content.
    pub digest: Digest,
    /// Length.
    pub size: u64,
    /// Blob range of all its frames.
    pub offset: u64,
    /// End of that range.
    pub end: u64,
    /// Chunks in file order, covering the file.
    pub chunks: Vec<RemoteChunk>,
}

/// A zstd:chunked layer described by its verified TOC and tar-split: what
/// it holds and where each file's bytes are, without its contents.
pub struct ChunkedIndex {
    /// The layer's descriptor.
    pub desc: Descriptor,
    /// Regular files with content, in TOC order.
    pub files: Vec<RemoteFile>,
    /// The tar as rebuilt from the tar-split.
    pieces: Vec<TarPiece>,
    /// Bytes downloaded for TOC and tar-split.
    pub downloaded: u64,
}

/// Fetch and verify a zstd:chunked layer's TOC and tar-split.
/// `Ok(Err(reason))`: the layer cannot be read piecewise (not chunked, old
/// layout, no range support); pull it in full instead.
pub fn open_chunked(
    source: &dyn ImageSource,
    desc: &Descriptor,
    counter: &AtomicU64,
) -> Result<Result<ChunkedIndex, String>, OciError> {
    let Some(loc) = reader::locate(&desc.annotations) else {
        return Ok(Err("not zstd:chunked".into()));
    };
    let loc = loc.map_err(chunked(desc))?;
    let Some(ts_range) = loc.tar_split.filter(|_| loc.layout == Layout::Current) else {
        return Ok(Err(
            "old zstd:chunked layout: no tar-split to rebuild the tar from".into(),
        ));
    };
    let mut downloaded = 0u64;
    let mut get = |offset: u64, len: u64| -> Result<Result<Vec<u8>, String>, OciError> {
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
            Err(OciError::NoRanges { action, reason }) => Ok(Err(format!(
                "{action}: the registry does not serve byte ranges ({reason})"
            ))),
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

    let parse = |name: &str, d: &str| -> Result<Digest, OciError> {
        d.parse()
            .map_err(|_| bad(desc, format!("{name}: bad digest {d:?}")))
    };
    let mut files: Vec<RemoteFile> = Vec::new();
    let mut by_name: HashMap<String, usize> = HashMap::new();
    for e in &toc.entries {
        if e.kind == "chunk" {
            let f = files
                .last_mut()
                .filter(|f| f.name == e.name)
                .ok_or_else(|| bad(desc, format!("{}: a chunk without its file", e.name)))?;
            let prev = f.chunks.last_mut().expect("files start with a chunk");
            let (off, at) = (e.offset as u64, e.chunk_offset as u64);
            if e.offset <= 0
                || off <= prev.blob_offset
                || off >= f.end
                || at != prev.file_offset + prev.size
            {
                return Err(bad(desc, format!("{}: chunks out of order", e.name)));
            }
            prev.blob_end = off;
            f.chunks.push(RemoteChunk {
                file_offset: at,
                size: e.chunk_size as u64,
                blob_offset: off,
                blob_end: f.end,
                digest: parse(&e.name, &e.chunk_digest)?,
                zeros: e.chunk_type == "zeros",
            });
            continue;
        }
        if e.kind != "reg" || e.size <= 0 {
            continue;
        }
        let digest = parse(&e.name, &e.digest)?;
        if e.offset <= 0 || e.end_offset <= e.offset || e.end_offset as u64 > desc.size {
            return Err(bad(desc, format!("{}: bad offsets", e.name)));
        }
        let (size, offset, end) = (e.size as u64, e.offset as u64, e.end_offset as u64);
        let first = if e.chunk_size > 0 && (e.chunk_size as u64) < size {
            RemoteChunk {
                file_offset: 0,
                size: e.chunk_size as u64,
                blob_offset: offset,
                blob_end: end,
                digest: parse(&e.name, &e.chunk_digest)?,
                zeros: e.chunk_type == "zeros",
            }
        } else {
            RemoteChunk {
                file_offset: 0,
                size,
                blob_offset: offset,
                blob_end: end,
                digest,
                zeros: false,
            }
        };
        if by_name.insert(e.name.clone(), files.len()).is_some() {
            return Err(bad(desc, format!("{} appears twice in the TOC", e.name)));
        }
        files.push(RemoteFile {
            name: e.name.clone(),
            digest,
            size,
            offset,
            end,
            chunks: vec![first],
        });
    }
    for f in &files {
        let last = f.chunks.last().expect("files start with a chunk");
        if last.file_offset + last.size != f.size {
            return Err(bad(
                desc,
                format!("{}: chunks do not cover the file", f.name),
            ));
        }
    }
    // The tar-split decides the tar; the TOC only says where contents are.
    let mut pieces = Vec::new();
    for t in &ts {
        match t.kind {
            2 => pieces.push(TarPiece::Raw(t.payload_bytes().map_err(chunked(desc))?)),
            1 if t.size > 0 => {
                let name = t.name.as_deref().unwrap_or("");
                let f = by_name.get(name).map(|&i| &files[i]).ok_or_else(|| {
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
                pieces.push(TarPiece::File {
                    digest: f.digest,
                    size: f.size,
                });
            }
            1 => {}
            k => return Err(bad(desc, format!("tar-split entry of unknown type {k}"))),
        }
    }
    Ok(Ok(ChunkedIndex {
        desc: desc.clone(),
        files,
        pieces,
        downloaded,
    }))
}

impl ChunkedIndex {
    /// The layer's entries (paths, metadata, content digests) as importing
    /// its tar would give them, computed from the tar-split alone.
    pub fn entries(&self) -> Result<Vec<strata_tar::Entry>, OciError> {
        struct Skeleton<'a> {
            pieces: &'a [TarPiece],
            at: usize,
            left: u64,
        }
        impl Read for Skeleton<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                loop {
                    let Some(p) = self.pieces.get(self.at) else {
                        return Ok(0);
                    };
                    let (len, raw) = match p {
                        TarPiece::Raw(b) => (b.len() as u64, Some(b)),
                        TarPiece::File { size, .. } => (*size, None),
                    };
                    if self.left == 0 && len > 0 {
                        self.left = len;
                    }
                    if len == 0 {
                        self.at += 1;
                        continue;
                    }
                    let from = (len - self.left) as usize;
                    let n = (self.left.min(buf.len() as u64)) as usize;
                    match raw {
                        Some(b) => buf[..n].copy_from_slice(&b[from..from + n]),
                        None => buf[..n].fill(0),
                    }
                    self.left -= n as u64;
                    if self.left == 0 {
                        self.at += 1;
                    }
                    return Ok(n);
                }
            }
        }
        /// Hands out the TOC's digests in tar order instead of hashing.
        struct TocDigests<'a> {
            files: std::slice::Iter<'a, TarPiece>,
        }
        impl strata_tar::ObjectSink for TocDigests<'_> {
            fn put(&mut self, content: &mut dyn Read, size: u64) -> io::Result<Digest> {
                io::copy(content, &mut io::sink())?;
                if size == 0 {
                    return Ok(Digest::sha256_of(b""));
                }
                for p in self.files.by_ref() {
                    if let TarPiece::File { digest, size: s } = p {
                        if *s != size {
                            return Err(io::Error::other("tar-split and tar disagree"));
                        }
                        return Ok(*digest);
                    }
                }
                Err(io::Error::other(
                    "more files in the tar than in the tar-split",
                ))
            }
        }
        let skeleton = Skeleton {
            pieces: &self.pieces,
            at: 0,
            left: 0,
        };
        let mut sink = TocDigests {
            files: self.pieces.iter(),
        };
        strata_tar::read_entries(skeleton, &mut sink)
            .map_err(|e| bad(&self.desc, format!("its tar-split does not parse: {e}")))
    }
}

/// Decompress one chunk's frames and check its digest.
pub fn decode_chunk(
    desc: &Descriptor,
    frames: &[u8],
    chunk: &RemoteChunk,
) -> Result<Vec<u8>, OciError> {
    decode_frames(desc, frames, chunk.size, &chunk.digest)
}

/// Decompress `frames` into exactly `size` bytes hashing to `digest`.
fn decode_frames(
    desc: &Descriptor,
    frames: &[u8],
    size: u64,
    digest: &Digest,
) -> Result<Vec<u8>, OciError> {
    let mut content = Vec::with_capacity(size as usize);
    zstd::stream::read::Decoder::new(frames)
        .and_then(|dec| dec.take(size + 1).read_to_end(&mut content))
        .map_err(|e| bad(desc, format!("frames of {digest} do not decompress: {e}")))?;
    let got = Digest::sha256_from_bytes(Sha256::digest(&content).into());
    if content.len() as u64 != size || got != *digest {
        return Err(OciError::DigestMismatch {
            what: format!("bytes fetched from zstd:chunked layer {}", desc.digest),
            expected: *digest,
            actual: got,
        });
    }
    Ok(content)
}

/// Bytes one range request of a partial pull asks for at most (longer
/// ranges are split): a cancel waits for one such request at most.
const REQUEST_BYTES: u64 = 4 << 20;

/// Ranges one request of a partial pull asks for at most.
const REQUEST_RANGES: usize = 32;

/// Read `asks` (offset, length) of `desc` in requests of at most
/// [`REQUEST_BYTES`] and [`REQUEST_RANGES`]: `cancel` is checked before
/// each and `progress` told the bytes of each. Answers in `asks` order.
fn read_ranges_bounded(
    source: &dyn ImageSource,
    desc: &Descriptor,
    asks: &[(u64, u64)],
    cancel: &Cancel,
    mut progress: impl FnMut(u64),
) -> Result<Vec<Vec<u8>>, OciError> {
    // (which ask, offset, length)
    let mut pieces: Vec<(usize, u64, u64)> = Vec::new();
    for (k, &(o, l)) in asks.iter().enumerate() {
        let mut at = 0;
        while at < l {
            let n = (l - at).min(REQUEST_BYTES);
            pieces.push((k, o + at, n));
            at += n;
        }
    }
    let mut out: Vec<Vec<u8>> = asks
        .iter()
        .map(|(_, l)| Vec::with_capacity(*l as usize))
        .collect();
    let mut i = 0;
    while i < pieces.len() {
        let (mut j, mut bytes) = (i, 0);
        while j < pieces.len()
            && (j == i || (bytes + pieces[j].2 <= REQUEST_BYTES && j - i < REQUEST_RANGES))
        {
            bytes += pieces[j].2;
            j += 1;
        }
        cancel.check()?;
        let group: Vec<(u64, u64)> = pieces[i..j].iter().map(|p| (p.1, p.2)).collect();
        let answers = source.read_ranges(desc, &group)?;
        if answers.len() != group.len() {
            return Err(bad(
                desc,
                format!("asked for {} ranges, got {}", group.len(), answers.len()),
            ));
        }
        for (&(k, o, l), a) in pieces[i..j].iter().zip(answers) {
            if a.len() as u64 != l {
                return Err(bad(
                    desc,
                    format!("bytes {o}+{l}: the registry sent {} bytes", a.len()),
                ));
            }
            out[k].extend_from_slice(&a);
        }
        progress(bytes);
        i = j;
    }
    Ok(out)
}

/// Plan and fetch. `Ok(Err(fallback))`: pull in full instead. Layer
/// `index`'s progress (bytes downloaded for it) goes to `ctl`, which is
/// checked before every request.
pub(crate) fn fetch(
    store: &Store,
    source: &dyn ImageSource,
    desc: &Descriptor,
    counter: &AtomicU64,
    layer: usize,
    ctl: Ctl<'_>,
) -> Result<Result<Fetched, Fallback>, OciError> {
    let progress = |done: u64, total: u64| {
        ctl.emit(Event::Progress {
            op: Op::Pull,
            unit: Unit::Layer {
                index: layer,
                digest: desc.digest,
            },
            done,
            total: Some(total),
        })
    };
    ctl.cancel.check()?;
    let index = match open_chunked(source, desc, counter)? {
        Ok(i) => i,
        Err(why) => return Ok(Err(Fallback(why))),
    };
    ctl.cancel.check()?;
    let mut downloaded = index.downloaded;
    let by_digest: HashMap<Digest, &RemoteFile> =
        index.files.iter().map(|f| (f.digest, f)).collect();
    let mut wanted: HashMap<Digest, (u64, u64, u64)> = HashMap::new();
    let (mut files_local, mut files_fetched) = (0, 0);
    for p in &index.pieces {
        if let TarPiece::File { digest, .. } = p {
            if store.has_object(digest) {
                files_local += 1;
            } else if !wanted.contains_key(digest) {
                let f = by_digest[digest];
                wanted.insert(*digest, (f.offset, f.end, f.size));
                files_fetched += 1;
            }
        }
    }
    let pieces = index.pieces;
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
    let total = downloaded + asks.iter().map(|(_, l)| l).sum::<u64>();
    progress(downloaded, total);
    let read = read_ranges_bounded(source, desc, &asks, ctl.cancel, |n| {
        downloaded += n;
        counter.fetch_add(n, Ordering::Relaxed);
        progress(downloaded, total);
    });
    let answers = match read {
        Ok(a) => a,
        Err(OciError::NoRanges { action, reason }) => {
            return Ok(Err(Fallback(format!(
                "{action}: the registry does not serve byte ranges ({reason})"
            ))));
        }
        Err(e) => return Err(e),
    };
    let mut fetched = HashMap::new();
    for ((start, _, i, j), bytes) in merged.iter().zip(&answers) {
        for (o, e, d, size) in &spans[*i..*j] {
            let frames = &bytes[(o - start) as usize..(e - start) as usize];
            let content = decode_frames(desc, frames, *size, d)?;
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
