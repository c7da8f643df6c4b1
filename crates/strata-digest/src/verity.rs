//! fs-verity digests computed in userspace.
//!
//! The kernel here has no fs-verity, but composefs names objects and fills
//! `trusted.overlay.metacopy` with the fs-verity digest, so we compute it:
//! a Merkle tree of SHA-256 over 4 KiB blocks (no salt), each level's hashes
//! packed into 4 KiB blocks (zero padded), until one block remains; the root
//! hash is the hash of that block (all zeros for an empty file). The file
//! digest is SHA-256 of the 256-byte `fsverity_descriptor`.
//!
//! A [`VerityDigest`] is a different thing from a content [`crate::Digest`]
//! even though both are 32 bytes of SHA-256 output: the fs-verity digest
//! hashes a Merkle tree descriptor, not the bytes, so the two never compare
//! equal for the same file. They are distinct types so one cannot be passed
//! where the other is meant.
//!
//! Text form: 64 lowercase hex digits and no algorithm prefix, as composefs
//! names images (`mount -t composefs -o digest=<hex>`, `composefs-info`) and
//! objects. A `sha256:` prefix would make it read as a content digest, which
//! it is not. Only SHA-256 fs-verity (4 KiB blocks, no salt) is produced or
//! accepted: the parameters composefs uses.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

const BLOCK: usize = 4096;
const HASH: usize = 32;

/// An fs-verity measurement: SHA-256 of the `fsverity_descriptor` (4 KiB
/// blocks, no salt). Printed and parsed as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VerityDigest([u8; HASH]);

/// A string that is not a valid fs-verity digest.
#[derive(Debug, thiserror::Error)]
#[error("invalid fs-verity digest {input:?}: expected 64 lowercase hex digits")]
pub struct ParseVerityDigestError {
    input: String,
}

impl VerityDigest {
    /// A digest from its raw bytes (e.g. as the kernel measures it).
    pub fn from_bytes(bytes: [u8; HASH]) -> Self {
        VerityDigest(bytes)
    }

    /// The raw digest bytes (as `trusted.overlay.metacopy` carries them).
    pub fn as_bytes(&self) -> &[u8; HASH] {
        &self.0
    }

    /// Lowercase hex: the text form.
    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl FromStr for VerityDigest {
    type Err = ParseVerityDigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseVerityDigestError {
            input: s.chars().take(100).collect(),
        };
        if s.len() != 2 * HASH
            || !s
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(err());
        }
        let mut bytes = [0u8; HASH];
        hex::decode_to_slice(s, &mut bytes).map_err(|_| err())?;
        Ok(VerityDigest(bytes))
    }
}

impl fmt::Display for VerityDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

impl fmt::Debug for VerityDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VerityDigest({self})")
    }
}

impl serde::Serialize for VerityDigest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for VerityDigest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        // Records written before fs-verity digests had their own type
        // carried them as `sha256:<hex>`; read those, write bare hex.
        let hex_part = s.strip_prefix("sha256:").unwrap_or(&s);
        hex_part.parse().map_err(serde::de::Error::custom)
    }
}

/// An incremental fs-verity (SHA-256, 4 KiB blocks, no salt) hasher.
#[derive(Default)]
pub struct FsVerityHasher {
    /// Pending bytes of the current data block.
    buf: Vec<u8>,
    /// levels[0] holds hashes of data blocks that do not yet fill a block.
    levels: Vec<Vec<u8>>,
    size: u64,
}

impl FsVerityHasher {
    /// A fresh hasher.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed file bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        self.size += data.len() as u64;
        while !data.is_empty() {
            let take = (BLOCK - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() == BLOCK {
                let h = Sha256::digest(&self.buf);
                self.buf.clear();
                self.push(0, &h);
            }
        }
    }

    fn push(&mut self, level: usize, hash: &[u8]) {
        if self.levels.len() <= level {
            self.levels.push(Vec::with_capacity(BLOCK));
        }
        self.levels[level].extend_from_slice(hash);
        if self.levels[level].len() == BLOCK {
            let h = Sha256::digest(&self.levels[level]);
            self.levels[level].clear();
            self.push(level + 1, &h);
        }
    }

    /// The fs-verity digest of everything fed.
    pub fn finish(mut self) -> VerityDigest {
        let root: [u8; HASH] = if self.size == 0 {
            [0u8; HASH]
        } else {
            // The last data block, zero padded. A file of one block has
            // that block's hash as its root (the loop below stops at once).
            if !self.buf.is_empty() {
                self.buf.resize(BLOCK, 0);
                let h = Sha256::digest(&self.buf);
                self.buf.clear();
                self.push(0, &h);
            }
            // Flush partial levels upward until a single hash remains.
            let mut level = 0;
            loop {
                let is_top = level + 1 == self.levels.len();
                let pending = std::mem::take(&mut self.levels[level]);
                if is_top && pending.len() == HASH {
                    // Only possible when the level held exactly one hash that
                    // came from a carried full block: that hash is the root.
                    break pending.try_into().expect("32 bytes");
                }
                if pending.is_empty() {
                    level += 1;
                    continue;
                }
                let mut block = pending;
                block.resize(BLOCK, 0);
                let h = Sha256::digest(&block);
                if is_top {
                    break h.into();
                }
                self.push(level + 1, &h);
                level += 1;
            }
        };
        let mut desc = [0u8; 256];
        desc[0] = 1; // version
        desc[1] = 1; // hash algorithm: sha256
        desc[2] = 12; // log2 block size
        desc[3] = 0; // salt size
        desc[8..16].copy_from_slice(&self.size.to_le_bytes());
        desc[16..48].copy_from_slice(&root);
        VerityDigest(Sha256::digest(desc).into())
    }
}

/// fs-verity digest of `data`.
pub fn fsverity_digest(data: &[u8]) -> VerityDigest {
    let mut h = FsVerityHasher::new();
    h.update(data);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_digest() {
        assert_eq!(
            fsverity_digest(b"").hex(),
            "3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95"
        );
    }

    #[test]
    fn incremental_equals_whole() {
        let data: Vec<u8> = (0..(BLOCK * 130 + 17))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let whole = fsverity_digest(&data);
        let mut h = FsVerityHasher::new();
        for c in data.chunks(1000) {
            h.update(c);
        }
        assert_eq!(h.finish(), whole);
    }

    #[test]
    fn text_form_round_trips() {
        let d = fsverity_digest(b"");
        let s = d.to_string();
        assert_eq!(s, d.hex());
        assert_eq!(s.parse::<VerityDigest>().unwrap(), d);
        for bad in [
            "",
            "sha256:3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af95",
            "3D248CA542A24FC62D1C43B916EAE5016878E2533C88238480B26128A1F1AF95",
            "3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af9",
            "3d248ca542a24fc62d1c43b916eae5016878e2533c88238480b26128a1f1af9g",
        ] {
            assert!(bad.parse::<VerityDigest>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn serde_is_a_string_and_reads_old_records() {
        let d = fsverity_digest(b"");
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{}\"", d.hex()));
        assert_eq!(serde_json::from_str::<VerityDigest>(&json).unwrap(), d);
        let old = format!("\"sha256:{}\"", d.hex());
        assert_eq!(serde_json::from_str::<VerityDigest>(&old).unwrap(), d);
    }
}
