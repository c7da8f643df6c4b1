//! Hostile zstd:chunked layers (issue 15): a real layer written by
//! strata-chunked, then its TOC and tar-split edited. Every edit is
//! refused by `open_chunked` before anything is fetched or stored, with an
//! error naming the field (or the first disagreement), without panicking;
//! the expensive ones are measured in a child process (peak RSS, time).

use std::collections::BTreeMap;
use std::io::{Cursor, Read};
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use strata_chunked::toc::{Toc, TocEntry};
use strata_chunked::{ANN_TARSPLIT_POSITION, ANN_TOC_CHECKSUM, ANN_TOC_POSITION, reader};
use strata_digest::Digest;
use strata_oci::partial::{
    self, ChunkedIndex, MetadataBudget, MetadataLimits, RemoteChunk, open_chunked,
    open_chunked_with,
};
use strata_oci::{Descriptor, ImageSource, OciError, Platform, ResolvedImage};

/// A blob in memory; `size` may claim more than `bytes` holds (reads past
/// them fail).
struct Mem {
    bytes: Vec<u8>,
}

impl ImageSource for Mem {
    fn resolve(&self, _: &Platform) -> Result<ResolvedImage, OciError> {
        unimplemented!("not needed")
    }
    fn open_blob(&self, _: &Descriptor, offset: u64) -> Result<Box<dyn Read + Send>, OciError> {
        let b = self.bytes.get(offset as usize..).unwrap_or(&[]).to_vec();
        Ok(Box::new(Cursor::new(b)))
    }
    fn describe(&self) -> String {
        "memory".into()
    }
}

/// The layer as written, and what can be edited.
#[derive(Clone)]
struct Layer {
    /// The blob up to (not including) the TOC.
    frames: Vec<u8>,
    toc: Toc,
    /// Tar-split lines, parsed.
    ts: Vec<serde_json::Value>,
}

/// Deterministic incompressible bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

const BIG: usize = 512 * 1024; // a multiple of 512: no padding after it

fn tar_bytes() -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, kind: tar::EntryType, data: &[u8], link: Option<&str>| {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(kind);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        h.set_path(name).unwrap();
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    add("dir/", tar::EntryType::Directory, b"", None);
    add("dir/a.txt", tar::EntryType::Regular, b"hello\n", None);
    add("dir/big.bin", tar::EntryType::Regular, &noise(BIG, 3), None);
    add("dir/link", tar::EntryType::Symlink, b"", Some("a.txt"));
    add("dir/hard", tar::EntryType::Link, b"", Some("dir/a.txt"));
    add("dir/empty", tar::EntryType::Regular, b"", None);
    b.into_inner().unwrap()
}

fn layer() -> Layer {
    let mut blob = Vec::new();
    let l = strata_chunked::write_layer(Cursor::new(tar_bytes()), &mut blob, &Default::default())
        .unwrap();
    let loc = reader::locate(&l.annotations).unwrap().unwrap();
    let ts_r = loc.tar_split.unwrap();
    let ts_z = &blob[ts_r.offset as usize..(ts_r.offset + ts_r.len) as usize];
    let text = zstd::decode_all(ts_z).unwrap();
    let ts = text
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    // the TOC is a skippable frame: its payload starts 8 bytes in
    let frames = blob[..loc.toc.offset as usize - 8].to_vec();
    Layer {
        frames,
        toc: l.toc,
        ts,
    }
}

impl Layer {
    /// The blob and descriptor (claiming `size` bytes if given).
    fn build(&self, size: Option<u64>) -> (Mem, Descriptor) {
        let mut ts_text = Vec::new();
        for l in &self.ts {
            ts_text.extend_from_slice(serde_json::to_string(l).unwrap().as_bytes());
            ts_text.push(b'\n');
        }
        let ts_z = zstd::encode_all(&ts_text[..], 1).unwrap();
        let mut toc = self.toc.clone();
        toc.tar_split_digest = format!("sha256:{}", hex::encode(Sha256::digest(&ts_z)));
        let toc_json = serde_json::to_vec(&toc).unwrap();
        self.assemble(&toc_json, &ts_z, ts_text.len() as u64, size)
    }

