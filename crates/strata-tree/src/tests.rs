use super::*;

fn meta_entry(path: &str, kind: EntryKind) -> Entry {
    Entry {
        path: path.as_bytes().to_vec(),
        kind,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime: Timestamp { secs: 1, nanos: 0 },
        xattrs: BTreeMap::new(),
    }
}

fn file(path: &str, content: &str) -> Entry {
    meta_entry(
        path,
        EntryKind::Regular {
            digest: Digest::sha256_of(content.as_bytes()),
            size: content.len() as u64,
        },
    )
}

fn dir(path: &str) -> Entry {
    let mut e = meta_entry(path, EntryKind::Dir);
    e.mode = 0o755;
    e
}

fn symlink(path: &str, target: &str) -> Entry {
    meta_entry(
        path,
        EntryKind::Symlink {
            target: target.as_bytes().to_vec(),
        },
    )
}

fn hardlink(path: &str, target: &str) -> Entry {
    meta_entry(
        path,
        EntryKind::Hardlink {
            target: target.as_bytes().to_vec(),
        },
    )
}

fn paths(t: &Tree) -> Vec<String> {
    t.walk()
        .map(|(p, _)| String::from_utf8_lossy(&p).into_owned())
        .collect()
}

fn content(t: &Tree, p: &str) -> Option<Digest> {
    match t.lookup(p.as_bytes())?.kind {
        NodeKind::Regular { digest, .. } => Some(digest),
        _ => None,
    }
}

#[test]
fn whiteouts_remove_files_and_dirs() {
    let mut t = Tree::new();
    t.apply_layer(&[
        dir("a"),
        file("a/x", "1"),
        dir("a/d"),
        file("a/d/y", "2"),
        file("b", "3"),
    ])
    .unwrap();
    t.apply_layer(&[
        file("a/.wh.x", ""),
        file("a/.wh.d", ""),
        file(".wh.nothere", ""),
    ])
    .unwrap();
    assert_eq!(paths(&t), ["", "a", "b"]);
}

#[test]
fn opaque_dir_hides_lower_but_keeps_same_layer_children_in_any_order() {
    let mut t = Tree::new();
    t.apply_layer(&[
        dir("d"),
        file("d/old", "o"),
        dir("d/sub"),
        file("d/sub/z", "z"),
    ])
    .unwrap();
    // the new child comes before the opaque marker
    t.apply_layer(&[dir("d"), file("d/new", "n"), file("d/.wh..wh..opq", "")])
        .unwrap();
    assert_eq!(paths(&t), ["", "d", "d/new"]);
    let mut t2 = Tree::new();
    t2.apply_layer(&[dir("d"), file("d/old", "o")]).unwrap();
    t2.apply_layer(&[dir("d"), file("d/.wh..wh..opq", ""), file("d/new", "n")])
        .unwrap();
    assert_eq!(t.dump(), t2.dump());
}

#[test]
fn names_written_through_symlinked_parents_survive_an_opaque_marker() {
    let mut t = Tree::new();
    t.apply_layer(&[
        dir("real/sub"),
        file("real/old", "o"),
        file("real/sub/lower", "l"),
        symlink("in", "real"),
    ])
    .unwrap();
    // written through the symlink (and through `..`), then the directory
    // made opaque: what this layer wrote or entered stays (`sub`, entered
    // on the way to `..`, without its lower child), the rest goes
    t.apply_layer(&[
        file("in/new", "n"),
        file("real/sub/../sub2/x", "x"),
        file("real/.wh..wh..opq", ""),
    ])
    .unwrap();
    assert_eq!(
        paths(&t),
        [
            "",
            "in",
            "real",
            "real/new",
            "real/sub",
            "real/sub2",
            "real/sub2/x"
        ]
    );
    // the same layer without the marker keeps everything, and a layer
    // without whiteouts (no record of what it wrote) builds the same tree
    let mut t2 = Tree::new();
    t2.apply_layer(&[
        dir("real/sub"),
        file("real/sub/lower", "l"),
        symlink("in", "real"),
    ])
    .unwrap();
    t2.apply_layer(&[file("in/new", "n"), file("real/sub/../sub2/x", "x")])
        .unwrap();
    assert_eq!(
        paths(&t2),
        [
            "",
            "in",
            "real",
            "real/new",
            "real/sub",
            "real/sub/lower",
            "real/sub2",
            "real/sub2/x"
        ]
    );
}

#[test]
fn dir_replaced_by_file_and_back() {
    let mut t = Tree::new();
    t.apply_layer(&[dir("x"), file("x/inner", "i")]).unwrap();
    t.apply_layer(&[file("x", "now a file")]).unwrap();
    assert_eq!(paths(&t), ["", "x"]);
    assert_eq!(content(&t, "x"), Some(Digest::sha256_of(b"now a file")));
    t.apply_layer(&[dir("x"), file("x/again", "a")]).unwrap();
    assert_eq!(paths(&t), ["", "x", "x/again"]);
    assert_eq!(t.lookup(b"").unwrap().nlink, 3);
}

