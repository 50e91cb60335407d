//! The operators' HTTP endpoint: `/metrics` (Prometheus text format), `/livez` and `/readyz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::store::Store;
use crate::telemetry::events::Component;
use crate::telemetry::metrics::metrics;

/// How long the readiness check waits for the database to answer.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether work moves: deliveries handed to the lanes and not yet finished, and when one last
/// finished (or work arrived at an idle worker).
pub struct Progress {
    epoch: Instant,
    waiting: AtomicUsize,
    /// Milliseconds after `epoch`.
    last_moved: AtomicU64,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            waiting: AtomicUsize::new(0),
            last_moved: AtomicU64::new(0),
        }
    }
}

impl Progress {
    fn touch(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.last_moved.store(now, Ordering::Relaxed);
    }

    /// A delivery was handed to a lane.
    pub fn taken(&self) {
        if self.waiting.fetch_add(1, Ordering::Relaxed) == 0 {
            self.touch();
        }
    }

    /// `n` deliveries finished (acknowledged, parked, or left for redelivery).
    pub fn finished(&self, n: usize) {
        self.touch();
        let _ = self
            .waiting
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                Some(w.saturating_sub(n))
            });
    }

    /// Deliveries handed to lanes and not yet finished.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// How long work has waited with nothing finishing; zero when nothing waits.
    pub fn stalled_for(&self) -> Duration {
        if self.waiting() == 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_moved.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

/// Why the worker is not ready, as `/readyz` says and the `not_ready` metric counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotReady {
    /// The database does not answer a trivial query.
    DatabaseUnreachable,
    /// The consumer has no working broker connection.
    BrokerUnreachable,
    /// RabbitMQ blocks one of the worker's connections (flow control: a memory or disk alarm).
    BrokerBlocked,
    /// Deliveries wait and none has finished for `worker.readiness_stall_seconds`.
    NotProgressing,
}

impl NotReady {
    /// Every reason, in the order they are checked.
    pub const ALL: [Self; 4] = [
        Self::DatabaseUnreachable,
        Self::BrokerUnreachable,
        Self::BrokerBlocked,
        Self::NotProgressing,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DatabaseUnreachable => "database_unreachable",
            Self::BrokerUnreachable => "broker_unreachable",
            Self::BrokerBlocked => "broker_blocked",
            Self::NotProgressing => "not_progressing",
        }
    }

    /// What `/readyz` answers.
    fn answer(self) -> &'static str {
        match self {
            Self::DatabaseUnreachable => "database unreachable\n",
            Self::BrokerUnreachable => "broker unreachable\n",
            Self::BrokerBlocked => "broker blocked\n",
            Self::NotProgressing => "not making progress\n",
        }
    }
}

/// What readiness and liveness depend on.
pub struct Health {
    store: Store,
    broker_connected: AtomicBool,
    /// Whether the broker blocks the consumer's and the relay's connection (by `Component`).
    broker_blocked: [AtomicBool; 2],
    progress: Arc<Progress>,
    readiness_stall: Duration,
    liveness_stall: Duration,
    /// Whether the last readiness check found a dependency down (`/livez` reads it instead of
    /// pinging, so that a slow database cannot make a liveness probe time out).
    outage: AtomicU8,
}

impl Health {
    /// Not ready until the consumer reports a broker connection.
    pub fn new(store: Store, settings: &Settings) -> Arc<Self> {
        Arc::new(Self {
            store,
            broker_connected: AtomicBool::new(false),
            broker_blocked: [AtomicBool::new(false), AtomicBool::new(false)],
            progress: Arc::default(),
            readiness_stall: Duration::from_secs(settings.worker.readiness_stall_seconds),
            liveness_stall: Duration::from_secs(settings.worker.liveness_stall_seconds),
            outage: AtomicU8::new(0),
        })
    }

    /// The store readiness pings.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The lanes' progress.
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// Records whether the consumer has a working broker connection.
    pub fn set_broker_connected(&self, connected: bool) {
        self.broker_connected.store(connected, Ordering::Relaxed);
    }

    /// Records whether the broker blocks `component`'s connection, and sets the
    /// `broker_blocked` gauge (1 while any is blocked).
    pub fn set_broker_blocked(&self, component: Component, blocked: bool) {
        let index = match component {
            Component::Consumer => 0,
            Component::Relay => 1,
        };
        self.broker_blocked[index].store(blocked, Ordering::Relaxed);
        metrics()
            .broker_blocked
            .set(i64::from(self.is_broker_blocked()));
    }

