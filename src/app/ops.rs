//! One-shot operator commands: `migrate`, `publish`, `watch`, `explain`, `parked` and
//! `outbox status` (`resync` and `verify` have modules of their own).

use std::io::BufRead;

use anyhow::Context;
use futures_lite::StreamExt;
use lapin::types::FieldTable;

use super::connect::{self, store};
use super::parked::{Action, Selection, act};
use super::progress::{Progress, WhenPiped};
use crate::broker::{Outgoing, Publisher, json_properties, subscribe};
use crate::config::Settings;
use crate::domain::Origin;
use crate::messages::peek;

/// Applies pending migrations.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let store = store(settings).await?;
    store.migrate().await.context("cannot apply migrations")?;
    println!("migrations applied");
    Ok(())
}

/// Publishes each line of `input` to the input exchange with a confirm. A line that is not a
/// JSON object with a known `message_type` goes with the registration routing key, so that the
/// worker parks it (this command is also how test data reaches the worker). With `origin`,
/// every message that does not say its origin is stamped with it. `total`, the number of lines
/// when known, lets the progress bar show the time left.
pub async fn publish(
    settings: &Settings,
    input: Box<dyn BufRead>,
    origin: Option<Origin>,
    total: Option<u64>,
) -> anyhow::Result<()> {
    /// Lines sent before their confirms are awaited.
    const WINDOW: usize = 500;
    let broker = connect::broker(settings, "induction-reconciler publish").await?;
    let publisher = broker.publisher().await?;
    let mut window: Vec<Vec<u8>> = Vec::with_capacity(WINDOW);
    let mut progress = Progress::new("messages published", total, WhenPiped::Quiet);
    for line in input.split(b'\n') {
        let line = line.context("cannot read the input")?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        window.push(match origin {
            Some(origin) => stamp_origin(line, origin),
            None => line,
        });
        if window.len() >= WINDOW {
            publish_lines(settings, &publisher, &window).await?;
            progress.advance(window.len() as u64);
            window.clear();
        }
    }
    publish_lines(settings, &publisher, &window).await?;
    progress.advance(window.len() as u64);
    progress.finish();
    broker.close().await;
    println!(
        "published {} messages in {:.1} s ({:.0} per second)",
        progress.done(),
        progress.elapsed().as_secs_f64(),
        progress.rate()
    );
    Ok(())
}

/// Stamps `origin` on a message that does not give one (absent or null). Anything else is
/// left byte for byte as it was, including a line that is not a JSON object (the worker parks
/// it) and one that already says its origin.
pub fn stamp_origin(line: Vec<u8>, origin: Origin) -> Vec<u8> {
    let Ok(serde_json::Value::Object(mut envelope)) = serde_json::from_slice(&line) else {
        return line;
    };
    match envelope.get("origin") {
        None => {
            // Insert right after the opening brace, keeping the rest of the bytes unchanged.
            let Some(brace) = line.iter().position(|&b| b == b'{') else {
                return line;
            };
            let field = format!("\"origin\":\"{}\"", origin.as_str());
            let rest = &line[brace + 1..];
            let empty = rest.iter().all(|b| b.is_ascii_whitespace() || *b == b'}');
            let mut stamped = Vec::with_capacity(line.len() + field.len() + 1);
            stamped.extend_from_slice(&line[..=brace]);
            stamped.extend_from_slice(field.as_bytes());
            if !empty {
                stamped.push(b',');
            }
            stamped.extend_from_slice(rest);
            stamped
        }
        Some(serde_json::Value::Null) => {
            envelope.insert("origin".into(), origin.as_str().into());
            serde_json::to_vec(&envelope).unwrap_or(line)
        }
        Some(_) => line,
    }
}

/// Publishes `lines` with confirms; the routing key follows each line's `message_type`.
async fn publish_lines(
    settings: &Settings,
    publisher: &Publisher,
    lines: &[Vec<u8>],
) -> anyhow::Result<()> {
    let t = &settings.topology;
    let messages = lines.iter().map(|line| {
        let peeked = peek(line);
        let routing_key = match peeked.message_type.as_deref() {
            Some("ab_claim") => &t.claim_routing_key,
            _ => &t.registration_routing_key,
        };
        let message_id = peeked.message_id.unwrap_or_default();
        Outgoing {
            exchange: &t.input_exchange,
            routing_key,
            body: line,
            properties: json_properties(&message_id, FieldTable::default()),
        }
    });
    for result in publisher.publish_all(messages).await {
        result?;
    }
    Ok(())
}