    fn assemble(
        &self,
        toc_json: &[u8],
        ts_z: &[u8],
        ts_len: u64,
        size: Option<u64>,
    ) -> (Mem, Descriptor) {
        let toc_z = zstd::encode_all(toc_json, 3).unwrap();
        let mut bytes = self.frames.clone();
        let toc_at = bytes.len();
        bytes.extend_from_slice(&toc_z);
        let ts_at = bytes.len();
        bytes.extend_from_slice(ts_z);
        let mut annotations = BTreeMap::new();
        annotations.insert(
            ANN_TOC_POSITION.to_string(),
            format!("{toc_at}:{}:{}:1", toc_z.len(), toc_json.len()),
        );
        annotations.insert(
            ANN_TARSPLIT_POSITION.to_string(),
            format!("{ts_at}:{}:{ts_len}", ts_z.len()),
        );
        annotations.insert(
            ANN_TOC_CHECKSUM.to_string(),
            format!("sha256:{}", hex::encode(Sha256::digest(&toc_z))),
        );
        let desc = Descriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar+zstd".into(),
            digest: Digest::sha256_of(&bytes),
            size: size.unwrap_or(0).max(bytes.len() as u64),
            annotations,
            platform: None,
            urls: Vec::new(),
        };
        (Mem { bytes }, desc)
    }

    fn entry(&mut self, name: &str) -> &mut TocEntry {
        self.toc
            .entries
            .iter_mut()
            .find(|e| e.name == name && e.kind != "chunk")
            .unwrap_or_else(|| panic!("no {name} in the TOC"))
    }

    fn chunks(&mut self, name: &str) -> Vec<&mut TocEntry> {
        self.toc
            .entries
            .iter_mut()
            .filter(|e| e.name == name && e.kind == "chunk")
            .collect()
    }

    /// The tar-split's file line for `name`.
    fn ts_file(&mut self, name: &str) -> &mut serde_json::Value {
        self.ts
            .iter_mut()
            .find(|l| l["type"] == 1 && l["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in the tar-split"))
    }

    /// Edit the raw tar header of `name` (the last 512 bytes of the segment
    /// before its file line) and fix its checksum.
    fn patch_header(&mut self, name: &str, edit: impl FnOnce(&mut [u8])) {
        let i = self
            .ts
            .iter()
            .position(|l| l["type"] == 1 && l["name"] == name)
            .unwrap();
        let seg = &mut self.ts[i - 1];
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut raw = b64.decode(seg["payload"].as_str().unwrap()).unwrap();
        let n = raw.len();
        let h = &mut raw[n - 512..];
        assert!(h.starts_with(name.as_bytes()), "not {name}'s header");
        edit(h);
        h[148..156].fill(b' ');
        let sum: u32 = h.iter().map(|b| *b as u32).sum();
        h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        seg["payload"] = b64.encode(&raw).into();
    }
}

/// Set a header's size field to `size` (base-256 past octal's range).
fn set_size(h: &mut [u8], size: u64) {
    let f = &mut h[124..136];
    f.fill(0);
    f[0] = 0x80;
    f[4..12].copy_from_slice(&size.to_be_bytes());
}

fn open(mem: &Mem, desc: &Descriptor) -> Result<Result<ChunkedIndex, String>, OciError> {
    open_chunked(mem, desc, &AtomicU64::new(0))
}

/// The error `open_chunked` gives (a fallback or an index is a failure).
fn refused(l: &Layer) -> String {
    let (mem, desc) = l.build(None);
    match open(&mem, &desc) {
        Err(e) => e.to_string(),
        Ok(Err(f)) => panic!("fell back instead of refusing: {f}"),
        Ok(Ok(_)) => panic!("accepted"),
    }
}

fn assert_has(e: &str, want: &str) {
    assert!(e.contains(want), "{e:?} does not say {want:?}");
}

