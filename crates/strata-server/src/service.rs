//! The service's state: the job table, the queue, the workers, and the
//! pipeline one job runs (pull, convert and push untagged, verify from
//! the registry, tag last).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use strata_oci::convert::{ConvertOptions, Format};
use strata_oci::push::RegistryDestination;
use strata_oci::registry::RegistrySource;
use strata_oci::{ImageRef, ImageSource as _, Platform, RegistryOptions};
use strata_ops::{Cancel, Ctl, ErrorKind, Event, EventSink, HasKind, Op};
use strata_store::Store;

use crate::config::Config;
use crate::jobs::{self, Job, JobError, JobResult, Journal, Progress, State, job_id};

/// Restarts after which a job that never finished is failed.
const MAX_RUNS: u32 = 3;

/// Annotation: the job key a converted manifest was made for.
pub const KEY_ANNOTATION: &str = "dev.strata.convert.key";
/// Annotation: the format asked.
pub const FORMAT_ANNOTATION: &str = "dev.strata.convert.format";
/// Annotation: the source reference as given.
pub const SOURCE_ANNOTATION: &str = "dev.strata.convert.source";

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Counters {
    /// Conversions begun (a job run that reached its pull).
    pub conversions_started: AtomicU64,
    /// Template builds begun.
    pub templates_started: AtomicU64,
    /// Answers from the registry's deterministic tag.
    pub registry_hits: AtomicU64,
    /// Failed verifications, by check.
    pub verification_failures: Mutex<BTreeMap<String, u64>>,
    /// Seconds spent, by phase.
    pub phase_seconds: Mutex<BTreeMap<String, f64>>,
    /// Uncompressed bytes converted.
    pub converted_bytes: AtomicU64,
}

/// Everything the handlers and workers share.
pub struct Shared {
    /// The config.
    pub config: Config,
    /// The store.
    pub store: Arc<Store>,
    /// Registry access (one client for the service's life).
    pub registry: RegistryOptions,
    /// Tokens.
    pub tokens: crate::auth::Tokens,
    /// Jobs.
    pub table: Mutex<Table>,
    journal: Journal,
    queue_tx: tokio::sync::mpsc::UnboundedSender<String>,
    /// Set at SIGTERM: no new jobs, `/readyz` 503.
    pub shutting_down: AtomicBool,
    /// Metrics.
    pub counters: Counters,
    /// What verifications learnt from blobs they hashed (a shared base
    /// layer is not decompressed again).
    pub verified: strata_oci::verify::VerifyCache,
}

/// The jobs.
#[derive(Default)]
pub struct Table {
    /// By id.
    pub jobs: HashMap<String, Job>,
    /// The latest id of each key.
    pub by_key: HashMap<String, String>,
    /// Cancel tokens of running jobs.
    cancels: HashMap<String, Cancel>,
    /// Jobs whose tags are being written (too late to cancel).
    tagging: std::collections::HashSet<String>,
}

impl Table {
    /// Jobs waiting.
    pub fn queued(&self) -> usize {
        self.jobs
            .values()
            .filter(|j| j.state == State::Queued)
            .count()
    }
}

/// What `admit` did.
pub enum Admitted {
    /// A finished identical job (200).
    Done(Job),
    /// A job in flight, new or not (202).
    InFlight(Job),
}

/// Why a job was not admitted.
pub enum Refused {
    /// The queue is full; retry after this many seconds.
    QueueFull(u64),
    /// The service is stopping.
    ShuttingDown,
    /// The journal could not be written.
    Journal(String),
}

/// What DELETE did.
pub enum CancelOutcome {
    /// A queued job, now cancelled.
    Cancelled(Job),
    /// A running job was asked to stop.
    Requested(Job),
    /// Already over.
    Finished(Job),
    /// Its tags are being written.
    TooLate(Job),
    /// No such job.
    NotFound,
}

