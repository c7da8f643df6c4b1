//! What a Python module imports next: the imports in its compiled
//! bytecode (a `__pycache__/*.pyc` file).
//!
//! Python starts a program by importing modules one after another: each
//! import opens one `.pyc`, runs it, and the imports in it open the next.
//! From a lazy image each of those is a round trip to the registry, a
//! chain as long as the number of modules. Once a module's `.pyc` is
//! opened, the fetcher reads what it imports when it runs (see
//! `Fetcher::deps_to_prefetch`), asks for all of those modules at once,
//! and reads those in turn as they arrive, so the modules a start needs
//! arrive in as many round trips as the import tree is deep, ahead of the
//! interpreter.
//!
//! What a module imports when it runs: the `IMPORT_NAME` (and
//! `IMPORT_FROM`, which may name a submodule) instructions of its module
//! code and class bodies; a function's imports wait for a call. CPython
//! 3.8 to 3.12 share these opcodes; for 3.13 (renumbered) every name those
//! code objects use is taken (attribute names among them resolve to
//! nothing, or bring a small file early). Other versions are not read.
//!
//! The file is untrusted: the marshal stream is walked with every length
//! checked against what is left, at most [`MAX_DEPTH`] nested objects,
//! [`MAX_OBJECTS`] objects and [`MAX_NAMES`] names; anything unexpected
//! ends the walk (`None`). Values kept for back-references are shared,
//! never copied.

use std::rc::Rc;

use strata_digest::Digest;
use strata_tree::{NodeKind, Tree};

/// Objects nested at most (CPython allows 2000; modules nest a few).
const MAX_DEPTH: usize = 64;
/// Objects walked at most in one file.
const MAX_OBJECTS: usize = 1 << 20;
/// Names returned at most.
pub(crate) const MAX_NAMES: usize = 4096;
/// Longest name kept (module names are short).
const MAX_NAME: usize = 256;

/// A `.pyc` file's header: magic, flags, then 8 bytes (mtime and size, or
/// a source hash).
const HEADER: usize = 16;

/// `co_flags` of a function (its own locals): its code runs when called.
const CO_NEWLOCALS: u32 = 0x2;

/// The code object layout and import opcodes of a CPython version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Version {
    /// 32-bit fields before the first object, `co_flags` the last of them.
    ints: usize,
    /// Objects before `co_firstlineno`: code, consts, names, ...
    before: usize,
    /// Objects after it.
    after: usize,
    /// (`IMPORT_NAME`, `IMPORT_FROM`, `EXTENDED_ARG`); `None`: not known,
    /// every name is taken.
    ops: Option<(u8, u8, u8)>,
}

/// The version a `.pyc` magic number belongs to.
fn version(magic: u16) -> Option<Version> {
    // 3.8 to 3.10: argcount, posonlyargcount, kwonlyargcount, nlocals,
    // stacksize, flags; code, consts, names, varnames, freevars, cellvars,
    // filename, name; firstlineno; lnotab
    let py38 = Version {
        ints: 6,
        before: 8,
        after: 1,
        ops: Some((108, 109, 144)),
    };
    // 3.11 on: argcount, posonlyargcount, kwonlyargcount, stacksize,
    // flags; code, consts, names, localsplusnames, localspluskinds,
    // filename, name, qualname; firstlineno; linetable, exceptiontable
    let py311 = Version {
        ints: 5,
        before: 8,
        after: 2,
        ..py38
    };
    match magic {
        3400..=3439 => Some(py38),
        3450..=3531 => Some(py311),
        3550..=3571 => Some(Version { ops: None, ..py311 }),
        _ => None,
    }
}

/// Whether `head` (a file's first bytes) starts like a `.pyc` this module
/// reads.
pub(crate) fn is_pyc(head: &[u8]) -> bool {
    head.len() >= HEADER
        && head[2..4] == *b"\r\n"
        && version(u16::from_le_bytes([head[0], head[1]])).is_some()
}

/// The modules the `.pyc` file `data` imports when it runs, each once, in
/// the order met (a class body's before its module's): `a.b` for `import a.b`, `a.b` for `from a import b` (b
/// may be a submodule), `b` for `from .b import c`, `b` for `from . import
/// b`; `None` when `data` is not a `.pyc` of a known version or its
/// stream is malformed.
pub(crate) fn names(data: &[u8]) -> Option<Vec<String>> {
    if !is_pyc(data) {
        return None;
    }
    let version = version(u16::from_le_bytes([data[0], data[1]]))?;
    let mut w = Walker {
        data,
        at: HEADER,
        version,
        refs: Vec::new(),
        objects: 0,
        import_time: true,
        names: Vec::new(),
    };
    w.object(0)?;
    Some(w.names)
}

