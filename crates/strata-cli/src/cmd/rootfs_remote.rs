//! `strata rootfs push NAME REF` and `strata rootfs pull REF`.

use std::process::ExitCode;

use anyhow::{Result, bail};

use crate::Ctx;

/// Arguments of `strata rootfs push`.
#[derive(clap::Args)]
pub struct PushArgs {
    /// Template name or id.
    pub name: String,
    /// docker://HOST[:PORT]/REPO[:TAG]
    pub reference: String,
}

/// Arguments of `strata rootfs pull`.
#[derive(clap::Args)]
pub struct PullArgs {
    /// docker://HOST[:PORT]/REPO[:TAG|@DIGEST]
    pub reference: String,
}

pub fn push(_ctx: &Ctx, _a: PushArgs) -> Result<ExitCode> {
    bail!("rootfs push: in progress")
}

pub fn pull(_ctx: &Ctx, _a: PullArgs) -> Result<ExitCode> {
    bail!("rootfs pull: in progress")
}
