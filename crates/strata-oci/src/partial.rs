//! Partial pulls of zstd:chunked layers: fetch only the files the store
//! lacks.
//!
//! 1. The TOC and tar-split are fetched by range (located by the layer's
//!    annotations, which the manifest digest covers) and verified: the TOC
//!    against the annotation's checksum, the tar-split against the TOC's
//!    `tarSplitDigest`.
//! 2. Nothing they say is trusted before it is checked (issue 15): both
//!    are parsed as streams, entry by entry, within limits
//!    ([`MetadataLimits`], shared by an image's layers through a
//!    [`MetadataBudget`]); every number is checked (negative, zero, past
//!    the blob, overflowing, chunks out of order or not covering their
//!    file, more bytes than the frames can decompress to at
//!    [`MAX_RATIO`]), names against [`MAX_PATH_LEN`]/[`MAX_PATH_DEPTH`];
//!    and the TOC must list exactly the entries of the tar the tar-split
//!    rebuilds, in order, with the same names, types, sizes and link
//!    targets (c/storage's lesson of 2024: a TOC that disagrees with the
//!    tar could show TOC readers other files than tar readers see). The
//!    tar's entries are parsed from its headers alone, so listing them
//!    costs what the headers do, not what the files claim to weigh.
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
    /// The tar-split's CRC-64 (Go's `crc64.ISO`) of the content, from the
    /// file's tar-split entry (`None`: the entry carries none). Unlike the
    /// TOC's digests it is bound to the tar the diff_id covers: lazy reads
    /// check contents against it too.
    pub crc64: Option<u64>,
}

/// Largest uncompressed size of one chunk that is not a run of zeros: 64
/// MiB. The chunker of zstd:chunked (c/storage's and ours) splits files
/// at content-defined points about every 64 KiB and has no maximum, so a
/// larger chunk takes 64 MiB of input without one split point (a long run
/// of one non-zero byte, say): such a layer is pulled in full instead,
/// since a reader holds one chunk in memory while it checks its digest.
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;

/// Largest blob span of one chunk: [`MAX_CHUNK_SIZE`] plus zstd's
/// worst-case growth of incompressible data (under 1/128 + 64 KiB).
pub const MAX_CHUNK_SPAN: u64 = MAX_CHUNK_SIZE + (MAX_CHUNK_SIZE >> 7) + (64 << 10);

/// Most bytes one byte of zstd frames can decompress to: a 128 KiB
/// run-length block costs 4 bytes (3 of header, 1 of value). A file or
/// chunk claiming more than its span times this cannot be what the blob
/// holds, whatever its frames are.
pub const MAX_RATIO: u64 = 1 << 15;

/// Longest name (bytes) a TOC or tar-split entry may have: Linux's
/// `PATH_MAX`, 4096.
pub const MAX_PATH_LEN: usize = 4096;

/// Deepest name (components) a TOC or tar-split entry may have: 512.
pub const MAX_PATH_DEPTH: usize = 512;

/// Most TOC entries the layers of one image may list together by default:
/// 2^21 (2 097 152). With [`reader::MAX_TOC_ENTRIES`] (2^20 per layer) it
/// bounds what reading metadata costs a pull: about 200 bytes kept per
/// entry while a layer is checked.
pub const MAX_IMAGE_ENTRIES: u64 = 1 << 21;

/// Most uncompressed TOC and tar-split bytes (as the annotations state
/// them, which bounds what they decompress to) the layers of one image may
/// have together by default: 1 GiB. One layer's are at most 150 MiB each
/// ([`reader::MAX_METADATA`]).
pub const MAX_IMAGE_METADATA: u64 = 1 << 30;

/// Most decompressed bytes a partial pull of one layer holds in memory
/// (the files it fetches): 1 GiB. A layer needing more is pulled in full
/// (streamed) instead.
pub const MAX_PARTIAL_MEMORY: u64 = 1 << 30;

