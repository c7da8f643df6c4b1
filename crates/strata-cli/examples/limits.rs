//! Single-core limits on this machine for a layer blob: SHA-256 speed over
//! the uncompressed bytes and decompression speed (gzip via flate2/zlib-rs,
//! or zstd), as strata uses them. Prints JSON.
//!
//! `cargo run --release -p strata-cli --example limits -- BLOB`

use std::io::Read;
use std::time::Instant;

fn main() {
    let path = std::env::args().nth(1).expect("usage: limits BLOB");
    let blob = std::fs::read(&path).expect("reading blob");
    let gz = blob.starts_with(&[0x1f, 0x8b]);
    let zs = blob.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]);
    let decompress = || -> Vec<u8> {
        let mut out = Vec::with_capacity(blob.len() * 3);
        if gz {
            flate2::read::MultiGzDecoder::new(&blob[..])
                .read_to_end(&mut out)
                .expect("gunzip");
        } else if zs {
            zstd::stream::read::Decoder::new(&blob[..])
                .expect("zstd")
                .read_to_end(&mut out)
                .expect("unzstd");
        } else {
            out.extend_from_slice(&blob);
        }
        out
    };
    let tar = decompress();
    let best = |f: &dyn Fn()| {
        (0..3)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    };
    let mb = tar.len() as f64 / 1e6;
    let sha = best(&|| {
        std::hint::black_box(strata_digest::Digest::sha256_of(&tar));
    });
    let dec = best(&|| {
        std::hint::black_box(decompress());
    });
    println!(
        "{{\"uncompressed_bytes\": {}, \"sha256_mb_s\": {:.1}, \"decompress_mb_s\": {:.1}, \"limit_mb_s\": {:.1}}}",
        tar.len(),
        mb / sha,
        mb / dec,
        (mb / sha).min(mb / dec)
    );
}
