//! Tars written by real tools (GNU tar in several formats, bsdtar, Python's
//! tarfile): every one imports, its entries match the source files, and the
//! record rebuilds the exact bytes.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

use strata_digest::Digest;
use strata_tar::{EntryKind, ObjectSink, TarError, import_tar};

#[derive(Default)]
struct MemSink(HashMap<Digest, Vec<u8>>);

impl ObjectSink for MemSink {
    fn put(&mut self, content: &mut dyn Read, size: u64) -> io::Result<Digest> {
        let mut v = Vec::new();
        content.take(size).read_to_end(&mut v)?;
        if v.len() as u64 != size {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short"));
        }
        let d = Digest::sha256_of(&v);
        self.0.insert(d, v);
        Ok(d)
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A source tree with the awkward cases.
fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("dir/sub")).unwrap();
    fs::write(root.join("dir/small.txt"), b"hello\n").unwrap();
    fs::write(root.join("empty"), b"").unwrap();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i * 31 % 256) as u8).collect();
    fs::write(root.join("dir/big.bin"), &big).unwrap();
    fs::hard_link(root.join("dir/small.txt"), root.join("hardlink")).unwrap();
    std::os::unix::fs::symlink("dir/small.txt", root.join("symlink")).unwrap();
    let long = "l".repeat(120);
    let deep = root.join(format!("{long}/{}", "m".repeat(150)));
    fs::create_dir_all(&deep).unwrap();
    fs::write(deep.join("f".repeat(200)), b"long name content").unwrap();
    std::os::unix::fs::symlink("t".repeat(180), root.join("longlink")).unwrap();
    fs::hard_link(deep.join("f".repeat(200)), root.join("zz-long-hardlink")).unwrap();
    fs::write(
        root.join(std::ffi::OsStr::from_bytes(b"caf\xe9")),
        b"latin1",
    )
    .unwrap();
    let zero = root.join("mode0000");
    fs::write(&zero, b"locked").unwrap();
    fs::set_permissions(&zero, std::os::unix::fs::PermissionsExt::from_mode(0o000)).unwrap();
    // Sparse: 4 MiB with data at 0, 1 MiB and the end.
    let sp = fs::File::create(root.join("sparse")).unwrap();
    sp.set_len(4 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    sp.write_all_at(b"start", 0).unwrap();
    sp.write_all_at(&[7u8; 5000], 1 << 20).unwrap();
    sp.write_all_at(b"end", (4 << 20) - 3).unwrap();
    run(Command::new("mkfifo").arg(root.join("fifo")));
    run(Command::new("mknod")
        .arg(root.join("null"))
        .args(["c", "1", "3"]));
    run(Command::new("mknod")
        .arg(root.join("loopdev"))
        .args(["b", "7", "200"]));
    // xattrs (user namespace) when the filesystem allows them
    run(Command::new("setfattr")
        .args(["-n", "user.test", "-v", "value"])
        .arg(root.join("dir/small.txt")));
    run(Command::new("setfattr")
        .args(["-n", "user.we ird%=", "-v", "0x0102"])
        .arg(root.join("dir/small.txt")));
    // owners beyond 16 bits
    run(Command::new("chown")
        .arg("70000:80000")
        .arg(root.join("empty")));
    run(Command::new("chown")
        .arg("3000000:3000001")
        .arg(root.join("dir/small.txt")));
    // nanosecond mtime
    run(Command::new("touch")
        .args(["-d", "2021-05-06 07:08:09.123456789"])
        .arg(root.join("dir/big.bin")));
}

