//! `strata images`

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::Result;

use crate::Ctx;
use strata_ops::human_bytes as human;

pub fn run(ctx: &Ctx) -> Result<ExitCode> {
    let store = ctx.open_store()?;
    let refs = store.refs()?;
    let mut by_image: BTreeMap<_, Vec<String>> = BTreeMap::new();
    for (name, d) in &refs {
        by_image.entry(*d).or_default().push(name.clone());
    }
    let mut rows = Vec::new();
    for d in store.image_digests()? {
        let meta = store.image_meta(&d)?;
        let size: u64 = meta.layers.iter().map(|l| l.blob.size).sum();
        let names = by_image.remove(&d).unwrap_or_default();
        rows.push((d, names, meta.layers.len(), size));
    }
    if ctx.json {
        let v: Vec<_> = rows
            .iter()
            .map(|(d, names, layers, size)| {
                serde_json::json!({
                    "manifest_digest": d,
                    "names": names,
                    "layers": layers,
                    "compressed_size": size,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    if ctx.quiet {
        for (d, ..) in &rows {
            println!("{d}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<60} {:<19} {:>6} {:>10}",
        "NAME", "DIGEST", "LAYERS", "SIZE"
    );
    for (d, names, layers, size) in &rows {
        let shown = if names.is_empty() {
            vec!["<none>".to_string()]
        } else {
            names.clone()
        };
        for n in shown {
            println!(
                "{:<60} {:<19} {:>6} {:>10}",
                n,
                d.short(),
                layers,
                human(*size)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
