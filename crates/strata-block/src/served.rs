//! A served template as a value: [`serve`] starts one, [`ServedTemplate`]
//! reports and ends it, [`commit`] turns the writes of a writable serve
//! into a child template, [`list`] / [`in_use`] / [`cleanup`] work on the
//! records any process left in `<store>/serve/`.
//!
//! ```text
//! serve(store, template, file, writable, registry)
//!   file: created if missing, must be a regular file and not mounted
//!   <sdir> = <store>/serve/<hash of file>: state.json, overlay, dirty, log
//!   Served (serve.rs) + FUSE on the file; a thread writes fetched chunks to
//!   objects/ and the state every 250 ms
//! wait()    serve until unmounted; the record goes unless writes are kept
//! commit()  dirty chunks of the overlay -> objects -> child map -> name
//! ```

use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use strata_digest::Digest;
use strata_oci::RegistryOptions;
use strata_ops::{Cancel, Event, EventSink, NoEvents, Op};
use strata_store::{Store, TemplateMap};

use crate::serve::{ServeOptions, ServeState, Served, TemplateFs, dirty_chunks, serve_dir};
use crate::{BlockError, ChunkSource};

/// The mount source of a served file.
pub const SOURCE_PREFIX: &str = "strata-rootfs:";

/// What to serve.
#[derive(Debug, Clone)]
pub struct ServeRequest {
    /// The template.
    pub template: Digest,
    /// Its name as the user gave it (for the record).
    pub name: String,
    /// The file to serve it at (created if missing).
    pub file: PathBuf,
    /// Keep writes in an overlay (see [`commit`]).
    pub writable: bool,
    /// For a pulled template: how to reach its registry.
    pub registry: RegistryOptions,
    /// A chunk fetched from the registry brings the chunks after it in its
    /// pack that the store lacks too, up to this many bytes in all, in one
    /// request ([`crate::serve::DEFAULT_READAHEAD`]).
    pub readahead: u64,
}

/// A template served by this process.
pub struct ServedTemplate {
    file: PathBuf,
    sdir: PathBuf,
    served: Arc<Served>,
    session: Option<fuser::BackgroundSession>,
    state: Arc<Mutex<ServeState>>,
    done: Arc<AtomicBool>,
    updater: Option<std::thread::JoinHandle<()>>,
    events: Arc<dyn EventSink>,
    /// Keeps the template from gc while served.
    _lease: strata_store::Lease,
}

/// Whether a served file on record is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServeStatus {
    /// Its daemon runs and the file is mounted.
    Serving,
    /// Mounted, its daemon gone: [`cleanup`] after unmounting.
    Stale,
    /// Not served; written chunks are kept for [`commit`].
    NotServed,
}

/// A served file on record.
#[derive(Debug, Clone)]
pub struct ServeRecord {
    /// Its state as last saved.
    pub state: ServeState,
    /// Whether it is served.
    pub status: ServeStatus,
}

/// What [`commit`] made.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Committed {
    /// The new template's id.
    pub id: Digest,
    /// Its parent.
    pub parent: Digest,
    /// Chunks written to the served file.
    pub written_chunks: u64,
    /// Chunks the store did not have.
    pub new_chunks: u64,
    /// Their bytes.
    pub new_bytes: u64,
}

/// What [`cleanup`] dropped.
#[derive(Debug, Clone, Copy, Default)]
pub struct Dropped {
    /// Chunks written while served.
    pub written: u64,
    /// Of those, committed by the last [`commit`].
    pub committed: u64,
}

