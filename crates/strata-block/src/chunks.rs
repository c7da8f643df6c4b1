//! Raw image <-> chunks in the store.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rustix::io::Errno;
use strata_digest::Digest;
use strata_store::{CHUNK_SIZE, Store, TemplateMap};

use crate::BlockError;

/// What storing an image's chunks did.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ChunkStats {
    /// Non-zero chunks in the image.
    pub chunks: u64,
    /// Of those, chunks the store did not have (written now).
    pub new_chunks: u64,
    /// Bytes of the new chunks.
    pub new_bytes: u64,
    /// Chunks that are zeros (not stored).
    pub zero_chunks: u64,
}

/// Store the raw image `raw` (exactly `size` bytes) as chunks and return
/// its map. Holes are skipped without reading; all-zero chunks are left out.
pub fn ingest(
    store: &Store,
    raw: &Path,
    parent: Option<Digest>,
    generation: u32,
    build: BTreeMap<String, String>,
    ctl: strata_ops::Ctl<'_>,
) -> Result<(TemplateMap, ChunkStats), BlockError> {
    let io_err = |what: &'static str| {
        move |e: io::Error| BlockError::Io {
            what: format!("{what} {}", raw.display()),
            source: e,
        }
    };
    let f = File::open(raw).map_err(io_err("opening"))?;
    let size = f.metadata().map_err(io_err("reading"))?.len();
    let mut stats = ChunkStats {
        zero_chunks: size.div_ceil(CHUNK_SIZE),
        ..Default::default()
    };
    let mut batch = store.object_batch()?;
    let mut chunks = Vec::new();
    let mut buf = vec![0u8; CHUNK_SIZE as usize];
    for (start, end) in data_regions(&f, size).map_err(io_err("scanning"))? {
        let mut i = start / CHUNK_SIZE;
        while i * CHUNK_SIZE < end {
            let off = i * CHUNK_SIZE;
            // a cancel drops the batch: nothing of it becomes visible
            if i.is_multiple_of(256) {
                ctl.cancel.check()?;
                ctl.emit(strata_ops::Event::Progress {
                    op: strata_ops::Op::TemplateBuild,
                    unit: strata_ops::Unit::Chunk { index: i },
                    done: off,
                    total: Some(size),
                });
            }
            let len = CHUNK_SIZE.min(size - off) as usize;
            f.read_exact_at(&mut buf[..len], off)
                .map_err(io_err("reading"))?;
            if !is_zero(&buf[..len]) {
                let before = batch.stats().objects_written;
                let d = batch
                    .put(&mut &buf[..len], len as u64)
                    .map_err(|e| BlockError::Io {
                        what: "storing a chunk".into(),
                        source: e,
                    })?;
                if batch.stats().objects_written > before {
                    stats.new_chunks += 1;
                    stats.new_bytes += len as u64;
                }
                stats.chunks += 1;
                chunks.push((i, d));
            }
            i += 1;
        }
    }
    batch.commit()?;
    stats.zero_chunks -= stats.chunks;
    let map = TemplateMap::from_chunks(size, parent, generation, build, chunks);
    Ok((map, stats))
}

