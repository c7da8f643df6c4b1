//! `strata convert SRC DST`

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use strata_oci::convert::{ConvertOptions, Format, Target, convert_to, prefetch_paths};

use crate::Ctx;

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
    let (src, secs) = (&a.source, t0.elapsed().as_secs_f64());
    println!("converted {src} to {dest} {s} in {secs:.2} s");
    if let Some(p) = &s.push {
        println!("pushed to {dest}: {p}");
    }
    if let (placed, layers @ 1..) = s.placed_first() {
        println!(
            "placed {placed} entries of the prefetch list (with their directories and link targets) first in {layers} layers: their diff_ids changed, the tree did not (--keep-order keeps the tars)"
        );
    }
    Ok(ExitCode::SUCCESS)
}
