//! What a dynamically linked program loads next: its ELF interpreter and
//! the libraries it names (`PT_INTERP`, `DT_NEEDED`, `DT_RUNPATH`).
//!
//! A program started from a lazy image opens its interpreter, then each
//! library, one after another, each a round trip to the registry. Once a
//! program's ELF file has arrived, the fetcher reads these few headers
//! from it and asks for all of its libraries at once (see
//! `Fetcher::prefetch_deps`). Only a guess at what comes next: every file
//! is still checked whole before it is served, and a name that resolves
//! to nothing is skipped.
//!
//! The file is untrusted: every offset and size is checked, at most
//! [`MAX_PHDRS`] program headers, [`MAX_DYNAMIC`] bytes of dynamic
//! section, [`MAX_NEEDED`] names of at most [`MAX_NAME`] bytes are read.

use std::io;

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_RPATH: u64 = 15;
const DT_RUNPATH: u64 = 29;

/// Program headers read at most.
const MAX_PHDRS: usize = 128;
/// Bytes of `PT_DYNAMIC` read at most.
const MAX_DYNAMIC: u64 = 64 * 1024;
/// Libraries named at most.
const MAX_NEEDED: usize = 64;
/// Longest name or path read.
const MAX_NAME: usize = 4096;

/// `e_machine` values with a Debian multiarch library directory.
pub(crate) const EM_386: u16 = 3;
pub(crate) const EM_X86_64: u16 = 62;
pub(crate) const EM_AARCH64: u16 = 183;

/// What an ELF file asks the dynamic loader for.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Deps {
    /// `e_machine`.
    pub machine: u16,
    /// A 64-bit file.
    pub wide: bool,
    /// `PT_INTERP`: the dynamic loader's path.
    pub interp: Option<Vec<u8>>,
    /// `DT_NEEDED`, in order.
    pub needed: Vec<Vec<u8>>,
    /// `DT_RUNPATH` (or `DT_RPATH`) directories, in order.
    pub search: Vec<Vec<u8>>,
}

/// Reads `len` bytes at an offset of the file (fewer at its end).
pub(crate) type ReadAt<'a> = dyn Fn(u64, usize) -> io::Result<Vec<u8>> + 'a;

/// The interpreter and libraries of the little-endian ELF file read by
/// `read_at`; `None` for anything else (not ELF, big-endian, truncated,
/// out-of-range headers) or when it names neither.
pub(crate) fn deps(read_at: &ReadAt<'_>) -> Option<Deps> {
    let h = read_at(0, 64).ok()?;
    if h.len() < 52 || h[..4] != *b"\x7fELF" || h[5] != 1 {
        return None;
    }
    let wide = match h[4] {
        1 => false,
        2 if h.len() >= 64 => true,
        _ => return None,
    };
    let machine = u16le(&h, 18)?;
    let (phoff, phentsize, phnum) = if wide {
        (u64le(&h, 32)?, u16le(&h, 54)?, u16le(&h, 56)?)
    } else {
        (u32le(&h, 28)? as u64, u16le(&h, 42)?, u16le(&h, 44)?)
    };
    let want = if wide { 56 } else { 32 };
    if (phentsize as usize) < want || phnum as usize > MAX_PHDRS || phnum == 0 {
        return None;
    }
    let table = read_at(phoff, phentsize as usize * phnum as usize).ok()?;
    // (type, offset, vaddr, filesz)
    let mut phdrs = Vec::with_capacity(phnum as usize);
    for i in 0..phnum as usize {
        let p = table.get(i * phentsize as usize..(i + 1) * phentsize as usize)?;
        phdrs.push(if wide {
            (u32le(p, 0)?, u64le(p, 8)?, u64le(p, 16)?, u64le(p, 32)?)
        } else {
            let w = |o| u32le(p, o).map(u64::from);
            (u32le(p, 0)?, w(4)?, w(8)?, w(16)?)
        });
    }
    let mut out = Deps {
        machine,
        wide,
        ..Deps::default()
    };
    if let Some(&(_, off, _, size)) = phdrs.iter().find(|p| p.0 == PT_INTERP) {
        let s = read_at(off, (size as usize).min(MAX_NAME)).ok()?;
        out.interp = Some(cstr(&s).to_vec()).filter(|s| !s.is_empty());
    }
    // the dynamic section's strings are found by address: the load
    // segment holding that address says where they are in the file
    let file_offset = |vaddr: u64| {
        phdrs
            .iter()
            .filter(|p| p.0 == PT_LOAD)
            .find(|p| vaddr >= p.2 && vaddr - p.2 < p.3)
            .map(|p| p.1 + (vaddr - p.2))
    };
    if let Some(&(_, off, _, size)) = phdrs.iter().find(|p| p.0 == PT_DYNAMIC) {
        let dynamic = read_at(off, size.min(MAX_DYNAMIC) as usize).ok()?;
        let step = if wide { 16 } else { 8 };
        let (mut strtab, mut needed, mut search) = (None, Vec::new(), None);
        for e in dynamic.chunks_exact(step) {
            let (tag, val) = if wide {
                (u64le(e, 0)?, u64le(e, 8)?)
            } else {
                (u32le(e, 0)? as u64, u32le(e, 4)? as u64)
            };
            match tag {
                DT_NULL => break,
                DT_NEEDED if needed.len() < MAX_NEEDED => needed.push(val),
                DT_STRTAB => strtab = Some(val),
                // RUNPATH wins over RPATH
                DT_RUNPATH => search = Some(val),
                DT_RPATH if search.is_none() => search = Some(val),
                _ => {}
            }
        }
        if let Some(base) = strtab.and_then(file_offset) {
            let string = |at: u64| -> Option<Vec<u8>> {
                let s = read_at(base.checked_add(at)?, MAX_NAME).ok()?;
                Some(cstr(&s).to_vec())
            };
            out.needed = needed
                .into_iter()
                .filter_map(string)
                .filter(|n| !n.is_empty())
                .collect();
            if let Some(s) = search.and_then(string) {
                out.search = s
                    .split(|b| *b == b':')
                    .filter(|d| !d.is_empty())
                    .map(<[u8]>::to_vec)
                    .collect();
            }
        }
    }
    (out.interp.is_some() || !out.needed.is_empty()).then_some(out)
}

