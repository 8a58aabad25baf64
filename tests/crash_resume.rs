//! Crash and resume with the real example, as a child process: `examples/trip_booking` aborts
//! (`std::process::abort`, no cleanup) right after its S-th committed activity outcome, for
//! every S of a full run; running the same command again without `--crash-after` resumes every
//! unfinished trip and completes it. After completion, whatever the crash point:
//! `booked + compensated = trips`, `live_car = live_hotel = live_flight = booked`, and every trip's
//! journal (commands, and one outcome per activity call) is the one a run without a crash
//! records. The same holds with flaky services and several successive crashes, and a run after
//! completion calls no service again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use retrace::sdk::EventFamily;
use retrace::{Client, Event, InstanceStatus, SharedStore, SqliteStore};
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Trips of every run, and the airline refuses every second trip's flight (trip 2 compensates).
const TRIPS: u64 = 3;
const BASE_ARGS: &[&str] = &[
    "--trips",
    "3",
    "--fail-every",
    "2",
    // Customers pay within 50 ms: a payment deadline far away keeps every trip on the paid path
    // however long a resume takes, so that journals can be compared with a crash-free run.
    "--payment-timeout",
    "120",
];
/// Bounds one run of the example, so that a hang fails the test instead of blocking it.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// The example binary, built once per test process. `cargo build` is a no-op when it is up to
/// date, and keeps a stale binary from being tested.
fn example_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // <target>/<profile>/deps/crash_resume-<hash>
        let exe = std::env::current_exe().expect("current test executable");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test executable lives in <target>/<profile>/deps")
            .to_path_buf();
        let target_dir = profile_dir.parent().expect("<target>/<profile>");
        let profile = profile_dir
            .file_name()
            .and_then(|n| n.to_str())
            .expect("profile directory name");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .args([
                "build",
                "--quiet",
                "--example",
                "trip_booking",
                "--manifest-path",
            ])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .arg("--target-dir")
            .arg(target_dir);
        match profile {
            "debug" => {}
            "release" => {
                build.arg("--release");
            }
            other => {
                build.args(["--profile", other]);
            }
        }
        let status = build.status().expect("run cargo build");
        assert!(
            status.success(),
            "cargo build --example trip_booking failed"
        );
        let bin = profile_dir
            .join("examples")
            .join(format!("trip_booking{}", std::env::consts::EXE_SUFFIX));
        assert!(bin.exists(), "{} was not built", bin.display());
        bin
    })
}

/// Runs the example on `db` with `args`, killing it after [`RUN_TIMEOUT`].
async fn run_example(db: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(example_binary());
    // Run inside the test's directory, so that even a core dump of the abort stays there.
    cmd.current_dir(db.parent().expect("db inside a directory"))
        .arg("--db")
        .arg(db)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().expect("spawn the example");
    let pid = child.id();
    let waiting = tokio::task::spawn_blocking(move || child.wait_with_output());
    match tokio::time::timeout(RUN_TIMEOUT, waiting).await {
        Ok(output) => output.unwrap().expect("wait for the example"),
        Err(_) => {
            // SAFETY: `pid` is our child's, and it has not been reaped (we are still waiting).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            panic!(
                "trip_booking {args:?} on {} did not finish within {RUN_TIMEOUT:?}",
                db.display()
            );
        }
    }
}

fn describe(output: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Asserts that the run aborted (SIGABRT) after `crash_after` outcomes.
fn assert_aborted(output: &Output, crash_after: usize) {
    assert_eq!(
        output.status.signal(),
        Some(libc::SIGABRT),
        "expected an abort:\n{}",
        describe(output)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("aborting after {crash_after} committed")),
        "{}",
        describe(output)
    );
}

/// Parses the summary line (the last line of stdout) of a successful run.
fn summary(output: &Output) -> BTreeMap<String, u64> {
    assert!(
        output.status.success(),
        "the run failed:\n{}",
        describe(output)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let fields = last
        .strip_prefix("summary ")
        .unwrap_or_else(|| panic!("last line is not a summary:\n{}", describe(output)));
    fields
        .split(' ')
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("key=value");
            (k.to_string(), v.parse().expect("a number"))
        })
        .collect()
}

/// Checks the promises of a completed run's summary and returns it.
fn assert_consistent(output: &Output) -> BTreeMap<String, u64> {
    let s = summary(output);
    let text = describe(output);
    assert_eq!(s["trips"], TRIPS, "{text}");
    assert_eq!(s["booked"] + s["compensated"], s["trips"], "{text}");
    assert_eq!(s["live_car"], s["booked"], "{text}");
    assert_eq!(s["live_hotel"], s["booked"], "{text}");
    assert_eq!(s["live_flight"], s["booked"], "{text}");
    s
}

