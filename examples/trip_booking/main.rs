//! Books trips as a saga: reserve a car, book a hotel, book a flight; if a step fails for good,
//! cancel the steps that succeeded, in reverse order.
//!
//! ```text
//! cargo run --release --example trip_booking -- [--db URL] [--services PATH] [--trips N]
//!     [--fail-every K] [--flaky P] [--crash-after S] [--payment-timeout SECS]
//!     [--unpaid-every K]
//! ```
//!
//! - `--db URL` (default `trips.db`): the store, as a store URL: a plain path or
//!   `sqlite://PATH` for an SQLite file, `postgres://user@host:port/db?schema=name` for
//!   PostgreSQL (see `retrace::StoreUrl`). Several processes may run on one store.
//! - `--services PATH`: the SQLite file of the simulated services. Default: `PATH.services`
//!   beside an SQLite store; for a PostgreSQL store, `trips-<schema>.services` (or
//!   `trips-<db>.services` without `?schema=`) in the current directory; in memory for
//!   `sqlite::memory:`. Processes sharing a store must share this file too.
//!
//! The three remote services are simulated in their own SQLite file. Like real services, they
//! dedupe requests by the idempotency key Retrace hands to each activity call, so retries after
//! a timeout ("did it act or not?") are safe.
//!
//! - `--fail-every K`: the airline refuses (non-retryable) the flight of every trip whose number
//!   is divisible by K; those trips compensate.
//! - `--flaky P`: each service call fails with probability P, half of the time *after* acting
//!   (a timeout), to exercise retries.
//! - `--crash-after S`: abort the process (no cleanup) right after the S-th activity outcome
//!   is committed. Run the same command without it to resume every unfinished trip.
//! - `--payment-timeout SECS` (default 2): after the flight, a trip waits this long for the
//!   customer's `payment` signal; unpaid, it is undone (flight, hotel and car cancelled).
//! - `--unpaid-every K`: the simulated customers pay every trip after a short random delay,
//!   except trips whose number is divisible by K. Unpaid trips count as compensated.
//!
//! The last line is the summary:
//! `summary trips=N booked=b compensated=c live_car=x live_hotel=y live_flight=z service_calls=k`.

use retrace::prelude::*;
use retrace::{ClientError, CommitNotice, StoreUrl};
use rusqlite::{params, Connection, OptionalExtension};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

// ----- the coordinator: coordinator.rs, shared with tests/golden_trip.rs and tests/cli.rs ----

mod coordinator;

use coordinator::*;

// ----- the simulated services ------------------------------------------------------------------

/// Car rental, hotel and airline, in one SQLite file. Each call counts itself, and bookings are
/// deduplicated by idempotency key, as a real service with an idempotency header would.
struct Services {
    db: Mutex<Connection>,
    flaky: f64,
    fail_every: u64,
    rng: AtomicU64,
}

impl Services {
    fn open(path: &str, flaky: f64, fail_every: u64) -> Result<Self, rusqlite::Error> {
        let db = Connection::open(path)?;
        // Several worker processes may share the services file (the fault-injection test).
        db.busy_timeout(std::time::Duration::from_secs(10))?;
        db.pragma_update_and_check(None, "journal_mode", "WAL", |_| Ok(()))?;
        // A process crash loses nothing in WAL mode with NORMAL; only power loss could.
        db.pragma_update(None, "synchronous", "NORMAL")?;
        db.execute_batch(
            "CREATE TABLE IF NOT EXISTS reservations (
                 id TEXT PRIMARY KEY, service TEXT NOT NULL, trip INTEGER NOT NULL,
                 status TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS calls (service TEXT PRIMARY KEY, n INTEGER NOT NULL);",
        )?;
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        Ok(Services {
            db: Mutex::new(db),
            flaky,
            fail_every,
            rng: AtomicU64::new(seed),
        })
    }

