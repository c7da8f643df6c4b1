//! A VM template's pack index (pulled from registries with the artifact):
//! checked against a fixed map and packs sized from the index's own pack
//! digests. What passes must locate every chunk of the map inside its pack,
//! without overlaps, and runs of followers must be contiguous.
#![no_main]
use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use strata_block::packs::{PackIndex, Packs, descriptor};
use strata_digest::Digest;
use strata_store::{CHUNK_SIZE, TemplateMap};

/// Chunks 0..5 of the map are sha256([i]), chunk 5 is chunk 1 again and
/// chunk 6, the last, is sha256([5]), 4096 bytes long.
fn map() -> TemplateMap {
    let d = |n: u8| Digest::sha256_of(&[n]);
    TemplateMap::from_chunks(
        6 * CHUNK_SIZE + 4096,
        None,
        0,
        BTreeMap::new(),
        (0..5u8)
            .map(|i| (i as u64, d(i)))
            .chain([(5, d(1)), (6, d(5))]),
    )
}

fuzz_target!(|data: &[u8]| {
    let map = map();
    let _ = PackIndex::max_len(&map, data.len());
    let Ok(index) = serde_json::from_slice::<PackIndex>(data) else {
        return;
    };
    if index.packs.len() > 64 {
        return;
    }
    // a pack's size from its digest's first two bytes, in 4 KiB units
    let descs: Vec<_> = index
        .packs
        .iter()
        .map(|d| {
            let b = d.as_bytes();
            descriptor(*d, (u64::from(b[0]) << 8 | u64::from(b[1])) * 4096)
        })
        .collect();
    let Ok(packs) = Packs::check(&index, &descs, &map) else {
        return;
    };
    for (i, d) in map.chunks() {
        let l = packs.locate(&d).expect("a checked index has every chunk");
        assert_eq!(l.len, map.chunk_len(i));
        assert!(l.offset + l.len <= packs.packs[l.pack].size);
        let mut end = l.offset + l.len;
        for (f, len) in packs.followers(&d, 8 * CHUNK_SIZE) {
            let fl = packs.locate(&f).expect("a follower is listed");
            assert_eq!((fl.pack, fl.offset, fl.len), (l.pack, end, len));
            end += len;
        }
    }
    for p in 0..packs.packs.len() {
        for w in packs.pack_chunks(p).windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "overlap");
        }
    }
});
