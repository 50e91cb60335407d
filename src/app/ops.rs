//! One-shot operator commands: `migrate` and `publish`.

use std::io::BufRead;
use std::time::Duration;

use anyhow::Context;
use futures_lite::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;

use crate::broker::{Broker, json_properties};
use crate::config::Settings;
use crate::store::Store;

/// Applies pending migrations.
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    let store = Store::connect(
        &settings.database_url()?,
        2,
        Duration::from_secs(settings.database.acquire_timeout_seconds),
    )
    .await
    .context("cannot connect to the database")?;
    store.migrate().await.context("cannot apply migrations")?;
    println!("migrations applied");
    Ok(())
}

/// Publishes each line of `input` to the input exchange with a confirm. A line that is not a
/// JSON object with a known `message_type` goes with the registration routing key, so that the
/// worker parks it (this command is also how test data reaches the worker).
pub async fn publish(settings: &Settings, input: Box<dyn BufRead>) -> anyhow::Result<()> {
    let broker = Broker::connect(&settings.amqp_url()?, "induction-reconciler publish")
        .await
        .context("cannot connect to the broker")?;
    let publisher = broker.publisher().await?;
    let t = &settings.topology;
    let mut pending = Vec::new();
    let mut count = 0usize;
    for line in input.split(b'\n') {
        let line = line.context("cannot read the input")?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let value: Option<serde_json::Value> = serde_json::from_slice(&line).ok();
        let routing_key = match value
            .as_ref()
            .and_then(|v| v.get("message_type"))
            .and_then(|v| v.as_str())
        {
            Some("ab_claim") => &t.claim_routing_key,
            _ => &t.registration_routing_key,
        };
        let message_id = value
            .as_ref()
            .and_then(|v| v.get("message_id"))
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned();
        let properties = json_properties(&message_id, FieldTable::default());
        pending.push(
            publisher
                .send(&t.input_exchange, routing_key, &line, properties)
                .await?,
        );
        count += 1;
        if pending.len() >= 500 {
            for confirm in pending.drain(..) {
                confirm.wait().await?;
            }
        }
    }
    for confirm in pending {
        confirm.wait().await?;
    }
    broker.close().await;
    println!("published {count} messages");
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
    let broker = Broker::connect(&settings.amqp_url()?, "induction-reconciler watch")
        .await
        .context("cannot connect to the broker")?;
    let channel = broker.channel().await?;
    let queue = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .context("cannot declare a temporary queue")?;
    let pattern = format!("outcome.{}", status.unwrap_or("*"));
    channel
        .queue_bind(
            queue.name().clone(),
            settings.topology.outcome_exchange.as_str().into(),
            pattern.as_str().into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .context("cannot bind to the outcome exchange (is the topology declared?)")?;
    let mut consumer = channel
        .basic_consume(
            queue.name().clone(),
            "watch".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
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