/// What the walk keeps of an object: strings (names), bytes (bytecode),
/// tuples (`co_names`); shared, as back-references reuse them.
#[derive(Clone, Debug)]
enum Val {
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<[Val]>),
    Other,
}

struct Walker<'a> {
    data: &'a [u8],
    at: usize,
    version: Version,
    /// Objects stored with the ref flag, by index (`r` points back).
    refs: Vec<Val>,
    objects: usize,
    /// Whether the code object being read runs at import.
    import_time: bool,
    names: Vec<String>,
}

impl Walker<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.data.get(self.at..end)?;
        self.at = end;
        Some(s)
    }

    fn byte(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    /// A non-negative 32-bit length.
    fn len(&mut self) -> Option<usize> {
        usize::try_from(self.i32()?).ok()
    }

    fn string(&mut self, n: usize) -> Option<Val> {
        let s = self.take(n)?;
        Some(match std::str::from_utf8(s) {
            Ok(s) if s.len() <= MAX_NAME => Val::Str(s.into()),
            _ => Val::Other,
        })
    }

    fn seq(&mut self, n: usize, depth: usize) -> Option<Val> {
        // every item takes a byte at least: a count beyond what is left
        // is a lie, not an allocation
        if n > self.data.len() - self.at {
            return None;
        }
        let mut items = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            items.push(self.object(depth + 1)?);
        }
        Some(Val::Tuple(items.into()))
    }

    fn object(&mut self, depth: usize) -> Option<Val> {
        if depth > MAX_DEPTH {
            return None;
        }
        self.objects += 1;
        if self.objects > MAX_OBJECTS {
            return None;
        }
        let code = self.byte()?;
        // a flagged object's ref index is taken before its contents are
        // read (containers hold it while their items are stored);
        // singletons and refs take none
        let flag = code & 0x80 != 0 && !b"0NFTS.r".contains(&(code & 0x7f));
        let slot = flag.then(|| {
            self.refs.push(Val::Other);
            self.refs.len() - 1
        });
        let val = match code & 0x7f {
            b'0' | b'N' | b'F' | b'T' | b'S' | b'.' => Val::Other,
            b'i' => {
                self.take(4)?;
                Val::Other
            }
            b'I' | b'g' => {
                self.take(8)?;
                Val::Other
            }
            b'y' => {
                self.take(16)?;
                Val::Other
            }
            b'f' => {
                let n = self.byte()? as usize;
                self.take(n)?;
                Val::Other
            }
            b'x' => {
                for _ in 0..2 {
                    let n = self.byte()? as usize;
                    self.take(n)?;
                }
                Val::Other
            }
            b'l' => {
                let n = self.i32()?.unsigned_abs() as usize;
                self.take(n.checked_mul(2)?)?;
                Val::Other
            }
            b's' => {
                let n = self.len()?;
                Val::Bytes(self.take(n)?.into())
            }
            b't' | b'u' | b'a' | b'A' => {
                let n = self.len()?;
                self.string(n)?
            }
            b'z' | b'Z' => {
                let n = self.byte()? as usize;
                self.string(n)?
            }
            b')' => {
                let n = self.byte()? as usize;
                self.seq(n, depth)?
            }
            b'(' | b'[' | b'<' | b'>' => {
                let n = self.len()?;
                self.seq(n, depth)?
            }
            b'{' => {
                loop {
                    if self.data.get(self.at) == Some(&b'0') {
                        self.at += 1;
                        break;
                    }
                    self.object(depth + 1)?;
                    self.object(depth + 1)?;
                }
                Val::Other
            }
            b'r' => {
                let i = self.len()?;
                return self.refs.get(i).cloned();
            }
            b'c' => {
                self.code(depth)?;
                Val::Other
            }
            _ => return None,
        };
        if let Some(i) = slot {
            self.refs[i] = val.clone();
        }
        Some(val)
    }

    fn code(&mut self, depth: usize) -> Option<()> {
        let v = self.version;
        let ints = self.take(4 * v.ints)?;
        let flags = u32::from_le_bytes(ints[4 * (v.ints - 1)..].try_into().ok()?);
        let outer = self.import_time;
        // module code and class bodies run at import; functions when called
        let mine = outer && flags & CO_NEWLOCALS == 0;
        self.import_time = mine;
        let (mut code, mut names) = (None, None);
        for i in 0..v.before {
            let o = self.object(depth + 1)?;
            match (i, o) {
                (0, Val::Bytes(b)) => code = Some(b),
                (2, Val::Tuple(t)) => names = Some(t),
                // co_code is bytes and co_names a tuple
                (0 | 2, _) => return None,
                _ => {}
            }
        }
        self.take(4)?;
        for _ in 0..v.after {
            self.object(depth + 1)?;
        }
        self.import_time = outer;
        if mine {
            self.keep(&code?, &names?);
        }
        Some(())
    }

    /// The imports of one code object (`code`, `names`).
    fn keep(&mut self, code: &[u8], names: &[Val]) {
        let name = |i: usize| match names.get(i) {
            Some(Val::Str(s)) => Some(s.clone()),
            _ => None,
        };
        let Some((import_name, import_from, extended_arg)) = self.version.ops else {
            for i in 0..names.len() {
                if let Some(s) = name(i) {
                    self.add(s.to_string());
                }
            }
            return;
        };
        let mut ext = 0usize;
        let mut module: Option<Rc<str>> = None;
        for unit in code.chunks_exact(2) {
            let arg = ext << 8 | unit[1] as usize;
            ext = 0;
            match unit[0] {
                op if op == extended_arg => ext = arg & 0xff_ffff,
                op if op == import_name => {
                    module = name(arg);
                    if let Some(m) = module.as_deref().filter(|m| !m.is_empty()) {
                        self.add(m.to_string());
                    }
                }
                op if op == import_from => {
                    if let Some(n) = name(arg) {
                        match module.as_deref() {
                            Some(m) if !m.is_empty() => self.add(format!("{m}.{n}")),
                            _ => self.add(n.to_string()),
                        }
                    }
                }
                _ => {}
            }
        }
    }

    fn add(&mut self, s: String) {
        if self.names.len() < MAX_NAMES && !self.names.contains(&s) {
            self.names.push(s);
        }
    }
}