/// Limits on the metadata of one image's zstd:chunked layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataLimits {
    /// Entries one layer's TOC may list ([`reader::MAX_TOC_ENTRIES`]).
    pub layer_entries: u64,
    /// Entries all the layers' TOCs may list together
    /// ([`MAX_IMAGE_ENTRIES`]).
    pub image_entries: u64,
    /// Uncompressed TOC and tar-split bytes of all layers together
    /// ([`MAX_IMAGE_METADATA`]).
    pub image_bytes: u64,
}

impl Default for MetadataLimits {
    fn default() -> Self {
        let l = crate::limits::current();
        MetadataLimits {
            layer_entries: l.layer_toc_entries,
            image_entries: l.image_toc_entries,
            image_bytes: l.image_metadata_bytes,
        }
    }
}

/// What the layers of one image (one pull, one lazy prepare) may spend on
/// metadata together; shared by the threads opening its layers. Layers
/// opened with [`open_chunked`] get a budget of their own each.
#[derive(Debug, Default)]
pub struct MetadataBudget {
    limits: MetadataLimits,
    entries: AtomicU64,
    bytes: AtomicU64,
}

impl MetadataBudget {
    /// A budget with these limits, nothing spent.
    pub fn new(limits: MetadataLimits) -> Self {
        MetadataBudget {
            limits,
            entries: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    /// The limits.
    pub fn limits(&self) -> MetadataLimits {
        self.limits
    }

    fn take(counter: &AtomicU64, n: u64, limit: u64) -> bool {
        counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                v.checked_add(n).filter(|t| *t <= limit)
            })
            .is_ok()
    }

    fn take_bytes(&self, n: u64) -> Result<(), String> {
        if Self::take(&self.bytes, n, self.limits.image_bytes) {
            Ok(())
        } else {
            Err(format!(
                "its TOC and tar-split ({n} bytes uncompressed) would take the image's \
                 zstd:chunked metadata past {} bytes (the limit)",
                self.limits.image_bytes
            ))
        }
    }

    fn take_entry(&self) -> Result<(), String> {
        if Self::take(&self.entries, 1, self.limits.image_entries) {
            Ok(())
        } else {
            Err(format!(
                "the image's TOCs list more than {} entries together (the limit)",
                self.limits.image_entries
            ))
        }
    }
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
    /// The entries as listed (and compared with the TOC) when opening,
    /// until [`entries`](Self::entries) takes them.
    entries: std::sync::Mutex<Option<Vec<strata_tar::Entry>>>,
    /// Bytes downloaded for TOC and tar-split.
    pub downloaded: u64,
}

/// The kinds of TOC entries, as tar entries have them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Reg,
    Hardlink,
    Symlink,
    Char,
    Block,
    Dir,
    Fifo,
}

impl Kind {
    fn of_toc(s: &str) -> Option<Kind> {
        Some(match s {
            "reg" => Kind::Reg,
            "hardlink" => Kind::Hardlink,
            "symlink" => Kind::Symlink,
            "char" => Kind::Char,
            "block" => Kind::Block,
            "dir" => Kind::Dir,
            "fifo" => Kind::Fifo,
            _ => return None,
        })
    }

    fn of_tar(k: &strata_tar::EntryKind) -> Kind {
        use strata_tar::EntryKind as E;
        match k {
            E::Regular { .. } => Kind::Reg,
            E::Hardlink { .. } => Kind::Hardlink,
            E::Symlink { .. } => Kind::Symlink,
            E::CharDev { .. } => Kind::Char,
            E::BlockDev { .. } => Kind::Block,
            E::Dir => Kind::Dir,
            E::Fifo => Kind::Fifo,
        }
    }
}

/// What is kept of a TOC entry (not a chunk) to compare it with the tar.
struct TocItem {
    kind: Kind,
    name: Box<str>,
    link: Box<str>,
    size: u64,
}

/// An error about TOC entry `n` (1-based) named `name`.
fn toc_err(n: u64, name: &str, reason: impl std::fmt::Display) -> strata_chunked::ChunkedError {
    strata_chunked::ChunkedError::Format {
        what: "zstd:chunked TOC".into(),
        reason: format!("entry {n} ({name:?}): {reason}"),
    }
}

