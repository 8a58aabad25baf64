//! The standard benchmark of `shared/BENCH.md`: every workload against a fresh SQLite file, and
//! W1 to W4 also against PostgreSQL.
//!
//! ```text
//! cargo run --release --example bench -- <W1|W2|W3|W4|W5|W6|baseline|all> [--db PATH]
//!     [--store URL] [--durability full|normal]
//! ```
//!
//! - `--db PATH`: the database file of a single workload, or the prefix of one file per workload
//!   (`PATH.W1`, `PATH.W2`…) with `all`. Any file already there is **replaced** (with its `-wal`
//!   and `-shm`). Without it, files go to a temporary directory removed at the end.
//! - `--durability`: `full` (the default: WAL, `synchronous=FULL`) or `normal`. Every workload
//!   prints the setting it used on the line before its result line.
//! - `--store URL`: `sqlite://PATH` (the same as `--db PATH`) or `postgres://user@host:port/db`.
//!   With PostgreSQL, W1 to W4 each run in a fresh schema `retrace_bench_<workload>_<random>`
//!   (the URL must not name one), dropped at the end; the other workloads are SQLite-only and are
//!   skipped. The line before each result line starts with `store=sqlite` or `store=postgres`.
//!
//! Each workload prints its result line last, in exactly the form `BENCH.md` gives; `all` runs
//! `baseline` first, then W1 to W6, in one invocation, and writes a ratio summary to stderr.
//! Between two workloads `all` waits [`SETTLE`], so that one workload's file cleanup does not
//! land in the next one's figures (see BENCHMARKS.md, "How to reproduce").
//!
//! Activities are no-ops returning their input plus one, run by the same process. W4 and W5 run
//! their workers in child processes (this binary re-executed with a hidden subcommand): W4
//! because it kills one with SIGKILL, W5 so that its resident memory is that of a process that
//! ran nothing else.

use futures::future::join_all;
use retrace::prelude::*;
use retrace::runtime::ExecutionFactory;
use retrace::sdk::{coordinator_fn, Execution};
use retrace::{
    CommitNotice, Durability, Event, InstanceStatus, ListFilter, PostgresStore, SqliteOptions,
    Store, StoreUrl,
};
use rusqlite::Connection;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;

// ----- the coordinators and the activity -------------------------------------------------------

const ADD_ONE: Activity<u64, u64> = Activity::new("add_one");
/// `n` activities one after another, each fed the previous output.
const STEPS: Coordinator<u32, u64> = Coordinator::new("steps");
/// `n` activities at once, joined.
const FAN_OUT: Coordinator<u32, u64> = Coordinator::new("fan_out");
/// Waits for the signal `go`, which never comes.
const WAITER: Coordinator<(), u64> = Coordinator::new("waiter");

async fn add_one(_ctx: ActivityContext, n: u64) -> Result<u64, ActivityError> {
    Ok(n + 1)
}

async fn steps(ctx: Context, n: u32) -> Result<u64, Error> {
    let mut value = 0u64;
    for _ in 0..n {
        value = ctx.call(&ADD_ONE, &value).await?;
    }
    Ok(value)
}

async fn fan_out(ctx: Context, n: u32) -> Result<u64, Error> {
    let calls = (0..u64::from(n)).map(|i| ctx.call(&ADD_ONE, &i));
    let mut sum = 0u64;
    for result in join_all(calls).await {
        sum += result?;
    }
    Ok(sum)
}

async fn waiter(ctx: Context, _input: ()) -> Result<u64, Error> {
    ctx.signal::<u64>("go").await
}

// ----- options ---------------------------------------------------------------------------------

/// The pause between two workloads of `all`. Closing a store's last connection makes SQLite
/// checkpoint and delete its WAL, and the kernel's work for that (on this project's machines,
/// ext4 mounted with online `discard` turns the deletion into TRIM requests) went on into the
/// next workload: W1 right after the baseline ran at ~190,000 steps/s against ~240,000 with the
/// baseline's connection left open, and a pause of 100 ms was enough.
const SETTLE: Duration = Duration::from_millis(250);

const USAGE: &str = "usage: bench <W1|W2|W3|W4|W5|W6|baseline|all> [--activities N] [--db PATH] \
                     [--store sqlite://PATH|postgres://…] [--durability full|normal] \
                     [--lease-secs N (W1, W2, W3 only)]";

#[derive(Clone)]
struct Options {
    workload: String,
    /// The `--db` argument, if any.
    db: Option<PathBuf>,
    /// Where files go without `--db`.
    scratch: PathBuf,
    /// The `--store postgres://…` argument, if any.
    pg: Option<String>,
    durability: Durability,
    /// Sequential activities of the W6 instance (10,000 per BENCH.md; more shows there is no
    /// history cap).
    w6_activities: u32,
    /// The workers' lease, when not the default: under valgrind (instruction counts), a run is
    /// ~50 times slower, and leases of the default length lapse and are taken over mid-run.
    lease: Option<Duration>,
}

