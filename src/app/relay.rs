//! The outbox relay: publishes committed outcomes with publisher confirms, in version order per
//! teacher, and marks them published only after the broker confirmed them.

use std::time::{Duration, Instant};

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use sqlx::postgres::PgListener;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::broker::{BrokerError, Outgoing, Publisher, json_properties};
use crate::store::{OUTBOX_CHANNEL, OutboxRow, Store, StoreError};

/// Why a relay round stopped.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl RelayError {
    /// True when a broker operation timed out (the connection may be wedged).
    pub fn broker_timeout(&self) -> bool {
        matches!(self, Self::Broker(error) if error.is_timeout())
    }

    /// True when the broker blocked the connection (flow control) during the round.
    pub fn broker_blocked(&self) -> bool {
        matches!(self, Self::Broker(error) if error.is_blocked())
    }
}

/// What one relay round did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Outcomes published.
    pub published: usize,
    /// An outcome is left waiting behind an earlier version of its teacher that a lane holds
    /// leased: the relay looks again after [`LEASE_RECHECK`], since the lane's mark may not wake
    /// it (`store::Store::claim_outbox`).
    pub waiting_on_lease: bool,
}

/// How long a lane with confirmed but unmarked outcomes waits for a next batch to mark them
/// with, before marking them in a transaction of their own (`app::direct`): the relay counts on
/// it while an outcome waits behind a lane's lease.
pub const MARK_IDLE: Duration = Duration::from_millis(50);

/// How soon the relay looks again while an outcome waits behind a lane's lease, until a lane
/// with nothing more to write would have marked what it published ([`MARK_IDLE`]): a busy lane
/// marks with its next write, a few milliseconds later (see [`recheck_after`]).
pub const LEASE_RECHECK: Duration = Duration::from_millis(10);

/// How long the relay waits before it looks again behind a lane's lease, having waited `waited`
/// since a round first found an outcome waiting so: [`LEASE_RECHECK`] until the wait is older
/// than [`MARK_IDLE`] (by then a lane, busy or idle, has marked), then as long again as it has
/// waited, so that each look doubles the wait, up to `poll` (a lease a dead worker left runs
/// for 30 s or more).
pub fn recheck_after(waited: Duration, poll: Duration) -> Duration {
    let after = if waited <= MARK_IDLE {
        LEASE_RECHECK
    } else {
        waited
    };
    after.min(poll)
}

/// Publishes one batch.
pub async fn relay_once(
    store: &Store,
    publisher: &Publisher,
    exchange: &str,
    batch_size: i64,
) -> Result<Round, RelayError> {
    let batch = store
        .claim_outbox(batch_size, OffsetDateTime::now_utc())
        .await?;
    let waiting_on_lease = batch.waiting_on_lease;
    if batch.is_empty() {
        batch.complete(&[]).await?;
        return Ok(Round {
            published: 0,
            waiting_on_lease,
        });
    }
    // Send the whole batch, then wait for the confirms: one round trip per batch, not per row.
    let messages: Vec<Outgoing<'_>> = batch
        .rows
        .iter()
        .map(|row| Outgoing {
            exchange,
            routing_key: &row.routing_key,
            body: &row.body,
            properties: outcome_properties(row),
        })
        .collect();
    let mut published = Vec::with_capacity(batch.rows.len());
    let mut failure = None;
    for (row, result) in batch.rows.iter().zip(publisher.publish_all(messages).await) {
        match result {
            Ok(()) => published.push(row.id),
            Err(error) => failure = Some(error),
        }
    }
    let kept = batch.complete(&published).await?;
    crate::telemetry::metrics::metrics().published_by("relay", kept as u64);
    match failure {
        Some(error) => Err(error.into()),
        None => Ok(Round {
            published: kept,
            waiting_on_lease,
        }),
    }
}

/// An outcome's AMQP properties: its id as `message_id`, its creation time, and the trace
/// context of the input that caused it. `resync` sends the same.
pub fn outcome_properties(row: &OutboxRow) -> lapin::BasicProperties {
    let mut headers = FieldTable::default();
    if let Some(traceparent) = &row.traceparent {
        headers.insert(
            ShortString::from("traceparent"),
            AMQPValue::LongString(LongString::from(traceparent.as_str())),
        );
    }
    json_properties(&row.outcome_id.to_string(), headers)
        .with_type("outcome".into())
        .with_timestamp(row.created_at.unix_timestamp() as u64)
}

