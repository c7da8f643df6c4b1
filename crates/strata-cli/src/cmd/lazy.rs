//! `strata mount --lazy REF DIR`: serve an image before it has arrived, and
//! `strata mounts`.
//!
//! Without `--foreground` the command starts itself again as a daemon
//! (own process group, stderr to `<store>/lazy/<id>/log`) and returns when
//! the daemon reports the mount ready, or with the daemon's error.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use strata_lazy::fs::{LazyFs, MountConfig, Recorder};
use strata_lazy::state::{MountState, mount_dir};
use strata_lazy::{Fetcher, LazyError};
use strata_oci::pull::{NoProgress, PullOptions, pull_from};
use strata_oci::{ImageRef, Platform};

use super::human;
use crate::Ctx;

/// `--lazy` or `--lazy=require`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LazyMode {
    /// Lazy when the image allows it, else a full pull (said loudly).
    Auto,
    /// Lazy or fail.
    Require,
}

/// What is fetched in the background.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Prefetch {
    /// Only what is read.
    None,
    /// The files in --prefetch-list.
    List,
    /// The list first, then everything; the image is then recorded as pulled.
    All,
}

/// Options of lazy mounts.
#[derive(clap::Args)]
pub struct LazyArgs {
    /// With --lazy: use plain HTTP for the registry.
    #[arg(long)]
    plain_http: bool,
    /// With --lazy: platform to pick from an index, os/arch[/variant].
    #[arg(long)]
    platform: Option<String>,
    /// With --lazy: registry credentials file (auth.json format).
    #[arg(long, env = "REGISTRY_AUTH_FILE")]
    authfile: Option<PathBuf>,
    /// With --lazy: background fetching.
    #[arg(long, value_enum, default_value_t = Prefetch::All)]
    prefetch: Prefetch,
    /// With --lazy: paths (one per line) fetched first.
    #[arg(long)]
    prefetch_list: Option<PathBuf>,
    /// With --lazy: write the paths read, in first-read order, to FILE
    /// (a prefetch list for next time) when unmounted.
    #[arg(long)]
    record: Option<PathBuf>,
    /// With --lazy: stay in the foreground, logging to stderr.
    #[arg(long)]
    foreground: bool,
    /// With --lazy: serve files fetched through the FUSE data layer by FUSE
    /// passthrough once local (files in the store never reach the daemon
    /// either way). Passthrough raises the kernel's stacking depth: the
    /// mount can then not be the lower layer of another overlay (a
    /// container's writable layer), so it is off by default.
    #[arg(long)]
    passthrough: bool,
    /// With --lazy: fetches running at once.
    #[arg(long, default_value_t = 8)]
    fetch_jobs: usize,
}

/// Environment variable telling a daemon to report readiness on stdout.
pub(crate) const NOTIFY: &str = "STRATA_LAZY_NOTIFY";

pub fn run(
    ctx: &Ctx,
    image: &str,
    dir: &Path,
    mode: LazyMode,
    a: &LazyArgs,
    split: strata_store::SplitPolicy,
) -> Result<ExitCode> {
    if !dir.is_dir() {
        bail!("mount point {} is not an existing directory", dir.display());
    }
    let target = dir
        .canonicalize()
        .with_context(|| format!("resolving {}", dir.display()))?;
    if strata_sys::mounts()?
        .iter()
        .any(|m| m.mount_point == target)
    {
        bail!(
            "{} is already a mount point; `strata umount {}` first or pick another directory",
            target.display(),
            target.display()
        );
    }
    if !a.foreground {
        return spawn_daemon(ctx, &mount_dir(&ctx.root, &target), "lazy mount");
    }
    let notify = std::env::var_os(NOTIFY).is_some();
    match serve(ctx, image, &target, mode, a, split, notify) {
        Ok(code) => Ok(code),
        Err(e) => {
            if notify {
                report(&serde_json::json!({ "error": format!("{e:#}") }));
            }
            Err(e)
        }
    }
}

