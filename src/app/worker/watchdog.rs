//! The consumer's watchdog: notices a lost connection while lapin recovers it, gives up on a
//! recovery that takes too long, and notices a consumer that receives nothing although its queue
//! has messages ready and the worker is idle.

use std::sync::Arc;
use std::time::Duration;

use crate::app::http::{Health, Progress};
use crate::broker::{Broker, BrokerError, Consumer, Link};
use crate::telemetry::events::{BrokerRecovered, Component};

/// What went down, for the log line that starts an outage.
#[derive(Clone, Copy)]
enum Down {
    /// The connection: lapin recovers it (and the channel with it).
    Connection,
    /// Only the consumer's channel, which the broker is closing: a new one is started.
    ChannelClosing,
}

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
    /// finds the channel closed for good). A channel-level (soft) error is the broker closing
    /// the consumer's channel on a connection that works, not a lost connection.
    pub(super) fn lost(&mut self, health: &Health, error: lapin::Error) {
        let down = if error.is_amqp_soft_error() {
            Down::ChannelClosing
        } else {
            Down::Connection
        };
        self.down(health, down);
        self.reason = Some(error);
    }

    /// Marks the start of an outage, once, with a log line that says what went down. Returns
    /// when it started.
    fn down(&mut self, health: &Health, down: Down) -> tokio::time::Instant {
        *self.down_since.get_or_insert_with(|| {
            match down {
                Down::Connection => {
                    tracing::warn!("lost the broker connection; waiting for lapin to recover it");
                }
                Down::ChannelClosing => tracing::warn!(
                    "the broker is closing the consumer's channel; starting again on a new one \
                     once it has closed"
                ),
            }
            health.set_broker_connected(false);
            tokio::time::Instant::now()
        })
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
        // Down on a connection that is up and not being recovered: the broker is closing the
        // channel, and lapin has yet to answer its close.
        let down = if link == Link::Up && !consumer.is_recovering() {
            Down::ChannelClosing
        } else {
            Down::Connection
        };
        let since = self.down(health, down);
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