    /// True while the broker blocks any of the worker's connections.
    pub fn is_broker_blocked(&self) -> bool {
        self.broker_blocked
            .iter()
            .any(|blocked| blocked.load(Ordering::Relaxed))
    }

    /// Why the worker cannot make progress now, if it cannot; sets the `not_ready` metric.
    pub async fn readiness(&self) -> Option<NotReady> {
        let database = self.store.ping(PING_TIMEOUT).await;
        let broker = self.broker_connected.load(Ordering::Relaxed);
        let blocked = self.is_broker_blocked();
        let stalled = self.progress.stalled_for();
        let failing = |reason: NotReady| match reason {
            NotReady::DatabaseUnreachable => !database,
            NotReady::BrokerUnreachable => !broker,
            NotReady::BrokerBlocked => blocked,
            NotReady::NotProgressing => stalled >= self.readiness_stall,
        };
        let m = metrics();
        m.stalled_seconds.set(stalled.as_secs_f64());
        for reason in NotReady::ALL {
            let label = crate::telemetry::metrics::ReasonLabel {
                reason: reason.as_str().into(),
            };
            m.not_ready
                .get_or_create(&label)
                .set(i64::from(failing(reason)));
        }
        // A blocked broker is an outage too: the alarm clears on the broker, not by a restart.
        let outage = failing(NotReady::DatabaseUnreachable)
            || failing(NotReady::BrokerUnreachable)
            || failing(NotReady::BrokerBlocked);
        self.outage.store(u8::from(outage), Ordering::Relaxed);
        NotReady::ALL.into_iter().find(|&reason| failing(reason))
    }

    /// False when work has stalled beyond `worker.liveness_stall_seconds` although the database
    /// and the broker answer: the process is stuck, and a restart is what helps. During an
    /// outage the process stays live (a restart cannot bring a dependency back).
    ///
    /// Reads the outage found by the last readiness check (by `/readyz` or the gauge refresher,
    /// every `http.gauge_refresh_seconds`) rather than pinging: answers at once.
    pub fn is_live(&self) -> bool {
        let outage = self.outage.load(Ordering::Relaxed) == 1
            || !self.broker_connected.load(Ordering::Relaxed)
            || self.is_broker_blocked();
        outage || self.progress.stalled_for() < self.liveness_stall
    }
}

async fn metrics_text() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics().encode(),
    )
}

async fn livez(State(health): State<Arc<Health>>) -> (StatusCode, String) {
    if health.is_live() {
        (StatusCode::OK, "ok\n".into())
    } else {
        let stalled = health.progress.stalled_for().as_secs();
        let waiting = health.progress.waiting();
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("stuck: {waiting} deliveries waiting, none finished for {stalled} s\n"),
        )
    }
}

async fn readyz(State(health): State<Arc<Health>>) -> (StatusCode, &'static str) {
    match health.readiness().await {
        None => (StatusCode::OK, "ready\n"),
        Some(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason.answer()),
    }
}

/// Serves until `stop`. Fails only if the address cannot be bound.
pub async fn serve(
    listen: &str,
    health: Arc<Health>,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(health);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(address = %listener.local_addr()?, "serving /metrics, /livez and /readyz");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

/// Refreshes the database gauges and the readiness metrics every `period` until `stop`.
pub async fn refresh_gauges(health: Arc<Health>, period: Duration, stop: CancellationToken) {
    loop {
        if let Ok(g) = health.store.gauges().await {
            let m = metrics();
            m.outbox_backlog.set(g.outbox_backlog);
            m.outbox_oldest_age_seconds.set(g.outbox_oldest_age_seconds);
            m.open_conflicts.set(g.open_conflicts);
            m.overdue_provisionals.set(g.overdue_provisionals);
            if let Some((at, differing)) = g.last_audit {
                m.audit_last_run.set(at);
                m.audit_differing.set(differing);
            }
        }
        health.readiness().await;
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Progress;
    use std::time::Duration;

    #[test]
    fn progress_stalls_only_while_work_waits() {
        let p = Progress::default();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(p.stalled_for(), Duration::ZERO, "nothing waits");
        p.taken();
        p.taken();
        std::thread::sleep(Duration::from_millis(30));
        assert!(p.stalled_for() >= Duration::from_millis(25));
        p.finished(1);
        assert!(p.stalled_for() < Duration::from_millis(25), "one finished");
        assert_eq!(p.waiting(), 1);
        p.finished(5);
        assert_eq!(p.waiting(), 0);
        assert_eq!(p.stalled_for(), Duration::ZERO);
    }
}