/// A name's length and depth against [`MAX_PATH_LEN`] and
/// [`MAX_PATH_DEPTH`].
fn check_path(field: &str, name: &[u8]) -> Result<(), String> {
    if name.len() > MAX_PATH_LEN {
        return Err(format!(
            "{field} is {} bytes long, more than {MAX_PATH_LEN} (the limit)",
            name.len()
        ));
    }
    let depth = name.split(|b| *b == b'/').filter(|c| !c.is_empty()).count();
    if depth > MAX_PATH_DEPTH {
        return Err(format!(
            "{field} is {depth} components deep, more than {MAX_PATH_DEPTH} (the limit)"
        ));
    }
    Ok(())
}

/// Fetch and verify a zstd:chunked layer's TOC and tar-split, with a
/// [`MetadataBudget`] of its own (see [`open_chunked_with`]).
pub fn open_chunked(
    source: &dyn ImageSource,
    desc: &Descriptor,
    counter: &AtomicU64,
) -> Result<Result<ChunkedIndex, String>, OciError> {
    open_chunked_with(source, desc, counter, &MetadataBudget::default())
}

/// Fetch and verify a zstd:chunked layer's TOC and tar-split, spending
/// from `budget` (shared by the layers of one image).
/// `Ok(Err(reason))`: the layer cannot be read piecewise (not chunked, old
/// layout, no range support, a chunk over [`MAX_CHUNK_SIZE`]); pull it in
/// full instead.
///
/// Everything the TOC and tar-split say is checked before it is used, and
/// the first thing wrong is named: numbers (negative, zero where a chunk
/// needs bytes, past the blob, sums that overflow, chunks out of order or
/// not covering their file, more content than the frames can hold at
/// [`MAX_RATIO`]), counts and sizes against [`MetadataLimits`], names
/// against [`MAX_PATH_LEN`] and [`MAX_PATH_DEPTH`], and the TOC against
/// the tar the tar-split rebuilds, entry by entry (names, types, sizes,
/// link targets; a hard link must name an earlier entry; no entry missing
/// or extra on either side).
pub fn open_chunked_with(
    source: &dyn ImageSource,
    desc: &Descriptor,
    counter: &AtomicU64,
    budget: &MetadataBudget,
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
    // what this layer's metadata may cost, before anything is fetched
    let metadata = [
        loc.toc.len,
        loc.toc.uncompressed,
        ts_range.len,
        ts_range.uncompressed,
    ]
    .iter()
    .sum();
    budget
        .take_bytes(metadata)
        .map_err(|reason| bad(desc, reason))?;
    let mut downloaded = 0u64;
    // the TOC and the tar-split in one round trip: one range covering both
    // when they are close (they are written one after the other), else
    // both ranges in one request
    let (toc_z, ts_z) = {
        let (toc, ts) = (
            (loc.toc.offset, loc.toc.len),
            (ts_range.offset, ts_range.len),
        );
        for (o, l) in [toc, ts] {
            if o.checked_add(l).is_none_or(|e| e > desc.size) {
                return Err(bad(
                    desc,
                    "a range in the annotations lies outside the blob",
                ));
            }
        }
        let (first, second) = if toc.0 <= ts.0 { (toc, ts) } else { (ts, toc) };
        let gap = second.0.saturating_sub(first.0 + first.1);
        let fetched = if second.0 >= first.0 + first.1 && gap <= MERGE_GAP {
            let span = second.0 + second.1 - first.0;
            source.read_range(desc, first.0, span).map(|all| {
                let cut = |(o, l): (u64, u64)| {
                    let at = (o - first.0) as usize;
                    all[at..at + l as usize].to_vec()
                };
                (all.len() as u64, cut(toc), cut(ts))
            })
        } else {
            source.read_ranges(desc, &[toc, ts]).map(|mut parts| {
                let ts_z = parts.pop().expect("two parts");
                let toc_z = parts.pop().expect("two parts");
                ((toc_z.len() + ts_z.len()) as u64, toc_z, ts_z)
            })
        };
        match fetched {
            Ok((n, toc_z, ts_z)) => {
                downloaded += n;
                counter.fetch_add(n, Ordering::Relaxed);
                (toc_z, ts_z)
            }
            Err(OciError::NoRanges { action, reason }) => {
                return Ok(Err(format!(
                    "{action}: the registry does not serve byte ranges ({reason})"
                )));
            }
            Err(e) => return Err(e),
        }
    };

    // Each tar entry has a header of 512 bytes or more in the tar-split,
    // which bounds how many entries (besides chunks) a TOC can list.
    let max_items = ts_range.uncompressed / 512;
    let mut items: Vec<TocItem> = Vec::new();
    let mut files: Vec<RemoteFile> = Vec::new();
    // whether the last entry was a file whose chunks may follow
    let mut open_file = false;
    let mut n = 0u64;
    let mut on_entry = |e: reader::TocEntryRef<'_>| -> Result<(), strata_chunked::ChunkedError> {
        n += 1;
        let err = |reason: String| toc_err(n, &e.name, reason);
        budget.take_entry().map_err(&err)?;
        let num = |field: &str, v: i64| -> Result<u64, strata_chunked::ChunkedError> {
            u64::try_from(v).map_err(|_| err(format!("{field} {v} is negative")))
        };
        let digest = |field: &str, d: &str| -> Result<Digest, strata_chunked::ChunkedError> {
            d.parse()
                .map_err(|_| err(format!("{field}: bad digest {d:?}")))
        };
        check_path("its name", e.name.as_bytes()).map_err(&err)?;
        if e.kind == "chunk" {
            let f = files
                .last_mut()
                .filter(|f| open_file && *f.name == e.name)
                .ok_or_else(|| err("a chunk without its file".into()))?;
            let prev = f.chunks.last_mut().expect("files start with a chunk");
            let off = num("offset", e.offset)?;
            let at = num("chunkOffset", e.chunk_offset)?;
            let size = num("chunkSize", e.chunk_size)?;
            if off <= prev.blob_offset || off >= f.end {
                return Err(err(format!(
                    "offset {off} is not after the previous chunk's {} and before the file's endOffset {}",
                    prev.blob_offset, f.end
                )));
            }
            let want = prev.file_offset.checked_add(prev.size);
            if want != Some(at) {
                return Err(err(format!(
                    "chunkOffset {at} does not follow the previous chunk (which ends at {})",
                    want.map_or("an overflow".into(), |w| w.to_string())
                )));
            }
            if size == 0 || at.checked_add(size).is_none_or(|end| end > f.size) {
                return Err(err(format!(
                    "chunkSize {size} at chunkOffset {at} does not fit the file's size {}",
                    f.size
                )));
            }
            prev.blob_end = off;
            let chunk_digest = digest("chunkDigest", &e.chunk_digest)?;
            f.chunks.push(RemoteChunk {
                file_offset: at,
                size,
                blob_offset: off,
                blob_end: f.end,
                digest: chunk_digest,
                zeros: e.chunk_type == "zeros",
            });
            return Ok(());
        }
        let kind = Kind::of_toc(&e.kind)
            .ok_or_else(|| err(format!("type {:?} is not a tar entry type", e.kind)))?;
        check_path("its linkName", e.link_name.as_bytes()).map_err(&err)?;
        if items.len() as u64 >= max_items {
            return Err(err(format!(
                "more entries than the tar-split's {} bytes can describe (512 bytes of header each)",
                ts_range.uncompressed
            )));
        }
        let size = num("size", e.size)?;
        items.push(TocItem {
            kind,
            name: e.name.as_ref().into(),
            link: e.link_name.as_ref().into(),
            size,
        });
        open_file = false;
        if kind != Kind::Reg || size == 0 {
            return Ok(());
        }
        let file_digest = digest("digest", &e.digest)?;
        let offset = num("offset", e.offset)?;
        let end = num("endOffset", e.end_offset)?;
        if offset == 0 || end <= offset || end > desc.size {
            return Err(err(format!(
                "offset {offset} and endOffset {end} are not a range inside the blob's {} bytes",
                desc.size
            )));
        }
        let span = end - offset;
        if size > span.saturating_mul(MAX_RATIO) {
            return Err(err(format!(
                "size {size} is more than its {span} bytes of frames can hold (at most {MAX_RATIO} bytes per byte)"
            )));
        }
        let chunk_size = num("chunkSize", e.chunk_size)?;
        if chunk_size > size {
            return Err(err(format!(
                "chunkSize {chunk_size} is more than the file's size {size}"
            )));
        }
        let first = if chunk_size > 0 && chunk_size < size {
            RemoteChunk {
                file_offset: 0,
                size: chunk_size,
                blob_offset: offset,
                blob_end: end,
                digest: digest("chunkDigest", &e.chunk_digest)?,
                zeros: e.chunk_type == "zeros",
            }
        } else {
            RemoteChunk {
                file_offset: 0,
                size,
                blob_offset: offset,
                blob_end: end,
                digest: file_digest,
                zeros: false,
            }
        };
        files.push(RemoteFile {
            name: e.name.into_owned(),
            digest: file_digest,
            size,
            offset,
            end,
            chunks: vec![first],
            crc64: None,
        });
        open_file = true;
        Ok(())
    };
    // a tar-split of a usual size is parsed while the TOC is (its lines
    // are used only once its digest is the TOC's); a big one afterwards,
    // streamed, so its lines are never all held
    let parallel = ts_range.uncompressed <= reader::IN_MEMORY;
    let (head, ts_lines) = std::thread::scope(|s| {
        let ts = parallel.then(|| {
            s.spawn(|| reader::tar_split_unchecked(&ts_z, &ts_range, reader::MAX_TAR_SPLIT_LINES))
        });
        let head = reader::read_toc_refs(&toc_z, &loc, budget.limits.layer_entries, &mut on_entry);
        (head, ts.map(|t| t.join()))
    });
    let head = head.map_err(chunked(desc))?;
    drop(toc_z);
    let ts_lines = ts_lines
        .transpose()
        .map_err(|_| bad(desc, "parsing its tar-split failed (a panic)"))?;

    // Chunks: each covers its part of the file, within the limits.
    let mut too_big = None;
    for f in &files {
        let last = f.chunks.last().expect("files start with a chunk");
        if last.file_offset.checked_add(last.size) != Some(f.size) {
            return Err(bad(
                desc,
                format!("{}: chunks do not cover the file", f.name),
            ));
        }
        for c in &f.chunks {
            let span = c.blob_end - c.blob_offset;
            if c.size > span.saturating_mul(MAX_RATIO) {
                return Err(bad(
                    desc,
                    format!(
                        "{}: the chunk at {} claims {} bytes, more than its {span} bytes of frames can hold (at most {MAX_RATIO} bytes per byte)",
                        f.name, c.file_offset, c.size
                    ),
                ));
            }
            if !c.zeros && too_big.is_none() && (c.size > MAX_CHUNK_SIZE || span > MAX_CHUNK_SPAN) {
                too_big = Some(format!(
                    "{}: the chunk at {} is {} bytes ({span} compressed), more than MAX_CHUNK_SIZE {MAX_CHUNK_SIZE} ({MAX_CHUNK_SPAN})",
                    f.name, c.file_offset, c.size
                ));
            }
        }
    }

    // The tar-split decides the tar; the TOC only says where contents are.
    // Its file lines and the TOC's entries go in the same (tar) order.
    let mut pieces = Vec::new();
    let (mut i, mut k) = (0usize, 0usize);
    let mut on_line = |t: reader::TarSplitEntry| -> Result<(), strata_chunked::ChunkedError> {
        let fail = |reason: String| strata_chunked::ChunkedError::Format {
            what: "zstd:chunked tar-split".into(),
            reason,
        };
        match t.kind {
            2 => pieces.push(TarPiece::Raw(t.into_payload()?)),
            1 => {
                let name = t.name.as_deref().unwrap_or("");
                check_path("the name", name.as_bytes())
                    .map_err(|why| fail(format!("{name:?}: {why}")))?;
                let size = u64::try_from(t.size)
                    .map_err(|_| fail(format!("{name:?}: size {} is negative", t.size)))?;
                let Some(item) = items.get(i) else {
                    return Err(fail(format!(
                        "the tar-split names {name:?}, which the TOC lacks"
                    )));
                };
                if *item.name != *name {
                    return Err(fail(format!(
                        "entry {}: the tar-split names {name:?}, the TOC {:?}",
                        i + 1,
                        item.name
                    )));
                }
                i += 1;
                if item.kind == Kind::Reg && item.size != size {
                    return Err(fail(format!(
                        "{name}: the TOC says {} bytes, the tar-split {size}",
                        item.size
                    )));
                }
                if item.kind == Kind::Reg && size > 0 {
                    // kept, not judged: a reader that needs it (lazy
                    // mounts) refuses a file without one
                    let crc = t.payload().unwrap_or_default();
                    let f = &mut files[k];
                    debug_assert_eq!(*f.name, *name);
                    f.crc64 = <[u8; 8]>::try_from(crc).ok().map(u64::from_be_bytes);
                    k += 1;
                    pieces.push(TarPiece::File {
                        digest: f.digest,
                        size,
                    });
                }
            }
            k => return Err(fail(format!("tar-split entry of unknown type {k}"))),
        }
        Ok(())
    };
    match ts_lines {
        Some(lines) => {
            for line in lines.check(&head.tar_split_digest).map_err(chunked(desc))? {
                on_line(line).map_err(chunked(desc))?;
            }
        }
        None => reader::read_tar_split_lines(
            &ts_z,
            &head.tar_split_digest,
            &ts_range,
            reader::MAX_TAR_SPLIT_LINES,
            &mut on_line,
        )
        .map_err(chunked(desc))?,
    }
    drop(ts_z);
    if let Some(item) = items.get(i) {
        return Err(bad(
            desc,
            format!("the TOC lists {:?}, which the tar-split lacks", item.name),
        ));
    }

    // The tar those headers make must be the TOC's, entry by entry.
    let entries = list_entries(desc, &pieces)?;
    compare(desc, &items, &entries)?;
    drop(items);
    // files' frames follow each other in tar order, apart (checked once
    // the entries agree: a TOC-only entry reusing a file's frames is named
    // as what it is above)
    for w in files.windows(2) {
        if w[1].offset < w[0].end {
            return Err(bad(
                desc,
                format!(
                    "{}: offset {} overlaps the frames of {} (which end at {})",
                    w[1].name, w[1].offset, w[0].name, w[0].end
                ),
            ));
        }
    }
    if let Some(why) = too_big {
        return Ok(Err(why));
    }
    Ok(Ok(ChunkedIndex {
        desc: desc.clone(),
        files,
        pieces,
        entries: std::sync::Mutex::new(Some(entries)),
        downloaded,
    }))
}

