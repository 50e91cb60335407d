//! `run`: the worker. Consumes the inbox queue, relays the outbox and sweeps overdue provisional
//! spells until the shutdown future resolves, then drains within a bounded time.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use backon::{BackoffBuilder, ExponentialBuilder};
use futures_lite::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::handler::{Handler, now};
use super::relay;
use crate::broker::{
    Broker, BrokerError, Link, OPERATION_TIMEOUT, Publisher, bounded, declare_topology,
};
use crate::config::Settings;
use crate::store::Store;
use crate::telemetry::metrics::{ComponentLabel, metrics};

fn delays(settings: &Settings) -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(settings.worker.retry_min_millis))
        .with_max_delay(Duration::from_millis(settings.worker.retry_max_millis))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Sleeps for the next back-off delay; false when `stop` fired first.
async fn pause(delays: &mut impl Iterator<Item = Duration>, stop: &CancellationToken) -> bool {
    let delay = delays.next().unwrap_or(Duration::from_secs(30));
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        () = stop.cancelled() => false,
    }
}

/// Connects to Postgres, waiting with back-off while it is unavailable. `None` if stopped first.
pub async fn connect_store(
    settings: &Settings,
    stop: &CancellationToken,
) -> anyhow::Result<Option<Store>> {
    let url = settings.database_url()?;
    let mut delays = delays(settings);
    let mut warned = Quiet::default();
    loop {
        match Store::connect(
            &url,
            settings.database.max_connections,
            Duration::from_secs(settings.database.acquire_timeout_seconds),
        )
        .await
        {
            Ok(store) => return Ok(Some(store)),
            Err(error) if error.is_transient() => {
                warned.log(&error, "cannot reach the database yet; retrying");
            }
            Err(error) => return Err(error).context("cannot connect to the database"),
        }
        if !pause(&mut delays, stop).await {
            return Ok(None);
        }
    }
}

/// Rate-limits a repeated warning: the first, then at most one a minute (the rest at debug), so
/// that an outage is logged when it starts and while it lasts, not on every retry.
#[derive(Default)]
struct Quiet {
    last: Option<tokio::time::Instant>,
}

impl Quiet {
    /// True when the warning should be logged now.
    fn due(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let due = self
            .last
            .is_none_or(|last| now.duration_since(last) >= Duration::from_secs(60));
        if due {
            self.last = Some(now);
        }
        due
    }

    /// True when a warning was logged.
    fn any(&self) -> bool {
        self.last.is_some()
    }

    /// Logs `message` with `error` at `warn` when due, at `debug` otherwise.
    fn log(&mut self, error: &dyn std::fmt::Display, message: &'static str) {
        if self.due() {
            tracing::warn!(error = %error, "{message}");
        } else {
            tracing::debug!(error = %error, "{message}");
        }
    }
}

/// Connects to RabbitMQ, waiting with back-off while it is unavailable. `None` if stopped first.
async fn connect_broker(
    settings: &Settings,
    name: &str,
    stop: &CancellationToken,
) -> anyhow::Result<Option<Broker>> {
    let url = settings.amqp_url()?;
    let ca = settings.amqp_tls_ca()?;
    let mut delays = delays(settings);
    let mut warned = Quiet::default();
    loop {
        // Bounded: a connection attempt to a broker that is still starting can hang.
        let connecting = tokio::time::timeout(
            Duration::from_secs(30),
            Broker::connect_with_ca(&url, name, ca.as_deref()),
        );
        let attempt = tokio::select! {
            attempt = connecting => attempt.unwrap_or_else(|_| Err(BrokerError::timed_out("a connection (30 s)"))),
            () = stop.cancelled() => return Ok(None),
        };
        match attempt {
            Ok(broker) => {
                if warned.any() {
                    tracing::info!("reached the broker");
                }
                return Ok(Some(broker));
            }
            Err(error) if error.is_transient() => {
                warned.log(&error, "cannot reach the broker yet; retrying");
            }
            Err(error) => return Err(error).context("cannot connect to the broker"),
        }
        if !pause(&mut delays, stop).await {
            return Ok(None);
        }
    }
}

/// The worker's shutdown, in three steps from the moment `shutdown` resolves: `stop` (take no
/// new messages, finish what is in flight), `abandon` (shortly before the deadline: give up
/// retries and relay rounds, leaving their deliveries unacknowledged for redelivery) and
/// `deadline` (`worker.shutdown_timeout_seconds` after the request: whatever is still running is
/// dropped, so the process ends within its bound whatever state its lanes and connections are in).
struct Shutdown {
    stop: CancellationToken,
    abandon: CancellationToken,
    deadline: CancellationToken,
}

