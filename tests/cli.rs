//! The `retrace` binary, driven as a child process against stores made by the trip example: a
//! completed one, a crashed one (`--crash-after`), a compensated one (`--fail-every 1`), and one
//! stopped by nondeterminism (a worker with changed code); plus fork, import and export, and
//! `migrate` from SQLite to PostgreSQL.
//!
//! The PostgreSQL tests run when `RETRACE_PG_URL` names a server (`.ci/run` sets it), each in a
//! schema of its own (`retrace_cli_<random>`), dropped at the end whatever the outcome; without
//! it they say on stderr that they were not run and why, and pass.
//!
//! The trip example is run as built by `cargo test` (examples are built with the tests); when
//! it is missing (`cargo test --test cli` alone), this test builds it first.

#[path = "../examples/trip_booking/coordinator.rs"]
#[allow(dead_code)]
mod coordinator;
#[path = "common/pg.rs"]
mod pg;

use coordinator::{
    book_trip, Itinerary, Payment, Reservation, TripRequest, BOOK_FLIGHT, BOOK_HOTEL, BOOK_TRIP,
    CANCEL_CAR, CANCEL_FLIGHT, CANCEL_HOTEL, RESERVE_CAR,
};
use retrace::sdk::Context;
use retrace::{
    ActivityContext, ActivityError, Client, ClientError, Error, Event, InstanceStatus, ListFilter,
    SharedStore, SqliteStore, Worker,
};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, OnceLock};

// ----- running things ------------------------------------------------------------------------

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let path =
            std::env::temp_dir().join(format!("retrace-{label}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Awaits `fut`, failing the test after a generous bound instead of hanging.
async fn within<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(std::time::Duration::from_secs(60), fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self) -> String {
        assert_eq!(
            self.code,
            Some(0),
            "stderr: {}\nstdout: {}",
            self.stderr,
            self.stdout
        );
        self.stdout
    }

    fn fails(self) -> String {
        assert_ne!(
            self.code,
            Some(0),
            "expected a failure; stdout: {}",
            self.stdout
        );
        assert!(
            self.stderr.starts_with("retrace: ") || self.stderr.contains("Usage"),
            "a failure says what is wrong on stderr: {:?}",
            self.stderr
        );
        self.stderr
    }

    fn json(self) -> Value {
        let text = self.ok();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    }
}

fn finish(out: Output) -> Run {
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `retrace --db DB ARGS...`.
fn retrace(db: &Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_retrace"))
        .arg("--db")
        .arg(db)
        .args(args)
        .env_remove("RETRACE_DB")
        .output()
        .unwrap();
    finish(out)
}

/// `retrace ARGS...`, with no store named (for `migrate`, which names its own).
fn retrace_bare(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_retrace"))
        .args(args)
        .env_remove("RETRACE_DB")
        .output()
        .unwrap();
    finish(out)
}

/// The trip example binary, built by `cargo test` beside this test's binary.
fn trip_example() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let deps = std::env::current_exe().unwrap();
        let profile_dir = deps.parent().unwrap().parent().unwrap();
        let path = profile_dir
            .join("examples")
            .join(format!("trip_booking{}", std::env::consts::EXE_SUFFIX));
        if !path.exists() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut build = Command::new(cargo);
            build
                .args(["build", "--example", "trip_booking"])
                .current_dir(env!("CARGO_MANIFEST_DIR"));
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                build.arg("--release");
            }
            assert!(
                build.status().unwrap().success(),
                "building the trip example"
            );
        }
        path
    })
}

/// Runs the trip example on a store at `db`.
fn trips(db: &Path, args: &[&str]) -> Run {
    let out = Command::new(trip_example())
        .arg("--db")
        .arg(db)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    finish(out)
}

fn completed_store(dir: &TempDir) -> PathBuf {
    let db = dir.file("completed.db");
    let out = trips(&db, &["--trips", "2"]).ok();
    assert!(out.contains("booked=2"), "{out}");
    db
}

fn compensated_store(dir: &TempDir) -> PathBuf {
    let db = dir.file("compensated.db");
    let out = trips(&db, &["--trips", "2", "--fail-every", "1"]).ok();
    assert!(out.contains("compensated=2"), "{out}");
    db
}

