//! `strata mounts`: lazy mounts and served templates, with their progress.

use std::process::ExitCode;

use anyhow::Result;
use strata_block::served::ServeStatus;
use strata_lazy::MountStatus;
use strata_ops::human_bytes;

use crate::Ctx;

fn lazy_status(s: MountStatus) -> &'static str {
    match s {
        MountStatus::Serving => "serving",
        MountStatus::Stale => "stale (daemon gone: `strata umount` cleans it)",
        MountStatus::NotMounted => "not mounted",
    }
}

fn serve_status(s: ServeStatus) -> &'static str {
    match s {
        ServeStatus::Serving => "serving",
        ServeStatus::Stale => "stale (daemon gone: `strata umount` cleans it)",
        ServeStatus::NotServed => "not served (written chunks kept for `strata rootfs commit`)",
    }
}

pub fn run(ctx: &Ctx) -> Result<ExitCode> {
    let lazy = strata_lazy::list(&ctx.root);
    let served = strata_block::served::list(&ctx.root, true);
    if ctx.json {
        let mut v: Vec<serde_json::Value> = Vec::new();
        for r in &lazy {
            let mut j = serde_json::to_value(&r.state)?;
            j["kind"] = serde_json::json!("lazy");
            j["status"] = serde_json::json!(lazy_status(r.status));
            v.push(j);
        }
        for r in &served {
            let mut j = serde_json::to_value(&r.state)?;
            j["kind"] = serde_json::json!("rootfs");
            j["status"] = serde_json::json!(serve_status(r.status));
            v.push(j);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    for r in &served {
        let s = &r.state;
        println!(
            "{}  rootfs {}  {}  {} of {} chunks read, {} fetched ({}){}  {}  pid {}",
            s.file.display(),
            s.name,
            human_bytes(s.size),
            s.chunks_read,
            s.chunks_total,
            s.chunks_fetched,
            human_bytes(s.bytes_fetched),
            if s.writable {
                format!(", {} written", s.dirty_chunks)
            } else {
                String::new()
            },
            serve_status(r.status),
            s.pid
        );
    }
    for r in &lazy {
        let s = &r.state;
        println!(
            "{}  {}  files {}/{} local  {} of {} fetched by reads  prefetch {}{}  {}  pid {}",
            s.dir.display(),
            s.reference,
            s.files_local,
            s.files_total,
            human_bytes(s.bytes_fetched),
            human_bytes(s.image_bytes),
            s.prefetch.as_str(),
            if s.complete { " (pulled)" } else { "" },
            lazy_status(r.status),
            s.pid
        );
    }
    if lazy.is_empty() && served.is_empty() && !ctx.quiet {
        println!("no lazy mounts or served templates");
    }
    Ok(ExitCode::SUCCESS)
}
