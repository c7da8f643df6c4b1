//! Jobs: what a conversion job is, its key, and its durable record.
//!
//! Every state change is journaled before it is answered: the record is
//! written to `tmp/`, fsynced, renamed over `jobs/<id>.json` and the
//! directory fsynced, so a crash leaves the old record or the new one,
//! never a torn one (a torn write is only ever a `tmp/` file, discarded at
//! start). A record that does not parse is moved to `corrupt/` and the
//! others load.

use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use strata_digest::Digest;
use strata_oci::verify::VerifyReport;

/// A job's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Admitted, waiting for a worker.
    Queued,
    /// Pulling the source, converting, pushing (see `progress.phase`).
    Running,
    /// Reading the result back from the registry and checking it.
    Verifying,
    /// Verified and tagged.
    Succeeded,
    /// Failed (see `error`); nothing was tagged.
    Failed,
    /// Cancelled; nothing was tagged.
    Cancelled,
}

impl State {
    /// Whether the job is over.
    pub fn terminal(self) -> bool {
        matches!(self, State::Succeeded | State::Failed | State::Cancelled)
    }

    /// The name used in JSON and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Verifying => "verifying",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
        }
    }

    /// Every state, for metrics.
    pub const ALL: [State; 6] = [
        State::Queued,
        State::Running,
        State::Verifying,
        State::Succeeded,
        State::Failed,
        State::Cancelled,
    ];
}

/// The image a job converts.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Source {
    /// The reference as given.
    pub reference: String,
    /// `HOST/REPO`.
    pub repository: String,
    /// What the reference named at admission (an index or a manifest).
    #[schema(value_type = String)]
    pub digest: Digest,
    /// The platform manifest converted.
    #[schema(value_type = String)]
    pub manifest_digest: Digest,
}

/// Prefetch mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Prefetch {
    /// No list: a lazy mount fetches files on first read.
    None,
    /// `prefetch_list` placed first.
    List,
    /// A list recorded by running the image (its entrypoint and cmd, or
    /// `optimize.cmd`) over a lazy mount of a first conversion, then
    /// placed first in a second one.
    Optimize,
}

/// What was asked, canonical.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Request {
    /// `zstd:chunked` or `zstd`.
    pub format: String,
    /// Prefetch mode.
    pub prefetch: Prefetch,
    /// Paths placed first (`prefetch: list`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefetch_list: Vec<String>,
    /// `HOST/REPO[:TAG]`: where the result goes (the source's repository
    /// when not given); a tag here is written last, after verification.
    pub target: String,
    /// How to run the image to record what it reads (`prefetch:
    /// optimize`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optimize: Option<Optimize>,
}

/// How `prefetch: optimize` runs the image: in a chroot of a lazy mount,
/// with no network, in its own mount and pid namespaces, with the
/// config's environment, until it exits or `timeout_s` passes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Optimize {
    /// The command; the config's entrypoint and cmd when empty.
    #[serde(default)]
    pub cmd: Vec<String>,
    /// Seconds it may run (1-600).
    pub timeout_s: u64,
}

/// Progress, from the library's events.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Progress {
    /// `queued`, `pulling`, `converting`, `verifying`, `tagging`, `done`.
    pub phase: String,
    /// Layers finished in this phase.
    pub layers_done: u64,
    /// Layers in the image, once known.
    pub layers_total: Option<u64>,
    /// Bytes done in this phase.
    pub bytes_done: u64,
}

/// A succeeded job's result.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobResult {
    /// The converted manifest's digest.
    #[schema(value_type = String)]
    pub digest: Digest,
    /// `HOST/REPO@DIGEST`: what to deploy.
    pub reference: String,
    /// Tags written, after verification.
    pub tags: Vec<String>,
    /// Per layer (the library's `LayerOutcome`s).
    #[schema(value_type = Object)]
    pub layers: serde_json::Value,
    /// `none` (converted now) or `registry` (found converted and verified
    /// in the registry, by its deterministic tag).
    pub cache: String,
    /// `prefetch: optimize`: the paths the image read, in first-read
    /// order, placed first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recorded: Vec<String>,
}

/// Why a job failed.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobError {
    /// Stable code: `source-unavailable`, `convert-failed`,
    /// `push-failed`, `verification-failed`, `tag-failed`,
    /// `too-many-restarts`, `internal`.
    pub code: String,
    /// The verification check that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<String>,
    /// The error kind (`not_found`, `digest_mismatch`, `unavailable`, ...).
    pub kind: String,
    /// What went wrong.
    pub message: String,
}

