//! Finding and reading a zstd:chunked layer's TOC and tar-split, in both
//! layouts. Every byte is untrusted: the TOC is accepted only when its
//! compressed bytes hash to the checksum the (digest-covered) manifest
//! annotations name, and the tar-split only when it hashes to the TOC's
//! `tarSplitDigest`.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::io::Read;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::toc::{Toc, TocEntry};
use crate::{
    ANN_OLD_TOC_CHECKSUM, ANN_OLD_TOC_POSITION, ANN_TARSPLIT_POSITION, ANN_TOC_CHECKSUM,
    ANN_TOC_POSITION, ChunkedError, FOOTER_MAGIC, OLD_FOOTER_MAGIC, SKIPPABLE_MAGIC,
};

/// Largest TOC or tar-split accepted (compressed or not), like c/storage.
pub const MAX_METADATA: u64 = 150 << 20;

/// Most entries (files, directories, links, ... and `chunk` entries) one
/// layer's TOC may list by default: 2^20. A TOC costs a few hundred bytes
/// of memory per entry while it is checked; real layers list tens of
/// thousands (the tar-split's 150 MiB bound allows about 200 000 tar
/// entries anyway). Callers may pass a higher limit to
/// [`read_toc_entries`].
pub const MAX_TOC_ENTRIES: u64 = 1 << 20;

/// Most lines a tar-split may have by default (a file line and a segment
/// line or two per tar entry): 2^22.
pub const MAX_TAR_SPLIT_LINES: u64 = 1 << 22;

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

/// A reader that fails (instead of ending) once more than `left` bytes
/// come out of `inner`: decompressed metadata is never held beyond its
/// stated size, and a parser reading from it sees why it stopped.
struct Limited<R> {
    inner: R,
    left: u64,
    limit: u64,
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        // one byte past the limit tells "longer" from "exactly as long"
        let max = (buf.len() as u64).min(self.left.saturating_add(1)) as usize;
        let n = self.inner.read(&mut buf[..max])?;
        if n as u64 > self.left {
            return Err(std::io::Error::other(format!(
                "decompresses to more than its stated size ({} bytes)",
                self.limit
            )));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn decoder<'a>(
    z: &'a [u8],
    limit: u64,
    what: &str,
) -> Result<std::io::BufReader<Limited<impl Read + 'a>>, ChunkedError> {
    let d =
        zstd::stream::read::Decoder::with_buffer(z).map_err(|e| fmt_err(what, e.to_string()))?;
    Ok(std::io::BufReader::new(Limited {
        inner: d,
        left: limit,
        limit,
    }))
}

/// All of `z` decompressed, at most `limit` bytes (more fails, naming the
/// stated size). Parsing from memory is several times faster than from a
/// stream; the bytes are what the caller's budget already counted.
fn decompress_all(z: &[u8], limit: u64, what: &str) -> Result<Vec<u8>, ChunkedError> {
    // in one call, straight into the buffer: a stream would zero the
    // buffer and copy every byte once more (a fifth of a mount's parse)
    let cap = usize::try_from(limit.min(IN_MEMORY)).expect("16 MiB fits");
    let mut out = Vec::with_capacity(cap);
    let mut d = zstd::bulk::Decompressor::new().map_err(|e| fmt_err(what, e.to_string()))?;
    match d.decompress_to_buffer(z, &mut out) {
        Ok(_) => Ok(out),
        // zstd's name for output past the buffer: more than stated
        Err(e) if e.to_string().contains("too small") => Err(fmt_err(
            what,
            format!("not valid zstd: decompresses to more than its stated size ({limit} bytes)"),
        )),
        Err(e) => Err(fmt_err(what, format!("not valid zstd: {e}"))),
    }
}

/// Verify and parse a compressed TOC (the bytes at `loc.toc`), with at
/// most [`MAX_TOC_ENTRIES`] entries.
pub fn read_toc(toc_z: &[u8], loc: &TocLocation) -> Result<Toc, ChunkedError> {
    let mut entries = Vec::new();
    let head = read_toc_entries(toc_z, loc, MAX_TOC_ENTRIES, &mut |e| {
        entries.push(e);
        Ok(())
    })?;
    Ok(Toc {
        version: head.version,
        entries,
        tar_split_digest: head.tar_split_digest,
    })
}

/// A TOC's fields besides its entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TocHead {
    /// `version`.
    pub version: i64,
    /// `tarSplitDigest`.
    pub tar_split_digest: String,
}

/// Verify a compressed TOC and hand its entries to `each`, in order, as
/// they are parsed: its JSON is held (at most its stated size), its
/// entries are not, so what they cost is what `each` keeps. Fails when the TOC has
/// more than `max_entries` entries (naming the limit), when `each` fails,
/// or when it decompresses to more than `loc.toc.uncompressed` (at most
/// [`MAX_METADATA`]).
pub fn read_toc_entries(
    toc_z: &[u8],
    loc: &TocLocation,
    max_entries: u64,
    each: &mut dyn FnMut(TocEntry) -> Result<(), ChunkedError>,
) -> Result<TocHead, ChunkedError> {
    read_toc_with(toc_z, loc, max_entries, Owned(each))
}

