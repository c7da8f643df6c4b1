//! The prefetch reorder planner (reads a whole tar).
#![no_main]
use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let wanted: HashSet<String> = ["etc/passwd", "usr/bin/python3", "a"]
        .into_iter()
        .map(String::from)
        .collect();
    let _ = strata_chunked::reorder::plan_first(data, &wanted);
});
