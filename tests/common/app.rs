//! `spawn_app()`: a worker running in-process against the real PostgreSQL and RabbitMQ, with its
//! own database and its own exchange and queue names, and a queue that captures its outcomes.

use std::future::Future;
use std::time::Duration;

use futures_lite::StreamExt;
use induction_reconciler::broker::{
    Broker, Publisher, declare_topology, json_properties, subscribe,
};
use induction_reconciler::config::Settings;
use induction_reconciler::store::Store;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Consumer};
use secrecy::SecretString;
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// How long a test waits for something that should happen.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A running worker (or several) and the test's view of the broker and database.
pub struct TestApp {
    pub settings: Settings,
    pub store: Store,
    pub db_name: String,
    broker: Broker,
    publisher: Publisher,
    channel: Channel,
    outcomes: Consumer,
    outcome_queue: String,
    workers: Vec<(oneshot::Sender<()>, JoinHandle<anyhow::Result<()>>)>,
    /// The database and topology, removed by `teardown`, or when the test panics (after its
    /// workers are aborted: see `Drop`).
    leftovers: super::Leftovers,
}

/// Settings for a test: its own database and names, quick retries and sweeps.
pub fn test_settings(db_name: &str, prefix: &str) -> Settings {
    let mut settings = Settings::load(None).expect("default settings load");
    settings.database.url = SecretString::from(super::database_url(db_name));
    settings.amqp.url = SecretString::from(amqp_url());
    settings.topology = super::prefixed_topology(prefix);
    settings.worker.retry_min_millis = 10;
    settings.worker.retry_max_millis = 200;
    settings.worker.max_attempts = 3;
    settings.worker.shutdown_timeout_seconds = 10;
    settings.relay.poll_interval_millis = 200;
    settings.sweep.interval_seconds = 3600;
    settings.http.enabled = false;
    settings
}