/// Relays until `stop`, waking on every commit that wrote to the outbox and at least every
/// `poll` otherwise. A round in progress when `stop` fires is finished, unless `abandon` fires
/// too. Returns on the first error so that the caller can reconnect.
pub async fn relay_until(
    store: &Store,
    publisher: &Publisher,
    exchange: &str,
    batch_size: i64,
    poll: Duration,
    stop: &CancellationToken,
    abandon: &CancellationToken,
) -> Result<(), RelayError> {
    let mut listener = listen(store).await?;
    // Rounds woken by the poll that found outcomes: commits whose notification did not come. A
    // listener on a connection that went silent hears nothing; after a few such rounds it is
    // replaced (by returning, so that the caller starts again).
    let mut unheard = 0;
    // What woke the relay for its first round after a wait.
    let mut woken = Woken::Notified;
    // Since when an outcome has waited behind a lane's lease, for as long as the relay's own
    // looks find it still waiting; the relay looks again after `recheck_after` that wait.
    let mut waiting_since: Option<Instant> = None;
    loop {
        // Drain: a full batch means there may be more (including later versions of the same
        // teachers, which become publishable once the earlier ones are marked).
        loop {
            // While the broker blocks the connection (a resource alarm) nothing can be sent:
            // wait for the unblock without claiming anything. The connection is healthy; it is
            // not replaced.
            if publisher.is_blocked() && !publisher.until_unblocked(stop).await {
                if stop.is_cancelled() {
                    return Ok(());
                }
                return Err(BrokerError::lost(
                    "the publishing channel while the broker blocked it",
                )
                .into());
            }
            // A round abandoned at the shutdown deadline (the broker is down) rolls its claim
            // back: the rows stay pending for the next worker. A round the broker blocked
            // released its claim, keeping what was confirmed; the rest is sent after the unblock.
            let round = tokio::select! {
                round = relay_once(store, publisher, exchange, batch_size) => match round {
                    Err(error) if error.broker_blocked() => continue,
                    round => round?,
                },
                () = abandon.cancelled() => return Ok(()),
            };
            // Later rounds of the same drain were woken by nothing but the one before.
            let woke = std::mem::replace(&mut woken, Woken::Notified);
            // How long what this round published had waited behind a lease, if it had.
            let behind_lease = waiting_since
                .filter(|_| woke == Woken::Recheck)
                .map(|since| since.elapsed().as_millis() as u64);
            waiting_since = match (round.waiting_on_lease, waiting_since) {
                (false, _) => None,
                (true, Some(since)) if woke == Woken::Recheck => Some(since),
                (true, _) => Some(Instant::now()),
            };
            let published = round.published;
            if published == 0 {
                break;
            }
            tracing::debug!(
                outcomes = published,
                behind_lease_ms = behind_lease,
                "published outcomes"
            );
            if woke == Woken::Poll {
                unheard += 1;
                if unheard >= UNHEARD_ROUNDS {
                    return Err(
                        StoreError::transient("the outbox listener hears no commits").into(),
                    );
                }
            }
        }
        let recheck = waiting_since.map(|since| recheck_after(since.elapsed(), poll));
        tokio::select! {
            notification = listener.recv() => {
                notification.map_err(StoreError::from)?;
                unheard = 0;
            }
            // A look again behind a lease says nothing about the listener.
            () = tokio::time::sleep(recheck.unwrap_or(poll)) => {
                woken = if recheck.is_some() { Woken::Recheck } else { Woken::Poll };
            }
            () = stop.cancelled() => return Ok(()),
        }
    }
}

/// What woke the relay after a wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Woken {
    /// A commit's notification (or the start).
    Notified,
    /// The poll: a round that then publishes means a notification did not come.
    Poll,
    /// A look again while an outcome waits behind a lane's lease.
    Recheck,
}

/// Poll-woken rounds with outcomes to publish, in a row, after which the listener is replaced.
const UNHEARD_ROUNDS: u32 = 3;

/// A listener on the outbox channel, within the store's operation bound.
async fn listen(store: &Store) -> Result<PgListener, StoreError> {
    let limit = store.operation_timeout();
    crate::store::bounded(limit, "the outbox listener", async {
        let mut listener = PgListener::connect_with(store.pool()).await?;
        listener.listen(OUTBOX_CHANNEL).await?;
        Ok(listener)
    })
    .await
}

/// Publishes what the outbox holds until it is empty or `deadline` passes (used at shutdown).
pub async fn flush(
    store: &Store,
    publisher: &Publisher,
    exchange: &str,
    batch_size: i64,
    deadline: tokio::time::Instant,
) -> Result<(), RelayError> {
    loop {
        let round =
            tokio::time::timeout_at(deadline, relay_once(store, publisher, exchange, batch_size));
        match round.await {
            Ok(Ok(Round { published: 0, .. })) | Err(_) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return Err(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{LEASE_RECHECK, MARK_IDLE, recheck_after};
    use std::time::Duration;

    const POLL: Duration = Duration::from_secs(2);

    /// The looks behind a lease, from the first round that found an outcome waiting.
    fn looks(poll: Duration, until: Duration) -> Vec<Duration> {
        let mut waited = Duration::ZERO;
        let mut after = Vec::new();
        while waited < until {
            let next = recheck_after(waited, poll);
            after.push(next);
            waited += next;
        }
        after
    }

    #[test]
    fn the_relay_looks_often_until_an_idle_lane_would_have_marked_then_doubles_its_wait() {
        let ms = Duration::from_millis;
        let schedule = looks(POLL, Duration::from_secs(10));
        // Every 10 ms until the wait is older than a lane's idle mark (50 ms): a busy lane
        // marks within a few milliseconds, an idle one within 50.
        assert_eq!(schedule[..6], [LEASE_RECHECK; 6]);
        assert!(MARK_IDLE < ms(60));
        // Then as long as it has waited (60 ms), so the wait doubles, up to the poll.
        assert_eq!(schedule[6..10], [ms(60), ms(120), ms(240), ms(480)]);
        assert_eq!(schedule[10..12], [ms(960), ms(1920)]);
        assert!(schedule[12..].iter().all(|&after| after == POLL));
        // Sixteen looks in the first ten seconds behind a lease a dead worker left.
        assert_eq!(schedule.len(), 16);
    }

    #[test]
    fn a_poll_shorter_than_the_recheck_bounds_it() {
        let poll = Duration::from_millis(5);
        assert_eq!(recheck_after(Duration::ZERO, poll), poll);
        assert_eq!(recheck_after(Duration::from_secs(1), poll), poll);
    }
}
