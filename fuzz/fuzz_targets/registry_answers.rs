//! What registries answer: multipart/byteranges bodies, Content-Range
//! values and WWW-Authenticate challenges.
#![no_main]
use libfuzzer_sys::fuzz_target;
use strata_oci::registry::fuzzing;

fuzz_target!(|data: &[u8]| {
    // first line: the boundary; the rest: the body
    let (boundary, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (String::from_utf8_lossy(&data[..i]).into_owned(), &data[i + 1..]),
        None => ("b".to_string(), data),
    };
    if let Some(parts) = fuzzing::parse_multipart(body, &boundary) {
        for (_, bytes) in &parts {
            assert!(bytes.len() <= body.len());
        }
    }
    let text = String::from_utf8_lossy(data);
    let _ = fuzzing::parse_content_range(&text);
    let _ = fuzzing::parse_challenge(&text);
});
