//! Export round trips: a tree written to a directory scans back to the same
//! tree, and a tree written as a tar imports back to the same tree.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use strata_digest::Digest;
use strata_tar::{Entry, EntryKind, ObjectSink, Timestamp, import_tar};
use strata_tree::Tree;
use strata_tree::export::{export_dir, export_tar};

/// File contents by digest, also written out as files for `export_dir`.
#[derive(Default)]
struct Objects(HashMap<Digest, Vec<u8>>);

impl Objects {
    fn add(&mut self, content: &[u8]) -> EntryKind {
        let d = Digest::sha256_of(content);
        self.0.insert(d, content.to_vec());
        EntryKind::Regular {
            digest: d,
            size: content.len() as u64,
        }
    }
}

impl ObjectSink for Objects {
    fn put(&mut self, content: &mut dyn Read, size: u64) -> io::Result<Digest> {
        let mut v = Vec::new();
        content.take(size).read_to_end(&mut v)?;
        let d = Digest::sha256_of(&v);
        self.0.insert(d, v);
        Ok(d)
    }
}

fn entry(path: &[u8], kind: EntryKind, mode: u32) -> Entry {
    Entry {
        path: path.to_vec(),
        kind,
        mode,
        uid: 0,
        gid: 0,
        mtime: Timestamp {
            secs: 1_600_000_000,
            nanos: 0,
        },
        xattrs: BTreeMap::new(),
    }
}

/// Version 2 file capability: cap_net_bind_service permitted + effective.
fn capability() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x0200_0001u32.to_le_bytes());
    v.extend_from_slice(&(1u32 << 10).to_le_bytes());
    v.extend_from_slice(&[0u8; 12]);
    v
}

fn sample(objects: &mut Objects) -> Tree {
    let long_dir = "d".repeat(120);
    let long_file = format!("{long_dir}/{}", "f".repeat(200));
    let mut root = entry(b"", EntryKind::Dir, 0o755);
    root.mtime.secs = 1_500_000_000;
    let mut suid = entry(b"bin/su", objects.add(b"#!/bin/sh\n"), 0o4755);
    suid.xattrs
        .insert(b"security.capability".to_vec(), capability());
    suid.xattrs
        .insert(b"user.note".to_vec(), b"a=b\0binary".to_vec());
    suid.xattrs
        .insert(b"user.odd=name%".to_vec(), b"1".to_vec());
    let mut nanos = entry(b"bin/nanos", objects.add(&[9u8; 70_000]), 0o644);
    nanos.mtime = Timestamp {
        secs: 1_234_567_890,
        nanos: 123_456_789,
    };
    let mut owned = entry(b"owned", objects.add(b"owned"), 0o600);
    owned.uid = 3_000_000;
    owned.gid = 70_000;
    let mut old = entry(b"old", objects.add(b"old"), 0o644);
    old.mtime = Timestamp {
        secs: -2,
        nanos: 750_000_000,
    };
    let mut ro_dir = entry(b"ro", EntryKind::Dir, 0o500);
    ro_dir.mtime.secs = 1_000;
    let mut link = entry(
        b"bin/sh",
        EntryKind::Symlink {
            target: b"su".to_vec(),
        },
        0o777,
    );
    link.uid = 42;
    link.mtime.nanos = 5;
    let layer1 = vec![
        root,
        entry(b"bin", EntryKind::Dir, 0o755),
        suid,
        nanos,
        link,
        entry(b"empty", objects.add(b""), 0o000),
        owned,
        old,
        entry(long_file.as_bytes(), objects.add(b"deep"), 0o644),
        entry(
            b"longlink",
            EntryKind::Symlink {
                target: "t/".repeat(90).into_bytes(),
            },
            0o777,
        ),
        entry(b"caf\xe9 \\ x", objects.add(b"latin1"), 0o644),
        entry(&[0xe9; 150], objects.add(b"long latin1"), 0o644),
        entry(
            b"hl",
            EntryKind::Hardlink {
                target: b"bin/nanos".to_vec(),
            },
            0o644,
        ),
        entry(
            b"dev/null",
            EntryKind::CharDev { major: 1, minor: 3 },
            0o666,
        ),
        entry(
            b"dev/loop7",
            EntryKind::BlockDev { major: 7, minor: 7 },
            0o660,
        ),
        entry(b"dev/fifo", EntryKind::Fifo, 0o644),
        ro_dir,
        entry(b"ro/inside", objects.add(b"inside"), 0o444),
        entry(b"gone", objects.add(b"gone"), 0o644),
    ];
    let layer2 = vec![
        entry(b".wh.gone", objects.add(b""), 0o644),
        entry(b"bin/nanos", objects.add(b"replaced"), 0o644),
    ];
    let mut t = Tree::new();
    t.apply_layer(&layer1).expect("layer 1");
    t.apply_layer(&layer2).expect("layer 2");
    t
}