impl Options {
    fn parse() -> Res<Options> {
        let mut args = std::env::args().skip(1);
        let mut workload = None;
        let mut db = None;
        let mut pg = None;
        let mut durability = Durability::Full;
        let mut w6_activities = 10_000u32;
        let mut lease = None;
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--activities" => {
                    w6_activities = args.next().ok_or(USAGE)?.parse().map_err(|_| USAGE)?
                }
                "--db" => db = Some(PathBuf::from(args.next().ok_or(USAGE)?)),
                "--store" => {
                    let url = args.next().ok_or(USAGE)?;
                    match StoreUrl::parse(&url)? {
                        StoreUrl::Sqlite(path) => db = Some(path),
                        StoreUrl::Postgres(url) => pg = Some(url),
                        _ => {
                            return Err(
                                "the benchmark needs a file or a server, not :memory:".into()
                            )
                        }
                    }
                }
                "--durability" => {
                    durability = match args.next().as_deref() {
                        Some("full" | "FULL") => Durability::Full,
                        Some("normal" | "NORMAL") => Durability::Normal,
                        _ => return Err(USAGE.into()),
                    }
                }
                "--lease-secs" => {
                    let secs: u64 = args.next().ok_or(USAGE)?.parse().map_err(|_| USAGE)?;
                    lease = Some(Duration::from_secs(secs.max(1)));
                }
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                other if workload.is_none() => workload = Some(other.to_string()),
                _ => return Err(USAGE.into()),
            }
        }
        let workload = workload.ok_or(USAGE)?;
        // W4 waits out a killed process's leases, and W6 restarts its worker mid-run.
        if lease.is_some() && !matches!(workload.as_str(), "W1" | "W2" | "W3") {
            return Err("--lease-secs applies to W1, W2 and W3 only".into());
        }
        let scratch = std::env::temp_dir().join(format!("retrace-bench-{}", std::process::id()));
        Ok(Options {
            workload,
            db,
            scratch,
            pg,
            durability,
            w6_activities,
            lease,
        })
    }

    /// A fresh store for `workload`: a fresh SQLite file, or with `--store postgres://…` a new
    /// schema, dropped when the returned guard is.
    fn fresh_place(&self, workload: &str, all: bool) -> Res<(Place, Option<PgSchema>)> {
        let Some(url) = &self.pg else {
            return Ok((Place::Sqlite(self.fresh_db(workload, all)?), None));
        };
        let (server, query) = url.split_once('?').unwrap_or((url, ""));
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            match pair.split_once('=').map_or(pair, |(k, _)| k) {
                "schema" => return Err("--store: the benchmark picks its own schema".into()),
                "pool_size" => {}
                _ => kept.push(pair),
            }
        }
        let server = match kept.is_empty() {
            true => server.to_string(),
            false => format!("{server}?{}", kept.join("&")),
        };
        let name = format!(
            "retrace_bench_{}_{:016x}",
            workload.to_lowercase(),
            std::hash::BuildHasher::hash_one(
                &std::collections::hash_map::RandomState::new(),
                (std::process::id(), Instant::now()),
            )
        );
        let sep = if url.contains('?') { '&' } else { '?' };
        let place = Place::Postgres(format!("{url}{sep}schema={name}"));
        Ok((place, Some(PgSchema { server, name })))
    }

    /// Opens the store of `place`: as a shared store, and as the SQLite store it is, if it is.
    async fn open_place(&self, place: &Place) -> Res<(SharedStore, Option<Arc<SqliteStore>>)> {
        Ok(match place {
            Place::Sqlite(path) => {
                let store = self.open_store(path)?;
                (store.clone(), Some(store))
            }
            Place::Postgres(url) => (Arc::new(PostgresStore::connect(url).await?), None),
        })
    }

    /// Closes an SQLite store and removes its scratch file; a PostgreSQL schema goes with its
    /// guard.
    fn finish_place(&self, sqlite: Option<Arc<SqliteStore>>, place: &Place) -> Res<()> {
        match (sqlite, place) {
            (Some(store), Place::Sqlite(path)) => finish_db(self, store, path),
            _ => Ok(()),
        }
    }

    /// The store of a child process: `--db PATH` or `--store postgres://…?schema=…`.
    fn child_place(&self) -> Res<Place> {
        match (&self.pg, &self.db) {
            (Some(url), _) => Ok(Place::Postgres(url.clone())),
            (None, Some(path)) => Ok(Place::Sqlite(path.clone())),
            (None, None) => Err("--db or --store is required".into()),
        }
    }

    /// With `--store postgres://…`, says that `workload` is SQLite-only: the caller skips it.
    fn sqlite_only(&self, workload: &str) -> bool {
        if self.pg.is_some() {
            println!("{workload} is SQLite-only: skipped with --store postgres://");
        }
        self.pg.is_some()
    }

    /// A fresh database file for `workload`: nothing of an earlier run is left at that path.
    fn fresh_db(&self, workload: &str, all: bool) -> Res<PathBuf> {
        let path = match &self.db {
            Some(p) if all => PathBuf::from(format!("{}.{workload}", p.display())),
            Some(p) => p.clone(),
            None => {
                std::fs::create_dir_all(&self.scratch)?;
                self.scratch.join(format!("{workload}.sqlite"))
            }
        };
        remove_db(&path)?;
        Ok(path)
    }

    fn durability_name(&self) -> &'static str {
        match self.durability {
            Durability::Full => "FULL",
            _ => "NORMAL",
        }
    }

    fn durability_arg(&self) -> &'static str {
        match self.durability {
            Durability::Full => "full",
            _ => "normal",
        }
    }

    fn open_store(&self, path: &Path) -> Res<Arc<SqliteStore>> {
        let mut options = SqliteOptions::default();
        options.durability = self.durability;
        Ok(Arc::new(SqliteStore::open_with(path, options)?))
    }

    fn print_setting(&self, path: &Path) {
        println!(
            "store=sqlite durability={} (WAL, synchronous={}) db={}",
            self.durability_name(),
            self.durability_name(),
            path.display()
        );
    }

    /// [`Options::print_setting`] for either store.
    fn print_place(&self, place: &Place) {
        match place {
            Place::Sqlite(path) => self.print_setting(path),
            Place::Postgres(url) => println!(
                "store=postgres url={} (the server's durability; --durability is SQLite's)",
                StoreUrl::Postgres(url.clone())
            ),
        }
    }
}

