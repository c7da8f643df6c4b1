//! `strata convert SRC DST`

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use strata_oci::convert::{ConvertOptions, Format, convert, convert_to_layout};
use strata_oci::pull::{PullOptions, pull};
use strata_oci::push::RegistryDestination;
use strata_oci::{ImageRef, Platform};

use crate::Ctx;
use strata_ops::human_bytes as human;

/// Arguments of `strata convert`.
#[derive(clap::Args)]
pub struct Args {
    /// Source: an image in the store (name or digest) or any pull reference
    /// (pulled first; layers the store has are not downloaded).
    source: String,
    /// Destination: oci:DIR[:TAG] (an OCI layout, created if missing) or
    /// docker://HOST[:PORT]/REPO[:TAG] (pushed to a registry; blobs the
    /// repository already has are not uploaded; tag `latest` by default).
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
    /// Paths (one per line, e.g. from `strata mount --lazy --record`) that
    /// lazy mounts of the result fetch first: kept in the manifest
    /// annotation dev.strata.lazy.prefetch, and placed first in their
    /// layers (with their parent directories and hard link targets; the
    /// layer annotation dev.strata.lazy.first-end marks where they end).
    /// Placing them first changes those layers' tars, so their diff_ids
    /// and the config; the tree stays the same.
    #[arg(long)]
    prefetch_list: Option<std::path::PathBuf>,
    /// With --prefetch-list: keep every tar byte for byte (and the config
    /// as it is); the list only travels in the manifest annotation.
    #[arg(long, requires = "prefetch_list")]
    keep_order: bool,
    /// For a registry source or destination.
    #[command(flatten)]
    registry: crate::args::RegistryArgs,
}

/// Where the converted image goes.
enum Dest<'a> {
    Layout {
        dir: &'a std::path::Path,
        tag: Option<&'a str>,
    },
    Registry(Box<RegistryDestination>),
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
    let store = ctx.open_store()?;
    let registry = a.registry.options(&store)?;
    let target = match &dest {
        ImageRef::OciLayout { dir, tag } => Dest::Layout {
            dir,
            tag: tag.as_deref(),
        },
        // reached (and logged in to) before any conversion work
        ImageRef::Docker { .. } => Dest::Registry(
            RegistryDestination::new(&dest, &registry, &store.root().join("tmp"))
                .map(Box::new)
                .with_context(|| format!("pushing to {dest}"))?,
        ),
        _ => bail!("destination {dest}: write to oci:DIR[:TAG] or docker://HOST[:PORT]/REPO[:TAG]"),
    };
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
                registry: registry.clone(),
                jobs: 3,
                split: strata_store::SplitPolicy::Auto(strata_store::DEFAULT_SPLIT_THRESHOLD),
            };
            let name = reference.to_string();
            let render = ctx.render();
            let pulled = pull(&store, &reference, &name, &opts, ctx.ctl(&render));
            render.finish();
            pulled
                .with_context(|| format!("pulling {name}"))?
                .manifest_digest
        }
    };
    let prefetch = match &a.prefetch_list {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("reading prefetch list {}", p.display()))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(|l| format!("/{}", l.trim_start_matches('/')))
            .collect(),
        None => Vec::new(),
    };
    let opts = ConvertOptions {
        format,
        level: a.level,
        jobs: a.jobs,
        place_first: !prefetch.is_empty() && !a.keep_order,
        prefetch,
    };
    let render = ctx.render();
    let summary = match &target {
        Dest::Layout { dir, tag } => {
            convert_to_layout(&store, &image, dir, *tag, &opts, ctx.ctl(&render))
        }
        Dest::Registry(r) => convert(&store, &image, r.as_ref(), &opts, ctx.ctl(&render)),
    };
    render.finish();
    let summary = summary.with_context(|| format!("converting {image} to {dest}"))?;
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
        if let Some(p) = &summary.push {
            println!(
                "pushed to {dest}: {} blobs uploaded ({}), {} already present",
                p.blobs_uploaded,
                human(p.bytes_uploaded),
                p.blobs_present
            );
        }
    }
    let reordered: Vec<_> = summary
        .layers
        .iter()
        .filter(|l| l.reordered_from.is_some())
        .collect();
    if !reordered.is_empty() && !ctx.quiet && !ctx.json {
        println!(
            "placed {} entries of the prefetch list (with their directories and link targets) first in {} layers: their diff_ids changed, the tree did not (--keep-order keeps the tars)",
            reordered.iter().map(|l| l.placed_first).sum::<usize>(),
            reordered.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}