/// What a trip's journal says: its status, its commands in order, and the outcome kind of each
/// activity call position.
#[derive(Debug, Clone, PartialEq)]
struct Journal {
    status: InstanceStatus,
    commands: Vec<String>,
    outcomes: BTreeMap<u32, Vec<&'static str>>,
}

/// Reads every trip's journal from the store file (no process may be running on it).
async fn journals(db: &Path) -> BTreeMap<String, Journal> {
    let store: SharedStore = Arc::new(SqliteStore::open(db).unwrap());
    let client = Client::new(store);
    let mut out = BTreeMap::new();
    for trip in 1..=TRIPS {
        let id = format!("trip-{trip}");
        let history = client.history(&id).await.unwrap();
        assert_well_formed(&history);
        let commands = history
            .iter()
            .filter(|e| e.event.family() == EventFamily::Command)
            .filter_map(|e| e.event.command_identity())
            .collect();
        let mut outcomes: BTreeMap<u32, Vec<&'static str>> = BTreeMap::new();
        for e in &history {
            if let Event::ActivityCompleted { seq, .. } | Event::ActivityFailed { seq, .. } =
                &e.event
            {
                outcomes.entry(*seq).or_default().push(e.event.kind());
            }
        }
        let status = client.describe(&id).await.unwrap().status;
        out.insert(
            id,
            Journal {
                status,
                commands,
                outcomes,
            },
        );
    }
    out
}

/// The reference: a run without crashes. Returns its journals, its service calls and `K`, the
/// number of activity outcomes it committed.
async fn reference() -> (BTreeMap<String, Journal>, u64, usize) {
    let dir = TempDir::new("crash-reference");
    let db = dir.file("trips.db");
    let s = assert_consistent(&run_example(&db, BASE_ARGS).await);
    assert_eq!(s["compensated"], 1, "trip 2 compensates");
    let journals = journals(&db).await;
    assert_eq!(journals["trip-1"].status, InstanceStatus::Completed);
    assert_eq!(journals["trip-2"].status, InstanceStatus::Failed);
    assert_eq!(journals["trip-3"].status, InstanceStatus::Completed);
    let k: usize = journals.values().map(|j| j.outcomes.len()).sum();
    // Each trip reserves a car and books a hotel and a flight; trip 2 then undoes two bookings.
    assert!(k >= 3 * TRIPS as usize + 2, "only {k} outcomes");
    // Without flaky services, every call reaches a service exactly once.
    assert_eq!(s["service_calls"], k as u64);
    (journals, s["service_calls"], k)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_after_an_abort_at_every_committed_outcome() {
    init_tracing();
    let (expected, calls, k) = reference().await;

    // Every crash point is independent: run a few at once.
    let lanes = Arc::new(tokio::sync::Semaphore::new(3));
    let mut runs = Vec::new();
    for crash_after in 1..=k {
        let lanes = lanes.clone();
        let expected = expected.clone();
        runs.push(tokio::spawn(async move {
            let _lane = lanes.acquire_owned().await.unwrap();
            let dir = TempDir::new(&format!("crash-at-{crash_after}"));
            let db = dir.file("trips.db");
            let crash = crash_after.to_string();
            let mut args = BASE_ARGS.to_vec();
            args.extend(["--crash-after", crash.as_str()]);
            assert_aborted(&run_example(&db, &args).await, crash_after);

            let resumed = run_example(&db, BASE_ARGS).await;
            let s = assert_consistent(&resumed);
            assert_eq!(s["compensated"], 1, "crash after {crash_after}");
            assert!(s["service_calls"] >= calls, "crash after {crash_after}");
            let got = journals(&db).await;
            assert_eq!(
                got, expected,
                "crash after {crash_after}: journals differ from a run without a crash"
            );
        }));
    }
    for run in runs {
        within("a crash point", run).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_services_and_successive_crashes_still_complete_every_trip() {
    init_tracing();
    let (expected, _, k) = reference().await;
    let dir = TempDir::new("crash-flaky");
    let db = dir.file("trips.db");
    let mut args = BASE_ARGS.to_vec();
    args.extend(["--flaky", "0.3", "--crash-after", "3"]);

    // Each run commits three new outcomes and aborts, until a run has fewer than three left.
    let mut crashes = 0;
    let finished = loop {
        assert!(crashes <= k, "more crashes than outcomes: no progress");
        let output = run_example(&db, &args).await;
        if output.status.success() {
            break output;
        }
        assert_aborted(&output, 3);
        crashes += 1;
    };
    assert!(crashes >= 2, "only {crashes} crashes");
    let first = assert_consistent(&finished);

    // The same command without --crash-after: everything is journaled, nothing runs again.
    let again = assert_consistent(&run_example(&db, &args[..args.len() - 2]).await);
    assert_eq!(
        again, first,
        "a run after completion called a service again"
    );
    assert_eq!(journals(&db).await, expected);
}