impl Shutdown {
    fn start(timeout: Duration, shutdown: impl Future<Output = ()> + Send + 'static) -> Self {
        let plan = Self {
            stop: CancellationToken::new(),
            abandon: CancellationToken::new(),
            deadline: CancellationToken::new(),
        };
        // The last part of the bound is left for abandoned work to roll back and channels to close.
        let grace = (timeout / 4).min(Duration::from_secs(2));
        let (stop, abandon, deadline) = (
            plan.stop.clone(),
            plan.abandon.clone(),
            plan.deadline.clone(),
        );
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutdown requested: no new messages will be taken");
            stop.cancel();
            tokio::time::sleep(timeout.saturating_sub(grace)).await;
            abandon.cancel();
            tokio::time::sleep(grace).await;
            deadline.cancel();
        });
        plan
    }
}

/// Runs the worker until `shutdown` resolves. Returns `Ok` after a graceful shutdown, and also
/// when the shutdown deadline cut in-flight work short (that work is redelivered by the broker).
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let plan = Shutdown::start(settings.worker.shutdown_timeout(), shutdown);
    tokio::select! {
        result = run_until_drained(&settings, &plan) => result,
        () = plan.deadline.cancelled() => {
            tracing::warn!(
                timeout_s = settings.worker.shutdown_timeout_seconds,
                "shutdown deadline reached; unfinished messages stay unacknowledged and will be redelivered"
            );
            Ok(())
        }
    }
}

async fn run_until_drained(settings: &Settings, plan: &Shutdown) -> anyhow::Result<()> {
    let Shutdown { stop, abandon, .. } = plan;
    let Some(store) = connect_store(settings, stop).await? else {
        return Ok(());
    };
    if settings.database.migrate_on_start {
        store
            .migrate()
            .await
            .context("cannot apply database migrations")?;
    }
    tracing::info!("worker started");

    // `drained` fires once in-flight messages are finished, so the relay's last flush includes
    // their outcomes; `abandon` fires near the shutdown deadline and stops any retry still going.
    let drained = CancellationToken::new();
    let mut background = JoinSet::new();
    if settings.relay.enabled {
        background.spawn(relay_task(
            settings.clone(),
            store.clone(),
            drained.clone(),
            abandon.clone(),
        ));
    }
    if settings.sweep.enabled {
        background.spawn(sweep_task(settings.clone(), store.clone(), stop.clone()));
    }

    let health = super::http::Health::new(store.clone());
    if settings.http.enabled {
        let listen = settings.http.listen.clone();
        let (serving_health, serving_stop) = (health.clone(), stop.clone());
        background.spawn(async move {
            if let Err(error) = super::http::serve(&listen, serving_health, serving_stop).await {
                tracing::error!(error = %error, address = %listen, "cannot serve the metrics and health endpoint");
            }
        });
        background.spawn(super::http::refresh_gauges(
            store.clone(),
            Duration::from_secs(settings.http.gauge_refresh_seconds.max(1)),
            stop.clone(),
        ));
    }

    let consumed = consume(settings, &store, stop, abandon, &health).await;
    drained.cancel();
    while background.join_next().await.is_some() {}
    store.pool().close().await;
    consumed?;
    tracing::info!("worker stopped");
    Ok(())
}

/// Consumes until `stop`; then waits for in-flight deliveries (until `abandon`).
///
/// A lost connection is lapin's to recover (it reopens the channel, reapplies the QoS and
/// resumes the consumer); the worker watches. When the consumer stops, the worker waits up to
/// `amqp.recovery_timeout_seconds` for the connection to be up and starts a new channel and
/// consumer on it; when the connection does not come back in that time, the worker gives it up
/// (see [`Broker::retire`]) and opens a new one.
async fn consume(
    settings: &Settings,
    store: &Store,
    stop: &CancellationToken,
    abandon: &CancellationToken,
    health: &super::http::Health,
) -> anyhow::Result<()> {
    let mut in_flight: JoinSet<()> = JoinSet::new();
    let mut delays = delays(settings);
    let mut current: Option<Broker> = None;
    let shared = Shared {
        settings,
        store,
        stop,
        abandon,
        health,
    };
    let result = loop {
        if stop.is_cancelled() {
            break Ok(());
        }
        let broker = match current.take() {
            Some(broker) => broker,
            None => match connect_broker(settings, "induction-reconciler consumer", stop).await? {
                Some(broker) => broker,
                None => break Ok(()),
            },
        };
        match consume_on(&shared, &broker, &mut in_flight).await {
            Ok(()) => {
                current = Some(broker);
                break Ok(());
            }
            Err(error) if error.is_transient() => {
                health.set_broker_connected(false);
                metrics()
                    .reconnects
                    .get_or_create(&ComponentLabel {
                        component: "consumer".into(),
                    })
                    .inc();
                tracing::warn!(error = %error, "consuming stopped; starting again");
                if !pause(&mut delays, stop).await {
                    current = Some(broker);
                    break Ok(());
                }
                current = keep_or_replace(broker, error.is_timeout(), settings, stop).await;
            }
            Err(error) => break Err(anyhow::Error::new(error).context("cannot consume")),
        }
    };
    // Deliveries still in flight from a channel that is gone cannot be acknowledged; the broker
    // redelivers them and the inbox de-duplicates. Let them end, or drop them when abandoned.
    join_until(&mut in_flight, abandon).await;
    if let Some(broker) = current {
        broker.close().await;
    }
    result
}

