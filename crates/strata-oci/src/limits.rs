//! Bounds on the documents and metadata strata reads from outside
//! (registries, layouts, archives), with defaults a user can change.
//!
//! The process sets them once at start ([`set`]; the CLI reads
//! [`Limits::from_env`]); every reader then checks against [`current`].
//! Bounds that protect memory per request (a chunk, a path, a ratio) are
//! constants next to their parsers; these are the ones a legitimate image
//! may need raised.

use std::sync::OnceLock;

/// The limits; [`Limits::default`] is what SECURITY.md documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest manifest or index: 4 MiB, the OCI distribution spec's
    /// guidance (registries need accept no larger), also ORAS's and
    /// Pulp's default. `STRATA_MAX_MANIFEST_BYTES`.
    pub manifest_bytes: u64,
    /// Largest image config: 16 MiB (a config carries the history, which
    /// grows with the layers). `STRATA_MAX_CONFIG_BYTES`.
    pub config_bytes: u64,
    /// Entries one zstd:chunked TOC may list: 2^20.
    /// `STRATA_MAX_LAYER_TOC_ENTRIES`.
    pub layer_toc_entries: u64,
    /// Entries all TOCs of one image may list together: 2^21.
    /// `STRATA_MAX_IMAGE_TOC_ENTRIES`.
    pub image_toc_entries: u64,
    /// Uncompressed TOC and tar-split bytes of one image together: 1 GiB.
    /// `STRATA_MAX_IMAGE_METADATA_BYTES`.
    pub image_metadata_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            manifest_bytes: 4 << 20,
            config_bytes: 16 << 20,
            layer_toc_entries: strata_chunked::reader::MAX_TOC_ENTRIES,
            image_toc_entries: crate::partial::MAX_IMAGE_ENTRIES,
            image_metadata_bytes: crate::partial::MAX_IMAGE_METADATA,
        }
    }
}

/// The environment variables [`Limits::from_env`] reads, with the field
/// each sets.
pub const ENV_VARS: [&str; 5] = [
    "STRATA_MAX_MANIFEST_BYTES",
    "STRATA_MAX_CONFIG_BYTES",
    "STRATA_MAX_LAYER_TOC_ENTRIES",
    "STRATA_MAX_IMAGE_TOC_ENTRIES",
    "STRATA_MAX_IMAGE_METADATA_BYTES",
];

impl Limits {
    /// The defaults with what `get(name)` gives for [`ENV_VARS`] (a
    /// positive integer, optionally with a `K`, `M` or `G` suffix meaning
    /// KiB, MiB, GiB). An unparsable value is an error naming it.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Limits, String> {
        let mut l = Limits::default();
        let fields: [&mut u64; 5] = [
            &mut l.manifest_bytes,
            &mut l.config_bytes,
            &mut l.layer_toc_entries,
            &mut l.image_toc_entries,
            &mut l.image_metadata_bytes,
        ];
        for (name, field) in ENV_VARS.iter().zip(fields) {
            if let Some(v) = get(name) {
                *field = parse_size(&v).ok_or_else(|| {
                    format!("{name}={v:?}: not a positive number (e.g. 8388608 or 8M)")
                })?;
            }
        }
        Ok(l)
    }

    /// [`from_vars`](Self::from_vars) on the process environment.
    pub fn from_env() -> Result<Limits, String> {
        Self::from_vars(|k| std::env::var(k).ok())
    }
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, shift) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 10),
        b'M' | b'm' => (&s[..s.len() - 1], 20),
        b'G' | b'g' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let n: u64 = num.parse().ok()?;
    let v = n.checked_mul(1u64 << shift)?;
    (v > 0).then_some(v)
}

static CURRENT: OnceLock<Limits> = OnceLock::new();

/// Set the process's limits; the first call wins (later ones give back
/// what they were handed). Call it before any image is read.
pub fn set(limits: Limits) -> Result<(), Limits> {
    CURRENT.set(limits)
}

/// The process's limits: what [`set`] set, else the defaults.
pub fn current() -> Limits {
    CURRENT.get().copied().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_set_their_field_and_bad_values_are_named() {
        let l = Limits::from_vars(|k| match k {
            "STRATA_MAX_MANIFEST_BYTES" => Some("8M".into()),
            "STRATA_MAX_IMAGE_TOC_ENTRIES" => Some("4194304".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(l.manifest_bytes, 8 << 20);
        assert_eq!(l.image_toc_entries, 1 << 22);
        assert_eq!(l.config_bytes, Limits::default().config_bytes);
        for bad in ["", "0", "-1", "12X", "99999999999G"] {
            let e = Limits::from_vars(|k| (k == "STRATA_MAX_CONFIG_BYTES").then(|| bad.into()))
                .unwrap_err();
            assert!(e.contains("STRATA_MAX_CONFIG_BYTES"), "{bad}: {e}");
        }
    }
}