    /// A random number in [0, 1): activities may be non-deterministic, coordinators may not.
    fn random(&self) -> f64 {
        let mut x = self.rng.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((x ^ (x >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count_call(&self, db: &Connection, service: &str) -> Result<(), ActivityError> {
        db.execute(
            "INSERT INTO calls (service, n) VALUES (?1, 1)
             ON CONFLICT (service) DO UPDATE SET n = n + 1",
            [service],
        )
        .map_err(service_down)?;
        Ok(())
    }

    /// Books at `service` under `key`; a repeated key returns the first booking.
    fn book(
        &self,
        service: &str,
        key: &str,
        req: &TripRequest,
    ) -> Result<Reservation, ActivityError> {
        let fail = self.random() < self.flaky;
        let fail_after_acting = fail && self.random() < 0.5;
        let db = self.db();
        self.count_call(&db, service)?;
        if fail && !fail_after_acting {
            return Err(ActivityError::retryable(
                "unavailable",
                format!("{service} is unavailable"),
            ));
        }
        if service == "flight" && self.fail_every > 0 && req.trip.is_multiple_of(self.fail_every) {
            return Err(ActivityError::non_retryable(
                "refused",
                format!("no seats for trip {}", req.trip),
            ));
        }
        let existing: Option<String> = db
            .query_row("SELECT id FROM reservations WHERE id = ?1", [key], |r| {
                r.get(0)
            })
            .optional()
            .map_err(service_down)?;
        if existing.is_none() {
            db.execute(
                "INSERT INTO reservations (id, service, trip, status) VALUES (?1, ?2, ?3, 'live')",
                params![key, service, req.trip as i64],
            )
            .map_err(service_down)?;
        }
        if fail_after_acting {
            // The booking happened, but the answer is lost: the caller cannot tell.
            return Err(ActivityError::retryable(
                "timeout",
                format!("{service} timed out"),
            ));
        }
        Ok(Reservation {
            service: service.to_string(),
            id: key.to_string(),
        })
    }

    /// Cancels a booking; cancelling twice is harmless.
    fn cancel(&self, reservation: &Reservation) -> Result<(), ActivityError> {
        let fail = self.random() < self.flaky;
        let db = self.db();
        self.count_call(&db, &reservation.service)?;
        if fail {
            return Err(ActivityError::retryable(
                "unavailable",
                "service unavailable",
            ));
        }
        db.execute(
            "UPDATE reservations SET status = 'cancelled' WHERE id = ?1",
            [&reservation.id],
        )
        .map_err(service_down)?;
        Ok(())
    }

    fn live(&self, service: &str) -> i64 {
        self.db()
            .query_row(
                "SELECT count(*) FROM reservations WHERE service = ?1 AND status = 'live'",
                [service],
                |r| r.get(0),
            )
            .unwrap_or(0)
    }

    fn calls(&self) -> i64 {
        self.db()
            .query_row("SELECT coalesce(sum(n), 0) FROM calls", [], |r| r.get(0))
            .unwrap_or(0)
    }
}

fn service_down(e: rusqlite::Error) -> ActivityError {
    ActivityError::retryable("unavailable", e.to_string())
}

// ----- the program -----------------------------------------------------------------------------

struct Args {
    db: String,
    services: Option<String>,
    trips: u64,
    fail_every: u64,
    flaky: f64,
    crash_after: Option<u64>,
    payment_timeout_secs: f64,
    unpaid_every: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        db: "trips.db".to_string(),
        services: None,
        trips: 1,
        fail_every: 0,
        flaky: 0.0,
        crash_after: None,
        payment_timeout_secs: 2.0,
        unpaid_every: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--db" => args.db = value()?,
            "--services" => args.services = Some(value()?),
            "--trips" => args.trips = value()?.parse().map_err(|e| format!("--trips: {e}"))?,
            "--fail-every" => {
                args.fail_every = value()?.parse().map_err(|e| format!("--fail-every: {e}"))?
            }
            "--flaky" => args.flaky = value()?.parse().map_err(|e| format!("--flaky: {e}"))?,
            "--crash-after" => {
                args.crash_after = Some(
                    value()?
                        .parse()
                        .map_err(|e| format!("--crash-after: {e}"))?,
                )
            }
            "--payment-timeout" => {
                args.payment_timeout_secs = value()?
                    .parse()
                    .map_err(|e| format!("--payment-timeout: {e}"))?
            }
            "--unpaid-every" => {
                args.unpaid_every = value()?
                    .parse()
                    .map_err(|e| format!("--unpaid-every: {e}"))?
            }
            "--help" | "-h" => {
                return Err(
                    "usage: trip_booking [--db URL] [--services PATH] [--trips N] \
                     [--fail-every K] [--flaky P] [--crash-after S] [--payment-timeout SECS] \
                     [--unpaid-every K]"
                        .to_string(),
                )
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if !(args.payment_timeout_secs >= 0.0 && args.payment_timeout_secs.is_finite()) {
        return Err("--payment-timeout must be a number of seconds".to_string());
    }
    if !(0.0..1.0).contains(&args.flaky) {
        return Err("--flaky must be in [0, 1)".to_string());
    }
    Ok(args)
}

/// Where the simulated services keep their state: `--services`, or beside an SQLite store
/// (`PATH.services`), or `trips-<schema or db>.services` in the current directory for a
/// PostgreSQL store.
fn services_path(args: &Args, store: &StoreUrl) -> String {
    if let Some(path) = &args.services {
        return path.clone();
    }
    match store {
        StoreUrl::Sqlite(path) => format!("{}.services", path.display()),
        StoreUrl::Postgres(url) => {
            let (base, query) = url.split_once('?').unwrap_or((url.as_str(), ""));
            let schema = query
                .split('&')
                .find_map(|pair| pair.strip_prefix("schema="))
                .filter(|s| !s.is_empty());
            let after_host = base.split_once("://").map_or(base, |(_, rest)| rest);
            let db = after_host
                .split_once('/')
                .map(|(_, db)| db)
                .filter(|db| !db.is_empty());
            let name: String = schema
                .or(db)
                .unwrap_or("postgres")
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            format!("trips-{name}.services")
        }
        // An in-memory store forgets everything: so do its services.
        StoreUrl::SqliteMemory => ":memory:".to_string(),
        _ => "trips.services".to_string(),
    }
}

/// A customer who pays after a short delay, through the client's signal API. The signal id makes
/// the payment count once, however often a resumed run sends it again.
async fn pay_later(client: Client, trip_id: String, delay_secs: f64) -> Result<(), ClientError> {
    tokio::time::sleep(std::time::Duration::from_secs_f64(delay_secs)).await;
    let payment = Payment {
        amount_cents: 120_000,
    };
    let signal_id = format!("payment-{trip_id}");
    match with_retries(|| client.signal_once(&trip_id, "payment", &payment, &signal_id)).await {
        // The trip ended first (its booking failed for good and was compensated, or a rerun
        // pays a trip that a previous run finished): there is nothing to pay.
        Ok(_) | Err(ClientError::Ended { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Retries a client call while the store reports a transient error (a lock held for longer than
/// the busy timeout while several worker processes share one SQLite file, a full disk).
async fn with_retries<T, F, Fut>(mut call: F) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut delay = std::time::Duration::from_millis(10);
    for _ in 0..20 {
        match call().await {
            Err(ClientError::Store(e)) if e.is_transient() => {
                eprintln!("transient store error, retrying: {e}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(1));
            }
            other => return other,
        }
    }
    call().await
}

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = parse_args()?;
    let url = StoreUrl::parse(&args.db)?;
    let services = Arc::new(Services::open(
        &services_path(&args, &url),
        args.flaky,
        args.fail_every,
    )?);
    let store: SharedStore = url.open().await?;

    let outcomes = Arc::new(AtomicU64::new(0));
    let crash_after = args.crash_after;
    let counter = Arc::clone(&outcomes);
    let mut builder = Worker::builder(store.clone())
        .coordinator(&BOOK_TRIP, book_trip)
        .on_commit(move |notice| {
            if let CommitNotice::ActivityOutcome { is_final: true, .. } = notice {
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                if Some(n) == crash_after {
                    eprintln!("crash: aborting after {n} committed activity outcomes");
                    std::process::abort();
                }
            }
        });
    for (def, service) in [
        (&RESERVE_CAR, "car"),
        (&BOOK_HOTEL, "hotel"),
        (&BOOK_FLIGHT, "flight"),
    ] {
        let s = Arc::clone(&services);
        builder = builder.activity(def, move |ctx: ActivityContext, req: TripRequest| {
            let s = Arc::clone(&s);
            async move { s.book(service, &ctx.idempotency_key(), &req) }
        });
    }
    for def in [&CANCEL_CAR, &CANCEL_HOTEL, &CANCEL_FLIGHT] {
        let s = Arc::clone(&services);
        builder = builder.activity(def, move |_ctx: ActivityContext, r: Reservation| {
            let s = Arc::clone(&s);
            async move { s.cancel(&r) }
        });
    }
    let worker = builder.start();
    let client = worker.client();

    let payment_timeout_ms = (args.payment_timeout_secs * 1000.0) as u64;
    let mut handles = Vec::new();
    let mut customers = Vec::new();
    for trip in 1..=args.trips {
        let req = TripRequest {
            trip,
            traveller: format!("traveller-{trip}"),
            payment_timeout_ms,
        };
        let id = format!("trip-{trip}");
        handles.push(with_retries(|| client.start(&BOOK_TRIP, &id, &req)).await?);
        if args.unpaid_every == 0 || !trip.is_multiple_of(args.unpaid_every) {
            customers.push(tokio::spawn(pay_later(
                client.clone(),
                id,
                services.random() * 0.05,
            )));
        }
    }
    let (mut booked, mut compensated) = (0u64, 0u64);
    for handle in handles {
        match handle.result().await {
            Ok(_) => booked += 1,
            Err(ClientError::Failed { .. }) => compensated += 1,
            Err(e) => return Err(format!("{}: {e}", handle.id()).into()),
        }
    }
    for customer in customers {
        customer.await??;
    }
    // Leases that cannot be handed back now (the store busy) expire on their own.
    if let Err(e) = worker.shutdown().await {
        eprintln!("warning: leases not handed back at shutdown: {e}");
    }
    println!(
        "summary trips={} booked={booked} compensated={compensated} live_car={} live_hotel={} \
         live_flight={} service_calls={}",
        args.trips,
        services.live("car"),
        services.live("hotel"),
        services.live("flight"),
        services.calls()
    );
    Ok(())
}
