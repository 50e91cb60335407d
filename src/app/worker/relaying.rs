//! The relay task: keeps a broker connection for the outbox relay (`app::relay`), reconnecting
//! like the consumer does, and flushes the outbox once the consumer has drained.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::flow::Flow;
use super::keep_or_replace;
use crate::app::connect;
use crate::app::direct::DirectPublisher;
use crate::app::http::Health;
use crate::app::relay;
use crate::app::retry::Backoff;
use crate::broker::{Broker, Publisher};
use crate::config::Settings;
use crate::store::Store;
use crate::telemetry::events::{BrokerInterrupted, Component, Quiet};

/// Relays the outbox until `drained`, then flushes it (until `abandon`). Like the consumer, it
/// leaves a lost connection to lapin's recovery for up to `amqp.recovery_timeout_seconds`, then
/// gives it up and opens a new one.
pub(super) async fn relay_task(
    settings: Settings,
    store: Store,
    health: Arc<Health>,
    direct: Arc<DirectPublisher>,
    drained: CancellationToken,
    abandon: CancellationToken,
) {
    let mut backoff = Backoff::new(&settings);
    // Settings the consumer reads too: it stops the process with the error.
    let Ok(target) = connect::BrokerTarget::from_settings(&settings) else {
        return;
    };
    let mut flow = Flow::new(Component::Relay, health);
    let mut current: Option<Broker> = None;
    let mut last: Option<(Broker, Publisher)> = None;
    let mut warned = Quiet::default();
    while !drained.is_cancelled() {
        let broker = match current.take() {
            Some(broker) => broker,
            None => {
                let name = "induction-reconciler relay";
                match connect::broker_waiting(&settings, &target, name, &drained).await {
                    Ok(Some(broker)) => broker,
                    _ => break,
                }
            }
        };
        let relaying = relay_on(&settings, &store, &broker, &direct, &drained, &abandon);
        let ended = tokio::select! {
            ended = relaying => ended,
            never = flow.follow(&broker) => match never {},
        };
        // Until the relay has a publisher again, lanes leave their outcomes to it.
        direct.offer(None);
        let (error, timed_out) = match ended {
            Ok(publisher) => {
                last = Some((broker, publisher));
                break;
            }
            Err((publisher, error, timed_out)) => {
                if let Some(publisher) = publisher {
                    last = Some((broker.clone(), publisher));
                }
                (error, timed_out)
            }
        };
        BrokerInterrupted {
            component: Component::Relay,
            error: &error,
        }
        .emit(Some(&mut warned));
        if !backoff.pause(&drained).await {
            break;
        }
        current = keep_or_replace(broker, timed_out, &settings, &drained).await;
        if current.is_none() {
            flow.forget();
        }
    }
    if let Some((broker, publisher)) = last {
        flush_at_shutdown(&settings, &store, &publisher, &abandon).await;
        broker.close().await;
    }
}

/// What stopped a relay on one connection: the publisher it had (if it got one), the error, and
/// whether a broker operation timed out.
type Interrupted = (Option<Publisher>, String, bool);

/// Relays on a new publishing channel of `broker` (one that failed may be wedged) until
/// `drained` or the first failure.
async fn relay_on(
    settings: &Settings,
    store: &Store,
    broker: &Broker,
    direct: &DirectPublisher,
    drained: &CancellationToken,
    abandon: &CancellationToken,
) -> Result<Publisher, Interrupted> {
    let publisher = broker
        .publisher()
        .await
        .map_err(|error| (None, error.to_string(), error.is_timeout()))?;
    direct.offer(Some(publisher.clone()));
    relay::relay_until(
        store,
        &publisher,
        &settings.topology.outcome_exchange,
        settings.relay.batch_size,
        Duration::from_millis(settings.relay.poll_interval_millis),
        drained,
        abandon,
    )
    .await
    .map_err(|error| {
        let timed_out = error.broker_timeout();
        (Some(publisher.clone()), error.to_string(), timed_out)
    })?;
    Ok(publisher)
}

/// The last flush, bounded by the shutdown deadline.
async fn flush_at_shutdown(
    settings: &Settings,
    store: &Store,
    publisher: &Publisher,
    abandon: &CancellationToken,
) {
    let deadline = tokio::time::Instant::now() + settings.worker.shutdown_timeout();
    let flushing = relay::flush(
        store,
        publisher,
        &settings.topology.outcome_exchange,
        settings.relay.batch_size,
        deadline,
    );
    tokio::select! {
        result = flushing => {
            if let Err(error) = result {
                tracing::warn!(error = %error, "could not flush the outbox; the next worker will publish it");
            }
        }
        () = abandon.cancelled() => {}
    }
}