impl Shared {
    /// Open the journal, load the jobs in it (unfinished ones queued
    /// again, ahead of new ones), and start `config.workers` workers on
    /// the current tokio runtime.
    pub fn start(
        config: Config,
        store: Store,
        registry: RegistryOptions,
        tokens: crate::auth::Tokens,
        state_dir: PathBuf,
    ) -> Result<Arc<Shared>, String> {
        let journal = Journal::open(&state_dir)
            .map_err(|e| format!("opening the job journal in {}: {e}", state_dir.display()))?;
        let loaded = journal
            .load()
            .map_err(|e| format!("loading jobs from {}: {e}", state_dir.display()))?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let workers = config.workers;
        let shared = Arc::new(Shared {
            config,
            store: Arc::new(store),
            registry,
            tokens,
            table: Mutex::new(Table::default()),
            journal,
            queue_tx: tx,
            shutting_down: AtomicBool::new(false),
            counters: Counters::default(),
            verified: Default::default(),
        });
        {
            let mut t = shared.lock();
            for mut job in loaded {
                if !job.state.terminal() {
                    if job.runs >= MAX_RUNS {
                        job.state = State::Failed;
                        job.error = Some(JobError {
                            code: "too-many-restarts".into(),
                            check: None,
                            kind: "internal".into(),
                            message: format!(
                                "the service stopped {} times while this job ran",
                                job.runs
                            ),
                        });
                    } else {
                        tracing::info!("job {} resumes ({})", job.id, job.state.as_str());
                        job.state = State::Queued;
                        job.progress = Progress {
                            phase: "queued".into(),
                            ..Progress::default()
                        };
                        let _ = shared.queue_tx.send(job.id.clone());
                    }
                    job.updated = crate::jobs::now();
                    shared
                        .journal
                        .save(&job)
                        .map_err(|e| format!("journaling job {}: {e}", job.id))?;
                }
                let latest = t.by_key.get(&job.key).and_then(|id| t.jobs.get(id));
                if latest.is_none_or(|l| l.attempt < job.attempt) {
                    t.by_key.insert(job.key.clone(), job.id.clone());
                }
                t.jobs.insert(job.id.clone(), job);
            }
        }
        {
            let s = shared.clone();
            tokio::spawn(async move {
                loop {
                    let s2 = s.clone();
                    let _ = tokio::task::spawn_blocking(move || s2.expire(jobs::now())).await;
                    tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                }
            });
        }
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..workers {
            let (s, rx) = (shared.clone(), rx.clone());
            tokio::spawn(async move {
                loop {
                    let Some(id) = rx.lock().await.recv().await else {
                        return;
                    };
                    let s2 = s.clone();
                    if let Err(e) = tokio::task::spawn_blocking(move || s2.run(&id)).await {
                        tracing::error!("a job's worker panicked: {e}");
                    }
                }
            });
        }
        Ok(shared)
    }

