//! Daemons: the one place that knows how a strata command becomes a
//! background process and how it is stopped.
//!
//! ```text
//! caller                                  daemon (same binary, same args + extra)
//!   spawn_self(extra, log) ─ fork/exec ──▶ own process group, stdin /dev/null,
//!                                          stderr appended to `log`
//!   reads one line from the pipe ◀──────── notify(line) once serving (or failed)
//!   (spawn + Daemon::said: stages first) ◀─ report_stage(stage), when asked
//!   returns Spawned { pid, line }          keeps running; stdout closed
//! ```
//!
//! The line is a JSON object: a [`Report`] (`message`, `notes`, the
//! daemon's own fields) from [`report_ready`], or `{"error": ...}` from
//! [`report_failed`]; [`start_and_wait`] reads it into a [`Started`] or a
//! [`DaemonError::Failed`].
//!
//! A daemon can also be started ahead of its work ([`spawn_spare`]): it
//! gets ready (its memory made, see [`crate::malloc::prefault`]) and
//! waits on its stdin for the command line it is to run and its log
//! ([`wait_for_work`]); [`Spare::start`] hands them over and returns the
//! same [`Daemon`] a [`spawn`] gives. A spare whose parent goes away
//! reads the end of its stdin and exits.
//!
//! A daemon that exits before it reports is an error naming its exit
//! status and its log. [`stop`] waits for a daemon to end by itself (its
//! mount was taken away) and kills it when it does not.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Set in a daemon's environment: it reports readiness with [`notify`].
pub const NOTIFY_ENV: &str = "STRATA_DAEMON_NOTIFY";

/// A daemon that reported.
#[derive(Debug)]
pub struct Spawned {
    /// Its pid.
    pub pid: u32,
    /// The line it reported (without the newline).
    pub line: String,
    /// Its log file.
    pub log: PathBuf,
}

/// Why a daemon could not be started.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Setting up or starting it failed.
    #[error("starting the {what} daemon: {step}: {source}")]
    Start {
        /// Which daemon.
        what: String,
        /// What was being done.
        step: String,
        /// The failure.
        source: std::io::Error,
    },
    /// It ended before it said it was ready.
    #[error("the {what} daemon exited ({status}) before it was ready; see {}", log.display())]
    Exited {
        /// Which daemon.
        what: String,
        /// How it ended.
        status: String,
        /// Its log.
        log: PathBuf,
    },
    /// It reported that it could not start.
    #[error("{error}")]
    Failed {
        /// Which daemon.
        what: String,
        /// Its error, with its causes.
        error: String,
    },
    /// It reported something that is no report.
    #[error("the {what} daemon reported {line:?}; see {}", log.display())]
    BadReport {
        /// Which daemon.
        what: String,
        /// What it said.
        line: String,
        /// Its log.
        log: PathBuf,
    },
}

/// What a daemon reports once ready: a JSON object with `message` (one
/// line for people), `notes` (warnings for people) and its own fields.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(transparent)]
pub struct Report(serde_json::Value);

impl Report {
    /// The report of `v` (a struct or object with `message` and maybe
    /// `notes`).
    pub fn new(v: &impl serde::Serialize) -> Report {
        Report(serde_json::to_value(v).unwrap_or_default())
    }

    /// Its line for people (`started` when it has none).
    pub fn message(&self) -> &str {
        self.0["message"].as_str().unwrap_or("started")
    }

    /// Its warnings for people.
    pub fn notes(&self) -> impl Iterator<Item = &str> {
        let notes = self.0.get("notes").and_then(|n| n.as_array());
        notes.into_iter().flatten().filter_map(|n| n.as_str())
    }

