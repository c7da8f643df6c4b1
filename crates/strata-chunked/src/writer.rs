//! The zstd:chunked writer: one pass over the tar, frames cut at payloads
//! and chunk boundaries, then TOC, tar-split and footer.

use std::collections::{BTreeMap, HashSet};
use std::io::{self, Read, Write};

use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use strata_digest::Digest;
use zstd::stream::raw::{Encoder, InBuffer, Operation, OutBuffer};

use crate::gotar::{GoHeader, GoTarReader, Next};
use crate::rollsum::{Chunker, Event, Span};
use crate::toc::{Toc, TocEntry, format_time};
use crate::{
    ANN_TARSPLIT_POSITION, ANN_TOC_CHECKSUM, ANN_TOC_POSITION, ChunkedError, FOOTER_MAGIC,
    SKIPPABLE_MAGIC,
};

/// The tar-split's checksum (Go's `crc64.ISO`), folded with carry-less
/// multiplication where the CPU has it (15x the table's speed here).
const CRC64_GO_ISO: crc_fast::CrcAlgorithm = crc_fast::CrcAlgorithm::Crc64GoIso;

/// Writer options.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    /// zstd level for every frame (c/storage uses 10; readers do not care).
    pub level: i32,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions { level: 3 }
    }
}

/// What [`write_layer`] made.
#[derive(Debug, Clone)]
pub struct ChunkedLayer {
    /// SHA-256 of the uncompressed tar (unchanged by the conversion).
    pub diff_id: Digest,
    /// SHA-256 of the blob written.
    pub blob_digest: Digest,
    /// Blob size.
    pub blob_size: u64,
    /// The layer descriptor's annotations.
    pub annotations: BTreeMap<String, String>,
    /// The TOC written.
    pub toc: Toc,
}

/// Counts and hashes what goes to the output.
struct Out<W> {
    w: W,
    pos: u64,
    sha: Sha256,
}

impl<W: Write> Out<W> {
    fn put(&mut self, b: &[u8]) -> Result<(), ChunkedError> {
        self.w.write_all(b).map_err(|e| ChunkedError::Io {
            action: "writing the zstd:chunked blob".into(),
            source: e,
        })?;
        self.sha.update(b);
        self.pos += b.len() as u64;
        Ok(())
    }
}

/// zstd frames with one reused context; a frame is opened by the first
/// byte written and closed by [`Frames::end`].
struct Frames<W> {
    out: Out<W>,
    enc: Encoder<'static>,
    buf: Vec<u8>,
    open: bool,
}

fn zerr(e: io::Error) -> ChunkedError {
    ChunkedError::Io {
        action: "compressing with zstd".into(),
        source: e,
    }
}

impl<W: Write> Frames<W> {
    fn write(&mut self, mut data: &[u8]) -> Result<(), ChunkedError> {
        if data.is_empty() {
            return Ok(());
        }
        self.open = true;
        while !data.is_empty() {
            let mut input = InBuffer::around(data);
            let mut output = OutBuffer::around(&mut self.buf[..]);
            self.enc.run(&mut input, &mut output).map_err(zerr)?;
            let (read, written) = (input.pos(), output.pos());
            let chunk = &self.buf[..written];
            self.out.put(chunk)?;
            data = &data[read..];
        }
        Ok(())
    }

    /// Write `n` zero bytes, hashing them into `h` too.
    fn zeros(&mut self, mut n: u64, h: &mut Sha256) -> Result<(), ChunkedError> {
        static Z: [u8; 65536] = [0; 65536];
        while n > 0 {
            let k = n.min(Z.len() as u64) as usize;
            self.write(&Z[..k])?;
            h.update(&Z[..k]);
            n -= k as u64;
        }
        Ok(())
    }

    /// Close the open frame, if any; returns the blob position after it.
    fn end(&mut self) -> Result<u64, ChunkedError> {
        if self.open {
            loop {
                let mut output = OutBuffer::around(&mut self.buf[..]);
                let left = self.enc.finish(&mut output, true).map_err(zerr)?;
                let written = output.pos();
                let chunk = &self.buf[..written];
                self.out.put(chunk)?;
                if left == 0 {
                    break;
                }
            }
            self.enc.reinit().map_err(zerr)?;
            self.open = false;
        }
        Ok(self.out.pos)
    }
}