/// Where the dynamic loader looks for a library named without a slash,
/// after the file's own `DT_RUNPATH`: the multiarch directories of
/// Debian and Ubuntu for the file's machine, then the usual ones.
pub(crate) fn library_dirs(d: &Deps) -> Vec<Vec<u8>> {
    let mut dirs: Vec<Vec<u8>> = d
        .search
        .iter()
        // $ORIGIN and friends need the file's own path: not guessed
        .filter(|s| s.first() == Some(&b'/') && !s.contains(&b'$'))
        .cloned()
        .collect();
    let triple = match d.machine {
        EM_X86_64 if d.wide => Some("x86_64-linux-gnu"),
        EM_AARCH64 if d.wide => Some("aarch64-linux-gnu"),
        EM_386 if !d.wide => Some("i386-linux-gnu"),
        _ => None,
    };
    if let Some(t) = triple {
        dirs.push(format!("/lib/{t}").into_bytes());
        dirs.push(format!("/usr/lib/{t}").into_bytes());
    }
    if d.wide {
        dirs.push(b"/lib64".to_vec());
        dirs.push(b"/usr/lib64".to_vec());
    }
    for s in ["/lib", "/usr/lib", "/usr/local/lib"] {
        dirs.push(s.as_bytes().to_vec());
    }
    dirs
}

fn cstr(s: &[u8]) -> &[u8] {
    s.iter().position(|b| *b == 0).map_or(s, |n| &s[..n])
}

