//! Recording what an image reads when it runs: a lazy mount with its
//! reads recorded, the command run in a chroot of it (no network, its
//! own mount and pid namespaces, only the given environment) until it
//! exits or its time is up, then the paths read in first-read order: the
//! prefetch list a conversion places first.
//!
//! The command is the image's own code, run as root: the namespaces and
//! the chroot contain accidents, they are no boundary against a hostile
//! image. Callers decide whether to allow it.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_oci::ImageSource;
use strata_oci::pull::PullOptions;
use strata_ops::{Ctl, ErrorKind, HasKind};
use strata_store::Store;

use crate::LazyError;
use crate::mount::{Fallback, LazyOptions, Mounted, Prefetch, mount};

/// The default `PATH` for an image that sets none (docker's and podman's).
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What a recorded run gave.
#[derive(Debug, Clone)]
pub struct Recording {
    /// The paths read, in first-read order.
    pub paths: Vec<String>,
    /// How the command ended (`exited: ...`, `stopped after N s`).
    pub ended: String,
    /// The end of what it wrote to stderr (at most 2 KiB).
    pub stderr_tail: String,
}

/// Why nothing was recorded.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The lazy mount could not be made.
    #[error(transparent)]
    Lazy(#[from] LazyError),
    /// The image is not lazy (it was in the store, or pulled in full).
    #[error("{0} was not mounted lazily, so nothing could be recorded")]
    NotLazy(String),
    /// Nothing to run.
    #[error("the image has no entrypoint or cmd to run: give a command")]
    NoCommand,
    /// The sandbox could not run.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The cancel fired.
    #[error("cancelled")]
    Cancelled,
}

impl HasKind for RecordError {
    fn kind(&self) -> ErrorKind {
        match self {
            RecordError::Lazy(e) => e.kind(),
            RecordError::NotLazy(_) | RecordError::NoCommand => ErrorKind::InvalidInput,
            RecordError::Io { source, .. } => ErrorKind::of_io(source),
            RecordError::Cancelled => ErrorKind::Cancelled,
        }
    }
}

/// The command and environment an image's config runs: `Entrypoint` then
/// `Cmd`, and `Env` with [`DEFAULT_PATH`] when it sets no `PATH`.
pub fn command_of(config: &[u8]) -> (Vec<String>, Vec<String>) {
    let config: serde_json::Value = serde_json::from_slice(config).unwrap_or_default();
    let words = |k: &str| -> Vec<String> {
        config["config"][k]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut cmd = words("Entrypoint");
    cmd.extend(words("Cmd"));
    let mut env = words("Env");
    if !env.iter().any(|kv| kv.starts_with("PATH=")) {
        env.push(DEFAULT_PATH.into());
    }
    (cmd, env)
}

/// Mount `source` lazily (its files fetched on first read) in `staging`
/// (an empty directory of the caller's; named `name` in the store while
/// mounted), run `cmd` with `env` in a chroot of it for at most
/// `timeout`, unmount, and answer what it read.
#[allow(clippy::too_many_arguments)]
pub fn run_and_record(
    store: Arc<Store>,
    source: Arc<dyn ImageSource>,
    name: &str,
    staging: &Path,
    cmd: &[String],
    env: &[String],
    timeout: Duration,
    pull: PullOptions,
    ctl: Ctl<'_>,
) -> Result<Recording, RecordError> {
    if cmd.is_empty() {
        return Err(RecordError::NoCommand);
    }
    let io = |what: String| move |source| RecordError::Io { what, source };
    let (mnt, list, errors) = (
        staging.join("mnt"),
        staging.join("record"),
        staging.join("stderr"),
    );
    std::fs::create_dir(&mnt).map_err(io(format!("creating {}", mnt.display())))?;
    let opts = LazyOptions {
        fallback: Fallback::Fail,
        prefetch: Prefetch::None,
        prefetch_list: None,
        record: Some(list.clone()),
        passthrough: false,
        fetch_jobs: 4,
        pull,
    };
    let what = source.describe();
    let mounted = mount(
        store.clone(),
        source,
        name,
        &mnt,
        &opts,
        Arc::new(strata_ops::NoEvents),
    );
    let _ = store.remove_ref(name);
    let Mounted::Lazy(m) = mounted? else {
        return Err(RecordError::NotLazy(what));
    };
    let ended = run_sandboxed(&mnt, cmd, env, timeout, &errors, ctl);
    // the record is written as it unmounts
    m.unmount()?;
    let ended = ended?;
    let said = std::fs::read(&errors).unwrap_or_default();
    let stderr_tail =
        String::from_utf8_lossy(&said[said.len().saturating_sub(2048)..]).into_owned();
    let text = std::fs::read_to_string(&list)
        .map_err(io(format!("reading the record {}", list.display())))?;
    Ok(Recording {
        paths: strata_oci::convert::prefetch_paths(&text),
        ended,
        stderr_tail,
    })
}

/// Run `cmd` in a chroot of `root` with only `env`, no network, its own
/// mount and pid namespaces (everything in them dies with it), until it
/// exits, `timeout` passes or the cancel fires. Its output is dropped,
/// its errors go to `stderr`. Answers how it ended.
fn run_sandboxed(
    root: &Path,
    cmd: &[String],
    env: &[String],
    timeout: Duration,
    stderr: &Path,
    ctl: Ctl<'_>,
) -> Result<String, RecordError> {
    let errors = std::fs::File::create(stderr).map_err(|source| RecordError::Io {
        what: format!("creating {}", stderr.display()),
        source,
    })?;
    let mut c = std::process::Command::new("/usr/bin/unshare");
    // absolute: the PATH given is the image's, for inside the chroot
    c.args([
        "--net",
        "--mount",
        "--pid",
        "--fork",
        "--kill-child",
        "/usr/sbin/chroot",
    ])
    .arg(root)
    .args(cmd)
    .env_clear()
    .stdin(std::process::Stdio::null())
    .stdout(std::process::Stdio::null())
    .stderr(errors);
    for kv in env {
        if let Some((k, v)) = kv.split_once('=') {
            c.env(k, v);
        }
    }
    let mut child = c.spawn().map_err(|source| RecordError::Io {
        what: "running /usr/bin/unshare (util-linux)".into(),
        source,
    })?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().map_err(|source| RecordError::Io {
            what: "waiting for the recorded command".into(),
            source,
        })? {
            return Ok(format!("exited: {st}"));
        }
        if Instant::now() >= deadline || ctl.cancel.is_cancelled() {
            let _ = child.kill();
            let _ = child.wait();
            if ctl.cancel.is_cancelled() {
                return Err(RecordError::Cancelled);
            }
            return Ok(format!("stopped after {} s", timeout.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_is_entrypoint_then_cmd_and_path_has_a_default() {
        let (cmd, env) = command_of(
            br#"{"config":{"Entrypoint":["/bin/sh","-c"],"Cmd":["echo hi"],"Env":["A=1"]}}"#,
        );
        assert_eq!(cmd, ["/bin/sh", "-c", "echo hi"]);
        assert_eq!(env, ["A=1", DEFAULT_PATH]);
        let (cmd, env) = command_of(br#"{"config":{"Env":["PATH=/x"]}}"#);
        assert!(cmd.is_empty());
        assert_eq!(env, ["PATH=/x"]);
        assert_eq!(command_of(b"not json").1, [DEFAULT_PATH]);
    }
}