/// The entries of the tar rebuilt from `pieces`, parsed from its headers
/// alone: contents are not streamed (the cost is the headers', not the
/// sizes they claim), digests are the TOC's in tar order.
fn list_entries(
    desc: &Descriptor,
    pieces: &[TarPiece],
) -> Result<Vec<strata_tar::Entry>, OciError> {
    /// The raw pieces, one after the other.
    struct Headers<'a> {
        pieces: std::slice::Iter<'a, TarPiece>,
        cur: &'a [u8],
    }
    impl Read for Headers<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            while self.cur.is_empty() {
                match self.pieces.next() {
                    None => return Ok(0),
                    Some(TarPiece::Raw(b)) => self.cur = b,
                    Some(TarPiece::File { .. }) => {}
                }
            }
            self.cur.read(buf)
        }
    }
    /// Hands out the TOC's digests in tar order instead of hashing.
    struct TocDigests<'a> {
        files: std::slice::Iter<'a, TarPiece>,
    }
    impl strata_tar::ObjectSink for TocDigests<'_> {
        fn put(&mut self, _content: &mut dyn Read, _size: u64) -> io::Result<Digest> {
            // only sparse entries come here: zstd:chunked has none
            Err(io::Error::other(
                "a sparse file, which zstd:chunked layers cannot hold",
            ))
        }
        fn put_absent(&mut self, size: u64) -> Option<io::Result<Digest>> {
            if size == 0 {
                return Some(Ok(Digest::sha256_of(b"")));
            }
            for p in self.files.by_ref() {
                if let TarPiece::File { digest, size: s } = p {
                    if *s != size {
                        return Some(Err(io::Error::other(format!(
                            "a header says {size} bytes where the tar-split says {s}"
                        ))));
                    }
                    return Some(Ok(*digest));
                }
            }
            Some(Err(io::Error::other(
                "more files in the tar than in the tar-split",
            )))
        }
    }
    let headers = Headers {
        pieces: pieces.iter(),
        cur: &[],
    };
    let mut sink = TocDigests {
        files: pieces.iter(),
    };
    let entries = strata_tar::read_entries(headers, &mut sink)
        .map_err(|e| bad(desc, format!("its tar-split does not parse: {e}")))?;
    if sink.files.any(|p| matches!(p, TarPiece::File { .. })) {
        return Err(bad(
            desc,
            "the tar-split has more file contents than its headers",
        ));
    }
    Ok(entries)
}