/// Where one workload's store is.
#[derive(Clone)]
enum Place {
    Sqlite(PathBuf),
    /// A PostgreSQL store URL with its `schema=`.
    Postgres(String),
}

/// A benchmark's PostgreSQL schema, dropped (with everything in it) when this is dropped.
struct PgSchema {
    /// The server's URL, without the store's own parameters.
    server: String,
    name: String,
}

impl PgSchema {
    /// A plain connection to the server whose searches start in this schema.
    async fn connect(&self) -> Res<tokio_postgres::Client> {
        let (client, connection) =
            tokio_postgres::connect(&self.server, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        client
            .batch_execute(&format!("SET search_path TO {}", self.name))
            .await?;
        Ok(client)
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let server = self.server.clone();
        let sql = format!(
            "SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS {} CASCADE",
            self.name
        );
        // A thread and a runtime of its own: this runs from async code and from unwinding.
        let dropped = std::thread::spawn(move || -> Res<()> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let (client, connection) =
                    tokio_postgres::connect(&server, tokio_postgres::NoTls).await?;
                let connection = tokio::spawn(connection);
                client.batch_execute(&sql).await?;
                drop(client);
                let _ = connection.await;
                Ok(())
            })
        })
        .join();
        // Silent when it worked: the result line stays last.
        match dropped {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not drop schema {}: {e}", self.name),
            Err(_) => eprintln!("could not drop schema {}: the thread panicked", self.name),
        }
    }
}

fn remove_db(path: &Path) -> Res<()> {
    for suffix in ["", "-wal", "-shm"] {
        let p = PathBuf::from(format!("{}{suffix}", path.display()));
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot remove {}: {e}", p.display()).into()),
        }
    }
    Ok(())
}

// ----- helpers ---------------------------------------------------------------------------------

/// Counts ended activations, so that a workload can wait for N instances without polling.
/// The waiter is woken once, when its goal is reached, not at every activation: on two cores
/// a wake-up per step (a thread switch and a timer) took CPU from the engine being measured.
struct Ended {
    count: AtomicUsize,
    activations: AtomicUsize,
    /// What the waiter waits for, by [`Counter`]; `usize::MAX` while nobody waits.
    goals: [AtomicUsize; 2],
    notify: Notify,
}

/// Which count of [`Ended`] a workload waits on.
#[derive(Clone, Copy)]
enum Counter {
    /// Instances that ended.
    Ended = 0,
    /// Activations committed.
    Activations = 1,
}

impl Default for Ended {
    fn default() -> Self {
        Ended {
            count: AtomicUsize::new(0),
            activations: AtomicUsize::new(0),
            goals: [AtomicUsize::new(usize::MAX), AtomicUsize::new(usize::MAX)],
            notify: Notify::new(),
        }
    }
}

impl Ended {
    fn observe(self: &Arc<Self>) -> impl Fn(&CommitNotice) + Send + Sync + 'static {
        let me = Arc::clone(self);
        move |notice| {
            if let CommitNotice::Activation { ended, .. } = notice {
                // SeqCst here and in `wait`: of a count reaching the goal and the goal being
                // set, at least one side sees the other, so the wake-up is not missed.
                let activations = me.activations.fetch_add(1, Ordering::SeqCst) + 1;
                let count = if *ended {
                    me.count.fetch_add(1, Ordering::SeqCst) + 1
                } else {
                    me.count.load(Ordering::SeqCst)
                };
                if count >= me.goals[Counter::Ended as usize].load(Ordering::SeqCst)
                    || activations >= me.goals[Counter::Activations as usize].load(Ordering::SeqCst)
                {
                    me.notify.notify_waiters();
                }
            }
        }
    }

    fn get(&self, counter: Counter) -> usize {
        match counter {
            Counter::Ended => self.count.load(Ordering::SeqCst),
            Counter::Activations => self.activations.load(Ordering::SeqCst),
        }
    }

    /// Waits until `counter` reaches `target` (the timeout only guards against a missed wake).
    async fn wait(&self, counter: Counter, target: usize) {
        self.goals[counter as usize].store(target, Ordering::SeqCst);
        loop {
            let notified = self.notify.notified();
            if self.get(counter) >= target {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
        }
    }
}

fn worker(store: SharedStore, ended: &Arc<Ended>, opts: &Options) -> Worker {
    let mut builder = Worker::builder(store);
    if let Some(lease) = opts.lease {
        builder = builder.lease(lease);
    }
    builder
        .coordinator(&STEPS, steps)
        .coordinator(&FAN_OUT, fan_out)
        .coordinator(&WAITER, waiter)
        .activity(&ADD_ONE, add_one)
        .on_commit(ended.observe())
        .start()
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn sort(samples: &mut [f64]) {
    samples.sort_by(|a, b| a.total_cmp(b));
}

fn rss_mib() -> Res<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or("no VmRSS in /proc/self/status")?;
    let kib: f64 = line
        .split_whitespace()
        .nth(1)
        .ok_or("malformed VmRSS")?
        .parse()?;
    Ok(kib / 1024.0)
}

fn file_mib(path: &Path) -> f64 {
    let mut bytes = 0u64;
    for suffix in ["", "-wal"] {
        let p = PathBuf::from(format!("{}{suffix}", path.display()));
        bytes += std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
    }
    bytes as f64 / (1024.0 * 1024.0)
}

// ----- results ---------------------------------------------------------------------------------

/// The figures of one invocation, for the summary of `all`.
#[derive(Default)]
struct Figures {
    commit_per_s: Option<f64>,
    batched_rows_per_s: Option<f64>,
    w1_steps_per_s: Option<f64>,
    w2_p50_ms: Option<f64>,
    w3_wall_s: Option<f64>,
    w4: Option<(f64, u64, u64)>,
    w5: Option<(f64, f64, f64)>,
    w6_replay_ms_p50: Option<f64>,
}

