//! A digest of a host directory tree: what `--add DIR` contributes to a
//! build key. Covers names, types, modes, owners, mtimes, sizes, contents,
//! link targets, device numbers and xattrs: everything mke2fs copies.

use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use strata_digest::{Digest, Hasher};

/// What a digest covers.
#[derive(Clone, Copy)]
struct Covers {
    /// Directory mtimes (mke2fs -d and overlayfs disagree on them).
    dir_mtimes: bool,
    /// Nanoseconds of mtimes.
    nanos: bool,
    /// `/lost+found` (mke2fs makes it).
    lost_found: bool,
}

/// The digest of the tree at `root` (followed if it is a symlink).
pub fn dir_digest(root: &Path) -> io::Result<Digest> {
    let mut h = Hasher::new();
    h.update(b"strata-dir-digest-v1\0");
    let all = Covers {
        dir_mtimes: true,
        nanos: true,
        lost_found: true,
    };
    walk(root, b"", &mut h, true, all)?;
    Ok(h.finish())
}

/// The digest of the tree at `root` as an ext4 built from it keeps it:
/// everything [`dir_digest`] covers but directory mtimes, nanoseconds and
/// a top-level `lost+found`. An image's tree and the template built from
/// it have the same one.
pub fn ext4_comparable_digest(root: &Path) -> io::Result<Digest> {
    let mut h = Hasher::new();
    h.update(b"strata-ext4-tree-digest-v1\0");
    let some = Covers {
        dir_mtimes: false,
        nanos: false,
        lost_found: false,
    };
    walk(root, b"", &mut h, true, some)?;
    Ok(h.finish())
}

fn walk(p: &Path, rel: &[u8], h: &mut Hasher, follow: bool, covers: Covers) -> io::Result<()> {
    let md = if follow {
        fs::metadata(p)?
    } else {
        fs::symlink_metadata(p)?
    };
    let ft = md.file_type();
    let kind: &[u8] = if ft.is_dir() {
        b"d"
    } else if ft.is_file() {
        b"f"
    } else if ft.is_symlink() {
        b"l"
    } else if ft.is_char_device() {
        b"c"
    } else if ft.is_block_device() {
        b"b"
    } else if ft.is_fifo() {
        b"p"
    } else {
        b"s"
    };
    h.update(rel);
    h.update(b"\0");
    h.update(kind);
    let line = format!(
        " {:o} {} {} {} {} {} {}\n",
        md.mode(),
        md.uid(),
        md.gid(),
        if ft.is_dir() && !covers.dir_mtimes {
            0
        } else {
            md.mtime()
        },
        if covers.nanos { md.mtime_nsec() } else { 0 },
        if ft.is_dir() { 0 } else { md.size() },
        md.rdev()
    );
    h.update(line.as_bytes());
    let mut names = xattr_names(p).unwrap_or_default();
    names.sort();
    for n in names {
        let v = xattr_value(p, &n).unwrap_or_default();
        h.update(b"x ");
        h.update(&n);
        h.update(b"=");
        h.update(Digest::sha256_of(&v).as_bytes());
        h.update(b"\n");
    }
    if ft.is_file() {
        let mut f = fs::File::open(p)?;
        let mut c = Hasher::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            c.update(&buf[..n]);
        }
        h.update(c.finish().as_bytes());
    } else if ft.is_symlink() {
        h.update(fs::read_link(p)?.as_os_str().as_bytes());
    } else if ft.is_dir() {
        let mut kids: Vec<_> = fs::read_dir(p)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        kids.sort();
        for k in kids {
            if !covers.lost_found && rel.is_empty() && k == "lost+found" {
                continue;
            }
            let mut r = rel.to_vec();
            r.push(b'/');
            r.extend_from_slice(k.as_bytes());
            walk(&p.join(&k), &r, h, false, covers)?;
        }
    }
    Ok(())
}

fn xattr_names(p: &Path) -> io::Result<Vec<Vec<u8>>> {
    let mut buf = vec![0u8; 4096];
    loop {
        match rustix::fs::llistxattr(p, &mut buf[..]) {
            Ok(n) => {
                return Ok(buf[..n]
                    .split(|&b| b == 0)
                    .filter(|s| !s.is_empty())
                    .map(<[u8]>::to_vec)
                    .collect());
            }
            Err(rustix::io::Errno::RANGE) => buf.resize(buf.len() * 4, 0),
            Err(e) => return Err(e.into()),
        }
    }
}