    /// All of it, as JSON.
    pub fn json(&self) -> &serde_json::Value {
        &self.0
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

/// A daemon that reported it is ready.
#[derive(Debug)]
pub struct Started {
    /// Its pid.
    pub pid: u32,
    /// Its log file.
    pub log: PathBuf,
    /// What it reported.
    pub report: Report,
}

/// Start this command again as a daemon (see [`spawn_self`]) and wait for
/// its report: ready, or the error it could not start with.
pub fn start_and_wait(
    what: &str,
    extra: &[&str],
    env: &[(&str, &std::ffi::OsStr)],
    log: &Path,
) -> Result<Started, DaemonError> {
    let spawned = spawn_self(what, extra, env, log)?;
    let v: serde_json::Value =
        serde_json::from_str(&spawned.line).map_err(|_| DaemonError::BadReport {
            what: what.to_string(),
            line: spawned.line.clone(),
            log: log.to_path_buf(),
        })?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(DaemonError::Failed {
            what: what.to_string(),
            error: e.to_string(),
        });
    }
    Ok(Started {
        pid: spawned.pid,
        log: spawned.log,
        report: Report(v),
    })
}

/// In a daemon, tell the waiting parent it is ready with `report` and
/// return true; elsewhere (a foreground run) return false: the caller
/// shows it.
pub fn report_ready(report: &Report) -> bool {
    if is_daemon() {
        notify(&report.0.to_string());
    }
    is_daemon()
}

/// In a daemon, tell a parent that asked for it (see [`Daemon::said`])
/// that `stage` is passed; it goes on waiting for the report.
pub fn report_stage(stage: &str) {
    if is_daemon() {
        notify(&serde_json::json!({ "stage": stage }).to_string());
    }
}

/// In a daemon, tell the waiting parent it could not start: `e` and its
/// causes, `: `-separated (the parent fails with that).
pub fn report_failed(e: &(dyn std::error::Error + 'static)) {
    if !is_daemon() {
        return;
    }
    let mut error = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        error = format!("{error}: {c}");
        cause = c.source();
    }
    notify(&serde_json::json!({ "error": error }).to_string());
}

/// Whether this process is a daemon started by [`spawn_self`] or [`spawn`].
pub fn is_daemon() -> bool {
    std::env::var_os(NOTIFY_ENV).is_some()
}

/// Report to the waiting parent (one line; a daemon reports once, after
/// the stages it was asked for).
pub fn notify(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{}", line.trim_end());
    let _ = out.flush();
}

/// Start this executable again with its own arguments plus `extra`, in its
/// own process group, stderr appended to `log`, `env` added; return once
/// it reported a line with [`notify`].
pub fn spawn_self(
    what: &str,
    extra: &[&str],
    env: &[(&str, &std::ffi::OsStr)],
    log: &Path,
) -> Result<Spawned, DaemonError> {
    let exe = std::env::current_exe().map_err(|source| DaemonError::Start {
        what: what.to_string(),
        step: "finding the executable".into(),
        source,
    })?;
    let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
    args.extend(extra.iter().map(OsString::from));
    let mut cmd = Command::new(exe);
    cmd.args(&args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut d = spawn(what, cmd, log)?;
    let line = d.line()?;
    Ok(Spawned {
        pid: d.pid,
        line,
        log: log.to_path_buf(),
    })
}

/// A daemon started by [`spawn`], until the caller has read what it
/// needs of its lines; dropping it leaves the daemon running alone (and
/// reaped once it ends: it does not linger as a zombie of the caller).
#[derive(Debug)]
pub struct Daemon {
    what: String,
    pid: u32,
    log: PathBuf,
    child: Option<std::process::Child>,
    out: BufReader<std::process::ChildStdout>,
}

/// What a daemon started by [`spawn`] said.
#[derive(Debug, Clone, PartialEq)]
pub enum Said {
    /// A stage on its way to ready ([`report_stage`]).
    Stage(String),
    /// It is ready ([`report_ready`]).
    Ready(Report),
}

/// Start `cmd` (a strata command that reports with [`notify`]) as a
/// daemon: a session of its own, stdin `/dev/null`, stderr appended to
/// `log`; read what it says with [`Daemon::said`].
pub fn spawn(what: &str, cmd: Command, log: &Path) -> Result<Daemon, DaemonError> {
    spawn_with(what, cmd, log, true)
}

fn spawn_with(
    what: &str,
    mut cmd: Command,
    log: &Path,
    no_input: bool,
) -> Result<Daemon, DaemonError> {
    let err = |step: &str, source| DaemonError::Start {
        what: what.to_string(),
        step: step.to_string(),
        source,
    };
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(&format!("creating {}", dir.display()), e))?;
    }
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| err(&format!("opening {}", log.display()), e))?;
    if no_input {
        cmd.stdin(Stdio::null());
    }
    cmd.env(NOTIFY_ENV, "1").stdout(Stdio::piped()).stderr(logf);
    // a session of its own: no terminal's hangup reaches it, nor the
    // SIGHUP the kernel sends a stopped process's group when the parent
    // (the snapshotter) dies and leaves the group orphaned
    // SAFETY: setsid is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::setsid()
                .map(drop)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = cmd.spawn().map_err(|e| err("spawning", e))?;
    let out = BufReader::new(child.stdout.take().expect("stdout is piped"));
    Ok(Daemon {
        what: what.to_string(),
        pid: child.id(),
        log: log.to_path_buf(),
        child: Some(child),
        out,
    })
}

/// A daemon started ahead of its work by [`spawn_spare`], waiting for it.
#[derive(Debug)]
pub struct Spare {
    daemon: Daemon,
    input: std::process::ChildStdin,
}

/// The most arguments, and the most bytes of one, a spare takes.
const WORK_ARGS_MAX: u32 = 256;
const WORK_ARG_BYTES_MAX: u32 = 64 * 1024;

