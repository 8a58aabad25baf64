//! Golden histories of the trip example, replayed against the trip coordinator as it is now.
//!
//! `tests/golden/*.json` were recorded by running the example and exporting with the CLI:
//!
//! ```text
//! cargo run --example trip_booking -- --db ok.db --trips 1
//! cargo run --bin retrace -- --db ok.db export trip-1 -o tests/golden/trip_completed.json
//! ```
//!
//! (`trip_compensated`: `--fail-every 1`; `trip_unpaid`: `--unpaid-every 1 --payment-timeout
//! 0.05`; `trip_in_flight`: `--crash-after 2`.) If a change to
//! `examples/trip_booking/coordinator.rs` makes one of them fail, trips recorded that way, and
//! those in flight, would stop with a nondeterminism error after the deploy: guard the change
//! with `ctx.patched(..)` instead of re-recording the file.

#[path = "../examples/trip_booking/coordinator.rs"]
#[allow(dead_code)]
mod coordinator;

use coordinator::{
    book_trip, Itinerary, TripRequest, BOOK_FLIGHT, BOOK_HOTEL, BOOK_TRIP, RESERVE_CAR,
};
use retrace::runtime::store::{CreateOutcome, ImportedInstance};
use retrace::sdk::{coordinator_fn, Context, Error, HistoryExport};
use retrace::{Replayer, SharedStore, SqliteStore};
use std::path::PathBuf;
use std::sync::Arc;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn golden(name: &str) -> HistoryExport {
    let path = golden_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    HistoryExport::from_json(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The trip saga with its first two steps swapped: a change in-flight trips cannot follow.
async fn hotel_first(ctx: Context, req: TripRequest) -> Result<Itinerary, Error> {
    let hotel = ctx.call(&BOOK_HOTEL, &req).await?;
    let car = ctx.call(&RESERVE_CAR, &req).await?;
    let flight = ctx.call(&BOOK_FLIGHT, &req).await?;
    Ok(Itinerary { car, hotel, flight })
}

#[test]
fn every_golden_trip_replays_against_the_current_coordinator() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(golden_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "golden histories are missing: {files:?}");
    let mut failures = Vec::new();
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        let export =
            HistoryExport::from_json(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(export.instance.coordinator, BOOK_TRIP.name());
        if let Err(divergence) = export.replay(coordinator_fn(&BOOK_TRIP, book_trip)) {
            failures.push(format!("{}:\n{divergence}", path.display()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn a_reordered_saga_is_reported_with_position_recorded_event_and_request() {
    let export = golden("trip_completed.json");
    let divergence = export
        .replay(coordinator_fn(&BOOK_TRIP, hotel_first))
        .unwrap_err();
    assert!(divergence.is_nondeterminism(), "{divergence}");
    let message = divergence.to_string();
    let scheduled_car = export
        .events
        .iter()
        .find(|e| e.event.kind() == "activity_scheduled")
        .unwrap()
        .position;
    assert_eq!(divergence.position, Some(scheduled_car));
    assert!(
        message.contains(&format!("history position {scheduled_car}")),
        "{message}"
    );
    assert!(
        message.contains("activity_scheduled reserve_car"),
        "{message}"
    );
    assert!(message.contains("activity book_hotel"), "{message}");
    assert!(message.contains("instance trip-1"), "{message}");
}

async fn store_with(exports: &[(&str, &str)]) -> SharedStore {
    let store: SharedStore = Arc::new(SqliteStore::open_in_memory().unwrap());
    for (file, id) in exports {
        let imported = ImportedInstance::from_export(&golden(file), Some(id), 1).unwrap();
        assert_eq!(
            store.import_instance(imported).await.unwrap(),
            CreateOutcome::Created
        );
    }
    store
}

#[tokio::test]
async fn the_replayer_checks_every_unfinished_instance_of_a_store_read_only() {
    let store = store_with(&[
        ("trip_in_flight.json", "in-flight"),
        ("trip_completed.json", "done"),
    ])
    .await;
    let before = store.history("in-flight").await.unwrap();

    let report = Replayer::new(store.clone())
        .coordinator(&BOOK_TRIP, book_trip)
        .check()
        .await
        .unwrap();
    assert!(report.is_ok(), "{report}");
    let ids: Vec<&str> = report
        .checked
        .iter()
        .map(|c| c.instance_id.as_str())
        .collect();
    assert_eq!(ids, ["in-flight"], "only unfinished instances are checked");

    let report = Replayer::new(store.clone())
        .coordinator(&BOOK_TRIP, hotel_first)
        .check()
        .await
        .unwrap();
    assert!(!report.is_ok());
    let text = report.to_string();
    assert!(text.contains("1 diverge"), "{text}");
    assert!(text.contains("in-flight"), "{text}");
    assert!(
        text.contains("code requested: activity book_hotel"),
        "{text}"
    );

    // Read-only: nothing changed.
    assert_eq!(store.history("in-flight").await.unwrap(), before);
    let info = store.describe("in-flight").await.unwrap().unwrap();
    assert_eq!(info.status, retrace::InstanceStatus::Running);

    let unknown = Replayer::new(store).check().await.unwrap();
    assert!(unknown.checked.is_empty());
    assert_eq!(unknown.skipped.len(), 1, "{unknown}");
}
