//! Reading layer tars exactly.
//!
//! [`import_tar`] parses an uncompressed layer tar stream once and produces:
//! - the list of [`Entry`]s (normalized paths and metadata) that
//!   `strata-tree` flattens, with every regular file's content handed to an
//!   [`ObjectSink`] (the store) and named by its SHA-256;
//! - a [`LayerRecord`]: every byte of the stream that is not file content
//!   (headers, PAX and GNU long-name data, padding, end-of-archive blocks,
//!   trailing bytes) kept verbatim, and file contents as references to
//!   object ranges. [`LayerRecord::rebuild`] concatenates them to regenerate
//!   the original tar byte for byte, so its SHA-256 equals the diff_id and
//!   images can be pushed or converted without the original blobs.
//!
//! We parse tar ourselves (not with the `tar` crate) because exact rebuild
//! needs to know which bytes are content and which are not, and because PAX
//! 1.0 sparse files must be decoded.
//!
//! Formats read: v7, ustar, GNU (long names `L`/`K`, old sparse `S`,
//! base-256 numbers), PAX (`x` per entry: path, linkpath, size, uid, gid,
//! mtime with fraction, `SCHILY.xattr.*`, `LIBARCHIVE.xattr.*`, GNU sparse
//! 0.1 and 1.0; `g` global headers are kept verbatim and otherwise ignored,
//! like Go's archive/tar and containerd do).
//!
//! Safety: entry paths and hardlink targets with `..` components or a
//! leading `/` are rejected; truncated streams, bad checksums and unknown
//! entry types are errors naming the offset. Escapes through symlinks are
//! checked by `strata-tree`, which knows the whole tree.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod header;
mod record;
mod stream;

use std::collections::BTreeMap;
use std::io::{self, Read};

use serde::{Deserialize, Serialize};
use strata_digest::Digest;

pub use record::LayerRecord;
use record::Segment;
use stream::StreamReader;

