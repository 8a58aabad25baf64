//! Crash safety under load: several worker processes run the trip example on one store while
//! random ones are SIGKILLed and restarted. At the end every trip is booked or compensated
//! exactly once, no call position has two outcomes, compensations ran only for steps that
//! succeeded, the simulated services hold reservations exactly for booked trips, and both
//! databases pass `PRAGMA integrity_check`.
//!
//! Small by default so that CI stays fast. A long run:
//! `RETRACE_FAULT_KILLS=200 RETRACE_FAULT_TRIPS=2000 cargo test --release --test fault_injection`.
//! A failing schedule is reproduced with `RETRACE_FAULT_SEED=<seed printed by the failure>`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
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
            .stderr(Stdio::null())
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

#[test]
fn workers_killed_at_random_lose_nothing_and_apply_nothing_twice() {
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
    let dir = std::env::temp_dir().join(format!("retrace-fault-{}-{seed}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("trips.db");
    let args: Vec<String> = [
        "--db",
        db.to_str().unwrap(),
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
    let mut fleet = Fleet {
        exe: trip_example(),
        args,
        children: Vec::new(),
    };
    for _ in 0..workers {
        let c = fleet.spawn();
        fleet.children.push(c);
    }
    let context = format!("seed {seed} (RETRACE_FAULT_SEED={seed} reproduces the schedule)");

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
                assert!(
                    status.success(),
                    "a worker process failed: {status}; {context}"
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

    let store = rusqlite::Connection::open(&db).unwrap();
    let integrity: String = store
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");
    let unfinished: i64 = store
        .query_row(
            "SELECT count(*) FROM instances WHERE status NOT IN ('completed', 'failed')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(unfinished, 0, "{context}");
    let doubled: i64 = store
        .query_row(
            "SELECT count(*) FROM (SELECT instance_id, json_extract(body, '$.seq') AS seq
             FROM events WHERE kind IN ('activity_completed', 'activity_failed')
             GROUP BY 1, 2 HAVING count(*) > 1)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(doubled, 0, "call positions with two outcomes; {context}");

    // Compensations only for steps that succeeded, per trip history.
    let mut stmt = store
        .prepare("SELECT instance_id, kind, body FROM events ORDER BY instance_id, pos")
        .unwrap();
    let rows: Vec<(String, String, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut scheduled: HashMap<(String, u64), String> = HashMap::new();
    let mut succeeded: HashSet<(String, String)> = HashSet::new();
    let mut cancels: Vec<(String, String)> = Vec::new();
    for (id, kind, body) in &rows {
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        let seq = v["seq"].as_u64().unwrap_or(u64::MAX);
        match kind.as_str() {
            "activity_scheduled" => {
                let name = v["name"].as_str().unwrap().to_string();
                if let Some(step) = name.strip_prefix("cancel_") {
                    cancels.push((id.clone(), step.to_string()));
                }
                scheduled.insert((id.clone(), seq), name);
            }
            "activity_completed" => {
                let name = scheduled[&(id.clone(), seq)].clone();
                let step = match name.as_str() {
                    "reserve_car" => "car",
                    "book_hotel" => "hotel",
                    "book_flight" => "flight",
                    _ => continue,
                };
                succeeded.insert((id.clone(), step.to_string()));
            }
            _ => {}
        }
    }
    for (id, step) in &cancels {
        assert!(
            succeeded.contains(&(id.clone(), step.clone())),
            "{id} cancelled {step} it never booked; {context}"
        );
    }
    let unique_cancels: HashSet<_> = cancels.iter().collect();
    assert_eq!(
        unique_cancels.len(),
        cancels.len(),
        "a step was compensated twice; {context}"
    );

    // The services hold live reservations exactly for the booked trips.
    let services = rusqlite::Connection::open(dir.join("trips.db.services")).unwrap();
    let integrity: String = services
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");
    let mut stmt = services
        .prepare("SELECT trip, count(*) FROM reservations WHERE status = 'live' GROUP BY trip")
        .unwrap();
    let live: HashMap<i64, i64> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut stmt = store.prepare("SELECT id, status FROM instances").unwrap();
    let statuses: Vec<(String, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for (id, status) in statuses {
        let trip: i64 = id.trim_start_matches("trip-").parse().unwrap();
        let expected = if status == "completed" { 3 } else { 0 };
        assert_eq!(
            live.get(&trip).copied().unwrap_or(0),
            expected,
            "{id} ({status}); {context}"
        );
    }
    eprintln!("fault injection: {workers} worker processes, {trips} trips, survived {survived} SIGKILLs; {context}");
    drop(fleet);
    let _ = std::fs::remove_dir_all(&dir);
}
