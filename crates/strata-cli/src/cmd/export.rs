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
}

/// The flattened tree of an image, from its layer records.
pub fn image_tree(store: &Store, digest: &Digest) -> Result<Tree> {
    let meta = store.image_meta(digest)?;
    let mut tree = Tree::new();
    for (i, l) in meta.layers.iter().enumerate() {
        let record = store.layer_record(&l.diff_id)?;
        tree.apply_layer(&record.entries)
            .with_context(|| format!("applying layer {i} ({})", l.diff_id))?;
    }
    Ok(tree)
}

pub fn run(ctx: &Ctx, a: Args) -> Result<ExitCode> {
    let store = ctx.open_store()?;
    let digest = store.resolve_image(&a.image)?;
    let tree = image_tree(&store, &digest)?;
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
        _ => bail!("give a directory or --tar FILE"),
    }
    Ok(ExitCode::SUCCESS)
}
