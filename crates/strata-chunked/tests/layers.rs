//! zstd:chunked on real layers: every fixture layer round-trips (the blob
//! decompresses to the same tar, TOC ranges decode to the files they name,
//! the tar-split rebuilds the tar), and our TOCs equal the ones Debian's
//! skopeo (c/storage 1.43, old layout) writes for the same layers: names,
//! modes, times, digests and every chunk boundary.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest as _, Sha256};
use strata_chunked::reader::{self, Layout};
use strata_chunked::toc::{Toc, TocEntry};
use strata_chunked::{ChunkedError, WriteOptions, write_layer};
use strata_testkit::{fixtures_dir, require_tool};

struct Layer {
    media_type: String,
    digest: String,
    annotations: BTreeMap<String, String>,
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    layout.join("blobs/sha256").join(&digest[7..])
}

fn layers(layout: &Path, tag: &str) -> Vec<Layer> {
    let index = json(&layout.join("index.json"));
    let m = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("{tag} not in {}", layout.display()));
    let manifest = json(&blob_path(layout, m["digest"].as_str().unwrap()));
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| Layer {
            media_type: l["mediaType"].as_str().unwrap().into(),
            digest: l["digest"].as_str().unwrap().into(),
            annotations: l["annotations"]
                .as_object()
                .map(|a| {
                    a.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect()
}

fn tar_of(layout: &Path, l: &Layer) -> Vec<u8> {
    let blob = std::fs::read(blob_path(layout, &l.digest)).unwrap();
    let mut out = Vec::new();
    if l.media_type.ends_with("+gzip") {
        flate2::read::MultiGzDecoder::new(&blob[..])
            .read_to_end(&mut out)
            .unwrap();
    } else if l.media_type.ends_with("+zstd") {
        out = zstd::stream::decode_all(&blob[..]).unwrap();
    } else {
        out = blob;
    }
    out
}

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn decode_range(blob: &[u8], from: i64, to: u64) -> Vec<u8> {
    zstd::stream::decode_all(&blob[from as usize..to as usize]).unwrap()
}

/// Everything a reader may rely on, checked on one converted layer.
fn check(blob: &[u8], tar: &[u8], what: &str) -> Toc {
    assert_eq!(
        zstd::stream::decode_all(blob).unwrap(),
        tar,
        "{what}: the blob is not the tar"
    );
    // footer and annotations agree, TOC verifies
    let tail = &blob[blob.len() - 72..];
    let loc = reader::parse_footer(tail, blob.len() as u64).unwrap();
    assert_eq!(loc.layout, Layout::Current);
    let toc_z = &blob[loc.toc.offset as usize..(loc.toc.offset + loc.toc.len) as usize];
    let toc = reader::read_toc(toc_z, &loc).unwrap();
    let ts_r = loc.tar_split.unwrap();
    let ts_z = &blob[ts_r.offset as usize..(ts_r.offset + ts_r.len) as usize];
    let ts = reader::read_tar_split(ts_z, &toc, &ts_r).unwrap();
    // every file and chunk range decodes to what its digest says
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let ents = &toc.entries;
    for (i, e) in ents.iter().enumerate() {
        if e.kind != "reg" || e.size == 0 {
            continue;
        }
        let content = decode_range(blob, e.offset, e.end_offset as u64);
        assert_eq!(content.len() as i64, e.size, "{what}: {}", e.name);
        assert_eq!(sha(&content), e.digest, "{what}: {}", e.name);
        // chunks: the reg entry is chunk 0, chunk entries follow
        let mut chunks: Vec<&TocEntry> = vec![e];
        chunks.extend(ents[i + 1..].iter().take_while(|c| c.kind == "chunk"));
        if chunks.len() > 1 {
            let mut pos = 0;
            for (k, c) in chunks.iter().enumerate() {
                let end = chunks
                    .get(k + 1)
                    .map_or(e.end_offset as u64, |n| n.offset as u64);
                let bytes = decode_range(blob, c.offset, end);
                assert_eq!(c.chunk_offset, pos, "{what}: {} chunk {k}", e.name);
                assert_eq!(bytes.len() as i64, c.chunk_size);
                assert_eq!(sha(&bytes), c.chunk_digest);
                if c.chunk_type == "zeros" {
                    assert!(bytes.len() >= 1024 && bytes.iter().all(|b| *b == 0));
                }
                pos += c.chunk_size;
            }
            assert_eq!(pos, e.size);
        }
        files.insert(e.name.clone(), content);
    }
    // the tar-split + file contents rebuild the tar exactly
    let mut rebuilt = Vec::new();
    for t in &ts {
        match t.kind {
            2 => rebuilt.extend(t.payload_bytes().unwrap()),
            1 if t.size > 0 => {
                let name = t.name.as_ref().unwrap();
                let data = &files[name];
                let crc = crc::Crc::<u64>::new(&crc::CRC_64_GO_ISO).checksum(data);
                assert_eq!(
                    t.payload_bytes().unwrap(),
                    crc.to_be_bytes(),
                    "{what}: crc of {name}"
                );
                rebuilt.extend(data);
            }
            _ => {}
        }
    }
    assert!(rebuilt == tar, "{what}: tar-split does not rebuild the tar");
    toc
}

fn convert(tar: &[u8]) -> Result<(Vec<u8>, strata_chunked::ChunkedLayer), ChunkedError> {
    let mut blob = Vec::new();
    let l = write_layer(tar, &mut blob, &WriteOptions::default())?;
    Ok((blob, l))
}

#[test]
fn every_fixture_layer_round_trips() {
    let fix = fixtures_dir();
    let cases = [
        ("synth", "gnu"),
        ("synth", "python"),
        ("synth", "bsdtar"),
        ("synth", "mixed"),
        ("synth", "gnu-old-nosparse"),
        ("synth", "gnu-old"),
        ("debian", "python"),
    ];
    let mut refused = Vec::new();
    let mut converted = 0;
    for (layout, tag) in cases {
        let dir = fix.join(layout);
        for (i, l) in layers(&dir, tag).iter().enumerate() {
            let what = format!("{layout}:{tag} layer {i}");
            let tar = tar_of(&dir, l);
            match convert(&tar) {
                Ok((blob, layer)) => {
                    assert_eq!(layer.diff_id.to_string(), sha(&tar), "{what}");
                    assert_eq!(layer.blob_digest.to_string(), sha(&blob));
                    assert_eq!(layer.blob_size, blob.len() as u64);
                    let toc = check(&blob, &tar, &what);
                    assert_eq!(toc, layer.toc);
                    // the annotations locate and verify the same TOC
                    let loc = reader::locate(&layer.annotations).unwrap().unwrap();
                    let z = &blob[loc.toc.offset as usize..(loc.toc.offset + loc.toc.len) as usize];
                    assert_eq!(reader::read_toc(z, &loc).unwrap(), toc);
                    converted += 1;
                }
                Err(ChunkedError::Unsupported(why)) => refused.push(format!("{what}: {why}")),
                Err(e) => panic!("{what}: {e}"),
            }
        }
    }
    // Refused: sparse files (c/storage's writer fails on them too) and the
    // synthetic base layer's non-UTF-8 name (a JSON TOC cannot carry it;
    // Go's JSON would silently turn it into U+FFFD).
    for r in &refused {
        assert!(
            r.contains("sparse") || (r.contains("layer 0") && r.contains("not UTF-8")),
            "unexpected refusal: {r}"
        );
    }
    assert!(
        converted >= 10,
        "only {converted} layers converted: {refused:?}"
    );
}

#[test]
fn a_tampered_toc_or_tar_split_is_refused() {
    let dir = fixtures_dir().join("synth");
    let tar = tar_of(&dir, &layers(&dir, "python")[1]);
    let (blob, layer) = convert(&tar).unwrap();
    let loc = reader::locate(&layer.annotations).unwrap().unwrap();
    let mut z = blob[loc.toc.offset as usize..(loc.toc.offset + loc.toc.len) as usize].to_vec();
    z[10] ^= 1;
    let e = reader::read_toc(&z, &loc).unwrap_err().to_string();
    assert!(e.contains("does not match the annotation"), "{e}");
    let ts_r = loc.tar_split.unwrap();
    let mut ts = blob[ts_r.offset as usize..(ts_r.offset + ts_r.len) as usize].to_vec();
    ts[5] ^= 1;
    let e = reader::read_tar_split(&ts, &layer.toc, &ts_r)
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not match the TOC"), "{e}");
    let mut bad = layer.annotations.clone();
    bad.insert(strata_chunked::ANN_TOC_POSITION.into(), "1:2:3".into());
    assert!(reader::locate(&bad).unwrap().is_err());
}

/// What c/storage compares between a TOC and the tar (plus digests and
/// chunk boundaries, which depend on content only).
fn comparable(e: &TocEntry) -> TocEntry {
    let time = |t: &Option<String>| t.clone().filter(|t| t != "0001-01-01T00:00:00Z");
    TocEntry {
        offset: 0,
        end_offset: 0,
        modtime: time(&e.modtime),
        accesstime: time(&e.accesstime),
        changetime: time(&e.changetime),
        ..e.clone()
    }
}

#[test]
fn tocs_equal_skopeos_for_the_same_layers() {
    require_tool("skopeo", "skopeo");
    let fix = fixtures_dir();
    let tmp = tempfile::tempdir().unwrap();
    let mut compared = 0;
    for (layout, tag) in [("synth", "python"), ("synth", "mixed"), ("debian", "base")] {
        let src = fix.join(layout);
        let dst = tmp.path().join(format!("{layout}-{tag}"));
        let out = Command::new("skopeo")
            .args(["copy", "--dest-compress-format", "zstd:chunked"])
            .arg(format!("oci:{}:{tag}", src.display()))
            .arg(format!("oci:{}:{tag}", dst.display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let theirs_layers = layers(&dst, tag);
        for (i, (ours_l, theirs_l)) in layers(&src, tag).iter().zip(&theirs_layers).enumerate() {
            let what = format!("{layout}:{tag} layer {i}");
            let tar = tar_of(&src, ours_l);
            let ours = match convert(&tar) {
                Ok((_, l)) => l,
                Err(ChunkedError::Unsupported(_)) => continue, // checked above
                Err(e) => panic!("{what}: {e}"),
            };
            compared += 1;
            let theirs_blob = std::fs::read(blob_path(&dst, &theirs_l.digest)).unwrap();
            // skopeo 1.9.3 re-encodes the tar (its diff_ids are not the
            // source's), so only what depends on names and contents compares.
            let loc = reader::locate(&theirs_l.annotations)
                .expect("skopeo wrote zstd:chunked annotations")
                .unwrap();
            assert_eq!(
                loc.layout,
                Layout::Old,
                "Debian's skopeo writes the old layout"
            );
            let z = &theirs_blob[loc.toc.offset as usize..(loc.toc.offset + loc.toc.len) as usize];
            let theirs = reader::read_toc(z, &loc).unwrap();
            // the footer agrees with the annotations
            let f = reader::parse_footer(
                &theirs_blob[theirs_blob.len() - 48..],
                theirs_blob.len() as u64,
            )
            .unwrap();
            assert_eq!((f.layout, f.toc), (Layout::Old, loc.toc));
            assert_eq!(ours.toc.entries.len(), theirs.entries.len(), "{what}");
            let mut chunked = 0;
            for (a, b) in ours.toc.entries.iter().zip(&theirs.entries) {
                // skopeo's Go JSON turns non-UTF-8 names into U+FFFD; we refuse those layers
                assert_eq!(comparable(a), comparable(b), "{what}");
                chunked += (a.kind == "chunk") as usize;
            }
            if layout == "debian" {
                assert!(
                    chunked > 100,
                    "{what}: only {chunked} chunk entries; the chunker was not exercised"
                );
            }
        }
    }
    assert!(compared >= 5, "only {compared} layers compared");
}
