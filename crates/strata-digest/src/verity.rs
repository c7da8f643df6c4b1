//! fs-verity digests computed in userspace.
//!
//! The kernel here has no fs-verity, but composefs names objects and fills
//! `trusted.overlay.metacopy` with the fs-verity digest, so we compute it:
//! a Merkle tree of SHA-256 over 4 KiB blocks (no salt), each level's hashes
//! packed into 4 KiB blocks (zero padded), until one block remains; the root
//! hash is the hash of that block (all zeros for an empty file). The file
//! digest is SHA-256 of the 256-byte `fsverity_descriptor`.

use sha2::{Digest as _, Sha256};

use crate::Digest;

const BLOCK: usize = 4096;
const HASH: usize = 32;

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
    pub fn finish(mut self) -> Digest {
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
        Digest::sha256_from_bytes(Sha256::digest(desc).into())
    }
}

/// fs-verity digest of `data`.
pub fn fsverity_digest(data: &[u8]) -> Digest {
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
}
