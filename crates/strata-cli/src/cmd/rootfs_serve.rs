//! `strata rootfs serve NAME FILE [--writable]` and `strata rootfs commit FILE --name NEW`.
//!
//! Without `--foreground`, serve starts itself again as a daemon (log in
//! `<store>/serve/<key>/log`) and returns once the file is served.
//! `strata umount FILE` stops it; writes not committed are then dropped.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use strata_block::serve::{ServeOptions, ServeState, Served, TemplateFs, dirty_chunks, serve_dir};
use strata_store::TemplateMap;

use super::human;
use super::lazy::{NOTIFY, alive, now, report, spawn_daemon};
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
    /// Stay in the foreground, logging to stderr.
    #[arg(long)]
    pub foreground: bool,
    /// For a pulled template: use plain HTTP for its registry.
    #[arg(long)]
    pub plain_http: bool,
    /// For a pulled template: registry credentials file (auth.json format).
    #[arg(long, env = "REGISTRY_AUTH_FILE")]
    pub authfile: Option<PathBuf>,
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

/// The canonical path of `file`, which may be a FUSE mount whose daemon
/// died (then it cannot be stat'ed: resolve its parent).
fn canonical(file: &Path) -> Result<PathBuf> {
    match file.canonicalize() {
        Ok(p) => Ok(p),
        Err(e) => {
            let parent = file.parent().filter(|p| !p.as_os_str().is_empty());
            match (parent.map(Path::canonicalize), file.file_name()) {
                (Some(Ok(p)), Some(n)) => Ok(p.join(n)),
                (None, Some(n)) => Ok(std::env::current_dir()?.join(n)),
                _ => Err(e).with_context(|| format!("resolving {}", file.display())),
            }
        }
    }
}

pub fn serve(ctx: &Ctx, a: ServeArgs) -> Result<ExitCode> {
    let store = ctx.open_store()?;
    let id = store.resolve_template(&a.name)?;
    if !a.file.exists() {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&a.file)
            .with_context(|| format!("creating {}", a.file.display()))?;
    }
    let file = canonical(&a.file)?;
    let meta = std::fs::metadata(&file).with_context(|| format!("reading {}", file.display()))?;
    if !meta.is_file() {
        bail!(
            "{} is not a regular file: a template is served as a file (loop-mount it or give it to a VMM)",
            file.display()
        );
    }
    if strata_sys::mounts()?.iter().any(|m| m.mount_point == file) {
        bail!(
            "{} is already a mount point; `strata umount {}` first or pick another file",
            file.display(),
            file.display()
        );
    }
    let sdir = serve_dir(&ctx.root, &file);
    if let Ok(old) = ServeState::load(&sdir) {
        if alive(old.pid) {
            bail!(
                "{} is being served by pid {} already",
                file.display(),
                old.pid
            );
        }
        if old.dirty_chunks > 0 && std::env::var_os(NOTIFY).is_none() {
            eprintln!(
                "strata: dropping {} chunks written to {} earlier and never committed",
                old.dirty_chunks,
                file.display()
            );
        }
    }
    let notify = std::env::var_os(NOTIFY).is_some();
    if !notify {
        // a record left by an earlier serve of this file is stale now
        let _ = std::fs::remove_dir_all(&sdir);
    }
    if !a.foreground {
        return spawn_daemon(ctx, &sdir, "rootfs serve");
    }
    match run_daemon(
        ctx,
        store,
        id,
        &file,
        &sdir,
        &a,
        meta.uid(),
        meta.gid(),
        notify,
    ) {
        Ok(code) => Ok(code),
        Err(e) => {
            if notify {
                report(&serde_json::json!({ "error": format!("{e:#}") }));
            }
            Err(e)
        }
    }
}

/// Where a pulled template's missing chunks come from.
fn chunk_source(
    store: &strata_store::Store,
    id: &strata_digest::Digest,
    a: &ServeArgs,
) -> Result<Option<Arc<dyn strata_block::ChunkSource>>> {
    let mut opts = super::pull::registry_options(store, a.plain_http, a.authfile.clone())?;
    // a read waits for a stalled registry 10 s at most per attempt, then EIO
    opts.stall_timeout = Some(Duration::from_secs(10));
    let src = strata_block::artifact::source_for(store, id, &opts)
        .with_context(|| format!("reaching the registry template {id} was pulled from"))?;
    Ok(src.map(|s| Arc::new(s) as Arc<dyn strata_block::ChunkSource>))
}

