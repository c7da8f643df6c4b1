//! A whole zstd:chunked layer as strata opens it for a partial pull or a
//! lazy mount (strata-oci's `open_chunked_with`): the TOC streamed and
//! checked, the tar-split streamed and checked, and the two compared entry
//! by entry. The input is `TOC JSON` NUL `tar-split JSON lines`; the
//! harness compresses both, lays them after 64 KiB of file data, writes the
//! annotations, and puts the real tar-split digest wherever the TOC says
//! `@TS@` (an author can compute it; the fuzzer cannot).
#![no_main]
use std::collections::BTreeMap;
use std::io::{Cursor, Read};
use std::sync::atomic::AtomicU64;

use libfuzzer_sys::fuzz_target;
use sha2::{Digest as _, Sha256};
use strata_chunked::{ANN_TARSPLIT_POSITION, ANN_TOC_CHECKSUM, ANN_TOC_POSITION};
use strata_digest::Digest;
use strata_oci::manifest::{Descriptor, Platform};
use strata_oci::partial::{MetadataBudget, MetadataLimits, open_chunked_with};
use strata_oci::{ImageSource, OciError, ResolvedImage};

const DATA: usize = 64 << 10;

struct Blob(Vec<u8>);

impl ImageSource for Blob {
    fn resolve(&self, _: &Platform) -> Result<ResolvedImage, OciError> {
        Err(OciError::Format {
            what: "fuzz".into(),
            reason: "no manifest".into(),
        })
    }
    fn open_blob(&self, _: &Descriptor, offset: u64) -> Result<Box<dyn Read + Send>, OciError> {
        let mut c = Cursor::new(self.0.clone());
        c.set_position(offset);
        Ok(Box::new(c))
    }
    fn describe(&self) -> String {
        "fuzz".into()
    }
}

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fuzz_target!(|data: &[u8]| {
    let (toc, ts) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    let ts_z = zstd::bulk::compress(ts, 1).expect("compress");
    let toc = String::from_utf8_lossy(toc).replace("@TS@", &sha(&ts_z));
    let toc_z = zstd::bulk::compress(toc.as_bytes(), 1).expect("compress");
    let mut blob = vec![0u8; DATA];
    blob.extend_from_slice(&toc_z);
    blob.extend_from_slice(&ts_z);
    let mut annotations = BTreeMap::new();
    annotations.insert(
        ANN_TOC_POSITION.to_string(),
        format!("{DATA}:{}:{}:1", toc_z.len(), toc.len()),
    );
    annotations.insert(
        ANN_TARSPLIT_POSITION.to_string(),
        format!("{}:{}:{}", DATA + toc_z.len(), ts_z.len(), ts.len()),
    );
    annotations.insert(ANN_TOC_CHECKSUM.to_string(), sha(&toc_z));
    let desc = Descriptor {
        media_type: "application/vnd.oci.image.layer.v1.tar+zstd".into(),
        digest: Digest::sha256_of(&blob),
        size: blob.len() as u64,
        annotations,
        platform: None,
        urls: Vec::new(),
    };
    // small limits, so that the fuzzer reaches them
    let budget = MetadataBudget::new(MetadataLimits {
        layer_entries: 4096,
        image_entries: 8192,
        image_bytes: 8 << 20,
    });
    let counter = AtomicU64::new(0);
    if let Ok(Ok(index)) = open_chunked_with(&Blob(blob), &desc, &counter, &budget) {
        // what the readers rely on: every file's frames lie inside the blob
        for f in &index.files {
            assert!(f.offset <= f.end && f.end <= desc.size, "{f:?}");
        }
        let _ = index.entries();
    }
});
