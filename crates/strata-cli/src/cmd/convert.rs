//! `strata convert SRC DST`

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use strata_oci::convert::{ConvertOptions, Format, Target, convert_to, prefetch_paths};

use crate::Ctx;
use strata_ops::human_bytes as human;

/// Arguments of `strata convert`.
#[derive(clap::Args)]
pub struct Args {
    /// Source: an image in the store (name or digest) or any pull reference
    /// (pulled first; layers the store has are not downloaded), bare
    /// references and short names too.
    source: String,
    /// Destination: oci:DIR[:TAG] (an OCI layout, created if missing) or
    /// docker://HOST[:PORT]/REPO[:TAG] or HOST[:PORT]/REPO[:TAG] (pushed to
    /// a registry; blobs the repository already has are not uploaded; tag
    /// `latest` by default).
    dest: String,
    /// Layer format: zstd:chunked or zstd.
    #[arg(long, default_value = "zstd:chunked")]
    format: Format,
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
    prefetch_list: Option<PathBuf>,
    /// With --prefetch-list: keep every tar byte for byte (and the config
    /// as it is); the list only travels in the manifest annotation.
    #[arg(long, requires = "prefetch_list")]
    keep_order: bool,
    /// For a registry source or destination.
    #[command(flatten)]
    registry: crate::args::RegistryArgs,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<ExitCode> {
    let store = ctx.open_store()?;
    let registry = a.registry.options(&store)?;
    let (dest, target) = Target::open(&a.dest, &registry, &store.root().join("tmp"))
        .with_context(|| format!("opening destination {}", a.dest))?;
    let t0 = Instant::now();
    let image = crate::args::image_or_pull(ctx, &store, &a.source, &registry)?;
    let prefetch = match &a.prefetch_list {
        Some(p) => prefetch_paths(
            &std::fs::read_to_string(p)
                .with_context(|| format!("reading prefetch list {}", p.display()))?,
        ),
        None => Vec::new(),
    };
    let opts = ConvertOptions {
        format: a.format,
        level: a.level,
        jobs: a.jobs,
        place_first: !prefetch.is_empty() && !a.keep_order,
        prefetch,
    };
    let s = ctx
        .with_events(|ctl| convert_to(&store, &image, &target, &opts, ctl))
        .with_context(|| format!("converting {image} to {dest}"))?;
    if ctx.json || ctx.quiet {
        return ctx.print_with(&s, Some(s.manifest_digest), "");
    }
    let (n, tar, secs) = (
        s.layers.len(),
        human(s.tar_bytes),
        t0.elapsed().as_secs_f64(),
    );
    let src = &a.source;
    println!(
        "converted {src} to {dest} {}: {n} layers, {tar} of tar in {secs:.2} s",
        s.manifest_digest
    );
    if let Some(p) = &s.push {
        println!("pushed to {dest}: {p}");
    }
    let reordered: Vec<_> = s
        .layers
        .iter()
        .filter(|l| l.reordered_from.is_some())
        .collect();
    if !reordered.is_empty() {
        println!(
            "placed {} entries of the prefetch list (with their directories and link targets) first in {} layers: their diff_ids changed, the tree did not (--keep-order keeps the tars)",
            reordered.iter().map(|l| l.placed_first).sum::<usize>(),
            reordered.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}
