//! The 512-byte header and the PAX extended header records.
//!
//! Layout (POSIX ustar; GNU reuses the prefix area for atime/ctime and the
//! old sparse map, which is why the prefix is read only for ustar magic):
//! name 0..100, mode 100..108, uid 108..116, gid 116..124, size 124..136,
//! mtime 136..148, chksum 148..156, typeflag 156, linkname 157..257,
//! magic 257..263, version 263..265, uname, gname, devmajor 329..337,
//! devminor 337..345, prefix 345..500 (ustar) | GNU: sparse 386..482,
//! isextended 482, realsize 483..495.

use std::collections::BTreeMap;

use base64::Engine as _;

use crate::{Pending, TarError, Timestamp};

pub(crate) struct Header {
    pub path: Vec<u8>,
    pub link: Vec<u8>,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    pub mtime: i64,
    pub typeflag: u8,
    pub devmajor: u32,
    pub devminor: u32,
    pub sparse: Vec<(u64, u64)>,
    pub isextended: bool,
    pub realsize: u64,
}

fn cstr(b: &[u8]) -> &[u8] {
    match b.iter().position(|c| *c == 0) {
        Some(n) => &b[..n],
        None => b,
    }
}

/// A numeric field: octal ASCII (spaces/NULs allowed around it) or GNU
/// base-256 (high bit of the first byte set).
pub(crate) fn number(field: &[u8], offset: u64) -> Result<u64, TarError> {
    if field.first().is_some_and(|b| b & 0x80 != 0) {
        if field[0] == 0xff {
            return Err(TarError::Malformed {
                offset,
                reason: "negative base-256 number".into(),
            });
        }
        let mut v: u64 = (field[0] & 0x7f) as u64;
        for b in &field[1..] {
            if v >> 56 != 0 {
                return Err(TarError::Malformed {
                    offset,
                    reason: "base-256 number too large".into(),
                });
            }
            v = (v << 8) | *b as u64;
        }
        return Ok(v);
    }
    let s = cstr(field);
    let s: Vec<u8> = s.iter().copied().filter(|c| *c != b' ').collect();
    if s.is_empty() {
        return Ok(0);
    }
    let mut v: u64 = 0;
    for c in &s {
        if !(b'0'..=b'7').contains(c) {
            return Err(TarError::Malformed {
                offset,
                reason: format!("bad octal number {:?}", String::from_utf8_lossy(field)),
            });
        }
        v = v
            .checked_mul(8)
            .and_then(|v| v.checked_add((c - b'0') as u64))
            .ok_or_else(|| TarError::Malformed {
                offset,
                reason: "octal number too large".into(),
            })?;
    }
    Ok(v)
}

