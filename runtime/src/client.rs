//! The client: start instances, wait for results, inspect, signal, cancel, terminate.

use crate::error::{ClientError, StoreError};
use crate::store::{
    CreateOutcome, Delivery, InstanceInfo, InstanceStatus, ListFilter, NewInstance, SharedStore,
};
use retrace_sdk::{Coordinator, Error, Event, HistoryEvent};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// How often a waiting client re-reads an instance when no change notification arrives (changes
/// made by other processes are only seen this way).
const WAIT_POLL: Duration = Duration::from_millis(200);

/// A handle on a store for callers: cheap to clone.
#[derive(Clone)]
pub struct Client {
    store: SharedStore,
    /// Set for a worker's client ([`crate::Worker::client`]): creates instances together with
    /// their first activation, run in this process.
    local: Option<Arc<dyn LocalStart>>,
}

/// How a client in the same process as a worker starts instances (see
/// [`crate::Worker::client`]).
#[async_trait::async_trait]
pub(crate) trait LocalStart: Send + Sync {
    /// Creates `new`, with its first activation if it can; as [`crate::Store::create_instance`].
    async fn create(&self, new: NewInstance) -> Result<CreateOutcome, StoreError>;
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").finish_non_exhaustive()
    }
}

impl Client {
    /// A client of `store`.
    pub fn new(store: SharedStore) -> Self {
        Client { store, local: None }
    }

    /// A client of `store` that creates instances through `local`.
    pub(crate) fn with_local_start(store: SharedStore, local: Arc<dyn LocalStart>) -> Self {
        Client {
            store,
            local: Some(local),
        }
    }

    /// Starts an instance of `coordinator` named `id`. Idempotent: if `id` exists, nothing is
    /// started and the existing instance's handle is returned.
    ///
    /// # Errors
    /// [`ClientError::InvalidId`] for an id that cannot name an instance
    /// ([`instance_id_problem`]); [`ClientError::CoordinatorMismatch`] when `id` exists with
    /// another coordinator; payload and store errors.
    pub async fn start<I: Serialize, O>(
        &self,
        coordinator: &Coordinator<I, O>,
        id: &str,
        input: &I,
    ) -> Result<InstanceHandle<O>, ClientError> {
        // An instance given such an id before ids were checked is still returned, as for any
        // start of an existing id.
        if let Some(problem) = instance_id_problem(id) {
            if self.store.describe(id).await?.is_none() {
                return Err(ClientError::InvalidId {
                    instance_id: id.to_string(),
                    problem,
                });
            }
        }
        let input = serde_json::to_value(input).map_err(|e| ClientError::Payload {
            instance_id: id.to_string(),
            message: format!("input does not encode: {e}"),
        })?;
        let new = NewInstance {
            id: id.to_string(),
            coordinator: coordinator.name().to_string(),
            input,
            parent: None,
        };
        let span = tracing::debug_span!("start", instance_id = %id);
        let created = match &self.local {
            Some(local) => local.create(new).instrument(span).await?,
            None => self.store.create_instance(new).instrument(span).await?,
        };
        match created {
            CreateOutcome::Created => {}
            CreateOutcome::Existing(info) if info.coordinator != coordinator.name() => {
                return Err(ClientError::CoordinatorMismatch {
                    instance_id: id.to_string(),
                    expected: coordinator.name().to_string(),
                    found: info.coordinator,
                });
            }
            CreateOutcome::Existing(_) => {}
        }
        Ok(self.handle(coordinator, id))
    }

    /// A handle on an existing (or future) instance, without touching the store.
    pub fn handle<I, O>(&self, _coordinator: &Coordinator<I, O>, id: &str) -> InstanceHandle<O> {
        InstanceHandle {
            client: self.clone(),
            id: id.to_string(),
            _output: PhantomData,
        }
    }

    /// The instance's status, coordinator, timestamps, output or error, and custom status.
    ///
    /// # Errors
    /// [`ClientError::NotFound`], store errors.
    pub async fn describe(&self, id: &str) -> Result<InstanceInfo, ClientError> {
        self.store
            .describe(id)
            .await?
            .ok_or_else(|| ClientError::NotFound {
                instance_id: id.to_string(),
            })
    }

    /// The instance's history, as typed events.
    ///
    /// # Errors
    /// [`ClientError::NotFound`], store errors (an undecodable event is
    /// [`StoreError::Corrupt`] naming its position).
    pub async fn history(&self, id: &str) -> Result<Vec<HistoryEvent>, ClientError> {
        self.store
            .history(id)
            .await
            .map_err(|e| for_instance(id, e))
    }

    /// Instances matching `filter`, newest first.
    ///
    /// # Errors
    /// Store errors.
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<InstanceInfo>, ClientError> {
        Ok(self.store.list_instances(filter).await?)
    }

