//! Watching an in-process worker as an operator would: its JSON log lines, its metrics and
//! `/readyz`, polled until a condition holds. For test binaries that run the worker in-process
//! (the log subscriber and the metrics are the process's).
//!
//! The log is kept in memory for the test to read. To see it while a test runs (one that
//! hangs, say), set `TEST_LOG_MIRROR` to a file that every line is also appended to, and
//! `TEST_LOG_FILTER` to a wider filter than `induction_reconciler=info` (such as
//! `induction_reconciler=debug,lapin=debug`).

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use std::collections::HashSet;

use super::app::TestApp;
use super::http_get;
use super::rabbit::RabbitNode;

/// The worker's log lines, as an operator's collector would receive them (JSON, one per line).
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        if let Ok(path) = std::env::var("TEST_LOG_MIRROR") {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .unwrap();
            f.write_all(bytes).unwrap();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn install() -> Self {
        let logs = Self::default();
        let writer = logs.clone();
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(
                std::env::var("TEST_LOG_FILTER")
                    .unwrap_or_else(|_| "induction_reconciler=info".to_owned()),
            )
            .with_writer(move || writer.clone())
            .init();
        logs
    }

    /// Forgets what was logged so far.
    pub fn clear(&self) {
        self.0.lock().unwrap().clear();
    }

    /// The log lines whose message contains `text`.
    pub fn lines(&self, text: &str) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().unwrap().clone();
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|line| {
                line["fields"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains(text))
            })
            .collect()
    }
}

/// The value of an unlabelled metric, or of the one series with `labels`, in a scrape.
pub fn metric(scrape: &str, name: &str, labels: &str) -> Option<f64> {
    let series = format!("{name}{labels} ");
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .and_then(|value| value.trim().parse().ok())
}

/// Polls `check` every 100 ms until it holds, for at most `limit`.
pub async fn eventually<F>(what: &str, limit: Duration, mut check: impl FnMut() -> F)
where
    F: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the worker's endpoint says: `/metrics` and `/readyz` (status and body).
pub async fn scrape(port: u16) -> (String, u16, String) {
    let metrics = http_get(port, "/metrics").await.map(|(_, body)| body);
    let ready = http_get(port, "/readyz").await;
    let (status, body) = ready.unwrap_or((0, String::new()));
    (metrics.unwrap_or_default(), status, body)
}

pub fn reconnects(scrape: &str) -> f64 {
    ["consumer", "relay"]
        .iter()
        .map(|c| {
            let labels = format!("{{component=\"{c}\"}}");
            metric(
                scrape,
                "induction_reconciler_broker_reconnects_total",
                &labels,
            )
            .unwrap_or(0.0)
        })
        .sum()
}

/// The process's log, installed as the global subscriber on first use.
pub fn logs() -> &'static Logs {
    static LOGS: OnceLock<Logs> = OnceLock::new();
    LOGS.get_or_init(Logs::install)
}

/// Waits (each step at most `limit`) until the inbox holds `messages` and no outcome is pending
/// in the outbox, then reads outcomes until every outcome the outbox holds has arrived (at most
/// 60 s), adding them to `received`. Returns the outbox's outcome ids and how many outcomes
/// arrived a second time.
pub async fn every_outcome(
    app: &mut TestApp,
    messages: u64,
    limit: Duration,
    received: &mut HashSet<String>,
) -> (HashSet<String>, usize) {
    app.wait_until_within(&format!("select count(*) = {messages} from inbox"), limit)
        .await;
    app.wait_until_within(
        "select count(*) = 0 from outbox where published_at is null",
        limit,
    )
    .await;
    let expected: HashSet<String> =
        sqlx::query_scalar::<_, uuid::Uuid>("select outcome_id from outbox")
            .fetch_all(app.store.pool())
            .await
            .unwrap()
            .into_iter()
            .map(|id| id.to_string())
            .collect();
    let mut duplicates = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !expected.is_subset(received) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} of {} outcomes never arrived",
            expected.difference(received).count(),
            expected.len()
        );
        let outcome = app.next_outcome().await;
        if !received.insert(outcome["outcome_id"].as_str().unwrap().to_owned()) {
            duplicates += 1;
        }
    }
    (expected, duplicates)
}

/// Waits (at most 30 s) until the app's inbox queue on `node` has nothing ready and nothing
/// unacknowledged: every delivery was acknowledged, none is held on a channel.
pub async fn inbox_drained(app: &TestApp, node: &RabbitNode) {
    let inbox = app.settings.topology.inbox_queue.clone();
    eventually(
        "the inbox queue empty, nothing unacknowledged",
        Duration::from_secs(30),
        || {
            let listing = node.query(&[
                "list_queues",
                "name",
                "messages_ready",
                "messages_unacknowledged",
            ]);
            let empty = listing
                .lines()
                .any(|line| line.split_whitespace().collect::<Vec<_>>() == [&*inbox, "0", "0"]);
            async move { empty }
        },
    )
    .await;
}

/// Tears the app down (its workers stopped, its database and topology removed), failing the
/// test if that takes over 60 s rather than leaving it hanging with a worker on the node.
pub async fn teardown_within_a_minute(app: TestApp) {
    use futures_lite::FutureExt;
    app.teardown()
        .or(async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            panic!("teardown took over 60 s")
        })
        .await;
}
