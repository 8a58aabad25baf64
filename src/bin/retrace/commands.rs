//! One function per subcommand. Each checks what it can before changing anything, so that a
//! mistake (a missing or ended instance, a payload that is not JSON) changes nothing and gets a
//! message that says what to do.

use crate::events::{calls, rows};
use crate::table::{cut, duration, offset, payload, utc, Table};
use crate::timeline::Timeline;
use crate::{open, Cli, CliError, Command, StatusArg, TimelineFormat};
use retrace::runtime::client::instance_id_problem;
use retrace::runtime::store::transfer::export_instance;
use retrace::runtime::store::{CreateOutcome, ForkOutcome, ImportedInstance};
use retrace::sdk::HistoryExport;
use retrace::{
    migrate_urls, Client, ClientError, InstanceInfo, InstanceStatus, ListFilter, SharedStore,
    StoreError, StoreUrl,
};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::Path;

/// Runs the command line.
pub(crate) async fn run(cli: Cli) -> Result<(), CliError> {
    if let Command::Migrate { from, to, json } = &cli.command {
        return migrate(from, to, *json).await;
    }
    let target = open::Target::from_arg(cli.db.as_deref())?;
    let place = target.place();
    match cli.command {
        Command::List {
            status,
            coordinator,
            limit,
            json,
        } => list(&target.existing().await?, status, coordinator, limit, json).await,
        Command::Show { id, json } => show(&target.existing().await?, place, &id, json).await,
        Command::Export { id, output } => {
            export(&target.existing().await?, place, &id, output.as_deref()).await
        }
        Command::Import {
            file,
            id,
            create,
            json,
        } => {
            let store = target.existing_or_new(create).await?;
            import(&store, place, &file, id.as_deref(), json).await
        }
        Command::Signal {
            id,
            name,
            payload,
            once,
            json,
        } => {
            let store = target.existing().await?;
            signal(&store, place, &id, &name, &payload, once.as_deref(), json).await
        }
        Command::Cancel { id, reason, json } => {
            cancel(&target.existing().await?, place, &id, &reason, json).await
        }
        Command::Terminate { id, reason, json } => {
            terminate(&target.existing().await?, place, &id, &reason, json).await
        }
        Command::Resume { id, json } => resume(&target.existing().await?, place, &id, json).await,
        Command::Fork {
            id,
            at,
            new_id,
            json,
        } => fork(&target.existing().await?, place, &id, at, &new_id, json).await,
        Command::Timeline { id, format, output } => {
            let store = target.existing().await?;
            timeline(&store, place, &id, format, output.as_deref()).await
        }
        Command::Migrate { from, to, json } => migrate(&from, &to, json).await,
    }
}

/// Copies the SQLite store `from` into the PostgreSQL store `to` and says what was copied.
/// Instances of the same id that differ in the target are left alone, listed, and make the
/// command fail, so that a script notices.
async fn migrate(from: &str, to: &str, json: bool) -> Result<(), CliError> {
    let (source, target) = (StoreUrl::parse(from)?, StoreUrl::parse(to)?);
    // (A missing, foreign or busy source is refused before the target is touched, and left
    // as it is: `migrate_urls` checks it read-only first.)
    let report = migrate_urls(from, to).await?;
    // The report is printed first; a failure to print it (a reader gone) must not hide the
    // instances left alone, which make the command fail.
    let printed = if json {
        print_json(&json!({
            "from": source.to_string(),
            "to": target.to_string(),
            "copied": report.copied,
            "already_there": report.already_there,
            "different": report.different,
            "events": report.events,
            "inbox": report.inbox,
            "tasks": report.tasks,
            "timers": report.timers,
        }))
    } else {
        outln!(
            "migrated {source} to {target}: {} instance(s) copied ({} events, {} undelivered \
             message(s), {} activity task(s), {} timer(s)); {} already there",
            report.copied,
            report.events,
            report.inbox,
            report.tasks,
            report.timers,
            report.already_there
        )
        .map_err(CliError::from)
    };
    if report.different.is_empty() {
        return printed;
    }
    Err(CliError::new(format!(
        "{} instance(s) exist in {target} with other contents and were left alone: {}",
        report.different.len(),
        report.different.join(", ")
    )))
}

