//! Consistency check of the whole store.
//!
//! Every object is re-hashed (two threads); every layer record is decoded,
//! its objects must exist, and the layer's tar is rebuilt and hashed against
//! its diff_id; every image's manifest and config must hash to their names
//! and its layers exist; every ref must parse and point to an image. Staging
//! leftovers under tmp/ are not problems: they are invisible by design.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use strata_digest::{Digest, Hasher, VerityDigest};

use strata_ops::{Ctl, Event, Op, Unit};

use crate::{Result, Store, io_err, list_hex_names, unescape_ref};

/// The outcome of [`Store::fsck`].
#[derive(Debug, Default, Serialize)]
pub struct FsckReport {
    /// Objects checked.
    pub objects: u64,
    /// Layers checked.
    pub layers: u64,
    /// Images checked.
    pub images: u64,
    /// Refs checked.
    pub refs: u64,
    /// Templates checked.
    pub templates: u64,
    /// Every problem found, one line each, naming the path or digest.
    pub problems: Vec<String>,
}

impl FsckReport {
    /// Whether the store is consistent.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

pub(crate) fn run(store: &Store, ctl: Ctl<'_>) -> Result<FsckReport> {
    ctl.emit(Event::Started {
        op: Op::Fsck,
        subject: store.root().display().to_string(),
    });
    let mut report = FsckReport::default();
    let root = store.root();
    let verity = check_objects(store, &mut report, ctl)?;

    for layer in list_hex_names(&root.join("layers"))? {
        report.layers += 1;
        let meta = match store.layer_meta(&layer) {
            Ok(m) => m,
            Err(e) => {
                report.problems.push(format!("layer {layer}: {e}"));
                continue;
            }
        };
        if meta.diff_id != layer {
            report.problems.push(format!(
                "layer {layer}: meta names diff_id {}",
                meta.diff_id
            ));
        }
        let record = match store.layer_record(&layer) {
            Ok(r) => r,
            Err(e) => {
                report.problems.push(format!("layer {layer}: {e}"));
                continue;
            }
        };
        let missing: Vec<Digest> = record.objects().filter(|d| !store.has_object(d)).collect();
        if !missing.is_empty() {
            report.problems.push(format!(
                "layer {layer}: {} missing objects, e.g. {}",
                missing.len(),
                missing[0]
            ));
            continue;
        }
        match store.layer_verity(&layer) {
            Ok(v) => {
                let bad = v
                    .iter()
                    .filter(|(d, h)| verity.get(d).is_some_and(|w| w != h))
                    .count();
                let listed: std::collections::HashSet<Digest> = v.iter().map(|(d, _)| *d).collect();
                let unlisted = record.objects().filter(|d| !listed.contains(d)).count();
                if bad > 0 || unlisted > 0 {
                    report.problems.push(format!(
                        "layer {layer}: verity file has {bad} wrong and {unlisted} missing fs-verity digests"
                    ));
                }
            }
            Err(e) => report.problems.push(format!("layer {layer}: {e}")),
        }
        let mut hasher = Hasher::new();
        match store.rebuild_layer(&layer, &mut hasher) {
            Ok(_) => {
                let got = hasher.finish();
                if got != layer {
                    report
                        .problems
                        .push(format!("layer {layer}: rebuilt tar hashes to {got}"));
                }
            }
            Err(e) => report.problems.push(format!("layer {layer}: {e}")),
        }
    }

    for img in list_hex_names(&root.join("images"))? {
        report.images += 1;
        let check = |what: &str, bytes: io::Result<Vec<u8>>, want: &Digest| -> Option<String> {
            match bytes {
                Ok(b) if Digest::sha256_of(&b) == *want => None,
                Ok(b) => Some(format!(
                    "image {img}: {what} hashes to {} not {want}",
                    Digest::sha256_of(&b)
                )),
                Err(e) => Some(format!("image {img}: reading {what}: {e}")),
            }
        };
        let dir = root.join("images").join(img.hex());
        report
            .problems
            .extend(check("manifest", fs::read(dir.join("manifest")), &img));
        let meta = match store.image_meta(&img) {
            Ok(m) => m,
            Err(e) => {
                report.problems.push(format!("image {img}: {e}"));
                continue;
            }
        };
        report.problems.extend(check(
            "config",
            fs::read(dir.join("config")),
            &meta.config_digest,
        ));
        for l in &meta.layers {
            if !store.has_layer(&l.diff_id) {
                report
                    .problems
                    .push(format!("image {img}: layer {} missing", l.diff_id));
            }
        }
        // EROFS files are built at pull or first mount; when recorded they
        // must be there and hash to what erofs.json says.
        if let Some(info) = store.erofs_info(&img) {
            let files = match &info.split {
                None => vec![(dir.join("image.erofs"), info.tree_digest)],
                Some(s) => vec![
                    (dir.join("upper.erofs"), s.upper.digest),
                    (
                        root.join("bases")
                            .join(s.base_chain.hex())
                            .join("image.erofs"),
                        s.base.digest,
                    ),
                ],
            };
            for (p, want) in files {
                report.problems.extend(check(
                    &p.strip_prefix(root).unwrap_or(&p).display().to_string(),
                    fs::read(&p),
                    &want,
                ));
            }
        }
    }

    let refs_dir = root.join("refs");
    for e in fs::read_dir(&refs_dir).map_err(io_err("listing", &refs_dir))? {
        let e = e.map_err(io_err("listing", &refs_dir))?;
        report.refs += 1;
        let fname = e.file_name().to_string_lossy().into_owned();
        let Some(name) = unescape_ref(&fname) else {
            report
                .problems
                .push(format!("ref file {fname:?}: not a valid ref name"));
            continue;
        };
        match fs::read_to_string(e.path())
            .ok()
            .and_then(|s| s.trim().parse::<Digest>().ok())
        {
            Some(d) if store.has_image(&d) => {}
            Some(d) => report
                .problems
                .push(format!("ref {name:?}: points to missing image {d}")),
            None => report
                .problems
                .push(format!("ref {name:?}: does not hold a digest")),
        }
    }
    check_templates(store, &mut report)?;
    ctl.emit(Event::Finished { op: Op::Fsck });
    Ok(report)
}

/// Every map hashes to its name and parses; its chunks exist unless the
/// template was pulled without them; every name points to a map.
fn check_templates(store: &Store, report: &mut FsckReport) -> Result<()> {
    for id in store.template_ids()? {
        report.templates += 1;
        let map = match store.template_map(&id) {
            Ok(m) => m,
            Err(e) => {
                report.problems.push(format!("template {id}: {e}"));
                continue;
            }
        };
        if store.template_remote(&id).is_some() {
            continue;
        }
        let missing: Vec<Digest> = map
            .chunk_set()
            .into_iter()
            .filter(|d| !store.has_object(d))
            .collect();
        if let Some(d) = missing.first() {
            report.problems.push(format!(
                "template {id}: {} missing chunks, e.g. {d}",
                missing.len()
            ));
        }
    }
    for (name, id) in store.template_names()? {
        if !store.has_template(&id) {
            report.problems.push(format!(
                "template name {name:?}: points to missing template {id}"
            ));
        }
    }
    Ok(())
}

/// An object that hashed right (its digest and fs-verity digest), or a
/// problem.
type Checked = (Option<(Digest, VerityDigest)>, Option<String>);

fn check_objects(
    store: &Store,
    report: &mut FsckReport,
    ctl: Ctl<'_>,
) -> Result<HashMap<Digest, VerityDigest>> {
    let objects = store.root().join("objects");
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    for fan in fs::read_dir(&objects).map_err(io_err("listing", &objects))? {
        let fan = fan.map_err(io_err("listing", &objects))?;
        let prefix = fan.file_name().to_string_lossy().into_owned();
        if !fan.path().is_dir() {
            report
                .problems
                .push(format!("stray file in objects/: {prefix}"));
            continue;
        }
        for e in fs::read_dir(fan.path()).map_err(io_err("listing", fan.path()))? {
            let e = e.map_err(io_err("listing", fan.path()))?;
            files.push((
                format!("sha256:{prefix}{}", e.file_name().to_string_lossy()),
                e.path(),
            ));
        }
    }
    report.objects = files.len() as u64;
    let total = files.len() as u64;
    let done = AtomicU64::new(0);
    // hashing is CPU-bound: one thread per core
    let checked = strata_ops::par_map(
        &files,
        strata_ops::default_jobs(8),
        ctl.cancel,
        |_, (name, path)| -> Result<Checked> {
            let r = match name.parse::<Digest>() {
                Err(_) => (
                    None,
                    Some(format!("object {}: name is not a digest", path.display())),
                ),
                Ok(want) => match crate::erofs::hash_both(path) {
                    Ok((got, v)) if got == want => (Some((want, v)), None),
                    Ok((got, _)) => (
                        None,
                        Some(format!("object {want}: content hashes to {got}")),
                    ),
                    Err(e) => (None, Some(format!("object {want}: {e}"))),
                },
            };
            let n = done.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_multiple_of(1024) || n == total {
                ctl.emit(Event::Progress {
                    op: Op::Fsck,
                    unit: Unit::Objects,
                    done: n,
                    total: Some(total),
                });
            }
            Ok(r)
        },
    )?;
    let mut verity = HashMap::new();
    let mut problems = Vec::new();
    for (v, p) in checked {
        if let Some((d, v)) = v {
            verity.insert(d, v);
        }
        problems.extend(p);
    }
    problems.sort();
    report.problems.extend(problems);
    Ok(verity)
}
