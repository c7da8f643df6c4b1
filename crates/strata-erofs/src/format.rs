//! EROFS on-disk constants and little-endian struct encoders.
//!
//! Only what a metadata-first, uncompressed image needs: the composefs
//! header, the superblock, compact and extended inodes, xattr headers and
//! directory entries. Layouts follow the kernel's `fs/erofs/erofs_fs.h`.

pub(crate) const BLOCK_BITS: u8 = 12;
pub(crate) const BLOCK: u64 = 1 << BLOCK_BITS;
/// Inode slots are 32 bytes; a nid is a byte offset / 32.
pub(crate) const SLOT: u64 = 32;

pub(crate) const COMPOSEFS_MAGIC: u32 = 0xd078_629a;
pub(crate) const COMPOSEFS_HEADER_VERSION: u32 = 1;
pub(crate) const COMPOSEFS_FLAGS_HAS_ACL: u32 = 1;
pub(crate) const EROFS_MAGIC: u32 = 0xE0F5_E1E2;
pub(crate) const FEATURE_COMPAT_MTIME: u32 = 2;
pub(crate) const FEATURE_COMPAT_XATTR_FILTER: u32 = 4;
pub(crate) const XATTR_FILTER_SEED: u32 = 0x25BB_E08F;

pub(crate) const COMPACT_INODE: u64 = 32;
pub(crate) const EXTENDED_INODE: u64 = 64;
pub(crate) const XATTR_IBODY_HEADER: u64 = 12;
pub(crate) const DIRENT: u64 = 12;

/// Data layouts (already shifted into the `i_format` bit position).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    FlatPlain = 0,
    FlatInline = 4,
    ChunkBased = 8,
}

/// Directory-entry file types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileType {
    Regular = 1,
    Directory = 2,
    CharDev = 3,
    BlockDev = 4,
    Fifo = 5,
    Socket = 6,
    Symlink = 7,
}

impl FileType {
    pub(crate) fn mode_bits(self) -> u32 {
        match self {
            FileType::Regular => 0o100000,
            FileType::Directory => 0o040000,
            FileType::CharDev => 0o020000,
            FileType::BlockDev => 0o060000,
            FileType::Fifo => 0o010000,
            FileType::Socket => 0o140000,
            FileType::Symlink => 0o120000,
        }
    }
}

/// The xattr name-prefix table (`erofs_xattr_prefix` indices). Index 5
/// (`lustre.`) is not used: C mkcomposefs does not know it, so such names
/// are stored whole under index 0, as composefs does.
pub(crate) const XATTR_PREFIXES: [&[u8]; 7] = [
    b"",
    b"user.",
    b"system.posix_acl_access",
    b"system.posix_acl_default",
    b"trusted.",
    b"lustre.",
    b"security.",
];
pub(crate) const XATTR_INDEX_ACL_ACCESS: u8 = 2;
pub(crate) const XATTR_INDEX_ACL_DEFAULT: u8 = 3;

pub(crate) fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Encode a device number the way the kernel's `new_decode_dev` reads it.
pub fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & !0xff) << 12)
}

/// Fields of the 128-byte superblock that vary.
pub(crate) struct Superblock {
    pub root_nid: u16,
    pub inos: u64,
    pub build_time: u64,
    pub build_time_nsec: u32,
    pub blocks: u32,
    pub xattr_blkaddr: u32,
}

impl Superblock {
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        put_u32(out, EROFS_MAGIC);
        put_u32(out, 0); // checksum (feature not set)
        put_u32(out, FEATURE_COMPAT_MTIME | FEATURE_COMPAT_XATTR_FILTER);
        out.push(BLOCK_BITS);
        out.push(0); // extslots
        put_u16(out, self.root_nid);
        put_u64(out, self.inos);
        put_u64(out, self.build_time);
        put_u32(out, self.build_time_nsec);
        put_u32(out, self.blocks);
        put_u32(out, 0); // meta_blkaddr
        put_u32(out, self.xattr_blkaddr);
        // uuid, volume name, incompat features, compression, devices,
        // dirblkbits, prefixes, packed nid, filter reserved: all zero.
        out.resize(start + 128, 0);
    }
}

/// The 32-byte composefs header at offset 0.
pub(crate) fn composefs_header(out: &mut Vec<u8>, flags: u32, composefs_version: u32) {
    let start = out.len();
    put_u32(out, COMPOSEFS_MAGIC);
    put_u32(out, COMPOSEFS_HEADER_VERSION);
    put_u32(out, flags);
    put_u32(out, composefs_version);
    out.resize(start + 32, 0);
}
