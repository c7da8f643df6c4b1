//! A tar reader with Go `archive/tar` semantics, for building TOCs.
//!
//! c/storage checks that every TOC entry equals what Go's tar reader makes
//! of the tar-split headers (name, link name, raw mode, size, ids, times,
//! device numbers, `SCHILY.xattr.*`), so names here are *not* normalized:
//! `./usr/` stays `./usr/`. The reader also hands back the exact bytes each
//! header consumed (the padding of the previous payload, PAX/GNU meta
//! headers, the header block), which become the tar-split segments and the
//! metadata frames.
//!
//! Refused (as [`ChunkedError::Unsupported`]): global PAX headers, sparse
//! files (GNU `S` or PAX `GNU.sparse.*`), other unknown types, non-UTF-8
//! names, header-only types (links, dirs, devices) whose size field is not
//! zero. c/storage's own writer fails on the same inputs.

use std::collections::BTreeMap;
use std::io::{self, Read};

use crate::ChunkedError;

const BLOCK: usize = 512;

/// A time as Go's tar reader gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoTime {
    /// Seconds since the epoch.
    pub secs: i64,
    /// Nanoseconds.
    pub nanos: u32,
}

/// One header as Go's `tar.Reader.Next` returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoHeader {
    /// Type flag after Go's mapping (`'\0'` becomes `'0'` or `'5'`).
    pub typeflag: u8,
    /// Name: PAX `path`, else GNU long name, else ustar prefix + "/" + name.
    pub name: String,
    /// Link name: PAX `linkpath`, else GNU long link, else the field.
    pub linkname: String,
    /// The mode field as a number (permission and special bits).
    pub mode: i64,
    /// Owner.
    pub uid: i64,
    /// Group.
    pub gid: i64,
    /// Size field.
    pub size: i64,
    /// Modification time.
    pub mtime: GoTime,
    /// Access time, when the tar carries one.
    pub atime: Option<GoTime>,
    /// Change time, when the tar carries one.
    pub ctime: Option<GoTime>,
    /// Device major.
    pub devmajor: i64,
    /// Device minor.
    pub devminor: i64,
    /// `SCHILY.xattr.<name>` PAX records (empty values kept).
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

impl GoHeader {
    /// Bytes of payload that follow the header in the tar.
    pub fn data_len(&self) -> u64 {
        if header_only(self.typeflag) {
            0
        } else {
            self.size.max(0) as u64
        }
    }
}

fn header_only(t: u8) -> bool {
    matches!(t, b'1' | b'2' | b'3' | b'4' | b'5' | b'6')
}

/// What [`GoTarReader::next_header`] returns.
#[derive(Debug)]
pub enum Next {
    /// An entry: the raw bytes `Next()` consumed and the header. Its
    /// payload is read with [`GoTarReader::read_data`].
    Entry {
        /// Padding of the previous payload + this entry's header blocks.
        raw: Vec<u8>,
        /// The header.
        header: GoHeader,
    },
    /// End of archive: the raw bytes up to and including the end blocks,
    /// then every byte after them.
    End {
        /// Padding of the last payload + the end-of-archive blocks.
        raw: Vec<u8>,
        /// Whatever follows (e.g. GNU tar's record padding).
        trailing: Vec<u8>,
    },
}

/// Streaming reader; see the module docs.
pub struct GoTarReader<R> {
    r: R,
    offset: u64,
    /// Payload bytes of the current entry not read yet.
    remaining: u64,
    /// Padding after the current payload.
    pad: u64,
    done: bool,
}

fn tar_err(offset: u64, reason: impl Into<String>) -> ChunkedError {
    ChunkedError::Tar {
        offset,
        reason: reason.into(),
    }
}

fn io_err(e: io::Error) -> ChunkedError {
    ChunkedError::Io {
        action: "reading the layer tar".into(),
        source: e,
    }
}

fn cstr(b: &[u8]) -> &[u8] {
    match b.iter().position(|c| *c == 0) {
        Some(n) => &b[..n],
        None => b,
    }
}

