//! `parked list | replay | purge`: what operators do with the parking queue.
//!
//! Messages are read with `basic.get` and settled one by one: a listed message is requeued, a
//! replayed one is republished (with a confirm) to its original exchange and routing key before
//! its parked copy is acknowledged, a purged one is acknowledged.

use anyhow::Context;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde::Serialize;

use crate::config::Settings;

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
    /// `x-parked-reason`, or the broker's dead-letter reason (`delivery_limit`).
    pub reason: Option<String>,
    /// `x-parked-detail`.
    pub detail: Option<String>,
    /// `x-parked-at`.
    pub parked_at: Option<String>,
    /// Where it was first published.
    pub original_exchange: Option<String>,
    /// Its routing key.
    pub original_routing_key: Option<String>,
    /// Body size in bytes.
    pub bytes: usize,
}

fn header(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn summarise(
    properties: &lapin::BasicProperties,
    body: &[u8],
    exchange: &str,
    routing_key: &str,
) -> ParkedSummary {
    let headers = properties.headers().clone().unwrap_or_default();
    let body_id = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("message_id")
                .and_then(|m| m.as_str())
                .map(str::to_owned)
        });
    let dead_lettered = header(&headers, "x-first-death-reason");
    ParkedSummary {
        message_id: body_id.or_else(|| {
            properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned())
        }),
        reason: header(&headers, "x-parked-reason").or(dead_lettered),
        detail: header(&headers, "x-parked-detail"),
        parked_at: header(&headers, "x-parked-at"),
        original_exchange: header(&headers, "x-original-exchange")
            .or_else(|| header(&headers, "x-first-death-exchange"))
            .or_else(|| (!exchange.is_empty()).then(|| exchange.to_owned())),
        original_routing_key: header(&headers, "x-original-routing-key")
            .or_else(|| Some(routing_key.to_owned())),
        bytes: body.len(),
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
        .is_none_or(|r| summary.reason.as_ref() == Some(r));
    id_ok && reason_ok
}

/// Applies `action` to the selected parked messages and returns their summaries.
pub async fn act(
    settings: &Settings,
    action: Action,
    selection: &Selection,
) -> anyhow::Result<Vec<ParkedSummary>> {
    let broker = settings
        .connect_broker("induction-reconciler parked")
        .await?;
    let channel = broker.channel().await?;
    let publisher = broker.publisher().await?;
    let queue = settings.topology.parking_queue.as_str();
    let mut done = Vec::new();
    let mut untouched = Vec::new();
    // Read the messages parked when the command started, and no more: a replayed message may be
    // parked again while we read. Messages not acted on stay unacknowledged (so they are not read
    // twice) and go back to the queue at the end.
    let parked_now = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .context("cannot find the parking queue")?
        .message_count();
    for _ in 0..parked_now {
        let Some(message) = channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: false })
            .await
            .context("cannot read the parking queue")?
        else {
            break;
        };
        let delivery = message.delivery;
        let summary = summarise(
            &delivery.properties,
            &delivery.data,
            delivery.exchange.as_str(),
            delivery.routing_key.as_str(),
        );
        let wanted =
            selected(&summary, selection) && selection.limit.is_none_or(|limit| done.len() < limit);
        if !wanted {
            untouched.push(delivery.acker);
            continue;
        }
        match action {
            Action::List => untouched.push(delivery.acker),
            Action::Purge => {
                delivery.acker.ack(BasicAckOptions::default()).await?;
            }
            Action::Replay => {
                let exchange = summary
                    .original_exchange
                    .clone()
                    .unwrap_or_else(|| settings.topology.input_exchange.clone());
                let routing_key = summary.original_routing_key.clone().unwrap_or_default();
                let mut headers = delivery.properties.headers().clone().unwrap_or_default();
                let kept: std::collections::BTreeMap<_, _> = headers
                    .inner()
                    .iter()
                    .filter(|(k, _)| {
                        !k.as_str().starts_with("x-parked-")
                            && !k.as_str().starts_with("x-original-")
                            && !k.as_str().starts_with("x-death")
                            && !k.as_str().starts_with("x-first-death")
                            && !k.as_str().starts_with("x-last-death")
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                headers = FieldTable::from(kept);
                let properties = delivery.properties.clone().with_headers(headers);
                publisher
                    .publish(&exchange, &routing_key, &delivery.data, properties)
                    .await
                    .with_context(|| format!("cannot replay to exchange {exchange:?}"))?;
                delivery.acker.ack(BasicAckOptions::default()).await?;
            }
        }
        done.push(summary);
    }
    for acker in untouched {
        let _ = acker
            .nack(BasicNackOptions {
                multiple: false,
                requeue: true,
            })
            .await;
    }
    broker.close().await;
    Ok(done)
}
