//! `strata fsck`

use std::process::ExitCode;

use anyhow::Result;

use crate::Ctx;

pub fn run(ctx: &Ctx) -> Result<ExitCode> {
    let store = ctx.open_store()?;
    let report = ctx.with_events(|ctl| store.fsck(ctl))?;
    // the problems even with --quiet
    let all = format!("{report:#}");
    ctx.print_with(&report, (!report.is_ok()).then_some(&all), &all)?;
    Ok(if report.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
