//! zstd:chunked footers (both layouts) and TOC annotations.
#![no_main]
use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use strata_chunked::reader;

fuzz_target!(|data: &[u8]| {
    if data.len() >= 8 {
        let size = u64::from_le_bytes(data[..8].try_into().unwrap());
        let _ = reader::parse_footer(&data[8..], size);
    }
    // annotations: lines of key=value
    let text = String::from_utf8_lossy(data);
    let map: BTreeMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let _ = reader::locate(&map);
});