struct TarSplit {
    lines: Vec<u8>,
    position: u64,
}

impl TarSplit {
    fn segment(&mut self, raw: &[u8]) {
        let payload = if raw.is_empty() {
            serde_json::Value::Null
        } else {
            base64::engine::general_purpose::STANDARD.encode(raw).into()
        };
        let v = serde_json::json!({"type": 2, "payload": payload, "position": self.position});
        self.push(v);
    }

    fn file(&mut self, name: &str, size: i64, crc: Option<u64>) {
        let mut m = serde_json::Map::new();
        m.insert("type".into(), 1.into());
        m.insert("name".into(), name.into());
        if size != 0 {
            m.insert("size".into(), size.into());
        }
        m.insert(
            "payload".into(),
            match crc {
                Some(c) => base64::engine::general_purpose::STANDARD
                    .encode(c.to_be_bytes())
                    .into(),
                None => serde_json::Value::Null,
            },
        );
        m.insert("position".into(), self.position.into());
        self.push(serde_json::Value::Object(m));
    }

    fn push(&mut self, v: serde_json::Value) {
        serde_json::to_writer(&mut self.lines, &v).expect("writing JSON to a Vec");
        self.lines.push(b'\n');
        self.position += 1;
    }
}

/// Hash everything read (the diff_id).
struct HashRead<R> {
    r: R,
    sha: Sha256,
}

impl<R: Read> Read for HashRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.r.read(buf)?;
        self.sha.update(&buf[..n]);
        Ok(n)
    }
}

/// A tar name without `.`/`..` parts and leading or trailing slashes.
pub(crate) fn clean(name: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    parts.join("/")
}

fn entry_of(h: &GoHeader) -> TocEntry {
    let kind = match h.typeflag {
        b'0' => "reg",
        b'1' => "hardlink",
        b'2' => "symlink",
        b'3' => "char",
        b'4' => "block",
        b'5' => "dir",
        _ => "fifo",
    };
    TocEntry {
        kind: kind.into(),
        name: h.name.clone(),
        link_name: h.linkname.clone(),
        mode: h.mode,
        size: h.size,
        uid: h.uid,
        gid: h.gid,
        modtime: Some(format_time(h.mtime)),
        accesstime: h.atime.map(format_time),
        changetime: h.ctime.map(format_time),
        dev_major: h.devmajor,
        dev_minor: h.devminor,
        xattrs: h
            .xattrs
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    base64::engine::general_purpose::STANDARD.encode(v),
                )
            })
            .collect(),
        ..Default::default()
    }
}

fn sha_str(h: Sha256) -> String {
    format!("sha256:{}", hex::encode(h.finalize()))
}

struct Chunk {
    offset: u64,
    file_offset: u64,
    size: u64,
    digest: String,
    zeros: bool,
}