fn check(tar_path: &Path, src: &Path, label: &str) -> strata_tar::Imported {
    let bytes = fs::read(tar_path).unwrap();
    let mut sink = MemSink::default();
    let imp = import_tar(&bytes[..], &mut sink).unwrap_or_else(|e| panic!("{label}: {e}"));
    assert_eq!(imp.diff_id, Digest::sha256_of(&bytes), "{label}");
    assert_eq!(imp.size, bytes.len() as u64, "{label}");

    // Rebuild byte for byte.
    let mut out = Vec::new();
    let mut open = |d: &Digest| -> io::Result<Box<dyn Read>> {
        Ok(Box::new(io::Cursor::new(sink.0[d].clone())))
    };
    imp.record.rebuild(&mut open, &mut out).unwrap();
    assert!(out == bytes, "{label}: rebuild differs");

    // Encode/decode round trip.
    let mut enc = Vec::new();
    imp.record.encode(&mut enc).unwrap();
    let dec = strata_tar::LayerRecord::decode(&enc[..]).unwrap();
    assert_eq!(dec, imp.record, "{label}");

    // Every regular entry's content equals the source file's.
    let mut seen_regular = 0;
    for e in &imp.record.entries {
        let p = src.join(std::ffi::OsStr::from_bytes(&e.path));
        if let EntryKind::Regular { digest, size } = &e.kind {
            let want = fs::read(&p).unwrap_or_else(|err| panic!("{label}: {}: {err}", p.display()));
            assert_eq!(*size, want.len() as u64, "{label}: {}", p.display());
            assert_eq!(
                *digest,
                Digest::sha256_of(&want),
                "{label}: {}",
                p.display()
            );
            seen_regular += 1;
        }
    }
    assert!(
        seen_regular >= 2,
        "{label}: only {seen_regular} regular files"
    );
    imp
}

fn entry<'a>(imp: &'a strata_tar::Imported, path: &[u8]) -> &'a strata_tar::Entry {
    imp.record
        .entries
        .iter()
        .find(|e| e.path == path)
        .unwrap_or_else(|| panic!("no entry {:?}", String::from_utf8_lossy(path)))
}

#[test]
fn gnu_bsd_python_tars_import_and_rebuild_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src);
    let variants: Vec<(&str, Vec<&str>)> = vec![
        ("gnu", vec!["tar", "--format=gnu", "--sparse"]),
        (
            "posix-sparse-1.0",
            vec![
                "tar",
                "--format=posix",
                "--sparse",
                "--sparse-version=1.0",
                "--xattrs",
            ],
        ),
        (
            "posix-sparse-0.1",
            vec!["tar", "--format=posix", "--sparse", "--sparse-version=0.1"],
        ),
        (
            "posix-sparse-0.0",
            vec!["tar", "--format=posix", "--sparse", "--sparse-version=0.0"],
        ),
        (
            "posix",
            vec!["tar", "--format=posix", "--xattrs", "--xattrs-include=*"],
        ),
        ("bsdtar", vec!["bsdtar", "--format=pax"]),
        ("bsdtar-gnutar", vec!["bsdtar", "--format=gnutar"]),
    ];
    for (label, cmd) in variants {
        let out = tmp.path().join(format!("{label}.tar"));
        let mut c = Command::new(cmd[0]);
        c.args(&cmd[1..])
            .arg("-cf")
            .arg(&out)
            .arg("-C")
            .arg(&src)
            .arg(".");
        run(&mut c);
        let imp = check(&out, &src, label);
        match entry(&imp, b"hardlink").kind.clone() {
            EntryKind::Hardlink { target } => assert_eq!(target, b"dir/small.txt", "{label}"),
            EntryKind::Regular { .. } => {
                // the first name of the pair in archive order may be "hardlink"
                assert!(
                    matches!(
                        entry(&imp, b"dir/small.txt").kind,
                        EntryKind::Hardlink { .. }
                    ),
                    "{label}"
                );
            }
            k => panic!("{label}: hardlink is {k:?}"),
        }
        assert_eq!(
            entry(&imp, b"symlink").kind,
            EntryKind::Symlink {
                target: b"dir/small.txt".to_vec()
            }
        );
        assert_eq!(
            entry(&imp, b"null").kind,
            EntryKind::CharDev { major: 1, minor: 3 },
            "{label}"
        );
        assert_eq!(
            entry(&imp, b"loopdev").kind,
            EntryKind::BlockDev {
                major: 7,
                minor: 200
            },
            "{label}"
        );
        assert_eq!(entry(&imp, b"fifo").kind, EntryKind::Fifo, "{label}");
        assert_eq!(entry(&imp, b"mode0000").mode, 0, "{label}");
        assert_eq!(
            (entry(&imp, b"empty").uid, entry(&imp, b"empty").gid),
            (70000, 80000),
            "{label}"
        );
        assert_eq!(entry(&imp, b"dir/small.txt").uid, 3000000, "{label}");
        assert_eq!(entry(&imp, b"").kind, EntryKind::Dir, "{label}: root entry");
        if label.starts_with("posix") || label == "bsdtar" {
            assert_eq!(
                entry(&imp, b"dir/big.bin").mtime.nanos,
                123456789,
                "{label}"
            );
        }
        if ["posix", "posix-sparse-1.0", "bsdtar"].contains(&label) {
            let x = &entry(&imp, b"dir/small.txt").xattrs;
            let want: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = [
                (b"user.test".to_vec(), b"value".to_vec()),
                (b"user.we ird%=".to_vec(), vec![1u8, 2]),
            ]
            .into();
            assert_eq!(x, &want, "{label}");
        }
        if label.contains("sparse") || label == "gnu" {
            // the holes were not stored
            assert!(imp.size < 1 << 20, "{label}: {} bytes", imp.size);
        }
    }
}

