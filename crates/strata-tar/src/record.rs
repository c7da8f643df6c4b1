//! The layer record: entries plus the data to rebuild the tar exactly.
//!
//! Encoding (then zstd level 1: records are written once per layer, on the
//! pull's critical path), all integers LEB128 unless noted:
//! ```text
//! magic "STRATA-LAYER-RECORD\n" (20 bytes), version (1)
//! entry count, entries: path(len, bytes) kind(u8 + payload) mode uid gid
//!                       mtime.secs(zigzag) mtime.nanos xattr count (k, v)*
//! segment count, segments: 0 raw(len, bytes) | 1 object(32-byte sha256, offset, len)
//! ```
//! Decoding never trusts lengths for allocation beyond what the stream
//! actually holds, and rejects trailing bytes.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use strata_digest::Digest;

use crate::{Entry, EntryKind, TarError, Timestamp};

const MAGIC: &[u8; 20] = b"STRATA-LAYER-RECORD\n";
const VERSION: u64 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Segment {
    Raw(Vec<u8>),
    Object {
        digest: Digest,
        offset: u64,
        len: u64,
    },
}

/// A layer's entries and the data to regenerate its tar byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRecord {
    /// The entries in tar order.
    pub entries: Vec<Entry>,
    segments: Vec<Segment>,
}

impl LayerRecord {
    pub(crate) fn new(entries: Vec<Entry>, segments: Vec<Segment>) -> Self {
        LayerRecord { entries, segments }
    }

