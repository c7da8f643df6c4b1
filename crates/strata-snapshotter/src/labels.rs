//! The snapshot labels strata reads and writes, and chain ids.
//!
//! containerd passes a proxy snapshotter only `containerd.io/snapshot.ref`
//! and labels starting `containerd.io/snapshot/`; `strata rpull` sets
//! these on each layer's Prepare (no secrets: containerd stores them):
//!
//! | label | value |
//! | --- | --- |
//! | `containerd.io/snapshot/strata.image` | the image reference, e.g. `docker://host/repo:tag` |
//! | `containerd.io/snapshot/strata.manifest` | the platform manifest's digest |
//! | `containerd.io/snapshot/strata.layer` | the layer's index in the manifest (0 = bottom) |
//! | `containerd.io/snapshot/strata.plain-http` | `true`: reach the registry over plain HTTP |
//!
//! Kubernetes' CRI (with `disable_snapshot_annotations = false`) sets its
//! own, which strata reads the same way: `cri.image-ref` (the image),
//! `cri.manifest-digest`, `cri.layer-digest` (the layer's blob, found in
//! the manifest). Plain HTTP then comes from the store's
//! `registries.json` (`{"insecure": ["host:port"]}`).

use std::collections::BTreeMap;

use sha2::{Digest as _, Sha256};
use strata_digest::Digest;

/// The target chain id of an unpack (containerd's unpacker sets it).
pub const SNAPSHOT_REF: &str = "containerd.io/snapshot.ref";
/// See the module docs.
pub const IMAGE: &str = "containerd.io/snapshot/strata.image";
/// See the module docs.
pub const MANIFEST: &str = "containerd.io/snapshot/strata.manifest";
/// See the module docs.
pub const LAYER: &str = "containerd.io/snapshot/strata.layer";
/// See the module docs.
pub const PLAIN_HTTP: &str = "containerd.io/snapshot/strata.plain-http";
/// CRI's image reference.
pub const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
/// CRI's platform manifest digest.
pub const CRI_MANIFEST: &str = "containerd.io/snapshot/cri.manifest-digest";
/// CRI's layer blob digest.
pub const CRI_LAYER: &str = "containerd.io/snapshot/cri.layer-digest";

/// Which layer of the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerSel {
    /// By index (strata's label).
    Index(usize),
    /// By its blob digest (CRI's label).
    Blob(Digest),
}

/// What the labels of a remote Prepare ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteLayer {
    /// The image reference.
    pub image: String,
    /// The platform manifest's digest.
    pub manifest: Digest,
    /// The layer.
    pub layer: LayerSel,
    /// Plain HTTP to the registry.
    pub plain_http: bool,
    /// The chain id the layer must end (the `snapshot.ref` target).
    pub target: String,
}

impl RemoteLayer {
    /// `Ok(None)`: not a remote Prepare (no strata labels); an error
    /// names the label that is missing or wrong.
    pub fn from_labels(labels: &BTreeMap<String, String>) -> Result<Option<RemoteLayer>, String> {
        let get = |k: &str| labels.get(k).ok_or_else(|| format!("label {k} is missing"));
        let Some(image) = labels.get(IMAGE) else {
            let Some(image) = labels.get(CRI_IMAGE_REF) else {
                return Ok(None);
            };
            let manifest: Digest = get(CRI_MANIFEST)?
                .parse()
                .map_err(|e| format!("label {CRI_MANIFEST}: {e}"))?;
            let blob: Digest = get(CRI_LAYER)?
                .parse()
                .map_err(|e| format!("label {CRI_LAYER}: {e}"))?;
            return Ok(Some(RemoteLayer {
                image: image.clone(),
                manifest,
                layer: LayerSel::Blob(blob),
                plain_http: false,
                target: get(SNAPSHOT_REF)?.clone(),
            }));
        };
        let manifest: Digest = get(MANIFEST)?
            .parse()
            .map_err(|e| format!("label {MANIFEST}: {e}"))?;
        let layer: usize = get(LAYER)?
            .parse()
            .map_err(|_| format!("label {LAYER} is not a layer index"))?;
        let target = get(SNAPSHOT_REF)?.clone();
        Ok(Some(RemoteLayer {
            image: image.clone(),
            manifest,
            layer: LayerSel::Index(layer),
            plain_http: labels.get(PLAIN_HTTP).is_some_and(|v| v == "true"),
            target,
        }))
    }
}

/// containerd's chain ids of `diff_ids`: the first layer's is its diff
/// id, each next one `sha256(previous + " " + diff_id)`.
pub fn chain_ids(diff_ids: &[Digest]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.to_string(),
            Some(prev) => {
                let h = Sha256::digest(format!("{prev} {d}").as_bytes());
                format!("sha256:{}", hex::encode(h))
            }
        };
        out.push(next);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_as_containerd_computes_them() {
        // identity.ChainID in opencontainers/image-spec, worked by hand:
        // sha256("sha256:aa.. sha256:bb..")
        let a: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        let b: Digest = format!("sha256:{}", "b".repeat(64)).parse().unwrap();
        let ids = chain_ids(&[a, b]);
        assert_eq!(ids[0], a.to_string());
        let want = Sha256::digest(format!("{a} {b}").as_bytes());
        assert_eq!(ids[1], format!("sha256:{}", hex::encode(want)));
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn labels_name_what_is_missing() {
        let mut l = BTreeMap::new();
        assert_eq!(RemoteLayer::from_labels(&l), Ok(None));
        l.insert(IMAGE.to_string(), "docker://h/r:t".to_string());
        assert!(RemoteLayer::from_labels(&l).unwrap_err().contains(MANIFEST));
        l.insert(MANIFEST.to_string(), format!("sha256:{}", "c".repeat(64)));
        l.insert(LAYER.to_string(), "x".to_string());
        assert!(RemoteLayer::from_labels(&l).unwrap_err().contains(LAYER));
        l.insert(LAYER.to_string(), "1".to_string());
        assert!(
            RemoteLayer::from_labels(&l)
                .unwrap_err()
                .contains(SNAPSHOT_REF)
        );
        l.insert(SNAPSHOT_REF.to_string(), "sha256:t".to_string());
        let r = RemoteLayer::from_labels(&l).unwrap().unwrap();
        assert_eq!((r.layer, r.plain_http), (LayerSel::Index(1), false));
        // CRI's labels: the layer by its blob
        let mut c = BTreeMap::new();
        c.insert(CRI_IMAGE_REF.to_string(), "127.0.0.1:5000/a:1".to_string());
        c.insert(SNAPSHOT_REF.to_string(), "sha256:t".to_string());
        assert!(
            RemoteLayer::from_labels(&c)
                .unwrap_err()
                .contains(CRI_MANIFEST)
        );
        c.insert(
            CRI_MANIFEST.to_string(),
            format!("sha256:{}", "c".repeat(64)),
        );
        c.insert(CRI_LAYER.to_string(), format!("sha256:{}", "d".repeat(64)));
        let r = RemoteLayer::from_labels(&c).unwrap().unwrap();
        assert!(matches!(r.layer, LayerSel::Blob(_)));
        // CRI's list of the image's layers, cut at its 4 KiB label limit
        // mid-digest as CRI cuts it: not read, not an error
        let long: Vec<String> = (0..60).map(|i| format!("sha256:{:064x}", i)).collect();
        let mut cut = long.join(",");
        cut.truncate(4000);
        c.insert("containerd.io/snapshot/cri.image-layers".to_string(), cut);
        assert_eq!(RemoteLayer::from_labels(&c).unwrap().unwrap(), r);
    }
}