#[test]
fn the_layer_as_written_opens_and_lists_its_entries() {
    let l = layer();
    let (mem, desc) = l.build(None);
    let ix = open(&mem, &desc).unwrap().unwrap();
    let entries = ix.entries().unwrap();
    assert_eq!(entries.len(), 6);
    // and again once the first listing was taken
    assert_eq!(ix.entries().unwrap(), entries);
    assert!(
        ix.files.iter().any(|f| f.chunks.len() > 1),
        "big.bin is chunked"
    );
}

#[test]
fn negative_numbers_are_refused_naming_the_field() {
    let mut l = layer();
    l.entry("dir/a.txt").size = -6;
    assert_has(&refused(&l), "size -6 is negative");
    let mut l = layer();
    l.chunks("dir/big.bin")[0].chunk_size = -1;
    assert_has(&refused(&l), "chunkSize -1 is negative");
    let mut l = layer();
    l.chunks("dir/big.bin")[0].offset = -100;
    assert_has(&refused(&l), "offset -100 is negative");
    let mut l = layer();
    l.entry("dir/a.txt").end_offset = -1;
    assert_has(&refused(&l), "endOffset -1 is negative");
    let mut l = layer();
    *l.ts_file("dir/a.txt") = serde_json::json!({"type": 1, "name": "dir/a.txt", "size": -6});
    assert_has(&refused(&l), "size -6 is negative");
}

#[test]
fn chunk_sizes_that_wrap_are_refused() {
    // the first chunk huge, the next ones' offsets "adjusted" to follow it
    // modulo 2^64: contiguous in wrapping arithmetic only
    let mut l = layer();
    let first = l.entry("dir/big.bin").chunk_size;
    l.entry("dir/big.bin").chunk_size = i64::MAX;
    let mut at = (i64::MAX as u64).wrapping_add(0);
    for c in l.chunks("dir/big.bin") {
        c.chunk_offset = at as i64;
        at = at.wrapping_add(c.chunk_size as u64);
    }
    let _ = first;
    let e = refused(&l);
    assert_has(&e, "dir/big.bin");
    assert_has(&e, "chunkSize");
    // a chunk of zero bytes
    let mut l = layer();
    l.chunks("dir/big.bin")[0].chunk_size = 0;
    assert_has(&refused(&l), "chunkSize 0");
    // chunks that overlap in the blob
    let mut l = layer();
    let off = l.entry("dir/big.bin").offset;
    l.chunks("dir/big.bin")[0].offset = off;
    assert_has(&refused(&l), "is not after the previous chunk's");
    // files whose frames overlap
    let mut l = layer();
    let a = l.entry("dir/a.txt").offset;
    l.entry("dir/big.bin").offset = a;
    assert_has(
        &refused(&l),
        &format!("dir/big.bin: offset {a} overlaps the frames of dir/a.txt"),
    );
    // chunks that do not cover the file
    let mut l = layer();
    let last = l.chunks("dir/big.bin").pop().unwrap();
    last.chunk_size -= 1;
    assert_has(&refused(&l), "chunks do not cover the file");
}

#[test]
fn ranges_past_the_blob_are_refused() {
    let mut l = layer();
    l.entry("dir/a.txt").end_offset = 1 << 40;
    assert_has(&refused(&l), "not a range inside the blob");
    let mut l = layer();
    l.entry("dir/a.txt").offset = 0;
    assert_has(&refused(&l), "offset 0 and endOffset");
}

#[test]
fn a_file_larger_than_its_frames_can_hold_is_refused_naming_it() {
    for size in [1u64 << 40, 1 << 62] {
        let mut l = layer();
        l.entry("dir/a.txt").size = size as i64;
        *l.ts_file("dir/a.txt") = serde_json::json!({"type": 1, "name": "dir/a.txt", "size": size});
        l.patch_header("dir/a.txt", |h| set_size(h, size));
        let t = Instant::now();
        let e = refused(&l);
        assert_has(&e, "\"dir/a.txt\"");
        assert_has(&e, &format!("size {size} is more than its"));
        assert!(t.elapsed().as_secs() < 5);
    }
}

