//! `strata export IMAGE DIR`, `strata export IMAGE --tar FILE|-` and
//! `strata export IMAGE --erofs FILE`

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};

use crate::Ctx;

/// Arguments of `strata export`.
#[derive(clap::Args)]
pub struct Args {
    /// Image name or manifest digest.
    image: String,
    /// Directory to create (must not exist or be empty).
    dir: Option<PathBuf>,
    /// Write a tar of the flattened tree instead (`-` for stdout).
    #[arg(long, conflicts_with = "dir")]
    tar: Option<PathBuf>,
    /// Write a self-contained EROFS image (contents inside, uncompressed)
    /// instead: a read-only root filesystem mountable without the store.
    #[arg(long, conflicts_with_all = ["dir", "tar"])]
    erofs: Option<PathBuf>,
}

pub fn run(ctx: &Ctx, a: Args) -> Result<ExitCode> {
    let store = ctx.open_store()?;
    let digest = store.resolve_image(&a.image)?;
    let done = match (&a.dir, &a.tar, &a.erofs) {
        (Some(dir), ..) => {
            store.export_dir(&digest, dir)?;
            format!("exported {digest} to {}", dir.display())
        }
        (_, Some(path), _) if path.as_os_str() == "-" => {
            let mut w = BufWriter::with_capacity(1 << 20, io::stdout().lock());
            store.export_tar(&digest, &mut w)?;
            w.flush().context("exporting tar to stdout")?;
            return Ok(ExitCode::SUCCESS);
        }
        (_, Some(path), _) => {
            let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
            let mut w = BufWriter::with_capacity(1 << 20, f);
            store.export_tar(&digest, &mut w)?;
            w.flush()
                .with_context(|| format!("writing {}", path.display()))?;
            format!("exported {digest} to {}", path.display())
        }
        (.., Some(path)) => {
            let n = store.export_erofs_file(&digest, path)?;
            let size = strata_ops::human_bytes(n);
            format!("exported {digest} to {} (EROFS, {size})", path.display())
        }
        _ => bail!("give a directory, --tar FILE or --erofs FILE"),
    };
    ctx.say(done);
    Ok(ExitCode::SUCCESS)
}