impl Header {
    pub(crate) fn parse(b: &[u8; 512], offset: u64) -> Result<Header, TarError> {
        let stored = number(&b[148..156], offset)?;
        // the sums of every byte, the checksum field's 8 counted as spaces
        // (most tars sum unsigned; a few old ones signed)
        let (head, rest) = (&b[..148], &b[156..]);
        let unsigned: u64 = head.iter().chain(rest).map(|&c| u64::from(c)).sum::<u64>() + 8 * 32;
        let signed = || -> i64 {
            head.iter()
                .chain(rest)
                .map(|&c| i64::from(c as i8))
                .sum::<i64>()
                + 8 * 32
        };
        if stored != unsigned && stored as i64 != signed() {
            return Err(TarError::Malformed {
                offset,
                reason: format!("header checksum {stored} does not match {unsigned}"),
            });
        }
        let magic = &b[257..263];
        let ustar = magic == b"ustar\0";
        let gnu = &b[257..265] == b"ustar  \0";
        let mut path = cstr(&b[0..100]).to_vec();
        if ustar {
            let prefix = cstr(&b[345..500]);
            if !prefix.is_empty() {
                let mut p = prefix.to_vec();
                p.push(b'/');
                p.extend_from_slice(&path);
                path = p;
            }
        }
        let typeflag = b[156];
        let mut sparse = Vec::new();
        let mut isextended = false;
        let mut realsize = 0;
        if gnu && typeflag == b'S' {
            for i in 0..4 {
                let o = &b[386 + i * 24..386 + i * 24 + 12];
                let n = &b[386 + i * 24 + 12..386 + i * 24 + 24];
                if o[0] == 0 {
                    break;
                }
                sparse.push((number(o, offset)?, number(n, offset)?));
            }
            isextended = b[482] != 0;
            realsize = number(&b[483..495], offset)?;
        }
        let mtime_raw = &b[136..148];
        let mtime = if mtime_raw[0] == 0xff {
            // negative base-256: two's complement
            let mut v: i64 = -1;
            for c in mtime_raw {
                v = (v << 8) | *c as i64;
            }
            v
        } else {
            number(mtime_raw, offset)? as i64
        };
        let dev = |f: &[u8]| -> Result<u32, TarError> {
            if matches!(typeflag, b'3' | b'4') {
                Ok(number(f, offset)? as u32)
            } else {
                Ok(0)
            }
        };
        Ok(Header {
            path,
            link: cstr(&b[157..257]).to_vec(),
            mode: number(&b[100..108], offset)? as u32,
            uid: number(&b[108..116], offset)?,
            gid: number(&b[116..124], offset)?,
            size: number(&b[124..136], offset)?,
            mtime,
            typeflag,
            devmajor: dev(&b[329..337])?,
            devminor: dev(&b[337..345])?,
            sparse,
            isextended,
            realsize,
        })
    }
}

/// Parse PAX records (`LEN KEY=VALUE\n`) into `p`.
pub(crate) fn apply_pax(data: &[u8], p: &mut Pending, offset: u64) -> Result<(), TarError> {
    let bad = |r: String| TarError::Malformed {
        offset,
        reason: format!("pax header: {r}"),
    };
    let mut rest = data;
    let mut sparse_offsets: Vec<u64> = Vec::new();
    let mut sparse_sizes: Vec<u64> = Vec::new();
    // bsdtar writes every xattr twice: `LIBARCHIVE.xattr.` (url-encoded
    // name, base64 value: exact) and `SCHILY.xattr.` (with its name
    // url-encoded too). GNU tar writes only `SCHILY.xattr.` and encodes just
    // '%' and '=' in names. Prefer the exact form; decode GNU's escapes.
    let mut schily: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut libarchive: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    while !rest.is_empty() {
        if rest.iter().all(|b| *b == 0) {
            break;
        }
        let sp = rest
            .iter()
            .position(|b| *b == b' ')
            .ok_or_else(|| bad("record without length".into()))?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("bad record length".into()))?;
        if len <= sp + 1 || len > rest.len() || rest[len - 1] != b'\n' {
            return Err(bad(format!("record length {len} does not fit")));
        }
        let rec = &rest[sp + 1..len - 1];
        rest = &rest[len..];
        let eq = rec
            .iter()
            .position(|b| *b == b'=')
            .ok_or_else(|| bad("record without '='".into()))?;
        let (key, value) = (&rec[..eq], &rec[eq + 1..]);
        let num = |v: &[u8]| -> Result<u64, TarError> {
            std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad(format!("bad number for {}", String::from_utf8_lossy(key))))
        };
        match key {
            b"path" => {
                if value.contains(&0) {
                    return Err(bad("NUL in path".into()));
                }
                p.path = Some(value.to_vec());
            }
            b"linkpath" => p.link = Some(value.to_vec()),
            b"size" => p.size = Some(num(value)?),
            b"uid" => p.uid = Some(num(value)?),
            b"gid" => p.gid = Some(num(value)?),
            b"mtime" => p.mtime = Some(parse_time(value).ok_or_else(|| bad("bad mtime".into()))?),
            b"GNU.sparse.name" => p.sparse_name = Some(value.to_vec()),
            b"GNU.sparse.realsize" | b"GNU.sparse.size" => p.sparse_realsize = Some(num(value)?),
            b"GNU.sparse.major" => p.sparse_v1 = value == b"1",
            b"GNU.sparse.minor" => {}
            b"GNU.sparse.map" => {
                let nums: Result<Vec<u64>, _> = value
                    .split(|b| *b == b',')
                    .filter(|s| !s.is_empty())
                    .map(num)
                    .collect();
                let nums = nums?;
                if nums.len() % 2 != 0 {
                    return Err(bad("odd GNU.sparse.map".into()));
                }
                p.sparse_map = Some(nums.chunks(2).map(|c| (c[0], c[1])).collect());
            }
            b"GNU.sparse.offset" => sparse_offsets.push(num(value)?),
            b"GNU.sparse.numbytes" => sparse_sizes.push(num(value)?),
            _ => {
                if let Some(name) = key.strip_prefix(b"SCHILY.xattr.") {
                    schily.push((name.to_vec(), value.to_vec()));
                } else if let Some(name) = key.strip_prefix(b"LIBARCHIVE.xattr.") {
                    let name = url_decode(name).ok_or_else(|| bad("bad xattr name".into()))?;
                    let trimmed = value
                        .strip_suffix(b"==")
                        .or_else(|| value.strip_suffix(b"="));
                    let v = base64::engine::general_purpose::STANDARD_NO_PAD
                        .decode(trimmed.unwrap_or(value))
                        .map_err(|_| bad("bad base64 xattr value".into()))?;
                    libarchive.insert(name, v);
                }
            }
        }
    }
    for (name, value) in schily {
        let covered = url_decode(&name).is_some_and(|n| libarchive.contains_key(&n));
        if !covered {
            p.xattrs.insert(gnu_xattr_decode(&name), value);
        }
    }
    p.xattrs.extend(libarchive);
    if !sparse_offsets.is_empty() {
        if sparse_offsets.len() != sparse_sizes.len() {
            return Err(bad("GNU.sparse.offset/numbytes do not pair".into()));
        }
        p.sparse_map = Some(sparse_offsets.into_iter().zip(sparse_sizes).collect());
    }
    Ok(())
}