/// The canonical path of `file`, which may be a FUSE mount whose daemon
/// died (then it cannot be stat'ed: its parent is resolved).
pub fn canonical(file: &Path) -> std::io::Result<PathBuf> {
    match file.canonicalize() {
        Ok(p) => Ok(p),
        Err(e) => {
            let parent = file.parent().filter(|p| !p.as_os_str().is_empty());
            match (parent.map(Path::canonicalize), file.file_name()) {
                (Some(Ok(p)), Some(n)) => Ok(p.join(n)),
                (None, Some(n)) => Ok(std::env::current_dir()?.join(n)),
                _ => Err(e),
            }
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Prepare `file` for serving: create it if missing, check it is a
/// regular file, not mounted and not served; drop an earlier serve's
/// record (returning how many written chunks it held, never committed).
pub fn prepare_file(root: &Path, file: &Path) -> Result<(PathBuf, u64), BlockError> {
    let io = |what: String| move |source| BlockError::Io { what, source };
    if !file.exists() {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(file)
            .map_err(io(format!("creating {}", file.display())))?;
    }
    let file = canonical(file).map_err(io(format!("resolving {}", file.display())))?;
    let meta = std::fs::metadata(&file).map_err(io(format!("reading {}", file.display())))?;
    if !meta.is_file() {
        return Err(BlockError::NotServed {
            file,
            reason: "not a regular file: a template is served as a file (loop-mount it or give it to a VMM)".into(),
        });
    }
    if strata_sys::mounts()?.iter().any(|m| m.mount_point == file) {
        return Err(BlockError::Busy(format!(
            "{} is already a mount point",
            file.display()
        )));
    }
    let sdir = serve_dir(root, &file);
    let mut dropped = 0;
    if let Ok(old) = ServeState::load(&sdir) {
        if strata_sys::daemon::alive(old.pid) {
            return Err(BlockError::Busy(format!(
                "{} is being served by pid {} already",
                file.display(),
                old.pid
            )));
        }
        dropped = old.dirty_chunks;
    }
    // a record left by an earlier serve of this file is stale now
    let _ = std::fs::remove_dir_all(&sdir);
    Ok((file, dropped))
}

/// Serve a template at `req.file` (prepared by [`prepare_file`]) from this
/// process until it is unmounted. No events; see [`serve_with`].
pub fn serve(store: Arc<Store>, req: &ServeRequest) -> Result<ServedTemplate, BlockError> {
    serve_with(store, req, Arc::new(NoEvents), Cancel::new())
}

/// [`serve`] with events and a cancel token, both kept while it serves.
///
/// Events (op [`Op::TemplateServe`]): `Started` (the file), a `Progress`
/// per chunk fetched on demand (bytes fetched so far, of the bytes missing
/// at the start), a [`strata_ops::Warning::ChunkFetchFailed`] per chunk
/// fetch that failed (the read gets EIO), and `Finished` once it is no
/// longer served. Once `cancel` fires, the file is unmounted as
/// [`ServedTemplate::unmount`] does (retried while it is busy) and
/// [`ServedTemplate::wait`] returns: stopping is how a serve ends, so that
/// is not an error.
pub fn serve_with(
    store: Arc<Store>,
    req: &ServeRequest,
    events: Arc<dyn EventSink>,
    cancel: Cancel,
) -> Result<ServedTemplate, BlockError> {
    cancel.check()?;
    let io = |what: String| move |source| BlockError::Io { what, source };
    // the template stays until the lease is taken; serving after it is not
    // an operation for gc (the lease keeps the template)
    let work = store.work()?;
    let id = req.template;
    let file = canonical(&req.file).map_err(io(format!("resolving {}", req.file.display())))?;
    let meta = std::fs::metadata(&file).map_err(io(format!("reading {}", file.display())))?;
    let sdir = serve_dir(store.root(), &file);
    let mut registry = req.registry.clone();
    // a read waits for a stalled registry 10 s at most per attempt, then EIO
    registry.stall_timeout = Some(Duration::from_secs(10));
    // the source is resolved (and its registry reached) now when chunks
    // are missing: a registry that cannot be used fails the start, not
    // the VM's first read
    let lacking = store
        .template_map(&id)?
        .chunk_set()
        .iter()
        .any(|d| !store.has_object(d));
    let source = if lacking {
        crate::artifact::source_for(&store, &id, &registry, &cancel)?
            .map(|s| Arc::new(s) as Arc<dyn ChunkSource>)
    } else {
        None
    };
    let remote = store.template_remote(&id).map(|r| r.reference);
    let opts = ServeOptions {
        writable: req.writable.then(|| sdir.clone()),
        readahead: req.readahead,
        uid: meta.uid(),
        gid: meta.gid(),
        events: events.clone(),
    };
    let served = Arc::new(Served::new(store.clone(), id, source, &opts)?);
    let map = served.map();
    let state = ServeState {
        pid: std::process::id(),
        file: file.clone(),
        template: id,
        name: req.name.clone(),
        writable: req.writable,
        log: sdir.join("log"),
        started: now(),
        size: map.size,
        chunks_total: map.chunks().count() as u64,
        bytes_total: map.chunks().map(|(i, _)| map.chunk_len(i)).sum(),
        chunks_missing: served.missing(),
        remote: remote.clone(),
        chunks_read: 0,
        bytes_read: 0,
        chunks_fetched: 0,
        bytes_fetched: 0,
        dirty_chunks: 0,
        errors: 0,
    };
    if state.chunks_missing > 0 && remote.is_none() {
        return Err(BlockError::MissingChunk {
            chunk: map
                .chunks()
                .find(|(_, d)| !store.has_object(d))
                .map(|(i, _)| i)
                .unwrap_or(0),
            digest: map
                .chunks()
                .find(|(_, d)| !store.has_object(d))
                .map(|(_, d)| d)
                .unwrap_or(id),
        });
    }
    let lease = store.lease_for_mount(
        &format!("served template {}", file.display()),
        strata_store::LeaseRoots {
            templates: vec![id],
            ..Default::default()
        },
        &file,
    )?;
    drop(work);
    state
        .save(&sdir)
        .map_err(io(format!("saving the state of {}", file.display())))?;
    let session = TemplateFs(served.clone())
        .mount(&file, 4)
        .map_err(io(format!("mounting FUSE on {}", file.display())))?;
    events.event(&Event::Started {
        op: Op::TemplateServe,
        subject: file.display().to_string(),
    });
    let state = Arc::new(Mutex::new(state));
    let done = Arc::new(AtomicBool::new(false));
    // keep the state current and write fetched chunks to the store; on
    // cancel, unmount (the session then ends and `wait` returns)
    let updater = {
        let (done, served, sdir, state, file) = (
            done.clone(),
            served.clone(),
            sdir.clone(),
            state.clone(),
            file.clone(),
        );
        std::thread::Builder::new()
            .name("serve-state".into())
            .spawn(move || {
                let mut unmounted = false;
                let mut busy_said = false;
                loop {
                    let last = done.load(Ordering::SeqCst);
                    if !last && !unmounted && cancel.is_cancelled() {
                        match strata_sys::unmount(&file) {
                            Ok(()) | Err(strata_sys::MountError::NotMounted(_)) => {
                                tracing::info!("cancelled: {} is unmounted", file.display());
                                unmounted = true;
                            }
                            // in use (a loop device, a VM): tried again
                            Err(e) if !busy_said => {
                                tracing::warn!("cancelled but cannot unmount yet: {e}");
                                busy_said = true;
                            }
                            Err(_) => {}
                        }
                    }
                    if let Err(e) = served.flush_fetched() {
                        tracing::error!("storing fetched chunks failed: {e}");
                    }
                    {
                        let mut st = state.lock().expect("no panics while held");
                        served.fill(&mut st);
                        let _ = st.save(&sdir);
                    }
                    if last {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            })
            .map_err(io("starting the state thread".into()))?
    };
    Ok(ServedTemplate {
        file,
        sdir,
        served,
        session: Some(session),
        state,
        done,
        updater: Some(updater),
        events,
        _lease: lease,
    })
}

impl ServedTemplate {
    /// The served file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Its state now.
    pub fn status(&self) -> ServeState {
        let mut s = self.state.lock().expect("no panics while held").clone();
        self.served.fill(&mut s);
        s
    }

    /// Serve until the file is unmounted; then store fetched chunks, sync
    /// the overlay and drop the record unless written chunks are kept.
    pub fn wait(mut self) -> Result<ServeState, BlockError> {
        let session = self.session.take().expect("served until wait or unmount");
        let r = session.join();
        let state = self.finish();
        r.map_err(|source| BlockError::Io {
            what: format!("serving {}", self.file.display()),
            source,
        })?;
        Ok(state)
    }

    /// Unmount the file and stop serving.
    pub fn unmount(mut self) -> Result<ServeState, BlockError> {
        match strata_sys::unmount(&self.file) {
            Ok(()) | Err(strata_sys::MountError::NotMounted(_)) => {}
            Err(e) => return Err(e.into()),
        }
        if let Some(s) = self.session.take() {
            let _ = s.join();
        }
        Ok(self.finish())
    }

    fn finish(&mut self) -> ServeState {
        self.done.store(true, Ordering::SeqCst);
        if let Some(u) = self.updater.take() {
            let _ = u.join();
        }
        if let Err(e) = self.served.sync() {
            tracing::error!("syncing the overlay failed: {e}");
        }
        let state = self.status();
        tracing::info!(
            "{} is no longer served ({} chunks read, {} fetched, {} written)",
            self.file.display(),
            state.chunks_read,
            state.chunks_fetched,
            state.dirty_chunks
        );
        // writes not yet committed stay for `commit`
        if state.dirty_chunks == 0 {
            let _ = std::fs::remove_dir_all(&self.sdir);
        }
        self.events.event(&Event::Finished {
            op: Op::TemplateServe,
        });
        state
    }
}

impl Drop for ServedTemplate {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            let _ = strata_sys::unmount_detach(&self.file);
            let _ = s.join();
            self.finish();
        }
    }
}

/// Make the chunks written to the writable serve at `file` a child
/// template of the one served, named `name`.
pub fn commit(store: &Store, file: &Path, name: &str) -> Result<Committed, BlockError> {
    let io = |what: String| move |source| BlockError::Io { what, source };
    // one operation for gc: chunks, map and name
    let _work = store.work()?;
    let file = canonical(file).map_err(io(format!("resolving {}", file.display())))?;
    let sdir = serve_dir(store.root(), &file);
    let state = ServeState::load(&sdir).map_err(|e| BlockError::NotServed {
        file: file.clone(),
        reason: format!("not served by this store ({e})"),
    })?;
    if !state.writable {
        return Err(BlockError::NotServed {
            file,
            reason: "served read-only: nothing to commit".into(),
        });
    }
    let parent = state.template;
    let pmap = store.template_map(&parent)?;
    // writes the kernel still holds reach the daemon (and its overlay)
    if strata_sys::daemon::alive(state.pid)
        && let Ok(f) = std::fs::File::open(&file)
    {
        f.sync_all()
            .map_err(io(format!("syncing {}", file.display())))?;
    }
    let dirty =
        dirty_chunks(&sdir).map_err(io(format!("reading the dirty log of {}", file.display())))?;
    let overlay = std::fs::File::open(sdir.join("overlay"))
        .map_err(io(format!("opening the overlay of {}", file.display())))?;
    let mut chunks: BTreeMap<u64, Digest> = pmap.chunks().collect();
    let mut batch = store.object_batch()?;
    let (mut new_chunks, mut new_bytes) = (0u64, 0u64);
    let mut buf = vec![0u8; pmap.chunk_size as usize];
    for &i in &dirty {
        if i >= pmap.chunk_count() {
            return Err(BlockError::NotServed {
                file,
                reason: format!("its dirty log names chunk {i}, past the image's end"),
            });
        }
        let len = pmap.chunk_len(i) as usize;
        overlay
            .read_exact_at(&mut buf[..len], i * pmap.chunk_size)
            .map_err(io(format!("reading chunk {i} of the overlay")))?;
        if buf[..len].iter().all(|&b| b == 0) {
            chunks.remove(&i);
            continue;
        }
        let before = batch.stats().objects_written;
        let d = batch
            .put(&mut &buf[..len], len as u64)
            .map_err(io("storing a written chunk".into()))?;
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
    store.set_template_name(name, &id)?;
    // cleanup warns only about writes made after this
    let _ = std::fs::write(sdir.join("committed"), dirty.len().to_string());
    Ok(Committed {
        id,
        parent,
        written_chunks: dirty.len() as u64,
        new_chunks,
        new_bytes,
    })
}

fn status_of(s: &ServeState, mounted: &[strata_sys::MountInfo]) -> ServeStatus {
    let alive = strata_sys::daemon::alive(s.pid);
    let is_mounted = mounted
        .iter()
        .any(|m| m.mount_point == s.file && m.source.starts_with(SOURCE_PREFIX));
    match (alive, is_mounted) {
        (true, true) => ServeStatus::Serving,
        (false, true) => ServeStatus::Stale,
        (_, false) => ServeStatus::NotServed,
    }
}

/// Every served file on record in the store at `root`. A running daemon
/// rewrites its state every 250 ms: with `fresh`, wait (600 ms at most)
/// for a state newer than this call, so the numbers include every read
/// done before it.
pub fn list(root: &Path, fresh: bool) -> Vec<ServeRecord> {
    let mounted = strata_sys::mounts().unwrap_or_default();
    let asked = SystemTime::now();
    let newer = |dir: &Path| -> Option<ServeState> {
        let deadline = Instant::now() + Duration::from_millis(600);
        loop {
            let m = std::fs::metadata(dir.join("state.json")).and_then(|m| m.modified());
            if m.is_ok_and(|m| m > asked) || Instant::now() > deadline {
                return ServeState::load(dir).ok();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    ServeState::all(root)
        .into_iter()
        .map(|(dir, s)| {
            let s = if fresh && strata_sys::daemon::alive(s.pid) {
                newer(&dir).unwrap_or(s)
            } else {
                s
            };
            ServeRecord {
                status: status_of(&s, &mounted),
                state: s,
            }
        })
        .collect()
}

/// After the served `file` was unmounted: let its daemon finish (or kill
/// it when it hangs) and drop its record, overlay included.
pub fn cleanup(root: &Path, file: &Path) -> Dropped {
    let sdir = serve_dir(root, file);
    let mut dropped = Dropped::default();
    if let Ok(s) = ServeState::load(&sdir) {
        strata_sys::daemon::stop(s.pid, Duration::from_secs(5));
        dropped.committed = std::fs::read_to_string(sdir.join("committed"))
            .ok()
            .and_then(|c| c.trim().parse().ok())
            .unwrap_or(0);
        dropped.written = dirty_chunks(&sdir).map(|d| d.len() as u64).unwrap_or(0);
    }
    let _ = std::fs::remove_dir_all(&sdir);
    dropped
}
