//! Books trips as a saga: reserve a car, book a hotel, book a flight; if a step fails for good,
//! cancel the steps that succeeded, in reverse order.
//!
//! ```text
//! cargo run --release --example trip_booking -- [--db PATH] [--trips N] [--fail-every K]
//!     [--flaky P] [--crash-after S]
//! ```
//!
//! The three remote services are simulated in their own SQLite file beside the store
//! (`PATH.services`). Like real services, they dedupe requests by the idempotency key Retrace
//! hands to each activity call, so retries after a timeout ("did it act or not?") are safe.
//!
//! - `--fail-every K`: the airline refuses (non-retryable) the flight of every trip whose number
//!   is divisible by K; those trips compensate.
//! - `--flaky P`: each service call fails with probability P, half of the time *after* acting
//!   (a timeout), to exercise retries.
//! - `--crash-after S`: abort the process (no cleanup) right after the S-th activity outcome
//!   is committed. Run the same command without it to resume every unfinished trip.
//!
//! The last line is the summary:
//! `summary trips=N booked=b compensated=c live_car=x live_hotel=y live_flight=z service_calls=k`.

use retrace::prelude::*;
use retrace::{ClientError, CommitNotice};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

// ----- the coordinator -------------------------------------------------------------------------

/// What the customer asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TripRequest {
    trip: u64,
    traveller: String,
}

/// A reservation at one of the services.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Reservation {
    service: String,
    id: String,
}

/// A booked trip.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Itinerary {
    car: Reservation,
    hotel: Reservation,
    flight: Reservation,
}

const BOOKING_RETRY: RetryPolicy = RetryPolicy::new()
    .max_attempts(30)
    .initial_interval(Duration::from_millis(5))
    .backoff_coefficient(2.0)
    .max_interval(Duration::from_millis(200))
    .non_retryable(&["refused"]);
const CANCEL_RETRY: RetryPolicy = RetryPolicy::new()
    .max_attempts(1000)
    .initial_interval(Duration::from_millis(5))
    .max_interval(Duration::from_millis(200));

const RESERVE_CAR: Activity<TripRequest, Reservation> =
    Activity::new("reserve_car").with_retry(BOOKING_RETRY);
const BOOK_HOTEL: Activity<TripRequest, Reservation> =
    Activity::new("book_hotel").with_retry(BOOKING_RETRY);
const BOOK_FLIGHT: Activity<TripRequest, Reservation> =
    Activity::new("book_flight").with_retry(BOOKING_RETRY);
const CANCEL_CAR: Activity<Reservation, ()> = Activity::new("cancel_car").with_retry(CANCEL_RETRY);
const CANCEL_HOTEL: Activity<Reservation, ()> =
    Activity::new("cancel_hotel").with_retry(CANCEL_RETRY);

const BOOK_TRIP: Coordinator<TripRequest, Itinerary> = Coordinator::new("book_trip");

/// The saga. Every `await` on `ctx` is journaled; after a crash this code replays against the
/// journal and continues where it stopped.
async fn book_trip(ctx: Context, req: TripRequest) -> Result<Itinerary, Error> {
    let mut saga = Saga::new();
    let car = ctx.call(&RESERVE_CAR, &req).await?;
    saga.add(&CANCEL_CAR, &car)?;
    let hotel = match ctx.call(&BOOK_HOTEL, &req).await {
        Ok(hotel) => hotel,
        Err(e) => return Err(saga.fail(&ctx, e).await),
    };
    saga.add(&CANCEL_HOTEL, &hotel)?;
    match ctx.call(&BOOK_FLIGHT, &req).await {
        Ok(flight) => Ok(Itinerary { car, hotel, flight }),
        Err(e) => Err(saga.fail(&ctx, e).await),
    }
}

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
        if service == "flight" && self.fail_every > 0 && req.trip % self.fail_every == 0 {
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
    trips: u64,
    fail_every: u64,
    flaky: f64,
    crash_after: Option<u64>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        db: "trips.db".to_string(),
        trips: 1,
        fail_every: 0,
        flaky: 0.0,
        crash_after: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--db" => args.db = value()?,
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
            "--help" | "-h" => {
                return Err(
                    "usage: trip_booking [--db PATH] [--trips N] [--fail-every K] \
                            [--flaky P] [--crash-after S]"
                        .to_string(),
                )
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if !(0.0..1.0).contains(&args.flaky) {
        return Err("--flaky must be in [0, 1)".to_string());
    }
    Ok(args)
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
    let services = Arc::new(Services::open(
        &format!("{}.services", args.db),
        args.flaky,
        args.fail_every,
    )?);
    let store: SharedStore = Arc::new(SqliteStore::open(&args.db)?);

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
    for def in [&CANCEL_CAR, &CANCEL_HOTEL] {
        let s = Arc::clone(&services);
        builder = builder.activity(def, move |_ctx: ActivityContext, r: Reservation| {
            let s = Arc::clone(&s);
            async move { s.cancel(&r) }
        });
    }
    let worker = builder.start();
    let client = Client::new(store.clone());

    let mut handles = Vec::new();
    for trip in 1..=args.trips {
        let req = TripRequest {
            trip,
            traveller: format!("traveller-{trip}"),
        };
        handles.push(
            client
                .start(&BOOK_TRIP, &format!("trip-{trip}"), &req)
                .await?,
        );
    }
    let (mut booked, mut compensated) = (0u64, 0u64);
    for handle in handles {
        match handle.result().await {
            Ok(_) => booked += 1,
            Err(ClientError::Failed { .. }) => compensated += 1,
            Err(e) => return Err(format!("{}: {e}", handle.id()).into()),
        }
    }
    worker.shutdown().await?;
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
