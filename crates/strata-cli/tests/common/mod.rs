//! Helpers for the CLI end-to-end tests: run the real `strata` binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub use strata_testkit::*;

/// A store in a temp dir plus a way to run `strata` against it.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Env {
        Env {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_strata"));
        c.arg("--root").arg(self.root());
        c.env_remove("STRATA_ROOT");
        c
    }

    /// Run and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "strata {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run and require failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "strata {args:?} should have failed:\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("running strata")
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let s = self.ok(&a);
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("strata {args:?} printed non-JSON ({e}): {s}"))
    }

    /// `strata fsck` must pass.
    pub fn fsck_ok(&self) {
        let out = self.run(&["fsck"]);
        assert!(
            out.status.success(),
            "fsck found problems:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Export an image and compare it with `umoci unpack` of the same layout tag.
    pub fn assert_export_matches_umoci(&self, layout: &Path, tag: &str, image: &str) {
        let name = format!("{}-{tag}", layout.file_name().unwrap().to_string_lossy());
        let ours = self.path(&format!("export-{name}"));
        self.ok(&["export", image, ours.to_str().unwrap()]);
        let theirs = umoci_unpack(layout, tag, &self.path(&format!("umoci-{name}")));
        let diffs = compare_trees(&ours, &theirs, Compare::ALL);
        assert!(
            diffs.is_empty(),
            "strata export of {image} differs from umoci unpack of {}:{tag}:\n{}",
            layout.display(),
            diffs.join("\n")
        );
    }
}

/// The repository's sample image layout.
pub fn sample_layout() -> PathBuf {
    repo_root().join("samples/hello")
}