/// A modification time.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Timestamp {
    /// Seconds since the epoch.
    pub secs: i64,
    /// Nanoseconds, < 1e9.
    pub nanos: u32,
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryKind {
    /// A regular file; `size` is the logical size (sparse files expanded),
    /// `digest` the SHA-256 of the logical content.
    Regular {
        /// Content digest (the object name).
        digest: Digest,
        /// Logical size.
        size: u64,
    },
    /// A directory.
    Dir,
    /// A symbolic link with its verbatim target.
    Symlink {
        /// Link target.
        target: Vec<u8>,
    },
    /// A hard link to an earlier path (normalized like entry paths).
    Hardlink {
        /// Normalized target path.
        target: Vec<u8>,
    },
    /// A character device.
    CharDev {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A block device.
    BlockDev {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A named pipe.
    Fifo,
}

/// One tar entry after parsing and path normalization.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Relative path without `./`, `/` prefix, `.` components or trailing
    /// `/`; the root directory is the empty path. Any bytes but NUL and `/`
    /// in a component.
    pub path: Vec<u8>,
    /// Kind and kind-specific data.
    pub kind: EntryKind,
    /// Permission bits incl. setuid/setgid/sticky.
    pub mode: u32,
    /// Owner.
    pub uid: u64,
    /// Group.
    pub gid: u64,
    /// Modification time.
    pub mtime: Timestamp,
    /// Extended attributes.
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

/// Where file contents go while a tar is imported.
pub trait ObjectSink {
    /// Store exactly `size` bytes read from `content`; return their SHA-256.
    fn put(&mut self, content: &mut dyn Read, size: u64) -> io::Result<Digest>;

    /// For streams that carry headers but not contents (a tar rebuilt from
    /// a tar-split alone): `Some` takes a regular file's digest without
    /// reading its `size` bytes, which the stream then lacks (its padding
    /// stays), so listing entries costs what the headers do whatever sizes
    /// they claim. `None` (the default): the content is in the stream and
    /// goes to [`put`](Self::put). Sparse entries always go to `put`.
    fn put_absent(&mut self, size: u64) -> Option<io::Result<Digest>> {
        let _ = size;
        None
    }
}

/// Errors while reading a tar or a record.
#[derive(Debug, thiserror::Error)]
pub enum TarError {
    /// Reading the stream (or storing content) failed.
    #[error("reading tar: {0}")]
    Io(#[from] io::Error),
    /// The stream ended inside a header or content.
    #[error("unexpected end of tar at offset {0}")]
    Truncated(u64),
    /// A malformed header or extension.
    #[error("malformed tar at offset {offset}: {reason}")]
    Malformed {
        /// Offset of the header.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// An entry whose path is unsafe.
    #[error("unsafe tar entry {path:?} at offset {offset}: {reason}")]
    Unsafe {
        /// The raw path (lossy).
        path: String,
        /// Offset of the header.
        offset: u64,
        /// Why.
        reason: &'static str,
    },
    /// An entry type we do not handle.
    #[error("unsupported tar entry type {typeflag:?} for {path:?} at offset {offset}")]
    Unsupported {
        /// The type flag.
        typeflag: char,
        /// The path (lossy).
        path: String,
        /// Offset of the header.
        offset: u64,
    },
    /// A layer record that cannot be decoded.
    #[error("corrupt layer record: {0}")]
    Record(String),
}

/// The result of [`import_tar`].
#[derive(Debug)]
pub struct Imported {
    /// Entries and rebuild data.
    pub record: LayerRecord,
    /// SHA-256 of the whole uncompressed stream (incl. trailing bytes).
    pub diff_id: Digest,
    /// Length of the stream.
    pub size: u64,
}

/// Parse a whole tar stream for its entries only: contents go to `sink`,
/// the stream is not hashed (no diff_id). For trees built from metadata
/// whose contents arrive later.
pub fn read_entries(r: impl Read, sink: &mut dyn ObjectSink) -> Result<Vec<Entry>, TarError> {
    let mut p = Parser {
        r: StreamReader::unhashed(r),
        raw: Vec::new(),
        segments: Vec::new(),
        entries: Vec::new(),
        record: false,
    };
    p.run(sink)?;
    Ok(p.entries)
}

/// Parse a whole tar stream, storing file contents through `sink`.
pub fn import_tar(r: impl Read, sink: &mut dyn ObjectSink) -> Result<Imported, TarError> {
    let mut p = Parser {
        r: StreamReader::new(r)?,
        raw: Vec::new(),
        segments: Vec::new(),
        entries: Vec::new(),
        record: true,
    };
    p.run(sink)?;
    let Parser {
        r,
        raw,
        mut segments,
        entries,
        ..
    } = p;
    if !raw.is_empty() {
        segments.push(Segment::Raw(raw));
    }
    let size = r.len();
    let diff_id = r.finish()?;
    Ok(Imported {
        record: LayerRecord::new(entries, segments),
        diff_id,
        size,
    })
}

/// Per-entry values collected from PAX and GNU extension headers.
#[derive(Default)]
struct Pending {
    path: Option<Vec<u8>>,
    link: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<Timestamp>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    sparse_map: Option<Vec<(u64, u64)>>,
    sparse_realsize: Option<u64>,
    sparse_name: Option<Vec<u8>>,
    sparse_v1: bool,
}

struct Parser<R: Read> {
    r: StreamReader<R>,
    raw: Vec<u8>,
    segments: Vec<Segment>,
    entries: Vec<Entry>,
    /// Keep the rebuild record (`segments`); without it, the raw bytes
    /// of each entry's headers are dropped once the entry is parsed.
    record: bool,
}

const BLOCK: usize = 512;

/// Largest PAX or GNU long-name header we hold in memory.
const MAX_EXTENSION: u64 = 16 << 20;
/// Raw bytes read in place at once (larger ones are read as they come).
const SMALL_RAW: u64 = 64 << 10;

fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

impl<R: Read> Parser<R> {
    fn offset(&self) -> u64 {
        self.r.len()
    }

    /// Read exactly `n` bytes into the raw record.
    fn keep_raw(&mut self, n: u64) -> Result<(), TarError> {
        let start = self.raw.len();
        if n <= SMALL_RAW {
            // in place (padding, extension headers): `read_to_end` would
            // probe and grow in small steps
            self.raw.resize(start + n as usize, 0);
            let read = self.r.read_exact(&mut self.raw[start..]);
            return match read {
                Ok(()) => Ok(()),
                Err(e) => {
                    self.raw.truncate(start);
                    Err(match e.kind() {
                        io::ErrorKind::UnexpectedEof => TarError::Truncated(self.offset()),
                        _ => e.into(),
                    })
                }
            };
        }
        let got = (&mut self.r).take(n).read_to_end(&mut self.raw)?;
        if (got as u64) < n {
            return Err(TarError::Truncated(self.offset()));
        }
        Ok(())
    }

    /// [`keep_raw`](Self::keep_raw), returning a copy of the bytes.
    fn read_raw(&mut self, n: u64) -> Result<Vec<u8>, TarError> {
        let start = self.raw.len();
        self.keep_raw(n)?;
        Ok(self.raw[start..].to_vec())
    }

    /// Read one 512-byte block; `None` at a clean end of stream.
    fn read_block(&mut self) -> Result<Option<[u8; BLOCK]>, TarError> {
        let mut b = [0u8; BLOCK];
        let mut filled = 0;
        while filled < BLOCK {
            let n = match self.r.read(&mut b[filled..]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                break;
            }
            filled += n;
        }
        self.raw.extend_from_slice(&b[..filled]);
        match filled {
            0 => Ok(None),
            BLOCK => Ok(Some(b)),
            _ => Err(TarError::Truncated(self.offset())),
        }
    }

    fn flush_raw(&mut self) {
        if !self.record {
            self.raw.clear();
            return;
        }
        if !self.raw.is_empty() {
            // a copy of its exact size: the buffer keeps its capacity for
            // the next headers (taking it would grow a new one each entry)
            // (unless it grew big: a large extension header's buffer goes)
            let seg = if self.raw.capacity() > SMALL_RAW as usize {
                std::mem::take(&mut self.raw)
            } else {
                let seg = self.raw.clone();
                self.raw.clear();
                seg
            };
            self.segments.push(Segment::Raw(seg));
        }
    }

    fn run(&mut self, sink: &mut dyn ObjectSink) -> Result<(), TarError> {
        let mut pending = Pending::default();
        loop {
            let offset = self.offset();
            let Some(block) = self.read_block()? else {
                // EOF without an end-of-archive marker: accepted (Go's
                // archive/tar does too) as long as no extension is pending.
                if pending.path.is_some() || pending.link.is_some() {
                    return Err(TarError::Truncated(offset));
                }
                return Ok(());
            };
            if block.iter().all(|b| *b == 0) {
                // End of archive: a second zero block (or EOF) must follow;
                // anything after it is kept verbatim.
                match self.read_block()? {
                    None => return Ok(()),
                    Some(b2) if b2.iter().all(|b| *b == 0) => {}
                    Some(_) => {
                        return Err(TarError::Malformed {
                            offset,
                            reason: "a single zero block followed by more entries".into(),
                        });
                    }
                }
                io::copy(&mut self.r, &mut self.raw)?;
                return Ok(());
            }
            let h = header::Header::parse(&block, offset)?;
            if matches!(h.typeflag, b'x' | b'g' | b'L' | b'K') && h.size > MAX_EXTENSION {
                // These are held in memory; real ones are a few KiB.
                return Err(TarError::Malformed {
                    offset,
                    reason: format!(
                        "extension header {:?} of {} bytes is larger than {MAX_EXTENSION}",
                        h.typeflag as char, h.size
                    ),
                });
            }
            match h.typeflag {
                b'x' | b'g' => {
                    let data = self.read_raw(h.size)?;
                    self.keep_raw(padding(h.size))?;
                    if h.typeflag == b'x' {
                        header::apply_pax(&data, &mut pending, offset)?;
                    }
                }
                b'L' | b'K' => {
                    let mut data = self.read_raw(h.size)?;
                    self.keep_raw(padding(h.size))?;
                    if let Some(nul) = data.iter().position(|b| *b == 0) {
                        data.truncate(nul);
                    }
                    if h.typeflag == b'L' {
                        pending.path.get_or_insert(data);
                    } else {
                        pending.link.get_or_insert(data);
                    }
                }
                _ => {
                    let p = std::mem::take(&mut pending);
                    self.entry(h, p, offset, sink)?;
                }
            }
        }
    }

    fn entry(
        &mut self,
        h: header::Header,
        p: Pending,
        offset: u64,
        sink: &mut dyn ObjectSink,
    ) -> Result<(), TarError> {
        let raw_path = p
            .sparse_name
            .clone()
            .or(p.path)
            .unwrap_or_else(|| h.path.clone());
        let lossy = String::from_utf8_lossy(&raw_path).into_owned();
        let path = normalize(&raw_path).map_err(|reason| TarError::Unsafe {
            path: lossy.clone(),
            offset,
            reason,
        })?;
        let size = p.size.unwrap_or(h.size);
        let link = p.link.unwrap_or_else(|| h.link.clone());
        let mut kind = match h.typeflag {
            b'0' | 0 | b'7' if raw_path.ends_with(b"/") && h.typeflag == 0 => EntryKind::Dir,
            b'0' | 0 | b'7' | b'S' => EntryKind::Regular {
                digest: Digest::sha256_of(b""),
                size: 0,
            },
            b'1' => {
                let target = normalize(&link).map_err(|reason| TarError::Unsafe {
                    path: format!("{lossy} (hardlink to {})", String::from_utf8_lossy(&link)),
                    offset,
                    reason,
                })?;
                if target.is_empty() {
                    return Err(TarError::Unsafe {
                        path: lossy,
                        offset,
                        reason: "hardlink to the root directory",
                    });
                }
                EntryKind::Hardlink { target }
            }
            b'2' => EntryKind::Symlink { target: link },
            b'3' => EntryKind::CharDev {
                major: h.devmajor,
                minor: h.devminor,
            },
            b'4' => EntryKind::BlockDev {
                major: h.devmajor,
                minor: h.devminor,
            },
            b'5' | b'D' => EntryKind::Dir,
            b'6' => EntryKind::Fifo,
            other => {
                return Err(TarError::Unsupported {
                    typeflag: other as char,
                    path: lossy,
                    offset,
                });
            }
        };
        if let EntryKind::Regular {
            digest,
            size: lsize,
        } = &mut kind
        {
            let sparse = if h.typeflag == b'S' {
                Some((h.sparse.clone(), h.realsize, false))
            } else if p.sparse_v1 {
                Some((Vec::new(), p.sparse_realsize.unwrap_or(0), true))
            } else {
                p.sparse_map
                    .clone()
                    .map(|m| (m, p.sparse_realsize.unwrap_or(0), false))
            };
            match sparse {
                None => {
                    self.flush_raw();
                    let d = match sink.put_absent(size) {
                        Some(d) => d?,
                        None => {
                            let mut take = (&mut self.r).take(size);
                            let res = sink.put(&mut take, size);
                            let left = take.limit();
                            let d = res.map_err(|e| {
                                if e.kind() == io::ErrorKind::UnexpectedEof {
                                    TarError::Truncated(self.r.len())
                                } else {
                                    TarError::Io(e)
                                }
                            })?;
                            if left != 0 {
                                return Err(TarError::Truncated(self.r.len()));
                            }
                            d
                        }
                    };
                    if self.record {
                        self.segments.push(Segment::Object {
                            digest: d,
                            offset: 0,
                            len: size,
                        });
                    }
                    *digest = d;
                    *lsize = size;
                }
                Some((mut map, realsize, v1)) => {
                    let mut consumed = 0u64;
                    if h.typeflag == b'S' && h.isextended {
                        let (more, n) = self.read_gnu_sparse_ext(offset)?;
                        map.extend(more);
                        let _ = n;
                    }
                    if v1 {
                        let (m, n) = self.read_sparse_v1_map(offset)?;
                        map = m;
                        consumed = n;
                    }
                    let data_len: u64 = map.iter().map(|(_, n)| *n).sum();
                    if consumed + data_len != size {
                        return Err(TarError::Malformed {
                            offset,
                            reason: format!(
                                "sparse map describes {} data bytes but the entry has {}",
                                consumed + data_len,
                                size
                            ),
                        });
                    }
                    check_sparse_map(&map, realsize, offset)?;
                    self.flush_raw();
                    let d = {
                        let mut expanded = SparseReader {
                            inner: &mut self.r,
                            map: &map,
                            idx: 0,
                            pos: 0,
                            realsize,
                        };
                        sink.put(&mut expanded, realsize).map_err(|e| {
                            if e.kind() == io::ErrorKind::UnexpectedEof {
                                TarError::Truncated(offset)
                            } else {
                                TarError::Io(e)
                            }
                        })?
                    };
                    for (o, n) in &map {
                        if *n > 0 && self.record {
                            self.segments.push(Segment::Object {
                                digest: d,
                                offset: *o,
                                len: *n,
                            });
                        }
                    }
                    *digest = d;
                    *lsize = realsize;
                }
            }
            self.keep_raw(padding(size))?;
        } else if size > 0 {
            // Data on a non-file entry (dumpdir listings, odd writers): keep.
            self.keep_raw(size)?;
            self.keep_raw(padding(size))?;
        }
        self.entries.push(Entry {
            path,
            kind,
            mode: h.mode & 0o7777,
            uid: p.uid.unwrap_or(h.uid),
            gid: p.gid.unwrap_or(h.gid),
            mtime: p.mtime.unwrap_or(Timestamp {
                secs: h.mtime,
                nanos: 0,
            }),
            xattrs: p.xattrs,
        });
        Ok(())
    }

    /// Old GNU sparse extension blocks: 21 (offset, numbytes) pairs each.
    fn read_gnu_sparse_ext(&mut self, offset: u64) -> Result<(Vec<(u64, u64)>, u64), TarError> {
        let mut map = Vec::new();
        let mut n = 0;
        loop {
            let Some(b) = self.read_block()? else {
                return Err(TarError::Truncated(offset));
            };
            n += BLOCK as u64;
            for i in 0..21 {
                let o = &b[i * 24..i * 24 + 12];
                let l = &b[i * 24 + 12..i * 24 + 24];
                if o[0] == 0 {
                    break;
                }
                map.push((header::number(o, offset)?, header::number(l, offset)?));
            }
            if b[504] == 0 {
                return Ok((map, n));
            }
        }
    }

    /// PAX sparse 1.0: the map is decimal text at the start of the data
    /// area, padded to a block: count, then offset/size pairs, one per line.
    fn read_sparse_v1_map(&mut self, offset: u64) -> Result<(Vec<(u64, u64)>, u64), TarError> {
        let mut text: Vec<u8> = Vec::new();
        let mut numbers: Vec<u64> = Vec::new();
        let mut need: Option<usize> = None;
        let mut blocks = 0u64;
        let bad = |r: &str| TarError::Malformed {
            offset,
            reason: format!("sparse 1.0 map: {r}"),
        };
        loop {
            let Some(b) = self.read_block()? else {
                return Err(TarError::Truncated(offset));
            };
            blocks += 1;
            text.extend_from_slice(&b);
            // parse complete lines
            let mut start = 0;
            numbers.clear();
            for (i, c) in text.iter().enumerate() {
                if *c == b'\n' {
                    let s = std::str::from_utf8(&text[start..i]).map_err(|_| bad("not text"))?;
                    numbers.push(s.parse().map_err(|_| bad("not a number"))?);
                    start = i + 1;
                    if need.is_none() {
                        let count = numbers[0];
                        if count > 1_000_000 {
                            return Err(bad("too many entries"));
                        }
                        need = Some(1 + 2 * count as usize);
                    }
                    if need.is_some_and(|n| numbers.len() >= n) {
                        break;
                    }
                }
            }
            if let Some(n) = need
                && numbers.len() >= n
            {
                let map = numbers[1..n].chunks(2).map(|c| (c[0], c[1])).collect();
                return Ok((map, blocks * BLOCK as u64));
            }
            if blocks > 20_000 {
                return Err(bad("map too long"));
            }
        }
    }
}

fn check_sparse_map(map: &[(u64, u64)], realsize: u64, offset: u64) -> Result<(), TarError> {
    let mut end = 0u64;
    for (o, n) in map {
        let e = o.checked_add(*n).ok_or_else(|| TarError::Malformed {
            offset,
            reason: "sparse map overflows".into(),
        })?;
        if *o < end || e > realsize {
            return Err(TarError::Malformed {
                offset,
                reason: format!("sparse map entry {o}+{n} out of order or past size {realsize}"),
            });
        }
        end = e;
    }
    Ok(())
}

/// Expands a sparse file: zeros for holes, archive bytes for data segments.
struct SparseReader<'a, R: Read> {
    inner: &'a mut R,
    map: &'a [(u64, u64)],
    idx: usize,
    pos: u64,
    realsize: u64,
}

impl<R: Read> Read for SparseReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos >= self.realsize || buf.is_empty() {
            return Ok(0);
        }
        while self.idx < self.map.len() && self.map[self.idx].0 + self.map[self.idx].1 <= self.pos {
            self.idx += 1;
        }
        if let Some(&(o, n)) = self.map.get(self.idx)
            && self.pos >= o
        {
            let want = ((o + n - self.pos) as usize).min(buf.len());
            let got = self.inner.read(&mut buf[..want])?;
            if got == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "sparse data ended early",
                ));
            }
            self.pos += got as u64;
            return Ok(got);
        }
        let next = self.map.get(self.idx).map_or(self.realsize, |(o, _)| *o);
        let zeros = ((next - self.pos) as usize).min(buf.len());
        buf[..zeros].fill(0);
        self.pos += zeros as u64;
        Ok(zeros)
    }
}

