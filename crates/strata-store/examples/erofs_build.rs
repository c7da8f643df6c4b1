//! Benchmark: building an image's composefs EROFS image, by phase, and the
//! `composefs` crate (0.9.4, `mkfs_erofs_versioned(.., V1)`) on the same
//! validated tree.
//!
//!     cargo run --release -p strata-store --example erofs_build -- STORE IMAGE [RUNS]
//!
//! Prints one JSON object: median milliseconds per phase and whether the two
//! writers' bytes are identical. Used by bench/erofs.py.

use std::time::Instant;

use composefs::erofs::format::FormatVersion;
use composefs::erofs::writer::{ValidatedFileSystem, mkfs_erofs_versioned};
use strata_erofs::{FileData, Flavor, Kind};
use strata_store::Store;

// The FsTree -> composefs conversion shared with strata-erofs's compat tests.
#[path = "../../strata-erofs/tests/common/mod.rs"]
mod common;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err("usage: erofs_build STORE IMAGE [RUNS]".into());
    }
    let runs: usize = args.get(3).map(|r| r.parse()).transpose()?.unwrap_or(5);
    let store = Store::open(&args[1])?;
    let digest = store.resolve_image(&args[2])?;
    let (mut tree_ms, mut fs_ms, mut write_ms, mut total_ms, mut cfs_ms, mut cfs_conv_ms) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut identical = true;
    let mut size = 0;
    for _ in 0..runs {
        let t0 = Instant::now();
        let t = Instant::now();
        let tree = store.image_tree(&digest)?;
        tree_ms.push(ms(t));
        let t = Instant::now();
        let fs = store.image_fs_tree(&digest, &tree)?;
        fs_ms.push(ms(t));
        let t = Instant::now();
        let image = strata_erofs::build(&fs, Flavor::Composefs)?;
        let ours = image
            .as_bytes()
            .expect("composefs images stream no data")
            .to_vec();
        write_ms.push(ms(t));
        total_ms.push(ms(t0));
        size = ours.len();

        // composefs names objects by fs-verity digest, strata by SHA-256:
        // compare the writers on the same naming.
        let mut renamed = fs.clone();
        for n in &mut renamed.nodes {
            if let Kind::File(FileData::External {
                redirect,
                verity: Some(v),
                ..
            }) = &mut n.kind
            {
                let hex = v.hex();
                *redirect = format!("/{}/{}", &hex[..2], &hex[2..]).into_bytes();
            }
        }
        let ours = strata_erofs::build(&renamed, Flavor::Composefs)?
            .as_bytes()
            .expect("composefs images stream no data")
            .to_vec();
        let t = Instant::now();
        let cfs = ValidatedFileSystem::new(common::to_composefs(&renamed))?;
        cfs_conv_ms.push(ms(t));
        let t = Instant::now();
        let theirs = mkfs_erofs_versioned(&cfs, FormatVersion::V1);
        cfs_ms.push(ms(t));
        if *theirs != *ours
            && identical
            && let Ok(dir) = std::env::var("EROFS_BUILD_DUMP")
        {
            std::fs::write(format!("{dir}/ours.erofs"), &ours)?;
            std::fs::write(format!("{dir}/theirs.erofs"), &theirs)?;
        }
        identical &= *theirs == *ours;
    }
    println!(
        "{}",
        serde_json::json!({
            "image": digest.to_string(),
            "runs": runs,
            "bytes": size,
            "records_to_tree_ms": median(tree_ms),
            "tree_to_erofs_input_ms": median(fs_ms),
            "strata_write_ms": median(write_ms),
            "strata_total_ms": median(total_ms),
            "composefs_convert_ms": median(cfs_conv_ms),
            "composefs_write_ms": median(cfs_ms),
            "identical_bytes": identical,
        })
    );
    Ok(())
}
