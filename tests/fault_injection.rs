//! Crash safety under load: several worker processes run the trip example on one store while
//! random ones are SIGKILLed and restarted. At the end every trip is booked or compensated
//! exactly once, no call position has two outcomes, compensations ran only for steps that
//! succeeded, the simulated services hold reservations exactly for booked trips, and the SQLite
//! databases (the store, when it is SQLite, and the services) pass `PRAGMA integrity_check`.
//!
//! It runs on an SQLite store and, when `RETRACE_PG_URL` names a server (`.ci/run` sets it), on a
//! PostgreSQL store in a schema of its own (`retrace_fault_<random>`, dropped at the end whatever
//! the outcome). Without `RETRACE_PG_URL` the PostgreSQL variant says on stderr that it was not
//! run and why. Both variants check the store through the public `Store` API (`list_instances`,
//! `history`), with the same code; they run one after the other, not to starve each other.
//!
//! Small by default so that CI stays fast. A long run:
//! `RETRACE_FAULT_KILLS=200 RETRACE_FAULT_TRIPS=2000 cargo test --release --test fault_injection`.
//! A failing schedule is reproduced with `RETRACE_FAULT_SEED=<seed printed by the failure>`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "common/pg.rs"]
mod pg;

use retrace::{Event, InstanceStatus, ListFilter, StoreUrl};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The trip example, built by `cargo test` beside this test binary.
fn trip_example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .to_path_buf();
    let path = profile_dir.join("examples").join("trip_booking");
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--example", "trip_booking"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        assert!(
            cmd.status().unwrap().success(),
            "building the trip example failed"
        );
    }
    path
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

struct Fleet {
    exe: PathBuf,
    args: Vec<String>,
    children: Vec<Child>,
}

impl Fleet {
    fn spawn(&self) -> Child {
        Command::new(&self.exe)
            .args(&self.args)
            .stdout(Stdio::piped())
            // Little is written there (no RUST_LOG): only why a process failed, if it did.
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The test's folder, removed on drop whatever the outcome.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the store holds at the end: each instance's id, status and history.
type Instances = Vec<(String, InstanceStatus, Vec<Event>)>;

/// Reads every instance and its history through the public `Store` API.
fn read_store(url: &str) -> Instances {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = StoreUrl::parse(url).unwrap().open_existing().await.unwrap();
        let mut out = Vec::new();
        for info in store.list_instances(&ListFilter::default()).await.unwrap() {
            let history = store.history(&info.id).await.unwrap();
            let events = history.into_iter().map(|e| e.event).collect();
            out.push((info.id, info.status, events));
        }
        out
    })
}

fn integrity_check(path: &Path) {
    let db = rusqlite::Connection::open(path).unwrap();
    let integrity: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(integrity, "ok", "{}", path.display());
}

/// One variant at a time: each starts several worker processes, and the machine may be small.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn workers_killed_at_random_lose_nothing_and_apply_nothing_twice() {
    run_fault_injection(None);
}

#[test]
fn workers_killed_at_random_lose_nothing_and_apply_nothing_twice_on_postgres() {
    let Some(schema) = pg::PgSchema::new(
        "retrace_fault",
        "fault_injection: the PostgreSQL variant \
         (workers_killed_at_random_lose_nothing_and_apply_nothing_twice_on_postgres)",
    ) else {
        return;
    };
    run_fault_injection(Some(&schema));
}

