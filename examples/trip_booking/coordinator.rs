//! The trip coordinator, its types and its activity definitions.
//!
//! This file is shared: the `trip_booking` example uses it as `mod coordinator`, and the tests
//! (`tests/golden_trip.rs`, `tests/cli.rs`) include it with `#[path]`, so that the golden history
//! of a trip is replayed against exactly the code the example runs. Change the saga here and CI
//! tells you whether trips already in flight still replay.

use retrace::prelude::*;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What the customer asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TripRequest {
    pub(crate) trip: u64,
    pub(crate) traveller: String,
    /// How long the trip waits for the customer's payment before it is undone.
    #[serde(default = "default_payment_timeout_ms")]
    pub(crate) payment_timeout_ms: u64,
}

fn default_payment_timeout_ms() -> u64 {
    2_000
}

/// The customer's payment, delivered as the `payment` signal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Payment {
    pub(crate) amount_cents: u64,
}

/// A reservation at one of the services.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Reservation {
    pub(crate) service: String,
    pub(crate) id: String,
}

/// A booked trip.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Itinerary {
    pub(crate) car: Reservation,
    pub(crate) hotel: Reservation,
    pub(crate) flight: Reservation,
}

pub(crate) const BOOKING_RETRY: RetryPolicy = RetryPolicy::new()
    .max_attempts(30)
    .initial_interval(Duration::from_millis(5))
    .backoff_coefficient(2.0)
    .max_interval(Duration::from_millis(200))
    .non_retryable(&["refused"]);
pub(crate) const CANCEL_RETRY: RetryPolicy = RetryPolicy::new()
    .max_attempts(1000)
    .initial_interval(Duration::from_millis(5))
    .max_interval(Duration::from_millis(200));

pub(crate) const RESERVE_CAR: Activity<TripRequest, Reservation> =
    Activity::new("reserve_car").with_retry(BOOKING_RETRY);
pub(crate) const BOOK_HOTEL: Activity<TripRequest, Reservation> =
    Activity::new("book_hotel").with_retry(BOOKING_RETRY);
pub(crate) const BOOK_FLIGHT: Activity<TripRequest, Reservation> =
    Activity::new("book_flight").with_retry(BOOKING_RETRY);
pub(crate) const CANCEL_CAR: Activity<Reservation, ()> =
    Activity::new("cancel_car").with_retry(CANCEL_RETRY);
pub(crate) const CANCEL_HOTEL: Activity<Reservation, ()> =
    Activity::new("cancel_hotel").with_retry(CANCEL_RETRY);
pub(crate) const CANCEL_FLIGHT: Activity<Reservation, ()> =
    Activity::new("cancel_flight").with_retry(CANCEL_RETRY);

/// The trip coordinator. Two changes were made to the process after trips were already in
/// flight; each is a patch, and each run follows the patches pinned when it started:
/// - `payment-step`: after the flight, wait for the customer's payment, else undo the trip;
/// - `cancel-car-first`: car cancellations are free within the hour, so cancel the car first.
pub(crate) const BOOK_TRIP: Coordinator<TripRequest, Itinerary> =
    Coordinator::new("book_trip").with_patches(&["payment-step", "cancel-car-first"]);

/// The saga. Every `await` on `ctx` is journaled; after a crash this code replays against the
/// journal and continues where it stopped.
pub(crate) async fn book_trip(ctx: Context, req: TripRequest) -> Result<Itinerary, Error> {
    let mut saga = Saga::new();
    let car = ctx.call(&RESERVE_CAR, &req).await?;
    saga.add(&CANCEL_CAR, &car)?;
    let hotel = match ctx.call(&BOOK_HOTEL, &req).await {
        Ok(hotel) => hotel,
        Err(e) => return Err(undo(&ctx, saga, e).await),
    };
    saga.add(&CANCEL_HOTEL, &hotel)?;
    let flight = match ctx.call(&BOOK_FLIGHT, &req).await {
        Ok(flight) => flight,
        Err(e) => return Err(undo(&ctx, saga, e).await),
    };
    if ctx.patched("payment-step") {
        saga.add(&CANCEL_FLIGHT, &flight)?;
        ctx.set_status(&"waiting for payment")?;
        let payment = ctx.signal::<Payment>("payment");
        let deadline = ctx.sleep(Duration::from_millis(req.payment_timeout_ms));
        // `select` polls the payment first, so a payment and a deadline delivered together
        // resolve the same way on every replay.
        match futures::future::select(payment, deadline).await {
            futures::future::Either::Left((Ok(_payment), _)) => ctx.set_status(&"paid")?,
            futures::future::Either::Left((Err(e), _)) => return Err(undo(&ctx, saga, e).await),
            futures::future::Either::Right(_) => {
                ctx.set_status(&"unpaid: cancelling")?;
                let unpaid =
                    Error::application("unpaid", format!("trip {} was not paid", req.trip));
                return Err(undo(&ctx, saga, unpaid).await);
            }
        }
    }
    Ok(Itinerary { car, hotel, flight })
}

/// Undoes the booked steps. The one place where the order of compensation is decided.
async fn undo(ctx: &Context, mut saga: Saga, cause: Error) -> Error {
    if ctx.patched("cancel-car-first") {
        saga.run_first(&CANCEL_CAR);
    }
    saga.fail(ctx, cause).await
}