impl TestApp {
    /// A fresh database and topology, migrated and declared, with one worker running.
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}).await
    }

    /// As `spawn`, with the worker's settings adjusted first.
    pub async fn spawn_with(adjust: impl FnOnce(&mut Settings)) -> Self {
        let mut app = Self::prepare(adjust).await;
        app.start_worker().await;
        app
    }

    /// A fresh database and topology, but no worker yet.
    pub async fn prepare(adjust: impl FnOnce(&mut Settings)) -> Self {
        induction_reconciler::telemetry::install_crypto_provider();
        let id = Uuid::new_v4().simple().to_string();
        let db_name = format!("it_{id}");
        let prefix = format!("it-{}", &id[..12]);
        super::create_database(&db_name).await;

        let mut settings = test_settings(&db_name, &prefix);
        adjust(&mut settings);
        // The capture queue is exclusive: the broker deletes it with the test's connection.
        let t = &settings.topology;
        let leftovers = super::Leftovers::database(&db_name).with_topology(
            &[&t.inbox_queue, &t.parking_queue, &t.unrouted_queue],
            &[&t.input_exchange, &t.outcome_exchange, &t.unrouted_exchange],
        );
        let store = Store::connect(
            &settings.database.url,
            induction_reconciler::app::connect::store_limits(&settings, 5),
        )
        .await
        .expect("connect");
        store.migrate().await.expect("migrate");

        let broker = Broker::connect(&settings.amqp.url, "test")
            .await
            .expect("connect to RabbitMQ");
        let channel = broker.channel().await.unwrap();
        declare_topology(&channel, &settings.topology)
            .await
            .expect("declare topology");
        let outcome_queue = format!("{prefix}.capture");
        let outcomes = subscribe(
            &channel,
            &outcome_queue,
            &settings.topology.outcome_exchange,
            "outcome.#",
        )
        .await
        .unwrap();
        let publisher = broker.publisher().await.unwrap();
        Self {
            settings,
            store,
            db_name,
            broker,
            publisher,
            channel,
            outcomes,
            outcome_queue,
            workers: Vec::new(),
            leftovers,
        }
    }

    /// Starts one more worker on the same database and queues.
    pub async fn start_worker(&mut self) {
        self.start_worker_with(|_| {}).await;
    }

    /// Starts one more worker with adjusted settings.
    pub async fn start_worker_with(&mut self, adjust: impl FnOnce(&mut Settings)) {
        let mut settings = self.settings.clone();
        adjust(&mut settings);
        let (tx, rx) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = rx.await;
        };
        let handle = tokio::spawn(induction_reconciler::app::worker::run(settings, shutdown));
        self.workers.push((tx, handle));
    }

    /// Stops every worker gracefully and returns their results.
    pub async fn stop_workers(&mut self) {
        for (tx, handle) in self.workers.drain(..) {
            let _ = tx.send(());
            tokio::time::timeout(PATIENCE, handle)
                .await
                .expect("the worker stops within the shutdown bound")
                .expect("the worker task did not panic")
                .expect("the worker stops without error");
        }
    }

    /// Publishes an input message with the routing key of its type.
    pub async fn publish(&self, message: &Value) {
        let key = match message["message_type"].as_str() {
            Some("ab_claim") => "ab.claim",
            _ => "school.registration",
        };
        self.publish_raw(
            key,
            &serde_json::to_vec(message).unwrap(),
            json_properties(
                message["message_id"].as_str().unwrap_or(""),
                FieldTable::default(),
            ),
        )
        .await;
    }

    /// Publishes raw bytes to the input exchange.
    pub async fn publish_raw(&self, routing_key: &str, body: &[u8], properties: BasicProperties) {
        self.publisher
            .publish(
                &self.settings.topology.input_exchange,
                routing_key,
                body,
                properties,
            )
            .await
            .expect("the broker confirms the input");
    }

    /// The next outcome the worker published.
    pub async fn next_outcome(&mut self) -> Value {
        self.next_outcome_with_headers().await.0
    }

    /// The next outcome the worker published, with its AMQP headers.
    pub async fn next_outcome_with_headers(&mut self) -> (Value, FieldTable) {
        let delivery = tokio::time::timeout(PATIENCE, self.outcomes.next())
            .await
            .expect("an outcome arrives in time")
            .expect("the capture consumer is open")
            .expect("a delivery");
        assert_eq!(
            delivery
                .properties
                .content_type()
                .as_ref()
                .map(|c| c.as_str()),
            Some("application/json")
        );
        assert_eq!(delivery.properties.delivery_mode(), &Some(2));
        let outcome: Value = serde_json::from_slice(&delivery.data).unwrap();
        assert_eq!(
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_owned()),
            outcome["outcome_id"].as_str().map(str::to_owned)
        );
        assert_eq!(
            delivery.routing_key.as_str(),
            format!("outcome.{}", outcome["status"].as_str().unwrap())
        );
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        (outcome, headers)
    }

    /// Outcomes until none arrives for `quiet`.
    pub async fn outcomes_until_quiet(&mut self, quiet: Duration) -> Vec<Value> {
        let mut all = Vec::new();
        while let Ok(Some(Ok(delivery))) = tokio::time::timeout(quiet, self.outcomes.next()).await {
            all.push(serde_json::from_slice(&delivery.data).unwrap());
        }
        all
    }

    /// Waits until the inbox holds `n` accepted messages.
    pub async fn wait_for_inbox(&self, n: i64) {
        self.wait_until(&format!("select count(*) >= {n} from inbox"))
            .await;
    }

    /// Waits until a boolean query holds.
    pub async fn wait_until(&self, query: &str) {
        self.wait_until_within(query, PATIENCE).await;
    }

    /// Waits until a boolean query holds, for at most `limit`.
    pub async fn wait_until_within(&self, query: &str, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let done: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(query.to_owned()))
                .fetch_one(self.store.pool())
                .await
                .unwrap();
            if done {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for: {query}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Takes up to `n` parked messages (waiting for the first), with their headers.
    pub async fn take_parked(&self, n: usize) -> Vec<(FieldTable, Vec<u8>)> {
        take(&self.channel, &self.settings.topology.parking_queue, n).await
    }

    /// Takes up to `n` parked messages with their properties (`user_id`, headers).
    pub async fn take_parked_properties(&self, n: usize) -> Vec<(BasicProperties, Vec<u8>)> {
        let mut taken = Vec::new();
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let queue = self.settings.topology.parking_queue.as_str();
        while taken.len() < n && tokio::time::Instant::now() < deadline {
            let got = self
                .channel
                .basic_get(queue.into(), BasicGetOptions::default())
                .await
                .unwrap();
            match got {
                Some(message) => {
                    let delivery = message.delivery;
                    delivery
                        .acker
                        .ack(BasicAckOptions::default())
                        .await
                        .unwrap();
                    taken.push((delivery.properties, delivery.data));
                }
                None => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        taken
    }

    /// Publishes raw bytes with no AMQP `user_id` (the test's `Publisher` always sets one), on a
    /// channel in confirm mode, and waits for the confirm.
    pub async fn publish_without_user_id(&self, routing_key: &str, body: &[u8]) {
        let channel = self.broker.channel().await.unwrap();
        channel
            .confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await
            .unwrap();
        let confirm = channel
            .basic_publish(
                self.settings.topology.input_exchange.as_str().into(),
                routing_key.into(),
                lapin::options::BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body,
                json_properties("", FieldTable::default()),
            )
            .await
            .unwrap();
        assert!(confirm.await.unwrap().is_ack(), "the broker confirms it");
        let _ = channel.close(200, "done".into()).await;
    }

    /// How many messages wait in the parking queue.
    pub async fn parked_waiting(&self) -> u32 {
        self.channel
            .queue_declare(
                self.settings.topology.parking_queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .message_count()
    }

    /// Takes up to `n` messages from the unrouted queue.
    pub async fn take_unrouted(&self, n: usize) -> Vec<(FieldTable, Vec<u8>)> {
        take(&self.channel, &self.settings.topology.unrouted_queue, n).await
    }

    /// Unbinds the capture queue, so that the outcome exchange routes to no queue.
    pub async fn unbind_capture(&self) {
        self.channel
            .queue_unbind(
                self.outcome_queue.as_str().into(),
                self.settings.topology.outcome_exchange.as_str().into(),
                "outcome.#".into(),
                FieldTable::default(),
            )
            .await
            .expect("unbind the capture queue");
    }

    /// Stops the workers and removes the test's queues, exchanges and database.
    pub async fn teardown(mut self) {
        self.stop_workers().await;
        self.broker.close().await;
        self.store.pool().close().await;
        std::mem::replace(&mut self.leftovers, super::Leftovers::none())
            .remove()
            .await;
    }
}

impl Drop for TestApp {
    /// A test that panics (or ends without `teardown`) aborts its workers before `leftovers`
    /// removes their queues and database. Only dropping their stop senders is not enough: a
    /// worker whose consumer the deletion cancels may declare its topology again before it sees
    /// the stop (seen in the test that panics on purpose, in `tests/worker.rs`).
    fn drop(&mut self) {
        for (_, worker) in self.workers.drain(..) {
            worker.abort();
        }
    }
}

async fn take(channel: &Channel, queue: &str, n: usize) -> Vec<(FieldTable, Vec<u8>)> {
    let mut taken = Vec::new();
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while taken.len() < n && tokio::time::Instant::now() < deadline {
        match channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            Some(message) => {
                let headers = message
                    .delivery
                    .properties
                    .headers()
                    .clone()
                    .unwrap_or_default();
                message
                    .delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .unwrap();
                taken.push((headers, message.delivery.data));
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    taken
}

/// A header's text value.
pub fn header(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Runs a future with the test's patience.
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}