/// One line to the parent waiting for readiness.
pub(crate) fn report(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// Start this command again with `--foreground` as a daemon logging to
/// `<mdir>/log`, and return once it reports readiness (a JSON line with
/// `message`, or `error`) on its stdout.
pub(crate) fn spawn_daemon(ctx: &Ctx, mdir: &Path, what: &str) -> Result<ExitCode> {
    std::fs::create_dir_all(mdir).with_context(|| format!("creating {}", mdir.display()))?;
    let log = mdir.join("log");
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("opening {}", log.display()))?;
    let exe = std::env::current_exe().context("finding the strata binary")?;
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    args.push("--foreground".into());
    let mut child = Command::new(exe)
        .args(&args)
        .env(NOTIFY, "1")
        .env("STRATA_ROOT", &ctx.root)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(logf)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting the {what} daemon"))?;
    let out = child.stdout.take().expect("piped");
    let mut line = String::new();
    BufReader::new(out).read_line(&mut line)?;
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap_or_else(|_| {
        let status = child.wait().ok();
        serde_json::json!({
            "error": format!("the {what} daemon exited ({status:?}) before it was ready; see {}", log.display())
        })
    });
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        let _ = child.wait();
        bail!("{e}");
    }
    for n in v
        .get("notes")
        .and_then(|n| n.as_array())
        .into_iter()
        .flatten()
    {
        if let Some(n) = n.as_str() {
            eprintln!("strata: {n}");
        }
    }
    if ctx.json {
        println!("{v}");
    } else if !ctx.quiet {
        println!(
            "{} (daemon pid {}, log {})",
            v["message"].as_str().unwrap_or("mounted"),
            child.id(),
            log.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn mount_composefs(
    store: &strata_store::Store,
    digest: &strata_digest::Digest,
    target: &Path,
    split: strata_store::SplitPolicy,
) -> Result<()> {
    let (_, layers) = store.image_erofs(digest, split)?;
    let m = strata_sys::OverlayMount {
        dirs_above: Vec::new(),
        layers,
        data_dirs: vec![store.root().join("objects")],
        upper: None,
        verity_require: false,
        source: super::mount::source_of(digest),
    };
    strata_sys::mount_overlay(&m, target)
        .with_context(|| format!("mounting {digest} at {}", target.display()))
}

/// Tell the waiting parent (or the terminal) how the image was mounted.
fn finish_report(notify: bool, ctx: &Ctx, mode: &str, msg: &str, notes: &[String]) {
    if notify {
        report(&serde_json::json!({"mode": mode, "message": msg, "notes": notes}));
    } else {
        for n in notes {
            eprintln!("strata: {n}");
        }
        if !ctx.quiet {
            println!("{msg}");
        }
    }
}

pub(crate) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[allow(clippy::too_many_arguments)]
fn serve(
    ctx: &Ctx,
    image: &str,
    target: &Path,
    mode: LazyMode,
    a: &LazyArgs,
    split: strata_store::SplitPolicy,
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
    let reference: ImageRef = image
        .parse()
        .with_context(|| format!("parsing image reference {image:?}"))?;
    let platform = match &a.platform {
        Some(p) => p
            .parse()
            .with_context(|| format!("parsing platform {p:?}"))?,
        None => Platform::host_default(),
    };
    let store = Arc::new(ctx.open_store()?);
    let mut registry = super::pull::registry_options(&store, a.plain_http, a.authfile.clone())?;
    registry.stall_timeout = Some(Duration::from_secs(10));
    let source: Arc<dyn strata_oci::ImageSource> = Arc::from(
        strata_oci::open_source(&reference, &registry)
            .with_context(|| format!("opening {reference}"))?,
    );
    let name = reference.to_string();
    let opts = PullOptions {
        platform: platform.clone(),
        registry,
        jobs: 3,
        split,
    };
    let resolved = source
        .resolve(&platform)
        .with_context(|| format!("resolving {name}"))?;
    // Already pulled: the composefs mount serves it.
    if store.has_image(&resolved.manifest_digest) {
        let digest = resolved.manifest_digest;
        store.set_ref(&name, &digest)?;
        mount_composefs(&store, &digest, target, split)?;
        let msg = format!(
            "{name} ({digest}) is in the store: mounted it at {} the composefs way",
            target.display()
        );
        finish_report(notify, ctx, "composefs", &msg, &[]);
        return Ok(ExitCode::SUCCESS);
    }
    let lazy = match strata_lazy::prepare(&store, source.as_ref(), resolved) {
        Ok(l) => l,
        Err(LazyError::NotLazy {
            index,
            digest,
            reason,
        }) => {
            let why = format!("layer {index} ({digest}) cannot be read lazily: {reason}");
            if mode == LazyMode::Require {
                bail!("--lazy=require: {why}");
            }
            tracing::warn!("{why}: pulling in full");
            let summary = pull_from(&store, source.as_ref(), &name, &opts, &NoProgress)
                .with_context(|| format!("pulling {name}"))?;
            mount_composefs(&store, &summary.manifest_digest, target, split)?;
            let msg = format!(
                "pulled {name} in full and mounted it at {} (not lazily)",
                target.display()
            );
            finish_report(notify, ctx, "full", &msg, &[format!("not lazy: {why}")]);
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("preparing {name}"))),
    };
    let digest = lazy.resolved.manifest_digest;
    let mdir = mount_dir(store.root(), target);
    std::fs::create_dir_all(&mdir)?;
    wait_for_earlier_daemon(&mdir, target)?;
    let lazy = Arc::new(lazy);
    let fetcher = Arc::new(Fetcher::new(
        store.clone(),
        source.clone(),
        lazy.clone(),
        mdir.join("partial"),
        a.fetch_jobs,
    )?);
    // the list given, else the one `strata convert --prefetch-list` put
    // in the manifest
    let list = match &a.prefetch_list {
        _ if a.prefetch == Prefetch::None => String::new(),
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("reading prefetch list {}", p.display()))?,
        None => lazy
            .resolved
            .manifest
            .annotations
            .get(strata_oci::convert::PREFETCH_ANNOTATION)
            .cloned()
            .unwrap_or_default(),
    };
    // reads of listed files wait for the bulk fetch instead of racing it;
    // without a list given, files placed first in their layers come too
    // (one plain range per layer)
    let mut wanted: Vec<strata_digest::Digest> = list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .filter_map(|line| {
            let path = line.trim_start_matches('/');
            match lazy.tree.lookup(path.as_bytes()).map(|n| &n.kind) {
                Some(strata_tree::NodeKind::Regular { digest, size }) if *size > 0 => Some(*digest),
                _ => None,
            }
        })
        .collect();
    if a.prefetch != Prefetch::None && a.prefetch_list.is_none() {
        let mut seen: std::collections::HashSet<_> = wanted.iter().copied().collect();
        wanted.extend(lazy.placed_first().into_iter().filter(|d| seen.insert(*d)));
    }
    fetcher.reserve_bulk(&wanted);
    // background prefetch: the list starts now, while the mount is built
    let prefetch_state = Arc::new(std::sync::Mutex::new(String::from("none")));
    let complete = Arc::new(AtomicBool::new(false));
    {
        let fetcher = fetcher.clone();
        let prefetch = a.prefetch;
        let pstate = prefetch_state.clone();
        let complete = complete.clone();
        let store = store.clone();
        let source = source.clone();
        let name = name.clone();
        std::thread::spawn(move || {
            let set = |s: &str| *pstate.lock().expect("no panics while held") = s.to_string();
            if prefetch == Prefetch::None {
                return;
            }
            set("list");
            match fetcher.fetch_many(&wanted) {
                Ok(n) => tracing::info!("prefetched {n} files of the list"),
                Err(e) => tracing::error!("prefetch of the list failed: {e}"),
            }
            if prefetch != Prefetch::All {
                set("done");
                return;
            }
            // give way to reads: start once they have fetched nothing for a
            // second (at most 30 s after the list)
            let t = Instant::now();
            while fetcher.idle_for() < Duration::from_secs(1)
                && t.elapsed() < Duration::from_secs(30)
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            set("all");
            match pull_from(&store, source.as_ref(), &name, &opts, &NoProgress) {
                Ok(s) => {
                    tracing::info!(
                        "prefetch done: {name} is pulled ({} downloaded by the pull); later mounts use the composefs path",
                        human(s.bytes_downloaded)
                    );
                    // under the state's lock: a saved state never says
                    // complete with the prefetch still running
                    let mut st = pstate.lock().expect("no panics while held");
                    complete.store(true, Ordering::SeqCst);
                    *st = "done".into();
                }
                Err(e) => {
                    tracing::error!("prefetch (pull of {name}) failed: {e:#}");
                    set(&format!("failed: {e}"));
                }
            }
        });
    }
    let recorder = a.record.as_ref().map(|_| Arc::new(Recorder::default()));
    let cfg = MountConfig {
        passthrough: a.passthrough,
        threads: 2,
        read_workers: 2 * a.fetch_jobs.max(1),
        recorder: recorder.clone(),
        fsname: format!("strata-lazy-data:{digest}"),
        opens: Arc::new(AtomicU64::new(0)),
        all_local: Arc::new(AtomicBool::new(false)),
    };
    // composefs: the tree as EROFS over [objects/, FUSE of missing contents]
    let prepared = started.elapsed();
    let erofs = mdir.join("image.erofs");
    let tmp = mdir.join("image.erofs.tmp");
    std::fs::write(&tmp, lazy.erofs()?)
        .and_then(|()| std::fs::rename(&tmp, &erofs))
        .with_context(|| format!("writing {}", erofs.display()))?;
    tracing::info!(
        "tree from the TOCs in {:.0} ms, its EROFS image in {:.0} ms",
        prepared.as_secs_f64() * 1000.0,
        (started.elapsed() - prepared).as_secs_f64() * 1000.0
    );
    // the FUSE data layer; a killed daemon's dead one may still be there
    let data = mdir.join("data");
    let _ = strata_sys::unmount_detach(&data);
    let data = std::fs::create_dir_all(&data)
        .and_then(|()| data.canonicalize())
        .with_context(|| format!("creating {}", data.display()))?;
    let session = match LazyFs::new(fetcher.clone(), &cfg).mount(&data, &cfg) {
        Ok(s) => s,
        Err(e) => {
            remove_leftovers(&mdir);
            return Err(e).with_context(|| format!("mounting FUSE at {}", data.display()));
        }
    };
    // recording needs every open: then the FUSE layer is the only data layer
    // (it serves local contents too)
    let mut data_dirs = vec![store.root().join("objects"), data.clone()];
    if a.record.is_some() {
        data_dirs.remove(0);
    }
    let m = strata_sys::OverlayMount {
        dirs_above: Vec::new(),
        layers: vec![erofs],
        data_dirs,
        upper: None,
        verity_require: false,
        source: format!("strata-lazy:{digest}"),
    };
    if let Err(e) = strata_sys::mount_overlay(&m, target) {
        let _ = strata_sys::unmount_detach(&data);
        let _ = session.join();
        remove_leftovers(&mdir);
        return Err(
            anyhow::Error::new(e).context(format!("mounting {name} at {}", target.display()))
        );
    }
    let total = lazy.missing(&store).len() as u64;
    let mut state = MountState {
        pid: std::process::id(),
        dir: target.to_path_buf(),
        reference: name.clone(),
        manifest_digest: digest.to_string(),
        log: mdir.join("log"),
        started: now(),
        files_total: 0,
        files_local: 0,
        bytes_fetched: lazy.downloaded,
        image_bytes: lazy
            .layers
            .iter()
            .filter(|l| l.index.is_some())
            .map(|l| l.desc.size)
            .sum(),
        errors: 0,
        prefetch: "none".into(),
        complete: false,
        opens: 0,
    };
    state.files_total = lazy.contents().len() as u64;
    state.files_local = state.files_total.saturating_sub(total);
    if let Err(e) = state.save(&mdir) {
        // nothing may stay mounted when the caller is told it failed
        let _ = strata_sys::unmount_detach(target);
        let _ = strata_sys::unmount_detach(&data);
        let _ = session.join();
        remove_leftovers(&mdir);
        return Err(e).with_context(|| format!("saving the state of {}", target.display()));
    }
    let msg = format!(
        "mounted {name} lazily at {} in {:.0} ms ({} of {} contents to fetch, {} of TOCs read)",
        target.display(),
        started.elapsed().as_secs_f64() * 1000.0,
        total,
        state.files_total,
        human(lazy.downloaded)
    );
    tracing::info!("{msg}");
    if notify {
        report(&serde_json::json!({"mode": "lazy", "message": msg, "manifest_digest": digest}));
    } else if !ctx.quiet {
        println!("{msg}");
    }

    // keep the state file current until unmounted
    let done = Arc::new(AtomicBool::new(false));
    let updater = {
        let done = done.clone();
        let fetcher = fetcher.clone();
        let store = store.clone();
        let lazy = lazy.clone();
        let mdir = mdir.clone();
        let record = a.record.clone();
        let recorder = recorder.clone();
        let opens = cfg.opens.clone();
        let all_local = cfg.all_local.clone();
        let target = target.to_path_buf();
        let data = data.clone();
        std::thread::spawn(move || {
            // re-check only what is still missing, and only when something
            // may have arrived (reads completed files, prefetch running) or
            // every 5 s: stat'ing every object each tick cost reads CPU
            let mut missing = lazy.missing(&store);
            let mut seen_done = u64::MAX;
            let mut last_full = Instant::now();
            while !done.load(Ordering::SeqCst) {
                // unmounted (by umount(8) too): stop serving the data layer
                let mounted = strata_sys::mounts()
                    .map(|ms| ms.iter().any(|m| m.mount_point == target))
                    .unwrap_or(true);
                if !mounted {
                    tracing::info!("{} is unmounted: stopping", target.display());
                    match strata_sys::unmount_detach(&data) {
                        // `strata umount` got there first
                        Ok(()) | Err(strata_sys::MountError::NotMounted(_)) => {}
                        Err(e) => tracing::error!("unmounting the data layer: {e}"),
                    }
                }
                let completed = fetcher.stats.files_completed.load(Ordering::Relaxed);
                // read once, before the counts: a state saved as "done"
                // then carries counts taken after the prefetch ended; and
                // together with `complete`, which changes under that lock
                let (pstate, is_complete) = {
                    let st = prefetch_state.lock().expect("no panics while held");
                    (st.clone(), complete.load(Ordering::SeqCst))
                };
                let busy = matches!(pstate.as_str(), "list" | "all");
                if !missing.is_empty()
                    && (completed != seen_done
                        || busy
                        || pstate != state.prefetch
                        || last_full.elapsed() > Duration::from_secs(5))
                {
                    missing.retain(|d| !store.has_object(d));
                    seen_done = completed;
                    last_full = Instant::now();
                }
                state.files_local = state.files_total.saturating_sub(missing.len() as u64);
                if missing.is_empty() && !all_local.swap(true, Ordering::Relaxed) {
                    tracing::info!(
                        "every file is local: the kernel reads them from the store without the daemon (files opened before: by inode, no opens)"
                    );
                }
                state.bytes_fetched =
                    lazy.downloaded + fetcher.stats.bytes_fetched.load(Ordering::Relaxed);
                state.errors = fetcher.stats.errors.load(Ordering::Relaxed);
                state.prefetch = pstate;
                state.complete = is_complete;
                state.opens = opens.load(Ordering::Relaxed);
                let _ = state.save(&mdir);
                if let (Some(path), Some(rec)) = (&record, &recorder) {
                    let _ = write_record(path, &rec.paths(&lazy.tree));
                }
                if !mounted {
                    return;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    let r = session.join();
    done.store(true, Ordering::SeqCst);
    let _ = updater.join();
    if let (Some(path), Some(rec)) = (&a.record, &recorder) {
        write_record(path, &rec.paths(&lazy.tree))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    tracing::info!("unmounted {}", target.display());
    remove_leftovers(&mdir);
    r.context("serving the FUSE mount")?;
    Ok(ExitCode::SUCCESS)
}

/// Staging, state and EROFS image of a lazy mount that is gone.
fn remove_leftovers(mdir: &Path) {
    let _ = std::fs::remove_dir_all(mdir.join("partial"));
    let _ = std::fs::remove_file(mdir.join("state.json"));
    let _ = std::fs::remove_file(mdir.join("image.erofs"));
    let _ = std::fs::remove_file(mdir.join("image.erofs.tmp"));
}

/// A daemon of an earlier lazy mount at `target` that is still ending
/// (it notices an umount(8) within half a second) would remove this
/// mount's files as it exits: wait for it, a little.
fn wait_for_earlier_daemon(mdir: &Path, target: &Path) -> Result<()> {
    let Ok(prev) = MountState::load(mdir) else {
        return Ok(());
    };
    let t = Instant::now();
    while prev.pid != std::process::id() && alive(prev.pid) {
        if t.elapsed() > Duration::from_secs(3) {
            bail!(
                "the daemon (pid {}) of an earlier lazy mount at {} still runs; `strata umount {}` it or wait",
                prev.pid,
                target.display(),
                target.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn write_record(path: &Path, paths: &[Vec<u8>]) -> std::io::Result<()> {
    let mut s = Vec::new();
    for p in paths {
        s.push(b'/');
        s.extend_from_slice(p);
        s.push(b'\n');
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, s)?;
    std::fs::rename(tmp, path)
}

/// Mount points of lazy mounts whose daemon runs, or which are still
/// mounted without it (their files read objects/ that may belong to no
/// image yet).
pub fn serving(root: &Path) -> Vec<PathBuf> {
    let mounted = strata_sys::mounts().unwrap_or_default();
    MountState::all(root)
        .into_iter()
        .filter(|(_, s)| {
            alive(s.pid)
                || mounted
                    .iter()
                    .any(|m| m.mount_point == s.dir && m.source.starts_with("strata-lazy:"))
        })
        .map(|(_, s)| s.dir)
        .collect()
}

/// `strata mounts`
pub fn list(ctx: &Ctx) -> Result<ExitCode> {
    let mounted = strata_sys::mounts().unwrap_or_default();
    let mut rows = Vec::new();
    for (_, s) in MountState::all(&ctx.root) {
        let alive = alive(s.pid);
        let is_mounted = mounted
            .iter()
            .any(|m| m.mount_point == s.dir && m.source.starts_with("strata-lazy:"));
        let status = match (alive, is_mounted) {
            (true, true) => "serving",
            (false, true) => "stale (daemon gone: `strata umount` cleans it)",
            (_, false) => "not mounted",
        };
        rows.push((s, status));
    }
    let (served_json, served_text) = super::rootfs_serve::list(ctx);
    if ctx.json {
        let mut v: Vec<_> = rows
            .iter()
            .map(|(s, st)| {
                let mut v = serde_json::to_value(s).expect("serializable");
                v["kind"] = serde_json::json!("lazy");
                v["status"] = serde_json::json!(st);
                v
            })
            .collect();
        v.extend(served_json);
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    for line in &served_text {
        println!("{line}");
    }
    if rows.is_empty() {
        if !ctx.quiet && served_text.is_empty() {
            println!("no lazy mounts or served templates");
        }
        return Ok(ExitCode::SUCCESS);
    }
    for (s, st) in rows {
        println!(
            "{}  {}  files {}/{} local  {} of {} fetched by reads  prefetch {}{}  {}  pid {}",
            s.dir.display(),
            s.reference,
            s.files_local,
            s.files_total,
            human(s.bytes_fetched),
            human(s.image_bytes),
            s.prefetch,
            if s.complete { " (pulled)" } else { "" },
            st,
            s.pid
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// After a lazy mount is unmounted: let its daemon finish (or kill it when
/// it hangs) and drop its record and staging.
pub fn after_umount(ctx: &Ctx, target: &Path) {
    let mdir = mount_dir(&ctx.root, target);
    // the data layer: ends the daemon's FUSE session (a killed daemon's
    // dead one too)
    match strata_sys::unmount_detach(&mdir.join("data")) {
        // the daemon got there first, or never mounted it
        Ok(()) | Err(strata_sys::MountError::NotMounted(_)) => {}
        Err(e) => eprintln!("strata: unmounting {}: {e}", mdir.join("data").display()),
    }
    if let Ok(s) = MountState::load(&mdir) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(s.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if alive(s.pid)
            && let Some(pid) = rustix::process::Pid::from_raw(s.pid as i32)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
    remove_leftovers(&mdir);
}

/// Whether `pid` runs (a zombie does not).
pub(crate) fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|c| c != 'Z' && c != 'X'),
        Err(_) => false,
    }
}