/// GNU tar escapes only '%' and '=' in xattr names.
fn gnu_xattr_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        match s.get(i..i + 3) {
            Some(b"%25") => {
                out.push(b'%');
                i += 3;
            }
            Some(b"%3D") | Some(b"%3d") => {
                out.push(b'=');
                i += 3;
            }
            _ => {
                out.push(s[i]);
                i += 1;
            }
        }
    }
    out
}

fn url_decode(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let h = std::str::from_utf8(s.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    Some(out)
}

/// `SECS[.FRACTION]`, possibly negative.
fn parse_time(v: &[u8]) -> Option<Timestamp> {
    let s = std::str::from_utf8(v).ok()?;
    let (neg, s) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s),
    };
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: i64 = int.parse().ok()?;
    let mut nanos: u32 = 0;
    if !frac.is_empty() {
        if !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
        nanos = digits.parse().ok()?;
    }
    if neg {
        if nanos > 0 {
            Some(Timestamp {
                secs: -secs - 1,
                nanos: 1_000_000_000 - nanos,
            })
        } else {
            Some(Timestamp {
                secs: -secs,
                nanos: 0,
            })
        }
    } else {
        Some(Timestamp { secs, nanos })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(number(b"0000644\0", 0).unwrap(), 0o644);
        assert_eq!(number(b"   644 \0", 0).unwrap(), 0o644);
        assert_eq!(number(b"\0\0\0\0", 0).unwrap(), 0);
        assert_eq!(number(&[0x80, 0, 0, 0, 0, 0, 0, 1, 0], 0).unwrap(), 256);
        assert!(number(b"0009", 0).is_err());
    }

    /// A ustar header named `name`, its checksum field `sum`.
    fn header_with(name: &[u8], sum: impl Fn(&[u8; 512]) -> i64) -> [u8; 512] {
        let mut b = [0u8; 512];
        b[..name.len()].copy_from_slice(name);
        for (f, v) in [(100..108, &b"0000644\0"[..]), (124..136, b"00000000000\0")] {
            b[f].copy_from_slice(v);
        }
        b[136..148].copy_from_slice(b"00000000000\0");
        b[156] = b'0';
        b[257..263].copy_from_slice(b"ustar\0");
        b[148..156].copy_from_slice(b"        ");
        let v = sum(&b);
        b[148..156].copy_from_slice(format!("{v:06o}\0 ").as_bytes());
        b
    }

    #[test]
    fn checksums_unsigned_and_signed_and_wrong() {
        let unsigned = |b: &[u8; 512]| -> i64 { b.iter().map(|&c| i64::from(c)).sum() };
        let signed = |b: &[u8; 512]| -> i64 { b.iter().map(|&c| i64::from(c as i8)).sum() };
        // a name with bytes above 127: the two sums differ
        let name = "caf\u{e9}".as_bytes();
        for sum in [&unsigned as &dyn Fn(&[u8; 512]) -> i64, &signed] {
            let h = Header::parse(&header_with(name, sum), 0).unwrap();
            assert_eq!(h.path, name);
        }
        let off_by_one = |b: &[u8; 512]| unsigned(b) + 1;
        let err = match Header::parse(&header_with(name, off_by_one), 0) {
            Ok(_) => panic!("a wrong checksum parsed"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("header checksum"), "{err}");
    }

    fn pax(records: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (k, v) in records {
            let base = k.len() + v.len() + 3;
            let mut len = base + 1;
            while len.to_string().len() + base != len {
                len = base + len.to_string().len();
            }
            out.extend_from_slice(len.to_string().as_bytes());
            out.push(b' ');
            out.extend_from_slice(k);
            out.push(b'=');
            out.extend_from_slice(v);
            out.push(b'\n');
        }
        out
    }

    #[test]
    fn xattrs_from_schily_and_libarchive_records() {
        // bsdtar: both forms, names url-encoded in both.
        let data = pax(&[
            (b"LIBARCHIVE.xattr.user.we%20ird%25", b"AQI"),
            (b"SCHILY.xattr.user.we%20ird%25", b"\x01\x02"),
            (b"LIBARCHIVE.xattr.user.test", b"dmFsdWU="),
            (b"SCHILY.xattr.user.test", b"value"),
            (b"mtime", b"1.5"),
        ]);
        let mut p = Pending::default();
        apply_pax(&data, &mut p, 0).unwrap();
        let want: Vec<(&[u8], &[u8])> =
            vec![(b"user.test", b"value"), (b"user.we ird%", b"\x01\x02")];
        let got: Vec<(&[u8], &[u8])> = p
            .xattrs
            .iter()
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect();
        assert_eq!(got, want);
        // GNU tar: only SCHILY, with '%' and '=' escaped.
        let data = pax(&[(b"SCHILY.xattr.user.a%3Db%25c d", b"v=1")]);
        let mut p = Pending::default();
        apply_pax(&data, &mut p, 0).unwrap();
        assert_eq!(p.xattrs.get(&b"user.a=b%c d"[..]).unwrap(), b"v=1");
        // NUL in a PAX path is refused.
        let data = pax(&[(b"path", b"a\0b")]);
        assert!(apply_pax(&data, &mut Pending::default(), 0).is_err());
    }

    #[test]
    fn times() {
        assert_eq!(
            parse_time(b"1700000000.123456789"),
            Some(Timestamp {
                secs: 1700000000,
                nanos: 123456789
            })
        );
        assert_eq!(
            parse_time(b"5.5"),
            Some(Timestamp {
                secs: 5,
                nanos: 500_000_000
            })
        );
        assert_eq!(
            parse_time(b"-1.25"),
            Some(Timestamp {
                secs: -2,
                nanos: 750_000_000
            })
        );
        assert_eq!(parse_time(b"x"), None);
    }
}