fn xattr_value(p: &Path, name: &[u8]) -> io::Result<Vec<u8>> {
    let name = std::ffi::OsStr::from_bytes(name);
    let mut buf = vec![0u8; 4096];
    loop {
        match rustix::fs::lgetxattr(p, name, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(rustix::io::Errno::RANGE) => buf.resize(buf.len() * 4, 0),
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_change_changes_the_digest() {
        let d = tempfile::tempdir().unwrap();
        fs::create_dir(d.path().join("etc")).unwrap();
        fs::write(d.path().join("etc/conf"), b"a=1").unwrap();
        let a = dir_digest(d.path()).unwrap();
        assert_eq!(a, dir_digest(d.path()).unwrap());
        fs::write(d.path().join("etc/conf"), b"a=2").unwrap();
        let b = dir_digest(d.path()).unwrap();
        assert_ne!(a, b);
        std::os::unix::fs::symlink("conf", d.path().join("etc/link")).unwrap();
        let c = dir_digest(d.path()).unwrap();
        assert_ne!(b, c);
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(d.path().join("etc/conf"), fs::Permissions::from_mode(0o600)).unwrap();
        assert_ne!(c, dir_digest(d.path()).unwrap());
    }

    #[test]
    fn the_ext4_digest_skips_only_what_mke2fs_changes() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let (etc, conf) = (d.path().join("etc"), d.path().join("etc/conf"));
        fs::create_dir(&etc).unwrap();
        fs::write(&conf, b"a=1").unwrap();
        let set_mtime = |p: &Path, secs: i64, nanos: i64| {
            let t = rustix::fs::Timestamps {
                last_access: rustix::fs::Timespec {
                    tv_sec: secs,
                    tv_nsec: nanos,
                },
                last_modification: rustix::fs::Timespec {
                    tv_sec: secs,
                    tv_nsec: nanos,
                },
            };
            rustix::fs::utimensat(rustix::fs::CWD, p, &t, rustix::fs::AtFlags::empty()).unwrap();
        };
        set_mtime(&conf, 1000, 5);
        set_mtime(&etc, 1000, 0);
        let mode = fs::metadata(&conf).unwrap().permissions().mode();
        let a = ext4_comparable_digest(d.path()).unwrap();
        // directory mtimes, nanoseconds and /lost+found do not count
        fs::create_dir(d.path().join("lost+found")).unwrap();
        set_mtime(&etc, 2000, 0);
        set_mtime(&conf, 1000, 999);
        assert_eq!(a, ext4_comparable_digest(d.path()).unwrap());
        assert_ne!(dir_digest(d.path()).unwrap(), {
            set_mtime(&etc, 3000, 0);
            dir_digest(d.path()).unwrap()
        });
        // a file's seconds, content and mode do; so does lost+found deeper down
        set_mtime(&conf, 1001, 999);
        assert_ne!(a, ext4_comparable_digest(d.path()).unwrap());
        set_mtime(&conf, 1000, 0);
        assert_eq!(a, ext4_comparable_digest(d.path()).unwrap());
        fs::write(&conf, b"a=2").unwrap();
        set_mtime(&conf, 1000, 0);
        assert_ne!(a, ext4_comparable_digest(d.path()).unwrap());
        fs::write(&conf, b"a=1").unwrap();
        set_mtime(&conf, 1000, 0);
        fs::set_permissions(&conf, fs::Permissions::from_mode(0o600)).unwrap();
        set_mtime(&conf, 1000, 0);
        assert_ne!(a, ext4_comparable_digest(d.path()).unwrap());
        fs::set_permissions(&conf, fs::Permissions::from_mode(mode)).unwrap();
        set_mtime(&conf, 1000, 0);
        assert_eq!(a, ext4_comparable_digest(d.path()).unwrap());
        fs::create_dir(etc.join("lost+found")).unwrap();
        assert_ne!(a, ext4_comparable_digest(d.path()).unwrap());
    }
}