fn crashed_store(dir: &TempDir) -> PathBuf {
    // The example starts its trips one after another while its worker runs them: on a loaded
    // machine the 4th outcome (the crash) can come before the 3rd trip was started. Such a
    // store holds 2 trips; the scenario is run again then (never for any other difference).
    for attempt in 0..5 {
        let db = dir.file(&format!("crashed-{attempt}.db"));
        let run = trips(&db, &["--trips", "3", "--crash-after", "4"]);
        assert_ne!(run.code, Some(0), "the example aborts: {}", run.stderr);
        assert!(run.stderr.contains("crash"), "{}", run.stderr);
        let listed = retrace(&db, &["list", "--json"]).json();
        if listed.as_array().map_or(0, Vec::len) == 3 {
            return db;
        }
    }
    panic!("the crash came before the 3rd trip was started, five times in a row");
}

/// A worker running the trip coordinator (or `changed` code under its name) with activities
/// that always succeed.
fn worker(store: &SharedStore, changed: bool) -> Worker {
    async fn book(ctx: ActivityContext, _req: TripRequest) -> Result<Reservation, ActivityError> {
        Ok(Reservation {
            service: ctx.activity().to_string(),
            id: ctx.idempotency_key(),
        })
    }
    async fn cancel(_ctx: ActivityContext, _r: Reservation) -> Result<(), ActivityError> {
        Ok(())
    }
    async fn hotel_first(ctx: Context, req: TripRequest) -> Result<Itinerary, Error> {
        let hotel = ctx.call(&BOOK_HOTEL, &req).await?;
        let car = ctx.call(&RESERVE_CAR, &req).await?;
        let flight = ctx.call(&BOOK_FLIGHT, &req).await?;
        Ok(Itinerary { car, hotel, flight })
    }
    let builder = Worker::builder(store.clone());
    let builder = if changed {
        builder.coordinator(&BOOK_TRIP, hotel_first)
    } else {
        builder.coordinator(&BOOK_TRIP, book_trip)
    };
    builder
        .activity(&RESERVE_CAR, book)
        .activity(&BOOK_HOTEL, book)
        .activity(&BOOK_FLIGHT, book)
        .activity(&CANCEL_CAR, cancel)
        .activity(&CANCEL_HOTEL, cancel)
        .activity(&CANCEL_FLIGHT, cancel)
        .start()
}

fn open(db: &Path) -> SharedStore {
    Arc::new(SqliteStore::open_existing(db).unwrap())
}

/// A minimal well-formedness check: every tag closes in order, attributes are quoted.
fn assert_balanced_xml(text: &str) {
    let mut stack: Vec<String> = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find('<') {
        let end = rest[start..].find('>').expect("unclosed tag") + start;
        let tag = &rest[start + 1..end];
        rest = &rest[end + 1..];
        if tag.starts_with('?') || tag.starts_with('!') {
            continue;
        }
        assert_eq!(
            tag.matches('"').count() % 2,
            0,
            "unbalanced quotes in <{tag}>"
        );
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(
                stack.pop().as_deref(),
                Some(name.trim()),
                "</{name}> closes nothing"
            );
        } else if !tag.ends_with('/') {
            let name = tag.split_whitespace().next().unwrap().to_string();
            stack.push(name);
        }
        assert!(!rest.starts_with('<') || !rest.is_empty());
    }
    assert!(stack.is_empty(), "unclosed: {stack:?}");
    for entity in text.match_indices('&') {
        let after = &text[entity.0..];
        assert!(
            ["&amp;", "&lt;", "&gt;", "&quot;", "&apos;"]
                .iter()
                .any(|e| after.starts_with(e)),
            "a bare & in the SVG: {}",
            &after[..after.len().min(20)]
        );
    }
}

// ----- tests -------------------------------------------------------------------------------