#[test]
fn python_tarfile_formats() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    make_tree(&src);
    for fmt in ["PAX_FORMAT", "GNU_FORMAT"] {
        let out = tmp.path().join(format!("py-{fmt}.tar"));
        let script = format!(
            "import tarfile,sys\nwith tarfile.open(sys.argv[1],'w',format=tarfile.{fmt}) as t:\n t.add(sys.argv[2],arcname='.')\n"
        );
        run(Command::new("python3")
            .arg("-c")
            .arg(&script)
            .arg(&out)
            .arg(&src));
        check(&out, &src, fmt);
    }
}

fn tar_with(members: &[(&str, &[u8], u8, &str)]) -> Vec<u8> {
    // Minimal ustar writer for hostile inputs the real tools refuse to make.
    let mut out = Vec::new();
    for (name, data, typeflag, link) in members {
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        h[100..107].copy_from_slice(b"0000644");
        h[108..115].copy_from_slice(b"0000000");
        h[116..123].copy_from_slice(b"0000000");
        let size = format!("{:011o}", data.len());
        h[124..135].copy_from_slice(size.as_bytes());
        h[136..147].copy_from_slice(b"00000000000");
        h[156] = *typeflag;
        h[157..157 + link.len()].copy_from_slice(link.as_bytes());
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[148..156].copy_from_slice(b"        ");
        let sum: u32 = h.iter().map(|b| *b as u32).sum();
        h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

#[test]
fn hostile_entries_are_rejected_with_reasons() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (tar_with(&[("../escape", b"x", b'0', "")]), "'..' component"),
        (
            tar_with(&[("a/../../escape", b"x", b'0', "")]),
            "'..' component",
        ),
        (
            tar_with(&[("/etc/passwd", b"x", b'0', "")]),
            "absolute path",
        ),
        (
            tar_with(&[("link", b"", b'1', "../outside")]),
            "'..' component",
        ),
        (
            tar_with(&[("link", b"", b'1', "/etc/shadow")]),
            "absolute path",
        ),
        (
            tar_with(&[("weird", b"", b'Z', "")]),
            "unsupported tar entry type 'Z'",
        ),
    ];
    for (bytes, want) in cases {
        let err = import_tar(&bytes[..], &mut MemSink::default()).unwrap_err();
        assert!(err.to_string().contains(want), "expected {want:?} in {err}");
    }
}

#[test]
fn truncation_and_corruption_are_errors() {
    let good = tar_with(&[("a", &[1u8; 2000], b'0', ""), ("b", b"bb", b'0', "")]);
    import_tar(&good[..], &mut MemSink::default()).unwrap();
    // A cut exactly at an entry boundary (2560) is accepted like Go's
    // archive/tar does; the diff_id check catches it in a pull.
    assert!(import_tar(&good[..2560], &mut MemSink::default()).is_ok());
    for cut in [100, 512, 1000, 2600, 3000] {
        let err = import_tar(&good[..cut], &mut MemSink::default()).unwrap_err();
        assert!(
            matches!(err, TarError::Truncated(_)),
            "cut at {cut}: expected truncation, got {err}"
        );
        assert!(err.to_string().contains("unexpected end of tar"), "{err}");
    }
    let mut bad = good.clone();
    bad[10] ^= 0x55;
    let err = import_tar(&bad[..], &mut MemSink::default()).unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
}