    /// The table.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self, job: &Job) {
        if let Err(e) = self.journal.save(job) {
            tracing::error!("journaling job {}: {e}", job.id);
        }
    }

    /// Drop finished jobs older than `retention_days` at `now`: their
    /// records and the store's names for their sources.
    pub fn expire(&self, now: u64) -> usize {
        let horizon = now.saturating_sub(self.config.retention_days.saturating_mul(86_400));
        let mut t = self.lock();
        let old: Vec<String> = t
            .jobs
            .values()
            .filter(|j| j.state.terminal() && j.updated < horizon)
            .map(|j| j.id.clone())
            .collect();
        for id in &old {
            if let Err(e) = self.store.remove_ref(&format!("serve/{id}")) {
                tracing::warn!("dropping the store's name serve/{id}: {e}");
            }
            if let Err(e) = self.store.remove_template_name(&format!("serve/{id}")) {
                tracing::warn!("dropping the store's template name serve/{id}: {e}");
            }
            let adds = t
                .jobs
                .get(id)
                .and_then(|j| j.template.as_ref())
                .map_or(0, |s| s.add.len());
            for i in 0..adds {
                let _ = self.store.remove_ref(&format!("serve/{id}-add-{i}"));
            }
            if let Err(e) = self.journal.remove(id) {
                tracing::warn!("dropping job record {id}: {e}");
                continue;
            }
            if let Some(j) = t.jobs.remove(id)
                && t.by_key.get(&j.key) == Some(id)
            {
                t.by_key.remove(&j.key);
            }
        }
        if !old.is_empty() {
            tracing::info!("{} finished jobs past their retention dropped", old.len());
        }
        old.len()
    }

    /// Admit a job for `key` (check-then-insert under one lock, so many
    /// identical requests make one job).
    pub fn admit(&self, template: Job) -> Result<Admitted, Refused> {
        let mut t = self.lock();
        let mut attempt = 1;
        if let Some(j) = t.by_key.get(&template.key).and_then(|id| t.jobs.get(id)) {
            match j.state {
                State::Succeeded => return Ok(Admitted::Done(j.clone())),
                s if !s.terminal() => return Ok(Admitted::InFlight(j.clone())),
                _ => attempt = j.attempt + 1,
            }
        }
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(Refused::ShuttingDown);
        }
        if t.queued() >= self.config.queue {
            let per = 30u64;
            let wait = (t.queued() as u64).div_ceil(self.config.workers as u64) * per;
            return Err(Refused::QueueFull(wait.clamp(1, 300)));
        }
        let mut job = template;
        job.attempt = attempt;
        job.id = job_id(&job.kind, &job.key, attempt);
        self.journal
            .save(&job)
            .map_err(|e| Refused::Journal(format!("journaling job {}: {e}", job.id)))?;
        t.by_key.insert(job.key.clone(), job.id.clone());
        t.jobs.insert(job.id.clone(), job.clone());
        let _ = self.queue_tx.send(job.id.clone());
        Ok(Admitted::InFlight(job))
    }

    /// Record a job found done in the registry (a second instance's
    /// answer), unless one for the key exists.
    pub fn record_done(&self, job: Job) -> Job {
        let mut t = self.lock();
        if let Some(j) = t.by_key.get(&job.key).and_then(|id| t.jobs.get(id))
            && !matches!(j.state, State::Failed | State::Cancelled)
        {
            return j.clone();
        }
        self.save(&job);
        t.by_key.insert(job.key.clone(), job.id.clone());
        t.jobs.insert(job.id.clone(), job.clone());
        job
    }

    /// DELETE.
    pub fn cancel(&self, id: &str) -> CancelOutcome {
        let mut t = self.lock();
        let tagging = t.tagging.contains(id);
        let token = t.cancels.get(id).cloned();
        let Some(job) = t.jobs.get_mut(id) else {
            return CancelOutcome::NotFound;
        };
        match job.state {
            s if s.terminal() => CancelOutcome::Finished(job.clone()),
            State::Queued => {
                job.state = State::Cancelled;
                job.progress.phase = "done".into();
                job.updated = crate::jobs::now();
                let j = job.clone();
                self.save(&j);
                CancelOutcome::Cancelled(j)
            }
            _ if tagging => CancelOutcome::TooLate(job.clone()),
            _ => {
                job.cancel_requested = true;
                if let Some(c) = token {
                    c.cancel();
                }
                let j = job.clone();
                self.save(&j);
                CancelOutcome::Requested(j)
            }
        }
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Job)) -> Option<Job> {
        let mut t = self.lock();
        let job = t.jobs.get_mut(id)?;
        f(job);
        job.updated = crate::jobs::now();
        let j = job.clone();
        self.save(&j);
        Some(j)
    }

    /// Run job `id` (a worker's blocking thread).
    fn run(&self, id: &str) {
        let cancel = Cancel::new();
        let job = {
            let mut t = self.lock();
            let Some(job) = t.jobs.get_mut(id) else {
                return;
            };
            if job.state != State::Queued {
                return; // cancelled while queued
            }
            job.state = State::Running;
            job.runs += 1;
            job.progress = Progress {
                phase: "pulling".into(),
                ..Progress::default()
            };
            job.updated = crate::jobs::now();
            let j = job.clone();
            t.cancels.insert(id.to_string(), cancel.clone());
            self.save(&j);
            j
        };
        tracing::info!(
            "job {} runs: {} to {} as {}",
            job.id,
            job.source.reference,
            job.request.target,
            job.request.format
        );
        let sink = JobSink {
            shared: self,
            id,
            units: Mutex::new(HashMap::new()),
        };
        let ctl = Ctl::new(&sink, &cancel);
        let outcome = if job.template.is_some() {
            self.template_pipeline(&job, ctl)
        } else {
            self.pipeline(&job, ctl)
        };
        let mut t = self.lock();
        t.cancels.remove(id);
        t.tagging.remove(id);
        let Some(j) = t.jobs.get_mut(id) else {
            return;
        };
        j.updated = crate::jobs::now();
        j.progress.phase = "done".into();
        match outcome {
            Ok((result, report)) => {
                j.state = State::Succeeded;
                j.result = Some(result);
                j.verification = Some(report);
            }
            Err(Failure::Cancelled) => j.state = State::Cancelled,
            Err(Failure::Failed { error, report }) => {
                if let (Some(check), Some(_)) = (&error.check, &report) {
                    *self
                        .counters
                        .verification_failures
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(check.clone())
                        .or_default() += 1;
                }
                tracing::warn!(
                    "job {} failed: {}{}: {}",
                    j.id,
                    error.code,
                    error
                        .check
                        .as_deref()
                        .map(|c| format!(" ({c})"))
                        .unwrap_or_default(),
                    error.message
                );
                j.state = State::Failed;
                j.error = Some(*error);
                j.verification = report.map(|r| *r);
            }
        }
        let j = j.clone();
        self.save(&j);
        drop(t);
        // a job's buffers (layers, TOCs, trees) are freed: give the pages
        // back rather than keep the high-water mark of the largest job
        strata_sys::malloc::trim();
        tracing::info!("job {} {}", j.id, j.state.as_str());
    }

    fn timed<T>(&self, phase: &str, f: impl FnOnce() -> T) -> T {
        let t0 = std::time::Instant::now();
        let r = f();
        *self
            .counters
            .phase_seconds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(phase.to_string())
            .or_default() += t0.elapsed().as_secs_f64();
        r
    }

    /// Pull, convert and push untagged, verify, tag.
    fn pipeline(
        &self,
        job: &Job,
        ctl: Ctl<'_>,
    ) -> Result<(JobResult, strata_oci::verify::VerifyReport), Failure> {
        self.counters
            .conversions_started
            .fetch_add(1, Ordering::Relaxed);
        let src = job.source.manifest_digest;
        self.ensure_source(job, ctl)?;
        let meta = self
            .store
            .image_meta(&src)
            .map_err(|e| fail("internal", &e))?;
        let manifest = self
            .store
            .image_manifest(&src)
            .map_err(|e| fail("internal", &e))?;
        ctl.cancel.check().map_err(|_| Failure::Cancelled)?;

        // convert, pushing every blob and the manifest by digest: no tag
        // names anything before it is verified
        let target: ImageRef = format!("docker://{}", job.request.target)
            .parse()
            .map_err(|e| fail("push-failed", &e))?;
        let format: Format = job
            .request
            .format
            .parse()
            .map_err(|e: String| Failure::Failed {
                error: Box::new(JobError {
                    code: "internal".into(),
                    check: None,
                    kind: "invalid_input".into(),
                    message: e,
                }),
                report: None,
            })?;
        let mut annotations = BTreeMap::new();
        annotations.insert(KEY_ANNOTATION.to_string(), job.key.clone());
        annotations.insert(FORMAT_ANNOTATION.to_string(), job.request.format.clone());
        annotations.insert(SOURCE_ANNOTATION.to_string(), job.source.reference.clone());
        let opts = ConvertOptions {
            format,
            place_first: !job.request.prefetch_list.is_empty(),
            prefetch: job.request.prefetch_list.clone(),
            subject: Some(strata_oci::Descriptor {
                media_type: meta.manifest_media_type.clone(),
                digest: src,
                size: manifest.len() as u64,
                annotations: BTreeMap::new(),
                platform: None,
                urls: Vec::new(),
            }),
            annotations,
            ..ConvertOptions::default()
        };
        let convert = |opts: &ConvertOptions| {
            self.set_phase(&job.id, "converting");
            let summary = self.timed("converting", || {
                let dest = RegistryDestination::untagged(
                    &target,
                    &self.registry,
                    &self.store.root().join("tmp"),
                )
                .map_err(|e| fail("push-failed", &e))?;
                strata_oci::convert::convert(&self.store, &src, &dest, opts, ctl)
                    .map_err(|e| fail("convert-failed", &e))
            })?;
            self.counters
                .converted_bytes
                .fetch_add(summary.tar_bytes, Ordering::Relaxed);
            Ok::<_, Failure>(summary)
        };
        let mut summary = convert(&opts)?;
        let repo = target_repository(&target);
        let mut recorded = Vec::new();
        if let Some(optimize) = &job.request.optimize {
            // run the first conversion lazily, record what it reads, and
            // place that first in a second one
            let first: ImageRef = format!("docker://{repo}@{}", summary.manifest_digest)
                .parse()
                .map_err(|e| fail("internal", &e))?;
            self.set_phase(&job.id, "recording");
            recorded = self.timed("recording", || self.record(job, &first, optimize, ctl))?;
            if !recorded.is_empty() {
                let opts = ConvertOptions {
                    prefetch: recorded.clone(),
                    place_first: true,
                    ..opts.clone()
                };
                summary = convert(&opts)?;
            }
        }

        // read it back from the registry and check it
        let pushed: ImageRef = format!("docker://{repo}@{}", summary.manifest_digest)
            .parse()
            .map_err(|e| fail("internal", &e))?;
        self.set_verifying(&job.id);
        let report = self
            .timed("verifying", || {
                strata_oci::verify::verify_pushed_with(
                    &self.store,
                    &src,
                    &pushed,
                    &summary,
                    true,
                    &self.registry,
                    &self.verified,
                    ctl,
                )
            })
            .map_err(|e| fail("verification-failed", &e))?;
        if let Some(c) = report.failed() {
            return Err(Failure::Failed {
                error: Box::new(JobError {
                    code: "verification-failed".into(),
                    check: Some(c.name.clone()),
                    kind: "digest_mismatch".into(),
                    message: format!(
                        "{}: {}",
                        c.name,
                        c.detail.clone().unwrap_or_else(|| "failed".into())
                    ),
                }),
                report: Some(Box::new(report)),
            });
        }

        // the tags, last; a cancel after this point is too late
        self.begin_tagging(&job.id, ctl)?;
        self.set_phase(&job.id, "tagging");
        let bytes = RegistrySource::new(pushed.clone(), &self.registry)
            .and_then(|s| s.resolve(&Platform::host_default()))
            .map_err(|e| fail("tag-failed", &e))?
            .manifest_bytes;
        let dest = strata_oci::registry::RegistryPusher::new(&target, &self.registry)
            .map_err(|e| fail("tag-failed", &e))?;
        // linked to the source: docker-registry 2.8 has no referrers API,
        // so the `sha256-<source hex>` index (the OCI 1.1 fallback) lists
        // every variant made of the source in this repository
        self.link_referrer(&target, &dest, job, &summary.manifest_digest, bytes.len())
            .map_err(|e| fail("referrers-failed", &e))?;
        let mut tags = vec![crate::jobs::deterministic_tag(
            &src,
            &job.request.format,
            &job.key,
        )];
        if let ImageRef::Docker { tag: Some(t), .. } = &target {
            tags.push(t.clone());
        }
        for tag in &tags {
            dest.put_manifest(tag, strata_oci::manifest::OCI_MANIFEST, &bytes)
                .map_err(|e| fail("tag-failed", &e))?;
        }
        let layers = serde_json::to_value(&summary.layers).unwrap_or_default();
        Ok((
            JobResult {
                digest: summary.manifest_digest,
                reference: format!("{repo}@{}", summary.manifest_digest),
                tags,
                layers,
                cache: "none".into(),
                recorded,
            },
            report,
        ))
    }

    /// Add the converted manifest to the source's referrers fallback
    /// index (tag `sha256-<source hex>` in the target repository), one
    /// entry per job key, sorted by digest; read back to check it stuck
    /// (docker-registry has no conditional PUT: another instance may have
    /// written between our GET and PUT), up to 5 times.
    fn link_referrer(
        &self,
        target: &ImageRef,
        pusher: &strata_oci::registry::RegistryPusher,
        job: &Job,
        digest: &strata_digest::Digest,
        size: usize,
    ) -> Result<(), strata_oci::OciError> {
        let tag = format!("sha256-{}", job.source.manifest_digest.hex());
        let source = RegistrySource::new(target.clone(), &self.registry)?;
        let entry = serde_json::json!({
            "mediaType": strata_oci::manifest::OCI_MANIFEST,
            "digest": digest.to_string(),
            "size": size,
            "artifactType": "application/vnd.oci.image.config.v1+json",
            "annotations": {
                KEY_ANNOTATION: job.key,
                FORMAT_ANNOTATION: job.request.format,
            },
        });
        let present = |doc: &serde_json::Value| {
            doc["manifests"]
                .as_array()
                .is_some_and(|m| m.iter().any(|e| e["digest"] == entry["digest"]))
        };
        let mut last = String::new();
        for attempt in 0..5u64 {
            let mut entries: Vec<serde_json::Value> = match source.manifest_document(&tag) {
                Ok((bytes, _)) => serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|d| d["manifests"].as_array().cloned())
                    .unwrap_or_default(),
                Err(e) if e.kind() == ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(e),
            };
            entries.retain(|e| {
                e["digest"] != entry["digest"]
                    && e["annotations"][KEY_ANNOTATION] != entry["annotations"][KEY_ANNOTATION]
            });
            entries.push(entry.clone());
            entries.sort_by(|a, b| a["digest"].as_str().cmp(&b["digest"].as_str()));
            let index = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": strata_oci::manifest::OCI_INDEX,
                "manifests": entries,
            });
            let bytes = serde_json::to_vec(&index).expect("JSON values encode");
            pusher.put_manifest(&tag, strata_oci::manifest::OCI_INDEX, &bytes)?;
            match source.manifest_document(&tag) {
                Ok((b, _)) if serde_json::from_slice(&b).is_ok_and(|d| present(&d)) => {
                    return Ok(());
                }
                Ok(_) => last = "another writer replaced it".into(),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(std::time::Duration::from_millis(50 * (attempt + 1)));
        }
        Err(strata_oci::OciError::Format {
            what: format!("writing the referrers index {tag}"),
            reason: format!("the entry did not stick after 5 writes: {last}"),
        })
    }

    /// `prefetch: optimize`: mount `image` (the first conversion, in the
    /// registry) lazily with its reads recorded, run the command in a
    /// chroot of it (no network, its own mount and pid namespaces, the
    /// config's environment) until it exits or its time is up, unmount,
    /// and answer the paths read in first-read order.
    fn record(
        &self,
        job: &Job,
        image: &ImageRef,
        optimize: &crate::jobs::Optimize,
        ctl: Ctl<'_>,
    ) -> Result<Vec<String>, Failure> {
        let config = self
            .store
            .image_config(&job.source.manifest_digest)
            .unwrap_or_default();
        let (image_cmd, env) = strata_lazy::record::command_of(&config);
        let cmd = if optimize.cmd.is_empty() {
            image_cmd
        } else {
            optimize.cmd.clone()
        };
        let staging = tempfile::Builder::new()
            .prefix("optimize-")
            .tempdir_in(self.store.root().join("tmp"))
            .map_err(|e| fail("optimize-failed", &e))?;
        let source: Arc<dyn strata_oci::ImageSource> = Arc::new(
            RegistrySource::new(image.clone(), &self.registry)
                .map_err(|e| fail("optimize-failed", &e))?,
        );
        let r = strata_lazy::record::run_and_record(
            self.store.clone(),
            source,
            &format!("serve/{}-record", job.id),
            staging.path(),
            &cmd,
            &env,
            std::time::Duration::from_secs(optimize.timeout_s),
            strata_oci::pull::PullOptions::host(self.registry.clone()),
            ctl,
        )
        .map_err(|e| fail("optimize-failed", &e))?;
        tracing::info!(
            "job {}: ran {cmd:?} to record its reads: {}; stderr: {:?}",
            job.id,
            r.ended,
            r.stderr_tail
        );
        Ok(r.paths)
    }

    /// The job's source image in the store: pulled by digest unless the
    /// store has it (named `serve/<job id>` until the job expires).
    fn ensure_source(&self, job: &Job, ctl: Ctl<'_>) -> Result<(), Failure> {
        self.ensure_image(&job.source, &format!("serve/{}", job.id), ctl)
    }

    /// `source`'s image in the store, pulled by digest as `name` unless
    /// the store has it.
    fn ensure_image(
        &self,
        source: &crate::jobs::Source,
        name: &str,
        ctl: Ctl<'_>,
    ) -> Result<(), Failure> {
        let src = source.manifest_digest;
        if self.store.image_meta(&src).is_ok() {
            return Ok(());
        }
        let pinned: ImageRef = format!("docker://{}@{src}", source.repository)
            .parse()
            .map_err(|e| fail("source-unavailable", &e))?;
        self.timed("pulling", || {
            let source = RegistrySource::new(pinned, &self.registry)
                .map_err(|e| fail("source-unavailable", &e))?;
            let opts = strata_oci::pull::PullOptions::host(self.registry.clone());
            strata_oci::pull::pull_from(&self.store, &source, name, &opts, ctl)
                .map(|_| ())
                .map_err(|e| fail("source-unavailable", &e))
        })
    }

    /// Build (or find in the build cache) the template, check it (e2fsck,
    /// size, the image's tree), push it if asked (last).
    fn template_pipeline(
        &self,
        job: &Job,
        ctl: Ctl<'_>,
    ) -> Result<(JobResult, strata_oci::verify::VerifyReport), Failure> {
        let spec = job.template.as_ref().expect("a template job has its spec");
        self.counters
            .templates_started
            .fetch_add(1, Ordering::Relaxed);
        let from_image = spec.from == "image";
        let from = job.source.manifest_digest.to_string();
        let source = if from_image {
            self.ensure_source(job, ctl)?;
            strata_block::Source::Image(from)
        } else {
            strata_block::Source::Template(from)
        };
        // images laid over it: their trees exported as the directories a
        // build lays (the build key digests them)
        let staging = tempfile::Builder::new()
            .prefix("template-adds-")
            .tempdir_in(self.store.root().join("tmp"))
            .map_err(|e| fail("internal", &e))?;
        let mut adds = Vec::new();
        for (i, a) in spec.add.iter().enumerate() {
            self.ensure_image(a, &format!("serve/{}-add-{i}", job.id), ctl)?;
            let dir = staging.path().join(format!("add-{i}"));
            self.store
                .export_dir(&a.manifest_digest, &dir)
                .map_err(|e| Failure::Failed {
                    error: Box::new(JobError {
                        code: "build-failed".into(),
                        check: None,
                        kind: "internal".into(),
                        message: format!(
                            "exporting {} to lay it over the template: {e}",
                            a.reference
                        ),
                    }),
                    report: None,
                })?;
            adds.push(dir);
        }
        self.set_phase(&job.id, "building");
        let req = strata_block::BuildRequest {
            source,
            size: Some(spec.size),
            adds: adds.clone(),
            no_cache: false,
        };
        let built = self
            .timed("building", || strata_block::build(&self.store, &req, ctl))
            .map_err(|e| fail("build-failed", &e))?;
        self.store
            .set_template_name(&format!("serve/{}", job.id), &built.id)
            .map_err(|e| fail("internal", &e))?;

        self.set_verifying(&job.id);
        let t0 = std::time::Instant::now();
        let image = from_image.then_some(&job.source.manifest_digest);
        let checks = self
            .timed("verifying", || {
                strata_block::check::verify_template(&self.store, &built.id, image, &adds, ctl)
            })
            .map_err(|e| fail("verification-failed", &e))?;
        let report = strata_oci::verify::VerifyReport {
            ok: checks.iter().all(|c| c.ok),
            checks: checks
                .into_iter()
                .map(|c| strata_oci::verify::CheckResult {
                    name: c.name.to_string(),
                    ok: c.ok,
                    seconds: c.seconds,
                    detail: Some(c.detail),
                })
                .collect(),
            seconds: t0.elapsed().as_secs_f64(),
        };
        if let Some(c) = report.failed() {
            return Err(Failure::Failed {
                error: Box::new(JobError {
                    code: "verification-failed".into(),
                    check: Some(c.name.clone()),
                    kind: "invalid_input".into(),
                    message: format!("{}: {}", c.name, c.detail.clone().unwrap_or_default()),
                }),
                report: Some(Box::new(report)),
            });
        }

        let mut reference = format!("template:{}", built.id);
        let mut tags = Vec::new();
        if let Some(push) = &spec.push {
            self.begin_tagging(&job.id, ctl)?;
            self.set_phase(&job.id, "pushing");
            let target: ImageRef = format!("docker://{push}")
                .parse()
                .map_err(|e| fail("push-failed", &e))?;
            let pushed = self
                .timed("pushing", || {
                    strata_block::artifact::push(
                        &self.store,
                        &built.id,
                        &target,
                        &self.registry,
                        4,
                        ctl,
                    )
                })
                .map_err(|e| fail("push-failed", &e))?;
            reference = format!("{}@{}", target_repository(&target), pushed.manifest_digest);
            if let ImageRef::Docker { tag: Some(t), .. } = &target {
                tags.push(t.clone());
            }
        }
        Ok((
            JobResult {
                digest: built.id,
                reference,
                tags,
                layers: serde_json::to_value(&built).unwrap_or_default(),
                cache: if built.cached { "local" } else { "none" }.into(),
                recorded: Vec::new(),
            },
            report,
        ))
    }

    /// The job is being verified (journaled).
    fn set_verifying(&self, id: &str) {
        self.update(id, |j| {
            j.state = State::Verifying;
            j.progress = Progress {
                phase: "verifying".into(),
                ..Progress::default()
            };
        });
    }

    /// From here on the job writes tags (or pushes): a cancel asked
    /// before this ends it, one asked after is too late.
    fn begin_tagging(&self, id: &str, ctl: Ctl<'_>) -> Result<(), Failure> {
        let mut t = self.lock();
        if ctl.cancel.is_cancelled() {
            return Err(Failure::Cancelled);
        }
        t.tagging.insert(id.to_string());
        Ok(())
    }

    fn set_phase(&self, id: &str, phase: &str) {
        let mut t = self.lock();
        if let Some(j) = t.jobs.get_mut(id) {
            j.progress = Progress {
                phase: phase.into(),
                layers_total: j.progress.layers_total,
                ..Progress::default()
            };
        }
    }

    /// A conversion done before (by this instance or another) found in the
    /// registry under its deterministic tag: its manifest names this key
    /// and the source as its subject. Its verification is not repeated.
    pub fn registry_hit(&self, template: &Job) -> Option<Job> {
        let target: ImageRef = format!("docker://{}", template.request.target)
            .parse()
            .ok()?;
        let repo = target_repository(&target);
        let tag = crate::jobs::deterministic_tag(
            &template.source.manifest_digest,
            &template.request.format,
            &template.key,
        );
        let r: ImageRef = format!("docker://{repo}:{tag}").parse().ok()?;
        let resolved = RegistrySource::new(r, &self.registry)
            .ok()?
            .resolve(&Platform::host_default())
            .ok()?;
        let doc: serde_json::Value = serde_json::from_slice(&resolved.manifest_bytes).ok()?;
        let subject = doc.pointer("/subject/digest").and_then(|v| v.as_str());
        let key = doc
            .pointer(&format!(
                "/annotations/{}",
                KEY_ANNOTATION.replace('/', "~1")
            ))
            .and_then(|v| v.as_str());
        if subject != Some(&template.source.manifest_digest.to_string())
            || key != Some(&template.key)
        {
            return None;
        }
        self.counters.registry_hits.fetch_add(1, Ordering::Relaxed);
        let mut job = template.clone();
        job.state = State::Succeeded;
        job.progress.phase = "done".into();
        let mut tags = vec![tag];
        if let ImageRef::Docker { tag: Some(t), .. } = &target {
            tags.push(t.clone());
        }
        job.result = Some(JobResult {
            digest: resolved.manifest_digest,
            reference: format!("{repo}@{}", resolved.manifest_digest),
            tags,
            layers: serde_json::Value::Null,
            cache: "registry".into(),
            recorded: Vec::new(),
        });
        Some(job)
    }
}