#[test]
fn a_huge_file_the_blob_could_hold_is_listed_without_streaming_it() {
    // big.bin claims 2^62 bytes in the TOC, the tar-split and its tar
    // header, and the blob claims to be large enough (2^48 bytes) for its
    // frames: the entries are listed from the headers alone (no 2^62 bytes
    // through the tar parser) and the layer falls back to a full pull
    // (one chunk of 2^62 bytes is over MAX_CHUNK_SIZE)
    let size = 1u64 << 62;
    let mut l = layer();
    let claimed = 1u64 << 48;
    for c in l.chunks("dir/big.bin") {
        c.kind = "drop".into();
    }
    l.toc.entries.retain(|e| e.kind != "drop");
    let e = l.entry("dir/big.bin");
    e.size = size as i64;
    e.chunk_size = 0;
    e.chunk_digest = String::new();
    e.end_offset = claimed as i64;
    *l.ts_file("dir/big.bin") = serde_json::json!({"type": 1, "name": "dir/big.bin", "size": size});
    l.patch_header("dir/big.bin", |h| set_size(h, size));
    // the 512 KiB of content are not in the tar-split; nothing to cut
    let (mem, desc) = l.build(Some(claimed));
    let t = Instant::now();
    match open(&mem, &desc).unwrap() {
        Err(why) => assert_has(&why, "MAX_CHUNK_SIZE"),
        Ok(_) => panic!("a 2^62-byte chunk was accepted"),
    }
    assert!(t.elapsed().as_secs() < 5, "took {:?}", t.elapsed());
}

#[test]
fn a_2p40_file_in_chunks_opens_at_the_cost_of_its_metadata() {
    // 2^40 bytes in 16384 chunks of 64 MiB, each with 2 KiB of "frames"
    // (64 MiB / 2 KiB = the zstd maximum ratio) in a blob claimed large
    // enough: consistent, so it opens (a lazy mount could serve it), and
    // listing its entries does not stream 2^40 bytes through the tar
    // parser
    let size = 1u64 << 40;
    let n = (size / partial::MAX_CHUNK_SIZE) as i64;
    let step = (partial::MAX_CHUNK_SIZE / partial::MAX_RATIO) as i64;
    let mut l = layer();
    let template = l.chunks("dir/big.bin")[0].clone();
    l.toc.entries.retain(|e| e.kind != "chunk");
    let at = l
        .toc
        .entries
        .iter()
        .position(|e| e.name == "dir/big.bin")
        .unwrap();
    let off = l.entry("dir/big.bin").offset;
    let e = l.entry("dir/big.bin");
    e.size = size as i64;
    e.chunk_size = partial::MAX_CHUNK_SIZE as i64;
    e.end_offset = off + n * step;
    let chunk = partial::MAX_CHUNK_SIZE as i64;
    let chunks = (1..n).map(|i| TocEntry {
        offset: off + i * step,
        chunk_offset: i * chunk,
        chunk_size: chunk,
        ..template.clone()
    });
    l.toc.entries.splice(at + 1..at + 1, chunks);
    *l.ts_file("dir/big.bin") = serde_json::json!({"type": 1, "name": "dir/big.bin", "size": size});
    l.patch_header("dir/big.bin", |h| set_size(h, size));
    let (mem, desc) = l.build(Some((off + n * step) as u64));
    let t = Instant::now();
    let ix = open(&mem, &desc).unwrap().unwrap();
    let entries = ix.entries().unwrap();
    let big = entries.iter().find(|e| e.path == b"dir/big.bin").unwrap();
    assert!(matches!(big.kind, strata_tar::EntryKind::Regular { size: s, .. } if s == size));
    // listed again from the headers (the first listing was taken)
    assert_eq!(ix.entries().unwrap().len(), entries.len());
    assert!(t.elapsed().as_secs() < 5, "took {:?}", t.elapsed());
}

#[test]
fn decode_chunk_does_not_trust_the_size() {
    let desc = layer().build(None).1;
    let chunk = RemoteChunk {
        file_offset: 0,
        size: 1 << 62,
        blob_offset: 0,
        blob_end: 10,
        digest: Digest::sha256_of(b""),
        zeros: false,
    };
    let frames = zstd::encode_all(&b"abc"[..], 1).unwrap();
    let e = partial::decode_chunk(&desc, &frames, &chunk)
        .unwrap_err()
        .to_string();
    assert_has(&e, &format!("{} bytes claimed", 1u64 << 62));
}

