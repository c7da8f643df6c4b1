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
    if ctx.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for p in &report.problems {
            println!("problem: {p}");
        }
        if !ctx.quiet || !report.is_ok() {
            println!(
                "checked {} objects, {} layers, {} images, {} refs, {} templates: {}",
                report.objects,
                report.layers,
                report.images,
                report.refs,
                report.templates,
                if report.is_ok() {
                    "ok".to_string()
                } else {
                    format!("{} problems", report.problems.len())
                }
            );
        }
    }
    Ok(if report.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
