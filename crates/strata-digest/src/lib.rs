//! Content digests for strata.
//!
//! One [`Digest`] type names every object, blob, layer and image. It carries
//! its algorithm (only `sha256` today) and is parsed and printed in exactly
//! one place (`sha256:<64 lowercase hex>`). Untrusted bytes are read through
//! [`VerifyingReader`], which fails the read that reaches the end of the
//! stream when the bytes do not hash to the expected digest, so a consumer
//! can never mistake a corrupt blob for a complete one.
//!
//! fs-verity measurements (composefs image ids, the digests overlayfs
//! checks in `trusted.overlay.metacopy`) are a [`VerityDigest`], a distinct
//! type printed as bare lowercase hex: they are SHA-256 of a Merkle tree
//! descriptor, never of the content, and must not pass for a [`Digest`].
//!
//! This crate is pure: no files, no sockets.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

mod verity;
pub use verity::{FsVerityHasher, ParseVerityDigestError, VerityDigest, fsverity_digest};

/// The hash algorithm of a [`Digest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// SHA-256, the OCI default.
    Sha256,
}

impl Algorithm {
    /// The name used in `algo:hex` strings.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
        }
    }
}

/// A content digest: algorithm plus hash bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    bytes: [u8; 32],
}

/// A string that is not a valid digest.
#[derive(Debug, thiserror::Error)]
#[error("invalid digest {input:?}: {reason}")]
pub struct ParseDigestError {
    input: String,
    reason: &'static str,
}

impl Digest {
    /// A SHA-256 digest from its raw bytes.
    pub fn sha256_from_bytes(bytes: [u8; 32]) -> Self {
        Digest {
            algorithm: Algorithm::Sha256,
            bytes,
        }
    }

    /// SHA-256 of `data`.
    pub fn sha256_of(data: &[u8]) -> Self {
        Self::sha256_from_bytes(Sha256::digest(data).into())
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The raw hash bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.bytes
    }

    /// Lowercase hex of the hash, without the algorithm prefix.
    pub fn hex(&self) -> String {
        hex::encode(self.bytes)
    }

    /// A short form for messages: `sha256:0123456789ab`.
    pub fn short(&self) -> String {
        format!("{}:{}", self.algorithm.name(), &self.hex()[..12])
    }
}

/// Lowercase hex digits' values; 0x80 marks every other byte.
const HEX: [u8; 256] = {
    let mut t = [0x80u8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

impl FromStr for Digest {
    type Err = ParseDigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| ParseDigestError {
            input: s.chars().take(100).collect(),
            reason,
        };
        let (algo, hex_part) = s.split_once(':').ok_or_else(|| err("missing ':'"))?;
        if algo != "sha256" {
            return Err(err("unsupported algorithm (only sha256)"));
        }
        let hex_part = hex_part.as_bytes();
        let bad = || err("expected 64 lowercase hex digits");
        if hex_part.len() != 64 {
            return Err(bad());
        }
        // TOCs name a digest or two per file: decoded in one pass, without
        // the hex crate's per-byte error paths
        let mut bytes = [0u8; 32];
        let mut invalid = 0u8;
        for (out, pair) in bytes.iter_mut().zip(hex_part.chunks_exact(2)) {
            let (hi, lo) = (HEX[usize::from(pair[0])], HEX[usize::from(pair[1])]);
            invalid |= hi | lo;
            *out = (hi << 4) | (lo & 0x0f);
        }
        if invalid & 0x80 != 0 {
            return Err(bad());
        }
        Ok(Digest::sha256_from_bytes(bytes))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An incremental SHA-256 hasher producing a [`Digest`].
#[derive(Clone, Default)]
pub struct Hasher {
    inner: Sha256,
    len: u64,
}

impl Hasher {
    /// A fresh SHA-256 hasher.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.inner.update(data);
        self.len += data.len() as u64;
    }

    /// Number of bytes fed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was fed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest of everything fed.
    pub fn finish(self) -> Digest {
        Digest::sha256_from_bytes(self.inner.finalize().into())
    }
}

impl Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A reader that hashes what passes through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
}

impl<R: Read> HashingReader<R> {
    /// Wrap `inner`.
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Hasher::new(),
        }
    }
    /// Bytes read so far.
    pub fn len(&self) -> u64 {
        self.hasher.len()
    }
    /// Whether nothing was read yet.
    pub fn is_empty(&self) -> bool {
        self.hasher.is_empty()
    }
    /// Digest of the bytes read so far, and the inner reader.
    pub fn finish(self) -> (Digest, R) {
        (self.hasher.finish(), self.inner)
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// The bytes of a stream did not match the digest or size that named them.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Hash mismatch.
    #[error("digest mismatch: expected {expected}, got {actual}")]
    Digest {
        /// The digest the bytes were named by.
        expected: Digest,
        /// The digest of the bytes actually read.
        actual: Digest,
    },
    /// More or fewer bytes than declared.
    #[error("size mismatch: expected {expected} bytes, got {actual}")]
    Size {
        /// The declared size.
        expected: u64,
        /// The number of bytes seen.
        actual: u64,
    },
}

