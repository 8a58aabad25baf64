//! A long wait: a monthly subscription that charges each period on a durable timer and keeps its
//! history bounded with continue-as-new.
//!
//! ```text
//! cargo run --release --example subscription -- [--db URL] [--period-ms MS] [--periods N]
//! ```
//!
//! `--db` (default `subscription.db`) is a store URL: a plain path or `sqlite://PATH` for an
//! SQLite file, `postgres://user@host:port/db?schema=name` for PostgreSQL.
//!
//! Each run of the coordinator charges one period, sleeps until the next one on a durable timer
//! (the instance is a row in the database while it sleeps, whatever the period: a month costs the
//! same as a second), and then continues as new with the period counter advanced: its history
//! never holds more than one period. A `cancel` signal ends the subscription at the next period.
//! Stop the program at any time (Ctrl-C, or kill it) and run it again: the subscription resumes
//! where it was, and no period is charged twice (the billing service dedupes by idempotency key).

use retrace::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The subscription's state, carried from one run to the next.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Subscription {
    customer: String,
    period: u64,
    periods: u64,
    period_ms: u64,
    charged_cents: u64,
}

/// What the subscription ended with.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Summary {
    periods_charged: u64,
    charged_cents: u64,
    cancelled: bool,
}

/// One charge.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Charge {
    customer: String,
    period: u64,
    amount_cents: u64,
}

const CHARGE: Activity<Charge, u64> = Activity::new("charge");
const RENEWAL: Coordinator<Subscription, Summary> = Coordinator::new("subscription");

async fn subscription(ctx: Context, sub: Subscription) -> Result<Summary, Error> {
    let charge = Charge {
        customer: sub.customer.clone(),
        period: sub.period,
        amount_cents: 999,
    };
    let charged = ctx.call(&CHARGE, &charge).await?;
    let next = Subscription {
        period: sub.period + 1,
        charged_cents: sub.charged_cents + charged,
        ..sub
    };
    ctx.set_status(&format!(
        "period {} charged; next in {} ms",
        sub.period, sub.period_ms
    ))?;
    if next.period >= next.periods {
        return Ok(Summary {
            periods_charged: next.period,
            charged_cents: next.charged_cents,
            cancelled: false,
        });
    }
    // Wait for the next period, unless the customer cancels first.
    let cancel = ctx.signal::<String>("cancel");
    let period_end = ctx.sleep(Duration::from_millis(sub.period_ms));
    match futures::future::select(cancel, period_end).await {
        futures::future::Either::Left(_) => Ok(Summary {
            periods_charged: next.period,
            charged_cents: next.charged_cents,
            cancelled: true,
        }),
        // A fresh run with an empty history, same instance id.
        futures::future::Either::Right(_) => Err(ctx.continue_as_new(&next)?),
    }
}

/// A billing service that dedupes charges by idempotency key, as a real one would.
#[derive(Default)]
struct Billing {
    seen: Mutex<HashSet<String>>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut db = "subscription.db".to_string();
    let mut period_ms = 200u64;
    let mut periods = 5u64;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--db" => db = value,
            "--period-ms" => period_ms = value.parse()?,
            "--periods" => periods = value.parse()?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let store: SharedStore = retrace::open_store(&db).await?;
    let billing = Arc::new(Billing::default());
    let worker = Worker::builder(store.clone())
        .coordinator(&RENEWAL, subscription)
        .activity(&CHARGE, move |ctx: ActivityContext, charge: Charge| {
            let billing = Arc::clone(&billing);
            async move {
                let first = billing
                    .seen
                    .lock()
                    .map_err(|_| ActivityError::retryable("unavailable", "billing is down"))?
                    .insert(ctx.idempotency_key());
                if first {
                    println!("charged {} for period {}", charge.customer, charge.period);
                }
                Ok(charge.amount_cents)
            }
        })
        .start();
    let client = worker.client();
    let start = Subscription {
        customer: "ada".into(),
        period: 0,
        periods,
        period_ms,
        charged_cents: 0,
    };
    let handle = client.start(&RENEWAL, "subscription-ada", &start).await?;
    let summary = handle.result().await?;
    let history = client.history(handle.id()).await?;
    worker.shutdown().await?;
    println!(
        "subscription periods_charged={} charged_cents={} cancelled={} history_events={}",
        summary.periods_charged,
        summary.charged_cents,
        summary.cancelled,
        history.len()
    );
    Ok(())
}
