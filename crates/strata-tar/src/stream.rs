//! The input side of an import: large reads, and the diff_id hashed on a
//! second thread.
//!
//! Why a thread: every content byte is hashed twice, once for the diff_id
//! (the whole stream) and once for its object digest (in the sink). In
//! series that caps an import at half the SHA-256 speed (~560 MB/s here);
//! hashing the stream on its own thread overlaps the two. Chunks are shared
//! with the hasher as `Arc<Vec<u8>>` and reused once it lets go of them.

use std::io::{self, Read};
use std::sync::Arc;
use std::sync::mpsc::{SyncSender, sync_channel};
use std::thread::JoinHandle;

use strata_digest::{Digest, Hasher};

const CHUNK: usize = 256 * 1024;

/// Reads `inner` in 256 KiB chunks and hashes everything read on a helper
/// thread; [`StreamReader::finish`] returns the digest.
pub(crate) struct StreamReader<R> {
    inner: R,
    chunk: Arc<Vec<u8>>,
    pos: usize,
    consumed: u64,
    eof: bool,
    tx: Option<SyncSender<Arc<Vec<u8>>>>,
    hasher: Option<JoinHandle<Digest>>,
}

impl<R: Read> StreamReader<R> {
    pub(crate) fn new(inner: R) -> io::Result<Self> {
        let (tx, rx) = sync_channel::<Arc<Vec<u8>>>(4);
        let hasher = std::thread::Builder::new()
            .name("strata-tar-diff-id".into())
            .spawn(move || {
                let mut h = Hasher::new();
                for chunk in rx {
                    h.update(&chunk);
                }
                h.finish()
            })?;
        Ok(StreamReader {
            inner,
            chunk: Arc::new(Vec::new()),
            pos: 0,
            consumed: 0,
            eof: false,
            tx: Some(tx),
            hasher: Some(hasher),
        })
    }

    /// Bytes handed out so far.
    /// A reader that does not hash (entries only, no diff_id).
    pub(crate) fn unhashed(inner: R) -> Self {
        StreamReader {
            inner,
            chunk: Arc::new(Vec::new()),
            pos: 0,
            consumed: 0,
            eof: false,
            tx: None,
            hasher: None,
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.consumed
    }

    fn fill(&mut self) -> io::Result<()> {
        let mut buf = match Arc::try_unwrap(std::mem::take(&mut self.chunk)) {
            Ok(mut v) => {
                v.clear();
                v
            }
            Err(_) => Vec::with_capacity(CHUNK),
        };
        // Fill the whole chunk (pipes and decompressors return less).
        while buf.len() < CHUNK {
            let want = (CHUNK - buf.len()) as u64;
            match (&mut self.inner).take(want).read_to_end(&mut buf) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.chunk = Arc::new(buf);
        self.pos = 0;
        if !self.chunk.is_empty()
            && let Some(tx) = &self.tx
            && tx.send(Arc::clone(&self.chunk)).is_err()
        {
            return Err(io::Error::other("diff_id hasher thread stopped"));
        }
        Ok(())
    }

    /// The SHA-256 of everything read (call after reading to the end).
    pub(crate) fn finish(mut self) -> io::Result<Digest> {
        drop(self.tx.take());
        self.hasher
            .take()
            .expect("finish is called once")
            .join()
            .map_err(|_| io::Error::other("diff_id hasher thread panicked"))
    }
}

impl<R: Read> Read for StreamReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.chunk.len() {
            if self.eof {
                return Ok(0);
            }
            self.fill()?;
        }
        let n = (self.chunk.len() - self.pos).min(buf.len());
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        self.consumed += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns at most 7 bytes per read, like a slow pipe.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.0.len().min(buf.len()).min(7);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn hashes_everything_read_in_any_read_sizes() {
        let data: Vec<u8> = (0..1_000_003u32).map(|i| (i % 253) as u8).collect();
        let mut r = StreamReader::new(Trickle(&data)).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 1000];
        loop {
            let n = r.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        assert_eq!(r.len(), data.len() as u64);
        assert_eq!(r.finish().unwrap(), Digest::sha256_of(&data));
        assert_eq!(out, data);
    }
}
