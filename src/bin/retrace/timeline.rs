//! A run as a picture: lanes of bars on a time axis, and its Mermaid rendering.
//!
//! The first lane is the run itself, from its start to its end (or to its last event, when it
//! has not ended). Then one lane per activity name, in order of first call, with a bar per call
//! from scheduled to delivered, labelled with its attempts; then timers, signal waits and
//! children. Bars of calls without an outcome reach the end of the axis and are drawn open.
//! Compensations (see `events`) are marked.
//!
//! When the store journals attempts ([`retrace::runtime::store::Store::attempts`]), an activity
//! call is drawn as one bar per attempt instead, from the attempt's claim to its recorded
//! outcome: failed attempts in red with their error in the tooltip, the gaps between them being
//! the retry backoffs. Without a journal (an older store, an imported history), one bar per call.

use crate::events::{calls, Call, CallKind, Outcome};
use crate::table::{duration, utc};
use retrace::runtime::store::{AttemptEnd, AttemptRecord};
use retrace::sdk::{Event, HistoryEvent};
use retrace::InstanceInfo;

/// How a bar looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BarState {
    /// Completed, fired, received.
    Done,
    /// Failed for good.
    Failed,
    /// No outcome yet.
    Pending,
    /// No outcome, and there will be none: the run ended without it (the loser of a race).
    Dropped,
}

/// One bar: a call, a wait, or the run.
#[derive(Debug, Clone)]
pub(crate) struct Bar {
    pub(crate) label: String,
    pub(crate) start_ms: u64,
    pub(crate) end_ms: u64,
    pub(crate) state: BarState,
    /// More than one attempt was needed.
    pub(crate) retried: bool,
    pub(crate) compensation: bool,
    /// Everything known, for a tooltip.
    pub(crate) detail: String,
}

/// What a lane shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LaneKind {
    Run,
    Activity,
    Timer,
    Signal,
    Child,
}

/// A row of the picture.
#[derive(Debug, Clone)]
pub(crate) struct Lane {
    pub(crate) name: String,
    pub(crate) kind: LaneKind,
    pub(crate) bars: Vec<Bar>,
}

/// The picture of one run.
#[derive(Debug, Clone)]
pub(crate) struct Timeline {
    pub(crate) title: String,
    pub(crate) subtitle: String,
    pub(crate) start_ms: u64,
    pub(crate) end_ms: u64,
    pub(crate) lanes: Vec<Lane>,
}

impl Timeline {
    /// The timeline of `info`'s current run, whose history is `history`, with the attempts
    /// journaled for it (`attempts` of other runs are ignored).
    pub(crate) fn build(
        info: &InstanceInfo,
        history: &[HistoryEvent],
        attempts: &[AttemptRecord],
    ) -> Self {
        let start_ms = history
            .first()
            .map_or(info.created_at_ms, |e| e.recorded_at_ms);
        // An attempt may have ended after the last event (its outcome not yet delivered).
        let last_attempt_ms = attempts
            .iter()
            .filter(|a| a.generation == info.generation)
            .map(|a| a.ended_at_ms)
            .max();
        // Never before the start: recorded times need not increase (an imported history, a
        // clock stepped back), and the bars below subtract one from the other.
        let last_ms = history
            .last()
            .map_or(start_ms, |e| e.recorded_at_ms)
            .max(last_attempt_ms.unwrap_or(0))
            .max(start_ms);
        let ended = history.last().and_then(|e| match &e.event {
            Event::InstanceCompleted { .. } => Some(BarState::Done),
            Event::InstanceFailed { .. }
            | Event::InstanceCancelled { .. }
            | Event::InstanceTerminated { .. } => Some(BarState::Failed),
            Event::ContinuedAsNew { .. } => Some(BarState::Done),
            _ => None,
        });
        // An open run is drawn a little past its last event, so that open bars show as open.
        let end_ms = if ended.is_some() {
            last_ms.max(start_ms + 1)
        } else {
            last_ms.saturating_add(((last_ms - start_ms) / 10).max(1))
        };
        let run = Bar {
            label: match ended {
                Some(_) => format!("{} {}", info.coordinator, info.status),
                None => format!("{} {} (no end yet)", info.coordinator, info.status),
            },
            start_ms,
            end_ms: if ended.is_some() { last_ms } else { end_ms },
            state: ended.unwrap_or(BarState::Pending),
            retried: false,
            compensation: false,
            detail: format!(
                "{} ({}): {}, {} events, {}",
                info.id,
                info.coordinator,
                info.status,
                history.len(),
                duration(last_ms - start_ms)
            ),
        };
        let mut lanes = vec![Lane {
            name: "run".to_string(),
            kind: LaneKind::Run,
            bars: vec![run],
        }];
        for call in calls(history) {
            let (kind, name) = match call.kind {
                CallKind::Activity => (LaneKind::Activity, call.name.clone()),
                CallKind::Timer => (LaneKind::Timer, "timers".to_string()),
                CallKind::Signal => (LaneKind::Signal, format!("signal {}", call.name)),
                CallKind::Child => (LaneKind::Child, format!("child {}", call.name)),
            };
            let tried: Vec<&AttemptRecord> = match (call.kind, call.seq) {
                (CallKind::Activity, Some(seq)) => attempts
                    .iter()
                    .filter(|a| a.generation == info.generation && a.seq == seq)
                    .collect(),
                _ => Vec::new(),
            };
            let bars = if tried.is_empty() {
                vec![bar_of(&call, end_ms, ended.is_some())]
            } else {
                attempt_bars(&call, &tried, end_ms, ended.is_some())
            };
            match lanes.iter_mut().find(|l| l.kind == kind && l.name == name) {
                Some(lane) => lane.bars.extend(bars),
                None => lanes.push(Lane { name, kind, bars }),
            }
        }
        Timeline {
            title: format!("{} ({})", info.id, info.coordinator),
            subtitle: format!(
                "{}; started {} UTC; {} events over {}",
                info.status,
                utc(start_ms),
                history.len(),
                duration(last_ms - start_ms)
            ),
            start_ms,
            end_ms,
            lanes,
        }
    }

