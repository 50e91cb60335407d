//! Declares the exchanges, queues and bindings of CONTRACT.md section 2. Idempotent: declaring
//! what exists with the same arguments changes nothing.

use lapin::Channel;
use lapin::ExchangeKind;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use super::BrokerError;
use crate::config::Topology;

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value))
}

fn quorum(extra: &[(&str, AMQPValue)]) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(ShortString::from("x-queue-type"), text("quorum"));
    for (key, value) in extra {
        args.insert(ShortString::from(*key), value.clone());
    }
    args
}

const DURABLE_EXCHANGE: ExchangeDeclareOptions = ExchangeDeclareOptions {
    passive: false,
    durable: true,
    auto_delete: false,
    internal: false,
    nowait: false,
};

const DURABLE_QUEUE: QueueDeclareOptions = QueueDeclareOptions {
    passive: false,
    durable: true,
    exclusive: false,
    auto_delete: false,
    nowait: false,
};

/// The inbox queue's arguments: quorum, an explicit delivery limit, and at-least-once
/// dead-lettering into the parking queue (which needs `reject-publish` overflow).
pub fn inbox_arguments(t: &Topology) -> FieldTable {
    quorum(&[
        (
            "x-delivery-limit",
            AMQPValue::LongLongInt(i64::from(t.delivery_limit)),
        ),
        ("x-dead-letter-exchange", text("")),
        ("x-dead-letter-routing-key", text(&t.parking_queue)),
        ("x-dead-letter-strategy", text("at-least-once")),
        ("x-overflow", text("reject-publish")),
    ])
}

/// Declares the whole topology.
///
/// The inbox is a quorum queue with an explicit delivery limit (RabbitMQ 3.10 has none by
/// default; 4.x defaults to 20) that dead-letters, at least once, into the parking queue. The
/// outcome exchange has an alternate exchange so that an outcome no queue is bound for is kept
/// in the unrouted queue instead of vanishing.
pub async fn declare_topology(channel: &Channel, t: &Topology) -> Result<(), BrokerError> {
    channel
        .exchange_declare(
            t.input_exchange.as_str().into(),
            ExchangeKind::Topic,
            DURABLE_EXCHANGE,
            FieldTable::default(),
        )
        .await?;
    channel
        .exchange_declare(
            t.unrouted_exchange.as_str().into(),
            ExchangeKind::Fanout,
            DURABLE_EXCHANGE,
            FieldTable::default(),
        )
        .await?;
    let mut outcome_args = FieldTable::default();
    outcome_args.insert(
        ShortString::from("alternate-exchange"),
        text(&t.unrouted_exchange),
    );
    channel
        .exchange_declare(
            t.outcome_exchange.as_str().into(),
            ExchangeKind::Topic,
            DURABLE_EXCHANGE,
            outcome_args,
        )
        .await?;

    channel
        .queue_declare(t.parking_queue.as_str().into(), DURABLE_QUEUE, quorum(&[]))
        .await?;
    channel
        .queue_declare(t.unrouted_queue.as_str().into(), DURABLE_QUEUE, quorum(&[]))
        .await?;
    channel
        .queue_bind(
            t.unrouted_queue.as_str().into(),
            t.unrouted_exchange.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

    channel
        .queue_declare(
            t.inbox_queue.as_str().into(),
            DURABLE_QUEUE,
            inbox_arguments(t),
        )
        .await?;
    for key in [&t.registration_routing_key, &t.claim_routing_key] {
        channel
            .queue_bind(
                t.inbox_queue.as_str().into(),
                t.input_exchange.as_str().into(),
                key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

/// Consumes, without acknowledgements, a new exclusive queue bound to `exchange` with `pattern`:
/// how `watch` and the tests see outcomes as they are published. An empty `queue` lets the broker
/// name it. The queue goes when the channel closes.
pub async fn subscribe(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    pattern: &str,
) -> Result<lapin::Consumer, BrokerError> {
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            declared.name().clone(),
            exchange.into(),
            pattern.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(channel
        .basic_consume(
            declared.name().clone(),
            "subscriber".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?)
}
