//! VM templates: raw disk images stored as fixed-size content-addressed
//! chunks plus a map.
//!
//! ```text
//! blocks/maps/<map hex>      the map (canonical JSON); its digest is the template id
//! blocks/names/<escaped>     template name -> id
//! blocks/cache/<key hex>     build key -> id
//! blocks/remote/<map hex>    where a pulled template's missing chunks come from
//! blocks/pushed/<map hex>    where the template was pushed, newest first (a
//!                            derived template's push reuses the packs there)
//! objects/..                 the chunks themselves (like file contents)
//! ```
//!
//! A chunk is [`CHUNK_SIZE`] bytes of the image (the last one may be
//! shorter); all-zero chunks are not stored (the map leaves them out). The
//! map lists every non-zero chunk, so a template never needs its parent to
//! be read: a template derived from another shares the parent's chunk
//! objects by content and stores only the chunks that changed.
//!
//! Commit order: chunks (objects, durable) -> map -> cache entry -> name,
//! each by rename, so a crash leaves at worst unreferenced chunks or maps.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use strata_digest::Digest;

use crate::{Result, Store, StoreError, escape_ref, io_err, sync_dir, unescape_ref, write_atomic};

/// Bytes per chunk: the qcow2 cluster size, 16 ext4 blocks. Smaller chunks
/// diff finer but cost a file each; see BENCHMARKS.md.
pub const CHUNK_SIZE: u64 = 64 * 1024;

/// ext4 block size: template sizes are whole blocks.
pub const BLOCK_SIZE: u64 = 4096;

/// Format version of [`TemplateMap`].
pub const MAP_VERSION: u32 = 1;

/// A run of consecutive non-zero chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    /// Index of the first chunk.
    pub chunk: u64,
    /// The chunks' contents, in order.
    pub digests: Vec<Digest>,
}

/// What a template is made of: size, lineage and chunk map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateMap {
    /// [`MAP_VERSION`].
    pub version: u32,
    /// Image size in bytes (whole [`BLOCK_SIZE`] blocks).
    pub size: u64,
    /// [`CHUNK_SIZE`] when written by this version.
    pub chunk_size: u64,
    /// The template this one was derived from.
    pub parent: Option<Digest>,
    /// 0 for a template built from an image, parent's + 1 otherwise.
    pub generation: u32,
    /// How it was made (source image, tree digest, options), for people.
    pub build: BTreeMap<String, String>,
    /// Non-zero chunks, sorted, non-overlapping; the rest reads as zeros.
    pub extents: Vec<Extent>,
}

impl TemplateMap {
    /// A map from `(index, digest)` pairs of non-zero chunks, in any order.
    pub fn from_chunks(
        size: u64,
        parent: Option<Digest>,
        generation: u32,
        build: BTreeMap<String, String>,
        chunks: impl IntoIterator<Item = (u64, Digest)>,
    ) -> TemplateMap {
        let mut chunks: Vec<(u64, Digest)> = chunks.into_iter().collect();
        chunks.sort_by_key(|c| c.0);
        chunks.dedup_by_key(|c| c.0);
        let mut extents: Vec<Extent> = Vec::new();
        for (i, d) in chunks {
            match extents.last_mut() {
                Some(e) if e.chunk + e.digests.len() as u64 == i => e.digests.push(d),
                _ => extents.push(Extent {
                    chunk: i,
                    digests: vec![d],
                }),
            }
        }
        TemplateMap {
            version: MAP_VERSION,
            size,
            chunk_size: CHUNK_SIZE,
            parent,
            generation,
            build,
            extents,
        }
    }

    /// Number of chunks the image spans (zero ones included).
    pub fn chunk_count(&self) -> u64 {
        self.size.div_ceil(self.chunk_size)
    }

    /// Bytes of chunk `i` (the last one may be short).
    pub fn chunk_len(&self, i: u64) -> u64 {
        (self.size - (i * self.chunk_size).min(self.size)).min(self.chunk_size)
    }

    /// The content of chunk `i`, or `None` when it is zeros.
    pub fn chunk(&self, i: u64) -> Option<Digest> {
        let at = self.extents.partition_point(|e| e.chunk <= i);
        let e = self.extents.get(at.checked_sub(1)?)?;
        e.digests.get((i - e.chunk) as usize).copied()
    }