    /// A Mermaid Gantt chart of the timeline.
    pub(crate) fn to_mermaid(&self) -> String {
        let mut out = String::new();
        out.push_str("gantt\n");
        out.push_str(&format!(
            "    title {} - {}\n",
            mermaid_text(&self.title),
            mermaid_text(&self.subtitle)
        ));
        out.push_str("    dateFormat x\n");
        out.push_str("    axisFormat %M:%S.%L\n");
        let mut id = 0;
        for lane in &self.lanes {
            out.push_str(&format!("    section {}\n", mermaid_text(&lane.name)));
            for bar in &lane.bars {
                let mut tags = Vec::new();
                match bar.state {
                    BarState::Failed => tags.push("crit"),
                    BarState::Pending => tags.push("active"),
                    BarState::Dropped => {}
                    BarState::Done => tags.push("done"),
                }
                if bar.compensation && bar.state != BarState::Failed {
                    // Mermaid has few styles: show compensations as critical work.
                    tags = vec!["crit", "active"];
                }
                id += 1;
                // Mermaid draws nothing for an empty bar.
                let end = bar.end_ms.max(bar.start_ms + 1);
                out.push_str(&format!(
                    "    {} :{}, b{id}, {}, {}\n",
                    mermaid_text(&bar.label),
                    tags.join(", "),
                    bar.start_ms,
                    end
                ));
            }
        }
        out
    }
}