/// [`read_toc_entries`] handing out [`TocEntryRef`]s: what a reader of
/// the layer needs of each entry, its strings borrowed from the TOC's
/// JSON where they hold no escapes, everything else (times, owners,
/// modes, xattrs: the tar-split has them) checked as JSON and skipped.
/// Several times less work than whole [`TocEntry`]s for a lazy mount's
/// first look at its layers.
pub fn read_toc_refs(
    toc_z: &[u8],
    loc: &TocLocation,
    max_entries: u64,
    each: &mut dyn for<'j> FnMut(TocEntryRef<'j>) -> Result<(), ChunkedError>,
) -> Result<TocHead, ChunkedError> {
    read_toc_with(toc_z, loc, max_entries, Borrowed { each, scan: true })
}

/// What a reader of a layer needs of a TOC entry (see [`TocEntry`] for
/// the fields), borrowed from the TOC's JSON where it can be.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct TocEntryRef<'j> {
    /// `type`.
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'j, str>,
    /// `name`.
    #[serde(borrow)]
    pub name: Cow<'j, str>,
    /// `linkName`.
    #[serde(rename = "linkName", default, borrow)]
    pub link_name: Cow<'j, str>,
    /// `size`.
    #[serde(default)]
    pub size: i64,
    /// `digest`.
    #[serde(default, borrow)]
    pub digest: Cow<'j, str>,
    /// `offset`.
    #[serde(default)]
    pub offset: i64,
    /// `endOffset`.
    #[serde(rename = "endOffset", default)]
    pub end_offset: i64,
    /// `chunkSize`.
    #[serde(rename = "chunkSize", default)]
    pub chunk_size: i64,
    /// `chunkOffset`.
    #[serde(rename = "chunkOffset", default)]
    pub chunk_offset: i64,
    /// `chunkDigest`.
    #[serde(rename = "chunkDigest", default, borrow)]
    pub chunk_digest: Cow<'j, str>,
    /// `chunkType`.
    #[serde(rename = "chunkType", default, borrow)]
    pub chunk_type: Cow<'j, str>,
}

/// A TOC's entries to `each` (see [`read_toc_entries`]).
fn read_toc_with<S: EntrySink>(
    toc_z: &[u8],
    loc: &TocLocation,
    max_entries: u64,
    mut each: S,
) -> Result<TocHead, ChunkedError> {
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
    let limit = loc.toc.uncompressed.min(MAX_METADATA);
    let mut failed = None;
    let parsed = if limit <= IN_MEMORY {
        let json = decompress_all(toc_z, limit, what)?;
        if let Some(each) = each.direct()
            && let Some(scanned) = crate::tocscan::scan(&json, max_entries, each)
        {
            return scanned;
        }
        let seed = TocSeed {
            max_entries,
            each: &mut each,
            failed: &mut failed,
        };
        parse_whole(serde_json::Deserializer::from_slice(&json), seed)
    } else {
        let seed = TocSeed {
            max_entries,
            each: &mut each,
            failed: &mut failed,
        };
        parse_whole(
            serde_json::Deserializer::from_reader(decoder(toc_z, limit, what)?),
            seed,
        )
    };
    match (parsed, failed) {
        (_, Some(e)) => Err(e),
        (Ok(h), None) => Ok(h),
        (Err(e), None) => Err(fmt_err(what, e.to_string())),
    }
}

/// Why serde_json refuses the TOC `json` (entries handed to nobody): the
/// words [`crate::tocscan`] reports a TOC it cannot read in.
pub(crate) fn serde_toc_error(json: &[u8], max_entries: u64) -> ChunkedError {
    // every entry parsed, none kept
    let mut nobody = Borrowed {
        each: &mut |_| Ok(()),
        scan: false,
    };
    let mut failed = None;
    let seed = TocSeed {
        max_entries,
        each: &mut nobody,
        failed: &mut failed,
    };
    match (
        parse_whole(serde_json::Deserializer::from_slice(json), seed),
        failed,
    ) {
        (_, Some(e)) => e,
        (Err(e), None) => fmt_err("zstd:chunked TOC", e.to_string()),
        // not refused after all: what the scan saw is all there is to say
        (Ok(_), None) => fmt_err("zstd:chunked TOC", "not read"),
    }
}

/// Where a TOC's entries go as they are parsed: one parsed from `seq`
/// at a time, and what taking it said (`None` at the end; not handed
/// on unless `take`).
trait EntrySink {
    fn next<'de, A: serde::de::SeqAccess<'de>>(
        &mut self,
        seq: &mut A,
        take: bool,
    ) -> Result<Option<Result<(), ChunkedError>>, A::Error>;

    /// Where [`TocEntryRef`]s go, for [`crate::tocscan`] (a TOC held in
    /// memory read without serde where it can be).
    #[allow(clippy::type_complexity)]
    fn direct(
        &mut self,
    ) -> Option<&mut dyn for<'j> FnMut(TocEntryRef<'j>) -> Result<(), ChunkedError>> {
        None
    }
}

/// Entries as [`TocEntry`]s.
struct Owned<'a>(&'a mut dyn FnMut(TocEntry) -> Result<(), ChunkedError>);

