//! Finding and reading a zstd:chunked layer's TOC and tar-split, in both
//! layouts. Every byte is untrusted: the TOC is accepted only when its
//! compressed bytes hash to the checksum the (digest-covered) manifest
//! annotations name, and the tar-split only when it hashes to the TOC's
//! `tarSplitDigest`.

use std::collections::BTreeMap;
use std::io::Read;

use base64::Engine as _;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::toc::Toc;
use crate::{
    ANN_OLD_TOC_CHECKSUM, ANN_OLD_TOC_POSITION, ANN_TARSPLIT_POSITION, ANN_TOC_CHECKSUM,
    ANN_TOC_POSITION, ChunkedError, FOOTER_MAGIC, OLD_FOOTER_MAGIC, SKIPPABLE_MAGIC,
};

/// Largest TOC or tar-split accepted (compressed or not), like c/storage.
pub const MAX_METADATA: u64 = 150 << 20;

/// Which layout a layer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `io.github.containers.zstd-chunked.*`, 64-byte footer, tar-split.
    Current,
    /// `io.containers.zstd-chunked.*`, 40-byte footer, no tar-split.
    Old,
}

/// A byte range in the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// Offset.
    pub offset: u64,
    /// Compressed length.
    pub len: u64,
    /// Uncompressed length.
    pub uncompressed: u64,
}

/// Where a layer's metadata is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TocLocation {
    /// Layout.
    pub layout: Layout,
    /// The compressed TOC.
    pub toc: Range,
    /// The compressed tar-split (current layout).
    pub tar_split: Option<Range>,
    /// `sha256:<hex>` of the compressed TOC, from the annotations.
    pub checksum: Option<String>,
}

fn fmt_err(what: &str, reason: impl Into<String>) -> ChunkedError {
    ChunkedError::Format {
        what: what.into(),
        reason: reason.into(),
    }
}

fn nums(v: &str, n: usize, what: &str) -> Result<Vec<u64>, ChunkedError> {
    let parts: Vec<&str> = v.split(':').collect();
    if parts.len() != n {
        return Err(fmt_err(
            what,
            format!("{v:?} is not {n} numbers separated by ':'"),
        ));
    }
    parts
        .iter()
        .map(|p| {
            p.parse::<u64>()
                .map_err(|_| fmt_err(what, format!("{v:?}: {p:?} is not a number")))
        })
        .collect()
}

fn range(offset: u64, len: u64, uncompressed: u64, what: &str) -> Result<Range, ChunkedError> {
    if len > MAX_METADATA || uncompressed > MAX_METADATA {
        return Err(fmt_err(what, "larger than 150 MiB"));
    }
    Ok(Range {
        offset,
        len,
        uncompressed,
    })
}

/// The TOC location from a layer's annotations, if it is zstd:chunked.
pub fn locate(annotations: &BTreeMap<String, String>) -> Option<Result<TocLocation, ChunkedError>> {
    let (layout, pos_key, sum_key) = if annotations.contains_key(ANN_TOC_POSITION) {
        (Layout::Current, ANN_TOC_POSITION, ANN_TOC_CHECKSUM)
    } else if annotations.contains_key(ANN_OLD_TOC_POSITION) {
        (Layout::Old, ANN_OLD_TOC_POSITION, ANN_OLD_TOC_CHECKSUM)
    } else {
        return None;
    };
    Some((|| {
        let v = nums(&annotations[pos_key], 4, pos_key)?;
        if v[3] != 1 {
            return Err(fmt_err(pos_key, format!("manifest type {} is not 1", v[3])));
        }
        let toc = range(v[0], v[1], v[2], pos_key)?;
        let tar_split = match annotations.get(ANN_TARSPLIT_POSITION) {
            Some(s) if layout == Layout::Current => {
                let t = nums(s, 3, ANN_TARSPLIT_POSITION)?;
                Some(range(t[0], t[1], t[2], ANN_TARSPLIT_POSITION)?)
            }
            _ => None,
        };
        let checksum = annotations.get(sum_key).cloned();
        if checksum.is_none() {
            return Err(fmt_err(sum_key, "missing: the TOC cannot be verified"));
        }
        Ok(TocLocation {
            layout,
            toc,
            tar_split,
            checksum,
        })
    })())
}