#[allow(clippy::too_many_arguments)]
fn run_daemon(
    ctx: &Ctx,
    store: strata_store::Store,
    id: strata_digest::Digest,
    file: &Path,
    sdir: &Path,
    a: &ServeArgs,
    uid: u32,
    gid: u32,
    notify: bool,
) -> Result<ExitCode> {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
    let started = Instant::now();
    let source = chunk_source(&store, &id, a)?;
    let remote = store.template_remote(&id).map(|r| r.reference);
    let store = Arc::new(store);
    let opts = ServeOptions {
        writable: a.writable.then(|| sdir.to_path_buf()),
        uid,
        gid,
    };
    let served = Arc::new(Served::new(store.clone(), id, source, &opts)?);
    let map = served.map();
    let state = ServeState {
        pid: std::process::id(),
        file: file.to_path_buf(),
        template: id.to_string(),
        name: a.name.clone(),
        writable: a.writable,
        log: sdir.join("log"),
        started: now(),
        size: map.size,
        chunks_total: map.chunks().count() as u64,
        bytes_total: map.chunks().map(|(i, _)| map.chunk_len(i)).sum(),
        chunks_missing: served.missing(),
        remote: remote.clone(),
        ..Default::default()
    };
    if state.chunks_missing > 0 && remote.is_none() {
        bail!(
            "template {id} lacks {} chunks in the store and was not pulled from a registry; `strata fsck` names them",
            state.chunks_missing
        );
    }
    state.save(sdir)?;
    let session = TemplateFs(served.clone())
        .mount(file, 4)
        .with_context(|| format!("mounting FUSE on {}", file.display()))?;
    let msg = format!(
        "serving {} ({id}, {}) at {} {} in {:.0} ms ({} of {} chunks to fetch{})",
        a.name,
        human(map.size),
        file.display(),
        if a.writable {
            "read-write (writes kept in an overlay: `strata rootfs commit`)"
        } else {
            "read-only"
        },
        started.elapsed().as_secs_f64() * 1000.0,
        state.chunks_missing,
        state.chunks_total,
        remote
            .as_ref()
            .map(|r| format!(" from {r}"))
            .unwrap_or_default()
    );
    tracing::info!("{msg}");
    if notify {
        report(&serde_json::json!({"message": msg, "template": id.to_string()}));
    } else if !ctx.quiet {
        println!("{msg}");
    }
    // keep the state current and write fetched chunks to the store
    let done = Arc::new(AtomicBool::new(false));
    let updater = {
        let done = done.clone();
        let served = served.clone();
        let sdir = sdir.to_path_buf();
        let mut state = state.clone();
        std::thread::spawn(move || {
            loop {
                let last = done.load(Ordering::SeqCst);
                if let Err(e) = served.flush_fetched() {
                    tracing::error!("storing fetched chunks failed: {e}");
                }
                served.fill(&mut state);
                let _ = state.save(&sdir);
                if last {
                    return state;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };
    let r = session.join();
    done.store(true, Ordering::SeqCst);
    let state = updater.join().unwrap_or(state);
    if let Err(e) = served.sync() {
        tracing::error!("syncing the overlay failed: {e}");
    }
    tracing::info!(
        "{} is no longer served ({} chunks read, {} fetched, {} written)",
        file.display(),
        state.chunks_read,
        state.chunks_fetched,
        state.dirty_chunks
    );
    // writes not yet committed stay for `strata rootfs commit`
    if state.dirty_chunks == 0 {
        let _ = std::fs::remove_dir_all(sdir);
    }
    r.context("serving the FUSE file")?;
    Ok(ExitCode::SUCCESS)
}

pub fn commit(ctx: &Ctx, a: CommitArgs) -> Result<ExitCode> {
    let store = ctx.open_store()?;
    let file = canonical(&a.file)?;
    let sdir = serve_dir(&ctx.root, &file);
    let state = ServeState::load(&sdir).with_context(|| {
        format!(
            "{} is not served by this store (`strata rootfs serve NAME {} --writable`)",
            file.display(),
            file.display()
        )
    })?;
    if !state.writable {
        bail!(
            "{} is served read-only: nothing to commit (serve it with --writable)",
            file.display()
        );
    }
    let parent: strata_digest::Digest = state
        .template
        .parse()
        .with_context(|| format!("the record of {} names no template", file.display()))?;
    let pmap = store.template_map(&parent)?;
    // writes the kernel still holds reach the daemon (and its overlay)
    if alive(state.pid)
        && let Ok(f) = std::fs::File::open(&file)
    {
        f.sync_all()
            .with_context(|| format!("syncing {}", file.display()))?;
    }
    let dirty = dirty_chunks(&sdir)?;
    let overlay = std::fs::File::open(sdir.join("overlay"))
        .with_context(|| format!("opening the overlay of {}", file.display()))?;
    let mut chunks: BTreeMap<u64, strata_digest::Digest> = pmap.chunks().collect();
    let mut batch = store.object_batch()?;
    let (mut new_chunks, mut new_bytes) = (0u64, 0u64);
    let mut buf = vec![0u8; pmap.chunk_size as usize];
    for &i in &dirty {
        if i >= pmap.chunk_count() {
            bail!(
                "the dirty log of {} names chunk {i}, past the image's end",
                file.display()
            );
        }
        let len = pmap.chunk_len(i) as usize;
        overlay
            .read_exact_at(&mut buf[..len], i * pmap.chunk_size)
            .with_context(|| format!("reading chunk {i} of the overlay"))?;
        if buf[..len].iter().all(|&b| b == 0) {
            chunks.remove(&i);
            continue;
        }
        let before = batch.stats().objects_written;
        let d = batch
            .put(&mut &buf[..len], len as u64)
            .context("storing a written chunk")?;
        if batch.stats().objects_written > before {
            new_chunks += 1;
            new_bytes += len as u64;
        }
        chunks.insert(i, d);
    }
    batch.commit()?;
    let mut build = BTreeMap::new();
    build.insert("from".to_string(), "commit".to_string());
    build.insert("parent".to_string(), parent.to_string());
    build.insert("written_chunks".to_string(), dirty.len().to_string());
    let map = TemplateMap::from_chunks(pmap.size, Some(parent), pmap.generation + 1, build, chunks);
    // chunks the parent lacks locally come from the parent's registry
    let remote = store.template_remote(&parent);
    let id = store.commit_template(&map, remote.as_ref())?;
    store.set_template_name(&a.name, &id)?;
    // `strata umount` warns only about writes made after this
    let _ = std::fs::write(sdir.join("committed"), dirty.len().to_string());
    if ctx.json {
        println!(
            "{}",
            serde_json::json!({
                "name": a.name, "id": id.to_string(), "parent": parent.to_string(),
                "written_chunks": dirty.len(), "new_chunks": new_chunks, "new_bytes": new_bytes,
            })
        );
    } else if !ctx.quiet {
        println!(
            "committed {} as {} ({id}): {} chunks written, {new_chunks} new ({}), parent {parent}",
            file.display(),
            a.name,
            dirty.len(),
            human(new_bytes)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// After a served file is unmounted: let its daemon finish (or kill it
/// when it hangs) and drop its record, overlay included.
pub fn after_umount(ctx: &Ctx, file: &Path) {
    let sdir = serve_dir(&ctx.root, file);
    if let Ok(s) = ServeState::load(&sdir) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(s.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if alive(s.pid)
            && let Some(pid) = rustix::process::Pid::from_raw(s.pid as i32)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
        let committed: u64 = std::fs::read_to_string(sdir.join("committed"))
            .ok()
            .and_then(|c| c.trim().parse().ok())
            .unwrap_or(0);
        let written = dirty_chunks(&sdir).map(|d| d.len() as u64).unwrap_or(0);
        if written > committed && !ctx.quiet {
            eprintln!(
                "strata: dropped the writes to {} since {} (chunks written: {written}, committed: {committed})",
                file.display(),
                if committed > 0 {
                    "the last commit"
                } else {
                    "it was served"
                },
            );
        }
    }
    let _ = std::fs::remove_dir_all(&sdir);
}

/// Files whose serving daemon runs.
pub fn serving(root: &Path) -> Vec<PathBuf> {
    ServeState::all(root)
        .into_iter()
        .filter(|(_, s)| alive(s.pid))
        .map(|(_, s)| s.file)
        .collect()
}

/// Served files for `strata mounts`: JSON values, and text lines.
pub fn list(ctx: &Ctx) -> (Vec<serde_json::Value>, Vec<String>) {
    let mounted = strata_sys::mounts().unwrap_or_default();
    let (mut json, mut text) = (Vec::new(), Vec::new());
    // a running daemon rewrites its state every 250 ms: wait for a state
    // newer than this call, so the numbers include every read done before it
    let asked = std::time::SystemTime::now();
    let fresh = |dir: &Path| -> Option<ServeState> {
        let deadline = Instant::now() + Duration::from_millis(600);
        loop {
            let m = std::fs::metadata(dir.join("state.json")).and_then(|m| m.modified());
            if m.is_ok_and(|m| m > asked) || Instant::now() > deadline {
                return ServeState::load(dir).ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    for (dir, s) in ServeState::all(&ctx.root) {
        let s = if alive(s.pid) {
            fresh(&dir).unwrap_or(s)
        } else {
            s
        };
        let is_mounted = mounted
            .iter()
            .any(|m| m.mount_point == s.file && m.source.starts_with("strata-rootfs:"));
        let status = match (alive(s.pid), is_mounted) {
            (true, true) => "serving",
            (false, true) => "stale (daemon gone: `strata umount` cleans it)",
            (_, false) => "not served (written chunks kept for `strata rootfs commit`)",
        };
        let mut v = serde_json::to_value(&s).expect("serializable");
        v["kind"] = serde_json::json!("rootfs");
        v["status"] = serde_json::json!(status);
        json.push(v);
        text.push(format!(
            "{}  rootfs {}  {}  {} of {} chunks read, {} fetched ({}){}  {}  pid {}",
            s.file.display(),
            s.name,
            human(s.size),
            s.chunks_read,
            s.chunks_total,
            s.chunks_fetched,
            human(s.bytes_fetched),
            if s.writable {
                format!(", {} written", s.dirty_chunks)
            } else {
                String::new()
            },
            status,
            s.pid
        ));
    }
    (json, text)
}