impl EntrySink for Owned<'_> {
    fn next<'de, A: serde::de::SeqAccess<'de>>(
        &mut self,
        seq: &mut A,
        take: bool,
    ) -> Result<Option<Result<(), ChunkedError>>, A::Error> {
        Ok(seq
            .next_element::<TocEntry>()?
            .map(|e| if take { (self.0)(e) } else { Ok(()) }))
    }
}

/// Entries as [`TocEntryRef`]s; `scan`: a TOC held in memory is read by
/// [`crate::tocscan`] (else by serde_json only).
struct Borrowed<'a> {
    each: &'a mut dyn for<'j> FnMut(TocEntryRef<'j>) -> Result<(), ChunkedError>,
    scan: bool,
}

impl EntrySink for Borrowed<'_> {
    fn next<'de, A: serde::de::SeqAccess<'de>>(
        &mut self,
        seq: &mut A,
        take: bool,
    ) -> Result<Option<Result<(), ChunkedError>>, A::Error> {
        Ok(seq
            .next_element::<TocEntryRef<'de>>()?
            .map(|e| if take { (self.each)(e) } else { Ok(()) }))
    }

    fn direct(
        &mut self,
    ) -> Option<&mut dyn for<'j> FnMut(TocEntryRef<'j>) -> Result<(), ChunkedError>> {
        self.scan.then_some(&mut *self.each)
    }
}

/// Metadata (a TOC, a tar-split) up to this size is decompressed whole
/// and parsed from memory, several times faster than from a stream; a
/// larger one is streamed, so what it costs stays what its caller keeps.
pub const IN_MEMORY: u64 = 16 << 20;

/// `seed` over all of `de`'s input.
fn parse_whole<'de, R: serde_json::de::Read<'de>, S: EntrySink>(
    mut de: serde_json::Deserializer<R>,
    seed: TocSeed<'_, S>,
) -> Result<TocHead, serde_json::Error> {
    let h = serde::de::DeserializeSeed::deserialize(seed, &mut de)?;
    de.end()?;
    Ok(h)
}

/// Parses the TOC object, handing entries out one at a time.
struct TocSeed<'a, S> {
    max_entries: u64,
    each: &'a mut S,
    /// Set when `each` failed (the parser only carries its own errors).
    failed: &'a mut Option<ChunkedError>,
}

impl<'de, S: EntrySink> serde::de::DeserializeSeed<'de> for TocSeed<'_, S> {
    type Value = TocHead;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<TocHead, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, S: EntrySink> serde::de::Visitor<'de> for TocSeed<'_, S> {
    type Value = TocHead;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a zstd:chunked TOC object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<TocHead, A::Error> {
        use serde::de::Error as _;
        let mut head = TocHead::default();
        let mut seen_entries = false;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match key.as_ref() {
                "version" => head.version = map.next_value()?,
                "tarSplitDigest" => head.tar_split_digest = map.next_value()?,
                "entries" => {
                    if seen_entries {
                        return Err(A::Error::custom("entries given twice"));
                    }
                    seen_entries = true;
                    map.next_value_seed(EntriesSeed {
                        max_entries: self.max_entries,
                        each: &mut *self.each,
                        failed: &mut *self.failed,
                    })?;
                }
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(head)
    }
}

struct EntriesSeed<'a, S> {
    max_entries: u64,
    each: &'a mut S,
    failed: &'a mut Option<ChunkedError>,
}

impl<'de, S: EntrySink> serde::de::DeserializeSeed<'de> for EntriesSeed<'_, S> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        // any: a list, or null (visit_unit)
        d.deserialize_any(self)
    }
}

impl<'de, S: EntrySink> serde::de::Visitor<'de> for EntriesSeed<'_, S> {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of TOC entries")
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        // `"entries": null`, as Go writes an empty list
        Ok(())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        use serde::de::Error as _;
        let mut n = 0u64;
        while let Some(taken) = self.each.next(&mut seq, n < self.max_entries)? {
            n += 1;
            if n > self.max_entries {
                *self.failed = Some(fmt_err(
                    "zstd:chunked TOC",
                    format!("more than {} entries (the limit)", self.max_entries),
                ));
                return Err(A::Error::custom("too many entries"));
            }
            if let Err(err) = taken {
                *self.failed = Some(err);
                return Err(A::Error::custom("entry refused"));
            }
        }
        Ok(())
    }
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
    /// Segment bytes, or a file's CRC-64: base64 in the line, decoded as
    /// the line is read (no copy of the text is kept), or why it did not
    /// decode (an error once the payload is asked for).
    #[serde(default, deserialize_with = "base64_payload")]
    payload: Option<Result<Vec<u8>, BadBase64>>,
    /// Line number.
    #[serde(default)]
    pub position: u64,
}

impl TarSplitEntry {
    /// The decoded payload.
    pub fn payload_bytes(&self) -> Result<Vec<u8>, ChunkedError> {
        self.payload().map(<[u8]>::to_vec)
    }

    /// The decoded payload, borrowed.
    pub fn payload(&self) -> Result<&[u8], ChunkedError> {
        match &self.payload {
            None => Ok(&[]),
            Some(Ok(p)) => Ok(p),
            Some(Err(e)) => Err(fmt_err("tar-split", format!("bad base64 payload: {e}"))),
        }
    }

