//! Benchmark: one shared registry client against a new client per request
//! (issue 14, item 8).
//!
//! Puts a blob of a few MB into a local Debian `docker-registry` (started
//! here, or the one at `--registry 127.0.0.1:PORT`), then times rounds of
//! 64 KiB range reads of it (concurrent, a thread each; then one after
//! another), each through its own `RegistrySource`, as a daemon serving
//! many callers would:
//!
//! - (a) shared: every source is built from one `RegistryOptions`, so all
//!   use one HTTP client and its pool of kept-alive connections;
//! - (b) per request: every source gets fresh options, so a new client
//!   (a new connection, and in blocking reqwest a new runtime thread).
//!
//! ```sh
//! cargo run --release -p strata-oci --example shared_client -- [--registry ADDR] [--reads 50] [--rounds 7] [--blob-mib 4]
//! ```
//!
//! Prints the median wall time of a round for each and their ratio. Plain
//! HTTP on 127.0.0.1: over TLS every new connection also pays a handshake,
//! which only the per-request client repeats.

use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_digest::Digest;
use strata_oci::registry::{BlobContent, RegistryPusher, RegistrySource};
use strata_oci::{Descriptor, ImageRef, ImageSource, RegistryOptions, StaticCredentials};

const RANGE: u64 = 64 * 1024;

struct Args {
    registry: Option<String>,
    reads: usize,
    rounds: usize,
    blob_mib: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        registry: None,
        reads: 50,
        rounds: 7,
        blob_mib: 4,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--registry" => a.registry = Some(value()?),
            "--reads" => a.reads = value()?.parse().map_err(|e| format!("--reads: {e}"))?,
            "--rounds" => a.rounds = value()?.parse().map_err(|e| format!("--rounds: {e}"))?,
            "--blob-mib" => {
                a.blob_mib = value()?.parse().map_err(|e| format!("--blob-mib: {e}"))?
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.reads == 0 || a.rounds == 0 || a.blob_mib == 0 {
        return Err("--reads, --rounds and --blob-mib must be positive".into());
    }
    Ok(a)
}

/// Options for the registry at `addr` (plain HTTP, no credentials); each
/// call makes a new client.
fn fresh_options(addr: &str) -> RegistryOptions {
    RegistryOptions {
        insecure_registries: vec![addr.to_string()],
        credentials: Arc::new(StaticCredentials::new()),
        user_agent: "strata-bench".into(),
        ..RegistryOptions::default()
    }
}

/// Deterministic bytes that do not compress.
fn noise(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// One read: open a source (from `shared`, or from fresh options) and
/// read range number `i`, checked against the blob.
fn read_one(
    reference: &ImageRef,
    addr: &str,
    shared: Option<&RegistryOptions>,
    desc: &Descriptor,
    blob: &[u8],
    i: usize,
) -> Result<(), String> {
    let ranges = blob.len() as u64 / RANGE;
    let own;
    let opts = match shared {
        Some(o) => o,
        None => {
            own = fresh_options(addr);
            &own
        }
    };
    let src = RegistrySource::new(reference.clone(), opts).map_err(|e| e.to_string())?;
    let offset = (i as u64 * 7 % ranges) * RANGE;
    let got = src
        .read_range(desc, offset, RANGE)
        .map_err(|e| e.to_string())?;
    if got != blob[offset as usize..(offset + RANGE) as usize] {
        return Err(format!("range at {offset} differs"));
    }
    Ok(())
}

/// One round of `reads` reads: each from its own thread (`concurrent`),
/// or one after another. Returns the wall time.
fn round(
    reference: &ImageRef,
    addr: &str,
    shared: Option<&RegistryOptions>,
    desc: &Descriptor,
    blob: &[u8],
    reads: usize,
    concurrent: bool,
) -> Result<Duration, String> {
    let start = Instant::now();
    if !concurrent {
        for i in 0..reads {
            read_one(reference, addr, shared, desc, blob, i)?;
        }
        return Ok(start.elapsed());
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..reads)
            .map(|i| s.spawn(move || read_one(reference, addr, shared, desc, blob, i)))
            .collect();
        for h in handles {
            h.join().map_err(|_| "a reader panicked".to_string())??;
        }
        Ok::<(), String>(())
    })?;
    Ok(start.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() -> Result<(), String> {
    let args = parse_args()?;
    let started;
    let addr = match &args.registry {
        Some(a) => a.clone(),
        None => {
            started = strata_testkit::Registry::start();
            started.addr.clone()
        }
    };
    let reference: ImageRef = format!("docker://{addr}/bench/blob:1")
        .parse()
        .map_err(|e| format!("{e}"))?;

    let blob = noise((args.blob_mib << 20) as usize);
    let digest = Digest::sha256_of(&blob);
    let pusher =
        RegistryPusher::new(&reference, &fresh_options(&addr)).map_err(|e| e.to_string())?;
    if !pusher.has_blob(&digest).map_err(|e| e.to_string())? {
        pusher
            .upload_blob(&digest, blob.len() as u64, BlobContent::Bytes(&blob))
            .map_err(|e| e.to_string())?;
    }
    let desc = Descriptor {
        media_type: "application/octet-stream".into(),
        digest,
        size: blob.len() as u64,
        annotations: Default::default(),
        platform: None,
        urls: Vec::new(),
    };

    let shared = fresh_options(&addr);
    println!(
        "{} 64 KiB range reads of a {} MiB blob, registry {addr} (plain HTTP), median of {} rounds",
        args.reads, args.blob_mib, args.rounds
    );
    println!("| reads | client | median round | min | max | per-request / shared |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1000.0);
    for concurrent in [true, false] {
        // warm-up: the registry's page cache, and the shared pool's first
        // connections (a long-lived daemon has them)
        round(
            &reference,
            &addr,
            Some(&shared),
            &desc,
            &blob,
            args.reads,
            concurrent,
        )?;
        round(
            &reference, &addr, None, &desc, &blob, args.reads, concurrent,
        )?;
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..args.rounds {
            a.push(round(
                &reference,
                &addr,
                Some(&shared),
                &desc,
                &blob,
                args.reads,
                concurrent,
            )?);
            b.push(round(
                &reference, &addr, None, &desc, &blob, args.reads, concurrent,
            )?);
        }
        let (ma, mb) = (median(a.clone()), median(b.clone()));
        let how = if concurrent {
            format!("{} concurrent (a thread each)", args.reads)
        } else {
            format!("{} one after another", args.reads)
        };
        for (name, v, m) in [
            ("(a) one shared client", &a, ma),
            ("(b) a new client per request", &b, mb),
        ] {
            let min = v.iter().min().copied().unwrap_or_default();
            let max = v.iter().max().copied().unwrap_or_default();
            let ratio = if m == ma {
                "1.00x".to_string()
            } else {
                format!("{:.2}x", mb.as_secs_f64() / ma.as_secs_f64())
            };
            println!(
                "| {how} | {name} | {} | {} | {} | {ratio} |",
                ms(m),
                ms(min),
                ms(max)
            );
        }
    }
    println!(
        "HTTP clients built by the shared options: {}",
        shared.client.clients_built()
    );
    Ok(())
}