/// After a failure on a connection: keeps it if lapin has it up (or brings it back within
/// `amqp.recovery_timeout_seconds`), so that the caller opens a new channel on it; gives it up
/// (see [`Broker::retire`]) if it does not come back, or if an operation on it timed out (a
/// wedged connection can look up).
async fn keep_or_replace(
    broker: Broker,
    timed_out: bool,
    settings: &Settings,
    stop: &CancellationToken,
) -> Option<Broker> {
    if !timed_out
        && broker
            .wait_until_up(settings.amqp.recovery_timeout(), stop)
            .await
    {
        return Some(broker);
    }
    if stop.is_cancelled() {
        return Some(broker);
    }
    tracing::warn!("giving up this broker connection; opening a new one");
    broker.retire();
    None
}

/// The lane a delivery belongs to: by the TRN in its payload, so that one teacher's messages
/// are applied by one lane. Messages without a readable TRN go to lane 0 (they will be parked).
fn lane_of(body: &[u8], lanes: usize) -> usize {
    let trn = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("payload")?.get("trn")?.as_str()?.parse::<u64>().ok());
    trn.map_or(0, |t| (t % lanes as u64) as usize)
}

/// A lane: takes what is waiting (up to the batch size, after lingering if configured) and
/// applies it as one batch, one batch at a time, until its sender is dropped and it is empty.
async fn lane(
    handler: Handler,
    mut deliveries: tokio::sync::mpsc::Receiver<lapin::message::Delivery>,
    batch_size: usize,
    linger: Duration,
    busy: Arc<AtomicUsize>,
) {
    while let Some(first) = deliveries.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + linger;
        while batch.len() < batch_size {
            match deliveries.try_recv() {
                Ok(delivery) => batch.push(delivery),
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => break,
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                    match tokio::time::timeout_at(deadline, deliveries.recv()).await {
                        Ok(Some(delivery)) => batch.push(delivery),
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }
        let taken = batch.len();
        handler.handle_batch(batch).await;
        busy.fetch_sub(taken, Ordering::Relaxed);
    }
}

/// The consumer's watchdog: notices a lost connection while lapin recovers it, and a consumer
/// that receives nothing although its queue has messages ready and the worker is idle.
struct Watchdog {
    /// When the connection or the channel was first seen down, in the current outage.
    down_since: Option<tokio::time::Instant>,
    /// When the last delivery arrived (or the last stall check found nothing wrong).
    last_delivery: tokio::time::Instant,
    /// Deliveries handed to lanes and not yet finished.
    busy: Arc<AtomicUsize>,
    limit: Duration,
}

impl Watchdog {
    async fn check(
        &mut self,
        broker: &Broker,
        channel: &lapin::Channel,
        queue: &str,
        health: &super::http::Health,
    ) -> Result<(), BrokerError> {
        let link = broker.link();
        if link == Link::Down {
            return Err(BrokerError::lost(
                "the connection (lapin could not recover it)",
            ));
        }
        if link == Link::Up && channel.status().connected() {
            if self.down_since.take().is_some() {
                tracing::info!("the broker connection is back; consuming again");
                metrics()
                    .reconnects
                    .get_or_create(&ComponentLabel {
                        component: "consumer".into(),
                    })
                    .inc();
                health.set_broker_connected(true);
                self.last_delivery = tokio::time::Instant::now();
            }
            return self.check_stalled(channel, queue).await;
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
    async fn check_stalled(
        &mut self,
        channel: &lapin::Channel,
        queue: &str,
    ) -> Result<(), BrokerError> {
        if self.busy.load(Ordering::Relaxed) > 0 || self.last_delivery.elapsed() < self.limit {
            return Ok(());
        }
        let declared = bounded(
            "a passive declare of the inbox queue",
            channel.queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            ),
        )
        .await?;
        self.last_delivery = tokio::time::Instant::now();
        if declared.message_count() > 0 {
            return Err(BrokerError::lost(
                "the consumer (messages are ready but none arrive)",
            ));
        }
        Ok(())
    }
}

/// What the consumer shares with every connection it makes.
struct Shared<'a> {
    settings: &'a Settings,
    store: &'a Store,
    stop: &'a CancellationToken,
    abandon: &'a CancellationToken,
    health: &'a super::http::Health,
}

async fn consume_on(
    shared: &Shared<'_>,
    broker: &Broker,
    in_flight: &mut JoinSet<()>,
) -> Result<(), BrokerError> {
    let Shared {
        settings,
        store,
        stop,
        abandon,
        health,
    } = *shared;
    let channel = broker.channel().await?;
    if settings.amqp.declare_topology {
        tokio::time::timeout(
            OPERATION_TIMEOUT,
            declare_topology(&channel, &settings.topology),
        )
        .await
        .map_err(|_| BrokerError::timed_out("the topology to be declared"))??;
    }
    let parking = broker.publisher().await?;
    bounded(
        "the QoS",
        channel.basic_qos(settings.amqp.prefetch, BasicQosOptions::default()),
    )
    .await?;
    let tag = format!("induction-reconciler-{}", uuid::Uuid::new_v4());
    let mut consumer = bounded(
        "a consumer",
        channel.basic_consume(
            settings.topology.inbox_queue.as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    tracing::info!(queue = %settings.topology.inbox_queue, prefetch = settings.amqp.prefetch, "consuming");
    health.set_broker_connected(true);
    let handler = Handler {
        store: store.clone(),
        parking: parking.clone(),
        settings: settings.clone(),
        abandon: abandon.clone(),
    };
    let busy = Arc::new(AtomicUsize::new(0));
    // Lanes: each teacher's messages go to one lane (by TRN), and each lane applies one batch at
    // a time, so that concurrent transactions rarely wait for each other's teacher locks.
    let lanes = settings.amqp.concurrency;
    let mut senders = Vec::with_capacity(lanes);
    for _ in 0..lanes {
        let (tx, rx) = tokio::sync::mpsc::channel(settings.amqp.batch_size.max(1));
        senders.push(tx);
        in_flight.spawn(lane(
            handler.clone(),
            rx,
            settings.amqp.batch_size,
            Duration::from_millis(settings.amqp.batch_linger_millis),
            busy.clone(),
        ));
    }
    let mut watchdog = Watchdog {
        down_since: None,
        last_delivery: tokio::time::Instant::now(),
        busy: busy.clone(),
        limit: settings.amqp.recovery_timeout(),
    };
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut events = Box::pin(broker.events());
    let queue = settings.topology.inbox_queue.as_str();
    let ended = loop {
        while in_flight.try_join_next().is_some() {}
        let next = tokio::select! {
            next = consumer.next() => next,
            event = events.next() => match event {
                // Only errors lapin cannot recover from are reported here.
                Some(lapin::Event::Error(error)) => break Err(error.into()),
                _ => continue,
            },
            _ = tick.tick() => match watchdog.check(broker, &channel, queue, health).await {
                Ok(()) => continue,
                Err(error) => break Err(error),
            },
            () = stop.cancelled() => break Ok(()),
        };
        match next {
            Some(Ok(delivery)) => {
                watchdog.last_delivery = tokio::time::Instant::now();
                busy.fetch_add(1, Ordering::Relaxed);
                let lane = lane_of(&delivery.data, lanes);
                let mut delivery = Some(delivery);
                let mut interrupted = None;
                // A full lane must not keep the watchdog from noticing a lost connection. A
                // delivery not handed to a lane goes back to the queue when the channel closes.
                while let Some(waiting) = delivery.take() {
                    tokio::select! {
                        sent = senders[lane].reserve() => match sent {
                            Ok(permit) => permit.send(waiting),
                            Err(_) => interrupted = Some(Ok(())),
                        },
                        _ = tick.tick() => match watchdog.check(broker, &channel, queue, health).await {
                            Ok(()) => delivery = Some(waiting),
                            Err(error) => interrupted = Some(Err(error)),
                        },
                        () = stop.cancelled() => interrupted = Some(Ok(())),
                    }
                }
                if let Some(ended) = interrupted {
                    break ended;
                }
            }
            // lapin reports a recoverable failure here and resumes the stream after recovery;
            // the watchdog decides when to stop waiting for it.
            Some(Err(error)) => {
                tracing::debug!(error = %error, "the consumer reported a broker failure");
            }
            None => {
                break Err(BrokerError::lost("the consumer (the broker cancelled it)"));
            }
        }
    };
    finish(channel, &tag, senders, in_flight, abandon, ended).await
}

/// Ends a consumer. After a graceful stop: tells the broker to send no more and finishes what is
/// in flight while the channel is still open to acknowledge it (deliveries buffered but not
/// started go back to the queue when the channel closes). After a failure: closes the channel,
/// so that its unacknowledged deliveries go back to the queue, and leaves the lanes to end.
async fn finish(
    channel: lapin::Channel,
    tag: &str,
    senders: Vec<tokio::sync::mpsc::Sender<lapin::message::Delivery>>,
    in_flight: &mut JoinSet<()>,
    abandon: &CancellationToken,
    ended: Result<(), BrokerError>,
) -> Result<(), BrokerError> {
    drop(senders);
    let bound = Duration::from_secs(5);
    if ended.is_ok() {
        let _ = tokio::time::timeout(
            bound,
            channel.basic_cancel(tag.into(), BasicCancelOptions::default()),
        )
        .await;
        let waiting = in_flight.len();
        if waiting > 0 {
            tracing::info!(in_flight = waiting, "finishing in-flight messages");
        }
        join_until(in_flight, abandon).await;
    }
    let _ = tokio::time::timeout(bound, channel.close(200, "consumer ended".into())).await;
    ended
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

/// Relays the outbox until `drained`, then flushes it (until `abandon`). Like the consumer, it
/// leaves a lost connection to lapin's recovery for up to `amqp.recovery_timeout_seconds`, then
/// gives it up and opens a new one.
async fn relay_task(
    settings: Settings,
    store: Store,
    drained: CancellationToken,
    abandon: CancellationToken,
) {
    let mut delays = delays(&settings);
    let exchange = settings.topology.outcome_exchange.clone();
    let poll = Duration::from_millis(settings.relay.poll_interval_millis);
    let mut current: Option<Broker> = None;
    let mut last: Option<(Broker, Publisher)> = None;
    let mut warned = Quiet::default();
    loop {
        if drained.is_cancelled() {
            break;
        }
        let broker = match current.take() {
            Some(broker) => broker,
            None => match connect_broker(&settings, "induction-reconciler relay", &drained).await {
                Ok(Some(broker)) => broker,
                _ => break,
            },
        };
        // A new publishing channel after any failure: one that failed may be wedged.
        let result = match broker.publisher().await {
            Ok(publisher) => {
                last = Some((broker.clone(), publisher.clone()));
                relay::relay_until(
                    &store,
                    &publisher,
                    &exchange,
                    settings.relay.batch_size,
                    poll,
                    &drained,
                    &abandon,
                )
                .await
                .map_err(|error| {
                    let timed_out = error.broker_timeout();
                    (error.to_string(), timed_out)
                })
            }
            Err(error) => Err((error.to_string(), error.is_timeout())),
        };
        match result {
            Ok(()) => break,
            Err((error, timed_out)) => {
                metrics()
                    .reconnects
                    .get_or_create(&ComponentLabel {
                        component: "relay".into(),
                    })
                    .inc();
                warned.log(&error, "outbox relay interrupted; retrying");
                if !pause(&mut delays, &drained).await {
                    break;
                }
                current = keep_or_replace(broker, timed_out, &settings, &drained).await;
            }
        }
    }
    // Last flush, bounded by the shutdown deadline.
    if let Some((broker, publisher)) = last {
        let deadline = tokio::time::Instant::now() + settings.worker.shutdown_timeout();
        tokio::select! {
            result = relay::flush(&store, &publisher, &exchange, settings.relay.batch_size, deadline) => {
                if let Err(error) = result {
                    tracing::warn!(error = %error, "could not flush the outbox; the next worker will publish it");
                }
            }
            () = abandon.cancelled() => {}
        }
        broker.close().await;
    }
}

async fn sweep_task(settings: Settings, store: Store, stop: CancellationToken) {
    let max_age = time::Duration::seconds(settings.sweep.overdue_after_seconds as i64);
    let interval = Duration::from_secs(settings.sweep.interval_seconds);
    loop {
        loop {
            match store
                .sweep_overdue(now(), max_age, settings.sweep.batch_size)
                .await
            {
                Ok(swept) if swept as i64 >= settings.sweep.batch_size => continue,
                Ok(swept) => {
                    if swept > 0 {
                        tracing::info!(outcomes = swept, "re-emitted overdue provisional outcomes");
                    }
                    break;
                }
                Err(error) => {
                    tracing::warn!(error = %error, "overdue sweep failed; will try again");
                    break;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = stop.cancelled() => return,
        }
    }
}
