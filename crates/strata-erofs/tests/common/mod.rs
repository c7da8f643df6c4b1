//! Random trees for the writer tests, and their composefs-rs twins.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use composefs::fsverity::{FsVerityHashValue, Sha256HashValue};
use composefs::generic_tree::{self as gt, LeafId};
use composefs::tree;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use strata_erofs::{FileData, FsTree, Kind, Node, Stat, encode_dev};

pub struct Gen {
    rng: StdRng,
    pub tree: FsTree,
    leaves: Vec<usize>,
}

const XATTR_NAMES: &[&str] = &[
    "user.a",
    "user.comment",
    "trusted.overlay.origin",
    "trusted.foo",
    "security.capability",
    "security.selinux",
    "system.posix_acl_access",
    "system.posix_acl_default",
    "lustre.lov",
    "user.overlay.x",
];

impl Gen {
    pub fn new(seed: u64) -> Gen {
        let mut rng = StdRng::seed_from_u64(seed);
        let root = random_stat(&mut rng, true);
        Gen {
            rng,
            tree: FsTree::new(root),
            leaves: Vec::new(),
        }
    }

    /// Fill the tree: `dirs` directories at most `depth` deep with about
    /// `per_dir` entries each.
    pub fn fill(&mut self, dir: usize, depth: u32, per_dir: usize) {
        let n = self.rng.random_range(0..=per_dir);
        for i in 0..n {
            let name = self.name(i);
            if self.tree.entries(dir).any(|(n, _)| *n == name) {
                continue;
            }
            let roll = self.rng.random_range(0..100);
            let child = if roll < 15 && depth > 0 {
                let st = random_stat(&mut self.rng, true);
                let d = self.tree.push(Node {
                    stat: st,
                    kind: Kind::Dir {
                        entries: BTreeMap::new(),
                        opaque: false,
                    },
                });
                self.tree.link(dir, &name, d);
                self.fill(d, depth - 1, per_dir);
                continue;
            } else if roll < 22 && !self.leaves.is_empty() {
                // A hardlink to an earlier leaf (not a 0:0 device).
                let l = self.leaves[self.rng.random_range(0..self.leaves.len())];
                if matches!(self.tree.nodes[l].kind, Kind::CharDev(0, 0)) {
                    continue;
                }
                l
            } else {
                let kind = self.leaf_kind();
                let st = random_stat(&mut self.rng, false);
                let l = self.tree.push(Node { stat: st, kind });
                self.leaves.push(l);
                l
            };
            self.tree.link(dir, &name, child);
        }
    }

    fn name(&mut self, i: usize) -> Vec<u8> {
        match self.rng.random_range(0..10) {
            0 => vec![b'x'; self.rng.random_range(100..=255)],
            1 => format!("{:02x}", self.rng.random_range(0..=255u8)).into_bytes(),
            2 => vec![b'!', b'a' + (i % 26) as u8],
            3 => format!("n\u{e9}{i}").into_bytes(),
            _ => format!("f{i}-{}", self.rng.random_range(0..1000)).into_bytes(),
        }
    }

    fn leaf_kind(&mut self) -> Kind {
        match self.rng.random_range(0..100) {
            0..40 => {
                let size = match self.rng.random_range(0..4) {
                    0 => self.rng.random_range(65..5000),
                    1 => self.rng.random_range(4096..(1 << 22)),
                    2 => 1u64 << self.rng.random_range(12..34),
                    _ => self.rng.random_range(65..200),
                };
                let mut v = [0u8; 32];
                self.rng.fill(&mut v);
                let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
                Kind::File(FileData::External {
                    redirect: format!("/{}/{}", &hex[..2], &hex[2..]).into_bytes(),
                    verity: Some(strata_digest::VerityDigest::from_bytes(v)),
                    size,
                })
            }
            40..60 => {
                let len = match self.rng.random_range(0..5) {
                    0 => 0,
                    1 => self.rng.random_range(1..=64),
                    2 => self.rng.random_range(2000..2100),
                    3 => self.rng.random_range(4090..9000),
                    _ => self.rng.random_range(1..300),
                };
                let data: Vec<u8> = (0..len).map(|_| self.rng.random()).collect();
                Kind::File(FileData::Inline(data))
            }
            60..75 => {
                let len = match self.rng.random_range(0..4) {
                    0 => self.rng.random_range(3900..4095),
                    1 => self.rng.random_range(1000..3000),
                    _ => self.rng.random_range(1..60),
                };
                Kind::Symlink((0..len).map(|i| b'a' + (i % 26) as u8).collect())
            }
            75..80 => Kind::CharDev(
                self.rng.random_range(0..300),
                self.rng.random_range(0..70000),
            ),
            80..84 => Kind::BlockDev(self.rng.random_range(1..300), self.rng.random_range(0..300)),
            84..88 => Kind::Fifo,
            88..90 => Kind::Socket,
            90..94 => Kind::CharDev(0, 0),
            _ => Kind::File(FileData::Inline(Vec::new())),
        }
    }
}