// ----- baseline --------------------------------------------------------------------------------

/// An event-sized row (the `events` table holds JSON bodies of about this size).
const BASELINE_BODY: &str = r#"{"type":"activity_completed","seq":7,"output":8,"attempt":1,"pad":"0123456789abcdef0123456789abcdef"}"#;

fn baseline(opts: &Options, all: bool, figures: &mut Figures) -> Res<()> {
    if opts.sqlite_only("baseline") {
        return Ok(());
    }
    let path = opts.fresh_db("baseline", all)?;
    let conn = Connection::open(&path)?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(format!("journal_mode is {mode}, not WAL").into());
    }
    conn.pragma_update(None, "synchronous", opts.durability_name())?;
    // Appends at the end of one B-tree, the cheapest way SQLite can store a row: the limit.
    conn.execute_batch("CREATE TABLE rows (id INTEGER PRIMARY KEY, body TEXT NOT NULL);")?;
    let mut insert = conn.prepare("INSERT INTO rows (id, body) VALUES (?1, ?2)")?;

    // (a) one committed transaction per row.
    let singles = 10_000u64;
    let started = Instant::now();
    for i in 0..singles {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        insert.execute(rusqlite::params![i as i64, BASELINE_BODY])?;
        conn.execute_batch("COMMIT")?;
    }
    let commit_per_s = singles as f64 / started.elapsed().as_secs_f64();
    println!(
        "baseline (a) {singles} single-row commits in {:.3} s",
        started.elapsed().as_secs_f64()
    );

    // (b) 1,000,000 rows in transactions of 1,000.
    let rows = 1_000_000u64;
    let per_tx = 1_000u64;
    let started = Instant::now();
    for tx in 0..rows / per_tx {
        conn.execute_batch("BEGIN IMMEDIATE")?;
        for i in 0..per_tx {
            let id = singles + tx * per_tx + i;
            insert.execute(rusqlite::params![id as i64, BASELINE_BODY])?;
        }
        conn.execute_batch("COMMIT")?;
    }
    let batched_rows_per_s = rows as f64 / started.elapsed().as_secs_f64();
    println!(
        "baseline (b) {rows} rows in {} transactions in {:.3} s",
        rows / per_tx,
        started.elapsed().as_secs_f64()
    );
    drop(insert);
    drop(conn);
    if opts.db.is_none() {
        remove_db(&path)?;
    }
    figures.commit_per_s = Some(commit_per_s);
    figures.batched_rows_per_s = Some(batched_rows_per_s);
    opts.print_setting(&path);
    println!("baseline commit_per_s={commit_per_s:.1} batched_rows_per_s={batched_rows_per_s:.1}");
    Ok(())
}

// ----- W1: throughput --------------------------------------------------------------------------

async fn w1(opts: &Options, all: bool, figures: &mut Figures) -> Res<()> {
    // Declared first, dropped last: the schema goes once nothing uses it.
    let (place, _schema) = opts.fresh_place("W1", all)?;
    let (store, sqlite) = opts.open_place(&place).await?;
    let ended = Arc::new(Ended::default());
    let worker = worker(store.clone(), &ended, opts);
    let client = worker.client();
    let instances = 1_000usize;
    let steps_each = 10u32;

    let started = Instant::now();
    let ids: Vec<String> = (0..instances).map(|i| format!("w1-{i}")).collect();
    let starts = ids.iter().map(|id| client.start(&STEPS, id, &steps_each));
    for r in join_all(starts).await {
        r?;
    }
    let created = started.elapsed();
    ended.wait(Counter::Ended, instances).await;
    let wall = started.elapsed().as_secs_f64();
    worker.shutdown().await?;

    let completed = completed_with(store.as_ref(), u64::from(steps_each)).await?;
    if completed != instances as u64 {
        return Err(format!("W1: {completed} of {instances} instances completed with 10").into());
    }
    let steps_total = (instances as u64 * u64::from(steps_each)) as f64;
    println!(
        "W1 created {instances} instances in {:.3} s",
        created.as_secs_f64()
    );
    opts.finish_place(sqlite, &place)?;
    let steps_per_s = steps_total / wall;
    figures.w1_steps_per_s = Some(steps_per_s);
    opts.print_place(&place);
    println!(
        "W1 wall_s={wall:.4} workflows_per_s={:.1} steps_per_s={steps_per_s:.1}",
        instances as f64 / wall
    );
    Ok(())
}

/// How many instances completed with `output`, through the public `Store` API.
async fn completed_with(store: &dyn Store, output: u64) -> Res<u64> {
    let filter = ListFilter {
        status: Some(InstanceStatus::Completed),
        ..ListFilter::default()
    };
    let listed = store.list_instances(&filter).await?;
    let right = Some(serde_json::Value::from(output));
    Ok(listed.iter().filter(|i| i.output == right).count() as u64)
}

/// Closes the store and removes a scratch file.
fn finish_db(opts: &Options, store: Arc<SqliteStore>, path: &Path) -> Res<()> {
    store.close();
    drop(store);
    if opts.db.is_none() {
        remove_db(path)?;
    }
    Ok(())
}

// ----- W2: latency -----------------------------------------------------------------------------

