//! The upper part of a hybrid mount.
