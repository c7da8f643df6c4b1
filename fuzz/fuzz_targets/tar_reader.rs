//! The layer tar reader (import of a layer into entries + objects).
#![no_main]
use std::io::{self, Read};

use libfuzzer_sys::fuzz_target;
use strata_digest::Digest;

/// Hashes what it is given, bounded by the size the tar claims.
struct Sink;
impl strata_tar::ObjectSink for Sink {
    fn put(&mut self, content: &mut dyn Read, size: u64) -> io::Result<Digest> {
        let mut buf = Vec::new();
        content.take(size).read_to_end(&mut buf)?;
        Ok(Digest::sha256_of(&buf))
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = strata_tar::read_entries(data, &mut Sink);
    let _ = strata_tar::normalize(data);
});