    /// The decoded payload, taken out of the line.
    pub fn into_payload(self) -> Result<Vec<u8>, ChunkedError> {
        match self.payload {
            None => Ok(Vec::new()),
            Some(p) => p.map_err(|e| fmt_err("tar-split", format!("bad base64 payload: {e}"))),
        }
    }
}

/// Standard base64 with padding, as Go's `encoding/base64` writes it
/// (SIMD: a tar-split's payloads are most of its bytes, 6.5 MB for a
/// Debian + python layer).
fn decode_payload(b: &[u8]) -> Result<Vec<u8>, BadBase64> {
    base64_simd::STANDARD
        .decode_to_vec(b)
        .map_err(|_| BadBase64)
}

/// A payload that is not standard base64 with padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BadBase64;

impl std::fmt::Display for BadBase64 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("not standard base64 with padding")
    }
}

/// A tar-split line's `payload`: `null` or absent, or base64 decoded
/// straight from the JSON text (borrowed when it has no escapes).
fn base64_payload<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Result<Vec<u8>, BadBase64>>, D::Error> {
    struct Text;
    impl<'de> serde::de::Visitor<'de> for Text {
        type Value = Option<Result<Vec<u8>, BadBase64>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a base64 string or null")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(decode_payload(v.as_bytes())))
        }
        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D2: serde::Deserializer<'de>>(self, d: D2) -> Result<Self::Value, D2::Error> {
            d.deserialize_str(Text)
        }
    }
    d.deserialize_option(Text)
}

/// A tar-split line as Go's encoder writes it, read without serde: an
/// object of the known keys, each once, without whitespace, escapes or
/// control bytes in its strings, numbers as plain integers. `None` for
/// anything else, which serde then reads (or names what is wrong with):
/// what this accepts, serde reads the same (see the test).
fn fast_line(line: &[u8]) -> Option<TarSplitEntry> {
    use crate::tocscan::raw_string as string;
    /// A non-negative integer without leading zeros.
    fn uint(p: &[u8]) -> Option<(u64, &[u8])> {
        let n = p.iter().take_while(|b| b.is_ascii_digit()).count();
        if n == 0 || (n > 1 && p[0] == b'0') {
            return None;
        }
        let mut v: u64 = 0;
        for &d in &p[..n] {
            v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        }
        Some((v, &p[n..]))
    }
    let mut e = TarSplitEntry {
        kind: 0,
        name: None,
        size: 0,
        payload: None,
        position: 0,
    };
    let mut p = line.strip_prefix(b"{")?;
    let mut seen = 0u8;
    loop {
        let (key, rest) = string(p)?;
        p = rest.strip_prefix(b":")?;
        let bit = match key {
            b"type" => 1,
            b"name" => 2,
            b"size" => 4,
            b"payload" => 8,
            b"position" => 16,
            _ => return None,
        };
        if seen & bit != 0 {
            return None;
        }
        seen |= bit;
        p = match bit {
            1 => {
                let (v, rest) = uint(p)?;
                e.kind = u8::try_from(v).ok()?;
                rest
            }
            2 => {
                let (s, rest) = string(p)?;
                e.name = Some(std::str::from_utf8(s).ok()?.to_owned());
                rest
            }
            4 => {
                let (neg, digits) = match p.strip_prefix(b"-") {
                    Some(d) => (true, d),
                    None => (false, p),
                };
                let (v, rest) = uint(digits)?;
                let v = i64::try_from(v).ok()?;
                if neg && v == 0 {
                    return None;
                }
                e.size = if neg { -v } else { v };
                rest
            }
            8 => {
                let (s, rest) = string(p)?;
                if !s.is_ascii() {
                    return None;
                }
                e.payload = Some(decode_payload(s));
                rest
            }
            _ => {
                let (v, rest) = uint(p)?;
                e.position = v;
                rest
            }
        };
        let (rest, closed) = crate::tocscan::field_end(p)?;
        p = rest;
        if closed {
            break;
        }
    }
    (seen & 1 != 0 && p.is_empty()).then_some(e)
}

/// Verify (against the TOC's `tarSplitDigest`) and parse a tar-split, of
/// at most [`MAX_TAR_SPLIT_LINES`] lines.
pub fn read_tar_split(
    ts_z: &[u8],
    toc: &Toc,
    range: &Range,
) -> Result<Vec<TarSplitEntry>, ChunkedError> {
    let mut out = Vec::new();
    read_tar_split_lines(
        ts_z,
        &toc.tar_split_digest,
        range,
        MAX_TAR_SPLIT_LINES,
        &mut |e| {
            out.push(e);
            Ok(())
        },
    )?;
    Ok(out)
}

/// Verify a tar-split against `tar_split_digest` (the TOC's) and hand its
/// lines to `each` in order as they are parsed (its JSON is held, at most
/// its stated size; the lines are not). Fails past `max_lines` lines (naming the limit), when
/// `each` fails, or when it decompresses to more than `range.uncompressed`
/// (at most [`MAX_METADATA`]).
pub fn read_tar_split_lines(
    ts_z: &[u8],
    tar_split_digest: &str,
    range: &Range,
    max_lines: u64,
    each: &mut dyn FnMut(TarSplitEntry) -> Result<(), ChunkedError>,
) -> Result<(), ChunkedError> {
    check_tar_split_digest(&sha(ts_z), tar_split_digest)?;
    tar_split_lines(ts_z, range, max_lines, each)
}