    /// Every non-zero chunk as `(index, digest)`, in order.
    pub fn chunks(&self) -> impl Iterator<Item = (u64, Digest)> + '_ {
        self.extents.iter().flat_map(|e| {
            e.digests
                .iter()
                .enumerate()
                .map(move |(k, d)| (e.chunk + k as u64, *d))
        })
    }

    /// The distinct chunk contents.
    pub fn chunk_set(&self) -> BTreeSet<Digest> {
        self.chunks().map(|(_, d)| d).collect()
    }

    /// The canonical bytes (their SHA-256 is the template id).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).expect("maps serialize");
        v.push(b'\n');
        v
    }

    /// The template id.
    pub fn digest(&self) -> Digest {
        Digest::sha256_of(&self.to_bytes())
    }

    /// Parse and check a map: version, sizes, sorted extents inside the image.
    pub fn parse(bytes: &[u8]) -> std::result::Result<TemplateMap, String> {
        let m: TemplateMap = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if m.version != MAP_VERSION {
            return Err(format!(
                "map version {} (this strata reads {MAP_VERSION})",
                m.version
            ));
        }
        if m.chunk_size == 0 || !m.chunk_size.is_multiple_of(BLOCK_SIZE) || m.chunk_size > 64 << 20
        {
            return Err(format!(
                "chunk size {} is not a sane multiple of 4096",
                m.chunk_size
            ));
        }
        if m.size == 0 || !m.size.is_multiple_of(BLOCK_SIZE) {
            return Err(format!(
                "size {} is not a whole number of 4096-byte blocks",
                m.size
            ));
        }
        let mut next = 0u64;
        for e in &m.extents {
            if e.chunk < next || e.digests.is_empty() {
                return Err(format!("extent at chunk {} overlaps or is empty", e.chunk));
            }
            next = e.chunk + e.digests.len() as u64;
            if next > m.chunk_count() {
                return Err(format!(
                    "extent at chunk {} ends past the image ({} chunks)",
                    e.chunk,
                    m.chunk_count()
                ));
            }
        }
        Ok(m)
    }
}

/// Where a template came from when it was pulled without its chunks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateRemote {
    /// The reference it was pulled from (`docker://HOST/REPO:TAG`).
    pub reference: String,
    /// The artifact manifest's digest.
    pub manifest_digest: Digest,
    /// Reached over plain HTTP (`--plain-http`, or an insecure registry):
    /// serving and pushing the template later do the same.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub plain_http: bool,
}

impl Store {
    fn blocks(&self, sub: &str) -> PathBuf {
        self.root.join("blocks").join(sub)
    }

    fn ensure_blocks(&self) -> Result<()> {
        for sub in ["maps", "names", "cache", "remote", "pushed"] {
            let p = self.blocks(sub);
            fs::create_dir_all(&p).map_err(io_err("creating", &p))?;
        }
        Ok(())
    }

    /// Record a template map. Its chunks must be in the store already unless
    /// `remote` says where the missing ones come from. Returns its id.
    pub fn commit_template(
        &self,
        map: &TemplateMap,
        remote: Option<&TemplateRemote>,
    ) -> Result<Digest> {
        let _work = self.work()?;
        self.ensure_blocks()?;
        let bytes = map.to_bytes();
        TemplateMap::parse(&bytes).map_err(|reason| StoreError::Corrupt {
            what: "template map",
            path: self.blocks("maps"),
            reason,
        })?;
        let id = Digest::sha256_of(&bytes);
        if remote.is_none()
            && let Some(d) = map.chunk_set().into_iter().find(|d| !self.has_object(d))
        {
            return Err(StoreError::Unsupported(format!(
                "template {id}: chunk {d} is not in the store"
            )));
        }
        if let Some(r) = remote {
            let p = self.blocks("remote").join(id.hex());
            let v = serde_json::to_vec(r).expect("serializable");
            write_atomic(self, &p, &v)?;
        }
        let p = self.blocks("maps").join(id.hex());
        if !p.exists() {
            write_atomic(self, &p, &bytes)?;
        }
        Ok(id)
    }

    /// Whether the template `id` is recorded.
    pub fn has_template(&self, id: &Digest) -> bool {
        self.blocks("maps").join(id.hex()).is_file()
    }

