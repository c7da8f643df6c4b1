//! `strata rootfs build|ls|inspect|rm|export|serve|commit|push|pull`: VM
//! templates (ext4 images of an exact size, stored as block chunks).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use strata_block::{BuildRequest, Source};

use strata_ops::human_bytes as human;

use crate::Ctx;

mod artifact;
mod serve;

/// Arguments of `strata rootfs`.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Build an ext4 template from an image (--from) or another template
    /// (--from-template, to resize it or add files).
    Build(BuildArgs),
    /// List templates.
    Ls,
    /// Show a template's map summary and lineage as JSON.
    Inspect(NameArg),
    /// Remove a template name (its chunks go at the next gc).
    Rm(NameArg),
    /// Write a template as a sparse raw image file.
    Export(ExportArgs),
    /// Serve a template as a FUSE file (loop-mount it or give it to a VMM).
    Serve(serve::ServeArgs),
    /// Turn the blocks written to a `serve --writable` file into a child template.
    Commit(serve::CommitArgs),
    /// Push a template to a registry as an OCI artifact.
    Push(artifact::PushArgs),
    /// Pull a template's map from a registry (chunks come on demand).
    Pull(artifact::PullArgs),
}

#[derive(clap::Args)]
struct BuildArgs {
    /// The image: a name or digest in the store, else a reference to pull
    /// (as `strata pull` takes it: bare references and short names too).
    #[arg(
        long,
        conflicts_with = "from_template",
        required_unless_present = "from_template"
    )]
    from: Option<String>,
    /// The template to start from (name or id).
    #[arg(long)]
    from_template: Option<String>,
    /// Size of the image: 2GiB, 512MiB, ... (whole 4 KiB blocks). Required
    /// with --from; with --from-template the default is the template's size.
    #[arg(long, value_parser = strata_block::parse_size)]
    size: Option<u64>,
    /// A directory laid over the result (repeatable; the last one wins).
    #[arg(long = "add", value_name = "DIR")]
    adds: Vec<PathBuf>,
    /// Name the template.
    #[arg(long)]
    name: Option<String>,
    /// Build even when the cache has this build.
    #[arg(long)]
    no_cache: bool,
    /// For an image pulled first.
    #[command(flatten)]
    registry: crate::args::RegistryArgs,
}

#[derive(clap::Args)]
pub struct NameArg {
    /// Template name or id.
    name: String,
}

#[derive(clap::Args)]
struct ExportArgs {
    /// Template name or id.
    name: String,
    /// The raw image file to write.
    file: PathBuf,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<ExitCode> {
    match a.cmd {
        Cmd::Build(b) => build(ctx, b),
        Cmd::Ls => ls(ctx),
        Cmd::Inspect(n) => inspect(ctx, n),
        Cmd::Rm(n) => rm(ctx, n),
        Cmd::Export(e) => export(ctx, e),
        Cmd::Serve(s) => serve::serve(ctx, s),
        Cmd::Commit(c) => serve::commit(ctx, c),
        Cmd::Push(p) => artifact::push(ctx, p),
        Cmd::Pull(p) => artifact::pull(ctx, p),
    }
}

fn build(ctx: &Ctx, b: BuildArgs) -> Result<ExitCode> {
    let store = ctx.open_store()?;
    let source = match (&b.from, &b.from_template) {
        (Some(_), None) if b.size.is_none() => {
            bail!("--size is required with --from (e.g. --size 2GiB)")
        }
        (Some(i), None) => {
            let registry = b.registry.options(&store)?;
            Source::Image(crate::args::image_or_pull(ctx, &store, i, &registry)?.to_string())
        }
        (None, Some(t)) => Source::Template(t.clone()),
        _ => bail!("give --from IMAGE or --from-template NAME"),
    };
    let req = BuildRequest {
        source,
        size: b.size,
        adds: b.adds,
        no_cache: b.no_cache,
    };
    let built = ctx
        .with_events(|ctl| strata_block::build(&store, &req, ctl))
        .map_err(|e| match e {
            // the library names the tree; the user gave it as --add
            strata_block::BlockError::BadAdd { path, reason } => {
                anyhow::anyhow!("--add {}: {reason}", path.display())
            }
            e => anyhow::Error::new(e),
        })
        .context("building the template")?;
    if let Some(n) = &b.name {
        store.set_template_name(n, &built.id)?;
    }
    let v = crate::render::json_with(&built, serde_json::json!({ "name": b.name }));
    let what = b.name.map(|n| format!("{n} ")).unwrap_or_default();
    let verb = if built.cached { "" } else { "built " };
    ctx.print_with(&v, Some(built.id), format!("{verb}template {what}{built}"))
}

fn ls(ctx: &Ctx) -> Result<ExitCode> {
    ctx.print_lines(&ctx.open_store()?.templates()?)
}

fn inspect(ctx: &Ctx, n: NameArg) -> Result<ExitCode> {
    let store = ctx.open_store()?;
    let id = store.resolve_template(&n.name)?;
    let v = store.inspect_template(&id)?;
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(ExitCode::SUCCESS)
}

fn rm(ctx: &Ctx, n: NameArg) -> Result<ExitCode> {
    let store = ctx.open_store()?;
    let n = &n.name;
    let Some(id) = store.remove_template_name(n)? else {
        bail!("no template named {n:?} (see `strata rootfs ls`)");
    };
    ctx.say(format_args!(
        "removed template name {n} ({id}); `strata gc` frees its chunks"
    ));
    Ok(ExitCode::SUCCESS)
}

fn export(ctx: &Ctx, e: ExportArgs) -> Result<ExitCode> {
    let store = ctx.open_store()?;
    let id = store.resolve_template(&e.name)?;
    let map = strata_block::export_template(&store, &id, &e.file)
        .with_context(|| format!("exporting template {id} to {}", e.file.display()))?;
    let (file, size) = (e.file.display(), human(map.size));
    ctx.say(format_args!(
        "wrote {file} ({size}, sparse) from template {id}"
    ));
    Ok(ExitCode::SUCCESS)
}
