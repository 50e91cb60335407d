//! The consumer: one connection at a time, a consumer of the inbox queue on it, deliveries
//! handed to the lanes, the watchdog every second, and a new channel or connection after any
//! failure.
//!
//! A lost connection is lapin's to recover (it reopens the channel, reapplies the QoS and
//! resumes the consumer); the worker watches. When the consumer stops, the worker waits up to
//! `amqp.recovery_timeout_seconds` for the connection to be up and starts a new channel and
//! consumer on it; when the connection does not come back in that time, the worker gives it up
//! (see [`Broker::retire`]) and opens a new one.

use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::flow::Flow;
use super::lanes::Lanes;
use super::watchdog::Watchdog;
use super::{Shutdown, keep_or_replace};
use crate::app::connect;
use crate::app::direct::DirectPublisher;
use crate::app::handler::Handler;
use crate::app::http::Health;
use crate::app::retry::Backoff;
use crate::broker::{Acks, Broker, BrokerError, Consumer};
use crate::config::Settings;
use crate::store::Store;
use crate::telemetry::events::{BrokerInterrupted, Component};

/// What the consumer shares with every connection it makes.
struct Shared<'a> {
    settings: &'a Settings,
    store: &'a Store,
    stop: &'a CancellationToken,
    abandon: &'a CancellationToken,
    health: &'a Health,
    direct: &'a Arc<DirectPublisher>,
}

/// Consumes until `plan.stop`; then waits for in-flight deliveries (until `plan.abandon`).
pub(super) async fn consume(
    settings: &Settings,
    store: &Store,
    plan: &Shutdown,
    health: &Arc<Health>,
    direct: &Arc<DirectPublisher>,
) -> anyhow::Result<()> {
    let shared = Shared {
        settings,
        store,
        stop: &plan.stop,
        abandon: &plan.abandon,
        health,
        direct,
    };
    // Lanes of every consumer this worker started; those of a failed one finish (their
    // acknowledgements fail and the broker redelivers) while the next one runs.
    let mut in_flight: JoinSet<()> = JoinSet::new();
    let mut backoff = Backoff::new(settings);
    let target = connect::BrokerTarget::from_settings(settings)?;
    let mut current: Option<Broker> = None;
    let mut leftover: Option<Consumer> = None;
    // The consumer's connection publishes only to park a message, and the broker blocks it
    // during an alarm once it has: followed like the relay's, for the log, the gauge and
    // /readyz (the lane that parks waits for the unblock; see `Handler::park`).
    let mut flow = Flow::new(Component::Consumer, health.clone());
    let result = loop {
        if plan.stop.is_cancelled() {
            break Ok(());
        }
        let broker = match current.take() {
            Some(broker) => broker,
            None => {
                let name = "induction-reconciler consumer";
                match connect::broker_waiting(settings, &target, name, &plan.stop).await? {
                    Some(broker) => broker,
                    None => break Ok(()),
                }
            }
        };
        let consumed = tokio::select! {
            ended = consume_on(&shared, &broker, &mut in_flight, &mut leftover) => ended,
            never = flow.follow(&broker) => match never {},
        };
        match consumed {
            Ok(()) => {
                current = Some(broker);
                break Ok(());
            }
            Err(error) if error.is_transient() => {
                health.set_broker_connected(false);
                BrokerInterrupted {
                    component: Component::Consumer,
                    error: &error,
                }
                .emit(None);
                if !backoff.pause(&plan.stop).await {
                    current = Some(broker);
                    break Ok(());
                }
                current = keep_or_replace(broker, error.is_timeout(), settings, &plan.stop).await;
                if current.is_none() {
                    flow.forget();
                }
                // On the connection kept, the failed consumer's channel is closed before a new
                // one starts; a connection given up takes its channels with it.
                if let Some(old) = leftover.take()
                    && current.is_some()
                {
                    close_recovered(old).await;
                }
            }
            Err(error) => break Err(anyhow::Error::new(error).context("cannot consume")),
        }
    };
    // Deliveries still in flight from a channel that is gone cannot be acknowledged; the broker
    // redelivers them and the inbox de-duplicates. Let them end, or drop them when abandoned.
    join_until(&mut in_flight, &plan.abandon).await;
    if let Some(broker) = current {
        broker.close().await;
    }
    result
}

/// Consumes on one connection until `stop` (`Ok`) or a failure (`Err`).
async fn consume_on(
    shared: &Shared<'_>,
    broker: &Broker,
    in_flight: &mut JoinSet<()>,
    leftover: &mut Option<Consumer>,
) -> Result<(), BrokerError> {
    let settings = shared.settings;
    if settings.amqp.declare_topology {
        broker.declare(&settings.topology).await?;
    }
    let parking = broker.publisher().await?;
    let consumer = broker
        .consume(&settings.topology.inbox_queue, settings.amqp.prefetch)
        .await?;
    tracing::info!(queue = %settings.topology.inbox_queue, prefetch = settings.amqp.prefetch, "consuming");
    shared.health.set_broker_connected(true);
    // One acknowledgement window per channel: tags are the channel's. Its task is one of
    // `in_flight`, so that a graceful stop waits for the last acknowledgements too; it ends once
    // the lanes, which hold the handler's clones, have ended (the one here is dropped below).
    let (acks, acknowledging) = Acks::start(broker, settings.amqp.ack_hold(), |kind, frames| {
        crate::telemetry::metrics::metrics().acknowledgements_sent(kind, frames);
    });
    in_flight.spawn(acknowledging);
    let handler = Handler {
        store: shared.store.clone(),
        parking,
        settings: settings.clone(),
        abandon: shared.abandon.clone(),
        publishers: std::sync::Arc::new(crate::app::handler::publishers(settings)),
        direct: shared.direct.clone(),
        acks,
    };
    let progress = shared.health.progress();
    let lanes = Lanes::start(&handler, settings, progress.clone(), in_flight);
    drop(handler);
    let mut session = Session {
        shared,
        broker,
        watchdog: Watchdog::new(progress, settings.amqp.recovery_timeout()),
        consumer,
        lanes,
        tick: every_second(),
    };
    let ended = session.receive(in_flight).await;
    session.finish(in_flight, ended, leftover).await
}

