//! `run`: the worker. Consumes the inbox queue (`consumer`, `lanes`, `watchdog`), relays the
//! outbox (`relaying`), follows the broker's flow control on both connections (`flow`) and
//! sweeps overdue provisional spells (`sweep`) until the shutdown future resolves, then drains
//! within `worker.shutdown_timeout_seconds`.

mod consumer;
mod flow;
mod lanes;
mod relaying;
mod sweep;
mod watchdog;

use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::connect;
use super::direct::DirectPublisher;
use super::http::{self, Health};
use crate::broker::Broker;
use crate::config::Settings;

/// The worker's shutdown, in three steps from the moment `shutdown` resolves: `stop` (take no
/// new messages, finish what is in flight), `abandon` (shortly before the deadline: give up
/// retries and relay rounds, leaving their deliveries unacknowledged for redelivery) and
/// `deadline` (shortly before `worker.shutdown_timeout_seconds` after the request: whatever is
/// still running is dropped, so the process ends within its bound whatever state its lanes and
/// connections are in).
pub(crate) struct Shutdown {
    pub(crate) stop: CancellationToken,
    pub(crate) abandon: CancellationToken,
    deadline: CancellationToken,
}

impl Shutdown {
    fn start(timeout: Duration, shutdown: impl Future<Output = ()> + Send + 'static) -> Self {
        let plan = Self {
            stop: CancellationToken::new(),
            abandon: CancellationToken::new(),
            deadline: CancellationToken::new(),
        };
        // The last part of the bound is left for abandoned work to roll back and channels to
        // close (`grace`), and for the runtime to stop once the deadline dropped what was left
        // (`margin`: the process must be gone by the bound, not start leaving at it).
        let grace = (timeout / 4).min(Duration::from_secs(2));
        let margin = (timeout / 8).min(Duration::from_millis(1500));
        let (stop, abandon, deadline) = (
            plan.stop.clone(),
            plan.abandon.clone(),
            plan.deadline.clone(),
        );
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutdown requested: no new messages will be taken");
            stop.cancel();
            tokio::time::sleep(timeout.saturating_sub(grace + margin)).await;
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
    let Some(store) = connect::store_waiting(settings, &plan.stop).await? else {
        return Ok(());
    };
    if settings.database.migrate_on_start {
        store
            .migrate()
            .await
            .context("cannot apply database migrations")?;
    }
    // The pool's connections are opened now, not by the first lanes that need them (decision
    // 49).
    let warmed = store.warm(settings.database.max_connections).await;
    tracing::debug!(connections = warmed, "database connections opened");
    for warning in settings.warnings() {
        tracing::warn!(warning = %warning, "unsafe settings");
    }
    tracing::info!("worker started");

    // `drained` fires once in-flight messages are finished, so the relay's last flush includes
    // their outcomes; `abandon` fires near the shutdown deadline and stops any retry still going.
    let drained = CancellationToken::new();
    let mut background = JoinSet::new();
    let health = Health::new(store.clone(), settings);
    // The relay offers its publisher to the lanes, which publish their own outcomes on it.
    let direct = DirectPublisher::new(settings);
    if settings.relay.enabled {
        background.spawn(relaying::relay_task(
            settings.clone(),
            store.clone(),
            health.clone(),
            direct.clone(),
            drained.clone(),
            plan.abandon.clone(),
        ));
    }
    if settings.sweep.enabled {
        background.spawn(sweep::sweep_task(
            settings.clone(),
            store.clone(),
            plan.stop.clone(),
        ));
    }
    if settings.http.enabled {
        serve_http(settings, &health, &plan.stop, &mut background);
    }

    let consumed = consumer::consume(settings, &store, plan, &health, &direct).await;
    if consumed.is_err() {
        // The consumer has failed for good: end everything else too, so that the process
        // exits with the error (for the orchestrator to restart) instead of serving health
        // endpoints with nothing consuming.
        plan.stop.cancel();
    }
    drained.cancel();
    while background.join_next().await.is_some() {}
    // A connection stuck on a dead network path must not hold the exit.
    let _ = tokio::time::timeout(Duration::from_secs(2), store.pool().close()).await;
    consumed?;
    tracing::info!("worker stopped");
    Ok(())
}

/// Serves `/metrics`, `/livez` and `/readyz`, and keeps the database gauges fresh, until `stop`.
fn serve_http(
    settings: &Settings,
    health: &std::sync::Arc<Health>,
    stop: &CancellationToken,
    background: &mut JoinSet<()>,
) {
    let listen = settings.http.listen.clone();
    let (serving_health, serving_stop) = (health.clone(), stop.clone());
    background.spawn(async move {
        if let Err(error) = http::serve(&listen, serving_health, serving_stop).await {
            tracing::error!(error = %error, address = %listen, "cannot serve the metrics and health endpoint");
        }
    });
    background.spawn(http::refresh_gauges(
        health.clone(),
        Duration::from_secs(settings.http.gauge_refresh_seconds.max(1)),
        stop.clone(),
    ));
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
