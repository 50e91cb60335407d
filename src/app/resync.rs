//! `resync`: sends a consumer that joined late (or lost its state) the latest outcome of every
//! selected teacher, exactly as it was first published (the same body bytes, so the same
//! `outcome_id`, `version` and fields; the `outcome_id` also as the AMQP `message_id`), to the
//! consumer's own queue through the default exchange, with publisher confirms.
//!
//! Safe while workers run: the consumer binds its queue to the outcome exchange first, so an
//! outcome decided during the resync reaches it live as well; whichever copy comes second is a
//! duplicate or an older version, which its usual de-duplication drops.

use anyhow::Context;

use super::connect::{self, store};
use super::progress::{Progress, WhenPiped};
use super::relay::outcome_properties;
use crate::broker::Outgoing;
use crate::config::Settings;
use crate::domain::{Status, Trn};
use crate::store::ResyncFilter;

/// Teachers read and published per page (one round of confirms each).
pub const PAGE: i64 = 1_000;

/// Checks the selection given on the command line: TRNs of seven digits, known statuses.
pub fn filter(trns: Vec<String>, statuses: Vec<String>) -> anyhow::Result<ResyncFilter> {
    for trn in &trns {
        anyhow::ensure!(
            Trn::parse(trn).is_some(),
            "--trn takes a TRN of exactly 7 digits"
        );
    }
    for status in &statuses {
        anyhow::ensure!(
            Status::ALL.iter().any(|s| s.as_str() == status),
            "--status must be one of confirmed, provisional, conflict, closed (got {status:?})"
        );
    }
    Ok(ResyncFilter { trns, statuses })
}

/// Runs `resync` to `queue` and returns how many outcomes were sent (each confirmed).
pub async fn resync(
    settings: &Settings,
    queue: &str,
    filter: &ResyncFilter,
) -> anyhow::Result<u64> {
    let store = store(settings).await?;
    let broker = connect::broker(settings, "induction-reconciler resync").await?;
    let channel = broker.channel().await?;
    crate::broker::ready(&channel, queue).await.with_context(|| {
        format!("the queue {queue:?} does not exist: declare it and bind it to the outcome exchange first, then resync")
    })?;
    let publisher = broker.publisher().await?;
    let total = store.resync_count(filter).await?;
    let mut progress = Progress::new("outcomes resent", Some(total), WhenPiped::Log);
    let mut after: Option<String> = None;
    loop {
        let page = store
            .resync_page(filter, after.as_deref(), PAGE)
            .await
            .context("cannot read a page of outcomes")?;
        let Some(last) = page.last() else { break };
        after = Some(last.trn.clone());
        let messages = page.iter().map(|p| Outgoing {
            exchange: "",
            routing_key: queue,
            body: &p.row.body,
            properties: outcome_properties(&p.row),
        });
        for result in publisher.publish_all(messages).await {
            result.with_context(|| format!("cannot publish to the queue {queue:?}"))?;
        }
        progress.advance(page.len() as u64);
    }
    progress.finish();
    broker.close().await;
    Ok(progress.done())
}
