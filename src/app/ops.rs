//! One-shot operator commands: `migrate` and `publish`.

use std::io::BufRead;
use std::time::Duration;

use anyhow::Context;
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
