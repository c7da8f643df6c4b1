//! OCI/Docker manifests and indexes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use strata_oci::manifest::{self, Document, Platform};

fuzz_target!(|data: &[u8]| {
    for ct in [None, Some("application/vnd.oci.image.index.v1+json")] {
        match manifest::parse_document(data, ct, "fuzz") {
            Ok(Document::Index(entries)) => {
                let _ = manifest::pick_platform(&entries, &Platform::host_default(), "fuzz");
            }
            Ok(Document::Manifest(m)) => {
                for l in &m.layers {
                    let _ = manifest::layer_compression(&l.media_type);
                    let _ = strata_chunked::reader::locate(&l.annotations);
                }
            }
            Err(_) => {}
        }
    }
});