/// A template job's request (`POST /v1/templates`).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TemplateSpec {
    /// `image` (the job's `source` is the image) or `template` (its
    /// `source` is that template: its id as the digests).
    pub from: String,
    /// Size in bytes.
    pub size: u64,
    /// `HOST/REPO:TAG` the template is pushed to once checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<String>,
    /// Images whose trees are laid over it, in order (the last wins), as
    /// `rootfs build --add DIR` lays directories.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<Source>,
}

/// A job (a conversion or a template build), as answered and as journaled.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Job {
    /// `c-<key hex[..20]>-<attempt>` (`t-` for templates).
    pub id: String,
    /// `conversion` or `template`.
    pub kind: String,
    /// State.
    pub state: State,
    /// `sha256:` of the canonical request (source manifest, format,
    /// options, converter version).
    pub key: String,
    /// The source.
    pub source: Source,
    /// The request.
    pub request: Request,
    /// Progress.
    pub progress: Progress,
    /// The result, once succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<JobResult>,
    /// The verification report, once verified (or failed verifying).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub verification: Option<VerifyReport>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    /// Things to know (`format-deprecated`, layers written as plain zstd).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Which submission of this key this is (1, 2, ... after failures or
    /// cancels).
    pub attempt: u32,
    /// Times it was started (more than 1 after restarts of the service).
    pub runs: u32,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds.
    pub updated: u64,
    /// A cancel was asked while it ran.
    #[serde(default)]
    pub cancel_requested: bool,
    /// A template build's request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<TemplateSpec>,
}

impl Job {
    /// A new job, queued: its first attempt, created now.
    pub fn queued(
        kind: &str,
        key: String,
        source: Source,
        request: Request,
        template: Option<TemplateSpec>,
    ) -> Job {
        let now = now();
        Job {
            id: job_id(kind, &key, 1),
            kind: kind.into(),
            state: State::Queued,
            key,
            source,
            request,
            progress: Progress {
                phase: "queued".into(),
                ..Progress::default()
            },
            result: None,
            verification: None,
            error: None,
            warnings: Vec::new(),
            attempt: 1,
            runs: 0,
            created: now,
            updated: now,
            cancel_requested: false,
            template,
        }
    }
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The job key: SHA-256 of the canonical JSON (sorted keys) of what
/// decides the result's bytes.
pub fn key(source_manifest: &Digest, req: &Request) -> String {
    let canonical = serde_json::json!({
        "v": 1,
        "converter": strata_oci::convert::CONVERTER_VERSION,
        "source": source_manifest.to_string(),
        "format": req.format,
        "level": 3,
        "prefetch": req.prefetch,
        "prefetch_list": req.prefetch_list,
        "target": req.target,
        "optimize": req.optimize,
    });
    let bytes = serde_json::to_vec(&canonical).expect("JSON values encode");
    format!("sha256:{}", hex::encode(Sha256::digest(&bytes)))
}

/// The key of a template build from `from` (an image's manifest digest
/// or a template id).
pub fn template_key(from: &Digest, spec: &TemplateSpec) -> String {
    let canonical = serde_json::json!({
        "v": 1,
        "builder": strata_block::BUILDER_VERSION,
        "from": spec.from,
        "source": from.to_string(),
        "size": spec.size,
        "push": spec.push,
        "add": spec.add.iter().map(|a| a.manifest_digest.to_string()).collect::<Vec<_>>(),
    });
    let bytes = serde_json::to_vec(&canonical).expect("JSON values encode");
    format!("sha256:{}", hex::encode(Sha256::digest(&bytes)))
}

/// The id of a `kind` job's `attempt`th submission of `key`.
pub fn job_id(kind: &str, key: &str, attempt: u32) -> String {
    let hex = key.trim_start_matches("sha256:");
    let p = if kind == "template" { 't' } else { 'c' };
    format!("{p}-{}-{attempt}", &hex[..20])
}

/// The tag a result is also written under, derived from the source and
/// the key alone: a second instance finds a conversion done by the first
/// through it.
pub fn deterministic_tag(source_manifest: &Digest, format: &str, key: &str) -> String {
    let slug: String = format
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let k = key.trim_start_matches("sha256:");
    format!(
        "sha256-{}.strata.{slug}.{}",
        source_manifest.hex(),
        &k[..12]
    )
}

/// The journal: `jobs/`, `tmp/`, `corrupt/` under the state dir.
pub struct Journal {
    dir: PathBuf,
}

impl Journal {
    /// Open (create) the journal in `dir`; leftovers in `tmp/` are
    /// removed.
    pub fn open(dir: &Path) -> io::Result<Journal> {
        for d in ["jobs", "tmp", "corrupt"] {
            fs::create_dir_all(dir.join(d))?;
        }
        for e in fs::read_dir(dir.join("tmp"))?.flatten() {
            let _ = fs::remove_file(e.path());
        }
        Ok(Journal {
            dir: dir.to_path_buf(),
        })
    }