#[test]
fn the_toc_must_match_the_tar_split() {
    // a name
    let mut l = layer();
    l.entry("dir/a.txt").name = "dir/b.txt".into();
    let e = refused(&l);
    assert_has(
        &e,
        "the tar-split names \"dir/a.txt\", the TOC \"dir/b.txt\"",
    );
    // a type
    let mut l = layer();
    l.entry("dir/link").kind = "fifo".into();
    assert_has(&refused(&l), "the tar says Symlink, the TOC Fifo");
    // a size (the tar-split's)
    let mut l = layer();
    *l.ts_file("dir/a.txt") = serde_json::json!({"type": 1, "name": "dir/a.txt", "size": 7});
    assert_has(&refused(&l), "the TOC says 6 bytes, the tar-split 7");
    // a symlink target
    let mut l = layer();
    l.entry("dir/link").link_name = "/etc/shadow".into();
    assert_has(
        &refused(&l),
        "a symlink to \"a.txt\" in the tar, to \"/etc/shadow\" in the TOC",
    );
    // a hard link target escaping the root, in the TOC
    let mut l = layer();
    l.entry("dir/hard").link_name = "../../etc/shadow".into();
    assert_has(&refused(&l), "path with a '..' component");
    // a name with `..` in the tar (and the TOC)
    let mut l = layer();
    l.entry("dir/empty").name = "dir/../../x".into();
    l.patch_header("dir/empty", |h| {
        h[..100].fill(0);
        h[..11].copy_from_slice(b"dir/../../x");
    });
    *l.ts_file("dir/empty") = serde_json::json!({"type": 1, "name": "dir/../../x", "size": 0});
    assert_has(&refused(&l), "path with a '..' component");
    // an entry missing from the TOC
    let mut l = layer();
    l.toc.entries.retain(|e| e.name != "dir/empty");
    assert_has(
        &refused(&l),
        "the tar-split names \"dir/empty\", which the TOC lacks",
    );
    // an unknown TOC type
    let mut l = layer();
    l.entry("dir/").kind = "whatever".into();
    assert_has(&refused(&l), "type \"whatever\" is not a tar entry type");
}

#[test]
fn a_hard_link_to_nothing_is_refused() {
    let mut l = layer();
    l.entry("dir/hard").link_name = "dir/nothere".into();
    l.patch_header("dir/hard", |h| {
        h[157..257].fill(0);
        h[157..168].copy_from_slice(b"dir/nothere");
    });
    assert_has(
        &refused(&l),
        "a hard link to \"dir/nothere\", which no earlier file is",
    );
}

#[test]
fn a_toc_only_entry_reusing_a_files_digest_is_named() {
    // appended: the TOC lists a file the tar-split lacks, with a real
    // file's digest and frames (it used to fail later as a digest mismatch)
    let mut l = layer();
    let mut ghost = l.entry("dir/a.txt").clone();
    ghost.name = "dir/ghost".into();
    l.toc.entries.push(ghost.clone());
    assert_has(
        &refused(&l),
        "the TOC lists \"dir/ghost\", which the tar-split lacks",
    );
    // in the middle
    let mut l = layer();
    l.toc.entries.insert(2, ghost);
    assert_has(&refused(&l), "the TOC \"dir/ghost\"");
}

#[test]
fn names_too_long_or_too_deep_are_refused() {
    let mut l = layer();
    l.entry("dir/a.txt").name = "x".repeat(5000);
    assert_has(
        &refused(&l),
        "is 5000 bytes long, more than 4096 (the limit)",
    );
    let mut l = layer();
    l.entry("dir/a.txt").name = "d/".repeat(600);
    assert_has(&refused(&l), "components deep, more than 512 (the limit)");
}