/// Runs the trip example's worker processes on an SQLite store in a fresh folder, or on the
/// PostgreSQL schema `pg`, SIGKILLs random ones, and checks the invariants.
fn run_fault_injection(pg: Option<&pg::PgSchema>) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let backend = if pg.is_some() { "postgres" } else { "sqlite" };
    let seed = env_or("RETRACE_FAULT_SEED", {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        t.as_nanos() as u64 | 1
    });
    let kills = env_or("RETRACE_FAULT_KILLS", 8);
    let trips = env_or("RETRACE_FAULT_TRIPS", 150);
    let workers = env_or("RETRACE_FAULT_WORKERS", 3) as usize;
    let mut rng = Rng(seed);
    let dir = TempDir(std::env::temp_dir().join(format!(
        "retrace-fault-{backend}-{}-{seed}",
        std::process::id()
    )));
    let _ = std::fs::remove_dir_all(&dir.0);
    std::fs::create_dir_all(&dir.0).unwrap();
    let db = dir.0.join("trips.db");
    let (store_url, services_db) = match pg {
        None => (
            db.to_str().unwrap().to_string(),
            dir.0.join("trips.db.services"),
        ),
        Some(schema) => (schema.url(), dir.0.join("trips.services")),
    };
    let mut args: Vec<String> = [
        "--db",
        &store_url,
        "--trips",
        &trips.to_string(),
        "--fail-every",
        "5",
        "--flaky",
        "0.2",
        "--unpaid-every",
        "7",
        "--payment-timeout",
        "0.5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if pg.is_some() {
        args.extend([
            "--services".to_string(),
            services_db.to_str().unwrap().to_string(),
        ]);
    }
    let mut fleet = Fleet {
        exe: trip_example(),
        args,
        children: Vec::new(),
    };
    for _ in 0..workers {
        let c = fleet.spawn();
        fleet.children.push(c);
    }
    let context =
        format!("{backend}, seed {seed} (RETRACE_FAULT_SEED={seed} reproduces the schedule)");

    // The fault schedule: SIGKILL a random worker process at random times and start a new one.
    let mut survived = 0;
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(50 + rng.below(250)));
        let victim = rng.below(workers as u64) as usize;
        let child = &mut fleet.children[victim];
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL: no cleanup, no lease hand-back
            child.wait().unwrap();
            survived += 1;
        }
        fleet.children[victim] = fleet.spawn();
    }

    // Every process waits for every trip, then prints the summary and exits.
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut summaries = Vec::new();
    for child in &mut fleet.children {
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut why = String::new();
                if !status.success() {
                    let _ = std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut why);
                }
                assert!(
                    status.success(),
                    "a worker process failed: {status}: {why}; {context}"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "workers did not finish; {context}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut out = String::new();
        std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
        summaries.push(out.lines().last().unwrap_or_default().to_string());
    }
    let summary = summaries.last().unwrap().clone();
    let fields: HashMap<&str, u64> = summary
        .split_whitespace()
        .skip(1)
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k, v.parse().unwrap()))
        .collect();
    assert_eq!(fields["trips"], trips, "{summary}");
    assert_eq!(
        fields["booked"] + fields["compensated"],
        trips,
        "{summary}; {context}"
    );
    for service in ["live_car", "live_hotel", "live_flight"] {
        assert_eq!(
            fields[service], fields["booked"],
            "{service}: {summary}; {context}"
        );
    }

    if pg.is_none() {
        integrity_check(&db);
    }
    let instances = read_store(&store_url);
    assert_eq!(
        instances.len() as u64,
        trips,
        "one instance per trip; {context}"
    );
    let unfinished: Vec<_> = instances
        .iter()
        .filter(|(_, status, _)| {
            !matches!(status, InstanceStatus::Completed | InstanceStatus::Failed)
        })
        .map(|(id, status, _)| format!("{id} ({status})"))
        .collect();
    assert!(
        unfinished.is_empty(),
        "unfinished: {unfinished:?}; {context}"
    );

    // Per trip history: one outcome per call position, compensations only for steps that
    // succeeded, and at most once each.
    let mut cancels: Vec<(String, String)> = Vec::new();
    for (id, _, history) in &instances {
        let mut scheduled: HashMap<u32, String> = HashMap::new();
        let mut outcomes: HashSet<u32> = HashSet::new();
        let mut succeeded: HashSet<&str> = HashSet::new();
        for event in history {
            match event {
                Event::ActivityScheduled { seq, name, .. } => {
                    if let Some(step) = name.strip_prefix("cancel_") {
                        assert!(
                            succeeded.contains(step),
                            "{id} cancelled {step} it never booked; {context}"
                        );
                        cancels.push((id.clone(), step.to_string()));
                    }
                    scheduled.insert(*seq, name.clone());
                }
                Event::ActivityCompleted { seq, .. } | Event::ActivityFailed { seq, .. } => {
                    assert!(
                        outcomes.insert(*seq),
                        "{id}: call position {seq} has two outcomes; {context}"
                    );
                    if matches!(event, Event::ActivityFailed { .. }) {
                        continue;
                    }
                    match scheduled.get(seq).map(String::as_str) {
                        Some("reserve_car") => succeeded.insert("car"),
                        Some("book_hotel") => succeeded.insert("hotel"),
                        Some("book_flight") => succeeded.insert("flight"),
                        Some(_) => continue,
                        None => panic!("{id}: outcome of unscheduled call {seq}; {context}"),
                    };
                }
                _ => {}
            }
        }
    }
    let unique_cancels: HashSet<_> = cancels.iter().collect();
    assert_eq!(
        unique_cancels.len(),
        cancels.len(),
        "a step was compensated twice; {context}"
    );

    // The services hold live reservations exactly for the booked trips.
    integrity_check(&services_db);
    let services = rusqlite::Connection::open(&services_db).unwrap();
    let mut stmt = services
        .prepare("SELECT trip, count(*) FROM reservations WHERE status = 'live' GROUP BY trip")
        .unwrap();
    let live: HashMap<i64, i64> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (id, status, _) in &instances {
        let trip: i64 = id.trim_start_matches("trip-").parse().unwrap();
        let expected = if *status == InstanceStatus::Completed {
            3
        } else {
            0
        };
        assert_eq!(
            live.get(&trip).copied().unwrap_or(0),
            expected,
            "{id} ({status}); {context}"
        );
    }
    eprintln!("fault injection: {workers} worker processes, {trips} trips, survived {survived} SIGKILLs; {context}");
    drop(fleet);
}