/// A tar-split's sha256 (as `sha256:<hex>`) and its lines, parsed before
/// they are checked: for a caller that checks the digest against a TOC it
/// is parsing at the same time, and drops the lines when it differs. The
/// same bounds as [`read_tar_split_lines`] hold; the lines are held, so
/// callers keep this to tar-splits of at most [`IN_MEMORY`] bytes.
pub fn tar_split_unchecked(ts_z: &[u8], range: &Range, max_lines: u64) -> UncheckedTarSplit {
    let mut lines = Vec::new();
    let parsed = tar_split_lines(ts_z, range, max_lines, &mut |e| {
        lines.push(e);
        Ok(())
    });
    UncheckedTarSplit {
        digest: sha(ts_z),
        lines: parsed.map(|()| lines),
    }
}

/// What [`tar_split_unchecked`] found.
#[derive(Debug)]
pub struct UncheckedTarSplit {
    digest: String,
    lines: Result<Vec<TarSplitEntry>, ChunkedError>,
}

impl UncheckedTarSplit {
    /// The lines, once the tar-split's digest is `tar_split_digest` (the
    /// TOC's): the same errors as [`read_tar_split_lines`], the digest's
    /// first.
    pub fn check(self, tar_split_digest: &str) -> Result<Vec<TarSplitEntry>, ChunkedError> {
        check_tar_split_digest(&self.digest, tar_split_digest)?;
        self.lines
    }
}

fn check_tar_split_digest(got: &str, want: &str) -> Result<(), ChunkedError> {
    let what = "zstd:chunked tar-split";
    if want.is_empty() {
        return Err(fmt_err(what, "the TOC names no tarSplitDigest"));
    }
    if got != want {
        return Err(fmt_err(
            what,
            format!("digest {got} does not match the TOC's {want}"),
        ));
    }
    Ok(())
}

