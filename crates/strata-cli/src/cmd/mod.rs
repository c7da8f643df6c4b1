//! One module per subcommand.

pub mod completions;
pub mod convert;
pub mod export;
pub mod fsck;
pub mod gc;
pub mod images;
pub mod inspect;
pub mod mount;
pub mod mounts;
pub mod pull;
pub mod rm;
pub mod rootfs;
pub mod rpull;
pub mod serve;
pub mod snapshotter;
pub mod spare;
pub mod tag;
pub mod verify;