/// Start `cmd` as [`spawn`] does, but with a pipe for its stdin: a spare
/// that waits there for its work ([`wait_for_work`]); `log` takes what it
/// says before that.
pub fn spawn_spare(what: &str, mut cmd: Command, log: &Path) -> Result<Spare, DaemonError> {
    cmd.stdin(Stdio::piped());
    let mut daemon = spawn_with(what, cmd, log, false)?;
    let input = daemon
        .child
        .as_mut()
        .and_then(|c| c.stdin.take())
        .expect("stdin is piped");
    Ok(Spare { daemon, input })
}

impl Spare {
    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.daemon.pid
    }

    /// Whether it is still waiting (it ends when it cannot start).
    pub fn alive(&mut self) -> bool {
        match self.daemon.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => alive(self.daemon.pid),
            _ => false,
        }
    }

    /// Hand it its work: `args`, the command line it runs (the program's
    /// name first, as if it had been started with them), and `log`, where
    /// its stderr goes from then on. What it says then is read from the
    /// returned [`Daemon`], as from one [`spawn`] started. Fails when it
    /// is gone.
    pub fn start(mut self, args: &[OsString], log: &Path) -> Result<Daemon, DaemonError> {
        use std::os::unix::ffi::OsStrExt;
        let mut work = Vec::new();
        let all = args.iter().map(|a| a.as_os_str()).chain([log.as_os_str()]);
        work.extend_from_slice(&(args.len() as u32 + 1).to_le_bytes());
        for a in all {
            work.extend_from_slice(&(a.len() as u32).to_le_bytes());
            work.extend_from_slice(a.as_bytes());
        }
        let handed = self
            .input
            .write_all(&work)
            .and_then(|()| self.input.flush());
        drop(self.input);
        if let Err(source) = handed {
            return Err(DaemonError::Start {
                what: self.daemon.what.clone(),
                step: format!("handing its work to the spare daemon {}", self.daemon.pid),
                source,
            });
        }
        self.daemon.log = log.to_path_buf();
        Ok(self.daemon)
    }
}

/// What a spare was handed ([`wait_for_work`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Work {
    /// The command line to run, the program's name first.
    pub args: Vec<OsString>,
}

/// In a spare ([`spawn_spare`]): wait for its work on stdin. `None` when
/// stdin ends first (the parent went away: the spare exits). Once handed
/// its work, stderr is appended to the log it names and stdin is
/// `/dev/null`, as for a daemon [`spawn`] started.
pub fn wait_for_work() -> std::io::Result<Option<Work>> {
    use std::io::Read;
    use std::os::unix::ffi::OsStringExt;
    let mut input = std::io::stdin().lock();
    let mut word = [0u8; 4];
    let mut u32_of = |input: &mut std::io::StdinLock<'_>| -> std::io::Result<Option<u32>> {
        match input.read_exact(&mut word) {
            Ok(()) => Ok(Some(u32::from_le_bytes(word))),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(e),
        }
    };
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let Some(n) = u32_of(&mut input)? else {
        return Ok(None);
    };
    if !(2..=WORK_ARGS_MAX).contains(&n) {
        return Err(bad(format!("a spare's work of {n} words")));
    }
    let mut words = Vec::new();
    for _ in 0..n {
        let len = u32_of(&mut input)?.ok_or_else(|| bad("a spare's work cut short".into()))?;
        if len > WORK_ARG_BYTES_MAX {
            return Err(bad(format!("a spare's work with a word of {len} bytes")));
        }
        let mut w = vec![0u8; len as usize];
        input.read_exact(&mut w)?;
        words.push(OsString::from_vec(w));
    }
    drop(input);
    let log = PathBuf::from(words.pop().expect("at least two words"));
    let logf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)?;
    let null = std::fs::File::open("/dev/null")?;
    use std::os::fd::AsRawFd;
    // SAFETY: dup2 onto the standard descriptors of this process, from
    // descriptors it owns (closed when they drop; the duplicates stay).
    let r = unsafe {
        (libc::dup2(logf.as_raw_fd(), libc::STDERR_FILENO) < 0
            || libc::dup2(null.as_raw_fd(), libc::STDIN_FILENO) < 0)
            .then(std::io::Error::last_os_error)
    };
    match r {
        Some(e) => Err(e),
        None => Ok(Some(Work { args: words })),
    }
}

impl Daemon {
    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its next line, as written; an error when it ended first (with its
    /// exit status and its log).
    fn line(&mut self) -> Result<String, DaemonError> {
        let mut line = String::new();
        let read = self.out.read_line(&mut line);
        if read.is_err() || line.trim().is_empty() {
            let status = match self.child.take() {
                Some(mut c) => c
                    .wait()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|e| format!("unknown: {e}")),
                None => "unknown".into(),
            };
            return Err(DaemonError::Exited {
                what: self.what.clone(),
                status,
                log: self.log.clone(),
            });
        }
        Ok(line.trim_end().to_string())
    }