#[test]
fn record_decode_rejects_garbage_without_panicking() {
    let good = tar_with(&[("a", b"hello", b'0', ""), ("d/", b"", b'5', "")]);
    let imp = import_tar(&good[..], &mut MemSink::default()).unwrap();
    let mut enc = Vec::new();
    imp.record.encode(&mut enc).unwrap();
    assert!(strata_tar::LayerRecord::decode(&b"garbage"[..]).is_err());
    // Every truncation and many bit flips: an error or a valid record, never a panic.
    for i in 0..enc.len() {
        let _ = strata_tar::LayerRecord::decode(&enc[..i]);
        let mut flipped = enc.clone();
        flipped[i] ^= 0xff;
        let _ = strata_tar::LayerRecord::decode(&flipped[..]);
    }
    // Decoding the uncompressed payload with garbage lengths must not allocate wildly.
    let mut payload = b"STRATA-LAYER-RECORD\n\x01\xff\xff\xff\xff\xff\xff\xff\xff\x7f".to_vec();
    payload.extend_from_slice(&[0u8; 10]);
    let z = zstd::encode_all(&payload[..], 1).unwrap();
    assert!(strata_tar::LayerRecord::decode(&z[..]).is_err());
}

#[test]
fn v7_and_ustar_formats() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    // ustar splits this path into prefix (<= 155) and name (<= 100).
    let dir = src.join("p".repeat(90)).join("q".repeat(50));
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("n".repeat(90)), b"split path").unwrap();
    fs::write(src.join("a"), b"a").unwrap();
    fs::write(src.join("b"), vec![b'b'; 1000]).unwrap();
    std::os::unix::fs::symlink("a", src.join("s")).unwrap();
    for fmt in ["v7", "ustar", "oldgnu"] {
        let out = tmp.path().join(format!("{fmt}.tar"));
        let mut c = Command::new("tar");
        c.arg(format!("--format={fmt}"))
            .arg("-cf")
            .arg(&out)
            .arg("-C")
            .arg(&src);
        if fmt == "v7" {
            c.args(["a", "b", "s"]);
        } else {
            c.arg(".");
        }
        run(&mut c);
        let imp = check(&out, &src, fmt);
        assert_eq!(
            entry(&imp, b"s").kind,
            EntryKind::Symlink {
                target: b"a".to_vec()
            },
            "{fmt}"
        );
        if fmt != "v7" {
            let p = format!("{}/{}/{}", "p".repeat(90), "q".repeat(50), "n".repeat(90));
            assert!(
                matches!(
                    entry(&imp, p.as_bytes()).kind,
                    EntryKind::Regular { size: 10, .. }
                ),
                "{fmt}"
            );
        }
    }
}

#[test]
fn end_of_archive_variants_rebuild_exactly() {
    let base = tar_with(&[("a", b"aaa", b'0', "")]);
    let body = &base[..base.len() - 1024];
    let variants: Vec<(Vec<u8>, &str)> = vec![
        (
            [body, &[0u8; 512][..]].concat(),
            "a single zero block then EOF",
        ),
        (body.to_vec(), "no end marker"),
        (
            [&base[..], &[0u8; 9216][..]].concat(),
            "blocking-factor zeros",
        ),
        (
            [&base[..], b"trailing garbage"].concat(),
            "garbage after the end",
        ),
    ];
    for (bytes, label) in variants {
        let mut sink = MemSink::default();
        let imp = import_tar(&bytes[..], &mut sink).unwrap_or_else(|e| panic!("{label}: {e}"));
        assert_eq!(imp.record.entries.len(), 1, "{label}");
        assert_eq!(imp.diff_id, Digest::sha256_of(&bytes), "{label}");
        let mut out = Vec::new();
        let mut open = |d: &Digest| -> io::Result<Box<dyn Read>> {
            Ok(Box::new(io::Cursor::new(sink.0[d].clone())))
        };
        imp.record.rebuild(&mut open, &mut out).unwrap();
        assert!(out == bytes, "{label}");
    }
}

#[test]
fn oversized_extension_header_is_refused() {
    let mut bytes = tar_with(&[("././@LongLink", b"", b'L', "")]);
    // claim a 1 GiB long name (size field, then fix the checksum)
    bytes[124..136].copy_from_slice(b"10000000000\0");
    bytes[148..156].copy_from_slice(b"        ");
    let sum: u32 = bytes[..512].iter().map(|b| *b as u32).sum();
    bytes[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    let err = import_tar(&bytes[..], &mut MemSink::default()).unwrap_err();
    assert!(err.to_string().contains("is larger than"), "{err}");
}