fn tar_split_lines(
    ts_z: &[u8],
    range: &Range,
    max_lines: u64,
    each: &mut dyn FnMut(TarSplitEntry) -> Result<(), ChunkedError>,
) -> Result<(), ChunkedError> {
    use std::io::BufRead as _;
    let what = "zstd:chunked tar-split";
    let limit = range.uncompressed.min(MAX_METADATA);
    let mut n = 0u64;
    let mut one = |line: &[u8]| -> Result<(), ChunkedError> {
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(());
        }
        n += 1;
        if n > max_lines {
            return Err(fmt_err(
                what,
                format!("more than {max_lines} lines (the limit)"),
            ));
        }
        let e = match fast_line(line) {
            Some(e) => e,
            None => {
                serde_json::from_slice(line).map_err(|e| fmt_err(what, format!("line {n}: {e}")))?
            }
        };
        each(e)
    };
    if limit <= IN_MEMORY {
        let all = decompress_all(ts_z, limit, what)?;
        let mut at = 0;
        for end in memchr::memchr_iter(b'\n', &all) {
            one(&all[at..end])?;
            at = end + 1;
        }
        return one(&all[at..]);
    }
    let mut r = decoder(ts_z, limit, what)?;
    let mut line = Vec::new();
    loop {
        line.clear();
        let got = r
            .read_until(b'\n', &mut line)
            .map_err(|e| fmt_err(what, format!("not valid zstd: {e}")))?;
        if got == 0 {
            return Ok(());
        }
        one(&line)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(z: &[u8], uncompressed: u64) -> TocLocation {
        TocLocation {
            layout: Layout::Current,
            toc: Range {
                offset: 0,
                len: z.len() as u64,
                uncompressed,
            },
            tar_split: None,
            checksum: None,
        }
    }

    #[test]
    fn tar_split_payloads_are_decoded_as_read_and_bad_ones_fail_when_used() {
        let line = |j: &str| serde_json::from_str::<TarSplitEntry>(j).unwrap();
        let e = line(r#"{"type":2,"payload":"QUJD","position":1}"#);
        assert_eq!(e.payload().unwrap(), b"ABC");
        assert_eq!(e.clone().into_payload().unwrap(), b"ABC");
        // an escape in the JSON text (not borrowed) decodes the same
        let e = line(r#"{"type":2,"payload":"QUJD"}"#);
        assert_eq!(e.payload_bytes().unwrap(), b"ABC");
        for j in [r#"{"type":2,"payload":null}"#, r#"{"type":1,"name":"a"}"#] {
            assert_eq!(line(j).payload().unwrap(), b"");
        }
        // not base64: the line reads, its payload is an error
        let e = line(r#"{"type":2,"payload":"!!!"}"#);
        let err = e.payload().unwrap_err().to_string();
        assert!(err.contains("bad base64 payload"), "{err}");
        assert!(e.into_payload().is_err());
        // not a string at all: the line does not parse
        assert!(serde_json::from_str::<TarSplitEntry>(r#"{"type":2,"payload":7}"#).is_err());
    }

    #[test]
    fn toc_entries_are_counted_and_streamed() {
        let json = br#"{"version":1,"entries":[{"type":"dir","name":"a"},{"type":"dir","name":"b"},{"type":"dir","name":"c"}],"x":[1,{"y":2}]}"#;
        let z = zstd::encode_all(&json[..], 1).unwrap();
        let mut seen = Vec::new();
        let head = read_toc_entries(&z, &loc(&z, json.len() as u64), 3, &mut |e| {
            seen.push(e.name);
            Ok(())
        })
        .unwrap();
        assert_eq!(head.version, 1);
        assert_eq!(seen, ["a", "b", "c"]);
        let e = read_toc_entries(&z, &loc(&z, json.len() as u64), 2, &mut |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than 2 entries (the limit)"), "{e}");
        // a callback's error is the error
        let e = read_toc_entries(&z, &loc(&z, json.len() as u64), 9, &mut |_| {
            Err(fmt_err("x", "refused by the caller"))
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("refused by the caller"), "{e}");
        // more bytes than the annotation says
        let e = read_toc(&z, &loc(&z, 20)).unwrap_err().to_string();
        assert!(e.contains("more than its stated size (20 bytes)"), "{e}");
        // `"entries": null` as Go writes an empty list
        let z = zstd::encode_all(&br#"{"version":1,"entries":null}"#[..], 1).unwrap();
        assert!(read_toc(&z, &loc(&z, 100)).unwrap().entries.is_empty());
    }

    /// The borrowed entries carry what the owned ones do, for strings with
    /// escapes (not borrowed) too, and the limit and a callback's error
    /// are what they are for owned entries.
    #[test]
    fn toc_refs_are_the_owned_entries_fields() {
        let json = br#"{"version":1,"entries":[
            {"type":"reg","name":"usr/bin/a\u00e9\"q","mode":493,"size":5,"uid":1,"modtime":"2024-01-01T00:00:00Z","xattrs":{"user.x":"eA=="},"digest":"sha256:aa","offset":10,"endOffset":30,"chunkSize":3,"chunkDigest":"sha256:bb"},
            {"type":"chunk","name":"usr/bin/a\u00e9\"q","offset":20,"endOffset":30,"chunkSize":2,"chunkOffset":3,"chunkDigest":"sha256:cc","chunkType":"zeros"},
            {"type":"symlink","name":"l","linkName":"usr/bin/a"}],"tarSplitDigest":"sha256:dd"}"#;
        let z = zstd::encode_all(&json[..], 1).unwrap();
        let l = loc(&z, json.len() as u64);
        let mut owned = Vec::new();
        let h1 = read_toc_entries(&z, &l, 9, &mut |e| {
            owned.push(e);
            Ok(())
        })
        .unwrap();
        let mut refs = Vec::new();
        let h2 = read_toc_refs(&z, &l, 9, &mut |e| {
            let own = |c: Cow<'_, str>| c.into_owned();
            refs.push(TocEntry {
                kind: own(e.kind),
                name: own(e.name),
                link_name: own(e.link_name),
                size: e.size,
                digest: own(e.digest),
                offset: e.offset,
                end_offset: e.end_offset,
                chunk_size: e.chunk_size,
                chunk_offset: e.chunk_offset,
                chunk_digest: own(e.chunk_digest),
                chunk_type: own(e.chunk_type),
                ..TocEntry::default()
            });
            Ok(())
        })
        .unwrap();
        assert_eq!(
            (h1.version, &h1.tar_split_digest),
            (1, &"sha256:dd".to_string())
        );
        assert_eq!(h1, h2);
        assert_eq!(owned[0].name, "usr/bin/a\u{e9}\"q");
        assert_eq!(owned.len(), 3);
        for (o, r) in owned.iter().zip(&refs) {
            let skipped = TocEntry {
                mode: 0,
                uid: 0,
                modtime: None,
                xattrs: Default::default(),
                ..o.clone()
            };
            assert_eq!(&skipped, r);
        }
        let e = read_toc_refs(&z, &l, 2, &mut |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than 2 entries (the limit)"), "{e}");
        let mut n = 0;
        let e = read_toc_refs(&z, &l, 9, &mut |_| {
            n += 1;
            Err(fmt_err("x", "refused by the caller"))
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("refused by the caller") && n == 1, "{e}");
        // a field of the wrong type is still an error, skipped or not
        for bad in [
            &br#"{"entries":[{"type":"reg","name":"a","size":"5"}]}"#[..],
            br#"{"entries":[{"type":"reg","name":"a","mode":{}"#,
        ] {
            let z = zstd::encode_all(bad, 1).unwrap();
            assert!(read_toc_refs(&z, &loc(&z, bad.len() as u64), 9, &mut |_| Ok(())).is_err());
        }
    }

    /// The scanner of TOCs held in memory gives what serde_json gives,
    /// for TOCs in the usual shape and for every way out of it: each
    /// entry, the head, and whether it fails.
    #[test]
    fn scanned_tocs_are_what_serde_reads() {
        type Got = Result<(TocHead, Vec<String>), String>;
        let run = |json: &str, max: u64, scan: bool| -> Got {
            let z = zstd::encode_all(json.as_bytes(), 1).unwrap();
            let l = loc(&z, json.len() as u64);
            let mut seen = Vec::new();
            let mut each = |e: TocEntryRef<'_>| {
                if e.name == "refuse-me" {
                    return Err(fmt_err("x", "refused by the caller"));
                }
                seen.push(format!("{e:?}"));
                Ok(())
            };
            let head = if scan {
                read_toc_refs(&z, &l, max, &mut each)
            } else {
                // through serde_json only, as a TOC too big to hold is read
                read_toc_with(
                    &z,
                    &l,
                    max,
                    Borrowed {
                        each: &mut each,
                        scan: false,
                    },
                )
            };
            head.map(|h| (h, seen)).map_err(|e| e.to_string())
        };
        let usual = r#"{"type":"reg","name":"usr/bin/a","mode":493,"size":5,"uid":1,"gid":2,"modtime":"2024-01-01T00:00:00Z","digest":"sha256:aa","offset":10,"endOffset":30,"chunkSize":3,"chunkDigest":"sha256:bb"}"#;
        let chunk = r#"{"type":"chunk","name":"usr/bin/a","offset":20,"chunkSize":2,"chunkOffset":3,"chunkDigest":"sha256:cc","chunkType":"zeros"}"#;
        let toc = |entries: &str| {
            format!(r#"{{"version":1,"entries":[{entries}],"tarSplitDigest":"sha256:dd"}}"#)
        };
        let odd_entries = [
            usual.to_string(),
            chunk.to_string(),
            r#"{"type":"symlink","name":"l","linkName":"usr/bin/a","devMajor":0,"devMinor":0,"accesstime":"x","changetime":"y"}"#.into(),
            r#"{"type":"reg","name":"a\"\u00e9","size":1}"#.into(),
            r#"{"type":"reg","na\u006de":"a"}"#.into(),
            r#"{"type":"reg","name":"a","foo":[1,{"b":null}]}"#.into(),
            r#"{"type":"reg","name":"a","xattrs":{"user.a":"eA=="}}"#.into(),
            r#"{"type":"reg","name":"a","mode":"abc","uid":1.5}"#.into(),
            r#"{"type":"reg","name":"a","modtime":"2024-01-01T00:00:00Z\u00e9"}"#.into(),
            r#"{"type":"reg","name":"a","modtime":"é"}"#.into(),
            r#"{"type":"reg","name":"a","size":-1,"offset":-9223372036854775808}"#.into(),
            r#"{"type":"reg","name":"a","size":5.0}"#.into(),
            r#"{"type":"reg","name":"a","size":1e2}"#.into(),
            r#"{"type":"reg","name":"a","size":9223372036854775808}"#.into(),
            r#"{"type":"reg","name":"a","size":-0}"#.into(),
            r#"{"type":"reg","name":"a","size":007}"#.into(),
            r#"{"type":null,"name":"a"}"#.into(),
            r#"{"type":"reg","name":"a","name":"b"}"#.into(),
            r#"{"type":"reg"}"#.into(),
            r#"{}"#.into(),
            r#"{ "type" : "reg" , "name" : "a" }"#.into(),
            r#"{"type":"reg","name":"refuse-me"}"#.into(),
            r#"{"type":"reg","name":"a"#.into(),
            r#"[1]"#.into(),
            r#"null"#.into(),
        ];
        let mut cases: Vec<(String, u64)> = Vec::new();
        for e in &odd_entries {
            cases.push((toc(&format!("{usual},{e},{chunk}")), 9));
            cases.push((toc(e), 9));
        }
        let three = format!("{usual},{chunk},{usual}");
        for (json, max) in [
            (toc(&three), 3),
            (toc(&three), 2),
            (toc(""), 9),
            (r#"{"version":1,"entries":null}"#.into(), 9),
            (r#"{"version":1,"entries":{}}"#.into(), 9),
            (r#"{"version":1,"entries":3}"#.into(), 9),
            (format!(r#"{{"entries":[{usual}],"entries":[]}}"#), 9),
            (
                format!(
                    r#"{{"x":{{"y":[1,2,{{"z":"\""}}]}},"entries":[{usual}],"w":null,"version":-3}}"#
                ),
                9,
            ),
            (
                format!(r#"{{"entri\u0065s":[{usual}],"tarSplitDigest":"a\nb"}}"#),
                9,
            ),
            (format!(r#"{{"version":"1","entries":[{usual}]}}"#), 9),
            (format!(r#"{{"version":1.0,"entries":[{usual}]}}"#), 9),
            (format!("{} ", toc(usual)), 9),
            (format!("{} x", toc(usual)), 9),
            (format!("{},", toc(usual)), 9),
            (format!(r#"{{"version":1,"entries":[{usual}] "x":1}}"#), 9),
            (format!(r#"{{"version":1,"entries":[{usual},]}}"#), 9),
            (format!(r#"{{"version":1,"entries":[{usual}]"#), 9),
            (format!(r#"{{"version":1 "entries":[{usual}]}}"#), 9),
            (format!(r#"{{"version":1,,"entries":[{usual}]}}"#), 9),
            (r#"{}"#.into(), 9),
            (r#"[]"#.into(), 9),
            (r#""toc""#.into(), 9),
            (String::new(), 9),
            (
                serde_json::to_string_pretty(
                    &serde_json::from_str::<serde_json::Value>(&toc(&three)).unwrap(),
                )
                .unwrap(),
                9,
            ),
        ] {
            cases.push((json, max));
        }
        let mut scanned_ok = 0;
        for (json, max) in &cases {
            let (a, b) = (run(json, *max, true), run(json, *max, false));
            match (&a, &b) {
                (Ok(x), Ok(y)) => {
                    assert_eq!(x, y, "{json}");
                    scanned_ok += 1;
                }
                (Err(x), Err(y)) => assert_eq!(x, y, "{json}"),
                _ => panic!("{json}: scanned {a:?}, serde {b:?}"),
            }
        }
        assert!(scanned_ok > 20, "{scanned_ok} of {} read", cases.len());
    }

    /// The SIMD decoder of payloads reads what Go's (and the base64
    /// crate's) standard encoding wrote, at every length, and refuses
    /// what that encoding refuses.
    #[test]
    fn payloads_decode_as_the_standard_encoding_wrote_them() {
        use base64::Engine as _;
        let std = base64::engine::general_purpose::STANDARD;
        let mut x: u32 = 7;
        for len in 0..700usize {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    (x >> 16) as u8
                })
                .collect();
            let text = std.encode(&bytes);
            assert_eq!(decode_payload(text.as_bytes()), Ok(bytes), "length {len}");
            for bad in [
                format!("{text}="),
                format!("!{text}"),
                text.trim_end_matches('=').to_string(),
            ] {
                if bad != text {
                    assert_eq!(
                        decode_payload(bad.as_bytes()).is_ok(),
                        std.decode(&bad).is_ok(),
                        "{bad:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn lines_read_without_serde_are_what_serde_reads() {
        let serde = |l: &[u8]| serde_json::from_slice::<TarSplitEntry>(l).ok();
        let lines: &[&str] = &[
            r#"{"type":2,"payload":"QUJD","position":1}"#,
            r#"{"type":1,"name":"usr/bin/x","size":5,"payload":"AAAAAAAAAAE=","position":2}"#,
            r#"{"payload":"LgAA","type":2,"position":0}"#,
            r#"{"type":1,"name":"caf\u00e9","size":1}"#,
            r#"{"type":1,"name":"a\"b","size":1}"#,
            r#"{"type":1,"name":"café","size":-3}"#,
            r#"{"type":1,"size":-0}"#,
            r#"{"type":1,"size":007}"#,
            r#"{"type":1,"size":1.5}"#,
            r#"{"type":256}"#,
            r#"{"type":2,"type":2}"#,
            r#"{"size":3}"#,
            r#"{"type":2,"payload":null}"#,
            r#"{"type":2,"payload":"!!!"}"#,
            r#"{"type":2,"name_raw":"YQ==","position":1}"#,
            r#"{"type":2, "position":1}"#,
            r#"{"type":2,"position":18446744073709551615}"#,
            r#"{"type":2,"position":18446744073709551616}"#,
            r#"{"type":1,"size":9223372036854775807}"#,
            r#"{"type":1,"size":-9223372036854775808}"#,
            r#"{"type":2}x"#,
            r#"{"type":2,}"#,
            r#"{}"#,
        ];
        let mut fast = 0;
        for l in lines {
            if let Some(e) = fast_line(l.as_bytes()) {
                fast += 1;
                assert_eq!(Some(e), serde(l.as_bytes()), "{l}");
            }
        }
        assert!(fast >= 5, "the usual lines take the fast path");
        // every byte of a usual line changed, dropped or doubled: whatever
        // the fast path accepts, serde reads the same
        let base = br#"{"type":1,"name":"a/b","size":12,"payload":"AAAAAAAAAAE=","position":7}"#;
        use rand::{Rng as _, SeedableRng as _};
        let mut rng = rand::rngs::StdRng::seed_from_u64(16);
        for i in 0..base.len() {
            for _ in 0..40 {
                let mut l = base.to_vec();
                match rng.random_range(0..3) {
                    0 => l[i] = rng.random(),
                    1 => {
                        l.remove(i);
                    }
                    _ => l.insert(i, l[i]),
                }
                if let Some(e) = fast_line(&l) {
                    assert_eq!(Some(e), serde(&l), "{}", String::from_utf8_lossy(&l));
                }
            }
        }
    }

    #[test]
    fn tar_split_lines_are_limited() {
        let text = b"{\"type\":2,\"payload\":\"AA==\"}\n{\"type\":1,\"name\":\"a\",\"size\":0}\n";
        let z = zstd::encode_all(&text[..], 1).unwrap();
        let digest = sha(&z);
        let r = Range {
            offset: 0,
            len: z.len() as u64,
            uncompressed: text.len() as u64,
        };
        let mut n = 0;
        read_tar_split_lines(&z, &digest, &r, 2, &mut |_| {
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 2);
        let e = read_tar_split_lines(&z, &digest, &r, 1, &mut |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than 1 lines (the limit)"), "{e}");
    }
}
