//! The consumer's watchdog: notices a lost connection while lapin recovers it, gives up on a
//! recovery that takes too long, and notices a consumer that receives nothing although its queue
//! has messages ready and the worker is idle.

use std::sync::Arc;
use std::time::Duration;

use crate::app::http::{Health, Progress};
use crate::broker::{Broker, BrokerError, Consumer, Link};
use crate::telemetry::events::{BrokerRecovered, Component};

/// Checked every second by the consumer loop.
pub(super) struct Watchdog {
    /// When the connection or the channel was first seen down, in the current outage.
    down_since: Option<tokio::time::Instant>,
    /// When the last delivery arrived (or the last stall check found nothing wrong).
    last_delivery: tokio::time::Instant,
    /// Deliveries handed to lanes and not yet finished.
    progress: Arc<Progress>,
    /// `amqp.recovery_timeout_seconds`.
    limit: Duration,
    /// What the consumer last reported (a channel the broker closed says why), for the log.
    reason: Option<lapin::Error>,
}

impl Watchdog {
    pub(super) fn new(progress: Arc<Progress>, limit: Duration) -> Self {
        Self {
            down_since: None,
            last_delivery: tokio::time::Instant::now(),
            progress,
            limit,
            reason: None,
        }
    }

    /// Notes that a delivery arrived.
    pub(super) fn delivered(&mut self) {
        self.last_delivery = tokio::time::Instant::now();
    }

    /// Notes a failure the consumer reported: not ready until lapin has it back (or the check
    /// finds the channel closed for good).
    pub(super) fn lost(&mut self, health: &Health, error: lapin::Error) {
        self.reason = Some(error);
        if self.down_since.is_none() {
            tracing::warn!("lost the broker connection; waiting for lapin to recover it");
            health.set_broker_connected(false);
            self.down_since = Some(tokio::time::Instant::now());
        }
    }

    /// Why the consumer's stream ended: the broker closed its channel (with the reason the
    /// consumer reported) or cancelled the consumer.
    pub(super) fn cancelled(&mut self) -> BrokerError {
        match self.reason.take() {
            Some(error) => BrokerError::channel_closed(&error),
            None => {
                BrokerError::lost("the consumer (the broker closed its channel or cancelled it)")
            }
        }
    }

    /// `Err` when the consumer should end and start again (on a new channel or connection).
    pub(super) async fn check(
        &mut self,
        broker: &Broker,
        consumer: &mut Consumer,
        health: &Health,
    ) -> Result<(), BrokerError> {
        let link = broker.link();
        if link == Link::Down {
            return Err(BrokerError::lost(
                "the connection (lapin could not recover it)",
            ));
        }
        if link == Link::Up && consumer.is_open() {
            // What lapin reported of an outage it has recovered from is no reason for a later
            // end of the consumer.
            self.reason = None;
            if self.down_since.take().is_some() {
                BrokerRecovered {
                    component: Component::Consumer,
                }
                .emit();
                health.set_broker_connected(true);
                self.last_delivery = tokio::time::Instant::now();
            }
            return self.check_stalled(consumer).await;
        }
        // The broker closed the channel (lapin does not reopen it), and the connection works:
        // start again on a new channel now rather than wait out the recovery timeout and give
        // up a connection that works. This is seen here even when the consumer loop is waiting
        // for a full lane and so not reading the consumer's stream (ARCHITECTURE decision 41).
        if link == Link::Up && consumer.is_closed() {
            if self.reason.is_none() {
                self.reason = consumer.closing_error();
            }
            return Err(self.cancelled());
        }
        let since = *self.down_since.get_or_insert_with(|| {
            tracing::warn!("lost the broker connection; waiting for lapin to recover it");
            health.set_broker_connected(false);
            tokio::time::Instant::now()
        });
        if since.elapsed() >= self.limit {
            return Err(BrokerError::timed_out(
                "the automatic recovery of the broker connection",
            ));
        }
        Ok(())
    }

    /// An idle consumer that has received nothing for `limit` while its queue holds messages
    /// ready to deliver has stopped working (for instance a consumer not resumed after a
    /// recovery): end it, so that a new channel and consumer are started.
    async fn check_stalled(&mut self, consumer: &Consumer) -> Result<(), BrokerError> {
        if self.progress.waiting() > 0 || self.last_delivery.elapsed() < self.limit {
            return Ok(());
        }
        // Bounded by the watchdog's limit too, not only by the 30 s of any broker operation: a
        // declare sent as the node went silent gets no answer, and the watchdog sees nothing
        // else while it waits. A timeout replaces the connection at once.
        let ready = tokio::time::timeout(self.limit, consumer.ready())
            .await
            .map_err(|_| BrokerError::timed_out("the stall check's passive declare"))??;
        self.last_delivery = tokio::time::Instant::now();
        if ready > 0 {
            return Err(BrokerError::lost(
                "the consumer (messages are ready but none arrive)",
            ));
        }
        Ok(())
    }
}