/// Go's `parseNumeric`: base-256 when the high bit is set, else octal with
/// surrounding spaces and NULs ignored.
fn numeric(f: &[u8], offset: u64) -> Result<i64, ChunkedError> {
    if f.first().is_some_and(|b| b & 0x80 != 0) {
        let neg = f[0] & 0x40 != 0;
        let inv = if neg { 0xff } else { 0 };
        let mut x: u64 = 0;
        for (i, b) in f.iter().enumerate() {
            let mut c = b ^ inv;
            if i == 0 {
                c &= 0x7f;
            }
            if x >> 56 != 0 {
                return Err(tar_err(offset, "base-256 number overflows"));
            }
            x = (x << 8) | c as u64;
        }
        if x >> 63 != 0 {
            return Err(tar_err(offset, "base-256 number overflows"));
        }
        return Ok(if neg { !(x as i64) } else { x as i64 });
    }
    let s = cstr(f);
    let t: &[u8] = {
        let a = s.iter().position(|c| *c != b' ').unwrap_or(s.len());
        let b = s.iter().rposition(|c| *c != b' ').map_or(a, |p| p + 1);
        &s[a..b.max(a)]
    };
    if t.is_empty() {
        return Ok(0);
    }
    let mut v: i64 = 0;
    for c in t {
        if !(b'0'..=b'7').contains(c) {
            return Err(tar_err(
                offset,
                format!("bad octal number {:?}", String::from_utf8_lossy(f)),
            ));
        }
        v = v
            .checked_mul(8)
            .and_then(|v| v.checked_add((c - b'0') as i64))
            .ok_or_else(|| tar_err(offset, "octal number overflows"))?;
    }
    Ok(v)
}

/// A PAX time: `[-]secs[.fraction]`, fraction truncated to nanoseconds.
fn pax_time(v: &str, offset: u64) -> Result<GoTime, ChunkedError> {
    let bad = || tar_err(offset, format!("bad PAX time {v:?}"));
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    let neg = int.starts_with('-');
    let secs: i64 = int.parse().map_err(|_| bad())?;
    if !frac.bytes().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let mut digits: String = frac.chars().take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    let nanos: u32 = digits.parse().map_err(|_| bad())?;
    // Go: a negative time with a fraction counts down from secs.
    if neg && nanos > 0 {
        Ok(GoTime {
            secs: secs - 1,
            nanos: 1_000_000_000 - nanos,
        })
    } else {
        Ok(GoTime { secs, nanos })
    }
}

/// PAX records `"%d %s=%s\n"`.
fn pax_records(data: &[u8], offset: u64) -> Result<Vec<(String, Vec<u8>)>, ChunkedError> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let sp = rest
            .iter()
            .position(|c| *c == b' ')
            .ok_or_else(|| tar_err(offset, "PAX record without length"))?;
        let len: usize = std::str::from_utf8(&rest[..sp])
            .ok()
            .and_then(|s| s.parse().ok())
            .filter(|l| *l > sp + 1 && *l <= rest.len())
            .ok_or_else(|| tar_err(offset, "bad PAX record length"))?;
        let rec = &rest[sp + 1..len];
        let rec = rec
            .strip_suffix(b"\n")
            .ok_or_else(|| tar_err(offset, "PAX record not ending in newline"))?;
        let eq = rec
            .iter()
            .position(|c| *c == b'=')
            .ok_or_else(|| tar_err(offset, "PAX record without '='"))?;
        let key = String::from_utf8(rec[..eq].to_vec())
            .map_err(|_| tar_err(offset, "PAX key is not UTF-8"))?;
        out.push((key, rec[eq + 1..].to_vec()));
        rest = &rest[len..];
    }
    Ok(out)
}

fn utf8(b: Vec<u8>, what: &str) -> Result<String, ChunkedError> {
    String::from_utf8(b).map_err(|e| {
        ChunkedError::Unsupported(format!(
            "{what} {:?} is not UTF-8 (a TOC is JSON)",
            String::from_utf8_lossy(e.as_bytes())
        ))
    })
}

impl<R: Read> GoTarReader<R> {
    /// Read a tar from `r`.
    pub fn new(r: R) -> Self {
        GoTarReader {
            r,
            offset: 0,
            remaining: 0,
            pad: 0,
            done: false,
        }
    }

