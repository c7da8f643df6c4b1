//! Chunk packs: how a template's chunks travel through a registry.
//!
//! ```text
//! pack   a blob that is chunks laid end to end (map order: the disk's
//!        order, so a run of neighbouring chunks is one range request)
//! index  which pack holds each distinct chunk of the map, where:
//!        {"version":1,"packs":[PACK DIGEST..],
//!         "chunks":[[CHUNK DIGEST, PACK, OFFSET, LENGTH]..]}
//! ```
//!
//! A template's artifact lists the index first, then its packs. Packs are
//! about [`PACK_TARGET`] bytes each: a 2 GiB Debian template with 180 MiB
//! of non-zero chunks is 6 packs, where one blob per chunk was 2,808. A
//! derived template's artifact lists the parent's packs it uses (their
//! blobs are not uploaded again) and one new pack of the chunks its parent
//! lacks.
//!
//! The index is untrusted: [`Packs::check`] refuses one that names a pack
//! the manifest does not list, an entry outside its pack or overlapping
//! another, a chunk twice, a chunk the map does not have, or leaves a chunk
//! of the map out. Every chunk read from a pack is still checked against its
//! digest before it is used or stored.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use strata_digest::Digest;
use strata_oci::manifest::Descriptor;
use strata_store::TemplateMap;

/// A pack blob.
pub const PACK_MEDIA_TYPE: &str = "application/vnd.strata.rootfs.pack.v1";
/// The index blob (the artifact's first layer).
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.strata.rootfs.packindex.v1+json";
/// [`PackIndex::version`] written by this version.
pub const INDEX_VERSION: u32 = 1;
/// A new pack is closed once it holds this many bytes.
pub const PACK_TARGET: u64 = 32 << 20;
/// Packs bigger than this are refused (a pack is read into memory to be
/// copied between registries).
pub const MAX_PACK: u64 = 256 << 20;

/// A pack blob's descriptor.
pub fn descriptor(digest: Digest, size: u64) -> Descriptor {
    Descriptor {
        media_type: PACK_MEDIA_TYPE.into(),
        digest,
        size,
        annotations: std::collections::BTreeMap::new(),
        platform: None,
        urls: Vec::new(),
    }
}

/// The index as stored (see the [module documentation](self)).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackIndex {
    /// [`INDEX_VERSION`].
    pub version: u32,
    /// The pack blobs, in the manifest's order.
    pub packs: Vec<Digest>,
    /// Every distinct chunk of the map, in map order.
    pub chunks: Vec<IndexEntry>,
}

/// One chunk: its digest, the pack (index into [`PackIndex::packs`]), its
/// offset in the pack and its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry(pub Digest, pub u32, pub u64, pub u64);

impl PackIndex {
    /// Canonical bytes (what is pushed and hashed).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("serializable")
    }

    /// The most bytes an index for `map` with `packs` packs can take: a
    /// bigger blob is refused before it is fetched.
    pub fn max_len(map: &TemplateMap, packs: usize) -> u64 {
        let chunks = map.chunk_set().len() as u64;
        4096 + 80 * packs as u64 + 128 * chunks
    }
}

/// Where a chunk is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located {
    /// Index into [`Packs::packs`].
    pub pack: usize,
    /// Offset in that pack.
    pub offset: u64,
    /// Length.
    pub len: u64,
}

/// A checked index with its packs' descriptors.
#[derive(Debug, Clone)]
pub struct Packs {
    /// The pack blobs as the manifest lists them.
    pub packs: Vec<Descriptor>,
    by_chunk: HashMap<Digest, Located>,
    /// Per pack: its chunks by offset.
    order: Vec<Vec<(u64, u64, Digest)>>,
}

impl Packs {
    /// Parse and check `bytes` against the manifest's pack descriptors and
    /// the template's map. The error says what is wrong.
    pub fn parse(bytes: &[u8], packs: &[Descriptor], map: &TemplateMap) -> Result<Packs, String> {
        let index: PackIndex =
            serde_json::from_slice(bytes).map_err(|e| format!("it does not parse: {e}"))?;
        Packs::check(&index, packs, map)
    }

