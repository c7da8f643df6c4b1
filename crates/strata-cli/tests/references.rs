//! Image references as podman takes them, against Debian's docker-registry
//! on 127.0.0.1: a bare `HOST:PORT/REPO:TAG` means docker://, and a short
//! name is looked for on registries.conf's search registries in order.

mod common;
use common::*;

use std::path::Path;
use std::process::Output;

/// A registry holding the sample image as `app:1`.
fn registry_with_app() -> Registry {
    let reg = Registry::start();
    reg.push(
        &format!("oci:{}:latest", sample_layout().display()),
        "app:1",
        &[],
    );
    reg
}

/// `strata ARGS` with `CONTAINERS_REGISTRIES_CONF=conf`.
fn with_conf(env: &Env, conf: &Path, args: &[&str]) -> Output {
    env.cmd()
        .env("CONTAINERS_REGISTRIES_CONF", conf)
        .args(args)
        .output()
        .expect("running strata")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn bare_host_port_reference_is_docker() {
    let reg = registry_with_app();
    let env = Env::new();
    let bare = format!("{}/app:1", reg.addr);
    let qualified = format!("docker://{}/app:1", reg.addr);
    let s = env.json(&["pull", "--plain-http", &bare]);
    // recorded under the fully qualified name
    assert_eq!(s["name"], qualified.as_str(), "{s}");
    assert!(s["layers_fetched"].as_u64().unwrap() >= 1, "{s}");
    let insp = env.json(&["inspect", &qualified]);
    assert_eq!(insp["manifest_digest"], s["manifest_digest"], "{insp}");
    // the transport syntax names the same image: nothing to download
    let again = env.json(&["pull", "--plain-http", &qualified]);
    assert_eq!(again["manifest_digest"], s["manifest_digest"]);
    assert_eq!(again["bytes_downloaded"], 0);
    // by digest, bare
    let pinned = format!(
        "{}/app@{}",
        reg.addr,
        s["manifest_digest"].as_str().unwrap()
    );
    let by_digest = env.json(&["pull", "--plain-http", &pinned]);
    assert_eq!(by_digest["manifest_digest"], s["manifest_digest"]);
    assert_eq!(by_digest["name"], format!("docker://{pinned}").as_str());
    // a bare reference is still checked: uppercase is not a repository
    let err = env.fails(&["pull", "--plain-http", &format!("{}/App:1", reg.addr)]);
    assert!(err.contains("must be lowercase"), "{err}");
    env.fsck_ok();
}

#[test]
fn short_name_tries_search_registries_in_order() {
    let reg = registry_with_app();
    let empty = Registry::start();
    // nothing listens there: connection refused
    let closed = format!("127.0.0.1:{}", free_port());
    let env = Env::new();
    let conf = env.path("registries.conf");
    std::fs::write(
        &conf,
        format!(
            "# podman's format\nunqualified-search-registries = [\"{closed}\", \"{}\", \"{}\"]\n\
             short-name-mode = \"permissive\"\n\n[aliases]\n\"myapp\" = \"{}/app\"\n",
            empty.addr, reg.addr, reg.addr
        ),
    )
    .unwrap();

    let out = with_conf(&env, &conf, &["--json", "pull", "--plain-http", "app:1"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let want = format!("docker://{}/app:1", reg.addr);
    assert_eq!(s["name"], want.as_str(), "{s}");
    // the user is told where the name went and what was tried before
    assert!(
        stderr.contains(&format!("\"app:1\" resolved to {want}"))
            && stderr.contains(&conf.display().to_string()),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("docker://{closed}/app:1")),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("docker://{}/app:1", empty.addr)) && stderr.contains("404"),
        "{stderr}"
    );
    let insp = env.json(&["inspect", &want]);
    assert_eq!(insp["manifest_digest"], s["manifest_digest"]);

    // an alias goes to its one registry
    let out = with_conf(&env, &conf, &["pull", "--plain-http", "myapp:1"]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("resolved to {want} (registries.conf alias)")),
        "{stderr}"
    );
    assert!(!stderr.contains(&closed), "{stderr}");

    // no registry has it: every candidate is named with why
    let out = with_conf(&env, &conf, &["pull", "--plain-http", "nope:1"]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("resolving short name \"nope:1\""), "{err}");
    for r in [&closed, &empty.addr, &reg.addr] {
        assert!(
            err.contains(&format!("docker://{r}/nope:1: ")),
            "{r}: {err}"
        );
    }
    assert!(err.contains(&conf.display().to_string()), "{err}");
    env.fsck_ok();
}

#[test]
fn broken_registries_conf_is_named() {
    let env = Env::new();
    let conf = env.path("broken-registries.conf");
    std::fs::write(
        &conf,
        "unqualified-search-registries = [\"127.0.0.1:1\"\n[aliases]\n",
    )
    .unwrap();
    let out = with_conf(&env, &conf, &["pull", "--plain-http", "app:1"]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "parsing registries configuration {}: line 2",
            conf.display()
        )),
        "{err}"
    );
    // wrong types are errors too, not silently Docker Hub
    std::fs::write(&conf, "unqualified-search-registries = \"127.0.0.1:1\"\n").unwrap();
    let out = with_conf(&env, &conf, &["pull", "--plain-http", "app:1"]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&conf.display().to_string()) && err.contains("expected a sequence"),
        "{err}"
    );
}

#[test]
fn convert_takes_bare_references() {
    let reg = registry_with_app();
    let env = Env::new();
    let src = format!("{}/app:1", reg.addr);
    let dst = format!("{}/app:chunked", reg.addr);
    // the source is not in the store: pulled first, by its bare name
    let s = env.json(&["convert", "--plain-http", &src, &dst]);
    let layers = s["layers"].as_array().unwrap();
    assert!(!layers.is_empty(), "{s}");
    assert!(layers.iter().all(|l| l["format"] == "zstd:chunked"), "{s}");
    let pulled = env.json(&["inspect", &format!("docker://{src}")]);
    // pushed under the bare destination: it pulls back to the same tree
    let back = env.json(&["pull", "--plain-http", &dst]);
    assert_eq!(back["manifest_digest"], s["manifest_digest"], "{back}");
    assert_eq!(back["tree_digest"], pulled["tree"]["tree_digest"], "{back}");
    // a short name says no registry to write to
    let e = env.fails(&["convert", "--plain-http", &src, "app:2"]);
    assert!(e.contains("short name"), "{e}");
    env.fsck_ok();
}
