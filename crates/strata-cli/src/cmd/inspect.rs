//! `strata inspect IMAGE`

use std::process::ExitCode;

use anyhow::{Context, Result};

use crate::Ctx;

/// Arguments of `strata inspect`.
#[derive(clap::Args)]
pub struct Args {
    /// Image name or manifest digest.
    image: String,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<ExitCode> {
    let store = ctx.open_store()?;
    let digest = store.resolve_image(&a.image)?;
    let meta = store.image_meta(&digest)?;
    let manifest: serde_json::Value = serde_json::from_slice(&store.image_manifest(&digest)?)
        .context("parsing stored manifest")?;
    let config: serde_json::Value =
        serde_json::from_slice(&store.image_config(&digest)?).context("parsing stored config")?;
    let refs = store.refs()?;
    let names: Vec<&String> = refs
        .iter()
        .filter(|(_, d)| **d == digest)
        .map(|(n, _)| n)
        .collect();
    let mut layers = Vec::new();
    for (i, l) in meta.layers.iter().enumerate() {
        let lmeta = store.layer_meta(&l.diff_id)?;
        let mut shared = Vec::new();
        for other in store.images_using_layer(&l.diff_id)? {
            if other == digest {
                continue;
            }
            let other_names: Vec<&String> = refs
                .iter()
                .filter(|(_, d)| **d == other)
                .map(|(n, _)| n)
                .collect();
            shared.push(serde_json::json!({"manifest_digest": other, "names": other_names}));
        }
        layers.push(serde_json::json!({
            "index": i,
            "digest": l.blob.digest,
            "media_type": l.blob.media_type,
            "size": l.blob.size,
            "diff_id": l.diff_id,
            "uncompressed_size": lmeta.size,
            "entries": lmeta.entries,
            "objects": lmeta.objects,
            "shared_with": shared,
        }));
    }
    let tree = match store.erofs_info(&digest) {
        None => serde_json::Value::Null,
        Some(i) => {
            let mut t = serde_json::json!({
                "format": i.format,
                "tree_digest": i.tree_digest,
                "composefs_id": i.composefs_id,
                "size": i.size,
                "inodes": i.inodes,
            });
            if let Some(s) = &i.split {
                t["parts"] = serde_json::json!({
                    "base": {"layers": s.base_layers, "chain_id": s.base_chain,
                             "digest": s.base.digest, "composefs_id": s.base.verity, "size": s.base.size},
                    "upper": {"digest": s.upper.digest, "composefs_id": s.upper.verity, "size": s.upper.size},
                });
            }
            t
        }
    };
    let out = serde_json::json!({
        "names": names,
        "manifest_digest": digest,
        "manifest_media_type": meta.manifest_media_type,
        "config_digest": meta.config_digest,
        "source": meta.source,
        "created": meta.created,
        "tree": tree,
        "layers": layers,
        "manifest": manifest,
        "config": config,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(ExitCode::SUCCESS)
}
