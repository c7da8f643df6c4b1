//! Placing listed entries first: the order is the one promised (wanted
//! entries and what they depend on first, each group in its old order),
//! the bytes are the same bytes, and GNU tar extracts the same tree.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;

use strata_chunked::ChunkedError;
use strata_chunked::reorder::{plan_first, write_first};
use strata_testkit::{Compare, compare_trees, require_tool, run};

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(1000);
    h.set_gid(100);
    h.set_mtime(1_600_000_000);
    h.set_size(size);
    h
}

/// A layer (the tar crate drops `./` from names but the root's) with
/// directories, an opaque whiteout, a hard link, a symlink,
/// payloads needing padding, and GNU tar's record padding after the end.
fn layer() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let dir = |b: &mut tar::Builder<Vec<u8>>, name: &str, mode: u32| {
        let mut h = header(tar::EntryType::Directory, mode, 0);
        b.append_data(&mut h, name, &[][..]).unwrap();
    };
    let file = |b: &mut tar::Builder<Vec<u8>>, name: &str, len: usize, fill: u8| {
        let mut h = header(tar::EntryType::Regular, 0o644, len as u64);
        b.append_data(&mut h, name, &vec![fill; len][..]).unwrap();
    };
    dir(&mut b, "./", 0o755);
    dir(&mut b, "./etc/", 0o755);
    file(&mut b, "./etc/conf", 10, b'c');
    dir(&mut b, "./usr/", 0o755);
    dir(&mut b, "./usr/lib/", 0o700);
    file(&mut b, "./usr/lib/.wh..wh..opq", 0, 0);
    file(&mut b, "./usr/lib/real", 1000, b'r');
    file(&mut b, "./usr/lib/other", 700, b'o');
    dir(&mut b, "./usr/bin/", 0o751);
    let mut h = header(tar::EntryType::Link, 0o644, 0);
    b.append_link(&mut h, "./usr/bin/py", "./usr/lib/real")
        .unwrap();
    let mut h = header(tar::EntryType::Symlink, 0o777, 0);
    b.append_link(&mut h, "./usr/bin/sh", "py").unwrap();
    dir(&mut b, "./var/", 0o755);
    file(&mut b, "./var/big", 3000, b'b');
    let mut t = b.into_inner().unwrap();
    t.resize(t.len().next_multiple_of(10240), 0);
    t
}

fn names(tar: &[u8]) -> Vec<String> {
    tar::Archive::new(tar)
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            String::from_utf8(e.path_bytes().to_vec()).unwrap()
        })
        .collect()
}

fn reorder(tar: &[u8], wanted: &[&str]) -> Result<Option<(Vec<u8>, usize)>, ChunkedError> {
    let wanted: HashSet<String> = wanted.iter().map(|s| s.to_string()).collect();
    let Some(plan) = plan_first(tar, &wanted)? else {
        return Ok(None);
    };
    let mut out = Vec::new();
    let mut opens = 0;
    let p = write_first(
        &mut || {
            opens += 1;
            Ok(tar)
        },
        &plan,
        &mut out,
    )?;
    assert_eq!(p.bytes, out.len() as u64);
    assert_eq!(p.moved, plan.moved());
    assert_eq!(p.names.len(), p.moved);
    assert_eq!(opens, 2);
    Ok(Some((out, p.moved)))
}

fn extract(tar: &[u8], dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let file = dir.with_extension("tar");
    std::fs::write(&file, tar).unwrap();
    run(Command::new("tar")
        .args(["--same-owner", "--same-permissions", "-xf"])
        .arg(&file)
        .arg("-C")
        .arg(dir));
}

#[test]
fn listed_entries_and_what_they_need_come_first_and_the_tree_is_the_same() {
    require_tool("tar", "tar");
    let tar = layer();
    let (out, moved) = reorder(&tar, &["usr/bin/py", "var/big"]).unwrap().unwrap();
    assert_eq!(
        names(&out),
        [
            // the root, the link's directories (with the opaque marker),
            // the link's target, the link, the other wanted file
            "./",
            "usr/",
            "usr/lib/",
            "usr/lib/.wh..wh..opq",
            "usr/lib/real",
            "usr/bin/",
            "usr/bin/py",
            "var/",
            "var/big",
            // the rest, in their old order
            "etc/",
            "etc/conf",
            "usr/lib/other",
            "usr/bin/sh",
        ]
    );
    assert_eq!(moved, 9);
    assert_eq!(out.len(), tar.len());
    // same bytes, moved: the multiset of 512-byte blocks is unchanged,
    // and GNU tar's record padding is still at the end
    let blocks = |t: &[u8]| {
        let mut v: Vec<Vec<u8>> = t.chunks(512).map(<[u8]>::to_vec).collect();
        v.sort();
        v
    };
    assert_eq!(blocks(&out), blocks(&tar));
    assert!(out[out.len() - 8192..].iter().all(|b| *b == 0));

    let tmp = tempfile::tempdir().unwrap();
    extract(&tar, &tmp.path().join("a"));
    extract(&out, &tmp.path().join("b"));
    let diffs = compare_trees(&tmp.path().join("a"), &tmp.path().join("b"), Compare::ALL);
    assert!(diffs.is_empty(), "{diffs:#?}");
    // the hard link is still one
    let meta = std::fs::metadata(tmp.path().join("b/usr/bin/py")).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::nlink(&meta), 2);
}

#[test]
fn nothing_changes_when_no_listed_entry_is_there_or_they_lead_already() {
    let tar = layer();
    assert!(reorder(&tar, &["not/there"]).unwrap().is_none());
    // the root and etc/ are the first two entries already
    assert!(reorder(&tar, &["etc"]).unwrap().is_none());
    // etc/conf and what it needs (the root, etc/) lead already
    assert!(reorder(&tar, &["etc/conf"]).unwrap().is_none());
    // a file further down does move
    assert!(reorder(&tar, &["usr/lib/other"]).unwrap().is_some());
}

#[test]
fn a_name_twice_is_refused_like_the_writer_refuses_it() {
    let mut b = tar::Builder::new(Vec::new());
    for fill in [b'a', b'b'] {
        let mut h = header(tar::EntryType::Regular, 0o644, 3);
        b.append_data(&mut h, "./x", &[fill; 3][..]).unwrap();
    }
    let tar = b.into_inner().unwrap();
    match reorder(&tar, &["x"]) {
        Err(ChunkedError::Unsupported(why)) => assert!(why.contains("twice"), "{why}"),
        other => panic!("{:?}", other.map(|o| o.map(|(_, n)| n))),
    }
}

#[test]
fn a_tar_that_changes_between_passes_is_an_error() {
    let tar = layer();
    let mut other = layer();
    // a different file list in the second and third passes
    let cut = {
        let mut a = tar::Archive::new(&tar[..]);
        let e = a
            .entries()
            .unwrap()
            .map(Result::unwrap)
            .find(|e| e.path_bytes().as_ref() == b"var/")
            .unwrap();
        e.raw_header_position() as usize
    };
    other.truncate(cut);
    other.resize(cut + 1024, 0);
    let wanted: HashSet<String> = ["usr/lib/real".to_string()].into();
    let plan = plan_first(&tar[..], &wanted).unwrap().unwrap();
    let r = write_first(&mut || Ok(&other[..]), &plan, std::io::sink());
    match r {
        Err(ChunkedError::Tar { reason, .. }) => assert!(reason.contains("changed"), "{reason}"),
        other => panic!("{other:?}"),
    }
}
