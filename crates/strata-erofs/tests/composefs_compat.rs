//! Byte compatibility with composefs-rs 0.9.4 `mkfs_erofs_versioned(.., V1)`
//! (itself byte-compatible with C `mkcomposefs --min-version=1`).

mod common;

use composefs::erofs::format::FormatVersion;
use composefs::erofs::writer::{ValidatedFileSystem, mkfs_erofs_versioned};
use strata_erofs::{Flavor, build, build_owned};

fn ours_and_theirs(g: &common::Gen) -> (Vec<u8>, Vec<u8>) {
    let ours = build(&g.tree, Flavor::Composefs).expect("build");
    let ours = ours.as_bytes().expect("no streamed data").to_vec();
    // a tree handed over whole builds the same bytes, taken out whole
    let owned = build_owned(g.tree.clone(), Flavor::Composefs).expect("build");
    assert_eq!(owned.into_bytes().expect("no streamed data"), ours);
    let fs = ValidatedFileSystem::new(common::to_composefs(&g.tree)).expect("composefs validates");
    let theirs = mkfs_erofs_versioned(&fs, FormatVersion::V1).to_vec();
    (ours, theirs)
}

fn first_diff(a: &[u8], b: &[u8]) -> String {
    let i = a
        .iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    format!(
        "lengths {} vs {}, first difference at byte {i}",
        a.len(),
        b.len()
    )
}

#[test]
fn empty_tree_matches_composefs() {
    let g = common::Gen::new(0);
    let (ours, theirs) = ours_and_theirs(&g);
    assert!(ours == theirs, "{}", first_diff(&ours, &theirs));
}

/// What the random trees hold, so the comparison is known to cover it.
#[derive(Default, Debug)]
struct Seen {
    hardlinks: usize,
    whiteouts: usize,
    long_symlinks: usize,
    block_files: usize,
    big_dirs: usize,
    wide_ids: usize,
}

fn tally(t: &strata_erofs::FsTree, s: &mut Seen) {
    use strata_erofs::{FileData, Kind};
    let mut names = vec![0; t.nodes.len()];
    for i in 0..t.nodes.len() {
        let n = t.entries(i).count();
        if n > 150 {
            s.big_dirs += 1;
        }
        for (_, c) in t.entries(i) {
            names[c] += 1;
        }
    }
    for (i, n) in t.nodes.iter().enumerate() {
        match &n.kind {
            Kind::CharDev(0, 0) => s.whiteouts += 1,
            Kind::Symlink(x) if x.len() > 3800 => s.long_symlinks += 1,
            Kind::File(FileData::Inline(d)) if d.len() > 4096 => s.block_files += 1,
            _ => {}
        }
        if names[i] > 1 {
            s.hardlinks += 1;
        }
        if n.stat.uid > 65535 || n.stat.gid > 65535 {
            s.wide_ids += 1;
        }
    }
}

#[test]
fn random_trees_match_composefs() {
    let mut seen = Seen::default();
    for seed in 1..=300u64 {
        let mut g = common::Gen::new(seed);
        if seed % 10 == 0 {
            g.fill(0, 1, 400); // directories that need blocks
        } else {
            g.fill(0, 4, 12);
        }
        tally(&g.tree, &mut seen);
        let (ours, theirs) = ours_and_theirs(&g);
        assert!(
            ours == theirs,
            "seed {seed}: {}",
            first_diff(&ours, &theirs)
        );
    }
    assert!(
        seen.hardlinks > 20
            && seen.whiteouts > 20
            && seen.long_symlinks > 5
            && seen.block_files > 5
            && seen.big_dirs > 5
            && seen.wide_ids > 20,
        "the generator stopped covering a case: {seen:?}"
    );
}

#[test]
fn insertion_order_does_not_matter() {
    // The same tree with nodes pushed in reverse order.
    let mut g = common::Gen::new(77);
    g.fill(0, 3, 20);
    let a = build(&g.tree, Flavor::Composefs).unwrap();
    let n = g.tree.nodes.len();
    let perm = |i: usize| if i == 0 { 0 } else { n - i };
    let mut nodes = vec![g.tree.nodes[0].clone(); n];
    for (i, node) in g.tree.nodes.iter().enumerate() {
        let mut node = node.clone();
        if let strata_erofs::Kind::Dir { entries, .. } = &mut node.kind {
            for v in entries.values_mut() {
                *v = perm(*v);
            }
        }
        nodes[perm(i)] = node;
    }
    let shuffled = strata_erofs::FsTree { nodes };
    assert_ne!(shuffled, g.tree);
    let b = build(&shuffled, Flavor::Composefs).unwrap();
    assert_eq!(a, b);
}