fn u16le(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32le(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64le(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The regular file `path` names in `tree`, following symlinks as the
/// kernel would inside the image's root (absolute targets start again at
/// the root, `..` stops at it), at most 40 of them: its content digest
/// and size.
pub(crate) fn resolve(
    tree: &strata_tree::Tree,
    path: &[u8],
) -> Option<(strata_digest::Digest, u64)> {
    use strata_tree::NodeKind;
    const ROOT: u64 = 0;
    let mut hops = 0;
    // the components still to walk, last one first
    let mut todo: Vec<Vec<u8>> = split_rev(path);
    // the directories walked so far (for `..`)
    let mut dirs = vec![ROOT];
    while let Some(c) = todo.pop() {
        let here = *dirs.last()?;
        match c.as_slice() {
            b"." => continue,
            b".." => {
                if dirs.len() > 1 {
                    dirs.pop();
                }
                continue;
            }
            _ => {}
        }
        let ino = tree.child(here, &c)?;
        match &tree.node(ino)?.kind {
            NodeKind::Dir => dirs.push(ino),
            NodeKind::Symlink { target } => {
                hops += 1;
                if hops > 40 {
                    return None;
                }
                if target.first() == Some(&b'/') {
                    dirs.truncate(1);
                }
                todo.extend(split_rev(target));
            }
            NodeKind::Regular { digest, size } if todo.is_empty() => return Some((*digest, *size)),
            _ => return None,
        }
    }
    None
}

/// The machine's multiarch triple (Debian's library directories).
const TRIPLE: &str = if cfg!(target_arch = "aarch64") {
    "aarch64-linux-gnu"
} else {
    "x86_64-linux-gnu"
};

/// Where a C library and its data live, most specific first.
pub(crate) fn libc_dirs() -> [String; 6] {
    [
        format!("/lib/{TRIPLE}"),
        format!("/usr/lib/{TRIPLE}"),
        "/lib64".into(),
        "/usr/lib64".into(),
        "/lib".into(),
        "/usr/lib".into(),
    ]
}

/// The small files a dynamically linked program's first calls read, as
/// `tree` has them: glibc's setlocale (C.UTF-8's `LC_CTYPE`, the gconv
/// module cache) and tzset (`/etc/localtime`). Content digests and sizes,
/// in that order.
pub(crate) fn program_start_files(tree: &strata_tree::Tree) -> Vec<(strata_digest::Digest, u64)> {
    let first = |paths: Vec<String>| paths.into_iter().find_map(|p| resolve(tree, p.as_bytes()));
    let mut out = Vec::new();
    out.extend(first(vec![
        "/usr/lib/locale/C.utf8/LC_CTYPE".into(),
        "/usr/lib/locale/C.UTF-8/LC_CTYPE".into(),
    ]));
    out.extend(first(
        libc_dirs()
            .iter()
            .map(|d| format!("{d}/gconv/gconv-modules.cache"))
            .collect(),
    ));
    out.extend(resolve(tree, b"/etc/localtime"));
    out
}

fn split_rev(p: &[u8]) -> Vec<Vec<u8>> {
    p.split(|b| *b == b'/')
        .filter(|c| !c.is_empty())
        .rev()
        .map(<[u8]>::to_vec)
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::process::Command;

    fn from_bytes(b: &[u8]) -> Option<Deps> {
        deps(&|off, len| {
            let s = usize::try_from(off).unwrap_or(usize::MAX).min(b.len());
            Ok(b[s..(s.saturating_add(len)).min(b.len())].to_vec())
        })
    }

    /// What `readelf` says a file loads: (interpreter, needed, runpath).
    fn readelf(path: &str) -> (Option<String>, Vec<String>) {
        let out = Command::new("readelf")
            .args(["-W", "-l", "-d", path])
            .output()
            .expect("readelf (binutils) runs");
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        let interp = text.lines().find_map(|l| {
            l.split_once("[Requesting program interpreter: ")
                .map(|(_, r)| r.trim_end_matches(']').to_string())
        });
        let needed = text
            .lines()
            .filter(|l| l.contains("(NEEDED)"))
            .map(|l| {
                let (_, r) = l.split_once('[').unwrap();
                r.trim_end_matches(']').to_string()
            })
            .collect();
        (interp, needed)
    }

    #[test]
    fn reads_what_readelf_reads_from_real_programs_and_libraries() {
        let mut seen = 0;
        for p in [
            "/usr/bin/ls",
            "/usr/bin/python3",
            "/usr/bin/skopeo",
            "/usr/lib/x86_64-linux-gnu/libz.so.1",
            "/usr/lib/x86_64-linux-gnu/libc.so.6",
        ] {
            let Ok(bytes) = std::fs::read(p) else {
                continue;
            };
            seen += 1;
            let (interp, needed) = readelf(p);
            let d = from_bytes(&bytes).unwrap_or_default();
            assert_eq!(
                d.interp
                    .as_deref()
                    .map(|s| String::from_utf8_lossy(s).to_string()),
                interp,
                "{p}"
            );
            let got: Vec<String> = d
                .needed
                .iter()
                .map(|s| String::from_utf8_lossy(s).to_string())
                .collect();
            assert_eq!(got, needed, "{p}");
            if interp.is_some() {
                assert_eq!(d.machine, EM_X86_64, "{p}");
                assert!(d.wide);
            }
        }
        assert!(seen >= 3, "too few ELF files on this machine to compare");
    }

    #[test]
    fn not_elf_truncated_and_hostile_headers_give_nothing() {
        assert_eq!(from_bytes(b""), None);
        assert_eq!(from_bytes(b"#!/bin/sh\necho hi\n"), None);
        let real = std::fs::read("/usr/bin/ls").expect("/usr/bin/ls");
        // every truncation: no panic, and never more than the whole file says
        let full = from_bytes(&real).unwrap();
        for n in (0..real.len().min(16384)).step_by(61) {
            if let Some(d) = from_bytes(&real[..n]) {
                assert!(d.needed.len() <= full.needed.len());
            }
        }
        // a program header table far past the end, or absurdly many
        let mut bad = real.clone();
        bad[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(from_bytes(&bad), None);
        let mut bad = real.clone();
        bad[56..58].copy_from_slice(&u16::MAX.to_le_bytes());
        assert_eq!(from_bytes(&bad), None);
        // big-endian: not read
        let mut bad = real;
        bad[5] = 2;
        assert_eq!(from_bytes(&bad), None);
    }

    /// A tar entry of `path` (root's, mode 755) for the trees of tests.
    pub(crate) fn entry(path: &str, kind: strata_tar::EntryKind) -> strata_tar::Entry {
        strata_tar::Entry {
            path: path.as_bytes().to_vec(),
            kind,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: strata_tar::Timestamp { secs: 1, nanos: 0 },
            xattrs: Default::default(),
        }
    }

    #[test]
    fn paths_resolve_through_symlinks_inside_the_image_only() {
        use strata_tar::EntryKind;
        let e = entry;
        let link = |p: &str, t: &str| {
            e(
                p,
                EntryKind::Symlink {
                    target: t.as_bytes().to_vec(),
                },
            )
        };
        let libc = strata_digest::Digest::sha256_of(b"libc");
        let mut tree = strata_tree::Tree::new();
        tree.apply_layer(&[
            e("usr", EntryKind::Dir),
            e("usr/lib", EntryKind::Dir),
            e("usr/lib/x86_64-linux-gnu", EntryKind::Dir),
            e(
                "usr/lib/x86_64-linux-gnu/libc.so.6",
                EntryKind::Regular {
                    digest: libc,
                    size: 4,
                },
            ),
            link("usr/lib/x86_64-linux-gnu/libc.so", "libc.so.6"),
            link("lib", "usr/lib"),
            e("usr/lib64", EntryKind::Dir),
            link("usr/lib64/ld.so", "../lib/x86_64-linux-gnu/libc.so"),
            link("lib64", "usr/lib64"),
            link("up", "../../../../usr/lib/x86_64-linux-gnu/libc.so.6"),
            link("loop", "loop"),
        ])
        .unwrap();
        for p in [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/lib/x86_64-linux-gnu/libc.so",
            "/lib64/ld.so",
            "/up",
            "/usr/./lib/../lib/x86_64-linux-gnu/libc.so.6",
        ] {
            assert_eq!(resolve(&tree, p.as_bytes()), Some((libc, 4)), "{p}");
        }
        for p in [
            "/loop",
            "/lib",
            "/nothere",
            "/lib/x86_64-linux-gnu/libc.so.6/x",
        ] {
            assert_eq!(resolve(&tree, p.as_bytes()), None, "{p}");
        }
    }

    #[test]
    fn runpath_comes_before_the_machines_directories() {
        let d = Deps {
            machine: EM_X86_64,
            wide: true,
            search: vec![b"/opt/app/lib".to_vec(), b"$ORIGIN/../lib".to_vec()],
            ..Deps::default()
        };
        let dirs = library_dirs(&d);
        assert_eq!(dirs[0], b"/opt/app/lib");
        assert_eq!(dirs[1], b"/lib/x86_64-linux-gnu");
        assert!(!dirs.iter().any(|d| d.contains(&b'$')));
        assert!(dirs.contains(&b"/usr/lib".to_vec()));
    }
}