    /// Every object digest the record references (may repeat).
    pub fn objects(&self) -> impl Iterator<Item = Digest> + '_ {
        self.segments.iter().filter_map(|s| match s {
            Segment::Object { digest, .. } => Some(*digest),
            Segment::Raw(_) => None,
        })
    }

    /// Bytes of the tar that are not file content (headers, padding...).
    pub fn raw_bytes(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Raw(r) => r.len() as u64,
                Segment::Object { .. } => 0,
            })
            .sum()
    }

    /// Regenerate the exact original tar into `out`; returns its length.
    /// `open` gives the full content of an object.
    pub fn rebuild(
        &self,
        open: &mut dyn FnMut(&Digest) -> io::Result<Box<dyn Read>>,
        out: &mut dyn Write,
    ) -> io::Result<u64> {
        let mut total = 0u64;
        // The reader of the last object used, and how far into it we are:
        // the data segments of a sparse file are consecutive ranges of one
        // object, read with one open instead of one per segment.
        let mut current: Option<(Digest, u64, Box<dyn Read>)> = None;
        for s in &self.segments {
            match s {
                Segment::Raw(r) => {
                    out.write_all(r)?;
                    total += r.len() as u64;
                }
                Segment::Object { len: 0, .. } => {}
                Segment::Object {
                    digest,
                    offset,
                    len,
                } => {
                    let reuse =
                        matches!(&current, Some((d, pos, _)) if d == digest && pos <= offset);
                    if !reuse {
                        current = Some((*digest, 0, open(digest)?));
                    }
                    let (_, pos, r) = current.as_mut().expect("set above");
                    let gap = offset - *pos;
                    let skipped = io::copy(&mut (&mut *r).take(gap), &mut io::sink())?;
                    let copied = io::copy(&mut (&mut *r).take(*len), out)?;
                    if skipped != gap || copied != *len {
                        return Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("object {digest} is shorter than {}", offset + len),
                        ));
                    }
                    *pos = offset + len;
                    total += len;
                }
            }
        }
        Ok(total)
    }

    /// Serialize (zstd-compressed).
    pub fn encode(&self, w: impl Write) -> io::Result<()> {
        let mut z = zstd::stream::write::Encoder::new(w, 1)?;
        let mut b = Vec::with_capacity(64 * 1024);
        b.extend_from_slice(MAGIC);
        put_u(&mut b, VERSION);
        put_u(&mut b, self.entries.len() as u64);
        for e in &self.entries {
            put_bytes(&mut b, &e.path);
            match &e.kind {
                EntryKind::Regular { digest, size } => {
                    b.push(0);
                    b.extend_from_slice(digest.as_bytes());
                    put_u(&mut b, *size);
                }
                EntryKind::Dir => b.push(1),
                EntryKind::Symlink { target } => {
                    b.push(2);
                    put_bytes(&mut b, target);
                }
                EntryKind::Hardlink { target } => {
                    b.push(3);
                    put_bytes(&mut b, target);
                }
                EntryKind::CharDev { major, minor } => {
                    b.push(4);
                    put_u(&mut b, *major as u64);
                    put_u(&mut b, *minor as u64);
                }
                EntryKind::BlockDev { major, minor } => {
                    b.push(5);
                    put_u(&mut b, *major as u64);
                    put_u(&mut b, *minor as u64);
                }
                EntryKind::Fifo => b.push(6),
            }
            put_u(&mut b, e.mode as u64);
            put_u(&mut b, e.uid);
            put_u(&mut b, e.gid);
            put_u(&mut b, ((e.mtime.secs << 1) ^ (e.mtime.secs >> 63)) as u64);
            put_u(&mut b, e.mtime.nanos as u64);
            put_u(&mut b, e.xattrs.len() as u64);
            for (k, v) in &e.xattrs {
                put_bytes(&mut b, k);
                put_bytes(&mut b, v);
            }
            if b.len() > 1 << 20 {
                z.write_all(&b)?;
                b.clear();
            }
        }
        put_u(&mut b, self.segments.len() as u64);
        for s in &self.segments {
            match s {
                Segment::Raw(r) => {
                    b.push(0);
                    put_bytes(&mut b, r);
                }
                Segment::Object {
                    digest,
                    offset,
                    len,
                } => {
                    b.push(1);
                    b.extend_from_slice(digest.as_bytes());
                    put_u(&mut b, *offset);
                    put_u(&mut b, *len);
                }
            }
            if b.len() > 1 << 20 {
                z.write_all(&b)?;
                b.clear();
            }
        }
        z.write_all(&b)?;
        z.finish()?.flush()
    }

    /// Deserialize; never panics on garbage.
    pub fn decode(r: impl Read) -> Result<LayerRecord, TarError> {
        let z = zstd::stream::read::Decoder::new(r)
            .map_err(|e| TarError::Record(format!("not zstd: {e}")))?;
        Self::decode_uncompressed(io::BufReader::new(z))
    }

    /// [`decode`](Self::decode) of the record's uncompressed bytes (what
    /// the fuzz target feeds directly, without compressing each input).
    #[doc(hidden)]
    pub fn decode_uncompressed(r: impl Read) -> Result<LayerRecord, TarError> {
        let mut d = Dec { r };
        let mut magic = [0u8; 20];
        d.exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(TarError::Record("bad magic".into()));
        }
        let v = d.u()?;
        if v != VERSION {
            return Err(TarError::Record(format!("unknown version {v}")));
        }
        let n = d.u()?;
        let mut entries = Vec::new();
        for _ in 0..n {
            let path = d.bytes()?;
            let kind = match d.byte()? {
                0 => EntryKind::Regular {
                    digest: d.digest()?,
                    size: d.u()?,
                },
                1 => EntryKind::Dir,
                2 => EntryKind::Symlink { target: d.bytes()? },
                3 => EntryKind::Hardlink { target: d.bytes()? },
                4 => EntryKind::CharDev {
                    major: d.u32()?,
                    minor: d.u32()?,
                },
                5 => EntryKind::BlockDev {
                    major: d.u32()?,
                    minor: d.u32()?,
                },
                6 => EntryKind::Fifo,
                k => return Err(TarError::Record(format!("unknown entry kind {k}"))),
            };
            let mode = d.u32()?;
            let uid = d.u()?;
            let gid = d.u()?;
            let z = d.u()?;
            let secs = ((z >> 1) as i64) ^ -((z & 1) as i64);
            let nanos = d.u32()?;
            if nanos >= 1_000_000_000 {
                return Err(TarError::Record("nanoseconds out of range".into()));
            }
            if crate::normalize(&path).ok().as_deref() != Some(&path[..]) {
                return Err(TarError::Record(format!(
                    "entry path {:?} is not a normalized relative path",
                    String::from_utf8_lossy(&path)
                )));
            }
            if let EntryKind::Hardlink { target } = &kind
                && (target.is_empty()
                    || crate::normalize(target).ok().as_deref() != Some(&target[..]))
            {
                return Err(TarError::Record(format!(
                    "hardlink target {:?} is not a normalized relative path",
                    String::from_utf8_lossy(target)
                )));
            }
            let nx = d.u()?;
            let mut xattrs = BTreeMap::new();
            for _ in 0..nx {
                let k = d.bytes()?;
                let v = d.bytes()?;
                xattrs.insert(k, v);
            }
            entries.push(Entry {
                path,
                kind,
                mode,
                uid,
                gid,
                mtime: Timestamp { secs, nanos },
                xattrs,
            });
        }
        let ns = d.u()?;
        let mut segments = Vec::new();
        for _ in 0..ns {
            segments.push(match d.byte()? {
                0 => Segment::Raw(d.bytes()?),
                1 => Segment::Object {
                    digest: d.digest()?,
                    offset: d.u()?,
                    len: d.u()?,
                },
                k => return Err(TarError::Record(format!("unknown segment kind {k}"))),
            });
        }
        let mut extra = [0u8; 1];
        match d.r.read(&mut extra) {
            Ok(0) => {}
            Ok(_) => return Err(TarError::Record("trailing bytes".into())),
            Err(e) => return Err(TarError::Record(e.to_string())),
        }
        Ok(LayerRecord { entries, segments })
    }
}

fn put_u(b: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            b.push(byte);
            return;
        }
        b.push(byte | 0x80);
    }
}

fn put_bytes(b: &mut Vec<u8>, s: &[u8]) {
    put_u(b, s.len() as u64);
    b.extend_from_slice(s);
}

struct Dec<R: Read> {
    r: R,
}