/// `HOST/REPO` of a docker reference.
pub fn target_repository(r: &ImageRef) -> String {
    match r {
        ImageRef::Docker {
            registry,
            repository,
            ..
        } => format!("{registry}/{repository}"),
        other => other.to_string(),
    }
}

/// How a pipeline ended short of success.
enum Failure {
    Cancelled,
    Failed {
        error: Box<JobError>,
        report: Option<Box<strata_oci::verify::VerifyReport>>,
    },
}

fn fail<E: HasKind + std::error::Error>(code: &str, e: &E) -> Failure {
    if e.kind() == ErrorKind::Cancelled {
        return Failure::Cancelled;
    }
    let mut message = e.to_string();
    let mut s = e.source();
    while let Some(c) = s {
        message.push_str(": ");
        message.push_str(&c.to_string());
        s = c.source();
    }
    let kind = serde_json::to_value(e.kind())
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "internal".into());
    // a push refused by the registry is a push failure, whatever step
    let code = if code == "convert-failed"
        && matches!(
            e.kind(),
            ErrorKind::Unavailable | ErrorKind::Denied | ErrorKind::Unauthorized
        ) {
        "push-failed"
    } else {
        code
    };
    Failure::Failed {
        error: Box::new(JobError {
            code: code.into(),
            check: None,
            kind,
            message,
        }),
        report: None,
    }
}