    /// Sends the signal `name` with `payload`. Signals that arrive before the coordinator waits
    /// are buffered in arrival order.
    ///
    /// # Errors
    /// [`ClientError::NotFound`], [`ClientError::Ended`] (nothing was delivered), payload and
    /// store errors.
    pub async fn signal<T: Serialize>(
        &self,
        id: &str,
        name: &str,
        payload: &T,
    ) -> Result<(), ClientError> {
        self.send_signal(id, name, payload, None).await.map(|_| ())
    }

    /// Sends a signal at most once per `signal_id`: a repeated delivery with the same id is
    /// ignored. Returns whether this delivery was accepted (`false`: one with this id was).
    ///
    /// # Errors
    /// [`ClientError::NotFound`], [`ClientError::Ended`] (nothing was delivered), payload and
    /// store errors.
    pub async fn signal_once<T: Serialize>(
        &self,
        id: &str,
        name: &str,
        payload: &T,
        signal_id: &str,
    ) -> Result<bool, ClientError> {
        self.send_signal(id, name, payload, Some(signal_id)).await
    }

    async fn send_signal<T: Serialize>(
        &self,
        id: &str,
        name: &str,
        payload: &T,
        signal_id: Option<&str>,
    ) -> Result<bool, ClientError> {
        let payload = serde_json::to_value(payload).map_err(|e| ClientError::Payload {
            instance_id: id.to_string(),
            message: format!("signal {name} does not encode: {e}"),
        })?;
        let event = Event::SignalReceived {
            name: name.to_string(),
            payload,
        };
        let dedupe = signal_id.map(|s| format!("signal:{s}"));
        self.deliver(id, event, dedupe.as_deref()).await
    }

    /// Delivers `event`: `Ok(true)` when accepted, `Ok(false)` when a message with this dedupe
    /// key was delivered before (even if the instance has ended since), and
    /// [`ClientError::Ended`] when nothing was delivered because the instance has ended.
    async fn deliver(
        &self,
        id: &str,
        event: Event,
        dedupe: Option<&str>,
    ) -> Result<bool, ClientError> {
        match self
            .store
            .deliver_message(id, event, dedupe)
            .await
            .map_err(|e| for_instance(id, e))?
        {
            Delivery::Accepted => Ok(true),
            Delivery::Duplicate => Ok(false),
            Delivery::Ended(status) => Err(ClientError::Ended {
                instance_id: id.to_string(),
                status,
            }),
        }
    }

    /// Asks the instance to cancel: its pending awaits fail with [`Error::Cancelled`], it may
    /// run compensations, and it ends as cancelled when its coordinator returns that error.
    ///
    /// # Errors
    /// [`ClientError::NotFound`], [`ClientError::Ended`], store errors. Asking again while a
    /// cancellation is pending is not an error.
    pub async fn cancel(&self, id: &str, reason: &str) -> Result<(), ClientError> {
        let event = Event::CancelRequested {
            reason: reason.to_string(),
        };
        if !self.deliver(id, event, Some("cancel")).await? {
            // Asked before: fine while it runs, but once it has ended nothing more happens.
            let info = self.describe(id).await?;
            if info.status.is_final() {
                return Err(ClientError::Ended {
                    instance_id: id.to_string(),
                    status: info.status,
                });
            }
        }
        Ok(())
    }

    /// Ends the instance at once, without running any more of its code, recording `reason`.
    ///
    /// # Errors
    /// [`ClientError::NotFound`]; [`ClientError::Ended`] when it had already ended (terminated
    /// before, or ended by itself, perhaps since the caller last looked), and nothing was
    /// changed; store errors.
    pub async fn terminate(&self, id: &str, reason: &str) -> Result<(), ClientError> {
        self.store
            .terminate(id, reason)
            .await
            .map_err(|e| for_instance(id, e))
    }

    /// Puts an instance stopped by a nondeterminism error back to running, after a code fix.
    /// An instance that runs is left running (see [`crate::Store::resume`]).
    ///
    /// # Errors
    /// [`ClientError::NotFound`]; [`ClientError::Ended`] when it has ended (there is nothing to
    /// resume: fork it to run it again); store errors.
    pub async fn resume(&self, id: &str) -> Result<(), ClientError> {
        self.store.resume(id).await.map_err(|e| for_instance(id, e))
    }

    /// Waits until the instance has ended or stopped, and returns its description. Transient
    /// store errors (busy, full) while waiting are retried at the next poll.
    ///
    /// # Errors
    /// [`ClientError::NotFound`], store errors.
    pub async fn wait(&self, id: &str) -> Result<InstanceInfo, ClientError> {
        let mut changes = self.store.changes();
        loop {
            changes.borrow_and_update();
            match self.describe(id).await {
                Ok(info) if info.status.is_final() || info.status == InstanceStatus::Stopped => {
                    return Ok(info);
                }
                Ok(_) => {}
                // A read can meet a lock for a moment (another process recovering the WAL after
                // a crash): waiting goes on.
                Err(ClientError::Store(e)) if e.is_transient() => {
                    tracing::debug!(instance_id = %id, error = %e, "transient store error while waiting");
                }
                Err(e) => return Err(e),
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep(WAIT_POLL) => {}
            }
        }
    }

