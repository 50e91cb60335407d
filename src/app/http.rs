//! The operators' HTTP endpoint: `/metrics` (Prometheus text format), `/livez` and `/readyz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio_util::sync::CancellationToken;

use crate::store::Store;
use crate::telemetry::metrics::metrics;

/// What readiness depends on.
pub struct Health {
    store: Store,
    broker_connected: AtomicBool,
}

impl Health {
    /// Not ready until the consumer reports a broker connection.
    pub fn new(store: Store) -> Arc<Self> {
        Arc::new(Self {
            store,
            broker_connected: AtomicBool::new(false),
        })
    }

    /// The store readiness pings.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Records whether the consumer has a working broker connection.
    pub fn set_broker_connected(&self, connected: bool) {
        self.broker_connected.store(connected, Ordering::Relaxed);
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

async fn livez() -> &'static str {
    "ok\n"
}

async fn readyz(State(health): State<Arc<Health>>) -> (StatusCode, &'static str) {
    let broker = health.broker_connected.load(Ordering::Relaxed);
    let database = health.store.ping().await;
    match (database, broker) {
        (true, true) => (StatusCode::OK, "ready\n"),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "database unreachable\n"),
        (true, false) => (StatusCode::SERVICE_UNAVAILABLE, "broker unreachable\n"),
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

/// Refreshes the database gauges every `period` until `stop`.
pub async fn refresh_gauges(store: Store, period: std::time::Duration, stop: CancellationToken) {
    loop {
        if let Ok(g) = store.gauges().await {
            let m = metrics();
            m.outbox_backlog.set(g.outbox_backlog);
            m.outbox_oldest_age_seconds.set(g.outbox_oldest_age_seconds);
            m.open_conflicts.set(g.open_conflicts);
            m.overdue_provisionals.set(g.overdue_provisionals);
        }
        tokio::select! {
            () = tokio::time::sleep(period) => {}
            () = stop.cancelled() => return,
        }
    }
}