#[test]
fn hardlink_keeps_old_content_when_target_is_replaced_later() {
    let mut t = Tree::new();
    t.apply_layer(&[file("orig", "v1"), hardlink("link", "orig")])
        .unwrap();
    let a = t.lookup(b"orig").unwrap();
    let b = t.lookup(b"link").unwrap();
    assert_eq!(a.ino, b.ino);
    assert_eq!(a.nlink, 2);
    t.apply_layer(&[file("orig", "v2")]).unwrap();
    assert_eq!(content(&t, "orig"), Some(Digest::sha256_of(b"v2")));
    assert_eq!(content(&t, "link"), Some(Digest::sha256_of(b"v1")));
    assert_ne!(
        t.lookup(b"orig").unwrap().ino,
        t.lookup(b"link").unwrap().ino
    );
    assert_eq!(t.lookup(b"link").unwrap().nlink, 1);
    // a hardlink in a later layer to a file of a lower layer
    t.apply_layer(&[hardlink("link2", "link")]).unwrap();
    assert_eq!(
        t.lookup(b"link2").unwrap().ino,
        t.lookup(b"link").unwrap().ino
    );
}

#[test]
fn hardlink_errors() {
    let mut t = Tree::new();
    let err = t.apply_layer(&[hardlink("l", "missing")]).unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
    let mut t = Tree::new();
    let err = t.apply_layer(&[dir("d"), hardlink("l", "d")]).unwrap_err();
    assert!(err.to_string().contains("directory"), "{err}");
}

#[test]
fn symlink_parents_resolve_inside_and_refuse_escapes() {
    let mut t = Tree::new();
    t.apply_layer(&[
        dir("real"),
        symlink("in", "real"),
        symlink("abs", "/real"),
        symlink("root", "/"),
    ])
    .unwrap();
    t.apply_layer(&[file("in/a", "a"), file("abs/b", "b"), file("root/c", "c")])
        .unwrap();
    assert_eq!(
        paths(&t),
        ["", "abs", "c", "in", "real", "real/a", "real/b", "root"]
    );

    let mut t = Tree::new();
    t.apply_layer(&[symlink("evil", "../../../tmp")]).unwrap();
    let err = t.apply_layer(&[file("evil/x", "x")]).unwrap_err();
    assert!(err.to_string().contains("leaves the root"), "{err}");

    let mut t = Tree::new();
    t.apply_layer(&[dir("d"), symlink("d/up", "../..")])
        .unwrap();
    let err = t.apply_layer(&[file("d/up/x", "x")]).unwrap_err();
    assert!(err.to_string().contains("leaves the root"), "{err}");
}

#[test]
fn symlink_chains_and_loops() {
    let mut t = Tree::new();
    t.apply_layer(&[
        dir("target"),
        symlink("c", "target"),
        symlink("b", "c"),
        symlink("a", "b"),
    ])
    .unwrap();
    t.apply_layer(&[file("a/f", "f")]).unwrap();
    assert!(t.lookup(b"target/f").is_some());
    let mut t = Tree::new();
    t.apply_layer(&[symlink("x", "y"), symlink("y", "x")])
        .unwrap();
    let err = t.apply_layer(&[file("x/f", "f")]).unwrap_err();
    assert!(err.to_string().contains("too many levels"), "{err}");
}

#[test]
fn missing_parents_are_created_and_file_parent_is_an_error() {
    let mut t = Tree::new();
    t.apply_layer(&[file("p/q/r", "r")]).unwrap();
    assert_eq!(paths(&t), ["", "p", "p/q", "p/q/r"]);
    assert_eq!(t.lookup(b"p").unwrap().meta.mode, 0o755);
    let err = t.apply_layer(&[file("p/q/r/s", "s")]).unwrap_err();
    assert!(err.to_string().contains("not a directory"), "{err}");
}

#[test]
fn dump_is_insertion_order_independent() {
    let entries = vec![
        dir("b"),
        file("b/2", "2"),
        file("b/1", "1"),
        file("a", "a"),
        hardlink("c", "a"),
        symlink("s", "a"),
    ];
    let mut t1 = Tree::new();
    t1.apply_layer(&entries).unwrap();
    let mut rev = entries.clone();
    rev.reverse();
    // hardlink must come after its target; move it last
    let hl = rev.remove(rev.iter().position(|e| e.path == b"c").unwrap());
    rev.push(hl);
    let mut t2 = Tree::new();
    t2.apply_layer(&rev).unwrap();
    assert_eq!(t1.dump(), t2.dump());
    assert!(
        t1.dump().contains("/c 644 0:0 1.000000000 hardlink=/a"),
        "{}",
        t1.dump()
    );
}

