//! The zstd:chunked TOC (JSON behind zstd), as read from a registry.
#![no_main]
use libfuzzer_sys::fuzz_target;
use strata_chunked::reader::{self, Layout, Range, TocLocation};

fuzz_target!(|data: &[u8]| {
    let z = zstd::bulk::compress(data, 1).expect("compress");
    let loc = TocLocation {
        layout: Layout::Current,
        toc: Range {
            offset: 0,
            len: z.len() as u64,
            uncompressed: data.len() as u64,
        },
        tar_split: None,
        checksum: None,
    };
    let _ = reader::read_toc(&z, &loc);
    // and bytes that are not zstd at all
    let loc = TocLocation {
        toc: Range {
            offset: 0,
            len: data.len() as u64,
            uncompressed: 1 << 20,
        },
        ..loc
    };
    let _ = reader::read_toc(data, &loc);
});