#[test]
fn entry_limits_per_layer_and_per_image() {
    let l = layer();
    let (mem, desc) = l.build(None);
    let n = l.toc.entries.len() as u64;
    let small = MetadataBudget::new(MetadataLimits {
        layer_entries: n - 1,
        ..Default::default()
    });
    let e = open_chunked_with(&mem, &desc, &AtomicU64::new(0), &small)
        .err()
        .unwrap()
        .to_string();
    assert_has(&e, &format!("more than {} entries (the limit)", n - 1));
    // two layers of n entries, an image budget of 1.5 layers
    let image = MetadataBudget::new(MetadataLimits {
        image_entries: n + n / 2,
        ..Default::default()
    });
    assert!(
        open_chunked_with(&mem, &desc, &AtomicU64::new(0), &image)
            .unwrap()
            .is_ok()
    );
    let e = open_chunked_with(&mem, &desc, &AtomicU64::new(0), &image)
        .err()
        .unwrap()
        .to_string();
    assert_has(
        &e,
        &format!("the image's TOCs list more than {} entries", n + n / 2),
    );
    // metadata bytes across the image
    let bytes = MetadataBudget::new(MetadataLimits {
        image_bytes: 1000,
        ..Default::default()
    });
    let e = open_chunked_with(&mem, &desc, &AtomicU64::new(0), &bytes)
        .err()
        .unwrap()
        .to_string();
    assert_has(&e, "past 1000 bytes (the limit)");
}

// ---- measured cases: each runs in a child process of this test binary --

