//! `strata completions` and `strata man`: the scripts and pages are
//! generated from the clap definitions, so they are checked by running
//! them: bash completes with the script, man renders the page.

mod common;
use common::*;

use std::process::Command;

fn strata_out(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .output()
        .expect("running strata");
    assert!(
        out.status.success(),
        "strata {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// What bash's completion function offers for the words typed so far.
fn bash_complete(script: &std::path::Path, words: &[&str]) -> Vec<String> {
    let words_q: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let cur = words.last().expect("a word");
    let prev = words[words.len().saturating_sub(2)];
    let code = format!(
        "source {}; COMP_WORDS=({}); COMP_CWORD={}; COMP_LINE='{}'; COMP_POINT=${{#COMP_LINE}}; \
         _strata strata '{cur}' '{prev}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        words_q.join(" "),
        words.len() - 1,
        words.join(" "),
    );
    let out = run(Command::new("bash").arg("-c").arg(&code));
    out.lines().map(str::to_string).collect()
}

#[test]
fn bash_completion_completes_subcommands_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("strata.bash");
    let text = strata_out(&["completions", "bash"]);
    for sub in ["pull", "mount", "rootfs", "convert", "completions", "man"] {
        assert!(text.contains(&format!("strata,{sub})")), "{sub} missing");
    }
    std::fs::write(&script, &text).unwrap();

    let all = bash_complete(&script, &["strata", ""]);
    for sub in ["pull", "mount", "rootfs", "export", "gc"] {
        assert!(all.iter().any(|w| w == sub), "{sub} not offered: {all:?}");
    }
    assert_eq!(bash_complete(&script, &["strata", "roo"]), ["rootfs"]);
    let mut flags = bash_complete(&script, &["strata", "pull", "--pl"]);
    flags.sort();
    assert_eq!(flags, ["--plain-http", "--platform"]);
    let shells = bash_complete(&script, &["strata", "completions", "z"]);
    assert_eq!(shells, ["zsh"]);
}

#[test]
fn other_shells_get_their_own_syntax() {
    for (shell, marker) in [
        ("zsh", "#compdef strata"),
        ("fish", "complete -c strata"),
        ("elvish", "edit:completion:arg-completer[strata]"),
        ("powershell", "Register-ArgumentCompleter"),
    ] {
        let text = strata_out(&["completions", shell]);
        assert!(text.contains(marker), "{shell}: no {marker:?}");
        for sub in ["pull", "mount", "rootfs"] {
            assert!(text.contains(sub), "{shell}: {sub} missing");
        }
    }
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("tcsh"));
}

/// Render roff with `man -l` (or groff when man is missing).
fn render(roff: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("page.1");
    std::fs::write(&page, roff).unwrap();
    let text = if std::path::Path::new("/usr/bin/man").exists() {
        run(Command::new("man")
            .arg("-l")
            .arg(&page)
            .env("MANWIDTH", "200")
            .env("MANPAGER", "cat")
            .env("PAGER", "cat"))
    } else {
        require_tool("groff", "groff-base");
        run(Command::new("groff")
            .args(["-man", "-Tutf8", "-rLL=200n"])
            .arg(&page))
    };
    // drop overstrike/escape sequences some renderers use for bold
    let mut plain = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{8}' {
            plain.pop();
        } else if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

#[test]
fn man_page_renders_with_every_subcommand() {
    let roff = strata_out(&["man"]);
    assert!(roff.contains(".TH strata 1"), "{roff}");
    let text = render(&roff);
    assert!(
        text.contains("NAME") && text.contains("SUBCOMMANDS"),
        "{text}"
    );
    for sub in ["pull", "mount", "rootfs", "completions", "man"] {
        assert!(text.contains(&format!("strata-{sub}(1)")), "{sub}: {text}");
    }
    assert!(text.contains("--root"), "{text}");

    let pull = strata_out(&["man", "pull"]);
    assert!(pull.contains(".TH strata-pull 1"), "{pull}");
    let text = render(&pull);
    for word in ["--plain-http", "--platform", "REFERENCE", "short name"] {
        assert!(text.contains(word), "{word}: {text}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["man", "nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"nope\"") && err.contains("rootfs"), "{err}");
}
