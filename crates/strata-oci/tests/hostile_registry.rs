//! Registries that misbehave on purpose (issue 15): a real docker-registry
//! on 127.0.0.1 behind the testkit's fault-injecting proxy. Every case ends
//! with an error naming what went wrong, in bounded time, or (a coalesced
//! 206) with the right bytes.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::{Faults, Proxy, Registry, config_json, gzip, noise, tar_of};
use strata_digest::Digest;
use strata_oci::{
    Descriptor, ImageRef, ImageSource, OciLayoutWriter, Platform, RegistryOptions, open_source,
};

const TAR_GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// A registry holding a one-layer image (a 300 KB gzip layer) as
/// `test/app:v1`, and that layer's bytes.
fn registry_with_app() -> (Registry, Vec<u8>) {
    let reg = Registry::start();
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let mut w = OciLayoutWriter::create(&layout).unwrap();
    let big = tar_of(&[("data/big.bin", &noise(300_000, 7))]);
    let config = config_json("amd64", &[Digest::sha256_of(&big).to_string()]);
    let layer = gzip(&big);
    w.add_image(&config, &[(TAR_GZ, layer.as_slice())], Some("v1"))
        .unwrap();
    reg.push(
        &format!("oci:{}:v1", layout.display()),
        "test/app:v1",
        &["--preserve-digests"],
    );
    (reg, layer)
}

fn opts(addr: &str) -> RegistryOptions {
    RegistryOptions {
        insecure_registries: vec![addr.to_string()],
        user_agent: "strata-test".into(),
        ..Default::default()
    }
}

/// The source through `proxy` and the layer's descriptor (resolved from
/// the registry itself: the faults hit every blob, the config too).
fn source(reg: &Registry, proxy: &Proxy, o: RegistryOptions) -> (Box<dyn ImageSource>, Descriptor) {
    let direct: ImageRef = format!("docker://{}/test/app:v1", reg.addr)
        .parse()
        .unwrap();
    let resolved = open_source(&direct, &opts(&reg.addr))
        .unwrap()
        .resolve(&"linux/amd64".parse::<Platform>().unwrap())
        .unwrap();
    let layer = resolved.manifest.layers[0].clone();
    let r: ImageRef = format!("docker://{}/test/app:v1", proxy.addr)
        .parse()
        .unwrap();
    (open_source(&r, &o).unwrap(), layer)
}

#[test]
fn a_coalesced_206_is_cut_into_the_ranges_asked() {
    let (reg, layer) = registry_with_app();
    let proxy = Proxy::start(
        &reg.addr,
        Faults {
            coalesce_ranges: true,
            ..Default::default()
        },
    );
    let (src, desc) = source(&reg, &proxy, opts(&proxy.addr));
    let asks = [(10u64, 100u64), (150_000, 5000), (250_000, 17)];
    let got = src.read_ranges(&desc, &asks).unwrap();
    for ((o, l), g) in asks.iter().zip(&got) {
        assert!(
            g[..] == layer[*o as usize..(o + l) as usize],
            "bytes {o}+{l}"
        );
    }
    // one request, answered as one range
    let log = proxy.requests();
    assert!(
        log.iter()
            .any(|l| l.contains("range=bytes=10-109,150000-154999,250000-250016")),
        "{log:?}"
    );
}

#[test]
fn ranges_not_asked_for_are_an_error() {
    let (reg, _layer) = registry_with_app();
    let proxy = Proxy::start(
        &reg.addr,
        Faults {
            shift_ranges: true,
            ..Default::default()
        },
    );
    let (src, desc) = source(&reg, &proxy, opts(&proxy.addr));
    let e = src.read_range(&desc, 1000, 100).unwrap_err().to_string();
    assert!(e.contains("not within the 1000-1099 asked for"), "{e}");
    // several ranges, answered multipart with every part one byte on
    let e = src
        .read_ranges(&desc, &[(1000, 100), (5000, 100)])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not asked for") || e.contains("lacks bytes"),
        "{e}"
    );
}