#[test]
fn every_subcommand_has_help_and_errors_are_clear() {
    let dir = TempDir::new("cli-help");
    let missing = dir.file("missing.db");
    for sub in [
        "list",
        "show",
        "export",
        "import",
        "signal",
        "cancel",
        "terminate",
        "resume",
        "fork",
        "timeline",
        "migrate",
    ] {
        let out = retrace(&missing, &[sub, "--help"]).ok();
        assert!(out.contains("Usage: retrace"), "{sub}: {out}");
    }
    // A missing store is an error, and is not created.
    let err = retrace(&missing, &["list"]).fails();
    assert!(err.contains("no such file"), "{err}");
    assert!(!missing.exists(), "the tool must not create a store");
    // A file that is not a store is an error, and is left as it was.
    let text = dir.file("notes.txt");
    std::fs::write(&text, "not a database, just text\n".repeat(100)).unwrap();
    let err = retrace(&text, &["show", "trip-1"]).fails();
    assert!(err.contains("not a Retrace store"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&text).unwrap(),
        "not a database, just text\n".repeat(100)
    );
    let empty = dir.file("empty.db");
    std::fs::write(&empty, "").unwrap();
    let err = retrace(&empty, &["list"]).fails();
    assert!(err.contains("empty"), "{err}");
    // No store named at all.
    let out = Command::new(env!("CARGO_BIN_EXE_retrace"))
        .arg("list")
        .env_remove("RETRACE_DB")
        .output()
        .unwrap();
    let err = finish(out).fails();
    assert!(err.contains("RETRACE_DB"), "{err}");
}

/// A reader that goes away before the output is written (`retrace list | head -0`): the tool
/// stops quietly with success (where `cat` or `ls` die of SIGPIPE), instead of panicking on
/// the closed pipe.
#[test]
fn a_closed_output_pipe_ends_the_tool_quietly() {
    let dir = TempDir::new("cli-pipe");
    let db = completed_store(&dir);
    for args in [&["list"][..], &["show", "trip-1"], &["list", "--json"]] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(env!("CARGO_BIN_EXE_retrace"))
            .arg("--db")
            .arg(&db)
            .args(args)
            .env_remove("RETRACE_DB")
            .stdout(writer)
            .stderr(std::process::Stdio::piped())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(stderr.is_empty(), "{args:?}: {stderr}");
    }
}

#[test]
fn completed_store_lists_shows_and_draws() {
    let dir = TempDir::new("cli-completed");
    let db = completed_store(&dir);

    let table = retrace(&db, &["list"]).ok();
    assert!(table.starts_with("ID"), "{table}");
    for needle in [
        "trip-1",
        "trip-2",
        "book_trip",
        "completed",
        "instance_completed",
    ] {
        assert!(table.contains(needle), "{needle} missing from\n{table}");
    }
    let list = retrace(&db, &["list", "--json"]).json();
    let items = list.as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert!(items.iter().all(|i| i["status"] == "completed"));
    assert!(items
        .iter()
        .all(|i| i["last_event"]["kind"] == "instance_completed"));
    let filtered = retrace(&db, &["list", "--status", "running", "--json"]).json();
    assert_eq!(filtered.as_array().unwrap().len(), 0);
    let limited = retrace(&db, &["list", "--limit", "1", "--json"]).json();
    assert_eq!(limited.as_array().unwrap().len(), 1);

    let show = retrace(&db, &["show", "trip-1"]).ok();
    for needle in [
        "coordinator    book_trip",
        "POS",
        "activity_scheduled",
        "reserve_car",
        "book_hotel",
        "book_flight",
        "instance_completed",
    ] {
        assert!(show.contains(needle), "{needle} missing from\n{show}");
    }
    let shown = retrace(&db, &["show", "trip-1", "--json"]).json();
    let history = open(&db);
    let events = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(history.history("trip-1"))
        .unwrap();
    assert_eq!(shown["events"].as_array().unwrap().len(), events.len());
    assert_eq!(shown["instance"]["status"], "completed");

    let mermaid = retrace(&db, &["timeline", "trip-1", "--format", "mermaid"]).ok();
    assert!(mermaid.starts_with("gantt"), "{mermaid}");
    for lane in ["section run", "section reserve_car", "section book_flight"] {
        assert!(mermaid.contains(lane), "{lane} missing from\n{mermaid}");
    }

    let err = retrace(&db, &["show", "trip-9"]).fails();
    assert!(err.contains("no instance trip-9"), "{err}");
    let err = retrace(&db, &["timeline", "trip-9", "--format", "svg"]).fails();
    assert!(err.contains("no instance trip-9"), "{err}");
    let err = retrace(&db, &["resume", "trip-1"]).fails();
    assert!(err.contains("is completed"), "{err}");
    let err = retrace(&db, &["cancel", "trip-1"]).fails();
    assert!(err.contains("is completed"), "{err}");
    let err = retrace(&db, &["signal", "trip-1", "payment", "{}"]).fails();
    assert!(err.contains("takes no more signals"), "{err}");
}