/// The TOC's entries against the tar's, in order: the first disagreement
/// is named.
fn compare(
    desc: &Descriptor,
    items: &[TocItem],
    entries: &[strata_tar::Entry],
) -> Result<(), OciError> {
    use std::collections::HashSet;
    use strata_tar::EntryKind as E;
    let mut earlier: HashSet<&[u8]> = HashSet::new();
    for (n, (t, e)) in items.iter().zip(entries).enumerate() {
        let path = String::from_utf8_lossy(&e.path);
        let err = |reason: String| bad(desc, format!("entry {} ({path:?}): {reason}", n + 1));
        check_path("its name", &e.path).map_err(&err)?;
        let name = strata_tar::normalize(t.name.as_bytes())
            .map_err(|why| err(format!("the TOC's name {:?}: {why}", t.name)))?;
        if name != e.path {
            return Err(err(format!("the TOC names {:?}", t.name)));
        }
        if Kind::of_tar(&e.kind) != t.kind {
            return Err(err(format!(
                "the tar says {:?}, the TOC {:?}",
                Kind::of_tar(&e.kind),
                t.kind
            )));
        }
        match &e.kind {
            E::Regular { size, .. } if *size != t.size => {
                return Err(err(format!(
                    "the tar says {size} bytes, the TOC {}",
                    t.size
                )));
            }
            E::Hardlink { target } => {
                check_path("its link target", target).map_err(&err)?;
                let toc = strata_tar::normalize(t.link.as_bytes())
                    .map_err(|why| err(format!("the TOC's linkName {:?}: {why}", t.link)))?;
                if toc != *target {
                    return Err(err(format!(
                        "a hard link to {:?} in the tar, to {:?} in the TOC",
                        String::from_utf8_lossy(target),
                        t.link
                    )));
                }
                if !earlier.contains(target.as_slice()) {
                    return Err(err(format!(
                        "a hard link to {:?}, which no earlier file is",
                        String::from_utf8_lossy(target)
                    )));
                }
            }
            E::Symlink { target } => {
                check_path("its link target", target).map_err(&err)?;
                if target.as_slice() != t.link.as_bytes() {
                    return Err(err(format!(
                        "a symlink to {:?} in the tar, to {:?} in the TOC",
                        String::from_utf8_lossy(target),
                        t.link
                    )));
                }
            }
            _ => {}
        }
        if !matches!(e.kind, E::Dir) {
            earlier.insert(&e.path);
        }
    }
    if let Some(t) = items.get(entries.len()) {
        return Err(bad(
            desc,
            format!("the TOC lists {:?}, which the tar-split lacks", t.name),
        ));
    }
    if let Some(e) = entries.get(items.len()) {
        return Err(bad(
            desc,
            format!(
                "the tar-split has {:?}, which the TOC lacks",
                String::from_utf8_lossy(&e.path)
            ),
        ));
    }
    Ok(())
}