async fn w2(opts: &Options, all: bool, figures: &mut Figures) -> Res<()> {
    let (place, _schema) = opts.fresh_place("W2", all)?;
    let (store, sqlite) = opts.open_place(&place).await?;
    let ended = Arc::new(Ended::default());
    let worker = worker(store.clone(), &ended, opts);
    let client = worker.client();
    let mut samples = Vec::with_capacity(50);
    for i in 0..50 {
        let started = Instant::now();
        let handle = client.start(&STEPS, &format!("w2-{i}"), &10).await?;
        let out = handle.result().await?;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
        if out != 10 {
            return Err(format!("W2: instance {i} returned {out}").into());
        }
    }
    worker.shutdown().await?;
    opts.finish_place(sqlite, &place)?;
    sort(&mut samples);
    let p50 = percentile(&samples, 0.50);
    let p99 = percentile(&samples, 0.99);
    println!(
        "W2 min_ms={:.3} max_ms={:.3}",
        samples[0],
        samples[samples.len() - 1]
    );
    figures.w2_p50_ms = Some(p50);
    opts.print_place(&place);
    println!("W2 p50_ms={p50:.3} p99_ms={p99:.3}");
    Ok(())
}

// ----- W3: fan-out -----------------------------------------------------------------------------

async fn w3(opts: &Options, all: bool, figures: &mut Figures) -> Res<()> {
    // Declared first, dropped last: the schema goes once nothing uses it.
    let (place, _schema) = opts.fresh_place("W3", all)?;
    let (store, sqlite) = opts.open_place(&place).await?;
    let ended = Arc::new(Ended::default());
    let worker = worker(store.clone(), &ended, opts);
    let client = worker.client();
    let n = 1_000u32;
    let started = Instant::now();
    let handle = client.start(&FAN_OUT, "w3", &n).await?;
    let sum = handle.result().await?;
    let wall = started.elapsed().as_secs_f64();
    let expected: u64 = (1..=u64::from(n)).sum();
    if sum != expected {
        return Err(format!("W3: sum {sum}, expected {expected}").into());
    }
    println!(
        "W3 activations={}",
        ended.activations.load(Ordering::Relaxed)
    );
    worker.shutdown().await?;
    drop(store);
    opts.finish_place(sqlite, &place)?;
    figures.w3_wall_s = Some(wall);
    opts.print_place(&place);
    println!("W3 wall_s={wall:.4}");
    Ok(())
}

// ----- W4: recovery ----------------------------------------------------------------------------

const W4_INSTANCES: u64 = 1_000;
const W4_STEPS: u32 = 10;
const W4_KILL_AT: u64 = 5_000;
/// Past this many steps journaled at the kill, W4 starts again: too little is left to recover.
const W4_LATE_KILL: u64 = 7_500;
/// How many times W4 starts again before it gives up.
const W4_ATTEMPTS: u32 = 3;
/// How often W4 counts the first process's journaled steps: it journals ~350 per millisecond
/// on a fast machine, so a longer pause let it run well past half-way before the kill.
const W4_POLL: Duration = Duration::from_micros(500);
/// The nice value of W4's first process (see `w4_kill_half_way`).
#[cfg(unix)]
const W4_FIRST_NICE: libc::c_int = 10;

fn child(opts: &Options, sub: &str, place: &Place) -> Res<Command> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg(sub);
    match place {
        Place::Sqlite(path) => cmd.arg("--db").arg(path),
        Place::Postgres(url) => cmd.arg("--store").arg(url),
    };
    cmd.arg("--durability").arg(opts.durability_arg());
    Ok(cmd)
}

/// Journaled steps, by the same SQL on both stores: occurrences of the kind, as an SQLite
/// history row holds one activation's events, their kinds joined by commas.
const JOURNALED: &str = "SELECT CAST(COALESCE(SUM(
        (LENGTH(kind) - LENGTH(REPLACE(kind, 'activity_completed', ''))) / 18), 0) AS BIGINT)
    FROM events";

/// [`JOURNALED`] in the SQLite history rows after a rowid, with the last rowid read.
const JOURNALED_SINCE: &str = "SELECT MAX(rowid), COALESCE(SUM(
        (LENGTH(kind) - LENGTH(REPLACE(kind, 'activity_completed', ''))) / 18), 0)
    FROM events WHERE rowid > ?1";

/// Counts W4's journaled steps while the first process runs.
enum StepProbe {
    /// The file, its connection once it exists, and the steps counted in the rows up to a rowid
    /// (history rows are only appended while W4's first process runs): each poll reads only the
    /// rows added since the last, so that the count keeps up with a fast first process.
    Sqlite(PathBuf, Option<Connection>, SqliteCount),
    Postgres(tokio_postgres::Client),
}

/// W4's running count of the SQLite history: steps in the rows up to `rowid`.
#[derive(Default)]
struct SqliteCount {
    rowid: i64,
    steps: u64,
}

impl StepProbe {
    async fn new(place: &Place, schema: Option<&PgSchema>) -> Res<StepProbe> {
        Ok(match (place, schema) {
            (Place::Postgres(_), Some(schema)) => StepProbe::Postgres(schema.connect().await?),
            (Place::Sqlite(path), _) => {
                StepProbe::Sqlite(path.clone(), None, SqliteCount::default())
            }
            _ => return Err("W4: a PostgreSQL store without its schema".into()),
        })
    }

