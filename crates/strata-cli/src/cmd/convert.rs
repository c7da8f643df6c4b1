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
    /// `latest` by default). With --via: the repository (and tag) the
    /// service pushes to, the source's repository when not given.
    #[arg(required_unless_present = "via")]
    dest: Option<String>,
    /// Layer format: zstd:chunked or zstd (with --via: any name, passed
    /// to the service as given).
    #[arg(long = "format", default_value = "zstd:chunked")]
    format_text: String,
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
    /// Ask a conversion service (`strata serve`) at URL instead of
    /// converting here. Whatever keeps a verified result from coming back
    /// (a removed or unknown format, a failed job, no service) prints a
    /// warning that lazy loading is not used and why, and the source
    /// image's digest (exit 0 unless --require).
    #[arg(long, value_name = "URL")]
    via: Option<String>,
    /// The service's bearer token, from this file ($STRATA_TOKEN also works).
    #[arg(long, value_name = "FILE", requires = "via")]
    token_file: Option<PathBuf>,
    /// With --via: a fallback to the source image is an error (exit 1).
    #[arg(long, requires = "via")]
    require: bool,
    /// With --via: ask the service to record what the image reads when
    /// it runs (its entrypoint and cmd, or --cmd) and place that first.
    #[arg(long, requires = "via", conflicts_with = "prefetch_list")]
    optimize: bool,
    /// With --optimize: the command to run instead of the image's.
    #[arg(long, requires = "optimize", num_args = 1.., allow_hyphen_values = true)]
    cmd: Vec<String>,
    /// With --optimize: seconds the command may run.
    #[arg(long, default_value_t = 60, requires = "optimize")]
    timeout: u64,
    /// With --via: seconds to wait for the job.
    #[arg(long, default_value_t = 1800, requires = "via")]
    wait: u64,
    /// For a registry source or destination.
    #[command(flatten)]
    registry: crate::args::RegistryArgs,
}

/// `strata convert --via URL`: the service converts, or the source is
/// what to deploy.
fn via(ctx: &Ctx, a: &Args, url: &str) -> Result<ExitCode> {
    use strata_server::client::{ViaOutcome, convert_via};
    let token = match &a.token_file {
        Some(f) => Some(
            std::fs::read_to_string(f)
                .with_context(|| format!("reading token file {}", f.display()))?
                .trim()
                .to_string(),
        ),
        None => std::env::var("STRATA_TOKEN").ok().filter(|t| !t.is_empty()),
    };
    let mut body = serde_json::json!({"source": a.source, "format": a.format_text});
    if let Some(d) = &a.dest {
        body["target"] = d.clone().into();
    }
    if a.optimize {
        body["prefetch"] = "optimize".into();
        body["optimize"] = serde_json::json!({"cmd": a.cmd, "timeout_s": a.timeout});
    }
    if let Some(p) = &a.prefetch_list {
        let list = prefetch_paths(
            &std::fs::read_to_string(p)
                .with_context(|| format!("reading prefetch list {}", p.display()))?,
        );
        body["prefetch"] = "list".into();
        body["prefetch_list"] = list.into();
    }
    let outcome = convert_via(
        url,
        token.as_deref(),
        &body,
        std::time::Duration::from_secs(a.wait),
    )?;
    match outcome {
        ViaOutcome::Converted {
            digest,
            reference,
            job,
        } => {
            if ctx.json {
                let v = serde_json::json!({"converted": true, "digest": digest, "reference": reference, "job": job});
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if ctx.quiet {
                println!("{digest}");
            } else {
                eprintln!("converted and verified by {url} (job {job}): {reference}");
                println!("{digest}");
            }
            Ok(ExitCode::SUCCESS)
        }
        ViaOutcome::Fallback {
            source_digest,
            reason,
        } => {
            eprintln!("warning: lazy loading is not used: {reason}; using the source image");
            let digest = match source_digest {
                Some(d) => d,
                // no answer from the service: the source, resolved here
                None => {
                    let r = match a.source.parse::<strata_oci::ImageName>() {
                        Ok(strata_oci::ImageName::Qualified(r)) => r,
                        Ok(_) => anyhow::bail!("{} names no registry", a.source),
                        Err(e) => return Err(e).with_context(|| format!("parsing {}", a.source)),
                    };
                    let resolved = strata_oci::open_source(&r, &a.registry.flags())
                        .and_then(|s| s.resolve(&strata_oci::Platform::host_default()))
                        .with_context(|| format!("resolving {}", a.source))?;
                    resolved
                        .index_digest
                        .unwrap_or(resolved.manifest_digest)
                        .to_string()
                }
            };
            if ctx.json {
                let v = serde_json::json!({"converted": false, "source_digest": digest, "reason": reason});
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("{digest}");
            }
            Ok(if a.require {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

pub fn run(ctx: &Ctx, a: Args) -> Result<ExitCode> {
    if let Some(url) = &a.via {
        return via(ctx, &a, url);
    }
    let format: Format = a.format_text.parse().map_err(anyhow::Error::msg)?;
    let dest_text = a.dest.clone().context("a destination is needed")?;
    let store = ctx.open_store()?;
    let registry = a.registry.options(&store)?;
    let (dest, target) = Target::open(&dest_text, &registry, &store.root().join("tmp"))
        .with_context(|| format!("opening destination {dest_text}"))?;
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
        format,
        level: a.level,
        jobs: a.jobs,
        place_first: !prefetch.is_empty() && !a.keep_order,
        prefetch,
        ..ConvertOptions::default()
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
