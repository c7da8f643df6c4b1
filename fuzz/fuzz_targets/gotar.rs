//! Go's tar reader as zstd:chunked uses it (headers and payloads).
#![no_main]
use libfuzzer_sys::fuzz_target;
use strata_chunked::gotar::{GoTarReader, Next};

fuzz_target!(|data: &[u8]| {
    let mut r = GoTarReader::new(data);
    let mut buf = [0u8; 4096];
    for _ in 0..10_000 {
        match r.next_header() {
            Ok(Next::Entry { .. }) => loop {
                match r.read_data(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            },
            _ => break,
        }
    }
});
