//! Writing a tree out: to a directory (like `umoci unpack`) or to a tar.
//!
//! Directory export order matters: contents first, then owner (chown clears
//! setuid bits and file capabilities), then mode, then xattrs (so
//! `security.capability` survives), and directory mtimes last, deepest
//! first, because creating children changes a directory's mtime.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{PermissionsExt, lchown};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, CWD, FileType, Mode, Timespec, Timestamps, XattrFlags};
use strata_digest::Digest;

use crate::{Node, NodeKind, Tree};

/// Errors while exporting.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The destination exists and is not an empty directory.
    #[error("destination {0} exists and is not an empty directory")]
    DestinationNotEmpty(PathBuf),
    /// A filesystem operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What we were doing.
        action: &'static str,
        /// Where.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn ioe<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ExportError + 'a {
    move |source| ExportError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn rio<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(rustix::io::Errno) -> ExportError + 'a {
    move |e| ExportError::Io {
        action,
        path: path.to_path_buf(),
        source: e.into(),
    }
}

/// Write the tree into `dest` (created; must not exist or be empty).
pub fn export_dir(
    tree: &Tree,
    dest: &Path,
    open: &mut dyn FnMut(&Digest) -> io::Result<File>,
) -> Result<(), ExportError> {
    match fs::read_dir(dest) {
        Ok(mut rd) => {
            if rd.next().is_some() {
                return Err(ExportError::DestinationNotEmpty(dest.to_path_buf()));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dest).map_err(ioe("creating", dest))?;
        }
        Err(e) => return Err(ioe("reading", dest)(e)),
    }
    let walk: Vec<(Vec<u8>, &Node)> = tree.walk().collect();
    let mut first: HashMap<u64, PathBuf> = HashMap::new();
    let mut dirs: Vec<(PathBuf, &Node)> = Vec::new();
    for (rel, node) in &walk {
        let path = if rel.is_empty() {
            dest.to_path_buf()
        } else {
            dest.join(OsStr::from_bytes(rel))
        };
        if node.kind == NodeKind::Dir {
            if !rel.is_empty() {
                fs::create_dir(&path).map_err(ioe("creating dir", &path))?;
            }
            fs::set_permissions(&path, fs::Permissions::from_mode(0o700))
                .map_err(ioe("chmod", &path))?;
            dirs.push((path, node));
            continue;
        }
        if let Some(f) = first.get(&node.ino) {
            fs::hard_link(f, &path).map_err(ioe("hardlinking", &path))?;
            continue;
        }
        first.insert(node.ino, path.clone());
        match &node.kind {
            NodeKind::Regular { digest, .. } => {
                let mut src = open(digest).map_err(ioe("opening object for", &path))?;
                let mut f = File::create(&path).map_err(ioe("creating", &path))?;
                io::copy(&mut src, &mut f).map_err(ioe("writing", &path))?;
            }
            NodeKind::Symlink { target } => {
                std::os::unix::fs::symlink(OsStr::from_bytes(target), &path)
                    .map_err(ioe("creating symlink", &path))?;
            }
            NodeKind::CharDev { major, minor } => {
                rustix::fs::mknodat(
                    CWD,
                    &path,
                    FileType::CharacterDevice,
                    Mode::from_raw_mode(0o600),
                    rustix::fs::makedev(*major, *minor),
                )
                .map_err(rio("mknod", &path))?;
            }
            NodeKind::BlockDev { major, minor } => {
                rustix::fs::mknodat(
                    CWD,
                    &path,
                    FileType::BlockDevice,
                    Mode::from_raw_mode(0o600),
                    rustix::fs::makedev(*major, *minor),
                )
                .map_err(rio("mknod", &path))?;
            }
            NodeKind::Fifo => {
                rustix::fs::mknodat(CWD, &path, FileType::Fifo, Mode::from_raw_mode(0o600), 0)
                    .map_err(rio("mkfifo", &path))?;
            }
            NodeKind::Dir => unreachable!("dirs handled above"),
        }
        set_meta(&path, node)?;
    }
    for (path, node) in dirs.iter().rev() {
        set_meta(path, node)?;
    }
    Ok(())
}