/// The TOC location from the end of a blob (`tail` = its last 72 bytes or
/// more; `blob_size` its size). Without annotations the TOC cannot be
/// checked against the manifest; callers verify the whole blob instead.
pub fn parse_footer(tail: &[u8], blob_size: u64) -> Result<TocLocation, ChunkedError> {
    let what = "zstd:chunked footer";
    let check = |r: &Range| {
        if r.offset.checked_add(r.len).is_none_or(|e| e > blob_size) {
            Err(fmt_err(what, "points past the end of the blob"))
        } else {
            Ok(())
        }
    };
    if tail.len() >= 72 && tail[tail.len() - 8..] == *FOOTER_MAGIC {
        let f = &tail[tail.len() - 64..];
        if tail[tail.len() - 72..tail.len() - 68] != SKIPPABLE_MAGIC {
            return Err(fmt_err(what, "not in a skippable frame"));
        }
        let u = |i: usize| u64::from_le_bytes(f[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        if u(3) != 1 {
            return Err(fmt_err(what, format!("manifest type {} is not 1", u(3))));
        }
        let toc = range(u(0), u(1), u(2), what)?;
        let ts = range(u(4), u(5), u(6), what)?;
        check(&toc)?;
        check(&ts)?;
        return Ok(TocLocation {
            layout: Layout::Current,
            toc,
            tar_split: Some(ts),
            checksum: None,
        });
    }
    if tail.len() >= 48 && tail[tail.len() - 8..] == *OLD_FOOTER_MAGIC {
        let f = &tail[tail.len() - 40..];
        let u = |i: usize| u64::from_le_bytes(f[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        if u(3) != 1 {
            return Err(fmt_err(what, format!("manifest type {} is not 1", u(3))));
        }
        let toc = range(u(0), u(1), u(2), what)?;
        check(&toc)?;
        return Ok(TocLocation {
            layout: Layout::Old,
            toc,
            tar_split: None,
            checksum: None,
        });
    }
    Err(fmt_err(
        what,
        "no zstd:chunked footer magic at the end of the blob",
    ))
}

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn decompress(z: &[u8], limit: u64, what: &str) -> Result<Vec<u8>, ChunkedError> {
    let mut out = Vec::new();
    let d = zstd::stream::read::Decoder::new(z).map_err(|e| fmt_err(what, e.to_string()))?;
    d.take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| fmt_err(what, format!("not valid zstd: {e}")))?;
    if out.len() as u64 > limit {
        return Err(fmt_err(what, "decompresses to more than its stated size"));
    }
    Ok(out)
}

/// Verify and parse a compressed TOC (the bytes at `loc.toc`).
pub fn read_toc(toc_z: &[u8], loc: &TocLocation) -> Result<Toc, ChunkedError> {
    let what = "zstd:chunked TOC";
    if toc_z.len() as u64 != loc.toc.len {
        return Err(fmt_err(what, "wrong length"));
    }
    if let Some(want) = &loc.checksum {
        let got = sha(toc_z);
        if &got != want {
            return Err(fmt_err(
                what,
                format!("digest {got} does not match the annotation {want}"),
            ));
        }
    }
    let json = decompress(toc_z, loc.toc.uncompressed.min(MAX_METADATA), what)?;
    let toc: Toc = serde_json::from_slice(&json).map_err(|e| fmt_err(what, e.to_string()))?;
    Ok(toc)
}

/// One tar-split line.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct TarSplitEntry {
    /// 1 = file, 2 = segment.
    #[serde(rename = "type")]
    pub kind: u8,
    /// File name (files).
    #[serde(default)]
    pub name: Option<String>,
    /// File size (files).
    #[serde(default)]
    pub size: i64,
    /// Segment bytes, or a file's CRC-64 (base64).
    #[serde(default)]
    pub payload: Option<String>,
    /// Line number.
    #[serde(default)]
    pub position: u64,
}

impl TarSplitEntry {
    /// The decoded payload.
    pub fn payload_bytes(&self) -> Result<Vec<u8>, ChunkedError> {
        match &self.payload {
            None => Ok(Vec::new()),
            Some(p) => base64::engine::general_purpose::STANDARD
                .decode(p)
                .map_err(|e| fmt_err("tar-split", format!("bad base64 payload: {e}"))),
        }
    }
}

/// Verify (against the TOC's `tarSplitDigest`) and parse a tar-split.
pub fn read_tar_split(
    ts_z: &[u8],
    toc: &Toc,
    range: &Range,
) -> Result<Vec<TarSplitEntry>, ChunkedError> {
    let what = "zstd:chunked tar-split";
    if toc.tar_split_digest.is_empty() {
        return Err(fmt_err(what, "the TOC names no tarSplitDigest"));
    }
    let got = sha(ts_z);
    if got != toc.tar_split_digest {
        return Err(fmt_err(
            what,
            format!(
                "digest {got} does not match the TOC's {}",
                toc.tar_split_digest
            ),
        ));
    }
    let text = decompress(ts_z, range.uncompressed.min(MAX_METADATA), what)?;
    text.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).map_err(|e| fmt_err(what, e.to_string())))
        .collect()
}
