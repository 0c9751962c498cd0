//! The standalone source with real files: the first load, edits picked up by the watcher,
//! bad edits reported while the last good state keeps serving, deletions, atomic renames,
//! and startup refusals. Each test has its own temporary directory, removed by a guard.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nodeward::metrics::{Metrics, ResultLabels};
use nodeward::state::standalone::{OnPublish, Standalone, StandaloneConfig, StartError};
use nodeward::state::{Snapshot, StateStore};
use nodeward_tests::TempDir;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How fast an edit must be in force (the README promises a second).
const WITHIN: Duration = Duration::from_secs(1);

const HTTPBIN: &str = "10.0.0.12";
const SLEEP: &str = "10.0.0.13";

const WORKLOADS: &str = "\
workloads:
- {name: httpbin, namespace: foo, labels: {app: httpbin}, ip: 10.0.0.12, interface: veth-httpbin}
- {name: sleep, namespace: bar, serviceAccount: sleep, labels: {app: sleep}, ip: 10.0.0.13}
";

/// An ALLOW policy for `app: httpbin` in `foo`.
fn allow(name: &str, method: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: foo}}\nspec:\n  selector: {{matchLabels: {{app: httpbin}}}}\n  action: ALLOW\n  rules: [{{to: [{{operation: {{methods: [\"{method}\"]}}}}]}}]\n"
    )
}

/// The same policy with an action Istio refuses.
fn invalid(name: &str) -> String {
    allow(name, "GET").replace("action: ALLOW", "action: PERMIT")
}

fn docs(docs: &[String]) -> String {
    docs.join("---\n")
}

fn ip(text: &str) -> IpAddr {
    text.parse().expect("test IP")
}

/// A temporary directory with `policies/` and `workloads.yaml`, removed on drop (also when
/// the test panics).
struct Fixture {
    dir: TempDir,
}

impl Fixture {
    fn new(test: &str) -> Self {
        let dir = TempDir::new(&format!("standalone-{test}"));
        std::fs::create_dir_all(dir.join("policies"))
            .unwrap_or_else(|e| panic!("creating {}: {e}", dir.path().display()));
        let fixture = Self { dir };
        fixture.write("workloads.yaml", WORKLOADS);
        fixture.write("policies/a.yaml", &allow("allow-get", "GET"));
        fixture
    }

    fn path(&self, relative: &str) -> PathBuf {
        self.dir.join(relative)
    }

    /// Writes in place (truncate and write), as many editors and `echo >` do.
    fn write(&self, relative: &str, text: &str) {
        let path = self.path(relative);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    /// Writes a hidden temporary file next to the target and renames it over the target.
    fn replace(&self, relative: &str, text: &str) {
        let path = self.path(relative);
        let name = path.file_name().expect("file name").to_string_lossy();
        let temp = path.with_file_name(format!(".{name}.tmp"));
        std::fs::write(&temp, text).unwrap_or_else(|e| panic!("writing {}: {e}", temp.display()));
        std::fs::rename(&temp, &path)
            .unwrap_or_else(|e| panic!("renaming onto {}: {e}", path.display()));
    }

    fn remove(&self, relative: &str) {
        let path = self.path(relative);
        std::fs::remove_file(&path).unwrap_or_else(|e| panic!("removing {}: {e}", path.display()));
    }

    fn config(&self) -> StandaloneConfig {
        let mut config =
            StandaloneConfig::new(vec![self.path("policies")], self.path("workloads.yaml"));
        config.debounce = Duration::from_millis(50);
        // Long enough that every change seen in these tests comes from a file event.
        config.rescan = Duration::from_hours(1);
        config
    }
}

/// A started source, its store and metrics, and the generations `on_publish` saw.
struct Started {
    store: Arc<StateStore>,
    metrics: Arc<Metrics>,
    published: Arc<Mutex<Vec<u64>>>,
    source: Standalone,
}

fn start(fixture: &Fixture) -> Started {
    let store = Arc::new(StateStore::new(Snapshot::empty(
        "cluster.local",
        "istio-system",
    )));
    let metrics = Arc::new(Metrics::new());
    let published = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&published);
    let on_publish: OnPublish = Arc::new(move |snapshot: &Arc<Snapshot>| {
        seen.lock().expect("not poisoned").push(snapshot.generation);
    });
    let source = Standalone::start(
        fixture.config(),
        Arc::clone(&store),
        Arc::clone(&metrics),
        on_publish,
    )
    .unwrap_or_else(|e| panic!("start: {e}"));
    Started {
        store,
        metrics,
        published,
        source,
    }
}

/// The watcher running in the background; `stop` ends it.
struct Watching {
    store: Arc<StateStore>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

impl Watching {
    async fn new(started: Started) -> Self {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(started.source.watch(shutdown.clone()));
        // On the current-thread runtime this runs the watcher up to its first await, by which
        // time its watches are in place (a change before that is caught by its first rescan,
        // but an unchanged rewrite would not be seen at all).
        tokio::task::yield_now().await;
        Self {
            store: started.store,
            metrics: started.metrics,
            shutdown,
            task,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("watcher stops on shutdown")
            .expect("watcher task did not panic");
    }

    /// Polls the store until `ready`, failing with the current state after `within`.
    async fn until(
        &self,
        within: Duration,
        what: &str,
        ready: impl Fn(&Snapshot) -> bool,
    ) -> (Arc<Snapshot>, Duration) {
        let start = Instant::now();
        loop {
            let snapshot = self.store.load();
            if ready(&snapshot) {
                return (snapshot, start.elapsed());
            }
            assert!(
                start.elapsed() < within,
                "{what}: not seen within {within:?}; generation {}, errors {:#?}",
                snapshot.generation,
                snapshot.errors
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn until_metric(&self, within: Duration, what: &str, ready: impl Fn(&Metrics) -> bool) {
        let start = Instant::now();
        while !ready(&self.metrics) {
            assert!(
                start.elapsed() < within,
                "{what}: not seen within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn reloads(metrics: &Metrics, result: &'static str) -> u64 {
    metrics
        .reloads
        .get_or_create(&ResultLabels { result })
        .get()
}

fn allow_names(snapshot: &Snapshot, at: &str) -> Vec<String> {
    snapshot
        .destination(ip(at))
        .unwrap_or_else(|| panic!("{at} is a known workload"))
        .authz
        .allow
        .iter()
        .map(|p| p.id.clone())
        .collect()
}

#[test]
fn a_initial_load_publishes_generation_1() {
    let fixture = Fixture::new("initial");
    let started = start(&fixture);
    let snapshot = started.store.load();
    assert_eq!(snapshot.generation, 1);
    assert_eq!(snapshot.errors, Vec::<String>::new());
    assert_eq!(snapshot.workloads.len(), 2);
    assert_eq!(allow_names(&snapshot, HTTPBIN), ["foo/allow-get"]);
    assert!(snapshot
        .destination(ip(HTTPBIN))
        .expect("httpbin")
        .is_protected());
    assert_eq!(
        snapshot
            .destination(ip(HTTPBIN))
            .expect("httpbin")
            .workload
            .interface
            .as_deref(),
        Some("veth-httpbin")
    );
    let sleep = snapshot.source(ip(SLEEP)).expect("sleep is a known source");
    assert_eq!(sleep.principal, "cluster.local/ns/bar/sa/sleep");
    assert_eq!(sleep.service_account, "bar/sleep");
    assert!(!snapshot
        .destination(ip(SLEEP))
        .expect("sleep")
        .is_protected());
    assert_eq!(*started.published.lock().expect("lock"), [1]);
    assert_eq!(reloads(&started.metrics, "ok"), 1);
    assert_eq!(started.metrics.config_errors.get(), 0);
}

#[tokio::test]
async fn b_policy_edit_applies_within_a_second() {
    let fixture = Fixture::new("edit");
    let w = Watching::new(start(&fixture)).await;
    fixture.write(
        "policies/a.yaml",
        &docs(&[allow("allow-get", "GET"), allow("allow-post", "POST")]),
    );
    let (snapshot, took) = w
        .until(WITHIN, "second ALLOW policy", |s| {
            s.destination(ip(HTTPBIN))
                .is_some_and(|v| v.authz.allow.len() == 2)
        })
        .await;
    assert_eq!(snapshot.generation, 2, "one edit, one generation");
    assert_eq!(
        allow_names(&snapshot, HTTPBIN),
        ["foo/allow-get", "foo/allow-post"]
    );
    eprintln!("edit in force after {took:?}");
    w.stop().await;
}

#[tokio::test]
async fn c1_broken_yaml_keeps_the_old_policy_until_fixed() {
    let fixture = Fixture::new("broken-yaml");
    let w = Watching::new(start(&fixture)).await;

    fixture.write("policies/a.yaml", "apiVersion: [security.istio.io/v1\n");
    let (snapshot, _) = w
        .until(WITHIN, "YAML error reported", |s| !s.errors.is_empty())
        .await;
    assert_eq!(snapshot.errors.len(), 1, "{:#?}", snapshot.errors);
    let error = &snapshot.errors[0];
    assert!(
        error.contains("a.yaml") && error.contains("not valid YAML"),
        "{error}"
    );
    assert!(error.contains("last good content"), "{error}");
    assert_eq!(
        allow_names(&snapshot, HTTPBIN),
        ["foo/allow-get"],
        "old policy in force"
    );
    assert_eq!(w.metrics.config_errors.get(), 1);
    assert!(reloads(&w.metrics, "error") >= 1);

    fixture.write(
        "policies/a.yaml",
        &docs(&[allow("allow-get", "GET"), allow("allow-post", "POST")]),
    );
    let (snapshot, _) = w
        .until(WITHIN, "fixed file in force", |s| {
            s.errors.is_empty()
                && s.destination(ip(HTTPBIN))
                    .is_some_and(|v| v.authz.allow.len() == 2)
        })
        .await;
    assert_eq!(
        allow_names(&snapshot, HTTPBIN),
        ["foo/allow-get", "foo/allow-post"]
    );
    assert_eq!(w.metrics.config_errors.get(), 0);
    w.stop().await;
}

#[tokio::test]
async fn c2_invalid_object_keeps_the_whole_file_as_it_was() {
    let fixture = Fixture::new("invalid-object");
    let w = Watching::new(start(&fixture)).await;

    // One good new object and one broken one in the same edit: neither applies.
    fixture.write(
        "policies/a.yaml",
        &docs(&[invalid("allow-get"), allow("allow-post", "POST")]),
    );
    let (snapshot, _) = w
        .until(WITHIN, "invalid object reported", |s| !s.errors.is_empty())
        .await;
    let error = &snapshot.errors[0];
    assert!(
        error.contains("a.yaml") && error.contains("foo/allow-get") && error.contains("action"),
        "names file, object and field: {error}"
    );
    assert_eq!(
        allow_names(&snapshot, HTTPBIN),
        ["foo/allow-get"],
        "old policy in force"
    );
    assert_eq!(w.metrics.config_errors.get(), 1);

    fixture.write(
        "policies/a.yaml",
        &docs(&[allow("allow-get", "PUT"), allow("allow-post", "POST")]),
    );
    let (snapshot, _) = w
        .until(WITHIN, "fixed file in force", |s| s.errors.is_empty())
        .await;
    assert_eq!(
        allow_names(&snapshot, HTTPBIN),
        ["foo/allow-get", "foo/allow-post"]
    );
    assert_eq!(w.metrics.config_errors.get(), 0);
    w.stop().await;
}

#[tokio::test]
async fn d_new_file_with_a_bad_and_a_good_object() {
    let fixture = Fixture::new("new-file");
    let w = Watching::new(start(&fixture)).await;
    fixture.write(
        "policies/b.yaml",
        &docs(&[invalid("broken"), allow("allow-post", "POST")]),
    );
    let (snapshot, _) = w
        .until(WITHIN, "good object of the new file", |s| {
            s.destination(ip(HTTPBIN))
                .is_some_and(|v| v.authz.allow.len() == 2)
        })
        .await;
    assert_eq!(
        allow_names(&snapshot, HTTPBIN),
        ["foo/allow-get", "foo/allow-post"]
    );
    assert_eq!(snapshot.errors.len(), 1, "{:#?}", snapshot.errors);
    assert!(
        snapshot.errors[0].contains("b.yaml") && snapshot.errors[0].contains("foo/broken"),
        "{}",
        snapshot.errors[0]
    );
    assert_eq!(w.metrics.config_errors.get(), 1);
    w.stop().await;
}

#[tokio::test]
async fn e_deleting_a_file_removes_its_policies() {
    let fixture = Fixture::new("delete");
    std::fs::create_dir_all(fixture.path("policies/sub")).expect("mkdir");
    fixture.write("policies/sub/b.yaml", &allow("allow-post", "POST"));
    let w = Watching::new(start(&fixture)).await;
    assert_eq!(
        allow_names(&w.store.load(), HTTPBIN),
        ["foo/allow-get", "foo/allow-post"]
    );
    fixture.remove("policies/sub/b.yaml");
    let (snapshot, _) = w
        .until(WITHIN, "policies of the deleted file gone", |s| {
            s.destination(ip(HTTPBIN))
                .is_some_and(|v| v.authz.allow.len() == 1)
        })
        .await;
    assert_eq!(allow_names(&snapshot, HTTPBIN), ["foo/allow-get"]);
    assert_eq!(snapshot.errors, Vec::<String>::new());

    // A whole directory removed: its files go too.
    std::fs::remove_dir_all(fixture.path("policies/sub")).expect("rmdir");
    fixture.remove("policies/a.yaml");
    let (snapshot, _) = w
        .until(WITHIN, "no policy left", |s| s.authz.is_empty())
        .await;
    assert!(!snapshot
        .destination(ip(HTTPBIN))
        .expect("httpbin")
        .is_protected());
    w.stop().await;
}

#[tokio::test]
async fn f_workloads_edits_are_picked_up_and_a_broken_file_keeps_the_registry() {
    let fixture = Fixture::new("workloads");
    let w = Watching::new(start(&fixture)).await;

    // A new pod, matched by the existing policy.
    let added = format!("{WORKLOADS}- {{name: httpbin-2, namespace: foo, labels: {{app: httpbin}}, ip: 10.0.0.14}}\n");
    fixture.write("workloads.yaml", &added);
    let (snapshot, _) = w
        .until(WITHIN, "new workload", |s| {
            s.destination(ip("10.0.0.14")).is_some()
        })
        .await;
    assert_eq!(allow_names(&snapshot, "10.0.0.14"), ["foo/allow-get"]);

    // New labels: the policy no longer selects httpbin.
    fixture.write(
        "workloads.yaml",
        &added.replacen("app: httpbin}", "app: other}", 1),
    );
    let (snapshot, _) = w
        .until(WITHIN, "httpbin relabelled", |s| {
            s.labels_of(ip(HTTPBIN))
                .is_some_and(|l| l["app"] == "other")
        })
        .await;
    assert!(allow_names(&snapshot, HTTPBIN).is_empty());
    let generation = snapshot.generation;

    // Not YAML: the registry in force stays, the error is reported.
    fixture.write("workloads.yaml", "workloads: [\n");
    let (snapshot, _) = w
        .until(WITHIN, "workloads file error", |s| !s.errors.is_empty())
        .await;
    assert_eq!(snapshot.generation, generation + 1);
    assert!(
        snapshot.errors[0].contains("workloads.yaml")
            && snapshot.errors[0].contains("last good registry"),
        "{}",
        snapshot.errors[0]
    );
    assert_eq!(snapshot.workloads.len(), 3);
    assert!(snapshot.destination(ip("10.0.0.14")).is_some());
    assert_eq!(w.metrics.config_errors.get(), 1);

    // Fixed.
    fixture.write("workloads.yaml", WORKLOADS);
    let (snapshot, _) = w
        .until(WITHIN, "workloads file fixed", |s| s.errors.is_empty())
        .await;
    assert_eq!(snapshot.workloads.len(), 2);
    assert!(snapshot.destination(ip("10.0.0.14")).is_none());
    w.stop().await;
}

#[tokio::test]
async fn f2_a_broken_entry_keeps_its_last_good_version_and_does_not_hold_back_others() {
    let fixture = Fixture::new("workload-entry");
    let w = Watching::new(start(&fixture)).await;
    let edited = WORKLOADS.replace("ip: 10.0.0.13", "ip: 10.0.0.300")
        + "- {name: new, namespace: foo, ip: 10.0.0.15}\n- {name: typo, namespace: foo, ip: nope}\n";
    fixture.write("workloads.yaml", &edited);
    let (snapshot, _) = w
        .until(WITHIN, "entry errors", |s| s.errors.len() == 2)
        .await;
    assert!(
        snapshot.destination(ip("10.0.0.15")).is_some(),
        "new valid entry applies"
    );
    assert_eq!(
        snapshot.source(ip(SLEEP)).map(|s| s.principal.as_str()),
        Some("cluster.local/ns/bar/sa/sleep"),
        "broken edit of sleep: its last good version serves"
    );
    assert!(
        snapshot.errors[0].contains("workloads[1] (bar/sleep): ip")
            && snapshot.errors[0].contains("last good version"),
        "{}",
        snapshot.errors[0]
    );
    assert!(
        snapshot.errors[1].contains("workloads[3] (foo/typo): ip")
            && snapshot.errors[1].contains("entry skipped"),
        "{}",
        snapshot.errors[1]
    );
    assert_eq!(w.metrics.config_errors.get(), 2);
    w.stop().await;
}

#[tokio::test]
async fn g_atomic_replace_by_rename_is_seen() {
    let fixture = Fixture::new("rename");
    let w = Watching::new(start(&fixture)).await;
    fixture.replace(
        "policies/a.yaml",
        &docs(&[allow("allow-get", "GET"), allow("allow-post", "POST")]),
    );
    w.until(WITHIN, "renamed policy file", |s| {
        s.destination(ip(HTTPBIN))
            .is_some_and(|v| v.authz.allow.len() == 2)
    })
    .await;
    fixture.replace(
        "workloads.yaml",
        &format!("{WORKLOADS}- {{name: c, namespace: foo, ip: 10.0.0.16}}\n"),
    );
    w.until(WITHIN, "renamed workloads file", |s| {
        s.destination(ip("10.0.0.16")).is_some()
    })
    .await;
    let snapshot = w.store.load();
    assert_eq!(
        snapshot.generation, 3,
        "the hidden temporary files caused no reload of their own"
    );
    assert_eq!(snapshot.errors, Vec::<String>::new());
    w.stop().await;
}

#[test]
fn h_start_refuses_a_missing_or_broken_workloads_file() {
    let fixture = Fixture::new("refuse");
    let mut config = fixture.config();
    config.workloads = fixture.path("missing.yaml");
    let err = try_start_err(config);
    assert!(matches!(err, StartError::Workloads(_)), "{err:?}");
    assert!(err.to_string().contains("missing.yaml"), "{err}");

    fixture.write("workloads.yaml", "workloads:\n  - {name: a\n");
    let err = try_start_err(fixture.config());
    assert!(err.to_string().contains("workloads.yaml"), "{err}");
    assert!(err.to_string().contains("not valid YAML"), "{err}");

    fixture.write("workloads.yaml", WORKLOADS);
    let mut config = fixture.config();
    config.policies.push(fixture.path("no-such-dir"));
    let err = try_start_err(config);
    assert!(matches!(err, StartError::Policies { .. }), "{err:?}");
    assert!(err.to_string().contains("no-such-dir"), "{err}");
}

fn try_start_err(config: StandaloneConfig) -> StartError {
    let store = Arc::new(StateStore::new(Snapshot::empty(
        "cluster.local",
        "istio-system",
    )));
    let err = Standalone::start(
        config,
        Arc::clone(&store),
        Arc::new(Metrics::new()),
        Arc::new(|_: &Arc<Snapshot>| {}),
    )
    .expect_err("start refuses");
    assert_eq!(store.load().generation, 0, "nothing published");
    err
}

#[tokio::test]
async fn i_unchanged_content_does_not_bump_the_generation() {
    let fixture = Fixture::new("unchanged");
    let mut started = start(&fixture);

    let outcome = started.source.reload();
    assert!(!outcome.published);
    assert_eq!(outcome.generation, 1);
    assert_eq!(reloads(&started.metrics, "ok"), 2);

    // Only layout and comments change: what is in force is the same.
    fixture.write(
        "policies/a.yaml",
        &format!("# a comment\n{}", allow("allow-get", "GET")),
    );
    assert!(!started.source.reload().published);

    // The same bytes written again, seen by the watcher: a reload, no new generation.
    let w = Watching::new(started).await;
    fixture.write("workloads.yaml", WORKLOADS);
    w.until_metric(WITHIN, "reload after rewrite", |m| reloads(m, "ok") >= 4)
        .await;
    assert_eq!(w.store.load().generation, 1);
    w.stop().await;
}

#[test]
fn j_a_named_policy_file_that_disappears_keeps_serving() {
    let fixture = Fixture::new("named-file");
    let mut config = fixture.config();
    config.policies = vec![fixture.path("policies/a.yaml")];
    let store = Arc::new(StateStore::new(Snapshot::empty(
        "cluster.local",
        "istio-system",
    )));
    let metrics = Arc::new(Metrics::new());
    let mut source = Standalone::start(
        config,
        Arc::clone(&store),
        Arc::clone(&metrics),
        Arc::new(|_: &Arc<Snapshot>| {}),
    )
    .unwrap_or_else(|e| panic!("start: {e}"));
    fixture.remove("policies/a.yaml");
    let outcome = source.reload();
    assert!(outcome.published, "the error is news");
    assert_eq!(outcome.errors.len(), 1, "{:#?}", outcome.errors);
    assert!(
        outcome.errors[0].contains("cannot read policy path")
            && outcome.errors[0].contains("a.yaml"),
        "{}",
        outcome.errors[0]
    );
    assert_eq!(allow_names(&store.load(), HTTPBIN), ["foo/allow-get"]);
    assert_eq!(reloads(&metrics, "error"), 1);
}

#[tokio::test]
async fn k_the_periodic_rescan_sees_what_no_event_reports() {
    // The workloads path is a symbolic link into a directory nobody watches: writes to the
    // target raise no event where the watcher looks.
    let fixture = Fixture::new("rescan");
    std::fs::create_dir_all(fixture.path("elsewhere")).expect("mkdir");
    fixture.write("elsewhere/real.yaml", WORKLOADS);
    std::os::unix::fs::symlink(
        fixture.path("elsewhere/real.yaml"),
        fixture.path("link.yaml"),
    )
    .expect("symlink");
    let mut config = fixture.config();
    config.workloads = fixture.path("link.yaml");
    config.rescan = Duration::from_millis(200);
    let store = Arc::new(StateStore::new(Snapshot::empty(
        "cluster.local",
        "istio-system",
    )));
    let metrics = Arc::new(Metrics::new());
    let source = Standalone::start(
        config,
        Arc::clone(&store),
        Arc::clone(&metrics),
        Arc::new(|_: &Arc<Snapshot>| {}),
    )
    .unwrap_or_else(|e| panic!("start: {e}"));
    let w = Watching::new(Started {
        store,
        metrics,
        published: Arc::default(),
        source,
    })
    .await;
    // Past the watcher's first rescan (deferred while the files above are fresh).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = reloads(&w.metrics, "ok");
    fixture.write(
        "elsewhere/real.yaml",
        &format!("{WORKLOADS}- {{name: c, namespace: foo, ip: 10.0.0.17}}\n"),
    );
    let (_, took) = w
        .until(Duration::from_secs(3), "change found by the rescan", |s| {
            s.destination(ip("10.0.0.17")).is_some()
        })
        .await;
    eprintln!("rescan found the change after {took:?}");
    assert_eq!(
        reloads(&w.metrics, "ok"),
        before + 1,
        "one reload: the rescan that found it"
    );
    w.stop().await;
}
