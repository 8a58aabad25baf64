//! The replayer: checks, before a deploy, that new coordinator code still replays every instance
//! in flight.
//!
//! A [`Replayer`] reads a store (it never writes) and replays the history of every unfinished
//! instance (`running` or `stopped`) of each registered coordinator against the registered code,
//! with the same pure machinery a worker uses ([`retrace_sdk::check_replay`]). The
//! [`ReplayReport`] lists the instances that would stop with a nondeterminism error under the new
//! code, each with the position, the recorded event and the requested command.
//!
//! ```
//! # use retrace_runtime::{Replayer, SharedStore, SqliteStore};
//! # use retrace_sdk::{Context, Coordinator, Error};
//! # use std::sync::Arc;
//! const GREET: Coordinator<String, String> = Coordinator::new("greet");
//! async fn greet(_ctx: Context, name: String) -> Result<String, Error> {
//!     Ok(format!("hello {name}"))
//! }
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store: SharedStore = Arc::new(SqliteStore::open_in_memory()?);
//! let report = Replayer::new(store).coordinator(&GREET, greet).check().await?;
//! assert!(report.is_ok(), "{report}");
//! # Ok(())
//! # }
//! ```

use crate::error::StoreError;
use crate::store::{InstanceStatus, ListFilter, SharedStore};
use retrace_sdk::{check_replay, coordinator_fn, Context, Coordinator, CoordinatorFn, Divergence};
use retrace_sdk::{Error, HistoryEvent};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;
use std::future::Future;

/// Replays a store's unfinished instances against registered coordinator code, read-only.
pub struct Replayer {
    store: SharedStore,
    coordinators: BTreeMap<String, CoordinatorFn>,
}

impl std::fmt::Debug for Replayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replayer")
            .field(
                "coordinators",
                &self.coordinators.keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The outcome of replaying one instance.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct InstanceCheck {
    /// The instance.
    pub instance_id: String,
    /// Its coordinator.
    pub coordinator: String,
    /// Its status in the store.
    pub status: InstanceStatus,
    /// How many history events were replayed.
    pub events: usize,
    /// `Ok` when the code replays the whole history, or the first divergence.
    pub result: Result<(), Divergence>,
}

/// What [`Replayer::check`] found.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ReplayReport {
    /// Every instance replayed, in the store's listing order.
    pub checked: Vec<InstanceCheck>,
    /// Unfinished instances not replayed because no code was registered for their coordinator,
    /// as (instance id, coordinator).
    pub skipped: Vec<(String, String)>,
}

impl ReplayReport {
    /// Whether every replayed instance replays.
    pub fn is_ok(&self) -> bool {
        self.checked.iter().all(|c| c.result.is_ok())
    }

    /// The instances that diverge.
    pub fn divergences(&self) -> impl Iterator<Item = &InstanceCheck> {
        self.checked.iter().filter(|c| c.result.is_err())
    }
}

impl std::fmt::Display for ReplayReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let diverged = self.divergences().count();
        writeln!(
            f,
            "replayed {} unfinished instance(s): {} ok, {diverged} diverge; {} skipped (no code \
             registered for their coordinator)",
            self.checked.len(),
            self.checked.len() - diverged,
            self.skipped.len()
        )?;
        for c in self.divergences() {
            if let Err(d) = &c.result {
                writeln!(
                    f,
                    "- {} ({}, {}): {d}",
                    c.instance_id, c.coordinator, c.status
                )?;
            }
        }
        Ok(())
    }
}

impl Replayer {
    /// A replayer over `store`, with no coordinator registered yet.
    pub fn new(store: SharedStore) -> Self {
        Replayer {
            store,
            coordinators: BTreeMap::new(),
        }
    }

    /// Registers the (new) code of a coordinator, as a worker would.
    pub fn coordinator<I, O, F, Fut>(mut self, def: &Coordinator<I, O>, body: F) -> Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(Context, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, Error>> + Send + 'static,
    {
        self.coordinators
            .insert(def.name().to_string(), coordinator_fn(def, body));
        self
    }

    /// Replays every unfinished (`running` or `stopped`) instance of the registered
    /// coordinators. Reads only: nothing in the store changes, and no activity runs.
    ///
    /// # Errors
    /// Store errors (an instance whose history cannot be read fails the whole check, since the
    /// answer would be incomplete).
    pub async fn check(&self) -> Result<ReplayReport, StoreError> {
        let mut report = ReplayReport::default();
        for status in [InstanceStatus::Running, InstanceStatus::Stopped] {
            let filter = ListFilter {
                status: Some(status),
                ..ListFilter::default()
            };
            for info in self.store.list_instances(&filter).await? {
                let Some(code) = self.coordinators.get(&info.coordinator) else {
                    report.skipped.push((info.id, info.coordinator));
                    continue;
                };
                let history = match self.store.history(&info.id).await {
                    Ok(h) => h,
                    // Ended or vanished since the listing: nothing left to check.
                    Err(StoreError::NotFound { .. }) => continue,
                    Err(e) => return Err(e),
                };
                report.checked.push(Self::replay_one(
                    info.id,
                    info.coordinator,
                    info.status,
                    code.clone(),
                    &history,
                ));
            }
        }
        Ok(report)
    }

    /// Replays one instance, whatever its status; `None` when no code is registered for its
    /// coordinator.
    ///
    /// # Errors
    /// [`StoreError::NotFound`], store errors.
    pub async fn check_instance(
        &self,
        instance_id: &str,
    ) -> Result<Option<InstanceCheck>, StoreError> {
        let info = self
            .store
            .describe(instance_id)
            .await?
            .ok_or_else(|| StoreError::NotFound {
                instance_id: instance_id.to_string(),
            })?;
        let Some(code) = self.coordinators.get(&info.coordinator) else {
            return Ok(None);
        };
        let history = self.store.history(instance_id).await?;
        Ok(Some(Self::replay_one(
            info.id,
            info.coordinator,
            info.status,
            code.clone(),
            &history,
        )))
    }

    fn replay_one(
        instance_id: String,
        coordinator: String,
        status: InstanceStatus,
        code: CoordinatorFn,
        history: &[HistoryEvent],
    ) -> InstanceCheck {
        let _span = tracing::debug_span!("replay_check", instance_id = %instance_id, events = history.len()).entered();
        let result = check_replay(&instance_id, code, history);
        InstanceCheck {
            instance_id,
            coordinator,
            status,
            events: history.len(),
            result,
        }
    }
}