    /// The map of template `id`, checked against its id.
    pub fn template_map(&self, id: &Digest) -> Result<TemplateMap> {
        let p = self.blocks("maps").join(id.hex());
        let bytes = fs::read(&p).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::TemplateNotFound(id.to_string()),
            _ => io_err("reading", &p)(e),
        })?;
        let corrupt = |reason: String| StoreError::Corrupt {
            what: "template map",
            path: p.clone(),
            reason,
        };
        if Digest::sha256_of(&bytes) != *id {
            return Err(corrupt("its bytes do not hash to its name".into()));
        }
        TemplateMap::parse(&bytes).map_err(corrupt)
    }

    /// Where a pulled template's missing chunks come from.
    pub fn template_remote(&self, id: &Digest) -> Option<TemplateRemote> {
        let bytes = fs::read(self.blocks("remote").join(id.hex())).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Record that template `id` was pushed to `at`: it replaces an earlier
    /// record for the same registry and repository; the newest 16 are kept.
    pub fn add_template_pushed(&self, id: &Digest, at: &TemplateRemote) -> Result<()> {
        self.ensure_blocks()?;
        // `docker://HOST/REPO@DIGEST`: the same repository up to the digest
        let repo = |r: &TemplateRemote| r.reference.split('@').next().unwrap_or("").to_string();
        let mut all = self.template_pushed(id);
        all.retain(|r| repo(r) != repo(at));
        all.insert(0, at.clone());
        all.truncate(16);
        let p = self.blocks("pushed").join(id.hex());
        write_atomic(self, &p, &serde_json::to_vec(&all).expect("serializable"))
    }

    /// Where template `id` was pushed, newest first.
    pub fn template_pushed(&self, id: &Digest) -> Vec<TemplateRemote> {
        fs::read(self.blocks("pushed").join(id.hex()))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Every recorded template id.
    pub fn template_ids(&self) -> Result<Vec<Digest>> {
        let dir = self.blocks("maps");
        if !dir.is_dir() {
            return Ok(Vec::new());
        }
        crate::list_hex_names(&dir)
    }

    /// Name template `id`.
    pub fn set_template_name(&self, name: &str, id: &Digest) -> Result<()> {
        let _work = self.work()?;
        if !self.has_template(id) {
            return Err(StoreError::TemplateNotFound(id.to_string()));
        }
        self.ensure_blocks()?;
        let p = self.blocks("names").join(escape_ref(name));
        write_atomic(self, &p, format!("{id}\n").as_bytes())
    }

    /// Remove a template name; returns what it named.
    pub fn remove_template_name(&self, name: &str) -> Result<Option<Digest>> {
        let _work = self.work()?;
        let p = self.blocks("names").join(escape_ref(name));
        let target = crate::read_ref_file(&p).ok();
        match fs::remove_file(&p) {
            Ok(()) => {
                sync_dir(&self.blocks("names"))?;
                Ok(target)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("removing template name", p)(e)),
        }
    }

    /// Every template name and its id.
    pub fn template_names(&self) -> Result<BTreeMap<String, Digest>> {
        let dir = self.blocks("names");
        let mut out = BTreeMap::new();
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io_err("listing template names", &dir)(e)),
        };
        for e in rd {
            let e = e.map_err(io_err("listing template names", &dir))?;
            let fname = e.file_name();
            let Some(name) = fname.to_str().and_then(unescape_ref) else {
                continue;
            };
            if let Ok(d) = crate::read_ref_file(&e.path()) {
                out.insert(name, d);
            }
        }
        Ok(out)
    }

    /// A template by name, id, or unambiguous id prefix (6+ hex digits).
    pub fn resolve_template(&self, name_or_id: &str) -> Result<Digest> {
        if let Some(d) = self.template_names()?.get(name_or_id) {
            return Ok(*d);
        }
        if let Ok(d) = name_or_id.parse::<Digest>()
            && self.has_template(&d)
        {
            return Ok(d);
        }
        let prefix = name_or_id.strip_prefix("sha256:").unwrap_or(name_or_id);
        if prefix.len() >= 6 && prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
            let m: Vec<Digest> = self
                .template_ids()?
                .into_iter()
                .filter(|d| d.hex().starts_with(prefix))
                .collect();
            if m.len() == 1 {
                return Ok(m[0]);
            }
        }
        Err(StoreError::TemplateNotFound(name_or_id.to_string()))
    }

    /// The template a build with this key made, if it is still recorded.
    pub fn template_cache_get(&self, key: &Digest) -> Option<Digest> {
        let id = crate::read_ref_file(&self.blocks("cache").join(key.hex())).ok()?;
        self.has_template(&id).then_some(id)
    }

    /// Remember that the build `key` made template `id`.
    pub fn template_cache_set(&self, key: &Digest, id: &Digest) -> Result<()> {
        let _work = self.work()?;
        self.ensure_blocks()?;
        let p = self.blocks("cache").join(key.hex());
        write_atomic(self, &p, format!("{id}\n").as_bytes())
    }

    /// Remove the template map `id` (not its chunks: gc frees those), its
    /// remote record and the cache entries pointing to it.
    pub(crate) fn drop_template(&self, id: &Digest) -> Result<()> {
        let cache = self.blocks("cache");
        if let Ok(rd) = fs::read_dir(&cache) {
            for e in rd.flatten() {
                if crate::read_ref_file(&e.path()).is_ok_and(|d| d == *id) {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        let _ = fs::remove_file(self.blocks("remote").join(id.hex()));
        let _ = fs::remove_file(self.blocks("pushed").join(id.hex()));
        let p = self.blocks("maps").join(id.hex());
        match fs::remove_file(&p) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing template map", p)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> Digest {
        Digest::sha256_of(&[n])
    }

    #[test]
    fn maps_group_runs_and_look_chunks_up() {
        let m = TemplateMap::from_chunks(
            10 * CHUNK_SIZE - BLOCK_SIZE,
            None,
            0,
            BTreeMap::new(),
            [(5, d(5)), (0, d(0)), (1, d(1)), (9, d(9)), (6, d(6))],
        );
        assert_eq!(m.extents.len(), 3);
        assert_eq!(m.extents[0].chunk, 0);
        assert_eq!(m.extents[1].digests, vec![d(5), d(6)]);
        assert_eq!(m.chunk(1), Some(d(1)));
        assert_eq!(m.chunk(2), None);
        assert_eq!(m.chunk(6), Some(d(6)));
        assert_eq!(m.chunk(7), None);
        assert_eq!(m.chunk(9), Some(d(9)));
        assert_eq!(m.chunk(10), None);
        assert_eq!(m.chunk_count(), 10);
        assert_eq!(m.chunk_len(9), CHUNK_SIZE - BLOCK_SIZE);
        assert_eq!(m.chunk_len(0), CHUNK_SIZE);
        let back = TemplateMap::parse(&m.to_bytes()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.digest(), m.digest());
        assert_eq!(m.chunks().count(), 5);
    }

    #[test]
    fn pushes_are_recorded_per_repository_newest_first() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join("s")).unwrap();
        let at = |r: &str, n: u8| TemplateRemote {
            reference: format!("docker://{r}@{}", d(n)),
            manifest_digest: d(n),
            plain_http: true,
        };
        assert!(store.template_pushed(&d(0)).is_empty());
        store
            .add_template_pushed(&d(0), &at("a:5000/vm/t", 1))
            .unwrap();
        store
            .add_template_pushed(&d(0), &at("b:5000/vm/t", 2))
            .unwrap();
        store
            .add_template_pushed(&d(0), &at("a:5000/vm/t", 3))
            .unwrap();
        let got = store.template_pushed(&d(0));
        assert_eq!(got, vec![at("a:5000/vm/t", 3), at("b:5000/vm/t", 2)]);
        for n in 0..20 {
            store
                .add_template_pushed(&d(0), &at(&format!("c:5000/r{n}"), n))
                .unwrap();
        }
        assert_eq!(store.template_pushed(&d(0)).len(), 16);
    }

    #[test]
    fn bad_maps_are_refused_with_the_reason() {
        let mut m = TemplateMap::from_chunks(CHUNK_SIZE, None, 0, BTreeMap::new(), [(0, d(0))]);
        m.size = 4097;
        assert!(
            TemplateMap::parse(&m.to_bytes())
                .unwrap_err()
                .contains("4096")
        );
        m.size = CHUNK_SIZE;
        m.extents.push(Extent {
            chunk: 1,
            digests: vec![d(1)],
        });
        assert!(
            TemplateMap::parse(&m.to_bytes())
                .unwrap_err()
                .contains("past the image")
        );
        m.extents.pop();
        m.version = 9;
        assert!(
            TemplateMap::parse(&m.to_bytes())
                .unwrap_err()
                .contains("version")
        );
    }
}