    /// Bytes consumed so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<usize, ChunkedError> {
        let mut n = 0;
        while n < buf.len() {
            match self.r.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(e)),
            }
        }
        self.offset += n as u64;
        Ok(n)
    }

    fn read_exact_into(&mut self, raw: &mut Vec<u8>, n: usize) -> Result<(), ChunkedError> {
        let start = raw.len();
        raw.resize(start + n, 0);
        let got = self.fill(&mut raw[start..])?;
        if got < n {
            return Err(tar_err(self.offset, "unexpected end of tar"));
        }
        Ok(())
    }

    /// Read payload bytes of the current entry; 0 at its end.
    pub fn read_data(&mut self, buf: &mut [u8]) -> Result<usize, ChunkedError> {
        let want = (buf.len() as u64).min(self.remaining) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.fill(&mut buf[..want])?;
        if n == 0 {
            return Err(tar_err(self.offset, "unexpected end of tar inside a file"));
        }
        self.remaining -= n as u64;
        Ok(n)
    }

    /// The next header (skipping the unread payload of the current entry
    /// into nothing: callers are expected to read payloads whole).
    pub fn next_header(&mut self) -> Result<Next, ChunkedError> {
        if self.done {
            return Err(tar_err(self.offset, "read past the end of the archive"));
        }
        let mut raw = Vec::new();
        if self.remaining > 0 {
            return Err(tar_err(
                self.offset,
                "payload not read before the next header",
            ));
        }
        let pad = std::mem::take(&mut self.pad) as usize;
        self.read_exact_into(&mut raw, pad)?;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        loop {
            let at = self.offset;
            let start = raw.len();
            raw.resize(start + BLOCK, 0);
            let got = self.fill(&mut raw[start..])?;
            if got == 0 {
                raw.truncate(start);
                // Go: end of stream without end blocks is a clean end.
                self.done = true;
                return Ok(Next::End {
                    raw,
                    trailing: Vec::new(),
                });
            }
            if got < BLOCK {
                return Err(tar_err(at, "truncated header block"));
            }
            let blk: [u8; BLOCK] = raw[start..].try_into().expect("one block");
            if blk.iter().all(|b| *b == 0) {
                let s2 = raw.len();
                raw.resize(s2 + BLOCK, 0);
                let got = self.fill(&mut raw[s2..])?;
                raw.truncate(s2 + got);
                if got == BLOCK && !raw[s2..].iter().all(|b| *b == 0) {
                    return Err(tar_err(
                        at + BLOCK as u64,
                        "a single zero block inside the archive",
                    ));
                }
                self.done = true;
                let mut trailing = Vec::new();
                self.r.read_to_end(&mut trailing).map_err(io_err)?;
                self.offset += trailing.len() as u64;
                return Ok(Next::End { raw, trailing });
            }
            // checksum: unsigned sum with the field as spaces (Go also
            // accepts the signed sum)
            let want = numeric(&blk[148..156], at)?;
            let (mut us, mut ss) = (0i64, 0i64);
            for (i, b) in blk.iter().enumerate() {
                let c = if (148..156).contains(&i) { b' ' } else { *b };
                us += c as i64;
                ss += c as i8 as i64;
            }
            if want != us && want != ss {
                return Err(tar_err(at, "header checksum mismatch"));
            }
            let typeflag = blk[156];
            let size = numeric(&blk[124..136], at)?;
            match typeflag {
                b'x' | b'L' | b'K' | b'g' => {
                    if !(0..=16 << 20).contains(&size) {
                        return Err(tar_err(at, "meta header larger than 16 MiB"));
                    }
                    let n = size as usize;
                    let s = raw.len();
                    self.read_exact_into(&mut raw, n.next_multiple_of(BLOCK))?;
                    let data = raw[s..s + n].to_vec();
                    match typeflag {
                        b'x' => pax.extend(pax_records(&data, at)?),
                        b'L' => long_name = Some(cstr(&data).to_vec()),
                        b'K' => long_link = Some(cstr(&data).to_vec()),
                        _ => {
                            return Err(ChunkedError::Unsupported(
                                "a global PAX header ('g')".into(),
                            ));
                        }
                    }
                    continue;
                }
                b'S' => {
                    return Err(ChunkedError::Unsupported("a GNU sparse file ('S')".into()));
                }
                _ => {}
            }
            let magic = &blk[257..263];
            let version = &blk[263..265];
            let ustar = magic == b"ustar\0" && version == b"00";
            let gnu = magic == b"ustar " && version == b" \0";
            let star = ustar && &blk[508..512] == b"tar\0";
            let mut name = cstr(&blk[0..100]).to_vec();
            let mut atime = None;
            let mut ctime = None;
            if ustar {
                let prefix = if star {
                    cstr(&blk[345..476])
                } else {
                    cstr(&blk[345..500])
                };
                if !prefix.is_empty() {
                    let mut p = prefix.to_vec();
                    p.push(b'/');
                    p.extend_from_slice(&name);
                    name = p;
                }
                if star {
                    if blk[476] != 0 {
                        atime = Some(GoTime {
                            secs: numeric(&blk[476..488], at)?,
                            nanos: 0,
                        });
                    }
                    if blk[488] != 0 {
                        ctime = Some(GoTime {
                            secs: numeric(&blk[488..500], at)?,
                            nanos: 0,
                        });
                    }
                }
            } else if gnu {
                if blk[345] != 0 {
                    atime = Some(GoTime {
                        secs: numeric(&blk[345..357], at)?,
                        nanos: 0,
                    });
                }
                if blk[357] != 0 {
                    ctime = Some(GoTime {
                        secs: numeric(&blk[357..369], at)?,
                        nanos: 0,
                    });
                }
            }
            if let Some(n) = long_name.take() {
                name = n;
            }
            let mut linkname = cstr(&blk[157..257]).to_vec();
            if let Some(l) = long_link.take() {
                linkname = l;
            }
            let mut h = GoHeader {
                typeflag,
                name: String::new(),
                linkname: String::new(),
                mode: numeric(&blk[100..108], at)?,
                uid: numeric(&blk[108..116], at)?,
                gid: numeric(&blk[116..124], at)?,
                size,
                mtime: GoTime {
                    secs: numeric(&blk[136..148], at)?,
                    nanos: 0,
                },
                atime,
                ctime,
                devmajor: 0,
                devminor: 0,
                xattrs: BTreeMap::new(),
            };
            if ustar || gnu {
                h.devmajor = numeric(&blk[329..337], at)?;
                h.devminor = numeric(&blk[337..345], at)?;
            }
            let mut name_raw = name;
            let mut link_raw = linkname;
            for (k, v) in std::mem::take(&mut pax) {
                let s = || String::from_utf8_lossy(&v).into_owned();
                match k.as_str() {
                    "path" => name_raw = v,
                    "linkpath" => link_raw = v,
                    "size" => h.size = s().parse().map_err(|_| tar_err(at, "bad PAX size"))?,
                    "uid" => h.uid = s().parse().map_err(|_| tar_err(at, "bad PAX uid"))?,
                    "gid" => h.gid = s().parse().map_err(|_| tar_err(at, "bad PAX gid"))?,
                    "mtime" => h.mtime = pax_time(&s(), at)?,
                    "atime" => h.atime = Some(pax_time(&s(), at)?),
                    "ctime" => h.ctime = Some(pax_time(&s(), at)?),
                    _ if k.starts_with("GNU.sparse.") => {
                        return Err(ChunkedError::Unsupported(
                            "a PAX sparse file (GNU.sparse.*)".into(),
                        ));
                    }
                    _ => {
                        if let Some(x) = k.strip_prefix("SCHILY.xattr.") {
                            h.xattrs.insert(x.to_string(), v);
                        }
                    }
                }
            }
            h.name = utf8(name_raw, "name")?;
            h.linkname = utf8(link_raw, "link name")?;
            if h.typeflag == 0 {
                h.typeflag = if h.name.ends_with('/') { b'5' } else { b'0' };
            }
            if !matches!(h.typeflag, b'0' | b'1' | b'2' | b'3' | b'4' | b'5' | b'6') {
                return Err(ChunkedError::Unsupported(format!(
                    "tar type {:?} of {}",
                    h.typeflag as char, h.name
                )));
            }
            if header_only(h.typeflag) && h.size != 0 {
                return Err(ChunkedError::Unsupported(format!(
                    "{} is a header-only entry with a size of {}",
                    h.name, h.size
                )));
            }
            if h.size < 0 {
                return Err(tar_err(at, "negative size"));
            }
            let n = h.data_len();
            self.remaining = n;
            self.pad = n.next_multiple_of(BLOCK as u64) - n;
            return Ok(Next::Entry { raw, header: h });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(numeric(b"0000644\0", 0).unwrap(), 0o644);
        assert_eq!(numeric(b"  755 \0", 0).unwrap(), 0o755);
        assert_eq!(numeric(b"\0\0\0\0", 0).unwrap(), 0);
        assert_eq!(numeric(&[0x80, 0, 0, 0, 0, 0, 0, 1, 0], 0).unwrap(), 256);
        assert!(numeric(b"0009", 0).is_err());
    }

    #[test]
    fn pax_times() {
        assert_eq!(
            pax_time("1646370367.1234567", 0).unwrap(),
            GoTime {
                secs: 1646370367,
                nanos: 123456700
            }
        );
        assert_eq!(pax_time("5", 0).unwrap(), GoTime { secs: 5, nanos: 0 });
        assert_eq!(
            pax_time("-1.5", 0).unwrap(),
            GoTime {
                secs: -2,
                nanos: 500_000_000
            }
        );
        assert!(pax_time("1.x", 0).is_err());
    }
}
