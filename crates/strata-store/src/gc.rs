//! Mark and sweep.
//!
//! Mark: every ref names an image; every image names layers; every layer's
//! record names objects. Sweep: images, layers, blob aliases and objects
//! that nothing marked reaches. Runs under the exclusive store lock, so no
//! pull can be between "object written" and "record committed" meanwhile.

use std::collections::HashSet;
use std::fs;
use std::path::Path;

use serde::Serialize;
use strata_digest::Digest;

use strata_ops::{Ctl, Event, Op};

use crate::{Result, Store, io_err, list_hex_names};

/// What a gc freed (or would free, on a dry run).
#[derive(Debug, Default, Serialize)]
pub struct GcReport {
    /// Whether nothing was actually removed.
    pub dry_run: bool,
    /// Images removed.
    pub images: Vec<Digest>,
    /// Layers removed.
    pub layers: Vec<Digest>,
    /// Templates removed (unnamed and not served).
    pub templates: Vec<Digest>,
    /// Number of objects removed.
    pub objects: u64,
    /// Blob aliases removed.
    pub blob_aliases: u64,
    /// Bytes freed (objects + records + image files).
    pub bytes_freed: u64,
}

pub(crate) fn run(store: &Store, dry_run: bool, ctl: Ctl<'_>) -> Result<GcReport> {
    ctl.emit(Event::Started {
        op: Op::Gc,
        subject: store.root().display().to_string(),
    });
    // marking removes nothing; sweeping checks the cancel before each
    // removal (each one leaves a valid store: only unreachable things go)
    ctl.cancel.check()?;
    let mut report = GcReport {
        dry_run,
        ..Default::default()
    };
    let root = store.root();
    // Named images, and images mounted now (their objects are in use).
    let mut live_images: HashSet<Digest> = store.refs()?.into_values().collect();
    let (mounted_images, served_templates, mount_points) = mounted()?;
    live_images.extend(mounted_images);
    // What live leases keep; stale leases go.
    let mut leased_objects: HashSet<Digest> = HashSet::new();
    let mut leased_templates: HashSet<Digest> = HashSet::new();
    for (path, lease) in crate::leases::all(root)? {
        if lease.is_live(&mount_points) {
            live_images.extend(lease.roots.images.iter().copied());
            leased_objects.extend(lease.roots.objects.iter().copied());
            leased_templates.extend(lease.roots.templates.iter().copied());
        } else if !dry_run {
            let _ = fs::remove_file(&path);
        }
    }
    let mut live_layers = HashSet::new();
    for img in store.image_digests()? {
        if live_images.contains(&img) {
            let meta = store.image_meta(&img)?;
            live_layers.extend(meta.layers.iter().map(|l| l.diff_id));
        } else {
            let dir = root.join("images").join(img.hex());
            report.bytes_freed += dir_size(&dir);
            report.images.push(img);
            if !dry_run {
                ctl.cancel.check()?;
                fs::remove_dir_all(&dir).map_err(io_err("removing image", &dir))?;
            }
        }
    }
    // Base parts of hybrid images: live while a live image stacks on one.
    let mut live_bases = HashSet::new();
    for img in &live_images {
        if let Some(s) = store.erofs_info(img).and_then(|i| i.split) {
            live_bases.insert(s.base_chain);
        }
    }
    let bases = root.join("bases");
    if bases.is_dir() {
        for chain in list_hex_names(&bases)? {
            if !live_bases.contains(&chain) {
                let dir = bases.join(chain.hex());
                report.bytes_freed += dir_size(&dir);
                if !dry_run {
                    fs::remove_dir_all(&dir).map_err(io_err("removing base part", &dir))?;
                }
            }
        }
    }
    let mut live_objects = HashSet::new();
    for layer in list_hex_names(&root.join("layers"))? {
        let dir = root.join("layers").join(layer.hex());
        if live_layers.contains(&layer) {
            let record = store.layer_record(&layer)?;
            live_objects.extend(record.objects());
        } else {
            report.bytes_freed += dir_size(&dir);
            report.layers.push(layer);
            if !dry_run {
                ctl.cancel.check()?;
                fs::remove_dir_all(&dir).map_err(io_err("removing layer", &dir))?;
            }
        }
    }
    // Templates: named ones and served ones live; their chunks are objects.
    let mut live_templates: HashSet<Digest> = store.template_names()?.into_values().collect();
    live_templates.extend(served_templates);
    live_templates.extend(leased_templates);
    for id in store.template_ids()? {
        if live_templates.contains(&id) {
            match store.template_map(&id) {
                Ok(m) => live_objects.extend(m.chunk_set()),
                Err(e) => return Err(e),
            }
        } else {
            report.templates.push(id);
            if !dry_run {
                store.drop_template(&id)?;
            }
        }
    }
    let blobs = root.join("blobs");
    for e in fs::read_dir(&blobs).map_err(io_err("listing", &blobs))? {
        let e = e.map_err(io_err("listing", &blobs))?;
        let target = fs::read_to_string(e.path())
            .ok()
            .and_then(|s| s.trim().parse::<Digest>().ok());
        if !target.is_some_and(|t| live_layers.contains(&t)) {
            report.blob_aliases += 1;
            if !dry_run {
                fs::remove_file(e.path()).map_err(io_err("removing blob alias", e.path()))?;
            }
        }
    }
    let objects = root.join("objects");
    for fan in fs::read_dir(&objects).map_err(io_err("listing", &objects))? {
        let fan = fan.map_err(io_err("listing", &objects))?;
        let prefix = fan.file_name().to_string_lossy().into_owned();
        for e in fs::read_dir(fan.path()).map_err(io_err("listing", fan.path()))? {
            let e = e.map_err(io_err("listing", fan.path()))?;
            let name = format!("sha256:{prefix}{}", e.file_name().to_string_lossy());
            let live = name
                .parse::<Digest>()
                .is_ok_and(|d| live_objects.contains(&d) || leased_objects.contains(&d));
            if !live {
                report.objects += 1;
                report.bytes_freed += e.metadata().map(|m| m.len()).unwrap_or(0);
                if !dry_run {
                    ctl.cancel.check()?;
                    fs::remove_file(e.path()).map_err(io_err("removing object", e.path()))?;
                }
            }
        }
    }
    ctl.emit(Event::Finished { op: Op::Gc });
    Ok(report)
}

fn dir_size(p: &Path) -> u64 {
    fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

/// Images mounted by `strata mount` (mount source `strata:<manifest
/// digest>`) and templates served (`strata-rootfs:<id>`) in this mount
/// namespace, and every mount point. Unreadable mountinfo is an error: gc
/// does not guess what is in use.
fn mounted() -> Result<(Vec<Digest>, Vec<Digest>, Vec<std::path::PathBuf>)> {
    let mounts = strata_sys::mounts().map_err(|e| crate::StoreError::Io {
        action: "reading mounts",
        path: "/proc/self/mountinfo".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let of = |prefix: &str| -> Vec<Digest> {
        mounts
            .iter()
            .filter_map(|m| m.source.strip_prefix(prefix)?.parse().ok())
            .collect()
    };
    let points = mounts.iter().map(|m| m.mount_point.clone()).collect();
    Ok((of("strata:"), of("strata-rootfs:"), points))
}
