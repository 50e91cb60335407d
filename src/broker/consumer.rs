//! Consuming: a channel with its QoS and one consumer on it, its cancel, and the settling of
//! deliveries, every operation bounded.

use std::time::Duration;

use lapin::Acker;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, message::Delivery};

use super::{Broker, BrokerError, bounded};

/// How long closing steps (cancel, channel close) may take: a recovering connection may never
/// answer, and the caller has already decided to stop.
const CLOSING_TIMEOUT: Duration = Duration::from_secs(5);

/// How long one acknowledgement may take before the caller treats the channel as lost.
pub(super) const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// A consumer of one queue on a channel of its own.
pub struct Consumer {
    channel: Channel,
    tag: String,
    queue: String,
    /// `None` only once dropped (see the `Drop` impl).
    deliveries: Option<lapin::Consumer>,
}

impl Broker {
    /// Opens a channel, sets its QoS to `prefetch` unacknowledged deliveries and starts a
    /// consumer on `queue`.
    pub async fn consume(&self, queue: &str, prefetch: u16) -> Result<Consumer, BrokerError> {
        let channel = self.channel().await?;
        bounded(
            "the QoS",
            channel.basic_qos(prefetch, BasicQosOptions::default()),
        )
        .await?;
        let tag = format!("induction-reconciler-{}", uuid::Uuid::new_v4());
        let deliveries = bounded(
            "a consumer",
            channel.basic_consume(
                queue.into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        Ok(Consumer {
            channel,
            tag,
            queue: queue.to_owned(),
            deliveries: Some(deliveries),
        })
    }
}

impl Consumer {
    /// The next delivery; `None` when the broker cancelled the consumer. lapin reports a
    /// recoverable failure as `Some(Err)` and resumes the stream after its recovery.
    pub async fn next(&mut self) -> Option<Result<Delivery, lapin::Error>> {
        let deliveries = self.deliveries.as_mut()?;
        futures_lite::StreamExt::next(deliveries).await
    }

    /// True while the consumer's channel is open.
    pub fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// True while lapin is recovering the consumer's channel (it will be reopened, with the
    /// consumer, once its connection is back).
    pub fn is_recovering(&self) -> bool {
        let status = self.channel.status();
        status.reconnecting() || status.initializing()
    }

    /// True once the channel is closed for good: neither open, nor closing, nor waiting for
    /// lapin to recover it. On a connection that is up, the broker closed it (a channel-level
    /// error, such as a delivery held past its `consumer_timeout`), and lapin does not reopen
    /// a channel the broker closed. A channel still closing is not: lapin has yet to answer the
    /// broker's close (ARCHITECTURE decision 41).
    pub fn is_closed(&self) -> bool {
        let status = self.channel.status();
        !status.connected() && !status.closing() && !status.initializing()
    }

    /// Why the broker closed the channel, as lapin reported it on the consumer's stream, for a
    /// consumer that is closed for good and has not been read since (its buffered deliveries
    /// are dropped: the broker has requeued them).
    pub fn closing_error(&mut self) -> Option<lapin::Error> {
        if !self.is_closed() {
            return None;
        }
        drain(self.deliveries.as_mut()?)
    }

    /// How many messages the queue holds ready for delivery (a passive declare).
    pub async fn ready(&self) -> Result<u32, BrokerError> {
        ready(&self.channel, &self.queue).await
    }

    /// Tells the broker to send no more (deliveries already sent stay with this channel).
    pub async fn cancel(&self) {
        let cancelling = self
            .channel
            .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default());
        let _ = tokio::time::timeout(CLOSING_TIMEOUT, cancelling).await;
    }

    /// Closes the channel: its unacknowledged deliveries go back to the queue.
    pub async fn close(mut self) {
        let closing = self.channel.close(200, "consumer ended".into());
        if let Ok(Ok(())) = tokio::time::timeout(CLOSING_TIMEOUT, closing).await {
            // Closed by us: lapin has cancelled the consumer, so it is dropped as usual (the
            // `Drop` impl keeps only one whose channel ended otherwise).
            drop(self.deliveries.take());
        }
    }
}

impl Drop for Consumer {
    /// A consumer whose channel the broker closed is not handed back to lapin. lapin (4.12.3)
    /// keeps it marked active and, when it is dropped, asks to cancel it on its channel; once
    /// lapin has forgotten that channel, the request fails with "invalid channel", which lapin
    /// takes for a failure of the whole connection: it reconnects a connection that worked, and
    /// its recovery can then deadlock on the channel it is reopening (seen in
    /// `tests/channel_closed.rs`: no heartbeat sent for 20 s, a runtime thread blocked). So
    /// its buffered deliveries are dropped (the broker has requeued them) and the rest (a few
    /// hundred bytes by a reading of lapin's structures, not measured) is kept for the life of
    /// the process. So is the consumer of a connection lapin gave up for good, whose channel
    /// ended with it (ARCHITECTURE decision 41).
    fn drop(&mut self) {
        if !self.is_closed() {
            return;
        }
        if let Some(mut deliveries) = self.deliveries.take() {
            while drain(&mut deliveries).is_some() {}
            std::mem::forget(deliveries);
        }
    }
}

/// Reads what the stream of a consumer whose channel is closed still holds, without waiting,
/// until its error: deliveries are dropped (the broker has requeued them). `None` once the
/// stream is empty or ended.
fn drain(deliveries: &mut lapin::Consumer) -> Option<lapin::Error> {
    use futures_util::FutureExt;
    loop {
        match futures_lite::StreamExt::next(deliveries).now_or_never() {
            Some(Some(Ok(_))) => {}
            Some(Some(Err(error))) => return Some(error),
            Some(None) | None => return None,
        }
    }
}

/// Acknowledges a delivery. False when the channel is gone (the broker will redeliver it).
pub async fn ack(acker: &Acker) -> bool {
    matches!(
        tokio::time::timeout(SETTLE_TIMEOUT, acker.ack(BasicAckOptions::default())).await,
        Ok(Ok(true))
    )
}

/// Returns a delivery to its queue. When the channel is gone the broker requeues it anyway.
pub async fn requeue(acker: &Acker) {
    let requeue = BasicNackOptions {
        multiple: false,
        requeue: true,
    };
    let _ = tokio::time::timeout(SETTLE_TIMEOUT, acker.nack(requeue)).await;
}

/// Reads a queue one message at a time (`basic.get`), for operator commands.
pub struct QueueReader {
    channel: Channel,
    queue: String,
}

impl Broker {
    /// A reader of `queue` on a channel of its own.
    pub async fn reader(&self, queue: &str) -> Result<QueueReader, BrokerError> {
        Ok(QueueReader {
            channel: self.channel().await?,
            queue: queue.to_owned(),
        })
    }
}

impl QueueReader {
    /// How many messages the queue holds ready (a passive declare: fails if it does not exist).
    pub async fn ready(&self) -> Result<u32, BrokerError> {
        ready(&self.channel, &self.queue).await
    }

    /// The next message, left unacknowledged; `None` when the queue is empty.
    pub async fn get(&self) -> Result<Option<Delivery>, BrokerError> {
        let got = bounded(
            "a message from the queue",
            self.channel.basic_get(
                self.queue.as_str().into(),
                lapin::options::BasicGetOptions { no_ack: false },
            ),
        )
        .await?;
        Ok(got.map(|message| message.delivery))
    }
}

/// How many messages `queue` holds ready for delivery (a passive declare: fails if the queue
/// does not exist, which closes the channel).
pub async fn ready(channel: &Channel, queue: &str) -> Result<u32, BrokerError> {
    let declared = bounded(
        "a passive declare",
        channel.queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ),
    )
    .await?;
    Ok(declared.message_count())
}
