//! `strata rootfs serve NAME FILE [--writable]` and `strata rootfs commit
//! FILE --name NEW` (see `strata_block::served`).
//!
//! Without `--foreground`, serve starts itself again as a daemon (log in
//! `<store>/serve/<key>/log`) and returns once the file is served.
//! `strata umount FILE` stops it; writes not committed are then dropped.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use strata_block::served::{self, ServeRequest};
use strata_block::served_daemon;
use strata_sys::daemon;

use crate::Ctx;
use crate::args::RegistryArgs;

/// Arguments of `strata rootfs serve`.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Template name or id.
    pub name: String,
    /// The file to serve it at (created if missing).
    pub file: PathBuf,
    /// Keep writes in a local sparse overlay (see `strata rootfs commit`).
    #[arg(long)]
    pub writable: bool,
    /// For a pulled template: a chunk fetched brings the missing chunks
    /// after it in its pack, up to this many bytes in all, in one request
    /// (0: the chunk alone).
    #[arg(long, default_value = "256KiB")]
    pub readahead: String,
    /// Stay in the foreground, logging to stderr.
    #[arg(long)]
    pub foreground: bool,
    /// For a pulled template: how to reach its registry.
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// Arguments of `strata rootfs commit`.
#[derive(clap::Args)]
pub struct CommitArgs {
    /// The served file.
    pub file: PathBuf,
    /// Name of the new template.
    #[arg(long)]
    pub name: String,
}

pub fn serve(ctx: &Ctx, a: ServeArgs) -> Result<ExitCode> {
    if daemon::is_daemon() || a.foreground {
        // it serves for long: before any thread starts
        served_daemon::prepare();
    }
    // a daemon's store: each operation takes the lock, leases keep what it
    // uses in between (gc runs meanwhile)
    let store = strata_store::Store::open(&ctx.root)
        .with_context(|| format!("opening store {}", ctx.root.display()))?;
    let id = store.resolve_template(&a.name)?;
    if !daemon::is_daemon() {
        let (file, dropped) = served::prepare_file(&ctx.root, &a.file)?;
        if dropped > 0 {
            eprintln!(
                "strata: dropping {dropped} chunks written to {} earlier and never committed",
                file.display()
            );
        }
        if !a.foreground {
            let log = strata_block::serve::serve_dir(&ctx.root, &file).join("log");
            return crate::background::started(ctx, "rootfs serve", &log);
        }
    }
    let req = ServeRequest {
        template: id,
        name: a.name.clone(),
        file: a.file.clone(),
        writable: a.writable,
        registry: a.registry.options(&store)?,
        readahead: strata_block::parse_bytes(&a.readahead)
            .with_context(|| format!("--readahead {}", a.readahead))?,
    };
    // chunk fetch failures are warnings (the log of a daemon); Ctrl-C
    // unmounts and ends the serve
    let events = Arc::new(ctx.render());
    let (s, report) = served_daemon::start(Arc::new(store), &req, events, ctx.cancel.clone())
        .with_context(|| format!("serving template {}", a.name))
        .map_err(crate::background::failed)?;
    crate::background::ready(ctx, &report);
    s.wait().context("serving the template")?;
    Ok(ExitCode::SUCCESS)
}

pub fn commit(ctx: &Ctx, a: CommitArgs) -> Result<ExitCode> {
    let store = ctx.open_store()?;
    let c = served::commit(&store, &a.file, &a.name).map_err(|e| match e {
        e @ strata_block::BlockError::NotServed { .. } => anyhow::Error::new(e).context(format!(
            "committing {} (serve it with `strata rootfs serve NAME {} --writable`)",
            a.file.display(),
            a.file.display()
        )),
        e => anyhow::Error::new(e).context(format!("committing {}", a.file.display())),
    })?;
    let v = crate::render::json_with(&c, serde_json::json!({ "name": a.name }));
    let said = format!("committed {} as {} {c}", a.file.display(), a.name);
    ctx.print_with(&v, None::<&str>, said)
}