#[test]
fn root_entry_sets_root_meta() {
    let mut t = Tree::new();
    let mut r = dir("");
    r.mode = 0o700;
    r.uid = 5;
    t.apply_layer(&[r]).unwrap();
    assert_eq!(t.lookup(b"").unwrap().meta.mode, 0o700);
    assert_eq!(t.lookup(b"").unwrap().meta.uid, 5);
    let err = t.apply_layer(&[file("", "x")]).unwrap_err();
    assert!(matches!(err, TreeError::RootNotDir));
}

#[test]
fn opaque_dir_hides_lower_children_inside_merged_subdirs() {
    let mut t = Tree::new();
    t.apply_layer(&[
        dir("d"),
        dir("d/sub"),
        file("d/sub/old", "o"),
        file("d/gone", "g"),
    ])
    .unwrap();
    // d/sub is merged (dir over dir) in this layer, but everything lower
    // layers put under d is hidden, also below d/sub.
    t.apply_layer(&[
        dir("d/sub"),
        file("d/sub/new", "n"),
        file("d/.wh..wh..opq", ""),
    ])
    .unwrap();
    assert_eq!(paths(&t), ["", "d", "d/sub", "d/sub/new"]);
    // implicit parents created in this layer count as this layer's too
    let mut t = Tree::new();
    t.apply_layer(&[dir("e"), file("e/old", "o")]).unwrap();
    t.apply_layer(&[file("e/p/q", "q"), file("e/.wh..wh..opq", "")])
        .unwrap();
    assert_eq!(paths(&t), ["", "e", "e/p", "e/p/q"]);
}

#[test]
fn whiteout_of_missing_name_or_in_missing_dir_is_a_no_op() {
    let mut t = Tree::new();
    t.apply_layer(&[file("keep", "k")]).unwrap();
    t.apply_layer(&[file("nodir/.wh.x", ""), file(".wh.y", "")])
        .unwrap();
    assert_eq!(paths(&t), ["", "keep"]);
}

#[test]
fn symlinks_with_dotdot_that_stay_inside_resolve() {
    let mut t = Tree::new();
    t.apply_layer(&[
        dir("a/b"),
        symlink("a/b/up", ".."),
        symlink("a/b/abs", "/a/b/up/./b"),
        symlink("a/deep", "b/up/b"),
    ])
    .unwrap();
    t.apply_layer(&[
        file("a/b/up/x", "x"),
        file("a/b/abs/y", "y"),
        file("a/deep/z", "z"),
    ])
    .unwrap();
    assert!(t.lookup(b"a/x").is_some());
    assert!(t.lookup(b"a/b/y").is_some());
    assert!(t.lookup(b"a/b/z").is_some());
    // a symlink to a deeper dir followed by ".." is physical, like the kernel
    let mut t = Tree::new();
    t.apply_layer(&[dir("x/y/z"), symlink("l", "x/y/z"), symlink("m", "l/../..")])
        .unwrap();
    t.apply_layer(&[file("m/f", "f")]).unwrap();
    assert!(t.lookup(b"x/f").is_some());
}

#[test]
fn escapes_name_the_symlink_and_hardlink_targets_outside_are_refused() {
    let mut t = Tree::new();
    t.apply_layer(&[dir("d"), symlink("d/out", "../../etc"), file("f", "f")])
        .unwrap();
    let err = t.apply_layer(&[file("d/out/passwd", "x")]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "path \"d/out/passwd\" passes through symlink \"d/out\" which leaves the root"
    );
    // hardlink whose target resolves outside the root
    let err = t.apply_layer(&[hardlink("h", "d/out/shadow")]).unwrap_err();
    assert!(err.to_string().contains("leaves the root"), "{err}");
    // hand-built entries with ".." are refused too
    let err = t.apply_layer(&[file("d/../../x", "x")]).unwrap_err();
    assert!(err.to_string().contains("leaves the root"), "{err}");
    // a file used as a directory
    let err = t.apply_layer(&[file("f/x", "x")]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "path \"f/x\": parent \"f\" is not a directory"
    );
}

#[test]
fn reachable_is_walk_without_paths_whiteouts_and_hardlinks_included() {
    let mut t = Tree::new();
    t.apply_layer(&[
        dir("a"),
        file("a/x", "1"),
        dir("a/d"),
        file("a/d/y", "2"),
        file("b", "3"),
        hardlink("c", "b"),
        symlink("s", "a/d"),
    ])
    .unwrap();
    t.apply_layer(&[file("a/.wh.d", ""), file("e", "4")])
        .unwrap();
    let mut walked: Vec<u64> = t.walk().map(|(_, n)| n.ino).collect();
    walked.sort_unstable();
    walked.dedup();
    let mut got: Vec<u64> = t.reachable().map(|n| n.ino).collect();
    got.sort_unstable();
    assert_eq!(
        got.len(),
        got.iter().collect::<BTreeSet<_>>().len(),
        "each once"
    );
    assert_eq!(got, walked);
    // the whited-out file's content is gone from the objects
    let objects = t.objects();
    assert!(!objects.contains(&Digest::sha256_of(b"2")));
    assert!(objects.contains(&Digest::sha256_of(b"3")));
    assert_eq!(objects.len(), 3);
}
