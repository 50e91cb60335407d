//! `parked list | replay | purge`: what operators do with the parking queue.
//!
//! Messages are read with `basic.get` and settled one by one: a listed message is requeued, a
//! replayed one is republished (with a confirm) to its original exchange and routing key before
//! its parked copy is acknowledged, a purged one is acknowledged.

use anyhow::Context;
use lapin::message::Delivery;
use serde::Serialize;

use super::connect;
use crate::broker::parking::{ParkedHeaders, replay_properties};
use crate::broker::{Publisher, ack, requeue};
use crate::config::Settings;
use crate::messages::peek;

/// What to do with the selected parked messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Print them and leave them parked.
    List,
    /// Send them back to the input exchange.
    Replay,
    /// Delete them.
    Purge,
}

/// Which parked messages an action applies to.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Only these message ids (from the body, or the AMQP `message_id` property).
    pub message_ids: Vec<String>,
    /// Only messages parked with this reason code.
    pub reason: Option<String>,
    /// At most this many.
    pub limit: Option<usize>,
}

/// One parked message as `parked list` prints it. No body: it may hold personal data.
#[derive(Debug, Clone, Serialize)]
pub struct ParkedSummary {
    /// The body's `message_id`, or the AMQP property, if either is present.
    pub message_id: Option<String>,
    /// What the parking (or dead-lettering) headers say: reason, detail, when, and where it was
    /// first published.
    #[serde(flatten)]
    pub headers: ParkedHeaders,
    /// Body size in bytes.
    pub bytes: usize,
}

fn summarise(delivery: &Delivery) -> ParkedSummary {
    ParkedSummary {
        message_id: peek(&delivery.data).message_id.or_else(|| {
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned())
        }),
        headers: ParkedHeaders::read(
            &delivery.properties,
            delivery.exchange.as_str(),
            delivery.routing_key.as_str(),
        ),
        bytes: delivery.data.len(),
    }
}

fn selected(summary: &ParkedSummary, selection: &Selection) -> bool {
    let id_ok = selection.message_ids.is_empty()
        || summary.message_id.as_ref().is_some_and(|id| {
            selection
                .message_ids
                .iter()
                .any(|wanted| wanted.eq_ignore_ascii_case(id))
        });
    let reason_ok = selection
        .reason
        .as_ref()
        .is_none_or(|r| summary.headers.reason.as_ref() == Some(r));
    id_ok && reason_ok
}

/// Applies `action` to the selected parked messages and returns their summaries.
pub async fn act(
    settings: &Settings,
    action: Action,
    selection: &Selection,
) -> anyhow::Result<Vec<ParkedSummary>> {
    let broker = connect::broker(settings, "induction-reconciler parked").await?;
    let reader = broker
        .reader(&settings.topology.parking_queue)
        .await
        .context("cannot open a channel")?;
    let publisher = broker.publisher().await?;
    let mut done = Vec::new();
    let mut untouched = Vec::new();
    // Read the messages parked when the command started, and no more: a replayed message may be
    // parked again while we read. Messages not acted on stay unacknowledged (so they are not read
    // twice) and go back to the queue at the end.
    let parked_now = reader
        .ready()
        .await
        .context("cannot find the parking queue")?;
    for _ in 0..parked_now {
        let Some(delivery) = reader
            .get()
            .await
            .context("cannot read the parking queue")?
        else {
            break;
        };
        let summary = summarise(&delivery);
        let wanted =
            selected(&summary, selection) && selection.limit.is_none_or(|limit| done.len() < limit);
        if !wanted {
            untouched.push(delivery.acker);
            continue;
        }
        if action == Action::List {
            untouched.push(delivery.acker);
            done.push(summary);
            continue;
        }
        if action == Action::Replay {
            replay(settings, &publisher, &delivery, &summary).await?;
        }
        anyhow::ensure!(
            ack(&delivery.acker).await,
            "cannot acknowledge a parked message (the broker connection was lost)"
        );
        done.push(summary);
    }
    let returned = untouched.len() as u32;
    for acker in untouched {
        requeue(&acker).await;
    }
    wait_until_ready(&reader, returned).await;
    broker.close().await;
    Ok(done)
}

/// Waits (at most five seconds) until the messages this command returned are ready in the queue
/// again. A quorum queue applies a requeue asynchronously, and the next command counts only
/// ready messages: without this, `parked purge --all` right after another `parked` command can
/// find nothing to purge.
async fn wait_until_ready(reader: &crate::broker::QueueReader, returned: u32) {
    if returned == 0 {
        return;
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while tokio::time::Instant::now() < deadline {
        if reader.ready().await.is_ok_and(|ready| ready >= returned) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Republishes a parked message to its original exchange and routing key, with a confirm.
async fn replay(
    settings: &Settings,
    publisher: &Publisher,
    delivery: &Delivery,
    summary: &ParkedSummary,
) -> anyhow::Result<()> {
    let exchange = summary
        .headers
        .original_exchange
        .clone()
        .unwrap_or_else(|| settings.topology.input_exchange.clone());
    let routing_key = summary
        .headers
        .original_routing_key
        .clone()
        .unwrap_or_default();
    publisher
        .publish(
            &exchange,
            &routing_key,
            &delivery.data,
            replay_properties(&delivery.properties),
        )
        .await
        .with_context(|| format!("cannot replay to exchange {exchange:?}"))
}
