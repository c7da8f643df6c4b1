//! `strata rootfs serve NAME FILE [--writable]` and `strata rootfs commit FILE --name NEW`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};

use crate::Ctx;

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

pub fn serve(_ctx: &Ctx, _a: ServeArgs) -> Result<ExitCode> {
    bail!("rootfs serve: in progress")
}

pub fn commit(_ctx: &Ctx, _a: CommitArgs) -> Result<ExitCode> {
    bail!("rootfs commit: in progress")
}