/// The instance, or a message naming the id and the store.
async fn describe(store: &SharedStore, place: &str, id: &str) -> Result<InstanceInfo, CliError> {
    store
        .describe(id)
        .await?
        .ok_or_else(|| CliError::new(format!("no instance {id} in {place}")))
}

fn print_json(value: &impl serde::Serialize) -> Result<(), CliError> {
    outln!("{}", serde_json::to_string_pretty(value)?)?;
    Ok(())
}

/// Writes `text` to `output`, or to standard output.
fn emit(text: &str, output: Option<&Path>) -> Result<(), CliError> {
    match output {
        Some(file) => std::fs::write(file, text)
            .map_err(|e| CliError::new(format!("cannot write {}: {e}", file.display()))),
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes())?;
            if !text.ends_with('\n') {
                out.write_all(b"\n")?;
            }
            Ok(())
        }
    }
}

fn status_of(arg: StatusArg) -> InstanceStatus {
    match arg {
        StatusArg::Running => InstanceStatus::Running,
        StatusArg::Completed => InstanceStatus::Completed,
        StatusArg::Failed => InstanceStatus::Failed,
        StatusArg::Cancelled => InstanceStatus::Cancelled,
        StatusArg::Terminated => InstanceStatus::Terminated,
        StatusArg::Stopped => InstanceStatus::Stopped,
    }
}

async fn list(
    store: &SharedStore,
    status: Option<StatusArg>,
    coordinator: Option<String>,
    limit: usize,
    json: bool,
) -> Result<(), CliError> {
    let filter = ListFilter {
        status: status.map(status_of),
        coordinator,
        limit: (limit > 0).then_some(limit),
    };
    let instances = store.list_instances(&filter).await?;
    let mut items = Vec::with_capacity(instances.len());
    for info in instances {
        // Only the last event is read, not the whole history.
        let last = match info.next_position.checked_sub(1) {
            Some(at) => match store.load(&info.id, at).await {
                Ok(loaded) => loaded.events.into_iter().last(),
                Err(StoreError::NotFound { .. }) => continue,
                Err(e) => return Err(e.into()),
            },
            None => None,
        };
        items.push((info, last));
    }
    if json {
        let mut out = Vec::with_capacity(items.len());
        for (info, last) in &items {
            let mut v = serde_json::to_value(info)?;
            if let Value::Object(map) = &mut v {
                map.insert(
                    "last_event".into(),
                    last.as_ref().map_or(Value::Null, |e| {
                        json!({"position": e.position, "kind": e.event.kind(),
                               "recorded_at_ms": e.recorded_at_ms})
                    }),
                );
            }
            out.push(v);
        }
        return print_json(&out);
    }
    let mut table = Table::new(
        &[
            "ID",
            "COORDINATOR",
            "STATUS",
            "STARTED (UTC)",
            "LAST EVENT",
            "CUSTOM STATUS / REASON",
        ],
        40,
    );
    let count = items.len();
    for (info, last) in items {
        let last = last.map_or_else(
            || "none yet".to_string(),
            |e| {
                // The time of day suffices when it is the day the instance started.
                let at = utc(e.recorded_at_ms);
                let started = utc(info.created_at_ms);
                let at = match (at.split_once(' '), started.split_once(' ')) {
                    (Some((day, time)), Some((start_day, _))) if day == start_day => {
                        time.to_string()
                    }
                    _ => at.clone(),
                };
                format!("{} {} {at}", e.position, e.event.kind())
            },
        );
        let mut note = info
            .custom_status
            .as_ref()
            .map(|v| payload(v, 40))
            .unwrap_or_default();
        if let Some(reason) = &info.reason {
            if !note.is_empty() {
                note.push_str("; ");
            }
            note.push_str(&cut(reason, 100));
        }
        table.row(vec![
            info.id,
            info.coordinator,
            info.status.to_string(),
            utc(info.created_at_ms),
            last,
            note,
        ]);
    }
    out!("{}", table.render())?;
    if count == limit && limit > 0 {
        eprintln!("(showing the newest {limit}; pass --limit 0 for all)");
    }
    Ok(())
}

