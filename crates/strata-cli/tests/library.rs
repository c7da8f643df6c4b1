//! strata as a library: what the snapshotter and the service will call,
//! driven here without the binary. Pull -> lazy mount -> reads -> prefetch
//! -> unmount -> gc through library calls with their events collected;
//! cancelled pulls; gc running in a loop while other threads work.
//! Root: the lazy mount needs FUSE and overlayfs.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use strata_lazy::{Fallback, LazyOptions, Mounted, Prefetch};
use strata_oci::pull::{PullError, PullOptions, pull};
use strata_oci::{ImageRef, Platform, RegistryOptions};
use strata_ops::{Cancel, Collect, Ctl, ErrorKind, Event, EventSink, HasKind, Op, Unit};
use strata_store::{SplitPolicy, Store};

fn pull_opts() -> PullOptions {
    PullOptions {
        platform: Platform::host_default(),
        registry: RegistryOptions {
            plain_http: true,
            ..Default::default()
        },
        jobs: 3,
        split: SplitPolicy::Never,
        partial: true,
    }
}

/// The debian+python fixture converted to zstd:chunked and pushed to a
/// fresh registry, all through library calls but the push (skopeo).
fn converted_in_registry(dir: &Path) -> (Registry, ImageRef) {
    let reg = Registry::start();
    let store = Store::open(dir.join("conv-store")).unwrap();
    let src: ImageRef = oci_ref(&debian_layout(), "python").parse().unwrap();
    let s = pull(&store, &src, "src", &pull_opts(), Ctl::none()).unwrap();
    let out = dir.join("out");
    let opts = strata_oci::convert::ConvertOptions {
        format: strata_oci::convert::Format::ZstdChunked,
        level: 3,
        jobs: 2,
        prefetch: Vec::new(),
        place_first: false,
        ..Default::default()
    };
    let events = Collect::new();
    let cancel = Cancel::new();
    strata_oci::convert::convert_to_layout(
        &store,
        &s.manifest_digest,
        &out,
        Some("python"),
        &opts,
        Ctl::new(&events, &cancel),
    )
    .unwrap();
    let ev = events.events();
    let layers_done = ev
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::UnitDone {
                    op: Op::Convert,
                    ..
                }
            )
        })
        .count();
    assert_eq!(layers_done, 2, "one UnitDone per layer: {ev:?}");
    assert!(matches!(
        ev.last(),
        Some(Event::Finished { op: Op::Convert })
    ));
    reg.push(
        &format!("oci:{}:python", out.display()),
        "py:1",
        &["--preserve-digests"],
    );
    let r = format!("docker://{}/py:1", reg.addr).parse().unwrap();
    (reg, r)
}

