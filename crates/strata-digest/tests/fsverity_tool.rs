//! Our userspace fs-verity digest against `fsverity digest` (Debian's
//! fsverity package), for sizes around every block and tree-level boundary.

use std::io::Write;
use std::process::Command;

use strata_digest::{FsVerityHasher, fsverity_digest};

fn tool_digest(path: &std::path::Path) -> String {
    let out = Command::new("fsverity")
        .arg("digest")
        .arg("--compact")
        .arg(path)
        .output()
        .expect(
            "the `fsverity` tool is missing: apt-get install fsverity (scripts/install-deps.sh)",
        );
    assert!(
        out.status.success(),
        "fsverity digest failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn matches_fsverity_tool() {
    let dir = tempfile::tempdir().unwrap();
    // 128 hashes fit a block: 128 and 128*128 blocks end tree levels.
    let sizes = [
        0u64,
        1,
        4095,
        4096,
        4097,
        128 * 4096,
        128 * 4096 + 1,
        129 * 4096 - 7,
        128 * 128 * 4096,
        128 * 128 * 4096 + 4096,
    ];
    for size in sizes {
        let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        let p = dir.path().join(format!("f{size}"));
        std::fs::File::create(&p).unwrap().write_all(&data).unwrap();
        let want = tool_digest(&p);
        assert_eq!(fsverity_digest(&data).hex(), want, "one-shot, size {size}");
        let mut h = FsVerityHasher::new();
        for c in data.chunks(10_000) {
            h.update(c);
        }
        assert_eq!(h.finish().hex(), want, "incremental, size {size}");
    }
}
