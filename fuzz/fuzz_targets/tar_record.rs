//! The layer rebuild record decoder (strata-tar's `LayerRecord`), fed the
//! uncompressed record bytes (compressing every input cost 30x the
//! executions), plus the zstd-framed entry point on the raw input.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = strata_tar::LayerRecord::decode_uncompressed(data) {
        let _ = r.raw_bytes();
        let _ = r.objects().count();
    }
    let _ = strata_tar::LayerRecord::decode(data);
});