fn bar_of(call: &Call, axis_end_ms: u64, run_ended: bool) -> Bar {
    let attempts = call.attempts.unwrap_or(1);
    let state = match &call.outcome {
        Outcome::Done => BarState::Done,
        Outcome::Failed(_) => BarState::Failed,
        Outcome::Pending if run_ended => BarState::Dropped,
        Outcome::Pending => BarState::Pending,
    };
    let end_ms = match state {
        // A dropped call is drawn as a sliver where it was made.
        BarState::Dropped => call.started_at_ms,
        _ => call.ended_at_ms.unwrap_or(axis_end_ms),
    };
    let took = duration(end_ms.saturating_sub(call.started_at_ms));
    let call_name = call.seq.map_or_else(String::new, |s| format!("call {s} "));
    let mut label = match (call.kind, &call.outcome, state) {
        (_, _, BarState::Dropped) => format!("{call_name}never answered"),
        (_, Outcome::Pending, _) => format!("{call_name}pending"),
        (_, Outcome::Failed(_), _) => format!("{call_name}failed after {took}"),
        (CallKind::Signal, _, _) if call.seq.is_none() => "received, never awaited".to_string(),
        (CallKind::Signal, _, _) => format!("{call_name}waited {took}"),
        (CallKind::Timer, _, _) => format!("{call_name}fired after {took}"),
        (_, Outcome::Done, _) => format!("{call_name}{took}"),
    };
    if call.kind == CallKind::Activity && attempts > 1 {
        label.push_str(&format!(", {attempts} attempts"));
    }
    if call.compensation {
        label = format!("compensation {label}");
    }
    let mut detail = match call.seq {
        Some(seq) => format!("{} (call {seq}, position {})", call.name, call.position),
        None => format!("signal {}", call.name),
    };
    detail.push_str(&match (&call.outcome, state) {
        (_, BarState::Dropped) => ": never answered; the run ended without it".to_string(),
        (Outcome::Done, _) => format!(": done in {took}"),
        (Outcome::Failed(e), _) => format!(": failed after {took}: {e}"),
        (Outcome::Pending, _) => ": no outcome yet".to_string(),
    });
    if let Some(n) = call.attempts {
        detail.push_str(&format!("; attempt {n}"));
    }
    if !call.detail.is_empty() {
        detail.push_str(&format!("; {}", call.detail));
    }
    if call.compensation {
        detail.push_str("; compensation (scheduled after the run began unwinding)");
    }
    Bar {
        label,
        start_ms: call.started_at_ms,
        end_ms,
        state,
        retried: attempts > 1,
        compensation: call.compensation,
        detail,
    }
}

/// One bar per journaled attempt of an activity call; a call still without an outcome gets an
/// open bar from its last attempt's end (a backoff or an attempt running now; or, after a final
/// attempt, the wait for the activation that delivers its outcome).
fn attempt_bars(
    call: &Call,
    tried: &[&AttemptRecord],
    axis_end_ms: u64,
    run_ended: bool,
) -> Vec<Bar> {
    let retried = tried.len() > 1;
    let seq = call.seq.map_or_else(String::new, |s| format!("call {s} "));
    let mut bars: Vec<Bar> = tried
        .iter()
        .map(|a| {
            let took = duration(a.ended_at_ms.saturating_sub(a.started_at_ms));
            let (state, what) = match a.outcome {
                AttemptEnd::Completed => (BarState::Done, format!("done in {took}")),
                AttemptEnd::Failed => (BarState::Failed, format!("failed for good after {took}")),
                AttemptEnd::Retry => (BarState::Failed, format!("failed after {took}, retried")),
            };
            let mut label = match a.outcome {
                AttemptEnd::Completed => format!("{seq}attempt {} {took}", a.attempt),
                AttemptEnd::Failed => format!("{seq}attempt {} failed", a.attempt),
                AttemptEnd::Retry => format!("{seq}attempt {} failed, retry", a.attempt),
            };
            if call.compensation {
                label = format!("compensation {label}");
            }
            let mut detail = format!(
                "{} (call {}, position {}): attempt {} {what}",
                call.name,
                call.seq.unwrap_or_default(),
                call.position,
                a.attempt
            );
            if let Some(error) = &a.error {
                detail.push_str(&format!(": {error}"));
            }
            detail.push_str(&format!(
                "; started {} UTC, ended {} UTC",
                utc(a.started_at_ms),
                utc(a.ended_at_ms)
            ));
            if call.compensation {
                detail.push_str("; compensation (scheduled after the run began unwinding)");
            }
            Bar {
                label,
                start_ms: a.started_at_ms,
                end_ms: a.ended_at_ms,
                state,
                retried,
                compensation: call.compensation,
                detail,
            }
        })
        .collect();
    if matches!(call.outcome, Outcome::Pending) {
        let retrying = tried.last().is_some_and(|a| a.outcome == AttemptEnd::Retry);
        let from = tried.last().map_or(call.started_at_ms, |a| a.ended_at_ms);
        let mut open = bar_of(call, axis_end_ms, run_ended);
        if open.state == BarState::Pending {
            open.start_ms = from.min(axis_end_ms);
            open.label = if retrying {
                format!("{seq}next attempt pending")
            } else {
                format!("{seq}pending, outcome not yet delivered")
            };
        }
        open.retried = retried;
        bars.push(open);
    }
    bars
}

/// Text Mermaid accepts in a title, section or task name: no `:`, `#` or `;`.
fn mermaid_text(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            ':' | ';' | '#' => ' ',
            '\n' => ' ',
            c => c,
        })
        .collect::<String>()
        .trim()
        .to_string()
}
