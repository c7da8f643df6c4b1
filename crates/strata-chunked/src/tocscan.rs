//! A TOC's JSON read without serde where it has the shape Go's and
//! strata's writers give it: compact, keys and strings without escapes,
//! integers, the fields c/storage writes. A lazy mount reads every entry
//! of every layer before its first Prepare is answered; serde_json's
//! derived visitor spends most of that time matching keys and checking
//! strings it then skips.
//!
//! Nothing here decides what JSON means. Wherever a value leaves that
//! shape (an escape, whitespace, a float, `null`, a key twice, a field
//! not listed, `xattrs`), serde_json parses that value where it stands,
//! with the same types [`crate::reader::read_toc_refs`] uses, so what
//! comes out is what serde_json gives; malformed JSON is reported by
//! serde_json too.

use std::borrow::Cow;

use crate::ChunkedError;
use crate::reader::{TocEntryRef, TocHead};

fn err(reason: impl Into<String>) -> ChunkedError {
    ChunkedError::Format {
        what: "zstd:chunked TOC".into(),
        reason: reason.into(),
    }
}

/// JSON whitespace skipped.
fn ws(p: &[u8]) -> &[u8] {
    let n = p
        .iter()
        .take_while(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
        .count();
    &p[n..]
}

/// A string's bytes (none of them `\`, `"` or below 0x20) and what
/// follows its closing quote.
pub(crate) fn raw_string(p: &[u8]) -> Option<(&[u8], &[u8])> {
    let p = p.strip_prefix(b"\"")?;
    let end = memchr::memchr(b'"', p)?;
    let s = &p[..end];
    // no early exit: the loop vectorizes (a tar-split's payloads are most
    // of its bytes)
    let bad = s
        .iter()
        .fold(false, |bad, &b| bad | (b == b'\\') | (b < 0x20));
    (!bad).then(|| (s, &p[end + 1..]))
}

/// A string without escapes or control bytes, as UTF-8, and what follows
/// its closing quote.
fn string(p: &[u8]) -> Option<(&str, &[u8])> {
    let (s, rest) = raw_string(p)?;
    Some((std::str::from_utf8(s).ok()?, rest))
}

/// A JSON integer that fits an i64 (no fraction, exponent, leading zero
/// or `-0`), and what follows it.
fn int(p: &[u8]) -> Option<(i64, &[u8])> {
    let (neg, d) = match p.strip_prefix(b"-") {
        Some(d) => (true, d),
        None => (false, p),
    };
    let n = d.iter().take_while(|b| b.is_ascii_digit()).count();
    if n == 0 || (n > 1 && d[0] == b'0') || (neg && n == 1 && d[0] == b'0') {
        return None;
    }
    if matches!(d.get(n), Some(b'.' | b'e' | b'E')) {
        return None;
    }
    let mut v: i64 = 0;
    for &c in &d[..n] {
        let digit = i64::from(c - b'0');
        v = v.checked_mul(10)?;
        v = if neg {
            v.checked_sub(digit)?
        } else {
            v.checked_add(digit)?
        };
    }
    Some((v, &d[n..]))
}

/// After a field of a compact object: what follows its `,` (false), or
/// its closing `}` (true); `None` for anything else.
pub(crate) fn field_end(p: &[u8]) -> Option<(&[u8], bool)> {
    match p.split_first()? {
        (b',', rest) => Some((rest, false)),
        (b'}', rest) => Some((rest, true)),
        _ => None,
    }
}

/// One entry object at the start of `p` in the usual shape, and what
/// follows it; `None` where it leaves that shape.
fn fast_entry(p: &[u8]) -> Option<(TocEntryRef<'_>, &[u8])> {
    let mut e = TocEntryRef::default();
    let mut p = p.strip_prefix(b"{")?;
    let mut seen = 0u32;
    if p.first() == Some(&b'}') {
        // `{}` has neither type nor name: serde_json says so
        return None;
    }
    loop {
        let (key, rest) = string(p)?;
        p = rest.strip_prefix(b":")?;
        let bit: u32 = match key {
            "type" => 1,
            "name" => 1 << 1,
            "linkName" => 1 << 2,
            "size" => 1 << 3,
            "digest" => 1 << 4,
            "offset" => 1 << 5,
            "endOffset" => 1 << 6,
            "chunkSize" => 1 << 7,
            "chunkOffset" => 1 << 8,
            "chunkDigest" => 1 << 9,
            "chunkType" => 1 << 10,
            "mode" => 1 << 11,
            "uid" => 1 << 12,
            "gid" => 1 << 13,
            "devMajor" => 1 << 14,
            "devMinor" => 1 << 15,
            "modtime" => 1 << 16,
            "accesstime" => 1 << 17,
            "changetime" => 1 << 18,
            _ => return None,
        };
        if seen & bit != 0 {
            return None;
        }
        seen |= bit;
        p = match bit {
            1 | 2 | 4 | 16 | 512 | 1024 => {
                let (s, rest) = string(p)?;
                let s = Cow::Borrowed(s);
                match bit {
                    1 => e.kind = s,
                    2 => e.name = s,
                    4 => e.link_name = s,
                    16 => e.digest = s,
                    512 => e.chunk_digest = s,
                    _ => e.chunk_type = s,
                }
                rest
            }
            b if b < (1 << 16) => {
                let (v, rest) = int(p)?;
                match b {
                    8 => e.size = v,
                    32 => e.offset = v,
                    64 => e.end_offset = v,
                    128 => e.chunk_size = v,
                    256 => e.chunk_offset = v,
                    // mode, uid, gid, devMajor, devMinor: skipped
                    _ => {}
                }
                rest
            }
            _ => {
                // times, skipped: ASCII as Go writes them (serde_json
                // skips a string without checking its UTF-8)
                let (s, rest) = string(p)?;
                if !s.is_ascii() {
                    return None;
                }
                rest
            }
        };
        let (rest, closed) = field_end(p)?;
        p = rest;
        if closed {
            break;
        }
    }
    (seen & 3 == 3).then_some((e, p))
}

/// One value of type `T` at the start of `p`, parsed by serde_json, and
/// what follows it; `None` where serde_json refuses it.
fn serde_value<'j, T: serde::Deserialize<'j>>(p: &'j [u8]) -> Option<(T, &'j [u8])> {
    let mut it = serde_json::Deserializer::from_slice(p).into_iter::<T>();
    match it.next() {
        Some(Ok(v)) => {
            let used = it.byte_offset();
            Some((v, &p[used..]))
        }
        _ => None,
    }
}

/// Why a scan stopped.
enum Stop {
    /// The JSON is refused: the serde_json path says why, in its words.
    Refused,
    /// The caller's callback, or the limit on entries.
    Failed(ChunkedError),
}

/// The TOC in `json` (decompressed whole), its entries handed to `each`
/// in order, at most `max_entries`. `None`: the top level is not an
/// object (nothing was handed out; the serde_json path says why).
pub(crate) fn scan(
    json: &[u8],
    max_entries: u64,
    each: &mut dyn for<'x> FnMut(TocEntryRef<'x>) -> Result<(), ChunkedError>,
) -> Option<Result<TocHead, ChunkedError>> {
    let p = ws(json).strip_prefix(b"{")?;
    Some(match object(p, max_entries, each) {
        Ok(h) => Ok(h),
        Err(Stop::Failed(e)) => Err(e),
        // the JSON is refused, rarely: read once more by serde_json alone
        // (entries handed to nobody), which names the first fault as a
        // TOC too big to hold would have it named
        Err(Stop::Refused) => Err(crate::reader::serde_toc_error(json, max_entries)),
    })
}