fn xattrs(p: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut names = vec![0u8; 4096];
    let n = rustix::fs::llistxattr(p, &mut names[..]).unwrap();
    let mut out = BTreeMap::new();
    for name in names[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let mut v = vec![0u8; 4096];
        let len = rustix::fs::lgetxattr(p, OsStr::from_bytes(name), &mut v[..]).unwrap();
        v.truncate(len);
        out.insert(name.to_vec(), v);
    }
    out
}

/// Scan a directory into entries (sorted depth-first, hardlinks after the
/// first name of their inode).
fn scan(root: &Path, rel: &[u8], seen: &mut HashMap<(u64, u64), Vec<u8>>, out: &mut Vec<Entry>) {
    let p = if rel.is_empty() {
        root.to_path_buf()
    } else {
        root.join(OsStr::from_bytes(rel))
    };
    let md = fs::symlink_metadata(&p).unwrap();
    let ft = md.file_type();
    let kind = if let Some(first) = (!ft.is_dir())
        .then(|| seen.get(&(md.dev(), md.ino())))
        .flatten()
    {
        EntryKind::Hardlink {
            target: first.clone(),
        }
    } else if ft.is_dir() {
        EntryKind::Dir
    } else if ft.is_file() {
        let data = fs::read(&p).unwrap();
        EntryKind::Regular {
            digest: Digest::sha256_of(&data),
            size: data.len() as u64,
        }
    } else if ft.is_symlink() {
        EntryKind::Symlink {
            target: fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec(),
        }
    } else if ft.is_char_device() {
        EntryKind::CharDev {
            major: rustix::fs::major(md.rdev()),
            minor: rustix::fs::minor(md.rdev()),
        }
    } else if ft.is_block_device() {
        EntryKind::BlockDev {
            major: rustix::fs::major(md.rdev()),
            minor: rustix::fs::minor(md.rdev()),
        }
    } else if ft.is_fifo() {
        EntryKind::Fifo
    } else {
        panic!("unexpected file type at {}", p.display());
    };
    if !ft.is_dir() {
        seen.entry((md.dev(), md.ino()))
            .or_insert_with(|| rel.to_vec());
    }
    out.push(Entry {
        path: rel.to_vec(),
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid() as u64,
        gid: md.gid() as u64,
        mtime: Timestamp {
            secs: md.mtime(),
            nanos: md.mtime_nsec() as u32,
        },
        xattrs: xattrs(&p),
    });
    if ft.is_dir() {
        let mut names: Vec<Vec<u8>> = fs::read_dir(&p)
            .unwrap()
            .map(|e| e.unwrap().file_name().as_bytes().to_vec())
            .collect();
        names.sort();
        for n in names {
            let mut r = rel.to_vec();
            if !r.is_empty() {
                r.push(b'/');
            }
            r.extend_from_slice(&n);
            scan(root, &r, seen, out);
        }
    }
}

#[test]
fn export_dir_scans_back_to_the_same_tree() {
    let mut objects = Objects::default();
    let tree = sample(&mut objects);
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("objects");
    fs::create_dir(&store).unwrap();
    for (d, data) in &objects.0 {
        fs::write(store.join(d.hex()), data).unwrap();
    }
    let dest = tmp.path().join("rootfs");
    let mut open = |d: &Digest| fs::File::open(store.join(d.hex()));
    export_dir(&tree, &dest, &mut open).unwrap();

    let mut entries = Vec::new();
    scan(&dest, b"", &mut HashMap::new(), &mut entries);
    let mut back = Tree::new();
    back.apply_layer(&entries).unwrap();
    assert_eq!(back.dump(), tree.dump());
    assert!(
        tree.dump()
            .contains("xattr:security.capability=01000002000400000000000000000000")
    );

    // A second export into a non-empty destination is refused.
    let err = export_dir(&tree, &dest, &mut open).unwrap_err();
    assert!(err.to_string().contains("not an empty directory"), "{err}");
}