    /// `None` until the store's tables exist.
    async fn journaled(&mut self) -> Option<u64> {
        match self {
            StepProbe::Sqlite(path, conn, counted) => {
                if conn.is_none() && path.exists() {
                    *conn = Connection::open(&*path).ok();
                }
                let (last, steps): (Option<i64>, i64) = conn
                    .as_ref()?
                    .query_row(JOURNALED_SINCE, [counted.rowid], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                    .ok()?;
                if let Some(last) = last {
                    counted.rowid = last;
                    counted.steps += steps as u64;
                }
                Some(counted.steps)
            }
            StepProbe::Postgres(client) => {
                let row = client.query_one(JOURNALED, &[]).await.ok()?;
                Some(row.get::<_, i64>(0) as u64)
            }
        }
    }
}

/// W4's verdict from the store alone, through the public `Store` API: (instances completed with
/// the right output, call positions with an outcome, call positions with more than one).
async fn w4_verdict(store: &dyn Store) -> Res<(u64, u64, u64)> {
    let completed = completed_with(store, u64::from(W4_STEPS)).await?;
    let (mut outcomes, mut duplicated) = (0u64, 0u64);
    for info in store.list_instances(&ListFilter::default()).await? {
        let mut per_seq = std::collections::HashMap::<u32, u64>::new();
        for e in store.history(&info.id).await? {
            if let Event::ActivityCompleted { seq, .. } | Event::ActivityFailed { seq, .. } =
                e.event
            {
                *per_seq.entry(seq).or_default() += 1;
            }
        }
        outcomes += per_seq.len() as u64;
        duplicated += per_seq.values().filter(|&&n| n > 1).count() as u64;
    }
    Ok((completed, outcomes, duplicated))
}

async fn w4(opts: &Options, all: bool, figures: &mut Figures) -> Res<()> {
    // A kill that comes late (the first process ran on while this one waited for a core)
    // leaves too little to recover to measure recovery: then again, on a fresh store.
    let mut attempt = 1;
    // The schema (PostgreSQL) lives until the verdict is read.
    let (place, _schema) = loop {
        let (place, schema) = opts.fresh_place("W4", all)?;
        let after_kill = w4_kill_half_way(opts, &place, schema.as_ref()).await?;
        if after_kill <= W4_LATE_KILL {
            break (place, schema);
        }
        if attempt == W4_ATTEMPTS {
            return Err(format!(
                "W4: in {W4_ATTEMPTS} attempts the first process was killed only after more than \
                 {W4_LATE_KILL} steps were journaled"
            )
            .into());
        }
        println!(
            "W4 the kill came late ({after_kill} of {} steps journaled, more than \
             {W4_LATE_KILL}): again on a fresh store",
            W4_INSTANCES * u64::from(W4_STEPS)
        );
        attempt += 1;
    };

    // Second process: finishes them.
    let started = Instant::now();
    let mut recover = child(opts, "__w4-recover", &place)?
        .stdout(Stdio::piped())
        .spawn()?;
    let stdout = recover
        .stdout
        .take()
        .ok_or("no stdout of the second process")?;
    let mut recover_s = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if line.starts_with("recovered") && recover_s.is_none() {
            recover_s = Some(started.elapsed().as_secs_f64());
        }
        println!("W4 second process: {line}");
    }
    let status = recover.wait()?;
    let recover_s = recover_s.ok_or(format!("W4: the second process failed ({status})"))?;

    // Verdict from the store alone.
    let (store, sqlite) = opts.open_place(&place).await?;
    let (completed, outcomes, duplicated) = w4_verdict(store.as_ref()).await?;
    drop(store);
    opts.finish_place(sqlite, &place)?;
    let lost_instances = W4_INSTANCES.saturating_sub(completed);
    let lost_steps = (W4_INSTANCES * u64::from(W4_STEPS)).saturating_sub(outcomes);
    let lost = lost_instances + lost_steps;
    println!(
        "W4 lost_instances={lost_instances} lost_steps={lost_steps} (lease default {} ms)",
        retrace::runtime::limits::LEASE_DEFAULT.as_millis()
    );
    figures.w4 = Some((recover_s, lost, duplicated));
    opts.print_place(&place);
    println!("W4 recover_s={recover_s:.4} lost={lost} duplicated={duplicated}");
    Ok(())
}

/// Runs W4's first process on `place` and kills it with SIGKILL once 5,000 steps are
/// journaled; returns how many the file holds after the kill.
async fn w4_kill_half_way(opts: &Options, place: &Place, schema: Option<&PgSchema>) -> Res<u64> {
    let mut crash = child(opts, "__w4-crash", place)?;
    crash.stdout(Stdio::null());
    // The first process runs at a lower priority, so that this one, which counts its steps to
    // kill it half-way, is not left waiting for a core while it runs on (the kill came at
    // 7,000-8,500 steps at times). Only the second process is measured.
    #[cfg(unix)]
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut crash, || {
            // SAFETY: one system call between fork and exec; nothing allocated or locked.
            libc::setpriority(libc::PRIO_PROCESS, 0, W4_FIRST_NICE);
            Ok(())
        });
    }
    let mut crash = crash.spawn()?;
    let poll_started = Instant::now();
    let mut probe = StepProbe::new(place, schema).await?;
    let journaled = loop {
        if poll_started.elapsed() > Duration::from_secs(120) {
            let _ = crash.kill();
            return Err("W4: the first process did not journal 5,000 steps in 120 s".into());
        }
        if let Some(status) = crash.try_wait()? {
            return Err(format!("W4: the first process exited early ({status})").into());
        }
        // The schema may not exist yet: an error just means "not yet".
        let n = probe.journaled().await;
        if n.unwrap_or(0) >= W4_KILL_AT {
            // Child::kill is SIGKILL on unix: no destructor, no lease handed back.
            crash.kill()?;
            crash.wait()?;
            break n.unwrap_or(0);
        }
        tokio::time::sleep(W4_POLL).await;
    };
    let after_kill = probe
        .journaled()
        .await
        .ok_or("W4: cannot count journaled steps")?;
    println!(
        "W4 killed the first process with SIGKILL at {journaled} journaled steps \
         ({after_kill} in the file after the kill)"
    );
    Ok(after_kill)
}