    /// [`Client::wait`] with a deadline.
    ///
    /// # Errors
    /// [`ClientError::Timeout`], and those of [`Client::wait`].
    pub async fn wait_for(&self, id: &str, timeout: Duration) -> Result<InstanceInfo, ClientError> {
        tokio::time::timeout(timeout, self.wait(id))
            .await
            .map_err(|_| ClientError::Timeout {
                instance_id: id.to_string(),
            })?
    }
}

/// What keeps `id` from naming a new instance, if anything: it is empty, or it ends in `@`
/// and digits. Activity idempotency keys are `{id}/{position}`, and `{id}@{run}/{position}`
/// in the runs after a continue-as-new, so `order@1`'s first run and `order`'s run 1 would
/// hand the same keys to the systems that dedupe by them, and one of two different requests
/// would be dropped there. Checked by [`Client::start`] (which still returns an instance
/// that already has such an id), by the stores for a new child a coordinator starts and
/// waits for (its call fails at once with an `Error::Child` of kind `child_id_invalid`), and by
/// the CLI for the ids it chooses (`import --id`, `fork --new-id`). Not checked: detached
/// children (made as before, with a warning: nobody waits to be told), the ids of imported
/// exports, and ids handed to [`crate::Store::create_instance`] directly.
pub fn instance_id_problem(id: &str) -> Option<&'static str> {
    if id.is_empty() {
        return Some("it is empty");
    }
    let digits = id.len() - id.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    if digits > 0 && id[..id.len() - digits].ends_with('@') {
        return Some(
            "it ends in `@` and digits, the form of a continued instance's later runs in \
             idempotency keys (`order` in run 1 gives `order@1/{position}`)",
        );
    }
    None
}

/// A store error about instance `id` as the client reports it: not found and already ended
/// become their own kinds.
fn for_instance(id: &str, e: StoreError) -> ClientError {
    match e {
        StoreError::NotFound { .. } => ClientError::NotFound {
            instance_id: id.to_string(),
        },
        StoreError::Ended { status, .. } => ClientError::Ended {
            instance_id: id.to_string(),
            status,
        },
        other => ClientError::Store(other),
    }
}

/// A typed handle on one instance.
pub struct InstanceHandle<O> {
    client: Client,
    id: String,
    _output: PhantomData<fn() -> O>,
}

impl<O> Clone for InstanceHandle<O> {
    fn clone(&self) -> Self {
        InstanceHandle {
            client: self.client.clone(),
            id: self.id.clone(),
            _output: PhantomData,
        }
    }
}

impl<O> std::fmt::Debug for InstanceHandle<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceHandle")
            .field("id", &self.id)
            .finish()
    }
}

impl<O: DeserializeOwned> InstanceHandle<O> {
    /// The instance id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Waits for the instance to end and returns its output.
    ///
    /// # Errors
    /// [`ClientError::Failed`] with the coordinator's error (a cancellation is
    /// [`Error::Cancelled`]), [`ClientError::Terminated`], [`ClientError::Stopped`], payload and
    /// store errors.
    pub async fn result(&self) -> Result<O, ClientError> {
        let info = self.client.wait(&self.id).await?;
        outcome(info)
    }

    /// The instance's description.
    ///
    /// # Errors
    /// As [`Client::describe`].
    pub async fn describe(&self) -> Result<InstanceInfo, ClientError> {
        self.client.describe(&self.id).await
    }
}

fn outcome<O: DeserializeOwned>(info: InstanceInfo) -> Result<O, ClientError> {
    let id = info.id.clone();
    match info.status {
        InstanceStatus::Completed => {
            let output = info.output.unwrap_or(serde_json::Value::Null);
            serde_json::from_value(output).map_err(|e| ClientError::Payload {
                instance_id: id,
                message: format!("output does not decode: {e}"),
            })
        }
        InstanceStatus::Failed | InstanceStatus::Cancelled => Err(ClientError::Failed {
            instance_id: id,
            error: info
                .error
                .unwrap_or_else(|| Error::application("unknown", "ended without a recorded error")),
        }),
        InstanceStatus::Terminated => Err(ClientError::Terminated {
            instance_id: id,
            reason: info.reason.unwrap_or_default(),
        }),
        InstanceStatus::Stopped | InstanceStatus::Running => Err(ClientError::Stopped {
            instance_id: id,
            reason: info.reason.unwrap_or_default(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::instance_id_problem;

    #[test]
    fn ids_that_could_share_idempotency_keys_are_refused() {
        for bad in ["", "order@1", "order@12", "a@b@3", "@0"] {
            assert!(instance_id_problem(bad).is_some(), "{bad:?}");
        }
        for good in [
            "order",
            "order1",
            "order@",
            "user@example.com",
            "order@1b",
            "1",
        ] {
            assert_eq!(instance_id_problem(good), None, "{good:?}");
        }
    }
}