/// Folds a job's events into its progress (no history kept).
struct JobSink<'a> {
    shared: &'a Shared,
    id: &'a str,
    units: Mutex<HashMap<String, u64>>,
}

impl EventSink for JobSink<'_> {
    fn event(&self, e: &Event) {
        let mut units = self.units.lock().unwrap_or_else(|e| e.into_inner());
        let mut t = self.shared.lock();
        let Some(j) = t.jobs.get_mut(self.id) else {
            return;
        };
        let p = &mut j.progress;
        match e {
            Event::Started { op, .. } => {
                units.clear();
                p.phase = match op {
                    Op::Pull => "pulling",
                    Op::Convert => "converting",
                    Op::Verify => "verifying",
                    _ => p.phase.as_str(),
                }
                .to_string();
                p.layers_done = 0;
                p.bytes_done = 0;
            }
            Event::Resolved { layers, .. } => p.layers_total = Some(*layers as u64),
            Event::Progress { unit, done, .. } => {
                units.insert(format!("{unit:?}"), *done);
                p.bytes_done = units.values().sum();
            }
            Event::UnitDone { .. } => p.layers_done += 1,
            Event::Warning { warning, .. } => {
                let w = warning.to_string();
                if !j.warnings.contains(&w) && j.warnings.len() < 64 {
                    j.warnings.push(w);
                }
            }
            _ => {}
        }
    }
}