#[test]
fn a_registry_sending_a_byte_at_a_time_fails_a_range_read_in_bounded_time() {
    let (reg, _layer) = registry_with_app();
    let proxy = Proxy::start(
        &reg.addr,
        Faults {
            slow_blobs: Some(Duration::from_millis(300)),
            ..Default::default()
        },
    );
    let (src, desc) = source(
        &reg,
        &proxy,
        RegistryOptions {
            range_timeout: Some(Duration::from_secs(3)),
            stall_timeout: Some(Duration::from_secs(10)),
            ..opts(&proxy.addr)
        },
    );
    let t = Instant::now();
    let e = src.read_range(&desc, 0, 4096).unwrap_err().to_string();
    let took = t.elapsed();
    assert!(e.contains("range timeout"), "{e}");
    assert!(took < Duration::from_secs(6), "took {took:?}");
}

#[test]
fn a_registry_that_never_answers_fails_a_range_read_within_the_default_timeout() {
    let (reg, _layer) = registry_with_app();
    let proxy = Proxy::start(
        &reg.addr,
        Faults {
            hang_blobs: true,
            ..Default::default()
        },
    );
    // as a lazy mount sets it up: a 10 s stall timeout, retries; the
    // default range timeout (30 s) bounds them all
    let (src, desc) = source(
        &reg,
        &proxy,
        RegistryOptions {
            stall_timeout: Some(Duration::from_secs(10)),
            ..opts(&proxy.addr)
        },
    );
    let t = Instant::now();
    let e = src.read_range(&desc, 0, 4096).unwrap_err().to_string();
    let took = t.elapsed();
    assert!(
        e.contains("range timeout") || e.contains("timed out"),
        "{e}"
    );
    assert!(
        took <= strata_oci::registry::DEFAULT_RANGE_TIMEOUT + Duration::from_secs(2),
        "took {took:?}"
    );
}

#[test]
fn a_blob_stream_below_the_minimum_rate_fails() {
    let (reg, _layer) = registry_with_app();
    let proxy = Proxy::start(
        &reg.addr,
        Faults {
            slow_blobs: Some(Duration::from_millis(100)),
            ..Default::default()
        },
    );
    let (src, desc) = source(
        &reg,
        &proxy,
        RegistryOptions {
            min_rate: Some(1000),
            rate_window: Some(Duration::from_secs(1)),
            ..opts(&proxy.addr)
        },
    );
    let t = Instant::now();
    let mut out = Vec::new();
    let e = src
        .open_blob(&desc, 0)
        .unwrap()
        .read_to_end(&mut out)
        .unwrap_err()
        .to_string();
    let took = t.elapsed();
    assert!(e.contains("slower than the minimum of 1000 bytes/s"), "{e}");
    assert!(e.contains("5 attempts"), "{e}");
    // 5 windows of 1 s and the backoff between them (3 s)
    assert!(took < Duration::from_secs(15), "took {took:?}");
}

#[test]
fn a_redirect_loop_ends_with_a_clear_error() {
    let (reg, _layer) = registry_with_app();
    let proxy = Proxy::start(
        &reg.addr,
        Faults {
            redirect_loop: true,
            ..Default::default()
        },
    );
    let (src, desc) = source(&reg, &proxy, opts(&proxy.addr));
    let t = Instant::now();
    let e = src.read_range(&desc, 0, 100).unwrap_err().to_string();
    assert!(e.contains("redirect loop"), "{e}");
    let e = match src.open_blob(&desc, 0) {
        Ok(_) => panic!("a blob behind a redirect loop opened"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("redirect loop"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5));
    // not retried: the first GET and MAX_REDIRECTS more, per read
    let gets = proxy
        .requests()
        .iter()
        .filter(|l| l.contains(&desc.digest.to_string()))
        .count();
    assert_eq!(gets, 2 * (strata_oci::registry::MAX_REDIRECTS + 1));
}