/// The modules the interpreter imports at its start by names no bytecode
/// holds, once the module compiled at `pyc` runs: after `encodings` (the
/// first module a CPython start reads), the codec of a UTF-8 locale's
/// filesystem and standard streams (looked up by the encoding's name) and
/// the customize hooks `site` (frozen) imports.
pub(crate) fn started_with(pyc: &[u8]) -> &'static [&'static str] {
    let first = rsplit(pyc)
        .and_then(|(cache, file)| Some((rsplit(cache)?, file)))
        .is_some_and(|((pkg, cache), file)| {
            cache == b"__pycache__"
                && pkg.ends_with(b"/encodings")
                && file.starts_with(b"__init__.")
        });
    match first {
        true => &["encodings.utf_8", "sitecustomize", "usercustomize"],
        false => &[],
    }
}

/// Longest dotted name resolved, in parts.
const MAX_PARTS: usize = 8;
/// Import roots remembered per mount.
pub(crate) const MAX_ROOTS: usize = 8;

/// The files of `tree` that importing `names` from the module compiled
/// at `pyc` (an absolute path, `<dir>/__pycache__/<module>.<tag>.pyc`)
/// can open: for each name, as a module or package relative to `<dir>`
/// (`from . import x`) and from each import root (`roots`; the directory
/// above `<dir>`'s packages is added to it): its `.pyc` of the same tag,
/// its package's `__init__`, or an extension module (`<name>.*.so`, in
/// the root's `lib-dynload` too). Regular files only, each once, in the
/// order of `names`.
pub(crate) fn module_files(
    tree: &Tree,
    pyc: &[u8],
    names: &[String],
    roots: &mut Vec<Vec<u8>>,
) -> Vec<(Digest, u64)> {
    let Some((cache, file)) = rsplit(pyc) else {
        return Vec::new();
    };
    let Some((dir, b"__pycache__")) = rsplit(cache) else {
        return Vec::new();
    };
    // "<module>.<tag>.pyc": the tag (and any opt- level) stays the same
    let Some(tag) = file
        .strip_suffix(b".pyc")
        .and_then(|f| f.iter().position(|b| *b == b'.').map(|i| &f[i + 1..]))
    else {
        return Vec::new();
    };
    let r = Resolver { tree, tag };
    // the import root: the first directory up that is not a package
    let mut root = dir.to_vec();
    for _ in 0..64 {
        if !r.is_package(&root) {
            break;
        }
        match rsplit(&root) {
            Some((up, _)) => root = up.to_vec(),
            None => break,
        }
    }
    if !roots.contains(&root) && roots.len() < MAX_ROOTS {
        roots.push(root);
    }
    let mut bases: Vec<Vec<u8>> = vec![dir.to_vec()];
    for root in roots.iter() {
        for b in [root.clone(), join(root, b"lib-dynload")] {
            if !bases.contains(&b) {
                bases.push(b);
            }
        }
    }
    let mut out: Vec<(Digest, u64)> = Vec::new();
    let mut push = |f: Option<(Digest, u64)>| {
        if let Some(f) = f
            && !out.contains(&f)
        {
            out.push(f);
        }
    };
    for name in names {
        let parts: Vec<&[u8]> = name.as_bytes().split(|b| *b == b'.').collect();
        if parts.len() > MAX_PARTS || !parts.iter().all(|p| is_identifier(p)) {
            continue;
        }
        for base in &bases {
            // `import a.b.c` runs a, a.b, then a.b.c
            let mut at = base.clone();
            for part in &parts {
                push(r.module(&at, part));
                for so in r.extensions(&at, part) {
                    push(Some(so));
                }
                at = join(&at, part);
                if !r.is_package(&at) {
                    break;
                }
                push(r.file(&join(&join(&at, b"__pycache__"), &r.pyc_name(b"__init__"))));
            }
        }
    }
    out
}