fn object<'j>(
    mut p: &'j [u8],
    max_entries: u64,
    each: &mut dyn for<'x> FnMut(TocEntryRef<'x>) -> Result<(), ChunkedError>,
) -> Result<TocHead, Stop> {
    let mut head = TocHead::default();
    let mut seen_entries = false;
    p = ws(p);
    if let Some(rest) = p.strip_prefix(b"}") {
        return end(rest, head);
    }
    loop {
        p = ws(p);
        let (key, rest): (Cow<'j, str>, &[u8]) = match string(p) {
            Some((k, rest)) => (Cow::Borrowed(k), rest),
            None => serde_value(p).ok_or(Stop::Refused)?,
        };
        p = ws(ws(rest).strip_prefix(b":").ok_or(Stop::Refused)?);
        p = match key.as_ref() {
            "version" => {
                let (v, rest) = int(p)
                    .or_else(|| serde_value::<i64>(p))
                    .ok_or(Stop::Refused)?;
                head.version = v;
                rest
            }
            "tarSplitDigest" => {
                let (v, rest) = match string(p) {
                    Some((s, rest)) => (s.to_string(), rest),
                    None => serde_value::<String>(p).ok_or(Stop::Refused)?,
                };
                head.tar_split_digest = v;
                rest
            }
            "entries" => {
                if seen_entries {
                    return Err(Stop::Refused);
                }
                seen_entries = true;
                entries(p, max_entries, each)?
            }
            _ => {
                serde_value::<serde::de::IgnoredAny>(p)
                    .ok_or(Stop::Refused)?
                    .1
            }
        };
        p = ws(p);
        match p.split_first() {
            Some((b',', rest)) => p = rest,
            Some((b'}', rest)) => return end(rest, head),
            _ => return Err(Stop::Refused),
        }
    }
}

/// Only whitespace may follow the TOC object.
fn end(rest: &[u8], head: TocHead) -> Result<TocHead, Stop> {
    if ws(rest).is_empty() {
        Ok(head)
    } else {
        Err(Stop::Refused)
    }
}

/// The `entries` value at `p` (a list or `null`), each entry to `each`;
/// what follows it.
fn entries<'j>(
    p: &'j [u8],
    max_entries: u64,
    each: &mut dyn for<'x> FnMut(TocEntryRef<'x>) -> Result<(), ChunkedError>,
) -> Result<&'j [u8], Stop> {
    if let Some(rest) = p.strip_prefix(b"null") {
        return Ok(rest);
    }
    let mut p = ws(p.strip_prefix(b"[").ok_or(Stop::Refused)?);
    if let Some(rest) = p.strip_prefix(b"]") {
        return Ok(rest);
    }
    let mut n = 0u64;
    loop {
        p = ws(p);
        let (e, rest) = fast_entry(p)
            .or_else(|| serde_value::<TocEntryRef<'j>>(p))
            .ok_or(Stop::Refused)?;
        n += 1;
        if n > max_entries {
            return Err(Stop::Failed(err(format!(
                "more than {max_entries} entries (the limit)"
            ))));
        }
        each(e).map_err(Stop::Failed)?;
        p = ws(rest);
        match p.split_first() {
            Some((b',', rest)) => p = rest,
            Some((b']', rest)) => return Ok(rest),
            _ => return Err(Stop::Refused),
        }
    }
}
