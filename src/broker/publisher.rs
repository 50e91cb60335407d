//! Publishing: a channel in confirm mode, every message persistent and mandatory, and one way to
//! send many messages and then await their confirms, with every wait bounded.

use std::future::Future;

use lapin::options::BasicPublishOptions;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};

use super::{BrokerError, bounded};

/// How long a publisher waits for the broker to confirm a message.
pub const CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// A channel in confirm mode. Every message it sends carries the connection's own user as its
/// AMQP `user_id` (replacing any other: RabbitMQ refuses a foreign one with 406), so that
/// consumers know who published it and a parked or replayed copy never carries a forged one.
#[derive(Clone)]
pub struct Publisher {
    pub(super) channel: Channel,
    pub(super) user: std::sync::Arc<str>,
    /// The connection's status, which says whether the broker blocks it (flow control).
    pub(super) flow: lapin::ConnectionStatus,
    /// Held while a message takes its delivery tag and queues its frames (see
    /// [`Publisher::send`]); shared by every clone, as the channel is.
    pub(super) queueing: std::sync::Arc<std::sync::Mutex<()>>,
}

/// One message to publish.
pub struct Outgoing<'a> {
    /// The exchange (`""` for the default exchange).
    pub exchange: &'a str,
    /// The routing key (a queue name on the default exchange).
    pub routing_key: &'a str,
    /// The body, unchanged.
    pub body: &'a [u8],
    /// Its properties (made persistent when sent).
    pub properties: BasicProperties,
}

/// A message sent and waiting for its confirm.
pub struct PendingConfirm {
    confirm: PublisherConfirm,
    channel: Channel,
    flow: lapin::ConnectionStatus,
    exchange: String,
    routing_key: String,
}

/// How often a wait on the broker checks its connection's status: whether the channel is still
/// connected, whether the broker blocks the connection (here and in `acks`).
pub(super) const STATUS_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// How long a wait for a confirm goes on once the broker has blocked the connection: confirms
/// of what the broker read before the alarm still come; the rest come only after it clears,
/// which may take hours, so the caller is told (and waits for the unblock without holding
/// anything, such as an outbox claim).
const BLOCKED_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// What a wait for a confirm does once the broker blocks the connection (flow control).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WhenBlocked {
    /// Gives up after [`BLOCKED_GRACE`], for a caller that must not hold what it holds for the
    /// length of an alarm (the relay's outbox claim, an operator's command). A message the
    /// broker had begun to read is then sent again after the unblock, and published twice.
    GiveUp,
    /// Waits for the unblock, the time blocked not counting towards the deadline, for a caller
    /// that would wait for the unblock anyway (parking). RabbitMQ blocks a connection as it
    /// reads a message's header and reads its body only after the unblock, so the message is
    /// confirmed then, once, instead of being sent again.
    WaitThrough,
}

impl PendingConfirm {
    /// Waits for the broker: `Ok` only for a positive confirm of a routed message. Gives up
    /// after [`CONFIRM_TIMEOUT`]: lapin rejects the confirms of a lost connection only once its
    /// recovery starts, and a worker must not wait on a broker that is down for good.
    pub async fn wait(self) -> Result<(), BrokerError> {
        let deadline = tokio::time::Instant::now() + CONFIRM_TIMEOUT;
        self.wait_until(deadline).await
    }

    /// [`PendingConfirm::wait`] with a deadline shared by a whole batch, so that a batch on a
    /// connection that died waits [`CONFIRM_TIMEOUT`] once, not once per message.
    ///
    /// A confirm cannot arrive once its channel has lost its connection (a recovered connection
    /// has new delivery tags, and a connection whose node is gone for good may never recover),
    /// so the wait fails as soon as the channel is not connected: the caller republishes later
    /// (found when a broker address went away: the relay sat on its outbox claim for the whole
    /// confirm bound, past the database's idle-in-transaction bound). It fails too once the
    /// broker has blocked the connection for [`BLOCKED_GRACE`] (flow control): the message is
    /// sent when the alarm clears and may then be published twice, which consumers de-duplicate.
    pub async fn wait_until(self, deadline: tokio::time::Instant) -> Result<(), BrokerError> {
        self.settle(deadline, WhenBlocked::GiveUp).await.0
    }

