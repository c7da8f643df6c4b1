//! The TOC: JSON listing every tar entry with its digest and blob offsets.
//!
//! Field names, order and omission follow c/storage's `FileMetadata`
//! (`omitempty` on everything but `type` and `name`). Times are RFC 3339 in
//! UTC with trailing zeros of the nanoseconds trimmed, like Go's
//! `time.Time` JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::gotar::GoTime;

fn is_zero_i64(v: &i64) -> bool {
    *v == 0
}

/// The whole TOC.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Toc {
    /// Always 1.
    pub version: i64,
    /// Entries in tar order; `chunk` entries follow their `reg` entry.
    #[serde(default)]
    pub entries: Vec<TocEntry>,
    /// `sha256:` of the zstd-compressed tar-split bytes.
    #[serde(
        rename = "tarSplitDigest",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub tar_split_digest: String,
}

/// One TOC entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TocEntry {
    /// `reg`, `hardlink`, `symlink`, `dir`, `char`, `block`, `fifo` or `chunk`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The tar name, as Go's tar reader gives it.
    pub name: String,
    /// Link target.
    #[serde(rename = "linkName", default, skip_serializing_if = "String::is_empty")]
    pub link_name: String,
    /// Raw mode field.
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub mode: i64,
    /// Size.
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub size: i64,
    /// Owner.
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub uid: i64,
    /// Group.
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub gid: i64,
    /// Modification time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modtime: Option<String>,
    /// Access time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accesstime: Option<String>,
    /// Change time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changetime: Option<String>,
    /// Device major.
    #[serde(rename = "devMajor", default, skip_serializing_if = "is_zero_i64")]
    pub dev_major: i64,
    /// Device minor.
    #[serde(rename = "devMinor", default, skip_serializing_if = "is_zero_i64")]
    pub dev_minor: i64,
    /// Extended attributes, values base64.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    /// `sha256:` of the whole file.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub digest: String,
    /// Blob offset of the first frame of this file (or chunk).
    #[serde(default, skip_serializing_if = "is_zero_i64")]
    pub offset: i64,
    /// Blob offset just past the file's last frame.
    #[serde(rename = "endOffset", default, skip_serializing_if = "is_zero_i64")]
    pub end_offset: i64,
    /// Uncompressed size of this chunk.
    #[serde(rename = "chunkSize", default, skip_serializing_if = "is_zero_i64")]
    pub chunk_size: i64,
    /// Offset of this chunk in the file.
    #[serde(rename = "chunkOffset", default, skip_serializing_if = "is_zero_i64")]
    pub chunk_offset: i64,
    /// `sha256:` of this chunk.
    #[serde(
        rename = "chunkDigest",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub chunk_digest: String,
    /// `zeros` for a hole.
    #[serde(
        rename = "chunkType",
        default,
        skip_serializing_if = "String::is_empty"
    )]
    pub chunk_type: String,
}

/// Days since 1970-01-01 to (year, month, day) (proleptic Gregorian).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Go's `time.Time` JSON form in UTC: `2022-03-04T05:06:07.1234567Z`.
pub fn format_time(t: GoTime) -> String {
    let days = t.secs.div_euclid(86_400);
    let sod = t.secs.rem_euclid(86_400);
    let (y, mo, d) = civil(days);
    let mut s = format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    );
    if t.nanos > 0 {
        let frac = format!("{:09}", t.nanos);
        s.push('.');
        s.push_str(frac.trim_end_matches('0'));
    }
    s.push('Z');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_like_go() {
        assert_eq!(
            format_time(GoTime { secs: 0, nanos: 0 }),
            "1970-01-01T00:00:00Z"
        );
        assert_eq!(
            format_time(GoTime {
                secs: 1646370367,
                nanos: 123456700
            }),
            "2022-03-04T05:06:07.1234567Z"
        );
        assert_eq!(
            format_time(GoTime {
                secs: 1577836800,
                nanos: 0
            }),
            "2020-01-01T00:00:00Z"
        );
        assert_eq!(
            format_time(GoTime { secs: -1, nanos: 0 }),
            "1969-12-31T23:59:59Z"
        );
        assert_eq!(
            format_time(GoTime {
                secs: 951782400,
                nanos: 0
            }),
            "2000-02-29T00:00:00Z"
        );
    }

    #[test]
    fn omitted_fields_are_omitted() {
        let e = TocEntry {
            kind: "dir".into(),
            name: "./".into(),
            mode: 493,
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"type":"dir","name":"./","mode":493}"#
        );
    }
}
