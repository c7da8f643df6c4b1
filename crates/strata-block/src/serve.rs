//! `strata rootfs serve`: a template as one FUSE file, chunks read on demand.