    /// Waits as [`PendingConfirm::wait_until`] says, doing `when` once the broker blocks the
    /// connection; also returns the deadline, moved on by the time the broker blocked the
    /// connection when `when` waits through blocks, for the next confirm of the same batch (it
    /// comes after the same unblock).
    async fn settle(
        self,
        deadline: tokio::time::Instant,
        when: WhenBlocked,
    ) -> (Result<(), BrokerError>, tokio::time::Instant) {
        let Self {
            confirm,
            channel,
            flow,
            exchange,
            routing_key,
        } = self;
        let mut confirm = std::pin::pin!(confirm);
        let mut deadline = deadline;
        let mut blocked_for = std::time::Duration::ZERO;
        let confirmed = loop {
            tokio::select! {
                biased;
                confirmed = &mut confirm => break confirmed,
                () = tokio::time::sleep(STATUS_CHECK) => {}
            }
            if !channel.status().connected() {
                let error = BrokerError::lost("the connection a publisher confirm was due on");
                return (Err(error), deadline);
            }
            blocked_for = if flow.blocked() {
                blocked_for + STATUS_CHECK
            } else {
                std::time::Duration::ZERO
            };
            match when {
                WhenBlocked::GiveUp if blocked_for >= BLOCKED_GRACE => {
                    return (Err(BrokerError::blocked("a publisher confirm")), deadline);
                }
                WhenBlocked::WaitThrough if !blocked_for.is_zero() => deadline += STATUS_CHECK,
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return (Err(BrokerError::timed_out("a publisher confirm")), deadline);
            }
        };
        let result = match confirmed {
            Err(error) => Err(error.into()),
            Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => Ok(()),
            Ok(Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_))) => {
                Err(BrokerError::unroutable(&exchange, &routing_key))
            }
            Ok(Confirmation::Nack(None)) => Err(BrokerError::nacked("a message")),
        };
        (result, deadline)
    }
}

impl Publisher {
    /// The channel, for consumers of the same connection.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// True while the channel is open (after lapin's recovery, too).
    pub fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// True while the broker blocks the connection (`connection.blocked`: a memory or disk
    /// alarm). Nothing can be sent until it unblocks it.
    pub fn is_blocked(&self) -> bool {
        self.flow.blocked()
    }

    /// Waits while the broker blocks the connection. True once it is unblocked; false when
    /// `stop` fires or the channel is lost first (a lost connection is no longer blocked, and
    /// the caller's usual recovery takes over). An alarm lasts as long as the broker's operator
    /// takes to clear it, so `stop` is the bound.
    pub async fn until_unblocked(&self, stop: &tokio_util::sync::CancellationToken) -> bool {
        while self.flow.blocked() {
            if !self.is_open() {
                return false;
            }
            tokio::select! {
                () = tokio::time::sleep(STATUS_CHECK) => {}
                () = stop.cancelled() => return false,
            }
        }
        self.is_open()
    }

