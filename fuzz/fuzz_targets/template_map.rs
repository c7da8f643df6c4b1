//! VM template maps (pulled from registries as artifacts).
#![no_main]
use libfuzzer_sys::fuzz_target;
use strata_store::TemplateMap;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = TemplateMap::parse(data) {
        let n = m.chunk_count();
        for i in 0..n.min(1 << 16) {
            let _ = m.chunk_len(i);
            let _ = m.chunk(i);
        }
        let _ = m.chunks().take(1 << 16).count();
        // a parsed map serializes back to a map that parses
        let again = TemplateMap::parse(&m.to_bytes()).expect("a parsed map re-parses");
        assert_eq!(again.digest(), m.digest());
    }
});
