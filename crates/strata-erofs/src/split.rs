//! The upper part of a hybrid mount.
//!
//! A hybrid image is mounted as two EROFS lowers: a base part (the
//! flattened tree of a shared bottom layer chain) and an upper part that
//! [`upper`] computes from the base tree and the image's full tree. Stacked
//! by overlayfs, upper over base shows exactly the full tree:
//! - a path whose node differs from the base (kind, metadata, content, or
//!   hardlink group) is in the upper part with all names of its inode, so
//!   hardlinks keep one inode and the right link count;
//! - a base path missing from the full tree gets a whiteout;
//! - a directory is in the upper part when it or anything under it changed;
//!   a directory replacing a non-directory is opaque.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::fs::{FsTree, Kind, Node};

type Paths = HashMap<Vec<u8>, usize>;

fn index(t: &FsTree) -> (Paths, HashMap<usize, Vec<Vec<u8>>>) {
    let mut paths = HashMap::new();
    let mut names: HashMap<usize, Vec<Vec<u8>>> = HashMap::new();
    let mut stack = vec![(Vec::new(), 0usize)];
    while let Some((p, idx)) = stack.pop() {
        for (name, c) in t.entries(idx) {
            let mut cp = p.clone();
            cp.push(b'/');
            cp.extend_from_slice(name);
            paths.insert(cp.clone(), c);
            if matches!(t.nodes[c].kind, Kind::Dir { .. }) {
                stack.push((cp, c));
            } else {
                names.entry(c).or_default().push(cp);
            }
        }
    }
    for v in names.values_mut() {
        v.sort();
    }
    (paths, names)
}

fn same_leaf(a: &Node, b: &Node) -> bool {
    a.stat == b.stat && a.kind == b.kind
}

/// The upper part: what must lie over `base` to show `full`.
pub fn upper(base: &FsTree, full: &FsTree) -> FsTree {
    let (base_paths, base_names) = index(base);
    let (_, full_names) = index(full);
    // Leaves of the full tree that the base does not already show as they are.
    let mut changed: HashSet<usize> = HashSet::new();
    for (leaf, names) in &full_names {
        let same = names.iter().all(|p| {
            base_paths.get(p).is_some_and(|b| {
                !matches!(base.nodes[*b].kind, Kind::Dir { .. })
                    && same_leaf(&base.nodes[*b], &full.nodes[*leaf])
                    && base_names.get(b) == Some(names)
            })
        });
        if !same {
            changed.insert(*leaf);
        }
    }
    let mut out = FsTree::new(full.nodes[0].stat.clone());
    let mut copied: HashMap<usize, usize> = HashMap::new();
    diff_dir(
        base,
        full,
        Some(0),
        0,
        0,
        &mut out,
        &changed,
        &mut copied,
        b"",
    );
    out
}

#[allow(clippy::too_many_arguments)]
fn diff_dir(
    base: &FsTree,
    full: &FsTree,
    bdir: Option<usize>,
    fdir: usize,
    odir: usize,
    out: &mut FsTree,
    changed: &HashSet<usize>,
    copied: &mut HashMap<usize, usize>,
    path: &[u8],
) -> bool {
    let mut any = false;
    let bents: BTreeMap<&Vec<u8>, usize> =
        bdir.map(|b| base.entries(b).collect()).unwrap_or_default();
    let fents: BTreeMap<&Vec<u8>, usize> = full.entries(fdir).collect();
    for (name, b) in &bents {
        if !fents.contains_key(name) {
            let w = out.push(Node {
                stat: base.nodes[*b].stat.clone(),
                kind: Kind::Whiteout,
            });
            out.nodes[w].stat.xattrs.clear();
            out.nodes[w].stat.mode = 0;
            out.link(odir, name, w);
            any = true;
        }
    }
    for (name, f) in &fents {
        let mut p = path.to_vec();
        p.push(b'/');
        p.extend_from_slice(name);
        let b = bents.get(name).copied();
        if let Kind::Dir { .. } = full.nodes[*f].kind {
            let b_is_dir = b.is_some_and(|b| matches!(base.nodes[b].kind, Kind::Dir { .. }));
            let d = out.push(Node {
                stat: full.nodes[*f].stat.clone(),
                kind: Kind::Dir {
                    entries: BTreeMap::new(),
                    opaque: b.is_some() && !b_is_dir,
                },
            });
            let sub_changed = diff_dir(
                base,
                full,
                if b_is_dir { b } else { None },
                *f,
                d,
                out,
                changed,
                copied,
                &p,
            );
            let meta_changed = !b_is_dir || base.nodes[b.expect("dir")].stat != full.nodes[*f].stat;
            if sub_changed || meta_changed {
                out.link(odir, name, d);
                any = true;
            } else {
                // Nothing under it changed, so nothing after it is linked:
                // drop the unused nodes again.
                out.nodes.truncate(d);
            }
        } else if changed.contains(f) {
            let idx = *copied
                .entry(*f)
                .or_insert_with(|| out.push(full.nodes[*f].clone()));
            out.link(odir, name, idx);
            any = true;
        }
    }
    any
}