/// Convert the layer tar read from `tar` into a zstd:chunked blob written
/// to `out`. On [`ChunkedError::Unsupported`] part of a blob may have been
/// written: callers write to a temporary and fall back to plain zstd.
pub fn write_layer(
    tar: impl Read,
    out: impl Write,
    opts: &WriteOptions,
) -> Result<ChunkedLayer, ChunkedError> {
    let mut input = HashRead {
        r: tar,
        sha: Sha256::new(),
    };
    let mut reader = GoTarReader::new(&mut input);
    let mut frames = Frames {
        out: Out {
            w: out,
            pos: 0,
            sha: Sha256::new(),
        },
        enc: Encoder::new(opts.level).map_err(zerr)?,
        buf: vec![0; 128 * 1024],
        open: false,
    };
    let mut ts = TarSplit {
        lines: Vec::new(),
        position: 0,
    };
    let mut entries = Vec::new();
    let mut seen = HashSet::new();
    let mut data = vec![0u8; 256 * 1024];
    loop {
        match reader.next_header()? {
            Next::End { raw, trailing } => {
                frames.write(&raw)?;
                frames.write(&trailing)?;
                frames.end()?;
                if !raw.is_empty() {
                    ts.segment(&raw);
                }
                for piece in trailing.chunks(1 << 20) {
                    ts.segment(piece);
                }
                break;
            }
            Next::Entry { raw, header } => {
                frames.write(&raw)?;
                ts.segment(&raw);
                if !seen.insert(clean(&header.name)) {
                    return Err(ChunkedError::Unsupported(format!(
                        "{} appears twice in the tar",
                        header.name
                    )));
                }
                let mut e = entry_of(&header);
                let len = header.data_len();
                if len == 0 {
                    ts.file(&header.name, header.size, None);
                    entries.push(e);
                    continue;
                }
                frames.end()?;
                let mut file_sha = Sha256::new();
                let mut crc = crc_fast::Digest::new(CRC64_GO_ISO);
                let mut chunks: Vec<Chunk> = Vec::new();
                let mut cur: Option<(u64, u64, Sha256)> = None; // (blob offset, file offset, hash)
                let mut file_pos = 0u64;
                let mut chunker = Chunker::default();
                let mut left = len;
                let mut err: Option<ChunkedError> = None;
                // Handles one chunker event; zero runs are written and hashed here.
                let mut handle = |ev: Event,
                                  slice: &[u8],
                                  frames: &mut Frames<_>,
                                  file_pos: &mut u64|
                 -> Result<(), ChunkedError> {
                    match ev {
                        Event::Data(span) => {
                            if cur.is_none() {
                                cur = Some((frames.out.pos, *file_pos, Sha256::new()));
                            }
                            let h = &mut cur.as_mut().expect("set above").2;
                            match span {
                                Span::Input { start, len } => {
                                    let b = &slice[start..start + len];
                                    frames.write(b)?;
                                    h.update(b);
                                    *file_pos += len as u64;
                                }
                                Span::Zeros(n) => {
                                    frames.zeros(n, h)?;
                                    *file_pos += n;
                                }
                            }
                        }
                        Event::End | Event::Hole(_) => {
                            if let Some((off, fo, h)) = cur.take() {
                                frames.end()?;
                                chunks.push(Chunk {
                                    offset: off,
                                    file_offset: fo,
                                    size: *file_pos - fo,
                                    digest: sha_str(h),
                                    zeros: false,
                                });
                            }
                            if let Event::Hole(n) = ev {
                                let off = frames.out.pos;
                                let mut h = Sha256::new();
                                frames.zeros(n, &mut h)?;
                                frames.end()?;
                                chunks.push(Chunk {
                                    offset: off,
                                    file_offset: *file_pos,
                                    size: n,
                                    digest: sha_str(h),
                                    zeros: true,
                                });
                                *file_pos += n;
                            }
                        }
                    }
                    Ok(())
                };
                while left > 0 {
                    let want = (data.len() as u64).min(left) as usize;
                    let n = reader.read_data(&mut data[..want])?;
                    left -= n as u64;
                    let slice = &data[..n];
                    file_sha.update(slice);
                    crc.update(slice);
                    chunker.feed(slice, &mut |ev| {
                        if err.is_none()
                            && let Err(e) = handle(ev, slice, &mut frames, &mut file_pos)
                        {
                            err = Some(e);
                        }
                    });
                    if let Some(e) = err.take() {
                        return Err(e);
                    }
                }
                chunker.finish(&mut |ev| {
                    if err.is_none()
                        && let Err(e) = handle(ev, &[], &mut frames, &mut file_pos)
                    {
                        err = Some(e);
                    }
                });
                if let Some(e) = err.take() {
                    return Err(e);
                }
                let end = frames.end()?;
                e.digest = sha_str(file_sha);
                e.offset = chunks[0].offset as i64;
                e.end_offset = end as i64;
                let name = e.name.clone();
                if chunks.len() > 1 {
                    let c0 = &chunks[0];
                    e.chunk_size = c0.size as i64;
                    e.chunk_digest = c0.digest.clone();
                    if c0.zeros {
                        e.chunk_type = "zeros".into();
                    }
                }
                entries.push(e);
                if chunks.len() > 1 {
                    for c in &chunks[1..] {
                        entries.push(TocEntry {
                            kind: "chunk".into(),
                            name: name.clone(),
                            offset: c.offset as i64,
                            chunk_size: c.size as i64,
                            chunk_offset: c.file_offset as i64,
                            chunk_digest: c.digest.clone(),
                            chunk_type: if c.zeros {
                                "zeros".into()
                            } else {
                                String::new()
                            },
                            ..Default::default()
                        });
                    }
                }
                ts.file(&header.name, header.size, Some(crc.finalize()));
            }
        }
    }

    let diff_id = Digest::sha256_from_bytes(input.sha.finalize().into());

    // trailer: TOC, tar-split, footer
    let ts_z = zstd::bulk::compress(&ts.lines, opts.level).map_err(zerr)?;
    let toc = Toc {
        version: 1,
        entries,
        tar_split_digest: sha_str(Sha256::new_with_prefix(&ts_z)),
    };
    let toc_json = serde_json::to_vec(&toc).expect("a TOC serializes");
    let toc_z = zstd::bulk::compress(&toc_json, opts.level).map_err(zerr)?;
    let out = &mut frames.out;
    out.put(&SKIPPABLE_MAGIC)?;
    out.put(&(toc_z.len() as u32).to_le_bytes())?;
    let toc_off = out.pos;
    out.put(&toc_z)?;
    out.put(&SKIPPABLE_MAGIC)?;
    out.put(&(ts_z.len() as u32).to_le_bytes())?;
    let ts_off = out.pos;
    out.put(&ts_z)?;
    let mut footer = Vec::with_capacity(64);
    for v in [
        toc_off,
        toc_z.len() as u64,
        toc_json.len() as u64,
        1,
        ts_off,
        ts_z.len() as u64,
        ts.lines.len() as u64,
    ] {
        footer.extend_from_slice(&v.to_le_bytes());
    }
    footer.extend_from_slice(FOOTER_MAGIC);
    out.put(&SKIPPABLE_MAGIC)?;
    out.put(&(footer.len() as u32).to_le_bytes())?;
    out.put(&footer)?;
    out.w.flush().map_err(|e| ChunkedError::Io {
        action: "writing the zstd:chunked blob".into(),
        source: e,
    })?;
    let blob_size = out.pos;
    let blob_digest = Digest::sha256_from_bytes(std::mem::take(&mut out.sha).finalize().into());
    let annotations = BTreeMap::from([
        (
            ANN_TOC_CHECKSUM.to_string(),
            sha_str(Sha256::new_with_prefix(&toc_z)),
        ),
        (
            ANN_TOC_POSITION.to_string(),
            format!("{toc_off}:{}:{}:1", toc_z.len(), toc_json.len()),
        ),
        (
            ANN_TARSPLIT_POSITION.to_string(),
            format!("{ts_off}:{}:{}", ts_z.len(), ts.lines.len()),
        ),
    ]);
    Ok(ChunkedLayer {
        diff_id,
        blob_digest,
        blob_size,
        annotations,
        toc,
    })
}

#[cfg(test)]
mod crc_tests {
    use super::CRC64_GO_ISO;

    /// The tar-split's checksum is Go's `crc64.ISO`: the catalogue's check
    /// value, and the same fed in pieces as at once.
    #[test]
    fn the_file_checksum_is_gos_crc64_iso() {
        assert_eq!(
            crc_fast::checksum(CRC64_GO_ISO, b"123456789"),
            0xb909_56c7_75a4_1001
        );
        let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        let mut d = crc_fast::Digest::new(CRC64_GO_ISO);
        for piece in data.chunks(777) {
            d.update(piece);
        }
        assert_eq!(d.finalize(), crc_fast::checksum(CRC64_GO_ISO, &data));
    }
}
