//! `strata convert SRC DST`

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use strata_oci::convert::{ConvertOptions, Format, convert_to_layout};
use strata_oci::pull::{NoProgress, PullOptions, pull};
use strata_oci::{ImageRef, Platform};

use super::human;
use crate::Ctx;

/// Arguments of `strata convert`.
#[derive(clap::Args)]
pub struct Args {
    /// Source: an image in the store (name or digest) or any pull reference
    /// (pulled first; layers the store has are not downloaded).
    source: String,
    /// Destination: oci:DIR[:TAG].
    dest: String,
    /// Layer format.
    #[arg(long, default_value = "zstd:chunked")]
    format: String,
    /// zstd level.
    #[arg(long, default_value_t = 3)]
    level: i32,
    /// Layers converted at once.
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Use plain HTTP for a registry source.
    #[arg(long)]
    plain_http: bool,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<ExitCode> {
    let format = match a.format.as_str() {
        "zstd:chunked" => Format::ZstdChunked,
        "zstd" => Format::Zstd,
        f => bail!("unknown format {f:?}: zstd:chunked or zstd"),
    };
    let dest: ImageRef = a
        .dest
        .parse()
        .with_context(|| format!("parsing destination {:?}", a.dest))?;
    let ImageRef::OciLayout { dir, tag } = &dest else {
        bail!(
            "destination {dest}: only oci:DIR[:TAG] is written so far; push the layout with `skopeo copy oci:DIR:TAG docker://...`"
        );
    };
    let store = ctx.open_store()?;
    let t0 = Instant::now();
    let image = match store.resolve_image(&a.source) {
        Ok(d) => d,
        Err(_) => {
            let reference: ImageRef = a.source.parse().with_context(|| {
                format!(
                    "{:?} is neither an image in the store nor a reference",
                    a.source
                )
            })?;
            let opts = PullOptions {
                platform: Platform::host_default(),
                registry: super::pull::registry_options(&store, a.plain_http, None),
                jobs: 3,
                split: strata_store::SplitPolicy::Auto(strata_store::DEFAULT_SPLIT_THRESHOLD),
            };
            let name = reference.to_string();
            pull(&store, &reference, &name, &opts, &NoProgress)
                .with_context(|| format!("pulling {name}"))?
                .manifest_digest
        }
    };
    let opts = ConvertOptions {
        format,
        level: a.level,
        jobs: a.jobs,
    };
    let summary = convert_to_layout(&store, &image, dir, tag.as_deref(), &opts)
        .with_context(|| format!("converting {image} to {dest}"))?;
    let secs = t0.elapsed().as_secs_f64();
    if ctx.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else if ctx.quiet {
        println!("{}", summary.manifest_digest);
    } else {
        println!(
            "converted {} to {dest} {}: {} layers, {} of tar in {secs:.2} s",
            a.source,
            summary.manifest_digest,
            summary.layers.len(),
            human(summary.tar_bytes)
        );
    }
    for l in &summary.layers {
        if let Some(why) = &l.fallback {
            eprintln!(
                "strata: warning: layer {} written as plain zstd: {why}",
                l.diff_id
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
