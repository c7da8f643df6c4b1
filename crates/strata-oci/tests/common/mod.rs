//! Fixture helpers for the strata-oci integration tests; the registry
//! launcher and the misbehaving proxy live in `strata-testkit`.

#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::path::Path;

pub use strata_testkit::proxy::*;
pub use strata_testkit::*;

/// Deterministic incompressible-ish bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A tar of regular files.
pub fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, *data)
            .expect("appending to tar");
    }
    b.into_inner().expect("finishing tar")
}

/// gzip `data`.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).expect("gzip");
    e.finish().expect("gzip")
}

/// A tar of the contents of `dir` (paths relative to it), written to `out`.
pub fn tar_dir(dir: &Path, out: &Path) {
    let f = fs::File::create(out).expect("creating archive");
    let mut b = tar::Builder::new(f);
    b.append_dir_all(".", dir).expect("archiving directory");
    b.finish().expect("finishing archive");
}

/// An image config for `diff_ids` (as digest strings).
pub fn config_json(arch: &str, diff_ids: &[String]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .expect("config json")
}