#[test]
fn flaky_run_draws_a_bar_per_attempt() {
    let dir = TempDir::new("cli-flaky");
    let db = dir.file("flaky.db");
    let out = trips(&db, &["--trips", "3", "--flaky", "0.5"]).ok();
    assert!(out.contains("booked=3"), "{out}");
    let mut retried = 0;
    for id in ["trip-1", "trip-2", "trip-3"] {
        let mermaid = retrace(&db, &["timeline", id, "--format", "mermaid"]).ok();
        // Some call of the run needed several attempts: one bar each, failed ones marked.
        let retried_calls = (0..8)
            .filter(|seq| {
                let bars = mermaid
                    .lines()
                    .filter(|l| l.trim_start().starts_with(&format!("call {seq} attempt ")))
                    .count();
                bars > 1
            })
            .count();
        if retried_calls > 0 {
            retried += 1;
            assert!(mermaid.contains("failed, retry :crit"), "{mermaid}");
            let svg = retrace(&db, &["timeline", id, "--format", "svg"]).ok();
            assert_balanced_xml(&svg);
            assert!(
                svg.contains("attempt 1 failed after"),
                "failed attempts carry their error in a tooltip: {svg}"
            );
            let show = retrace(&db, &["show", id]).ok();
            assert!(show.contains("activity attempts"), "{show}");
            assert!(show.contains("retry"), "{show}");
            let shown = retrace(&db, &["show", id, "--json"]).json();
            assert!(shown["attempts"].as_array().unwrap().len() > 1, "{shown}");
        }
    }
    assert!(retried > 0, "no call of three flaky trips was retried");
}