/// Normalize an entry path; errors name why it is unsafe.
pub fn normalize(raw: &[u8]) -> Result<Vec<u8>, &'static str> {
    if raw.contains(&0) {
        return Err("NUL byte in path");
    }
    if raw.first() == Some(&b'/') {
        return Err("absolute path");
    }
    let mut out: Vec<u8> = Vec::with_capacity(raw.len());
    for comp in raw.split(|b| *b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err("path with a '..' component"),
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_contents_are_not_read() {
        // a header claiming 2^62 bytes, its content absent from the stream:
        // listed at once, with the sink's digest
        let mut h = [0u8; 512];
        h[..4].copy_from_slice(b"huge");
        h[100..108].copy_from_slice(b"0000644\0");
        h[108..116].copy_from_slice(b"0000000\0");
        h[116..124].copy_from_slice(b"0000000\0");
        h[124] = 0x80;
        h[128..136].copy_from_slice(&(1u64 << 62).to_be_bytes());
        h[136..148].copy_from_slice(b"00000000000\0");
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|b| *b as u32).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let mut tar = h.to_vec();
        tar.extend_from_slice(&[0u8; 1024]);
        struct Absent(u64);
        impl ObjectSink for Absent {
            fn put(&mut self, _: &mut dyn Read, _: u64) -> io::Result<Digest> {
                panic!("content read")
            }
            fn put_absent(&mut self, size: u64) -> Option<io::Result<Digest>> {
                self.0 = size;
                Some(Ok(Digest::sha256_of(b"x")))
            }
        }
        let mut sink = Absent(0);
        let entries = read_entries(&tar[..], &mut sink).unwrap();
        assert_eq!(sink.0, 1 << 62);
        assert_eq!(
            entries[0].kind,
            EntryKind::Regular {
                digest: Digest::sha256_of(b"x"),
                size: 1 << 62
            }
        );
    }

    #[test]
    fn normalize_table() {
        let ok: &[(&[u8], &[u8])] = &[
            (b"./", b""),
            (b".", b""),
            (b"./a/b/", b"a/b"),
            (b"a//b/./c", b"a/b/c"),
            (b"caf\xe9", b"caf\xe9"),
            (b"a/..b", b"a/..b"),
        ];
        for (i, o) in ok {
            assert_eq!(
                normalize(i).unwrap(),
                *o,
                "{:?}",
                String::from_utf8_lossy(i)
            );
        }
        assert_eq!(normalize(b"/etc/passwd"), Err("absolute path"));
        assert_eq!(normalize(b"a/../../x"), Err("path with a '..' component"));
        assert_eq!(normalize(b"../x"), Err("path with a '..' component"));
    }
}