impl<R: Read> Dec<R> {
    fn exact(&mut self, buf: &mut [u8]) -> Result<(), TarError> {
        self.r
            .read_exact(buf)
            .map_err(|e| TarError::Record(format!("truncated: {e}")))
    }
    fn byte(&mut self) -> Result<u8, TarError> {
        let mut b = [0u8; 1];
        self.exact(&mut b)?;
        Ok(b[0])
    }
    fn u(&mut self) -> Result<u64, TarError> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(TarError::Record("varint too long".into()))
    }
    fn u32(&mut self) -> Result<u32, TarError> {
        u32::try_from(self.u()?).map_err(|_| TarError::Record("number out of range".into()))
    }
    fn bytes(&mut self) -> Result<Vec<u8>, TarError> {
        let n = self.u()?;
        let mut v = Vec::new();
        let got = (&mut self.r)
            .take(n)
            .read_to_end(&mut v)
            .map_err(|e| TarError::Record(e.to_string()))?;
        if got as u64 != n {
            return Err(TarError::Record("truncated".into()));
        }
        Ok(v)
    }
    fn digest(&mut self) -> Result<Digest, TarError> {
        let mut b = [0u8; 32];
        self.exact(&mut b)?;
        Ok(Digest::sha256_from_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            any::<u8>().prop_filter("no NUL or /", |b| *b != 0 && *b != b'/'),
            1..20,
        )
        .prop_filter("not . or ..", |n| n != b"." && n != b"..")
    }

    fn path() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(name(), 0..4).prop_map(|c| c.join(&b'/'))
    }

    fn digest() -> impl Strategy<Value = Digest> {
        any::<[u8; 32]>().prop_map(Digest::sha256_from_bytes)
    }

    fn kind() -> impl Strategy<Value = EntryKind> {
        prop_oneof![
            (digest(), any::<u64>()).prop_map(|(digest, size)| EntryKind::Regular { digest, size }),
            Just(EntryKind::Dir),
            proptest::collection::vec(any::<u8>(), 0..300)
                .prop_map(|target| EntryKind::Symlink { target }),
            proptest::collection::vec(name(), 1..4).prop_map(|c| EntryKind::Hardlink {
                target: c.join(&b'/')
            }),
            (any::<u32>(), any::<u32>())
                .prop_map(|(major, minor)| EntryKind::CharDev { major, minor }),
            (any::<u32>(), any::<u32>())
                .prop_map(|(major, minor)| EntryKind::BlockDev { major, minor }),
            Just(EntryKind::Fifo),
        ]
    }

    fn entry() -> impl Strategy<Value = Entry> {
        (
            path(),
            kind(),
            0u32..0o10000,
            any::<u64>(),
            any::<u64>(),
            (any::<i64>(), 0u32..1_000_000_000),
            proptest::collection::btree_map(
                proptest::collection::vec(any::<u8>(), 1..30),
                proptest::collection::vec(any::<u8>(), 0..100),
                0..4,
            ),
        )
            .prop_map(
                |(path, kind, mode, uid, gid, (secs, nanos), xattrs)| Entry {
                    path,
                    kind,
                    mode,
                    uid,
                    gid,
                    mtime: Timestamp { secs, nanos },
                    xattrs,
                },
            )
    }

    fn segment() -> impl Strategy<Value = Segment> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..2000).prop_map(Segment::Raw),
            (digest(), any::<u64>(), any::<u64>()).prop_map(|(digest, offset, len)| {
                Segment::Object {
                    digest,
                    offset,
                    len,
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn encode_decode_round_trip(
            entries in proptest::collection::vec(entry(), 0..20),
            segments in proptest::collection::vec(segment(), 0..20),
        ) {
            let rec = LayerRecord::new(entries, segments);
            let mut enc = Vec::new();
            rec.encode(&mut enc).unwrap();
            let dec = LayerRecord::decode(&enc[..]).unwrap();
            prop_assert_eq!(dec, rec);
        }

        #[test]
        fn decode_of_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            // Raw garbage, and garbage behind a valid zstd frame and magic.
            let _ = LayerRecord::decode(&bytes[..]);
            let mut payload = MAGIC.to_vec();
            payload.push(1);
            payload.extend_from_slice(&bytes);
            let z = zstd::encode_all(&payload[..], 1).unwrap();
            let _ = LayerRecord::decode(&z[..]);
        }
    }

    #[test]
    fn decode_rejects_unnormalized_paths() {
        for bad in [&b"../x"[..], b"/abs", b"a//b", b"a/"] {
            let rec = LayerRecord::new(
                vec![Entry {
                    path: bad.to_vec(),
                    kind: EntryKind::Dir,
                    mode: 0o755,
                    uid: 0,
                    gid: 0,
                    mtime: Timestamp::default(),
                    xattrs: BTreeMap::new(),
                }],
                Vec::new(),
            );
            let mut enc = Vec::new();
            rec.encode(&mut enc).unwrap();
            let err = LayerRecord::decode(&enc[..]).unwrap_err();
            assert!(err.to_string().contains("not a normalized"), "{err}");
        }
    }
}