async fn show(store: &SharedStore, place: &str, id: &str, json: bool) -> Result<(), CliError> {
    let info = describe(store, place, id).await?;
    let history = store.history(id).await?;
    // The attempt journal of the current run (empty for a store that keeps none).
    let attempts: Vec<_> = store
        .attempts(id)
        .await?
        .into_iter()
        .filter(|a| a.generation == info.generation)
        .collect();
    let calls = calls(&history);
    let rows = rows(&history);
    if json {
        return print_json(&json!({
            "instance": info,
            "events": rows,
            "calls": calls,
            "attempts": attempts,
        }));
    }
    let activations = history.last().map_or(0, |e| u64::from(e.activation) + 1);
    let mut head: Vec<(&str, String)> = vec![
        ("instance", info.id.clone()),
        ("coordinator", info.coordinator.clone()),
        ("status", info.status.to_string()),
        ("started", format!("{} UTC", utc(info.created_at_ms))),
    ];
    if let Some(ended) = info.ended_at_ms {
        head.push((
            "ended",
            format!(
                "{} UTC, after {}",
                utc(ended),
                duration(ended.saturating_sub(info.created_at_ms))
            ),
        ));
    }
    head.push(("input", payload(&info.input, 150)));
    if let Some(output) = &info.output {
        head.push(("output", payload(output, 150)));
    }
    if let Some(error) = &info.error {
        head.push(("error", error.to_string()));
    }
    if let Some(reason) = &info.reason {
        head.push(("reason", reason.clone()));
    }
    if let Some(custom) = &info.custom_status {
        head.push(("custom status", payload(custom, 150)));
    }
    if info.generation > 0 {
        head.push((
            "generation",
            format!(
                "{} (continued as new; this is the current run)",
                info.generation
            ),
        ));
    }
    head.push((
        "history",
        format!("{} events in {activations} activations", history.len()),
    ));
    for (key, value) in head {
        outln!("{key:<14} {value}")?;
    }
    outln!()?;
    let mut table = Table::new(
        &[
            "POS", "ACT", "TIME", "EVENT", "NAME", "SEQ", "ATTEMPT", "DURATION", "DETAIL",
        ],
        32,
    );
    for r in rows {
        table.row(vec![
            r.position.to_string(),
            r.activation.to_string(),
            offset(r.offset_ms),
            r.kind.to_string(),
            r.name,
            r.seq.map(|s| s.to_string()).unwrap_or_default(),
            r.attempt.map(|a| a.to_string()).unwrap_or_default(),
            r.duration_ms.map(duration).unwrap_or_default(),
            r.detail,
        ]);
    }
    out!("{}", table.render())?;
    if !attempts.is_empty() {
        let start_ms = history
            .first()
            .map_or(info.created_at_ms, |e| e.recorded_at_ms);
        let mut table = Table::new(
            &[
                "SEQ", "ACTIVITY", "ATTEMPT", "TIME", "DURATION", "OUTCOME", "ERROR",
            ],
            32,
        );
        for a in &attempts {
            let name = calls
                .iter()
                .find(|c| c.seq == Some(a.seq) && c.kind == crate::events::CallKind::Activity)
                .map(|c| c.name.clone())
                .unwrap_or_default();
            table.row(vec![
                a.seq.to_string(),
                name,
                a.attempt.to_string(),
                offset(a.started_at_ms.saturating_sub(start_ms)),
                duration(a.ended_at_ms.saturating_sub(a.started_at_ms)),
                a.outcome.as_str().to_string(),
                a.error.clone().unwrap_or_default(),
            ]);
        }
        outln!()?;
        outln!("activity attempts (from the store's attempt journal)")?;
        out!("{}", table.render())?;
    }
    Ok(())
}