pub fn random_stat(rng: &mut StdRng, dir: bool) -> Stat {
    let mut xattrs = BTreeMap::new();
    let n = match rng.random_range(0..10) {
        0..5 => 0,
        5..8 => 1,
        _ => rng.random_range(2..5),
    };
    for _ in 0..n {
        let k = XATTR_NAMES[rng.random_range(0..XATTR_NAMES.len())];
        let v: Vec<u8> = match rng.random_range(0..4) {
            0 => Vec::new(),
            1 => b"shared-value".to_vec(),
            2 => vec![0xee],
            _ => (0..rng.random_range(1..300))
                .map(|_| rng.random())
                .collect(),
        };
        xattrs.insert(k.as_bytes().to_vec(), v);
    }
    let base = 1_700_000_000i64;
    Stat {
        mode: if dir {
            0o755
        } else {
            rng.random_range(0..0o10000)
        },
        uid: if rng.random_range(0..10) == 0 {
            100_000
        } else {
            rng.random_range(0..3)
        },
        gid: if rng.random_range(0..10) == 0 {
            70_000
        } else {
            0
        },
        mtime: if rng.random_range(0..3) == 0 {
            base
        } else {
            base + rng.random_range(0..5)
        },
        mtime_nsec: if rng.random_range(0..4) == 0 {
            rng.random_range(0..1_000_000_000)
        } else {
            0
        },
        xattrs,
    }
}

fn cfs_stat(s: &Stat) -> gt::Stat {
    gt::Stat {
        st_mode: s.mode,
        st_uid: s.uid as u32,
        st_gid: s.gid as u32,
        st_mtim_sec: s.mtime,
        st_mtim_nsec: s.mtime_nsec,
        xattrs: s
            .xattrs
            .iter()
            .map(|(k, v)| {
                (
                    Box::from(OsStr::from_bytes(k)),
                    v.clone().into_boxed_slice(),
                )
            })
            .collect(),
    }
}

/// The same tree in composefs-rs's model.
pub fn to_composefs(t: &FsTree) -> tree::FileSystem<Sha256HashValue> {
    let mut fs = tree::FileSystem::new(cfs_stat(&t.nodes[0].stat));
    let mut leaf_ids: BTreeMap<usize, LeafId> = BTreeMap::new();
    let root = cfs_dir(t, 0, &mut fs, &mut leaf_ids);
    fs.root = root;
    fs
}

fn cfs_dir(
    t: &FsTree,
    idx: usize,
    fs: &mut tree::FileSystem<Sha256HashValue>,
    ids: &mut BTreeMap<usize, LeafId>,
) -> tree::Directory<Sha256HashValue> {
    let mut d = tree::Directory::new(cfs_stat(&t.nodes[idx].stat));
    for (name, c) in t.entries(idx) {
        let name = OsStr::from_bytes(name);
        let inode = match &t.nodes[c].kind {
            Kind::Dir { .. } => gt::Inode::Directory(Box::new(cfs_dir(t, c, fs, ids))),
            k => {
                let id = match ids.get(&c) {
                    Some(id) => *id,
                    None => {
                        let content = match k {
                            Kind::File(FileData::Inline(d)) => tree::LeafContent::Regular(
                                tree::RegularFile::Inline(d.clone().into()),
                            ),
                            Kind::File(FileData::External { verity, size, .. }) => {
                                let h = Sha256HashValue::from_hex(verity.unwrap().hex()).unwrap();
                                tree::LeafContent::Regular(tree::RegularFile::External(h, *size))
                            }
                            Kind::Symlink(s) => {
                                tree::LeafContent::Symlink(Box::from(OsStr::from_bytes(s)))
                            }
                            Kind::CharDev(a, b) => {
                                tree::LeafContent::CharacterDevice(encode_dev(*a, *b) as u64)
                            }
                            Kind::BlockDev(a, b) => {
                                tree::LeafContent::BlockDevice(encode_dev(*a, *b) as u64)
                            }
                            Kind::Fifo => tree::LeafContent::Fifo,
                            Kind::Socket => tree::LeafContent::Socket,
                            other => panic!("no composefs twin for {other:?}"),
                        };
                        let id = fs.push_leaf(cfs_stat(&t.nodes[c].stat), content);
                        ids.insert(c, id);
                        id
                    }
                };
                gt::Inode::leaf(id)
            }
        };
        d.insert(name, inode);
    }
    d
}
