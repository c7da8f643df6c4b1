//! The tar-split stream (JSON lines behind zstd).
#![no_main]
use libfuzzer_sys::fuzz_target;
use sha2::{Digest as _, Sha256};
use strata_chunked::reader::{self, Range};
use strata_chunked::toc::Toc;

fuzz_target!(|data: &[u8]| {
    let z = zstd::bulk::compress(data, 1).expect("compress");
    let toc = Toc {
        version: 1,
        entries: Vec::new(),
        tar_split_digest: format!("sha256:{}", hex::encode(Sha256::digest(&z))),
    };
    let range = Range {
        offset: 0,
        len: z.len() as u64,
        uncompressed: data.len() as u64,
    };
    if let Ok(entries) = reader::read_tar_split(&z, &toc, &range) {
        for e in &entries {
            let _ = e.payload_bytes();
        }
    }
});
