//! Import throughput on a generated 1 GiB tar with a sink that only hashes
//! (what the store costs minus the disk). Run with
//! `cargo run --release -p strata-tar --example throughput`.

use std::io::{self, Read};
use std::time::Instant;

use strata_digest::{Digest, Hasher};
use strata_tar::{ObjectSink, import_tar};

/// Hashes content and drops it, like writing to /dev/null.
struct NullSink {
    buf: Vec<u8>,
}

impl ObjectSink for NullSink {
    fn put(&mut self, content: &mut dyn Read, size: u64) -> io::Result<Digest> {
        let mut h = Hasher::new();
        let mut left = size;
        while left > 0 {
            let want = left.min(self.buf.len() as u64) as usize;
            let n = content.read(&mut self.buf[..want])?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            h.update(&self.buf[..n]);
            left -= n as u64;
        }
        Ok(h.finish())
    }
}

/// `count` copies of one ustar member of `size` bytes, then the end marker.
struct Generated {
    member: Vec<u8>,
    count: usize,
    pos: usize,
    trailer: usize,
}

impl Generated {
    fn new(size: usize, count: usize) -> Self {
        let mut h = [0u8; 512];
        h[..8].copy_from_slice(b"file.bin");
        h[100..107].copy_from_slice(b"0000644");
        h[108..115].copy_from_slice(b"0000000");
        h[116..123].copy_from_slice(b"0000000");
        h[124..135].copy_from_slice(format!("{size:011o}").as_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = b'0';
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| *b as u32).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        let mut member = h.to_vec();
        member.extend((0..size).map(|i| (i * 7 % 251) as u8));
        member.resize(member.len().div_ceil(512) * 512, 0);
        Generated {
            member,
            count,
            pos: 0,
            trailer: 1024,
        }
    }
}

impl Read for Generated {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.count == 0 {
            let n = self.trailer.min(buf.len());
            buf[..n].fill(0);
            self.trailer -= n;
            return Ok(n);
        }
        let n = (self.member.len() - self.pos).min(buf.len());
        buf[..n].copy_from_slice(&self.member[self.pos..self.pos + n]);
        self.pos += n;
        if self.pos == self.member.len() {
            self.pos = 0;
            self.count -= 1;
        }
        Ok(n)
    }
}

fn main() {
    let (size, count) = (1 << 20, 1024);
    let mut sink = NullSink {
        buf: vec![0; 256 * 1024],
    };
    let start = Instant::now();
    let imp = import_tar(Generated::new(size, count), &mut sink).unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(imp.record.entries.len(), count);
    let mb = imp.size as f64 / 1e6;
    println!(
        "import_tar: {mb:.0} MB in {secs:.2} s = {:.0} MB/s",
        mb / secs
    );

    // The floor: hashing the stream once, as the diff_id needs.
    let start = Instant::now();
    let mut g = Generated::new(size, count);
    let mut h = Hasher::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = g.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let one = start.elapsed().as_secs_f64();
    println!("sha256 of the stream once: {:.0} MB/s", mb / one);

    // What a single-threaded import could reach at best: two hashes.
    let start = Instant::now();
    let mut g = Generated::new(size, count);
    let (mut h1, mut h2) = (Hasher::new(), Hasher::new());
    loop {
        let n = g.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h1.update(&buf[..n]);
        h2.update(&buf[..n]);
    }
    let two = start.elapsed().as_secs_f64();
    println!(
        "sha256 twice in series (single-thread ceiling): {:.0} MB/s",
        mb / two
    );
}
