//! Bad images: each pull fails with an error naming the cause, no image
//! becomes visible, and `strata fsck` passes afterwards.

mod common;
use common::*;

#[test]
fn bad_images_are_refused_with_clear_errors_and_leave_a_clean_store() {
    let env = Env::new();
    let layout = bad_layout();
    // the control case works
    env.ok(&["pull", &oci_ref(&layout, "good")]);
    let cases = [
        ("digest-mismatch", "digest mismatch"),
        ("truncated-blob", "size mismatch"),
        ("garbage-gzip", "gzip"),
        ("dotdot", "'..' component"),
        ("absolute", "absolute path"),
        ("symlink-escape", "leaves the root"),
        ("hardlink-outside", "'..' component"),
        ("hardlink-unseen", "does not exist"),
        ("unknown-media-type", "unknown layer media type"),
        ("diff-id-mismatch", "diff_id"),
    ];
    for (tag, want) in cases {
        let r = oci_ref(&layout, tag);
        let err = env.fails(&["pull", &r]);
        assert!(err.contains(want), "{tag}: expected {want:?} in: {err}");
        assert!(!err.contains("panicked"), "{tag}: {err}");
        env.fails(&["inspect", &r]);
        env.fsck_ok();
    }
    // nothing from a failed pull is visible in the store's tmp/ either
    let leftovers: Vec<_> = std::fs::read_dir(env.root().join("tmp")).unwrap().collect();
    assert!(leftovers.is_empty(), "staging left behind: {leftovers:?}");
    let images = env.json(&["images"]);
    assert_eq!(images.as_array().unwrap().len(), 1, "{images}");
}