fn every_second() -> tokio::time::Interval {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

/// One consumer on one connection, with its lanes and watchdog.
struct Session<'a> {
    shared: &'a Shared<'a>,
    broker: &'a Broker,
    consumer: Consumer,
    lanes: Lanes,
    watchdog: Watchdog,
    tick: tokio::time::Interval,
}

impl Session<'_> {
    /// Hands deliveries to the lanes until `stop` (`Ok`) or a failure the watchdog, lapin or the
    /// broker reports (`Err`).
    ///
    /// The connection's events are not read here: lapin hands each event to one of its
    /// listeners, not to all, and the connection's [`Flow`] listens for flow control. A channel
    /// the broker closes, or a connection lapin gives up, is seen in their status by the
    /// watchdog (ARCHITECTURE decision 41).
    async fn receive(&mut self, in_flight: &mut JoinSet<()>) -> Result<(), BrokerError> {
        loop {
            while in_flight.try_join_next().is_some() {}
            let next = tokio::select! {
                next = self.consumer.next() => next,
                _ = self.tick.tick() => {
                    self.watchdog.check(self.broker, &mut self.consumer, self.shared.health).await?;
                    continue;
                }
                () = self.shared.stop.cancelled() => return Ok(()),
            };
            match next {
                Some(Ok(delivery)) => {
                    self.watchdog.delivered();
                    if !self.hand_over(delivery).await? {
                        return Ok(());
                    }
                }
                // lapin reports a recoverable failure here and resumes the stream after
                // recovery; the watchdog decides when to stop waiting for it.
                Some(Err(error)) => {
                    tracing::debug!(error = %error, "the consumer reported a broker failure");
                    self.watchdog.lost(self.shared.health, error);
                }
                None => return Err(self.watchdog.cancelled()),
            }
        }
    }

    /// Hands a delivery to its lane, still running the watchdog while the lane is full. False
    /// when stopping (a delivery not handed over goes back to the queue when the channel closes).
    async fn hand_over(&mut self, delivery: Delivery) -> Result<bool, BrokerError> {
        loop {
            tokio::select! {
                permit = self.lanes.reserve(&delivery) => return Ok(match permit {
                    Some(permit) => {
                        permit.send(delivery);
                        true
                    }
                    None => false,
                }),
                _ = self.tick.tick() => {
                    self.watchdog.check(self.broker, &mut self.consumer, self.shared.health).await?;
                }
                () = self.shared.stop.cancelled() => return Ok(false),
            }
        }
    }

    /// Ends the consumer. After a graceful stop: tells the broker to send no more and finishes
    /// what is in flight while the channel is still open to acknowledge it (deliveries buffered
    /// but not started go back to the queue when the channel closes). After a failure: closes
    /// the channel, so that its unacknowledged deliveries go back to the queue, and leaves the
    /// lanes to end.
    async fn finish(
        self,
        in_flight: &mut JoinSet<()>,
        ended: Result<(), BrokerError>,
        leftover: &mut Option<Consumer>,
    ) -> Result<(), BrokerError> {
        drop(self.lanes);
        if ended.is_ok() {
            self.consumer.cancel().await;
            let waiting = in_flight.len();
            if waiting > 0 {
                tracing::info!(in_flight = waiting, "finishing in-flight messages");
            }
            join_until(in_flight, self.shared.abandon).await;
        }
        match ended {
            Ok(()) => self.consumer.close().await,
            // The connection may be being recovered, and lapin recovers the channel with its
            // consumer: closed now, the close could not go out and the channel would come back
            // holding up to `prefetch` deliveries that nobody reads (found in the reliability
            // suite, broker path black-holed: 750 deliveries stuck behind a second consumer).
            // The caller closes it once the connection is back (`close_recovered`).
            Err(_) => *leftover = Some(self.consumer),
        }
        ended
    }
}

/// Closes the consumer of a failed session on a connection that is up again: waits (at most
/// ten seconds) for lapin to finish recovering its channel, then closes it, so that its
/// unacknowledged deliveries go back to the queue. A channel that is closed for good needs
/// nothing.
async fn close_recovered(consumer: Consumer) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while consumer.is_recovering() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    consumer.close().await;
}

/// Waits for every task of `tasks` to end; once `abandon` fires, gives them a moment to see it
/// (a retry that gives up marks its deliveries abandoned) and then aborts what is left: an
/// acknowledgement or a commit caught on a dead connection must not hold the shutdown.
async fn join_until(tasks: &mut JoinSet<()>, abandon: &CancellationToken) {
    let all = async { while tasks.join_next().await.is_some() {} };
    tokio::select! {
        () = all => return,
        () = abandon.cancelled() => {}
    }
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if !tasks.is_empty() {
        tracing::warn!(
            lanes = tasks.len(),
            "abandoning in-flight messages at the shutdown deadline; the broker will redeliver them"
        );
        tasks.shutdown().await;
    }
}