/// The first W4 process: starts every instance, works until killed.
async fn w4_crash(opts: &Options, place: &Place) -> Res<()> {
    let (store, _sqlite) = opts.open_place(place).await?;
    let ended = Arc::new(Ended::default());
    let worker = worker(store.clone(), &ended, opts);
    let client = worker.client();
    let starts: Vec<_> = (0..W4_INSTANCES)
        .map(|i| format!("w4-{i}"))
        .collect::<Vec<_>>();
    for r in join_all(starts.iter().map(|id| client.start(&STEPS, id, &W4_STEPS))).await {
        r?;
    }
    // The parent kills this process; should it not, it ends on its own.
    tokio::time::sleep(Duration::from_secs(300)).await;
    Ok(())
}

/// The second W4 process: a new worker on the same file, until every instance completed.
async fn w4_recover(opts: &Options, place: &Place) -> Res<()> {
    let started = Instant::now();
    let (store, sqlite) = opts.open_place(place).await?;
    let ended = Arc::new(Ended::default());
    let worker = worker(store.clone(), &ended, opts);
    let running = ListFilter {
        status: Some(InstanceStatus::Running),
        limit: Some(1),
        ..ListFilter::default()
    };
    loop {
        if store.list_instances(&running).await?.is_empty() {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            return Err("W4 recovery: instances still running after 120 s".into());
        }
        // Wake on this worker's commits, or poll (instances ended before the kill).
        let _ = tokio::time::timeout(Duration::from_millis(5), ended.notify.notified()).await;
    }
    println!(
        "recovered in_process_s={:.4} activations_here={}",
        started.elapsed().as_secs_f64(),
        ended.activations.load(Ordering::Relaxed)
    );
    worker.shutdown().await?;
    if let Some(sqlite) = sqlite {
        sqlite.close();
    }
    Ok(())
}

// ----- W5: suspension --------------------------------------------------------------------------

async fn w5(opts: &Options, all: bool, figures: &mut Figures) -> Res<()> {
    if opts.sqlite_only("W5") {
        return Ok(());
    }
    let path = opts.fresh_db("W5", all)?;
    let out = child(opts, "__w5", &Place::Sqlite(path.clone()))?
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        return Err(format!("W5: the worker process failed ({})", out.status).into());
    }
    let text = String::from_utf8(out.stdout)?;
    let mut result = None;
    for line in text.lines() {
        if line.starts_with("W5 rss_mib=") {
            result = Some(line.to_string());
        } else {
            println!("{line}");
        }
    }
    let result = result.ok_or("W5: no result line from the worker process")?;
    let field = |name: &str| -> Option<f64> {
        result
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
    };
    if let (Some(r), Some(b), Some(d)) =
        (field("rss_mib"), field("baseline_rss_mib"), field("db_mib"))
    {
        figures.w5 = Some((r, b, d));
    }
    if opts.db.is_none() {
        remove_db(&path)?;
    }
    opts.print_setting(&path);
    println!("{result}");
    Ok(())
}

/// The W5 worker process.
async fn w5_child(opts: &Options, path: &Path) -> Res<()> {
    let instances = 10_000usize;
    let store = opts.open_store(path)?;
    let ended = Arc::new(Ended::default());
    let worker = worker(store.clone(), &ended, opts);
    let client = worker.client();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let baseline = rss_mib()?;
    let started = Instant::now();
    let ids: Vec<String> = (0..instances).map(|i| format!("w5-{i}")).collect();
    for r in join_all(ids.iter().map(|id| client.start(&WAITER, id, &()))).await {
        r?;
    }
    // Every instance is waiting once its first activation (signal awaited) committed.
    ended.wait(Counter::Activations, instances).await;
    let waiting_s = started.elapsed().as_secs_f64();
    // Let activation tasks that just committed finish dropping their state.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rss = rss_mib()?;
    let db = file_mib(path);
    println!(
        "W5 all {instances} waiting after {waiting_s:.3} s; cached_executions={} \
         rss_delta_mib={:.1} per_instance_kib={:.2}",
        worker.cached_executions(),
        rss - baseline,
        (rss - baseline) * 1024.0 / instances as f64
    );
    println!("W5 rss_mib={rss:.1} baseline_rss_mib={baseline:.1} db_mib={db:.2}");
    worker.shutdown().await?;
    store.close();
    Ok(())
}

// ----- W6: replay ------------------------------------------------------------------------------

