//! Helpers every store shares: JSON encoding of payloads, decoding with the instance and the
//! field named in the error, and what an ended instance reports to its parent.

use super::{InstanceInfo, InstanceStatus, NewInstance, RunEnd};
use crate::error::StoreError;
use retrace_sdk::Error;
use serde_json::Value;
use std::sync::{Mutex, MutexGuard};

/// Encodes a payload for storage.
pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(encode_error)
}

/// Encodes a history or inbox event for storage (`Event::write_json`: the same text as
/// [`to_json`], written faster for the commonest events).
pub(crate) fn event_json(event: &retrace_sdk::Event) -> Result<String, StoreError> {
    let mut out = Vec::with_capacity(128);
    event.write_json(&mut out).map_err(encode_error)?;
    String::from_utf8(out).map_err(encode_error)
}

/// What a payload that cannot be encoded for storage is reported as.
pub(crate) fn encode_error(error: impl std::fmt::Display) -> StoreError {
    StoreError::Database {
        operation: "encode".into(),
        detail: error.to_string(),
    }
}

/// Decodes a stored payload; a failure names the instance and what was being read.
pub(crate) fn decode_json<T: serde::de::DeserializeOwned>(
    instance_id: &str,
    what: impl FnOnce() -> String,
    text: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
        instance_id: instance_id.to_string(),
        what: what(),
        detail: e.to_string(),
    })
}

/// Decodes a stored history event (`Event::from_json`: faster than the generic decoder for the
/// commonest events); a failure names the instance and the position.
pub(crate) fn decode_event_json(
    instance_id: &str,
    pos: i64,
    text: &str,
) -> Result<retrace_sdk::Event, StoreError> {
    retrace_sdk::Event::from_json(text).map_err(|e| StoreError::Corrupt {
        instance_id: instance_id.to_string(),
        what: format!("event at position {pos}"),
        detail: e.to_string(),
    })
}

/// What an ended instance reports to a parent waiting on it; `None` while it runs.
pub(crate) fn final_result(info: &InstanceInfo) -> Option<Result<Value, Error>> {
    match info.status {
        InstanceStatus::Completed => Some(Ok(info.output.clone().unwrap_or(Value::Null))),
        InstanceStatus::Failed | InstanceStatus::Cancelled => Some(Err(info
            .error
            .clone()
            .unwrap_or_else(|| Error::application("failed", "instance failed")))),
        InstanceStatus::Terminated => Some(Err(Error::application(
            "terminated",
            info.reason.clone().unwrap_or_default(),
        ))),
        _ => None,
    }
}

/// Locks a store-internal map. A poisoned lock means a panic while holding it; the maps stay
/// valid (single inserts and removes), so the data is used as is.
pub(crate) fn lock_map<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The status, output and error columns written when a run ends.
pub(crate) fn end_columns(
    end: &RunEnd,
) -> Result<(&'static str, Option<String>, Option<String>), StoreError> {
    Ok(match end {
        RunEnd::Completed(v) => ("completed", Some(to_json(v)?), None),
        RunEnd::Failed(e) => ("failed", None, Some(to_json(e)?)),
        RunEnd::Cancelled(reason) => (
            "cancelled",
            None,
            Some(to_json(&Error::Cancelled {
                reason: reason.clone(),
            })?),
        ),
        RunEnd::ContinueAsNew(_) => ("running", None, None),
    })
}

/// A time in ms since the Unix epoch as the stores keep it (a signed 64-bit integer):
/// anything later than the latest they can hold is that latest ("never", in practice), not a
/// negative number that would be due at once.
pub(crate) fn stored_ms(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

/// The error a parent's child call gets at once when the child's id cannot name an instance
/// (see [`crate::client::instance_id_problem`]); `None` when the id is fine. The stores ask
/// only for a child no instance has yet (an existing one is found as any existing id is), and
/// where they create the child, not in the coordinator's code: a history that already holds
/// such a start replays as it ran.
pub(crate) fn child_id_refusal(child: &NewInstance) -> Option<Error> {
    crate::client::instance_id_problem(&child.id).map(|problem| {
        Error::application(
            "child_id_invalid",
            format!("{:?} cannot be an instance id: {problem}", child.id),
        )
    })
}

/// What an activation that starts `child` as an attached child does when the id is taken by
/// `existing`. `in_chain`: the id is the starting instance's own or one of its ancestors'.
/// `owner_waits`: `existing`'s parent (if any) has not ended, so it may still wait for it.
pub(crate) enum ExistingChild {
    /// Nothing (a detached start; or the child already reports to this very call).
    Nothing,
    /// Tell the parent at once, with this result.
    Report(Result<Value, Error>),
    /// The child runs with no parent: it now reports to this call.
    Adopt,
}

/// Decides [`ExistingChild`]: the end of one that has ended; an error for one of another
/// coordinator, one that would wait on itself, or one that reports to another call still
/// waiting for it (each would otherwise leave the call waiting forever, or hand it a
/// stranger's result); adoption of one that runs with no parent, or whose parent has ended.
pub(crate) fn existing_child(
    existing: &InstanceInfo,
    child: &NewInstance,
    in_chain: bool,
    owner_waits: bool,
) -> ExistingChild {
    let Some(parent) = &child.parent else {
        return ExistingChild::Nothing;
    };
    let refuse =
        |kind: &str, message: String| ExistingChild::Report(Err(Error::application(kind, message)));
    if existing.coordinator != child.coordinator {
        return refuse(
            "child_mismatch",
            format!(
                "instance {} runs coordinator {}, not {}",
                existing.id, existing.coordinator, child.coordinator
            ),
        );
    }
    if let Some(result) = final_result(existing) {
        return ExistingChild::Report(result);
    }
    if in_chain {
        return refuse(
            "child_cycle",
            format!(
                "instance {} is {} or one of its parents: it would wait on itself",
                existing.id, parent.instance_id
            ),
        );
    }
    match &existing.parent {
        None => ExistingChild::Adopt,
        Some(p) if p == parent => ExistingChild::Nothing,
        Some(_) if !owner_waits => ExistingChild::Adopt,
        Some(p) => refuse(
            "child_taken",
            format!(
                "instance {} already reports to {} (call {})",
                existing.id, p.instance_id, p.seq
            ),
        ),
    }
}