    /// Sends a persistent, mandatory message and returns its pending confirm, so that a caller
    /// can send many before waiting for any.
    pub async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<PendingConfirm, BrokerError> {
        // lapin holds back every frame of a blocked connection: a message sent now would wait
        // in its buffer for the alarm to clear, and be sent again by a caller that gave up on it.
        if self.is_blocked() {
            return Err(BrokerError::blocked("a message to be sent"));
        }
        let mut publishing = std::pin::pin!(bounded(
            "a message to be sent",
            self.channel.basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body,
                properties
                    .with_delivery_mode(2)
                    .with_user_id(self.user.as_ref().into()),
            ),
        ));
        // lapin takes the delivery tag its confirm will carry, and then queues the frames, under
        // two locks of its own, both on this first poll. Tasks on other threads share this
        // channel (the lanes and the relay): without one lock around both steps, two messages
        // could reach the broker in the other order than their tags, and each would get the
        // other's confirm, a nack or a return included. Nothing in there waits.
        let first = std::future::poll_fn(|cx| {
            let _queueing = self
                .queueing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            std::task::Poll::Ready(publishing.as_mut().poll(cx))
        })
        .await;
        let confirm = match first {
            std::task::Poll::Ready(sent) => sent?,
            std::task::Poll::Pending => publishing.await?,
        };
        Ok(PendingConfirm {
            confirm,
            channel: self.channel.clone(),
            flow: self.flow.clone(),
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
        })
    }

    /// Sends one message and waits for its confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        self.send(exchange, routing_key, body, properties)
            .await?
            .wait()
            .await
    }

    /// Sends every message, in order, without waiting for one to be written before sending the
    /// next: one result per message, in order (a pending confirm, or why it was not sent).
    ///
    /// lapin takes a message's delivery tag and queues its frames on the first poll of its
    /// `basic_publish`, and resolves that future only once its I/O loop has written them. Each
    /// send is therefore polled once here, in order, which fixes the order on the wire (a
    /// teacher's versions must arrive in order), and then all are awaited together: one trip
    /// through the I/O loop for the lot rather than one per message (issue 15). When the channel
    /// is broken, every send fails at once on lapin's own status check.
    pub async fn send_all<'a>(
        &self,
        messages: impl IntoIterator<Item = Outgoing<'a>>,
    ) -> Vec<Result<PendingConfirm, BrokerError>> {
        let mut sends: Vec<_> = messages
            .into_iter()
            .map(|m| {
                Box::pin(futures_util::future::maybe_done(self.send(
                    m.exchange,
                    m.routing_key,
                    m.body,
                    m.properties,
                )))
            })
            .collect();
        // Each polled once, in order (a send that finishes at once keeps its output: MaybeDone
        // is never polled past completion).
        std::future::poll_fn(|cx| {
            for send in &mut sends {
                let _ = send.as_mut().poll(cx);
            }
            std::task::Poll::Ready(())
        })
        .await;
        futures_util::future::join_all(sends.iter_mut().map(|send| send.as_mut())).await;
        sends
            .iter_mut()
            .map(|send| {
                send.as_mut()
                    .take_output()
                    .unwrap_or_else(|| Err(BrokerError::lost("a message to be sent")))
            })
            .collect()
    }

    /// Sends every message ([`Publisher::send_all`]), then awaits every confirm: one round trip
    /// for the lot, and one result per message, in order.
    pub async fn publish_all<'a>(
        &self,
        messages: impl IntoIterator<Item = Outgoing<'a>>,
    ) -> Vec<Result<(), BrokerError>> {
        self.publish_all_with(messages, WhenBlocked::GiveUp).await
    }

    /// [`Publisher::publish_all`], its confirm waits doing `when` once the broker blocks the
    /// connection.
    pub async fn publish_all_with<'a>(
        &self,
        messages: impl IntoIterator<Item = Outgoing<'a>>,
        when: WhenBlocked,
    ) -> Vec<Result<(), BrokerError>> {
        let pending = self.send_all(messages).await;
        // One bound for the batch: after a connection dies with 500 confirms outstanding, the
        // relay gives up within CONFIRM_TIMEOUT, not 500 times that (seen when a broker address
        // went away: the relay sat for ten minutes). Waiting through blocks, it moves on by the
        // time the broker blocked the connection, which holds back every confirm alike.
        let mut deadline = tokio::time::Instant::now() + CONFIRM_TIMEOUT;
        let mut results = Vec::with_capacity(pending.len());
        for sent in pending {
            results.push(match sent {
                Ok(confirm) => {
                    let (result, moved) = confirm.settle(deadline, when).await;
                    deadline = moved;
                    result
                }
                Err(error) => Err(error),
            });
        }
        results
    }
}

/// JSON message properties: persistent, `application/json`, with the given headers.
pub fn json_properties(message_id: &str, headers: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_message_id(message_id.into())
        .with_app_id("induction-reconciler".into())
        .with_delivery_mode(2)
        .with_headers(headers)
}