/// A reader that checks, at end of stream, that the bytes hash to `expected`
/// (and, when given, have the expected size). On mismatch the final read
/// returns an `InvalidData` error wrapping [`VerifyError`], so nothing that
/// consumes the stream to its end can accept corrupt bytes.
pub struct VerifyingReader<R> {
    inner: R,
    hasher: Hasher,
    expected: Digest,
    expected_size: Option<u64>,
    verified: bool,
}

impl<R: Read> VerifyingReader<R> {
    /// Wrap `inner`, expecting `expected` (and `size`, if known).
    pub fn new(inner: R, expected: Digest, size: Option<u64>) -> Self {
        VerifyingReader {
            inner,
            hasher: Hasher::new(),
            expected,
            expected_size: size,
            verified: false,
        }
    }

    /// Whether the end of the stream was reached and the digest matched.
    pub fn is_verified(&self) -> bool {
        self.verified
    }

    /// Bytes read so far.
    pub fn bytes_read(&self) -> u64 {
        self.hasher.len()
    }

    fn check(&mut self) -> Result<(), VerifyError> {
        let actual_size = self.hasher.len();
        if let Some(expected) = self.expected_size
            && expected != actual_size
        {
            return Err(VerifyError::Size {
                expected,
                actual: actual_size,
            });
        }
        let actual = std::mem::take(&mut self.hasher).finish();
        self.hasher.len = actual_size;
        if actual != self.expected {
            return Err(VerifyError::Digest {
                expected: self.expected,
                actual,
            });
        }
        self.verified = true;
        Ok(())
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.verified {
            return Ok(0);
        }
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.check()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            return Ok(0);
        }
        self.hasher.update(&buf[..n]);
        if let Some(expected) = self.expected_size
            && self.hasher.len() > expected
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                VerifyError::Size {
                    expected,
                    actual: self.hasher.len(),
                },
            ));
        }
        Ok(n)
    }
}

/// Check `data` against `expected`.
pub fn verify_bytes(data: &[u8], expected: &Digest) -> Result<(), VerifyError> {
    let actual = Digest::sha256_of(data);
    if &actual != expected {
        return Err(VerifyError::Digest {
            expected: *expected,
            actual,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parse_and_print_round_trip() {
        let d: Digest = EMPTY.parse().unwrap();
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(d, Digest::sha256_of(b""));
        assert_eq!(d.short(), "sha256:e3b0c44298fc");
    }

    #[test]
    fn parse_rejects_bad_input() {
        for bad in [
            "",
            "sha256",
            "md5:abcd",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:e3b0",
            "sha256:zzb0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b85g",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b8:5",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b8\u{e9}",
        ] {
            assert!(bad.parse::<Digest>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn verifying_reader_accepts_good_and_rejects_bad() {
        let data = b"hello world";
        let good = Digest::sha256_of(data);
        let mut out = Vec::new();
        let mut r = VerifyingReader::new(&data[..], good, Some(11));
        r.read_to_end(&mut out).unwrap();
        assert!(r.is_verified());

        let bad = Digest::sha256_of(b"other");
        let mut r = VerifyingReader::new(&data[..], bad, None);
        let err = r.read_to_end(&mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("digest mismatch"), "{err}");

        let mut r = VerifyingReader::new(&data[..], good, Some(12));
        let err = r.read_to_end(&mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("size mismatch"), "{err}");
        let mut r = VerifyingReader::new(&data[..], good, Some(5));
        let err = r.read_to_end(&mut Vec::new()).unwrap_err();
        assert!(err.to_string().contains("size mismatch"), "{err}");
    }

    #[test]
    fn serde_round_trip() {
        let d: Digest = EMPTY.parse().unwrap();
        let j = serde_json::to_string(&d).unwrap();
        assert_eq!(j, format!("\"{EMPTY}\""));
        let back: Digest = serde_json::from_str(&j).unwrap();
        assert_eq!(back, d);
    }
}