/// Prints outcomes as they are published, until `count` were printed or `stop` resolves.
pub async fn watch(
    settings: &Settings,
    count: Option<u64>,
    status: Option<&str>,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    use std::io::Write;
    let broker = connect::broker(settings, "induction-reconciler watch").await?;
    let channel = broker.channel().await?;
    let pattern = format!("outcome.{}", status.unwrap_or("*"));
    let mut consumer = subscribe(&channel, "", &settings.topology.outcome_exchange, &pattern)
        .await
        .context("cannot subscribe to the outcome exchange (is the topology declared?)")?;
    tracing::info!(pattern = %pattern, "watching outcomes");
    let mut printed = 0u64;
    let mut stop = std::pin::pin!(stop);
    while count.is_none_or(|c| printed < c) {
        let delivery = tokio::select! {
            next = consumer.next() => match next {
                Some(delivery) => delivery?,
                None => break,
            },
            () = &mut stop => break,
        };
        let mut out = std::io::stdout().lock();
        out.write_all(&delivery.data)?;
        out.write_all(b"\n")?;
        out.flush()?;
        printed += 1;
    }
    broker.close().await;
    Ok(())
}

/// `explain <TRN>`.
pub async fn explain(settings: &Settings, trn: &str, json: bool) -> anyhow::Result<()> {
    let trn = crate::domain::Trn::parse(trn).context("a TRN is exactly 7 digits")?;
    let explanation = store(settings).await?.explain(&trn).await?;
    let records: Vec<serde_json::Value> = explanation.records.iter().map(record_json).collect();
    if json {
        let history: Vec<serde_json::Value> =
            explanation.history.iter().map(history_json).collect();
        let all = serde_json::json!({
            "trn": trn.as_str(),
            "records": records,
            "current_outcome": explanation.last_outcome,
            "history": history,
        });
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    println!("Teacher {}", trn.as_str());
    match &explanation.last_outcome {
        None => println!("\nNo outcome has been emitted for this teacher."),
        Some(outcome) => print_outcome(outcome),
    }
    println!("\nRecords held ({}):", records.len());
    for record in &records {
        println!("  {record}");
    }
    println!(
        "\nHistory ({} entries, oldest first):",
        explanation.history.len()
    );
    for entry in &explanation.history {
        print_history(entry);
    }
    Ok(())
}

fn rfc3339(at: time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn history_json(h: &crate::store::HistoryEntry) -> serde_json::Value {
    serde_json::json!({
        "at": rfc3339(h.at),
        "event": h.event, "message_id": h.message_id, "message_type": h.message_type,
        "record_kind": h.record_kind, "record_id": h.record_id,
        "outcome_id": h.outcome_id, "version": h.version, "status": h.status,
        "published_by": h.published_by,
    })
}

fn print_outcome(o: &crate::messages::OutcomeMessage) {
    println!(
        "\nCurrent outcome: {} ({}), version {}, decided {}",
        o.status,
        o.reason,
        o.version,
        rfc3339(o.decided_at)
    );
    if !o.discrepancies.is_empty() {
        println!("  discrepancies: {}", o.discrepancies.join(", "));
    }
    if o.overdue {
        let since = o.provisional_since.map(rfc3339).unwrap_or_default();
        println!("  overdue: provisional since {since}");
    }
    let r = &o.resolved;
    println!(
        "  appropriate body: {} (from {})",
        r.appropriate_body_id.as_deref().unwrap_or("-"),
        r.appropriate_body_source.as_deref().unwrap_or("-")
    );
    println!(
        "  training programme: {} (from {})",
        r.training_programme.as_deref().unwrap_or("-"),
        r.training_programme_source.as_deref().unwrap_or("-")
    );
    println!(
        "  lead provider: {}",
        r.lead_provider_id.as_deref().unwrap_or("-")
    );
}

fn print_history(h: &crate::store::HistoryEntry) {
    let at = rfc3339(h.at);
    match h.event.as_str() {
        "emitted" | "swept" => println!(
            "  {at}  {:<10} version {} {} (outcome {})",
            h.event,
            h.version.unwrap_or_default(),
            h.status.as_deref().unwrap_or(""),
            h.outcome_id.map(|u| u.to_string()).unwrap_or_default()
        ),
        _ => println!(
            "  {at}  {:<10} {} {} {} (message {}, published by {})",
            h.event,
            h.message_type.as_deref().unwrap_or(""),
            h.record_kind.as_deref().unwrap_or(""),
            h.record_id.as_deref().unwrap_or(""),
            h.message_id.map(|u| u.to_string()).unwrap_or_default(),
            h.published_by.as_deref().unwrap_or("-")
        ),
    }
}

fn record_json(snapshot: &crate::domain::Snapshot) -> serde_json::Value {
    use crate::domain::Record;
    let date = |d: time::Date| d.to_string();
    let at = snapshot
        .stamp
        .occurred_at
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    match &snapshot.record {
        Record::Registration(r) => serde_json::json!({
            "kind": "registration", "registration_id": r.registration_id.as_str(), "school_urn": r.school_urn.get(),
            "started_on": date(r.started_on), "finished_on": r.finished_on.map(date),
            "appropriate_body_id": r.appropriate_body_id.as_str(), "training_programme": r.training_programme.as_str(),
            "lead_provider_id": r.lead_provider_id.as_ref().map(|l| l.as_str()), "deleted": r.deleted,
            "origin": r.origin.as_str(), "occurred_at": at, "message_id": snapshot.stamp.message_id,
        }),
        Record::Claim(c) => serde_json::json!({
            "kind": "claim", "induction_period_id": c.induction_period_id.as_str(),
            "appropriate_body_id": c.appropriate_body_id.as_str(), "started_on": date(c.started_on),
            "finished_on": c.finished_on.map(date), "training_programme": c.training_programme.map(|p| p.as_str()),
            "number_of_terms": c.number_of_terms.map(|t| t.as_f64()), "outcome": c.outcome.map(|o| o.as_str()),
            "deleted": c.deleted, "origin": c.origin.as_str(), "occurred_at": at, "message_id": snapshot.stamp.message_id,
        }),
    }
}

/// `parked list | replay | purge`: applies `action` and prints what it did.
pub async fn parked(
    settings: &Settings,
    action: Action,
    selection: &Selection,
    json: bool,
) -> anyhow::Result<()> {
    let done = act(settings, action, selection).await?;
    match action {
        Action::List => {
            for s in &done {
                if json {
                    println!("{}", serde_json::to_string(s)?);
                } else {
                    println!(
                        "{}  {:<26} {:<30} {}  {}",
                        s.headers.parked_at.as_deref().unwrap_or("-"),
                        s.headers.reason.as_deref().unwrap_or("-"),
                        s.message_id.as_deref().unwrap_or("-"),
                        s.headers.original_routing_key.as_deref().unwrap_or("-"),
                        s.headers.detail.as_deref().unwrap_or("")
                    );
                }
            }
            eprintln!("{} parked messages listed", done.len());
        }
        Action::Replay => println!("{} parked messages replayed", done.len()),
        Action::Purge => println!("{} parked messages purged", done.len()),
    }
    Ok(())
}

/// `outbox status`.
pub async fn outbox_status(settings: &Settings) -> anyhow::Result<()> {
    let status = store(settings).await?.outbox_status().await?;
    let fmt = |t: Option<time::OffsetDateTime>| {
        t.and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "-".into())
    };
    let age = status
        .oldest_pending
        .map(|t| {
            format!(
                "{:.1}s",
                (time::OffsetDateTime::now_utc() - t).as_seconds_f64()
            )
        })
        .unwrap_or_else(|| "-".into());
    println!("pending: {}", status.pending);
    println!("oldest pending: {} (age {age})", fmt(status.oldest_pending));
    println!("last published: {}", fmt(status.last_published));
    println!("published: {}", status.published);
    Ok(())
}