#[test]
fn pull_lazy_mount_read_prefetch_unmount_gc_through_the_library() {
    let tmp = tempfile::tempdir().unwrap();
    let (_reg, reference) = converted_in_registry(tmp.path());
    let root = tmp.path().join("store");
    let target = tmp.path().join("mnt");
    std::fs::create_dir_all(&target).unwrap();
    let want = umoci_unpack(&debian_layout(), "python", &tmp.path().join("umoci"));

    let events = Arc::new(Collect::new());
    let store = Arc::new(Store::open(&root).unwrap());
    let opts = LazyOptions {
        fallback: Fallback::Fail,
        prefetch: Prefetch::All,
        prefetch_list: Some("/usr/bin/python3.11\n".into()),
        record: None,
        passthrough: false,
        fetch_jobs: 4,
        pull: pull_opts(),
    };
    let source: Arc<dyn strata_oci::ImageSource> =
        Arc::from(strata_oci::open_source(&reference, &opts.pull.registry).unwrap());
    let mounted = strata_lazy::mount(
        store.clone(),
        source,
        "py",
        &target,
        &opts,
        events.clone() as Arc<dyn EventSink>,
    )
    .unwrap();
    let Mounted::Lazy(m) = mounted else {
        panic!("a zstd:chunked image in an empty store mounts lazily")
    };
    let (to_fetch, total) = m.files_to_fetch();
    assert_eq!(to_fetch, total, "an empty store has none of the files");
    assert!(total > 1000, "{total}");
    // reads through the mount are the image's bytes
    for p in [
        "usr/bin/python3.11",
        "etc/os-release",
        "usr/lib/python3.11/json/decoder.py",
    ] {
        let got = std::fs::read(target.join(p)).unwrap();
        assert!(got == std::fs::read(want.join(p)).unwrap(), "{p}");
    }
    // a restarted manager finds the mount by its state alone
    let canonical = target.canonicalize().unwrap();
    let rec = strata_lazy::attach(&root, &canonical).unwrap();
    assert_eq!(rec.status, strata_lazy::MountStatus::Serving);
    assert_eq!(rec.state.manifest_digest, m.manifest_digest());
    // prefetch `all` ends in a pull that records the image
    let t = Instant::now();
    while !m.status().complete {
        assert!(t.elapsed() < Duration::from_secs(180), "{:?}", m.status());
        std::thread::sleep(Duration::from_millis(200));
    }
    let st = m.status();
    assert_eq!(st.prefetch, strata_lazy::PrefetchState::Done);
    assert_eq!(st.errors, 0);
    m.unmount().unwrap();
    assert!(
        !strata_sys::mounts()
            .unwrap()
            .iter()
            .any(|mi| mi.mount_point == canonical),
        "unmounted"
    );
    assert!(
        strata_lazy::attach(&root, &canonical).is_err(),
        "nothing left on record"
    );

    let ev = events.events();
    let started: Vec<Op> = ev
        .iter()
        .filter_map(|e| match e {
            Event::Started { op, .. } => Some(*op),
            _ => None,
        })
        .collect();
    assert_eq!(started, [Op::LazyPrepare, Op::Prefetch, Op::Pull], "{ev:?}");
    assert!(ev.contains(&Event::Finished { op: Op::Prefetch }), "{ev:?}");
    assert!(
        ev.iter().any(|e| matches!(
            e,
            Event::UnitDone {
                op: Op::Pull,
                unit: Unit::Layer { index: 1, .. }
            }
        )),
        "the prefetch pull reports its layers: {ev:?}"
    );
    // with most bytes missing the prefetch pull takes whole blobs, and says so
    for w in events.warnings() {
        assert!(
            matches!(&w, strata_ops::Warning::FullPull { reason, .. } if reason.contains("cheaper")),
            "{w:?}"
        );
    }

    // gc keeps the pulled image (named by the prefetch pull) and fsck passes
    drop(store);
    let gc = Store::open_for_gc(&root).unwrap();
    let report = gc.gc(false, Ctl::none()).unwrap();
    assert!(report.images.is_empty(), "{report:?}");
    let fsck = gc.fsck(Ctl::none()).unwrap();
    assert!(fsck.is_ok(), "{:?}", fsck.problems);
    drop(gc);
    let store = Store::open(&root).unwrap();
    let digest = store.resolve_image("py").unwrap();
    assert_eq!(digest, rec.state.manifest_digest);
}

/// Cancels once it has seen `after` events.
struct CancelAfter {
    seen: std::sync::atomic::AtomicUsize,
    after: usize,
    cancel: Cancel,
}

impl EventSink for CancelAfter {
    fn event(&self, _: &Event) {
        if self.seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 >= self.after {
            self.cancel.cancel();
        }
    }
}

#[test]
fn a_cancelled_pull_leaves_nothing_and_a_rerun_converges() {
    let tmp = tempfile::tempdir().unwrap();
    let src: ImageRef = oci_ref(&debian_layout(), "python").parse().unwrap();
    let reference = {
        let store = Store::open(tmp.path().join("ref")).unwrap();
        pull(&store, &src, "py", &pull_opts(), Ctl::none()).unwrap()
    };
    let root = tmp.path().join("store");
    // at the start, after the first layer began, and deep into the blobs
    for after in [1, 3, 12, 40] {
        let cancel = Cancel::new();
        let sink = CancelAfter {
            seen: Default::default(),
            after,
            cancel: cancel.clone(),
        };
        let store = Store::open(&root).unwrap();
        let r = pull(&store, &src, "py", &pull_opts(), Ctl::new(&sink, &cancel));
        match r {
            Err(e @ PullError::Cancelled) => assert_eq!(e.kind(), ErrorKind::Cancelled),
            other => panic!("cancelled after {after} events: {other:?}"),
        }
        assert!(store.resolve_image("py").is_err(), "no image is visible");
        let fsck = store.fsck(Ctl::none()).unwrap();
        assert!(fsck.is_ok(), "after {after}: {:?}", fsck.problems);
        let tmpdir = root.join("tmp");
        drop(store);
        assert_eq!(
            std::fs::read_dir(&tmpdir).unwrap().count(),
            0,
            "no staging is left in tmp/"
        );
    }
    let store = Store::open(&root).unwrap();
    let s = pull(&store, &src, "py", &pull_opts(), Ctl::none()).unwrap();
    assert_eq!(s.manifest_digest, reference.manifest_digest);
    assert_eq!(s.tree_digest, reference.tree_digest, "the re-run converges");
    assert!(store.fsck(Ctl::none()).unwrap().is_ok());
}

