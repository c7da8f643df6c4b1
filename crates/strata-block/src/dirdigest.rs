//! A digest of a host directory tree: what `--add DIR` contributes to a
//! build key. Covers names, types, modes, owners, mtimes, sizes, contents,
//! link targets, device numbers and xattrs: everything mke2fs copies.

use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use strata_digest::{Digest, Hasher};

/// The digest of the tree at `root` (followed if it is a symlink).
pub fn dir_digest(root: &Path) -> io::Result<Digest> {
    let mut h = Hasher::new();
    h.update(b"strata-dir-digest-v1\0");
    walk(root, b"", &mut h, true)?;
    Ok(h.finish())
}

fn walk(p: &Path, rel: &[u8], h: &mut Hasher, follow: bool) -> io::Result<()> {
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
        md.mtime(),
        md.mtime_nsec(),
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
            let mut r = rel.to_vec();
            r.push(b'/');
            r.extend_from_slice(k.as_bytes());
            walk(&p.join(&k), &r, h, false)?;
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
}
