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
    let owned = reader::read_toc(&z, &loc);
    // the borrowing reader (scanned without serde where it can be) reads
    // what the owned one reads, and refuses only what it refuses (it
    // skips fields the owned one types, so it may read more)
    let mut refs = Vec::new();
    let head = reader::read_toc_refs(&z, &loc, u64::MAX, &mut |e| {
        refs.push((
            e.kind.into_owned(),
            e.name.into_owned(),
            e.link_name.into_owned(),
            e.size,
            e.digest.into_owned(),
            [e.offset, e.end_offset, e.chunk_size, e.chunk_offset],
            e.chunk_digest.into_owned(),
            e.chunk_type.into_owned(),
        ));
        Ok(())
    });
    if let Ok(toc) = &owned {
        let head = head.expect("what the owned reader reads, the borrowing one reads");
        assert_eq!(head.version, toc.version);
        assert_eq!(head.tar_split_digest, toc.tar_split_digest);
        let want: Vec<_> = toc
            .entries
            .iter()
            .map(|e| {
                (
                    e.kind.clone(),
                    e.name.clone(),
                    e.link_name.clone(),
                    e.size,
                    e.digest.clone(),
                    [e.offset, e.end_offset, e.chunk_size, e.chunk_offset],
                    e.chunk_digest.clone(),
                    e.chunk_type.clone(),
                )
            })
            .collect();
        assert_eq!(refs, want);
    }
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