#[test]
fn export_tar_imports_back_to_the_same_tree() {
    let mut objects = Objects::default();
    let tree = sample(&mut objects);
    let mut tar = Vec::new();
    let mut open = |d: &Digest| -> io::Result<Box<dyn Read>> {
        Ok(Box::new(io::Cursor::new(objects.0[d].clone())))
    };
    export_tar(&tree, &mut tar, &mut open).unwrap();

    let mut sink = Objects::default();
    let imported = import_tar(&tar[..], &mut sink).unwrap();
    let mut back = Tree::new();
    back.apply_layer(&imported.record.entries).unwrap();
    assert_eq!(back.dump(), tree.dump());

    // GNU tar reads it too, with the same names.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("out.tar");
    fs::write(&path, &tar).unwrap();
    let out = Command::new("tar").arg("-tf").arg(&path).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = out
        .stdout
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .count();
    assert_eq!(listed, tree.walk().count());
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A real directory -> GNU tar -> import -> tree -> export_dir gives back
/// the same directory (as far as a scan sees it).
#[test]
fn gnu_tar_of_a_directory_exports_back_to_the_same_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    fs::create_dir_all(src.join("etc/ro")).unwrap();
    fs::write(src.join("etc/passwd"), b"root:x:0:0\n").unwrap();
    fs::write(src.join("etc/ro/f"), vec![5u8; 100_000]).unwrap();
    fs::hard_link(src.join("etc/passwd"), src.join("passwd-link")).unwrap();
    std::os::unix::fs::symlink("etc/passwd", src.join("sl")).unwrap();
    fs::write(src.join("suid"), b"#!/bin/true\n").unwrap();
    run(Command::new("chown")
        .arg("1234:70000")
        .arg(src.join("suid")));
    run(Command::new("chmod").arg("4711").arg(src.join("suid")));
    run(Command::new("setfattr")
        .args(["-n", "user.k", "-v", "v"])
        .arg(src.join("etc/passwd")));
    run(Command::new("mkfifo").arg(src.join("fifo")));
    run(Command::new("mknod")
        .arg(src.join("zero"))
        .args(["c", "1", "5"]));
    run(Command::new("chmod").arg("0555").arg(src.join("etc/ro")));
    run(Command::new("touch")
        .args(["-h", "-d", "2020-01-02 03:04:05.678901234"])
        .arg(src.join("sl")));
    for p in ["etc/ro", "etc", "."] {
        run(Command::new("touch")
            .args(["-d", "2019-01-02 03:04:05.5"])
            .arg(src.join(p)));
    }

    let tar = tmp.path().join("layer.tar");
    run(Command::new("tar")
        .args(["--format=posix", "--xattrs", "--xattrs-include=*", "-cf"])
        .arg(&tar)
        .arg("-C")
        .arg(&src)
        .arg("."));
    let mut objects = Objects::default();
    let imported = import_tar(fs::File::open(&tar).unwrap(), &mut objects).unwrap();
    let mut tree = Tree::new();
    tree.apply_layer(&imported.record.entries).unwrap();

    let store = tmp.path().join("objects");
    fs::create_dir(&store).unwrap();
    for (d, data) in &objects.0 {
        fs::write(store.join(d.hex()), data).unwrap();
    }
    let dest = tmp.path().join("out");
    export_dir(&tree, &dest, &mut |d: &Digest| {
        fs::File::open(store.join(d.hex()))
    })
    .unwrap();

    let dump_of = |root: &Path| {
        let mut entries = Vec::new();
        scan(root, b"", &mut HashMap::new(), &mut entries);
        let mut t = Tree::new();
        t.apply_layer(&entries).unwrap();
        t.dump()
    };
    let want = dump_of(&src);
    assert_eq!(dump_of(&dest), want);
    assert_eq!(tree.dump(), want);
}
