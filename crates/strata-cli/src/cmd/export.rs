//! `strata export IMAGE DIR` and `strata export IMAGE --tar FILE|-`

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use strata_digest::Digest;
use strata_store::Store;
use strata_tree::Tree;

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
    if let Some(path) = &a.erofs {
        return export_erofs(ctx, &store, &digest, path);
    }
    let tree: Tree = store.image_tree(&digest)?;
    match (&a.dir, &a.tar) {
        (Some(dir), None) => {
            let mut open =
                |d: &Digest| -> io::Result<File> { store.open_object(d).map_err(io::Error::other) };
            strata_tree::export::export_dir(&tree, dir, &mut open)
                .with_context(|| format!("exporting {digest} to {}", dir.display()))?;
            if !ctx.quiet {
                println!("exported {digest} to {}", dir.display());
            }
        }
        (None, Some(path)) => {
            let mut open = |d: &Digest| -> io::Result<Box<dyn Read>> {
                Ok(Box::new(store.open_object(d).map_err(io::Error::other)?))
            };
            if path.as_os_str() == "-" {
                let stdout = io::stdout();
                let mut w = BufWriter::with_capacity(1 << 20, stdout.lock());
                strata_tree::export::export_tar(&tree, &mut w, &mut open)
                    .context("exporting tar to stdout")?;
                w.flush()?;
            } else {
                let f =
                    File::create(path).with_context(|| format!("creating {}", path.display()))?;
                let mut w = BufWriter::with_capacity(1 << 20, f);
                strata_tree::export::export_tar(&tree, &mut w, &mut open)
                    .with_context(|| format!("exporting {digest} to {}", path.display()))?;
                w.flush()?;
                if !ctx.quiet {
                    println!("exported {digest} to {}", path.display());
                }
            }
        }
        _ => bail!("give a directory, --tar FILE or --erofs FILE"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Written to a temporary name next to `path` and renamed, so a failed
/// export leaves no partial image under the asked name.
fn export_erofs(
    ctx: &Ctx,
    store: &Store,
    digest: &Digest,
    path: &std::path::Path,
) -> Result<ExitCode> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let tmp = dir.join(format!(
        ".{}.strata-tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let result = (|| -> Result<u64> {
        let f = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        let n = store.export_erofs(digest, &mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
        Ok(n)
    })();
    match result {
        Ok(n) => {
            if !ctx.quiet {
                println!(
                    "exported {digest} to {} (EROFS, {})",
                    path.display(),
                    strata_ops::human_bytes(n)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e.context(format!("exporting {digest} as EROFS to {}", path.display())))
        }
    }
}