struct Resolver<'a> {
    tree: &'a Tree,
    tag: &'a [u8],
}

impl Resolver<'_> {
    fn file(&self, path: &[u8]) -> Option<(Digest, u64)> {
        crate::elf::resolve(self.tree, path)
    }

    fn pyc_name(&self, module: &[u8]) -> Vec<u8> {
        [module, b".", self.tag, b".pyc"].concat()
    }

    /// `<dir>/__pycache__/<name>.<tag>.pyc`
    fn module(&self, dir: &[u8], name: &[u8]) -> Option<(Digest, u64)> {
        self.file(&join(&join(dir, b"__pycache__"), &self.pyc_name(name)))
    }

    /// A directory with an `__init__`.
    fn is_package(&self, dir: &[u8]) -> bool {
        self.file(&join(dir, b"__init__.py")).is_some() || self.module(dir, b"__init__").is_some()
    }

    /// `<dir>/<name>.*.so` (`<name>.cpython-311-x86_64-linux-gnu.so`,
    /// `<name>.abi3.so`, `<name>.so`).
    fn extensions(&self, dir: &[u8], name: &[u8]) -> Vec<(Digest, u64)> {
        let Some(ino) = dir_ino(self.tree, dir) else {
            return Vec::new();
        };
        let Some(kids) = self.tree.children(ino) else {
            return Vec::new();
        };
        kids.filter(|(n, _)| {
            n.len() > name.len() + 3
                && n.starts_with(name)
                && n[name.len()] == b'.'
                && n.ends_with(b".so")
        })
        .take(4)
        .filter_map(|(n, _)| self.file(&join(dir, n)))
        .collect()
    }
}

/// The directory `path` names (no symlinks followed).
fn dir_ino(tree: &Tree, path: &[u8]) -> Option<u64> {
    let mut ino = 0;
    for c in path.split(|b| *b == b'/').filter(|c| !c.is_empty()) {
        ino = tree.child(ino, c)?;
    }
    matches!(tree.node(ino)?.kind, NodeKind::Dir).then_some(ino)
}

fn rsplit(p: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = p.iter().rposition(|b| *b == b'/')?;
    Some((&p[..i], &p[i + 1..]))
}

fn join(a: &[u8], b: &[u8]) -> Vec<u8> {
    [a, b"/", b].concat()
}