    /// Check `index` (see the [module documentation](self)).
    pub fn check(
        index: &PackIndex,
        packs: &[Descriptor],
        map: &TemplateMap,
    ) -> Result<Packs, String> {
        if index.version != INDEX_VERSION {
            return Err(format!(
                "version {} (this strata reads {INDEX_VERSION})",
                index.version
            ));
        }
        if index.packs.len() != packs.len() {
            return Err(format!(
                "it names {} packs, the manifest lists {}",
                index.packs.len(),
                packs.len()
            ));
        }
        for (i, (d, desc)) in index.packs.iter().zip(packs).enumerate() {
            if *d != desc.digest {
                return Err(format!(
                    "pack {i} is {d} in the index, {} in the manifest",
                    desc.digest
                ));
            }
            if desc.size > MAX_PACK {
                return Err(format!(
                    "pack {i} ({d}) is {} bytes, more than {MAX_PACK}",
                    desc.size
                ));
            }
        }
        let wanted = map.chunk_set();
        let mut by_chunk = HashMap::with_capacity(index.chunks.len());
        let mut order: Vec<Vec<(u64, u64, Digest)>> = vec![Vec::new(); packs.len()];
        for (n, &IndexEntry(d, pack, offset, len)) in index.chunks.iter().enumerate() {
            let at = || format!("entry {n} (chunk {d})");
            let Some(desc) = packs.get(pack as usize) else {
                return Err(format!(
                    "{}: pack {pack}, but there are {} packs",
                    at(),
                    packs.len()
                ));
            };
            if len == 0 || len > map.chunk_size {
                return Err(format!(
                    "{}: length {len}, chunks are 1..={} bytes",
                    at(),
                    map.chunk_size
                ));
            }
            if offset.checked_add(len).is_none_or(|end| end > desc.size) {
                return Err(format!(
                    "{}: bytes {offset}+{len} are outside pack {pack} ({} bytes)",
                    at(),
                    desc.size
                ));
            }
            if !wanted.contains(&d) {
                return Err(format!("{}: the map has no such chunk", at()));
            }
            let loc = Located {
                pack: pack as usize,
                offset,
                len,
            };
            if by_chunk.insert(d, loc).is_some() {
                return Err(format!("{}: the chunk is listed twice", at()));
            }
            order[pack as usize].push((offset, len, d));
        }
        for (p, entries) in order.iter_mut().enumerate() {
            entries.sort_unstable();
            for w in entries.windows(2) {
                if w[0].0 + w[0].1 > w[1].0 {
                    return Err(format!(
                        "chunks {} (bytes {}+{}) and {} (bytes {}+{}) overlap in pack {p}",
                        w[0].2, w[0].0, w[0].1, w[1].2, w[1].0, w[1].1
                    ));
                }
            }
        }
        for (i, d) in map.chunks() {
            match by_chunk.get(&d) {
                None => return Err(format!("chunk {i} of the map ({d}) is in no pack")),
                Some(l) if l.len != map.chunk_len(i) => {
                    return Err(format!(
                        "chunk {i} of the map ({d}) is {} bytes, the index says {}",
                        map.chunk_len(i),
                        l.len
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(Packs {
            packs: packs.to_vec(),
            by_chunk,
            order,
        })
    }

    /// Where chunk `d` is.
    pub fn locate(&self, d: &Digest) -> Option<Located> {
        self.by_chunk.get(d).copied()
    }

    /// Distinct chunks listed.
    pub fn len(&self) -> usize {
        self.by_chunk.len()
    }

    /// Whether no chunk is listed.
    pub fn is_empty(&self) -> bool {
        self.by_chunk.is_empty()
    }

    /// The chunks right after `d` in its pack, each starting where the one
    /// before ends, while their lengths with `d`'s stay within `max` bytes:
    /// what one range request can bring along with `d`.
    pub fn followers(&self, d: &Digest, max: u64) -> Vec<(Digest, u64)> {
        let Some(at) = self.locate(d) else {
            return Vec::new();
        };
        let entries = &self.order[at.pack];
        let Ok(pos) = entries.binary_search(&(at.offset, at.len, *d)) else {
            return Vec::new();
        };
        let (mut end, mut total) = (at.offset + at.len, at.len);
        let mut out = Vec::new();
        for &(offset, len, c) in &entries[pos + 1..] {
            if offset != end || total + len > max {
                break;
            }
            out.push((c, len));
            end += len;
            total += len;
        }
        out
    }

    /// Per pack, its chunks by offset (`(offset, len, digest)`).
    pub fn pack_chunks(&self, pack: usize) -> &[(u64, u64, Digest)] {
        &self.order[pack]
    }

    /// Packs that hold at least one of `chunks`.
    pub fn packs_holding<'a>(
        &self,
        chunks: impl IntoIterator<Item = &'a Digest>,
    ) -> BTreeSet<usize> {
        chunks
            .into_iter()
            .filter_map(|d| self.locate(d).map(|l| l.pack))
            .collect()
    }
}

/// How a push lays out a template's distinct chunks (map order): which
/// packs of a base artifact it reuses and which new packs it writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Base packs used, by their index in the base, ascending.
    pub reused: Vec<usize>,
    /// New packs: their chunks in order (digest, length).
    pub new: Vec<Vec<(Digest, u64)>>,
}

/// Lay out `chunks` (distinct, map order): those `base` has stay in its
/// packs, the rest go into new packs of about `target` bytes each.
pub fn plan(chunks: &[(Digest, u64)], base: Option<&Packs>, target: u64) -> Plan {
    let mut reused = BTreeSet::new();
    let mut new: Vec<Vec<(Digest, u64)>> = Vec::new();
    let mut filled = 0u64;
    for &(d, len) in chunks {
        if let Some(l) = base.and_then(|b| b.locate(&d)) {
            reused.insert(l.pack);
            continue;
        }
        if new.is_empty() || filled + len > target {
            new.push(Vec::new());
            filled = 0;
        }
        new.last_mut().expect("just pushed").push((d, len));
        filled += len;
    }
    Plan {
        reused: reused.into_iter().collect(),
        new,
    }
}

/// The index of a planned push once its new packs' digests are known:
/// packs are the reused base packs (in base order) then the new ones.
pub fn index_for(
    chunks: &[(Digest, u64)],
    base: Option<&Packs>,
    plan: &Plan,
    new_digests: &[Digest],
) -> PackIndex {
    let mut packs: Vec<Digest> = Vec::new();
    let mut renumber = HashMap::new();
    if let Some(b) = base {
        for &p in &plan.reused {
            renumber.insert(p, packs.len() as u32);
            packs.push(b.packs[p].digest);
        }
    }
    let mut new_at = HashMap::new();
    for (pack, d) in plan.new.iter().zip(new_digests) {
        let number = packs.len() as u32;
        packs.push(*d);
        let mut offset = 0;
        for &(c, len) in pack {
            new_at.insert(c, (number, offset));
            offset += len;
        }
    }
    let entries = chunks
        .iter()
        .map(|&(d, len)| match new_at.get(&d) {
            Some(&(p, offset)) => IndexEntry(d, p, offset, len),
            None => {
                let l = base
                    .and_then(|b| b.locate(&d))
                    .expect("a chunk not in a new pack is in the base");
                IndexEntry(d, renumber[&l.pack], l.offset, len)
            }
        })
        .collect();
    PackIndex {
        version: INDEX_VERSION,
        packs,
        chunks: entries,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn d(n: u8) -> Digest {
        Digest::sha256_of(&[n])
    }

    fn desc(digest: Digest, size: u64) -> Descriptor {
        descriptor(digest, size)
    }

    /// A map of 4 full chunks (1, 2, 3, 2 again) and a short last one (4).
    fn map() -> TemplateMap {
        let cs = strata_store::CHUNK_SIZE;
        TemplateMap::from_chunks(
            4 * cs + 4096,
            None,
            0,
            BTreeMap::new(),
            [(0, d(1)), (1, d(2)), (2, d(3)), (3, d(2)), (4, d(4))],
        )
    }

    fn chunks() -> Vec<(Digest, u64)> {
        let cs = strata_store::CHUNK_SIZE;
        vec![(d(1), cs), (d(2), cs), (d(3), cs), (d(4), 4096)]
    }

    #[test]
    fn a_planned_index_checks_and_locates_every_chunk() {
        let cs = strata_store::CHUNK_SIZE;
        let plan = plan(&chunks(), None, 2 * cs);
        assert_eq!(plan.new.len(), 2, "{plan:?}");
        let digests = [d(100), d(101)];
        let index = index_for(&chunks(), None, &plan, &digests);
        let descs = [desc(d(100), 2 * cs), desc(d(101), cs + 4096)];
        let packs = Packs::parse(&index.to_bytes(), &descs, &map()).unwrap();
        assert_eq!(packs.len(), 4);
        assert_eq!(
            packs.locate(&d(4)),
            Some(Located {
                pack: 1,
                offset: cs,
                len: 4096
            })
        );
        assert_eq!(packs.followers(&d(1), 4 * cs), vec![(d(2), cs)]);
        assert_eq!(packs.followers(&d(1), cs), vec![]);
        assert_eq!(packs.followers(&d(3), 4 * cs), vec![(d(4), 4096)]);
    }

    #[test]
    fn a_derived_plan_reuses_base_packs_and_writes_one_new_pack() {
        let cs = strata_store::CHUNK_SIZE;
        let base_chunks = &chunks()[..3];
        let base_map = TemplateMap::from_chunks(
            3 * cs,
            None,
            0,
            BTreeMap::new(),
            [(0, d(1)), (1, d(2)), (2, d(3))],
        );
        let bplan = plan(base_chunks, None, 2 * cs);
        let bindex = index_for(base_chunks, None, &bplan, &[d(100), d(101)]);
        let base = Packs::check(
            &bindex,
            &[desc(d(100), 2 * cs), desc(d(101), cs)],
            &base_map,
        )
        .unwrap();
        let p = plan(&chunks(), Some(&base), PACK_TARGET);
        assert_eq!(p.reused, vec![0, 1]);
        assert_eq!(p.new, vec![vec![(d(4), 4096)]]);
        let index = index_for(&chunks(), Some(&base), &p, &[d(102)]);
        assert_eq!(index.packs, vec![d(100), d(101), d(102)]);
        Packs::check(
            &index,
            &[desc(d(100), 2 * cs), desc(d(101), cs), desc(d(102), 4096)],
            &map(),
        )
        .unwrap();
    }

    #[test]
    fn bad_indexes_are_refused_with_the_reason() {
        let cs = strata_store::CHUNK_SIZE;
        let good = || PackIndex {
            version: 1,
            packs: vec![d(100)],
            chunks: vec![
                IndexEntry(d(1), 0, 0, cs),
                IndexEntry(d(2), 0, cs, cs),
                IndexEntry(d(3), 0, 2 * cs, cs),
                IndexEntry(d(4), 0, 3 * cs, 4096),
            ],
        };
        let descs = [desc(d(100), 3 * cs + 4096)];
        Packs::check(&good(), &descs, &map()).unwrap();
        let refused = |f: &dyn Fn(&mut PackIndex), want: &str| {
            let mut i = good();
            f(&mut i);
            let e = Packs::check(&i, &descs, &map()).unwrap_err();
            assert!(e.contains(want), "{e:?} should say {want:?}");
        };
        refused(&|i| i.chunks[1].2 = cs / 2, "overlap");
        refused(&|i| i.chunks[3].2 = 3 * cs + 1, "outside pack");
        refused(&|i| i.chunks[3].2 = u64::MAX - 10, "outside pack");
        refused(&|i| i.chunks[0].1 = 7, "there are 1 packs");
        refused(&|i| i.chunks[0].0 = d(9), "no such chunk");
        refused(&|i| i.chunks[1].0 = d(1), "listed twice");
        refused(&|i| i.chunks.truncate(3), "in no pack");
        refused(&|i| i.chunks[3].3 = cs, "outside pack");
        refused(&|i| i.chunks[0].3 = 0, "length 0");
        refused(&|i| i.packs[0] = d(5), "in the manifest");
        refused(&|i| i.packs.push(d(5)), "manifest lists 1");
        refused(&|i| i.version = 2, "version 2");
        let e = Packs::parse(
            b"{\"version\":1,\"packs\":[],\"chunks\":[],\"x\":1}",
            &[],
            &map(),
        )
        .unwrap_err();
        assert!(e.contains("parse"), "{e}");
        let e = Packs::check(&good(), &[desc(d(100), MAX_PACK + 1)], &map()).unwrap_err();
        assert!(e.contains("more than"), "{e}");
    }
}
