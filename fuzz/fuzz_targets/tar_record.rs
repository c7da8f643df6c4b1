//! The rebuild record decoder (the store's per-layer tar record).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // records are zstd frames: fuzz the decoder behind the decompressor
    let z = zstd::bulk::compress(data, 1).expect("compress");
    if let Ok(r) = strata_tar::LayerRecord::decode(&z[..]) {
        let _ = r.raw_bytes();
        let _ = r.objects().count();
    }
    // and raw bytes as they come
    let _ = strata_tar::LayerRecord::decode(data);
});