/// Byte ranges of `f` that hold data (not holes), chunk-aligned and merged.
fn data_regions(f: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    use rustix::fs::{SeekFrom, seek};
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let start = match seek(f, SeekFrom::Data(pos)) {
            Ok(p) => p,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let end = match seek(f, SeekFrom::Hole(start)) {
            Ok(p) => p.min(size),
            Err(e) => return Err(e.into()),
        };
        let (a, b) = (
            start / CHUNK_SIZE * CHUNK_SIZE,
            end.div_ceil(CHUNK_SIZE) * CHUNK_SIZE,
        );
        match out.last_mut() {
            Some(last) if last.1 >= a => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
        pos = end.max(start + 1);
    }
    Ok(out)
}

fn is_zero(b: &[u8]) -> bool {
    let words = b.chunks_exact(8);
    let tail = words.remainder();
    words
        .map(|c| u64::from_ne_bytes(c.try_into().expect("8 bytes")))
        .fold(0u64, |acc, w| acc | w)
        == 0
        && tail.iter().all(|&x| x == 0)
}

/// Write the template `map` as a raw image at `out` (created; holes where
/// the image is zeros). Every chunk must be in the store.
pub fn export(store: &Store, map: &TemplateMap, out: &Path) -> Result<(), BlockError> {
    let io_err = |what: String| move |e: io::Error| BlockError::Io { what, source: e };
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(out)
        .map_err(io_err(format!("creating {}", out.display())))?;
    f.set_len(map.size)
        .map_err(io_err(format!("sizing {}", out.display())))?;
    let mut in_kernel = true;
    for (i, d) in map.chunks() {
        let src = store
            .open_object(&d)
            .map_err(|_| BlockError::MissingChunk {
                chunk: i,
                digest: d,
            })?;
        let len = map.chunk_len(i);
        let short = || BlockError::Io {
            what: format!("copying chunk {i} ({d}) into {}", out.display()),
            source: io::Error::new(io::ErrorKind::UnexpectedEof, "chunk object is short"),
        };
        let copy_err = |e: io::Error| BlockError::Io {
            what: format!("copying chunk {i} into {}", out.display()),
            source: e,
        };
        let mut off_in = 0u64;
        let mut off_out = i * map.chunk_size;
        let mut left = len;
        while left > 0 && in_kernel {
            match rustix::fs::copy_file_range(
                &src,
                Some(&mut off_in),
                &f,
                Some(&mut off_out),
                left as usize,
            ) {
                Ok(0) => return Err(short()),
                Ok(n) => left -= n as u64,
                // another filesystem (EXDEV), or none in the kernel:
                // copy through memory from here on
                Err(e)
                    if off_in == 0
                        && [Errno::XDEV, Errno::NOSYS, Errno::OPNOTSUPP, Errno::INVAL]
                            .contains(&e) =>
                {
                    in_kernel = false;
                }
                Err(e) => return Err(copy_err(e.into())),
            }
        }
        if left > 0 {
            let mut buf = vec![0u8; left as usize];
            src.read_exact_at(&mut buf, off_in).map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    short()
                } else {
                    copy_err(e)
                }
            })?;
            f.write_all_at(&buf, off_out).map_err(copy_err)?;
        }
    }
    f.sync_all()
        .map_err(io_err(format!("syncing {}", out.display())))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection_sees_every_byte() {
        let mut b = vec![0u8; 1003];
        assert!(is_zero(&b));
        for i in [0, 7, 8, 500, 1000, 1002] {
            b[i] = 1;
            assert!(!is_zero(&b), "byte {i}");
            b[i] = 0;
        }
    }

    #[test]
    fn ingest_skips_holes_and_zero_chunks_and_export_restores_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let raw = dir.path().join("raw");
        let size = 40 * CHUNK_SIZE;
        let f = File::create(&raw).unwrap();
        f.set_len(size).unwrap();
        // data in chunk 0, 3 (twice the same content at 3 and 7), an
        // explicitly written zero chunk at 10, a partial write in 39
        let a = vec![0xabu8; CHUNK_SIZE as usize];
        f.write_all_at(b"hello", 0).unwrap();
        f.write_all_at(&a, 3 * CHUNK_SIZE).unwrap();
        f.write_all_at(&a, 7 * CHUNK_SIZE).unwrap();
        f.write_all_at(&vec![0u8; CHUNK_SIZE as usize], 10 * CHUNK_SIZE)
            .unwrap();
        f.write_all_at(b"end", size - 3).unwrap();
        drop(f);
        let (map, stats) = ingest(
            &store,
            &raw,
            None,
            0,
            BTreeMap::new(),
            strata_ops::Ctl::none(),
        )
        .unwrap();
        assert_eq!(stats.chunks, 4);
        assert_eq!(stats.new_chunks, 3, "chunk 7 repeats chunk 3");
        assert_eq!(stats.zero_chunks, 36);
        assert_eq!(map.chunk(3), map.chunk(7));
        assert_eq!(map.chunk(10), None);
        let out = dir.path().join("out");
        export(&store, &map, &out).unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&raw).unwrap());
        // again: nothing new
        let (_, again) = ingest(
            &store,
            &raw,
            None,
            0,
            BTreeMap::new(),
            strata_ops::Ctl::none(),
        )
        .unwrap();
        assert_eq!(again.new_chunks, 0);
    }
}