#[test]
fn gc_in_a_loop_never_takes_what_other_threads_use() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let apps = apps_layout();
    let expected: Vec<_> = (0..6)
        .map(|i| {
            let s = Store::open(tmp.path().join(format!("ref{i}"))).unwrap();
            let r: ImageRef = oci_ref(&apps, &format!("app-{i}")).parse().unwrap();
            pull(&s, &r, "x", &pull_opts(), Ctl::none())
                .unwrap()
                .tree_digest
        })
        .collect();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let sweeps = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        // gc sweeps whenever it can
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let gc = Store::open_for_gc(&root).unwrap();
                gc.gc(false, Ctl::none()).unwrap();
                sweeps.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(gc);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        // two threads pull, re-pull and remove images meanwhile
        let workers: Vec<_> = (0..2)
            .map(|w| {
                let (root, apps) = (&root, &apps);
                s.spawn(move || {
                    for round in 0..3 {
                        for i in (w * 3)..(w * 3 + 3) {
                            let store = Store::open(root).unwrap();
                            let r: ImageRef = oci_ref(apps, &format!("app-{i}")).parse().unwrap();
                            let name = format!("app-{i}");
                            pull(&store, &r, &name, &pull_opts(), Ctl::none()).unwrap();
                            if round == 1 {
                                store.remove_image(&name).unwrap();
                            }
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    assert!(sweeps.load(std::sync::atomic::Ordering::SeqCst) > 0);
    let store = Store::open(&root).unwrap();
    let fsck = store.fsck(Ctl::none()).unwrap();
    assert!(fsck.is_ok(), "{:?}", fsck.problems);
    for (i, want) in expected.iter().enumerate() {
        let d = store.resolve_image(&format!("app-{i}")).unwrap();
        let v = store.verify_image(&d, Ctl::none()).unwrap();
        assert!(v.problems.is_empty(), "app-{i}: {:?}", v.problems);
        let (info, _) = store.image_erofs(&d, SplitPolicy::Never).unwrap();
        assert_eq!(Some(info.tree_digest), *want, "app-{i}");
    }
}

#[test]
fn cancelled_conversions_and_template_builds_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let src: ImageRef = oci_ref(&debian_layout(), "python").parse().unwrap();
    let image = {
        let store = Store::open(&root).unwrap();
        pull(&store, &src, "py", &pull_opts(), Ctl::none())
            .unwrap()
            .manifest_digest
    };
    let store = Store::open(&root).unwrap();
    let copts = strata_oci::convert::ConvertOptions {
        format: strata_oci::convert::Format::ZstdChunked,
        level: 3,
        jobs: 2,
        prefetch: Vec::new(),
        place_first: false,
        ..Default::default()
    };
    // convert: cancelled as the first layer starts, then as it ends
    let out = tmp.path().join("out");
    for after in [1, 3] {
        let cancel = Cancel::new();
        let sink = CancelAfter {
            seen: Default::default(),
            after,
            cancel: cancel.clone(),
        };
        let r = strata_oci::convert::convert_to_layout(
            &store,
            &image,
            &out,
            Some("c"),
            &copts,
            Ctl::new(&sink, &cancel),
        );
        let e = r.expect_err("cancelled");
        assert_eq!(e.kind(), ErrorKind::Cancelled, "{e}");
        let index = std::fs::read_to_string(out.join("index.json")).unwrap_or_default();
        assert!(
            !index.contains("\"c\""),
            "no tag for a cancelled conversion: {index}"
        );
    }
    let done = strata_oci::convert::convert_to_layout(
        &store,
        &image,
        &out,
        Some("c"),
        &copts,
        Ctl::none(),
    )
    .unwrap();
    let index = std::fs::read_to_string(out.join("index.json")).unwrap();
    assert!(index.contains(&done.manifest_digest.to_string()), "{index}");

    // template build: cancelled while chunks are stored
    let req = strata_block::BuildRequest {
        source: strata_block::Source::Image("py".into()),
        size: Some(1 << 30),
        adds: Vec::new(),
        no_cache: false,
    };
    let cancel = Cancel::new();
    let sink = CancelAfter {
        seen: Default::default(),
        after: 3,
        cancel: cancel.clone(),
    };
    let e = strata_block::build(&store, &req, Ctl::new(&sink, &cancel)).expect_err("cancelled");
    assert_eq!(e.kind(), ErrorKind::Cancelled, "{e}");
    assert!(
        store.template_ids().unwrap().is_empty(),
        "no template is visible"
    );
    let fsck = store.fsck(Ctl::none()).unwrap();
    assert!(fsck.is_ok(), "{:?}", fsck.problems);
    let events = Collect::new();
    let built = strata_block::build(&store, &req, Ctl::new(&events, &Cancel::new())).unwrap();
    assert!(!built.cached, "the cancelled build left no cache entry");
    assert_eq!(store.template_ids().unwrap(), vec![built.id]);
    let ev = events.events();
    assert!(
        matches!(
            ev.first(),
            Some(Event::Started {
                op: Op::TemplateBuild,
                ..
            })
        ),
        "{ev:?}"
    );
    assert!(
        matches!(
            ev.last(),
            Some(Event::Finished {
                op: Op::TemplateBuild
            })
        ),
        "{ev:?}"
    );
    assert!(ev.iter().any(|e| matches!(
        e,
        Event::Progress {
            unit: Unit::Chunk { .. },
            ..
        }
    )));
}

/// Keeps every event and cancels once `when(events seen, event)` says so
/// (and remembers when).
struct CancelWhen<F: Fn(usize, &Event) -> bool + Send + Sync> {
    events: Collect,
    cancel: Cancel,
    when: F,
    fired: std::sync::Mutex<Option<Instant>>,
}

impl<F: Fn(usize, &Event) -> bool + Send + Sync> CancelWhen<F> {
    fn new(when: F) -> Self {
        CancelWhen {
            events: Collect::new(),
            cancel: Cancel::new(),
            when,
            fired: Default::default(),
        }
    }

    fn ctl(&self) -> Ctl<'_> {
        Ctl::new(self, &self.cancel)
    }

    fn fired(&self) -> Option<Instant> {
        *self.fired.lock().unwrap()
    }
}

impl<F: Fn(usize, &Event) -> bool + Send + Sync> EventSink for CancelWhen<F> {
    fn event(&self, e: &Event) {
        self.events.event(e);
        if (self.when)(self.events.events().len(), e) && !self.cancel.is_cancelled() {
            *self.fired.lock().unwrap() = Some(Instant::now());
            self.cancel.cancel();
        }
    }
}

fn after(n: usize) -> CancelWhen<impl Fn(usize, &Event) -> bool + Send + Sync> {
    CancelWhen::new(move |seen, _| seen >= n)
}

/// Nothing of the store is half-visible: fsck passes and tmp/ is empty.
fn store_is_clean(root: &Path) {
    let store = Store::open(root).unwrap();
    let fsck = store.fsck(Ctl::none()).unwrap();
    assert!(fsck.is_ok(), "{:?}", fsck.problems);
    drop(store);
    assert_eq!(
        std::fs::read_dir(root.join("tmp")).unwrap().count(),
        0,
        "no staging is left in tmp/"
    );
}

fn plain_http() -> RegistryOptions {
    RegistryOptions {
        plain_http: true,
        ..Default::default()
    }
}

/// A 64 MiB template of the sample image, built through the library.
fn small_template(store: &Store) -> strata_digest::Digest {
    require_tool("mke2fs", "e2fsprogs");
    let src: ImageRef = oci_ref(&sample_layout(), "latest").parse().unwrap();
    pull(store, &src, "sample", &pull_opts(), Ctl::none()).unwrap();
    let req = strata_block::BuildRequest {
        source: strata_block::Source::Image("sample".into()),
        size: Some(64 << 20),
        adds: Vec::new(),
        no_cache: false,
    };
    strata_block::build(store, &req, Ctl::none()).unwrap().id
}

fn count(ev: &[Event], f: impl Fn(&Event) -> bool) -> usize {
    ev.iter().filter(|e| f(e)).count()
}

#[test]
fn cancelled_template_pushes_and_pulls_leave_nothing_and_converge() {
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start();
    let root = tmp.path().join("store");
    let store = Store::open(&root).unwrap();
    let id = small_template(&store);
    let reference: ImageRef = format!("docker://{}/vm/t:1", reg.addr).parse().unwrap();
    let jobs = 2;
    // a chunk per pack: several packs, so a cancel can fall between them
    let po = strata_block::artifact::PushOptions {
        jobs,
        pack_size: 64 << 10,
    };
    let mut announced = std::collections::BTreeSet::new();
    // push: cancelled as it starts, once the manifest is known (before any
    // upload), once the first pack is uploaded (an event, not a count: two
    // packs start side by side and either may finish first)
    for stop in [Some(1), Some(2), None] {
        let sink = CancelWhen::new(move |seen, e| match stop {
            Some(n) => seen >= n,
            None => matches!(e, Event::UnitDone { .. }),
        });
        let r = strata_block::artifact::push_with(
            &store,
            &id,
            &reference,
            &plain_http(),
            &po,
            sink.ctl(),
        );
        match r {
            Err(e @ strata_block::BlockError::Cancelled) => {
                assert_eq!(e.kind(), ErrorKind::Cancelled)
            }
            other => panic!("push cancelled at {stop:?}: {other:?}"),
        }
        let ev = sink.events.events();
        let n = match stop {
            Some(n) => n,
            None => {
                1 + ev
                    .iter()
                    .position(|e| matches!(e, Event::UnitDone { .. }))
                    .expect("a pack was uploaded before the cancel")
            }
        };
        // in-flight packs finish at most (3 events each), nothing starts
        assert!(ev.len() <= n + 3 * jobs, "cancelled at {stop:?}: {ev:?}");
        assert!(!ev.contains(&Event::Finished {
            op: Op::TemplatePush
        }));
        announced.extend(ev.iter().filter_map(|e| match e {
            Event::Resolved {
                manifest_digest, ..
            } => Some(*manifest_digest),
            _ => None,
        }));
        assert_eq!(
            strata_testkit::proxy::http_status(&reg.addr, "/v2/vm/t/manifests/1"),
            Some(404),
            "a cancelled push moves no tag"
        );
    }
    assert_eq!(
        announced.len(),
        1,
        "one manifest whatever the run: {announced:?}"
    );
    let events = Collect::new();
    let pushed = strata_block::artifact::push_with(
        &store,
        &id,
        &reference,
        &plain_http(),
        &po,
        Ctl::new(&events, &Cancel::new()),
    )
    .unwrap();
    assert!(pushed.packs > 2, "{pushed:?}");
    assert_eq!(
        Some(&pushed.manifest_digest),
        announced.first(),
        "the re-run converges"
    );
    assert!(
        pushed.uploaded < pushed.chunks && pushed.bytes_skipped > 0,
        "packs uploaded by the cancelled runs are not sent again: {pushed:?}"
    );
    let ev = events.events();
    assert!(
        matches!(
            ev.first(),
            Some(Event::Started {
                op: Op::TemplatePush,
                ..
            })
        ),
        "{ev:?}"
    );
    assert_eq!(
        ev.last(),
        Some(&Event::Finished {
            op: Op::TemplatePush
        })
    );
    let done = |e: &Event| {
        matches!(
            e,
            Event::UnitDone {
                op: Op::TemplatePush,
                unit: Unit::Layer { .. }
            }
        )
    };
    assert_eq!(count(&ev, done) as u64, pushed.packs, "one unit per pack");
    let last_progress = ev.iter().rev().find_map(|e| match e {
        Event::Progress { done, total, .. } => Some((*done, *total)),
        _ => None,
    });
    let (d, t) = last_progress.expect("progress events");
    assert_eq!(Some(d), t, "cumulative bytes reach the total");
    assert_eq!(d, pushed.bytes_uploaded + pushed.bytes_skipped);
    let again =
        strata_block::artifact::push_with(&store, &id, &reference, &plain_http(), &po, Ctl::none())
            .unwrap();
    assert_eq!(again.manifest_digest, pushed.manifest_digest);
    assert_eq!(again.uploaded, 0);
    drop(store);
    store_is_clean(&root);

    // pull --all into a fresh store: cancelled as it starts, once resolved,
    // after the first pack
    let root2 = tmp.path().join("store2");
    for n in [1, 2, 4] {
        let store2 = Store::open(&root2).unwrap();
        let sink = after(n);
        let r = strata_block::artifact::pull(
            &store2,
            &reference,
            &plain_http(),
            true,
            jobs,
            sink.ctl(),
        );
        match r {
            Err(e @ strata_block::BlockError::Cancelled) => {
                assert_eq!(e.kind(), ErrorKind::Cancelled)
            }
            other => panic!("pull cancelled after {n} events: {other:?}"),
        }
        let ev = sink.events.events();
        assert!(ev.len() <= n + 3 * jobs, "after {n}: {ev:?}");
        assert!(
            store2.template_ids().unwrap().is_empty(),
            "no template is visible"
        );
        drop(store2);
        store_is_clean(&root2);
    }
    let store2 = Store::open(&root2).unwrap();
    let events = Collect::new();
    let pulled = strata_block::artifact::pull(
        &store2,
        &reference,
        &plain_http(),
        true,
        jobs,
        Ctl::new(&events, &Cancel::new()),
    )
    .unwrap();
    assert_eq!(pulled.id, id, "the re-run converges to the same template");
    assert_eq!(pulled.manifest_digest, pushed.manifest_digest);
    assert_eq!(pulled.chunks_local + pulled.fetched, pulled.chunks);
    let ev = events.events();
    assert!(
        ev.contains(&Event::Resolved {
            op: Op::TemplatePull,
            manifest_digest: pushed.manifest_digest,
            layers: pulled.chunks as usize,
        }),
        "{ev:?}"
    );
    let done = |e: &Event| {
        matches!(
            e,
            Event::UnitDone {
                op: Op::TemplatePull,
                unit: Unit::Layer { .. }
            }
        )
    };
    assert_eq!(count(&ev, done) as u64, pulled.packs_fetched);
    assert_eq!(pulled.packs_fetched, pushed.packs);
    assert_eq!(
        ev.last(),
        Some(&Event::Finished {
            op: Op::TemplatePull
        })
    );
    assert_eq!(store2.template_ids().unwrap(), vec![id]);
    drop(store2);
    store_is_clean(&root2);
}

#[test]
fn a_cancelled_verify_stops_and_a_full_one_reports_progress() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("store");
    let store = Store::open(&root).unwrap();
    let src: ImageRef = oci_ref(&debian_layout(), "python").parse().unwrap();
    let d = pull(&store, &src, "py", &pull_opts(), Ctl::none())
        .unwrap()
        .manifest_digest;
    let events = Collect::new();
    let report = store
        .verify_image(&d, Ctl::new(&events, &Cancel::new()))
        .unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    let ev = events.events();
    assert!(matches!(
        ev.first(),
        Some(Event::Started { op: Op::Verify, .. })
    ));
    assert_eq!(ev.last(), Some(&Event::Finished { op: Op::Verify }));
    let objects_done = |ev: &[Event]| {
        ev.iter()
            .filter_map(|e| match e {
                Event::Progress {
                    op: Op::Verify,
                    unit: Unit::Objects,
                    done,
                    total,
                } => Some((*done, total.unwrap())),
                _ => None,
            })
            .max()
    };
    assert_eq!(objects_done(&ev), Some((report.objects, report.objects)));
    assert!(ev.contains(&Event::Progress {
        op: Op::Verify,
        unit: Unit::Layers,
        done: 2,
        total: Some(2)
    }));
    // cancelled among the layers, and once objects are being hashed
    for when in [2usize, 5] {
        let sink = after(when);
        let e = store.verify_image(&d, sink.ctl()).expect_err("cancelled");
        assert!(matches!(e, strata_store::StoreError::Cancelled), "{e}");
        assert_eq!(e.kind(), ErrorKind::Cancelled);
        let ev = sink.events.events();
        assert!(!ev.contains(&Event::Finished { op: Op::Verify }));
        let (done, total) = objects_done(&ev).unwrap_or((0, report.objects));
        assert!(done * 4 < total, "stopped early: {done} of {total} objects");
    }
}

/// Counts the range requests made after `cancel` fired.
struct RangesAfterCancel<'a> {
    inner: &'a dyn strata_oci::ImageSource,
    cancel: &'a Cancel,
    after: std::sync::atomic::AtomicUsize,
    ranges: std::sync::atomic::AtomicUsize,
}

impl RangesAfterCancel<'_> {
    fn note(&self) {
        self.ranges
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.cancel.is_cancelled() {
            self.after.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl strata_oci::ImageSource for RangesAfterCancel<'_> {
    fn resolve(&self, p: &Platform) -> Result<strata_oci::ResolvedImage, strata_oci::OciError> {
        self.inner.resolve(p)
    }
    fn open_blob(
        &self,
        desc: &strata_oci::Descriptor,
        offset: u64,
    ) -> Result<Box<dyn std::io::Read + Send>, strata_oci::OciError> {
        self.inner.open_blob(desc, offset)
    }
    fn read_range(
        &self,
        desc: &strata_oci::Descriptor,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, strata_oci::OciError> {
        self.note();
        self.inner.read_range(desc, offset, len)
    }
    fn read_ranges(
        &self,
        desc: &strata_oci::Descriptor,
        ranges: &[(u64, u64)],
    ) -> Result<Vec<Vec<u8>>, strata_oci::OciError> {
        self.note();
        self.inner.read_ranges(desc, ranges)
    }
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[test]
fn a_partial_pull_cancelled_inside_its_layer_stops_before_the_next_range() {
    let tmp = tempfile::tempdir().unwrap();
    // an updated base (a few files changed) as zstd:chunked in a registry
    let reg = Registry::start();
    let conv = Store::open(tmp.path().join("conv")).unwrap();
    let upd: ImageRef = oci_ref(&apps_layout(), "base-updated").parse().unwrap();
    let s = pull(&conv, &upd, "upd", &pull_opts(), Ctl::none()).unwrap();
    let out = tmp.path().join("out");
    let copts = strata_oci::convert::ConvertOptions {
        format: strata_oci::convert::Format::ZstdChunked,
        level: 3,
        jobs: 2,
        prefetch: Vec::new(),
        place_first: false,
        ..Default::default()
    };
    strata_oci::convert::convert_to_layout(
        &conv,
        &s.manifest_digest,
        &out,
        Some("upd"),
        &copts,
        Ctl::none(),
    )
    .unwrap();
    reg.push(
        &format!("oci:{}:upd", out.display()),
        "upd:1",
        &["--preserve-digests"],
    );
    let reference: ImageRef = format!("docker://{}/upd:1", reg.addr).parse().unwrap();
    // a store with the old base: the updated layer is pulled partially
    let root = tmp.path().join("store");
    let store = Store::open(&root).unwrap();
    let base: ImageRef = oci_ref(&debian_layout(), "base").parse().unwrap();
    pull(&store, &base, "base", &pull_opts(), Ctl::none()).unwrap();
    let registry = strata_oci::open_source(&reference, &pull_opts().registry).unwrap();

    let sink = CancelWhen::new(|_, e| {
        matches!(
            e,
            Event::Progress {
                op: Op::Pull,
                unit: Unit::Layer { .. },
                ..
            }
        )
    });
    let source = RangesAfterCancel {
        inner: registry.as_ref(),
        cancel: &sink.cancel,
        after: Default::default(),
        ranges: Default::default(),
    };
    let r = strata_oci::pull::pull_from(&store, &source, "upd", &pull_opts(), sink.ctl());
    let returned = Instant::now();
    match r {
        Err(e @ PullError::Cancelled) => assert_eq!(e.kind(), ErrorKind::Cancelled),
        other => panic!("cancelled inside the layer: {other:?}"),
    }
    let fired = sink.fired().expect("a progress event inside the layer");
    assert!(
        returned - fired < Duration::from_secs(2),
        "returned {:?} after the cancel",
        returned - fired
    );
    assert!(
        source.ranges.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the TOC and tar-split were read by range (one request for both)"
    );
    assert_eq!(
        source.after.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no range request after the cancel"
    );
    assert!(
        sink.events.warnings().is_empty(),
        "the layer was pulled partially, not in full"
    );
    assert!(store.resolve_image("upd").is_err(), "no image is visible");
    drop(store);
    store_is_clean(&root);
    // the re-run converges (partially again)
    let store = Store::open(&root).unwrap();
    let again =
        strata_oci::pull::pull_from(&store, registry.as_ref(), "upd", &pull_opts(), Ctl::none())
            .unwrap();
    assert_eq!(again.layers_partial, 1, "{again:?}");
    assert_eq!(
        again.tree_digest, s.tree_digest,
        "the same tree as a full pull of the original"
    );
}

/// Push template `id` as strata did before packs: the map as config and a
/// blob per distinct chunk (`application/vnd.strata.rootfs.v1`).
fn push_v1(store: &Store, id: &strata_digest::Digest, reference: &ImageRef) {
    use strata_block::artifact::{ARTIFACT_TYPE_V1, CHUNK_MEDIA_TYPE, MAP_MEDIA_TYPE};
    use strata_oci::registry::{BlobContent, RegistryPusher};
    let pusher = RegistryPusher::new(reference, &plain_http()).unwrap();
    let map = store.template_map(id).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let mut layers = Vec::new();
    for (i, d) in map.chunks() {
        if seen.insert(d) {
            let bytes = std::fs::read(store.object_path(&d)).unwrap();
            pusher
                .upload_blob(&d, bytes.len() as u64, BlobContent::Bytes(&bytes))
                .unwrap();
            layers.push(serde_json::json!({
                "mediaType": CHUNK_MEDIA_TYPE, "digest": d.to_string(), "size": map.chunk_len(i),
            }));
        }
    }
    let map_bytes = map.to_bytes();
    let map_digest = strata_digest::Digest::sha256_of(&map_bytes);
    pusher
        .upload_blob(
            &map_digest,
            map_bytes.len() as u64,
            BlobContent::Bytes(&map_bytes),
        )
        .unwrap();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": ARTIFACT_TYPE_V1,
        "config": {"mediaType": MAP_MEDIA_TYPE, "digest": map_digest.to_string(), "size": map_bytes.len()},
        "layers": layers,
    });
    let ImageRef::Docker { tag, .. } = reference else {
        unreachable!()
    };
    pusher
        .put_manifest(
            tag.as_deref().unwrap(),
            "application/vnd.oci.image.manifest.v1+json",
            &serde_json::to_vec(&manifest).unwrap(),
        )
        .unwrap();
}

/// Served from an artifact from before packs (a blob per chunk): chunks
/// are fetched one blob each, a tampered one fails its read with EIO.
#[test]
fn a_served_template_reports_fetches_and_failures_and_stops_on_cancel() {
    use std::os::unix::fs::FileExt;
    let tmp = tempfile::tempdir().unwrap();
    let reg = Registry::start();
    let built = {
        let store = Store::open(tmp.path().join("src")).unwrap();
        let id = small_template(&store);
        let r: ImageRef = format!("docker://{}/vm/s:1", reg.addr).parse().unwrap();
        push_v1(&store, &id, &r);
        id
    };
    // the map only: every chunk is fetched on demand
    let root = tmp.path().join("store");
    let store = Store::open(&root).unwrap();
    let r: ImageRef = format!("docker://{}/vm/s:1", reg.addr).parse().unwrap();
    let pulled =
        strata_block::artifact::pull(&store, &r, &plain_http(), false, 2, Ctl::none()).unwrap();
    assert_eq!(pulled.id, built);
    let map = store.template_map(&built).unwrap();
    let chunks: Vec<(u64, strata_digest::Digest)> = map.chunks().collect();
    let mut sizes = std::collections::BTreeMap::new();
    for &(i, d) in &chunks {
        sizes.insert(d, map.chunk_len(i));
    }
    let missing: u64 = sizes.values().sum();
    // one chunk is tampered with in the registry: its fetch fails
    let (bad_index, bad) = chunks[chunks.len() / 2];
    let blob = reg.blob_path(&bad.hex());
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[100] ^= 0x40;
    std::fs::write(&blob, &bytes).unwrap();

    let file = tmp.path().join("t.img");
    strata_block::served::prepare_file(&root, &file).unwrap();
    let events = Arc::new(Collect::new());
    let cancel = Cancel::new();
    let req = strata_block::served::ServeRequest {
        template: built,
        name: "t".into(),
        file: file.clone(),
        writable: false,
        registry: plain_http(),
        readahead: strata_block::serve::DEFAULT_READAHEAD,
    };
    let served = strata_block::served::serve_with(
        Arc::new(store),
        &req,
        events.clone() as Arc<dyn EventSink>,
        cancel.clone(),
    )
    .unwrap();
    let f = std::fs::File::open(&file).unwrap();
    let cs = map.chunk_size;
    let mut buf = vec![0u8; cs as usize];
    let e = f
        .read_exact_at(
            &mut buf[..map.chunk_len(bad_index) as usize],
            bad_index * cs,
        )
        .expect_err("a chunk that does not match its digest");
    assert_eq!(e.raw_os_error(), Some(5), "EIO: {e}");
    assert!(
        events.warnings().iter().any(|w| matches!(
            w,
            strata_ops::Warning::ChunkFetchFailed { digest, .. } if *digest == bad
        )),
        "{:?}",
        events.warnings()
    );
    // the others (away from the bad one and the kernel's readahead of it)
    let mut read = std::collections::BTreeSet::new();
    for &(i, d) in &chunks {
        if d != bad && i.abs_diff(bad_index) > 8 {
            f.read_exact_at(&mut buf[..map.chunk_len(i) as usize], i * cs)
                .unwrap();
            read.insert(d);
        }
    }
    let want: u64 = read.iter().map(|d| sizes[d]).sum();
    let progress: Vec<(u64, Option<u64>)> = events
        .events()
        .iter()
        .filter_map(|e| match e {
            Event::Progress {
                op: Op::TemplateServe,
                done,
                total,
                ..
            } => Some((*done, *total)),
            _ => None,
        })
        .collect();
    let (done, total) = progress.iter().max().copied().expect("fetch progress");
    assert_eq!(total, Some(missing), "of the bytes missing at the start");
    assert!(
        done >= want && done <= missing - sizes[&bad],
        "{done} of {want}..{missing}"
    );
    assert!(matches!(
        events.events().first(),
        Some(Event::Started {
            op: Op::TemplateServe,
            ..
        })
    ));
    drop(f);
    // cancel: the file is unmounted and wait returns
    let canonical = file.canonicalize().unwrap();
    let waiter = std::thread::spawn(move || served.wait());
    std::thread::sleep(Duration::from_millis(300));
    assert!(!waiter.is_finished(), "serving until cancelled");
    let t = Instant::now();
    cancel.cancel();
    while !waiter.is_finished() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "cancel ends the serve"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let state = waiter.join().unwrap().unwrap();
    assert!(state.chunks_fetched >= read.len() as u64, "{state:?}");
    assert!(
        !strata_sys::mounts()
            .unwrap()
            .iter()
            .any(|m| m.mount_point == canonical),
        "unmounted"
    );
    assert_eq!(
        events.events().last(),
        Some(&Event::Finished {
            op: Op::TemplateServe
        })
    );
    assert!(
        strata_block::served::list(&root, false).is_empty(),
        "no record left"
    );
    // the fetched chunks reached the store
    let store = Store::open(&root).unwrap();
    assert!(read.iter().all(|d| store.has_object(d)));
    drop(store);
    store_is_clean(&root);
}