    /// Write `job`'s record durably.
    pub fn save(&self, job: &Job) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(job).map_err(io::Error::other)?;
        let tmp = self.dir.join("tmp").join(format!("{}.json", job.id));
        let dst = self.dir.join("jobs").join(format!("{}.json", job.id));
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &dst)?;
        fs::File::open(self.dir.join("jobs"))?.sync_all()
    }

    /// Remove job `id`'s record.
    pub fn remove(&self, id: &str) -> io::Result<()> {
        match fs::remove_file(self.dir.join("jobs").join(format!("{id}.json"))) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Every record, oldest first. Records that do not parse are moved to
    /// `corrupt/` (logged), the others load.
    pub fn load(&self) -> io::Result<Vec<Job>> {
        let mut jobs = Vec::new();
        for e in fs::read_dir(self.dir.join("jobs"))?.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let parsed = fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Job>(&b).map_err(|e| e.to_string()));
            match parsed {
                Ok(j) if p.file_stem().and_then(|s| s.to_str()) == Some(j.id.as_str()) => {
                    jobs.push(j)
                }
                r => {
                    let why = r.err().unwrap_or_else(|| "its id is not its name".into());
                    let to = self.dir.join("corrupt").join(e.file_name());
                    tracing::warn!(
                        "job record {} does not parse ({why}): moved to {}",
                        p.display(),
                        to.display()
                    );
                    fs::rename(&p, &to)?;
                }
            }
        }
        jobs.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        Ok(jobs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(format: &str) -> Request {
        Request {
            format: format.into(),
            prefetch: Prefetch::None,
            prefetch_list: Vec::new(),
            target: "127.0.0.1:5000/app".into(),
            optimize: None,
        }
    }

    #[test]
    fn the_key_changes_with_every_input_that_changes_the_result() {
        let d = Digest::sha256_of(b"m");
        let base = key(&d, &request("zstd:chunked"));
        assert_eq!(base, key(&d, &request("zstd:chunked")));
        assert_ne!(
            base,
            key(&Digest::sha256_of(b"n"), &request("zstd:chunked"))
        );
        assert_ne!(base, key(&d, &request("zstd")));
        let mut r = request("zstd:chunked");
        r.prefetch = Prefetch::List;
        r.prefetch_list = vec!["/a".into(), "/b".into()];
        let ab = key(&d, &r);
        r.prefetch_list = vec!["/b".into(), "/a".into()];
        assert_ne!(ab, key(&d, &r), "the order places files");
        let t = deterministic_tag(&d, "zstd:chunked", &base);
        assert!(t.len() <= 128, "{t}");
        assert!(t.starts_with(&format!("sha256-{}.strata.zstd-chunked.", d.hex())));
        assert_eq!(job_id("conversion", &base, 2).len(), "c-".len() + 20 + 2);
        assert!(job_id("template", &base, 1).starts_with("t-"));
        let spec = |size| TemplateSpec {
            from: "image".into(),
            size,
            push: None,
            add: Vec::new(),
        };
        assert_eq!(
            template_key(&d, &spec(1 << 26)),
            template_key(&d, &spec(1 << 26))
        );
        assert_ne!(
            template_key(&d, &spec(1 << 26)),
            template_key(&d, &spec(1 << 27))
        );
    }

    #[test]
    fn a_torn_or_garbage_record_is_set_aside_and_the_rest_load() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let d = Digest::sha256_of(b"m");
        let k = key(&d, &request("zstd"));
        let source = Source {
            reference: "127.0.0.1:5000/app:1".into(),
            repository: "127.0.0.1:5000/app".into(),
            digest: d,
            manifest_digest: d,
        };
        let job = Job::queued("conversion", k, source, request("zstd"), None);
        j.save(&job).unwrap();
        std::fs::write(dir.path().join("jobs/y.json"), b"{\"id\": \"y\", tor").unwrap();
        std::fs::write(dir.path().join("tmp/x.json"), b"half").unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let loaded = j.load().unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].id, job.id);
        assert!(dir.path().join("corrupt/y.json").exists());
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0
        );
    }
}