async fn w6(opts: &Options, all: bool, figures: &mut Figures) -> Res<()> {
    if opts.sqlite_only("W6") {
        return Ok(());
    }
    let path = opts.fresh_db("W6", all)?;
    let store = opts.open_store(&path)?;
    let ended = Arc::new(Ended::default());
    let first = worker(store.clone(), &ended, opts);
    let client = Client::new(store.clone());
    let n = opts.w6_activities;
    let started = Instant::now();
    let handle = client.start(&STEPS, "w6", &n).await?;
    // Half-way, the worker stops and a fresh one (empty cache) resumes the instance by replay.
    while client.describe("w6").await?.next_position < u64::from(n) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    first.shutdown().await?;
    let worker = worker(store.clone(), &ended, opts);
    let out = handle.result().await?;
    if out != u64::from(n) {
        return Err(format!("W6: returned {out}, expected {n}").into());
    }
    println!(
        "W6 ran {n} sequential activities in {:.3} s (a worker restart half-way)",
        started.elapsed().as_secs_f64()
    );
    worker.shutdown().await?;

    // A fresh execution each time: nothing cached, history loaded from the store and replayed
    // the way a worker's cold activation does it (`Store::load_and_replay`: the SQLite store
    // replays while it is still reading). The plain `load` is timed too, for the analysis.
    let mut samples = Vec::with_capacity(20);
    let mut load_ms = Vec::with_capacity(20);
    let mut events = 0u64;
    for _ in 0..20 {
        let t0 = Instant::now();
        let loaded = store.load("w6", 0).await?;
        load_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        drop(loaded);

        let t0 = Instant::now();
        let start: ExecutionFactory =
            Box::new(|info, _inbox| Some(Execution::new(&info.id, coordinator_fn(&STEPS, steps))));
        let replayed = store.load_and_replay("w6", start).await?;
        let done = t0.elapsed().as_secs_f64() * 1000.0;
        replayed.replay?;
        let execution = replayed
            .execution
            .ok_or("W6: no execution was made for the instance")?;
        if !execution.is_finished() || execution.next_position() != replayed.events {
            return Err("W6: replay did not reach the end of the history".into());
        }
        events = replayed.events;
        samples.push(done);
    }
    finish_db(opts, store, &path)?;
    sort(&mut samples);
    sort(&mut load_ms);
    let p50 = percentile(&samples, 0.5);
    println!(
        "W6 load_only_ms_p50={:.3} (store read + decode, no replay), min_ms={:.3}, \
         load_only_min_ms={:.3}",
        percentile(&load_ms, 0.5),
        samples[0],
        load_ms[0]
    );
    figures.w6_replay_ms_p50 = Some(p50);
    opts.print_setting(&path);
    println!("W6 events={events} replay_ms_p50={p50:.3}");
    Ok(())
}

// ----- main ------------------------------------------------------------------------------------

fn summary(f: &Figures) {
    let pass = |ok: bool| if ok { "met" } else { "MISSED" };
    eprintln!("--- targets (issue 4), ratios from this run ---");
    if let (Some(s), Some(b)) = (f.w1_steps_per_s, f.batched_rows_per_s) {
        eprintln!(
            "W1 steps_per_s={s:.0}: {:.3} x target 100000 [{}], {:.3} x batched_rows_per_s \
             (target 0.2) [{}]",
            s / 100_000.0,
            pass(s >= 100_000.0),
            s / b,
            pass(s >= 0.2 * b)
        );
    }
    if let (Some(p), Some(c)) = (f.w2_p50_ms, f.commit_per_s) {
        let ten = 10.0 * 1000.0 / c;
        eprintln!(
            "W2 p50_ms={p:.3}: ten commits take {ten:.3} ms, ratio {:.2} (target <= 1.5) [{}]",
            p / ten,
            pass(p <= 1.5 * ten)
        );
    }
    if let Some(w) = f.w3_wall_s {
        eprintln!(
            "W3 wall_s={w:.4}: {:.2} x target 0.05 [{}]",
            w / 0.05,
            pass(w <= 0.05)
        );
    }
    if let Some((r, l, d)) = f.w4 {
        eprintln!(
            "W4 recover_s={r:.3} lost={l} duplicated={d}: {r:.2} x target 1.0 [{}]",
            pass(r <= 1.0 && l == 0 && d == 0)
        );
    }
    if let Some((r, b, d)) = f.w5 {
        eprintln!(
            "W5 rss delta {:.1} MiB (target <= 32) [{}], db {d:.2} MiB (target <= 16) [{}]",
            r - b,
            pass(r - b <= 32.0),
            pass(d <= 16.0)
        );
    }
    if let Some(p) = f.w6_replay_ms_p50 {
        eprintln!(
            "W6 replay_ms_p50={p:.3}: {:.2} x target 20 [{}]",
            p / 20.0,
            pass(p <= 20.0)
        );
    }
}

async fn run(opts: Options) -> Res<()> {
    let mut figures = Figures::default();
    let workload = opts.workload.clone();
    // Hidden subcommands: the child processes of W4 and W5.
    let child_db = || -> Res<PathBuf> { opts.db.clone().ok_or_else(|| "--db is required".into()) };
    match workload.as_str() {
        "__w4-crash" => return w4_crash(&opts, &opts.child_place()?).await,
        "__w4-recover" => return w4_recover(&opts, &opts.child_place()?).await,
        "__w5" => return w5_child(&opts, &child_db()?).await,
        _ => {}
    }
    let all = workload == "all";
    let result = async {
        match workload.as_str() {
            "baseline" => baseline(&opts, all, &mut figures),
            "W1" => w1(&opts, all, &mut figures).await,
            "W2" => w2(&opts, all, &mut figures).await,
            "W3" => w3(&opts, all, &mut figures).await,
            "W4" => w4(&opts, all, &mut figures).await,
            "W5" => w5(&opts, all, &mut figures).await,
            "W6" => w6(&opts, all, &mut figures).await,
            "all" => {
                println!(
                    "all: {} ms between workloads (a settling pause, see the bench's docs)",
                    SETTLE.as_millis()
                );
                baseline(&opts, all, &mut figures)?;
                tokio::time::sleep(SETTLE).await;
                w1(&opts, all, &mut figures).await?;
                tokio::time::sleep(SETTLE).await;
                w2(&opts, all, &mut figures).await?;
                tokio::time::sleep(SETTLE).await;
                w3(&opts, all, &mut figures).await?;
                tokio::time::sleep(SETTLE).await;
                w4(&opts, all, &mut figures).await?;
                tokio::time::sleep(SETTLE).await;
                w5(&opts, all, &mut figures).await?;
                tokio::time::sleep(SETTLE).await;
                w6(&opts, all, &mut figures).await?;
                summary(&figures);
                Ok(())
            }
            _ => Err(USAGE.into()),
        }
    }
    .await;
    if opts.db.is_none() {
        let _ = std::fs::remove_dir_all(&opts.scratch);
    }
    result
}

fn main() -> Result<(), BoxError> {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let opts = Options::parse()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run(opts))
}