#[test]
fn compensated_store_shows_errors_in_full_and_draws_compensations() {
    let dir = TempDir::new("cli-compensated");
    let db = compensated_store(&dir);

    let show = retrace(&db, &["show", "trip-1"]).ok();
    assert!(show.contains("status         failed"), "{show}");
    // Errors are shown in full, never cut.
    assert!(
        show.contains(
            "activity book_flight at position 2 failed on attempt 1 (non-retryable): refused: no \
             seats for trip 1"
        ),
        "{show}"
    );
    assert!(show.contains("compensation"), "{show}");
    assert!(show.contains("cancel_hotel"), "{show}");

    let svg = retrace(&db, &["timeline", "trip-1", "--format", "svg"]).ok();
    assert!(svg.starts_with("<?xml"), "{svg}");
    assert!(svg.trim_end().ends_with("</svg>"));
    assert_balanced_xml(&svg);
    for lane in [
        "run",
        "reserve_car",
        "book_hotel",
        "book_flight",
        "cancel_car",
        "cancel_hotel",
    ] {
        assert!(
            svg.contains(&format!("data-lane=\"{lane}\"")),
            "no lane {lane} in the SVG"
        );
    }
    assert!(svg.contains("compensation"));
    assert!(svg.contains("<title>"), "bars carry tooltips");

    let file = dir.file("trip-1.svg");
    retrace(
        &db,
        &[
            "timeline",
            "trip-1",
            "--format",
            "svg",
            "-o",
            file.to_str().unwrap(),
        ],
    )
    .ok();
    assert_eq!(std::fs::read_to_string(&file).unwrap(), svg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_store_lists_running_trips_and_terminate_and_cancel_work() {
    let dir = TempDir::new("cli-crashed");
    let db = crashed_store(&dir);

    let running = retrace(&db, &["list", "--status", "running", "--json"]).json();
    let ids: Vec<&str> = running
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "{running}");

    let svg = retrace(&db, &["timeline", "trip-1", "--format", "svg"]).ok();
    assert_balanced_xml(&svg);
    assert!(
        svg.contains("pending"),
        "a crashed trip has calls without outcome"
    );

    let out = retrace(
        &db,
        &[
            "terminate",
            "trip-3",
            "--reason",
            "customer called",
            "--json",
        ],
    )
    .json();
    assert_eq!(out["status"], "terminated");
    let show = retrace(&db, &["show", "trip-3"]).ok();
    assert!(show.contains("instance_terminated"), "{show}");
    assert!(show.contains("customer called"), "{show}");
    let err = retrace(&db, &["terminate", "trip-3", "--reason", "again"]).fails();
    assert!(err.contains("is terminated"), "{err}");
    let err = retrace(&db, &["terminate", "trip-2"]).fails();
    assert!(err.contains("--reason"), "the reason is required: {err}");

    retrace(&db, &["cancel", "trip-2", "--reason", "changed plans"]).ok();
    let err = retrace(&db, &["signal", "trip-1", "payment", "not json"]).fails();
    assert!(err.contains("not JSON"), "{err}");
    let out = retrace(
        &db,
        &[
            "signal",
            "trip-1",
            "payment",
            r#"{"amount_cents": 100}"#,
            "--once",
            "pay-1",
            "--json",
        ],
    )
    .json();
    assert_eq!(out["accepted"], true);

    // A worker (the example's coordinator, always-successful services) finishes what is left.
    // Whether the cancelled trip compensates or completes depends on where the crash left it
    // (a trip whose remaining awaits are all answered has nothing left to cancel), but the
    // request is delivered into its history either way.
    let store = open(&db);
    let w = worker(&store, false);
    let client = Client::new(store.clone());
    let paid = within("trip-1", client.wait("trip-1")).await.unwrap();
    assert_eq!(paid.status, InstanceStatus::Completed, "{paid:?}");
    let cancelled = within("trip-2", client.wait("trip-2")).await.unwrap();
    assert!(cancelled.status.is_final(), "{cancelled:?}");
    let show = retrace(&db, &["show", "trip-2"]).ok();
    assert!(show.contains("cancel_requested"), "{show}");
    assert!(show.contains("changed plans"), "{show}");
    w.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_stopped_by_nondeterminism_is_shown_then_resumed_after_the_fix() {
    let dir = TempDir::new("cli-nondeterminism");
    let db = dir.file("stopped.db");
    let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/trip_in_flight.json");
    let out = retrace(
        &db,
        &[
            "import",
            golden.to_str().unwrap(),
            "--create",
            "--id",
            "trip-x",
            "--json",
        ],
    )
    .json();
    assert_eq!(out["status"], "running");
    assert_eq!(out["tasks_recreated"], 1, "the unanswered book_hotel call");

    // New code that books the hotel first: the recorded trip cannot replay under it.
    let store = open(&db);
    let client = Client::new(store.clone());
    let changed = worker(&store, true);
    let info = within("stop", client.wait("trip-x")).await.unwrap();
    assert_eq!(info.status, InstanceStatus::Stopped);
    changed.shutdown().await.unwrap();

    let table = retrace(&db, &["list", "--status", "stopped"]).ok();
    assert!(table.contains("trip-x"), "{table}");
    assert!(
        table.contains("RETRACE-ND"),
        "the reason is listed: {table}"
    );
    let show = retrace(&db, &["show", "trip-x"]).ok();
    assert!(show.contains("status         stopped"), "{show}");
    assert!(
        show.contains("history holds activity reserve_car"),
        "{show}"
    );
    assert!(
        show.contains("code requested activity book_hotel"),
        "{show}"
    );

    // The fix: the original code. Resume, pay, and the trip completes.
    let out = retrace(&db, &["resume", "trip-x"]).ok();
    assert!(out.contains("resumed"), "{out}");
    retrace(
        &db,
        &["signal", "trip-x", "payment", r#"{"amount_cents": 1}"#],
    )
    .ok();
    let fixed = worker(&store, false);
    let info = within("complete", client.wait("trip-x")).await.unwrap();
    assert_eq!(info.status, InstanceStatus::Completed, "{info:?}");
    fixed.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_completes_and_the_original_is_untouched() {
    let dir = TempDir::new("cli-fork");
    let db = compensated_store(&dir);
    let original = retrace(&db, &["export", "trip-1"]).ok();
    let shown = retrace(&db, &["show", "trip-1", "--json"]).json();
    // Re-run from the refused flight: cut where its outcome was delivered.
    let failed_at = shown["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "activity_failed")
        .unwrap()["position"]
        .as_u64()
        .unwrap();
    let at = failed_at.to_string();
    let out = retrace(
        &db,
        &[
            "fork", "trip-1", "--at", &at, "--new-id", "trip-1b", "--json",
        ],
    )
    .json();
    assert_eq!(out["instance_id"], "trip-1b");
    assert!(out["kept_events"].as_u64().unwrap() <= failed_at);
    assert_eq!(
        out["tasks_recreated"], 1,
        "the flight is booked again: {out}"
    );
    let err = retrace(&db, &["fork", "trip-1", "--at", &at, "--new-id", "trip-1b"]).fails();
    assert!(err.contains("already exists"), "{err}");
    let err = retrace(
        &db,
        &["fork", "trip-1", "--at", "999", "--new-id", "trip-1c"],
    )
    .fails();
    assert!(err.contains("past the end"), "{err}");
    // An id whose idempotency keys another instance's later run could share is refused.
    let err = retrace(
        &db,
        &["fork", "trip-1", "--at", &at, "--new-id", "trip-1@2"],
    )
    .fails();
    assert!(err.contains("cannot be an instance id"), "{err}");

    // Pay before a worker runs: the copied prefix may hold the original's payment already, and
    // then the fork would complete before a later signal could arrive.
    retrace(
        &db,
        &["signal", "trip-1b", "payment", r#"{"amount_cents": 1}"#],
    )
    .ok();
    let store = open(&db);
    let w = worker(&store, false);
    let client = Client::new(store.clone());
    let handle = client.handle(&BOOK_TRIP, "trip-1b");
    let itinerary = within("fork", handle.result()).await.unwrap();
    assert_eq!(
        itinerary.flight.id, "trip-1b/2",
        "the fork booked its own flight"
    );
    assert_eq!(
        itinerary.car.id, "trip-1/0",
        "the car comes from the copied history"
    );
    w.shutdown().await.unwrap();

    assert_eq!(
        retrace(&db, &["export", "trip-1"]).ok(),
        original,
        "the original is untouched"
    );
}

#[test]
fn export_and_import_round_trip_between_stores() {
    let dir = TempDir::new("cli-export");
    let db = compensated_store(&dir);
    let file = dir.file("trip-1.json");
    retrace(&db, &["export", "trip-1", "-o", file.to_str().unwrap()]).ok();
    let exported: Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(exported["format"], "retrace-history");
    assert_eq!(exported["version"], retrace::sdk::HISTORY_FORMAT_VERSION);
    assert_eq!(exported["instance"]["status"], "failed");

    let other = dir.file("other.db");
    let err = retrace(&other, &["import", file.to_str().unwrap()]).fails();
    assert!(
        err.contains("no such file"),
        "import needs --create for a new store: {err}"
    );
    let out = retrace(&other, &["import", file.to_str().unwrap(), "--create"]).ok();
    assert!(out.contains("imported trip-1 as trip-1: failed"), "{out}");
    let again: Value = serde_json::from_str(&retrace(&other, &["export", "trip-1"]).ok()).unwrap();
    assert_eq!(again["events"], exported["events"]);
    assert_eq!(again["instance"]["error"], exported["instance"]["error"]);
    let err = retrace(&other, &["import", file.to_str().unwrap()]).fails();
    assert!(err.contains("already exists"), "{err}");

    // An export whose own id could not name a new instance (one ending in `@` and digits, as
    // an older Retrace allowed) is imported only under an id given with --id.
    let mut old_id = exported.clone();
    old_id["instance"]["id"] = Value::from("trip@7");
    let old_file = dir.file("trip@7.json");
    std::fs::write(&old_file, old_id.to_string()).unwrap();
    let err = retrace(&other, &["import", old_file.to_str().unwrap()]).fails();
    assert!(
        err.contains("cannot name a new instance") && err.contains("--id"),
        "{err}"
    );
    let out = retrace(
        &other,
        &["import", old_file.to_str().unwrap(), "--id", "trip-7"],
    )
    .ok();
    assert!(out.contains("imported trip@7 as trip-7: failed"), "{out}");

    let bogus = dir.file("bogus.json");
    std::fs::write(&bogus, r#"{"hello": "world"}"#).unwrap();
    let err = retrace(&other, &["import", bogus.to_str().unwrap()]).fails();
    assert!(err.contains("not a Retrace history export"), "{err}");
}

#[test]
fn migrate_refuses_sources_and_targets_it_cannot_use_and_touches_nothing() {
    let dir = TempDir::new("cli-migrate-refuse");
    let db = completed_store(&dir);
    let db_url = format!("sqlite://{}", db.display());

    // The target must be PostgreSQL; an SQLite target is refused and not created.
    let other = dir.file("other.db");
    let err = retrace_bare(&[
        "migrate",
        "--from",
        &db_url,
        "--to",
        other.to_str().unwrap(),
    ])
    .fails();
    assert!(err.contains("must be a PostgreSQL store"), "{err}");
    assert!(!other.exists(), "an SQLite target is not created");

    // A missing or foreign source is refused before the target is even contacted (port 1
    // answers nothing: reaching it would be a connection error instead).
    let nowhere = "postgres://postgres@127.0.0.1:1/nothing?schema=never";
    let missing = dir.file("missing.db");
    let err = retrace_bare(&[
        "migrate",
        "--from",
        missing.to_str().unwrap(),
        "--to",
        nowhere,
    ])
    .fails();
    assert!(err.contains("no such file"), "{err}");
    assert!(!missing.exists(), "the source is not created");
    let text = dir.file("notes.txt");
    std::fs::write(&text, "not a database\n".repeat(100)).unwrap();
    let err = retrace_bare(&["migrate", "--from", text.to_str().unwrap(), "--to", nowhere]).fails();
    assert!(err.contains("not a Retrace store"), "{err}");
    let err = retrace_bare(&["migrate", "--from", "mysql://h/db", "--to", nowhere]).fails();
    assert!(err.contains("unknown store scheme"), "{err}");

    // Both stores are required.
    let err = retrace_bare(&["migrate", "--from", &db_url]).fails();
    assert!(err.contains("--to"), "{err}");

    // A worker of another process (of the previous schema) runs on the source, idle (no
    // lease): refused, since it would go on with the source after the copy; and the source is
    // not upgraded under it.
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("DROP INDEX instances_parent; PRAGMA user_version = 7;")
        .unwrap();
    let workers = PathBuf::from(format!("{}.workers", db.display()));
    std::fs::create_dir_all(&workers).unwrap();
    let lock = std::fs::File::create(workers.join("idle-worker.lock")).unwrap();
    lock.try_lock().unwrap();
    let err = retrace_bare(&["migrate", "--from", &db_url, "--to", nowhere]).fails();
    assert!(err.contains("running worker"), "{err}");
    let version: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, 7, "the source was upgraded");
    drop(lock);
}

/// Every event of `id` in `store`, as JSON values.
async fn history_json(store: &SharedStore, id: &str) -> Vec<Value> {
    store
        .history(id)
        .await
        .unwrap()
        .iter()
        .map(|e| serde_json::to_value(e).unwrap())
        .collect()
}

/// Fails when a call position of `id` has two outcomes.
async fn assert_one_outcome_per_call(store: &SharedStore, id: &str) {
    let mut outcomes = std::collections::HashSet::new();
    for e in store.history(id).await.unwrap() {
        let seq = match e.event {
            Event::ActivityCompleted { seq, .. } | Event::ActivityFailed { seq, .. } => seq,
            _ => continue,
        };
        assert!(outcomes.insert(seq), "{id}: call {seq} has two outcomes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_moves_a_crashed_sqlite_store_to_postgres_and_a_rerun_duplicates_nothing() {
    let Some(schema) = pg::PgSchema::new(
        "retrace_cli",
        "cli: migrate_moves_a_crashed_sqlite_store_to_postgres_and_a_rerun_duplicates_nothing",
    ) else {
        return;
    };
    let dir = TempDir::new("cli-migrate");
    let db = crashed_store(&dir);
    let from = db.to_str().unwrap();
    let to = schema.url();

    // The crashed worker's leases are handed over (its lock file says it is dead); then a
    // worker of ours holds a live lease on a new trip: the migration must refuse.
    let source = open(&db);
    source.reap_dead_workers().await.unwrap();
    let client = Client::new(source.clone());
    let request = TripRequest {
        trip: 9,
        traveller: "traveller-9".into(),
        payment_timeout_ms: 60_000,
    };
    client.start(&BOOK_TRIP, "trip-9", &request).await.unwrap();
    let claimed = source
        .claim_ready("cli-test-holder", &["book_trip".to_string()], 10, 60_000)
        .await
        .unwrap();
    assert!(claimed.contains(&"trip-9".to_string()), "{claimed:?}");
    let err = retrace_bare(&["migrate", "--from", from, "--to", &to]).fails();
    assert!(err.contains("live lease"), "{err}");
    let listed = retrace(Path::new(&to), &["list", "--json"]).json();
    assert_eq!(listed, serde_json::json!([]), "nothing was copied");

    // Once the leases are released, everything is copied, once.
    source.release_leases("cli-test-holder").await.unwrap();
    let ids: Vec<String> = source
        .list_instances(&ListFilter::default())
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    assert_eq!(ids.len(), 4, "{ids:?}");
    let mut before = Vec::new();
    for id in &ids {
        before.push(history_json(&source, id).await);
    }
    let out = retrace_bare(&["migrate", "--from", from, "--to", &to]).ok();
    assert!(out.contains("4 instance(s) copied"), "{out}");
    assert!(out.contains("0 already there"), "{out}");
    let report = retrace_bare(&["migrate", "--from", from, "--to", &to, "--json"]).json();
    assert_eq!(report["copied"], 0, "a re-run copies nothing: {report}");
    assert_eq!(report["already_there"], 4, "{report}");
    assert_eq!(report["events"], 0, "{report}");
    assert_eq!(report["different"], serde_json::json!([]), "{report}");

    // The CLI reads the PostgreSQL store like the SQLite one: same instances, same exports.
    for id in &ids {
        let sqlite: Value = serde_json::from_str(&retrace(&db, &["export", id]).ok()).unwrap();
        let postgres: Value =
            serde_json::from_str(&retrace(Path::new(&to), &["export", id]).ok()).unwrap();
        assert_eq!(postgres, sqlite, "{id}: the copy is the original");
    }
    let running = retrace(Path::new(&to), &["list", "--status", "running", "--json"]).json();
    assert_eq!(running.as_array().unwrap().len(), 4, "{running}");
    drop(client);
    drop(source);

    // A worker on PostgreSQL finishes every trip from where it was: the copied history is a
    // prefix of the final one, and no call has two outcomes.
    let target = retrace::open_store(&to).await.unwrap();
    let w = worker(&target, false);
    let client = Client::new(target.clone());
    for id in &ids {
        let payment = Payment { amount_cents: 1 };
        // A trip whose copied inbox held the original's payment may have completed already.
        match client
            .signal_once(id, "payment", &payment, &format!("pay-{id}"))
            .await
        {
            Ok(_) | Err(ClientError::Ended { .. }) => {}
            Err(e) => panic!("{id}: {e}"),
        }
    }
    for (id, before) in ids.iter().zip(&before) {
        let info = within(id, client.wait(id)).await.unwrap();
        assert_eq!(info.status, InstanceStatus::Completed, "{info:?}");
        let after = history_json(&target, id).await;
        assert_eq!(
            &after[..before.len()],
            &before[..],
            "{id}: history rewritten"
        );
        assert_one_outcome_per_call(&target, id).await;
    }
    w.shutdown().await.unwrap();

    // The target moved on: a third run overwrites nothing and says which instances differ.
    let err = retrace_bare(&["migrate", "--from", from, "--to", &to]).fails();
    assert!(err.contains("4 instance(s) exist"), "{err}");
    assert!(err.contains("left alone"), "{err}");
    // The same with nobody reading the report: the failure still shows.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_retrace"))
        .args(["migrate", "--from", from, "--to", &to])
        .env_remove("RETRACE_DB")
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("left alone"), "{stderr}");
    for id in &ids {
        assert_eq!(
            target.describe(id).await.unwrap().unwrap().status,
            InstanceStatus::Completed
        );
    }
    drop(client);
    drop(target);

    // `--db` never creates a store: a schema that does not exist stays so.
    let missing = format!("{}_missing", schema.name());
    let err = retrace(Path::new(&schema.url_of(&missing)), &["list"]).fails();
    assert!(err.contains("does not exist"), "{err}");
    assert!(
        !schema.exists(&missing),
        "the tool must not create a schema"
    );
}
