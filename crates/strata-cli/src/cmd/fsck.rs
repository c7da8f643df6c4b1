//! `strata fsck`

use std::process::ExitCode;

use anyhow::Result;

use crate::Ctx;

pub fn run(ctx: &Ctx) -> Result<ExitCode> {
    let store = ctx.open_store()?;
    let render = ctx.render();
    let report = store.fsck(ctx.ctl(&render));
    render.finish();
    let report = report?;
    if !ctx.json {
        report
            .problems
            .iter()
            .for_each(|p| println!("problem: {p}"));
    }
    ctx.print_with(&report, (!report.is_ok()).then_some(&report), &report)?;
    Ok(if report.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