    /// What it says next: a stage, or its report once ready; the error it
    /// reported, or that it ended without a word, as an error.
    pub fn said(&mut self) -> Result<Said, DaemonError> {
        let line = self.line()?;
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|_| DaemonError::BadReport {
                what: self.what.clone(),
                line: line.clone(),
                log: self.log.clone(),
            })?;
        if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
            return Err(DaemonError::Failed {
                what: self.what.clone(),
                error: e.to_string(),
            });
        }
        if let Some(s) = v.get("stage").and_then(|s| s.as_str()) {
            return Ok(Said::Stage(s.to_string()));
        }
        Ok(Said::Ready(Report(v)))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // the daemon goes on alone; one that failed exits: reap it
        if let Some(mut c) = self.child.take() {
            std::thread::spawn(move || {
                let _ = c.wait();
            });
        }
    }
}

/// Whether `pid` runs (a zombie does not).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|c| c != 'Z' && c != 'X'),
        Err(_) => false,
    }
}

/// Wait up to `grace` for `pid` to end, then kill it (SIGKILL). Returns
/// whether it had to be killed.
pub fn stop(pid: u32, grace: Duration) -> bool {
    let deadline = Instant::now() + grace;
    while alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if alive(pid)
        && let Some(p) = rustix::process::Pid::from_raw(pid as i32)
    {
        let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
        return true;
    }
    false
}

/// Wait up to `limit` for `pid` to end; whether it did.
pub fn wait_gone(pid: u32, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_has_a_message_and_notes() {
        let r = Report::new(&serde_json::json!({"message": "up", "notes": ["slow"], "x": 1}));
        assert_eq!(r.message(), "up");
        assert_eq!(r.notes().collect::<Vec<_>>(), ["slow"]);
        assert_eq!(r.to_string(), "up");
        assert_eq!(Report::new(&serde_json::json!({})).message(), "started");
    }

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn a_spawned_daemon_says_its_stages_then_its_report_or_its_error() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("logs/d.log");
        // the notify variable is set for it, stderr goes to the log
        let mut d = spawn(
            "test",
            sh(r#"echo "env=$STRATA_DAEMON_NOTIFY" >&2
                  echo '{"stage":"checked"}'; echo '{"message":"up","x":1}'; sleep 30"#),
            &log,
        )
        .unwrap();
        assert_eq!(d.said().unwrap(), Said::Stage("checked".into()));
        match d.said().unwrap() {
            Said::Ready(r) => assert_eq!((r.message(), &r.json()["x"]), ("up", &1.into())),
            other => panic!("not a report: {other:?}"),
        }
        assert!(alive(d.pid()), "it goes on after its report");
        assert!(std::fs::read_to_string(&log).unwrap().contains("env=1"));
        let pid = d.pid();
        drop(d);
        assert!(stop(pid, Duration::from_millis(10)), "killed");
        assert!(
            wait_gone(pid, Duration::from_secs(5)),
            "reaped once dropped"
        );

        let mut d = spawn(
            "test",
            sh(r#"echo '{"stage":"checked"}'; echo '{"error":"bad TOC"}'"#),
            &log,
        )
        .unwrap();
        assert_eq!(d.said().unwrap(), Said::Stage("checked".into()));
        let e = d.said().unwrap_err();
        assert!(
            matches!(&e, DaemonError::Failed { error, .. } if error == "bad TOC"),
            "{e}"
        );

        let mut d = spawn("test", sh("echo '{\"stage\":\"checked\"}'; exit 3"), &log).unwrap();
        assert_eq!(d.said().unwrap(), Said::Stage("checked".into()));
        let e = d.said().unwrap_err().to_string();
        assert!(
            e.contains("exited") && e.contains("3") && e.contains("d.log"),
            "{e}"
        );

        let mut d = spawn("test", sh("echo not-json"), &log).unwrap();
        assert!(matches!(d.said(), Err(DaemonError::BadReport { .. })));
    }

    #[test]
    fn alive_knows_this_process_and_not_a_dead_one() {
        assert!(alive(std::process::id()));
        let mut c = Command::new("true").spawn().expect("true runs");
        let pid = c.id();
        c.wait().expect("reaped");
        assert!(!alive(pid));
    }

    #[test]
    fn stop_kills_what_does_not_end() {
        let mut c = Command::new("sleep").arg("30").spawn().expect("sleep runs");
        let pid = c.id();
        let t = Instant::now();
        // a zombie counts as gone: reap on another thread
        let h = std::thread::spawn(move || c.wait());
        assert!(stop(pid, Duration::from_millis(100)));
        h.join().expect("no panic").expect("reaped");
        assert!(!alive(pid));
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