fn is_identifier(p: &[u8]) -> bool {
    !p.is_empty()
        && p.len() <= MAX_NAME
        && !p[0].is_ascii_digit()
        && p.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `source` compiled by this machine's python3 (a test dependency,
    /// as in `scripts/install-deps.sh`).
    fn compile(source: &str) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("m.py");
        std::fs::write(&src, source).unwrap();
        let out = dir.path().join("m.pyc");
        let st = std::process::Command::new("python3")
            .arg("-c")
            .arg("import py_compile, sys; py_compile.compile(sys.argv[1], cfile=sys.argv[2], doraise=True)")
            .arg(&src)
            .arg(&out)
            .status()
            .expect("python3 is needed for these tests (scripts/install-deps.sh)");
        assert!(st.success());
        std::fs::read(out).unwrap()
    }

    const MODULE: &str = "\
import os.path
import json as j
from . import sibling
from .pkg.sub import thing
from collections import abc

def f():
    import sqlite3
    return sqlite3.connect

class C:
    import xml.dom
    def m(self):
        from email import message
        return os.path.join('a', 'b')
";

    #[test]
    fn the_imports_that_run_at_import_are_read() {
        let data = compile(MODULE);
        let mut names = names(&data).expect("a pyc of this machine's python");
        // a class body's before its module's (it is read first); a
        // function's imports (sqlite3, email) wait for a call
        names.sort();
        assert_eq!(
            names,
            [
                "collections",
                "collections.abc",
                "json",
                "os.path",
                "pkg.sub",
                "pkg.sub.thing",
                "sibling",
                "xml.dom"
            ],
        );
    }

    #[test]
    fn what_is_not_a_pyc_of_a_known_version_is_not_read() {
        let mut data = compile("import json\n");
        assert!(is_pyc(&data));
        assert!(names(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0\0\0").is_none());
        assert!(names(&data[..10]).is_none());
        // python 2.7's magic
        data[0..2].copy_from_slice(&62211u16.to_le_bytes());
        assert!(names(&data).is_none());
    }

    #[test]
    fn a_broken_stream_ends_the_walk_without_a_panic_or_a_big_allocation() {
        let data = compile(MODULE);
        // every truncation
        for n in 0..data.len() {
            let _ = names(&data[..n]);
        }
        assert!(names(&data[..data.len() - 1]).is_none());
        // every byte flipped in turn, several ways
        let mut seed = 0x2545f4914f6cdd1du64;
        for i in HEADER..data.len() {
            for _ in 0..4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let mut d = data.clone();
                d[i] ^= (seed as u8) | 1;
                if let Some(n) = names(&d) {
                    assert!(n.len() <= MAX_NAMES);
                }
            }
        }
        // a tuple claiming two billion items
        let mut d = data[..HEADER].to_vec();
        d.extend_from_slice(b"(\xff\xff\xff\x7f");
        assert!(names(&d).is_none());
        // nesting beyond the limit
        let mut d = data[..HEADER].to_vec();
        d.extend(std::iter::repeat_n(b')', 10_000).flat_map(|b| [b, 1]));
        assert!(names(&d).is_none());
        // a ref to nothing
        let mut d = data[..HEADER].to_vec();
        d.extend_from_slice(b"r\x05\0\0\0");
        assert!(names(&d).is_none());
    }

    #[test]
    fn every_module_of_this_machines_python_is_read() {
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['stdlib'])",
            ])
            .output()
            .expect("python3 is needed for these tests (scripts/install-deps.sh)");
        let stdlib = String::from_utf8(out.stdout).unwrap();
        let mut seen = 0;
        let mut todo = vec![std::path::PathBuf::from(stdlib.trim())];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if e.file_type().unwrap().is_dir() {
                    todo.push(p);
                } else if p.extension().is_some_and(|x| x == "pyc") {
                    let data = std::fs::read(&p).unwrap();
                    assert!(names(&data).is_some(), "{} is not read", p.display());
                    seen += 1;
                }
            }
        }
        assert!(
            seen > 100,
            "only {seen} compiled modules under {}",
            stdlib.trim()
        );
        let decoder = std::path::Path::new(stdlib.trim()).join("json/__pycache__");
        let f = std::fs::read_dir(decoder)
            .unwrap()
            .flatten()
            .find(|e| e.file_name().to_string_lossy().starts_with("decoder."))
            .expect("json.decoder compiled");
        let n = names(&std::fs::read(f.path()).unwrap()).unwrap();
        for want in ["re", "json.scanner", "_json"] {
            assert!(n.iter().any(|x| x == want), "{want} not in {n:?}");
        }
    }

    fn tree(files: &[&str]) -> (Tree, impl Fn(&str) -> (Digest, u64)) {
        use strata_tar::EntryKind;
        let mut entries = Vec::new();
        let mut dirs = std::collections::BTreeSet::new();
        let id = |p: &str| (Digest::sha256_of(p.as_bytes()), p.len() as u64);
        for f in files {
            let mut at = String::new();
            for c in f.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
                at = if at.is_empty() {
                    c.to_string()
                } else {
                    format!("{at}/{c}")
                };
                dirs.insert(at.clone());
            }
        }
        let e = crate::elf::tests::entry;
        for d in &dirs {
            entries.push(e(d, EntryKind::Dir));
        }
        for f in files {
            let (digest, size) = id(f);
            entries.push(e(f, EntryKind::Regular { digest, size }));
        }
        let mut t = Tree::new();
        t.apply_layer(&entries).unwrap();
        (t, id)
    }

    #[test]
    fn a_start_brings_the_modules_it_imports_by_computed_names() {
        let lib = "/usr/lib/python3.11";
        let enc = format!("{lib}/encodings/__pycache__/__init__.cpython-311.pyc");
        assert_eq!(
            started_with(enc.as_bytes()),
            ["encodings.utf_8", "sitecustomize", "usercustomize"]
        );
        for other in [
            format!("{lib}/encodings/__pycache__/aliases.cpython-311.pyc"),
            format!("{lib}/json/__pycache__/__init__.cpython-311.pyc"),
            format!("{lib}/encodings/__init__.py"),
        ] {
            assert!(started_with(other.as_bytes()).is_empty(), "{other}");
        }
    }

    #[test]
    fn names_resolve_to_modules_packages_and_extensions_of_the_image() {
        let lib = "usr/lib/python3.11";
        let files: Vec<String> = [
            "__pycache__/enum.cpython-311.pyc",
            "__pycache__/enum.cpython-311.opt-1.pyc",
            "__pycache__/types.cpython-311.pyc",
            "json/__init__.py",
            "json/__pycache__/__init__.cpython-311.pyc",
            "json/__pycache__/decoder.cpython-311.pyc",
            "json/__pycache__/scanner.cpython-311.pyc",
            "email/__init__.py",
            "email/__pycache__/__init__.cpython-311.pyc",
            "email/mime/__init__.py",
            "email/mime/__pycache__/__init__.cpython-311.pyc",
            "email/mime/__pycache__/text.cpython-311.pyc",
            "lib-dynload/_json.cpython-311-x86_64-linux-gnu.so",
            "lib-dynload/_jsonx.cpython-311-x86_64-linux-gnu.so",
        ]
        .iter()
        .map(|f| format!("{lib}/{f}"))
        .collect();
        let refs: Vec<&str> = files.iter().map(String::as_str).collect();
        let (t, id) = tree(&refs);
        let f = |p: &str| id(&format!("{lib}/{p}"));
        let names: Vec<String> = [
            "scanner",
            "_json",
            "enum",
            "email.mime.text",
            "re",
            "join",
            "9x",
            "a/b",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut roots = Vec::new();
        let got = module_files(
            &t,
            format!("/{lib}/json/__pycache__/decoder.cpython-311.pyc").as_bytes(),
            &names,
            &mut roots,
        );
        assert_eq!(
            got,
            vec![
                f("json/__pycache__/scanner.cpython-311.pyc"),
                f("lib-dynload/_json.cpython-311-x86_64-linux-gnu.so"),
                f("__pycache__/enum.cpython-311.pyc"),
                f("email/__pycache__/__init__.cpython-311.pyc"),
                f("email/mime/__pycache__/__init__.cpython-311.pyc"),
                f("email/mime/__pycache__/text.cpython-311.pyc"),
            ]
        );
        // the root above the json package is remembered
        assert_eq!(roots, vec![format!("/{lib}").into_bytes()]);
        // a module of another tree finds the standard library through it
        let (t2, _) = tree(&[&files[0], "opt/app/__pycache__/main.cpython-311.pyc"]);
        let got = module_files(
            &t2,
            b"/opt/app/__pycache__/main.cpython-311.pyc",
            &["enum".to_string()],
            &mut roots,
        );
        assert_eq!(got, vec![f("__pycache__/enum.cpython-311.pyc")]);
        assert_eq!(roots.len(), 2);
        // not a module of a __pycache__: nothing
        assert!(
            module_files(
                &t,
                format!("/{lib}/json/decoder.pyc").as_bytes(),
                &names,
                &mut roots
            )
            .is_empty()
        );
    }
}