fn set_meta(path: &Path, node: &Node) -> Result<(), ExportError> {
    let is_link = matches!(node.kind, NodeKind::Symlink { .. });
    lchown(path, Some(node.meta.uid as u32), Some(node.meta.gid as u32))
        .map_err(ioe("chown", path))?;
    if !is_link {
        fs::set_permissions(path, fs::Permissions::from_mode(node.meta.mode))
            .map_err(ioe("chmod", path))?;
    }
    for (k, v) in &node.meta.xattrs {
        rustix::fs::lsetxattr(path, OsStr::from_bytes(k), v, XattrFlags::empty())
            .map_err(rio("setting xattr on", path))?;
    }
    let t = Timespec {
        tv_sec: node.meta.mtime.secs,
        tv_nsec: node.meta.mtime.nanos as _,
    };
    rustix::fs::utimensat(
        CWD,
        path,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .map_err(rio("setting mtime of", path))?;
    Ok(())
}

/// Write the tree as a POSIX (pax) tar: PAX records for long names, big
/// ids, nanosecond mtimes and xattrs; hardlinks as links to the first name.
pub fn export_tar(
    tree: &Tree,
    out: &mut dyn Write,
    open: &mut dyn FnMut(&Digest) -> io::Result<Box<dyn Read>>,
) -> Result<(), ExportError> {
    let w = |e: io::Error| ExportError::Io {
        action: "writing tar",
        path: PathBuf::from("-"),
        source: e,
    };
    let mut first: HashMap<u64, Vec<u8>> = HashMap::new();
    for (rel, node) in tree.walk() {
        let mut name = if rel.is_empty() {
            b"./".to_vec()
        } else {
            let mut n = b"./".to_vec();
            n.extend_from_slice(&rel);
            n
        };
        let mut h = TarHeader {
            typeflag: b'0',
            size: 0,
            link: Vec::new(),
            dev: (0, 0),
        };
        let mut content: Option<(Digest, u64)> = None;
        if node.kind != NodeKind::Dir
            && let Some(f) = first.get(&node.ino)
        {
            h.typeflag = b'1';
            h.link = f.clone();
        } else {
            if node.kind != NodeKind::Dir {
                first.insert(node.ino, name.clone());
            }
            match &node.kind {
                NodeKind::Regular { digest, size } => {
                    h.size = *size;
                    content = Some((*digest, *size));
                }
                NodeKind::Dir => {
                    h.typeflag = b'5';
                    if !name.ends_with(b"/") {
                        name.push(b'/');
                    }
                }
                NodeKind::Symlink { target } => {
                    h.typeflag = b'2';
                    h.link = target.clone();
                }
                NodeKind::CharDev { major, minor } => {
                    h.typeflag = b'3';
                    h.dev = (*major, *minor);
                }
                NodeKind::BlockDev { major, minor } => {
                    h.typeflag = b'4';
                    h.dev = (*major, *minor);
                }
                NodeKind::Fifo => h.typeflag = b'6',
            }
        }
        write_entry(out, &name, node, &h).map_err(w)?;
        if let Some((digest, size)) = content {
            let mut r = open(&digest).map_err(w)?;
            let n = io::copy(&mut (&mut r).take(size), out).map_err(w)?;
            if n != size {
                return Err(w(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("object {digest} shorter than {size}"),
                )));
            }
            let pad = (512 - size % 512) % 512;
            out.write_all(&vec![0u8; pad as usize]).map_err(w)?;
        }
    }
    out.write_all(&[0u8; 1024]).map_err(w)?;
    Ok(())
}

struct TarHeader {
    typeflag: u8,
    size: u64,
    link: Vec<u8>,
    dev: (u32, u32),
}

fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    // length includes its own digits
    let base = key.len() + value.len() + 3;
    let mut len = base + 1;
    while len.to_string().len() + base != len {
        len = base + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// `SECS[.NANOS]`; negative times count the fraction towards zero as PAX
/// readers expect (-1.25 is 1.25 s before the epoch).
fn pax_time(t: strata_tar::Timestamp) -> String {
    if t.nanos == 0 {
        t.secs.to_string()
    } else if t.secs >= 0 {
        format!("{}.{:09}", t.secs, t.nanos)
    } else {
        format!("-{}.{:09}", -(t.secs + 1), 1_000_000_000 - t.nanos)
    }
}

/// An octal field with its NUL; values that do not fit (large device
/// numbers) use GNU base-256, which GNU tar, libarchive and Go read.
fn octal(field: &mut [u8], v: u64) {
    let width = field.len() - 1;
    let s = format!("{v:0width$o}");
    if s.len() <= width {
        field[..width].copy_from_slice(s.as_bytes());
        field[width] = 0;
    } else {
        field.fill(0);
        let n = field.len();
        for (i, b) in v.to_be_bytes().iter().rev().enumerate() {
            field[n - 1 - i] = *b;
        }
        field[0] |= 0x80;
    }
}

fn write_entry(out: &mut dyn Write, name: &[u8], node: &Node, h: &TarHeader) -> io::Result<()> {
    let m = &node.meta;
    let mut pax = Vec::new();
    // Names that fit stay in the header whatever their bytes; longer ones
    // go to PAX, flagged as binary when they are not UTF-8 (GNU tar and
    // libarchive then take them verbatim).
    let long_name = name.len() > 100;
    let long_link = h.link.len() > 100;
    if (long_name && std::str::from_utf8(name).is_err())
        || (long_link && std::str::from_utf8(&h.link).is_err())
    {
        pax_record(&mut pax, b"hdrcharset", b"BINARY");
    }
    if long_name {
        pax_record(&mut pax, b"path", name);
    }
    if long_link {
        pax_record(&mut pax, b"linkpath", &h.link);
    }
    if m.uid > 0o7777777 {
        pax_record(&mut pax, b"uid", m.uid.to_string().as_bytes());
    }
    if m.gid > 0o7777777 {
        pax_record(&mut pax, b"gid", m.gid.to_string().as_bytes());
    }
    if h.size > 0o77777777777 {
        pax_record(&mut pax, b"size", h.size.to_string().as_bytes());
    }
    if m.mtime.nanos != 0 || m.mtime.secs < 0 || m.mtime.secs > 0o77777777777 {
        let v = pax_time(m.mtime);
        pax_record(&mut pax, b"mtime", v.as_bytes());
    }
    for (k, v) in &m.xattrs {
        // Escape '%' and '=' in the name as GNU tar does ('=' would end
        // the key); strata-tar decodes the same escapes.
        let mut key = b"SCHILY.xattr.".to_vec();
        for c in k {
            match c {
                b'%' => key.extend_from_slice(b"%25"),
                b'=' => key.extend_from_slice(b"%3D"),
                c => key.push(*c),
            }
        }
        pax_record(&mut pax, &key, v);
    }
    if !pax.is_empty() {
        let mut xname = b"./PaxHeaders/".to_vec();
        let tail = name
            .rsplit(|b| *b == b'/')
            .find(|c| !c.is_empty())
            .unwrap_or(b".");
        xname.extend_from_slice(&tail[..tail.len().min(80)]);
        let hdr = header_block(&xname, b'x', pax.len() as u64, b"", 0o644, 0, 0, 0, (0, 0));
        out.write_all(&hdr)?;
        out.write_all(&pax)?;
        let pad = (512 - pax.len() % 512) % 512;
        out.write_all(&vec![0u8; pad])?;
    }
    let short_name = if name.len() > 100 { &name[..100] } else { name };
    let short_link = if h.link.len() > 100 {
        &h.link[..100]
    } else {
        &h.link
    };
    let hdr = header_block(
        short_name,
        h.typeflag,
        if h.size > 0o77777777777 { 0 } else { h.size },
        short_link,
        m.mode,
        m.uid.min(0o7777777),
        m.gid.min(0o7777777),
        m.mtime.secs.clamp(0, 0o77777777777),
        h.dev,
    );
    out.write_all(&hdr)
}

#[allow(clippy::too_many_arguments)]
fn header_block(
    name: &[u8],
    typeflag: u8,
    size: u64,
    link: &[u8],
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: i64,
    dev: (u32, u32),
) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[..name.len()].copy_from_slice(name);
    octal(&mut b[100..108], mode as u64);
    octal(&mut b[108..116], uid);
    octal(&mut b[116..124], gid);
    octal(&mut b[124..136], size);
    octal(&mut b[136..148], mtime as u64);
    b[156] = typeflag;
    b[157..157 + link.len()].copy_from_slice(link);
    b[257..263].copy_from_slice(b"ustar\0");
    b[263..265].copy_from_slice(b"00");
    octal(&mut b[329..337], dev.0 as u64);
    octal(&mut b[337..345], dev.1 as u64);
    b[148..156].copy_from_slice(b"        ");
    let sum: u64 = b.iter().map(|c| *c as u64).sum();
    octal(&mut b[148..155], sum);
    b[155] = b' ';
    b
}