/// A TOC of `n` directory entries for the layer's frames and tar-split
/// (which lists 6 entries); `ts_claim`: the tar-split's uncompressed size
/// the annotations claim.
fn many_entries(n: usize, ts_claim: Option<u64>) -> (Mem, Descriptor) {
    let l = layer();
    let mut json = String::with_capacity(n * 40);
    json.push_str(r#"{"version":1,"entries":["#);
    for i in 0..n {
        if i > 0 {
            json.push(',');
        }
        json.push_str(&format!(r#"{{"type":"dir","name":"d{i}"}}"#));
    }
    let mut ts_text = Vec::new();
    for v in &l.ts {
        ts_text.extend_from_slice(serde_json::to_string(v).unwrap().as_bytes());
        ts_text.push(b'\n');
    }
    let ts_z = zstd::encode_all(&ts_text[..], 1).unwrap();
    json.push_str(&format!(
        r#"],"tarSplitDigest":"sha256:{}"}}"#,
        hex::encode(Sha256::digest(&ts_z))
    ));
    let claim = ts_claim.unwrap_or(ts_text.len() as u64);
    l.assemble(json.as_bytes(), &ts_z, claim, None)
}

/// A TOC of about 100 MB: the layer's entries and a 100 MB field no one
/// reads.
fn toc_100mb() -> (Mem, Descriptor) {
    let l = layer();
    let mut ts_text = Vec::new();
    for v in &l.ts {
        ts_text.extend_from_slice(serde_json::to_string(v).unwrap().as_bytes());
        ts_text.push(b'\n');
    }
    let ts_z = zstd::encode_all(&ts_text[..], 1).unwrap();
    let mut toc = serde_json::to_value(&l.toc).unwrap();
    toc["tarSplitDigest"] = format!("sha256:{}", hex::encode(Sha256::digest(&ts_z))).into();
    toc["padding"] = "x".repeat(100_000_000).into();
    let json = serde_json::to_vec(&toc).unwrap();
    l.assemble(&json, &ts_z, ts_text.len() as u64, None)
}

/// big.bin in 512 Ki chunks of one byte each (each chunk's "frames" one
/// byte of a blob claimed large enough): half a million TOC entries the
/// tar-split cannot bound, accepted within the per-layer limit.
fn toc_half_million_chunks() -> (Mem, Descriptor) {
    let mut l = layer();
    let n = BIG as i64;
    let template = l.chunks("dir/big.bin")[0].clone();
    l.toc.entries.retain(|e| e.kind != "chunk");
    let at = l
        .toc
        .entries
        .iter()
        .position(|e| e.name == "dir/big.bin")
        .unwrap();
    let off = l.entry("dir/big.bin").offset;
    let e = l.entry("dir/big.bin");
    e.chunk_size = 1;
    e.end_offset = off + n;
    let chunks = (1..n).map(|i| TocEntry {
        offset: off + i,
        chunk_offset: i,
        chunk_size: 1,
        ..template.clone()
    });
    l.toc.entries.splice(at + 1..at + 1, chunks);
    let claimed = (off + n) as u64 + 1;
    l.build(Some(claimed))
}

/// A 2^62-byte file the TOC, tar-split and tar header agree on.
fn file_2p62() -> (Mem, Descriptor) {
    let size = 1u64 << 62;
    let mut l = layer();
    l.entry("dir/big.bin").size = size as i64;
    *l.ts_file("dir/big.bin") = serde_json::json!({"type": 1, "name": "dir/big.bin", "size": size});
    l.patch_header("dir/big.bin", |h| set_size(h, size));
    l.build(None)
}

fn vm_hwm_kb() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The child: build the case (written to and read back from a file, so
/// building it costs the parent), open it, report.
#[test]
#[ignore = "run by measured_cases_stay_within_bounds in a child process"]
fn measure_child() {
    let Ok(case) = std::env::var("HOSTILE_CASE") else {
        return;
    };
    let file = std::env::var("HOSTILE_FILE").unwrap();
    let desc: Descriptor =
        serde_json::from_slice(&std::fs::read(format!("{file}.json")).unwrap()).unwrap();
    let mem = Mem {
        bytes: std::fs::read(&file).unwrap(),
    };
    let before = vm_hwm_kb();
    let t = Instant::now();
    let r = open(&mem, &desc);
    let ms = t.elapsed().as_millis();
    let what = match r {
        Err(e) => format!("refused: {e}"),
        Ok(Err(f)) => format!("fallback: {f}"),
        Ok(Ok(ix)) => format!("accepted: {} entries", ix.entries().unwrap().len()),
    };
    println!(
        "MEASURE case={case} ms={ms} hwm_kb={} base_kb={before} blob={} result={}",
        vm_hwm_kb(),
        mem.bytes.len(),
        what.replace('\n', " ")
    );
}

#[test]
fn measured_cases_stay_within_bounds() {
    let dir = tempfile::tempdir().unwrap();
    // (case, builder, peak RSS bound in MB, time bound in s, what it says)
    type Build = fn() -> (Mem, Descriptor);
    let cases: [(&str, Build, u64, u64, &str); 5] = [
        (
            "toc_1e6_entries",
            || many_entries(1_000_000, None),
            64,
            10,
            "more entries than the tar-split",
        ),
        (
            "toc_1e6_entries_ts_claims_150MiB",
            || many_entries(1_000_000, Some(150 << 20)),
            256,
            20,
            "more entries than the tar-split",
        ),
        ("toc_100MB", toc_100mb, 64, 20, "accepted"),
        (
            "toc_512Ki_chunks",
            toc_half_million_chunks,
            256,
            20,
            "accepted",
        ),
        ("file_2p62", file_2p62, 64, 5, "is more than its"),
    ];
    let mut report = Vec::new();
    for (case, build, mb, secs, says) in cases {
        let (mem, desc) = build();
        let file = dir.path().join(case);
        std::fs::write(&file, &mem.bytes).unwrap();
        std::fs::write(
            format!("{}.json", file.display()),
            serde_json::to_vec(&desc).unwrap(),
        )
        .unwrap();
        drop(mem);
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "measure_child", "--ignored", "--nocapture"])
            .env("HOSTILE_CASE", case)
            .env("HOSTILE_FILE", &file)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout
            .lines()
            .find(|l| l.starts_with("MEASURE"))
            .unwrap_or_else(|| {
                panic!(
                    "{case}: no report: {stdout} {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
            .to_string();
        let field = |k: &str| -> u64 {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")))
                .unwrap()
                .parse()
                .unwrap()
        };
        let (ms, hwm) = (field("ms"), field("hwm_kb"));
        assert!(line.contains(says), "{case}: {line}");
        assert!(
            hwm < mb * 1024,
            "{case}: peak RSS {hwm} kB over {mb} MB: {line}"
        );
        assert!(ms < secs * 1000, "{case}: {ms} ms over {secs} s: {line}");
        report.push(line);
    }
    for l in report {
        eprintln!("{l}");
    }
}
