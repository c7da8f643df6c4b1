mod common;
use strata_erofs::{Flavor, build};
#[test]
fn dump() {
    for seed in [1u64, 2, 3, 10] {
        let mut g = common::Gen::new(seed);
        if seed % 10 == 0 {
            g.fill(0, 1, 400);
        } else {
            g.fill(0, 4, 12);
        }
        let img = build(&g.tree, Flavor::Composefs).unwrap();
        std::fs::write(format!("/tmp/rdx/c{seed}.img"), img.as_bytes().unwrap()).unwrap();
        std::fs::write(format!("/tmp/rdx/c{seed}.txt"), format!("{:#?}", g.tree)).unwrap();
    }
}
