//! An image given by what the user typed: the one in the store under that
//! name or digest, else pulled from what the text references (bare
//! references and short names too, see [`open_name`]). `strata convert`
//! and `strata rootfs build --from` take images so; a conversion service
//! does the same.

use strata_digest::Digest;
use strata_ops::Ctl;
use strata_store::{Store, StoreError};

use crate::OciError;
use crate::pull::{PullError, PullOptions, pull_from};
use crate::short_names::open_name;

/// The image found or pulled.
#[derive(Debug, Clone)]
pub struct Found {
    /// Its manifest digest.
    pub manifest_digest: Digest,
    /// For a short name pulled, for people: how it resolved.
    pub notes: Vec<String>,
}

/// Why the image is neither in the store nor pulled.
#[derive(Debug, thiserror::Error)]
pub enum StoreOrPullError {
    /// Not in the store, and the text opens no source.
    #[error("{not_here}; pulling it: opening {text}")]
    Open {
        /// Why the store has no such image.
        not_here: Box<StoreError>,
        /// What was given.
        text: String,
        /// Why it does not open.
        #[source]
        source: Box<OciError>,
    },
    /// The pull failed.
    #[error("pulling {name}")]
    Pull {
        /// The fully qualified reference.
        name: String,
        /// Why.
        #[source]
        source: Box<PullError>,
    },
}

/// The image `text` names in `store`, else pulled with `opts` (events
/// and cancellation through `ctl`).
pub fn image_or_pull(
    store: &Store,
    text: &str,
    opts: &PullOptions,
    ctl: Ctl<'_>,
) -> Result<Found, StoreOrPullError> {
    let not_here = match store.resolve_image(text) {
        Ok(manifest_digest) => {
            let notes = Vec::new();
            return Ok(Found {
                manifest_digest,
                notes,
            });
        }
        Err(e) => e,
    };
    let opened = match open_name(text, &opts.registry, &opts.platform) {
        Ok(o) => o,
        Err(source) => {
            let text = text.to_string();
            return Err(StoreOrPullError::Open {
                not_here: Box::new(not_here),
                text,
                source: Box::new(source),
            });
        }
    };
    let name = opened.reference.to_string();
    match pull_from(store, opened.source.as_ref(), &name, opts, ctl) {
        Ok(s) => Ok(Found {
            manifest_digest: s.manifest_digest,
            notes: opened.notes,
        }),
        Err(e) => Err(StoreOrPullError::Pull {
            name,
            source: Box::new(e),
        }),
    }
}