impl ChunkedIndex {
    /// The SHA-256 of the layer's tar rebuilt from the tar-split and the
    /// store's objects (every file's content must be there): what the
    /// config's diff_id must be.
    pub fn diff_id_from_store(&self, store: &Store) -> io::Result<Digest> {
        struct Hash(Sha256);
        impl Write for Hash {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.update(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let f = Fetched {
            tar: Vec::new(),
            fetched: HashMap::new(),
            downloaded: 0,
            files_fetched: 0,
            files_local: 0,
        };
        let mut h = Hash(Sha256::new());
        write_pieces(store, &f, &self.pieces, &mut h)?;
        Ok(Digest::sha256_from_bytes(h.0.finalize().into()))
    }

    /// The layer's entries (paths, metadata, content digests) as importing
    /// its tar would give them, computed from the tar-split alone: from its
    /// headers, whatever sizes they claim.
    pub fn entries(&self) -> Result<Vec<strata_tar::Entry>, OciError> {
        if let Some(e) = self.entries.lock().expect("no panics while held").take() {
            return Ok(e);
        }
        list_entries(&self.desc, &self.pieces)
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
    // `size` is the TOC's word: checked against what the frames can hold,
    // and memory grows with what they really decompress to
    if size > (frames.len() as u64).saturating_mul(MAX_RATIO) {
        return Err(bad(
            desc,
            format!(
                "{digest}: {size} bytes claimed from {} bytes of frames (at most {MAX_RATIO} bytes per byte)",
                frames.len()
            ),
        ));
    }
    let mut content = Vec::with_capacity(size.min(1 << 20) as usize);
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
        .map(|(_, l)| Vec::with_capacity((*l).min(REQUEST_BYTES) as usize))
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
    budget: &MetadataBudget,
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
    let index = match open_chunked_with(source, desc, counter, budget)? {
        Ok(i) => i,
        Err(why) => return Ok(Err(Fallback(why))),
    };
    // checked against the TOC when opening; not needed here
    drop(index.entries.lock().expect("no panics while held").take());
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
    let need: u64 = wanted
        .values()
        .map(|(o, e, _)| e - o)
        .fold(0, u64::saturating_add);
    let held: u64 = wanted
        .values()
        .map(|(_, _, s)| *s)
        .fold(0, u64::saturating_add);
    if held > MAX_PARTIAL_MEMORY {
        return Ok(Err(Fallback(format!(
            "the missing files are {held} bytes, more than a partial pull holds in memory \
             (MAX_PARTIAL_MEMORY {MAX_PARTIAL_MEMORY})"
        ))));
    }
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
        while j < spans.len() && spans[j].0 <= end.saturating_add(MERGE_GAP) {
            end = end.max(spans[j].1);
            j += 1;
        }
        merged.push((start, end, i, j));
        i = j;
    }
    let asks: Vec<(u64, u64)> = merged.iter().map(|(s, e, _, _)| (*s, e - s)).collect();
    let total = asks
        .iter()
        .map(|(_, l)| *l)
        .fold(downloaded, u64::saturating_add);
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
    write_pieces(store, f, &f.tar, out)
}

/// Write the tar of `pieces`, contents from `f` or the store, to `out`.
fn write_pieces(
    store: &Store,
    f: &Fetched,
    pieces: &[TarPiece],
    out: &mut dyn Write,
) -> io::Result<()> {
    for p in pieces {
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
