//! Templates in OCI registries: push as an artifact, pull the map, fetch chunks on demand.