async fn export(
    store: &SharedStore,
    place: &str,
    id: &str,
    output: Option<&Path>,
) -> Result<(), CliError> {
    let info = describe(store, place, id).await?;
    let history = store.history(id).await?;
    let text = export_instance(&info, history).to_json()?;
    emit(&text, output)
}

fn read_input(file: &Path) -> Result<String, CliError> {
    if file == Path::new("-") {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        return Ok(text);
    }
    std::fs::read_to_string(file)
        .map_err(|e| CliError::new(format!("cannot read {}: {e}", file.display())))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Refuses an id chosen for a new instance that could not name one (as `Client::start` does).
fn check_new_id(id: &str) -> Result<(), CliError> {
    match instance_id_problem(id) {
        Some(problem) => Err(ClientError::InvalidId {
            instance_id: id.to_string(),
            problem,
        }
        .into()),
        None => Ok(()),
    }
}

async fn import(
    store: &SharedStore,
    place: &str,
    file: &Path,
    id: Option<&str>,
    json: bool,
) -> Result<(), CliError> {
    if let Some(id) = id {
        check_new_id(id)?;
    }
    let text = read_input(file)?;
    let export = HistoryExport::from_json(&text)
        .map_err(|e| CliError::new(format!("{}: {e}", file.display())))?;
    // The export's own id names a new instance in this store too: an old export may carry
    // one that `Client::start` would now refuse.
    if id.is_none() {
        if let Some(problem) = instance_id_problem(&export.instance.id) {
            return Err(CliError::new(format!(
                "{}: the exported instance's id {:?} cannot name a new instance ({problem}); \
                 pass --id NEW to import it under another id",
                file.display(),
                export.instance.id
            )));
        }
    }
    let imported = ImportedInstance::from_export(&export, id, now_ms())?;
    let (new_id, status, events) = (imported.id.clone(), imported.status, imported.events.len());
    let (tasks, timers) = (imported.tasks.len(), imported.timers.len());
    let coordinator = imported.coordinator.clone();
    match store.import_instance(imported).await? {
        CreateOutcome::Created => {}
        CreateOutcome::Existing(_) => {
            return Err(CliError::new(format!(
                "instance {new_id} already exists in {}; pass --id NEW to import under another id",
                place
            )))
        }
    }
    if json {
        return print_json(&json!({
            "instance_id": new_id, "status": status, "events": events,
            "tasks_recreated": tasks, "timers_recreated": timers,
        }));
    }
    outln!(
        "imported {} as {new_id}: {status}, {events} events",
        export.instance.id
    )?;
    if !status.is_final() {
        outln!(
            "re-created {tasks} activity task(s) and {timers} timer(s) for calls without an \
             outcome; a worker that runs coordinator {coordinator} will continue it"
        )?;
    }
    Ok(())
}

/// Refuses to act on an instance that has ended.
fn not_ended(info: &InstanceInfo, what: &str) -> Result<(), CliError> {
    if info.status.is_final() {
        return Err(CliError::new(format!(
            "instance {} is {}: it {what}",
            info.id, info.status
        )));
    }
    Ok(())
}

async fn signal(
    store: &SharedStore,
    place: &str,
    id: &str,
    name: &str,
    payload_text: &str,
    once: Option<&str>,
    json: bool,
) -> Result<(), CliError> {
    let payload: Value = serde_json::from_str(payload_text).map_err(|e| {
        CliError::new(format!(
            "the payload is not JSON ({e}); quote text as JSON, for example '\"yes\"'"
        ))
    })?;
    let info = describe(store, place, id).await?;
    not_ended(&info, "takes no more signals")?;
    let client = Client::new(store.clone());
    let accepted = match once {
        Some(signal_id) => client.signal_once(id, name, &payload, signal_id).await?,
        None => {
            client.signal(id, name, &payload).await?;
            true
        }
    };
    if json {
        return print_json(&json!({"instance_id": id, "signal": name, "accepted": accepted}));
    }
    if accepted {
        outln!("signal {name} delivered to {id}")?;
    } else {
        outln!("signal {name} ignored: one with this id was already delivered to {id}")?;
    }
    Ok(())
}

async fn cancel(
    store: &SharedStore,
    place: &str,
    id: &str,
    reason: &str,
    json: bool,
) -> Result<(), CliError> {
    let info = describe(store, place, id).await?;
    not_ended(&info, "cannot be cancelled")?;
    Client::new(store.clone()).cancel(id, reason).await?;
    if json {
        return print_json(&json!({"instance_id": id, "cancel_requested": true}));
    }
    outln!(
        "cancellation of {id} requested; it ends once a worker running {} has delivered it \
         (its code may compensate first)",
        info.coordinator
    )?;
    Ok(())
}

async fn terminate(
    store: &SharedStore,
    place: &str,
    id: &str,
    reason: &str,
    json: bool,
) -> Result<(), CliError> {
    let info = describe(store, place, id).await?;
    not_ended(&info, "cannot be terminated")?;
    Client::new(store.clone()).terminate(id, reason).await?;
    if json {
        return print_json(&json!({"instance_id": id, "status": "terminated"}));
    }
    outln!("{id} terminated: {reason}")?;
    Ok(())
}

async fn resume(store: &SharedStore, place: &str, id: &str, json: bool) -> Result<(), CliError> {
    let info = describe(store, place, id).await?;
    if info.status.is_final() {
        return Err(CliError::new(format!(
            "instance {id} is {}: only a stopped (or waiting) instance can be resumed; to re-run \
             it, fork it: retrace fork {id} --at POSITION --new-id NEW",
            info.status
        )));
    }
    Client::new(store.clone()).resume(id).await?;
    if json {
        return print_json(&json!({"instance_id": id, "was": info.status, "status": "running"}));
    }
    match info.reason {
        Some(reason) => outln!("{id} resumed (was {}: {reason})", info.status)?,
        None => outln!("{id} resumed (was {})", info.status)?,
    }
    outln!(
        "a worker that runs coordinator {} will replay it against its current code",
        info.coordinator
    )?;
    Ok(())
}

async fn fork(
    store: &SharedStore,
    place: &str,
    id: &str,
    at: u64,
    new_id: &str,
    json: bool,
) -> Result<(), CliError> {
    check_new_id(new_id)?;
    let info = describe(store, place, id).await?;
    let outcome = store.fork_instance(id, at, new_id).await?;
    let ForkOutcome::Forked {
        kept_events,
        tasks,
        timers,
    } = outcome
    else {
        return Err(CliError::new(format!(
            "instance {new_id} already exists in {}; choose another --new-id",
            place
        )));
    };
    if json {
        return print_json(&json!({
            "instance_id": new_id, "source": id, "requested_position": at,
            "kept_events": kept_events, "tasks_recreated": tasks, "timers_recreated": timers,
        }));
    }
    outln!("forked {id} into {new_id}, keeping its first {kept_events} events")?;
    if kept_events != at {
        outln!(
            "(asked for {at}: the cut is rounded down to the start of an activation, and never \
             keeps the end of the run)"
        )?;
    }
    outln!(
        "re-created {tasks} activity task(s) and {timers} timer(s); a worker that runs \
         coordinator {} will continue {new_id}. {id} is unchanged.",
        info.coordinator
    )?;
    Ok(())
}

async fn timeline(
    store: &SharedStore,
    place: &str,
    id: &str,
    format: TimelineFormat,
    output: Option<&Path>,
) -> Result<(), CliError> {
    let info = describe(store, place, id).await?;
    let history = store.history(id).await?;
    let attempts = store.attempts(id).await?;
    let timeline = Timeline::build(&info, &history, &attempts);
    let text = match format {
        TimelineFormat::Mermaid => timeline.to_mermaid(),
        TimelineFormat::Svg => crate::svg::render(&timeline),
    };
    emit(&text, output)
}
