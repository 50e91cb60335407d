//! A channel the broker closes: on a throwaway RabbitMQ node with a 2 s `consumer_timeout`, the
//! worker holds deliveries it cannot apply (the test holds a lock on the inbox, and the worker's
//! statements time out waiting for it), so the broker closes the consumer's channel with 406.
//! The worker must start again on a new channel of the connection it has, at once rather than
//! after `amqp.recovery_timeout_seconds`, and the lane of the closed channel must leave its
//! batch to the redelivery instead of applying it beside the new channel's lanes.
//!
//! Its own binary: the worker runs in-process and its metrics and log are process-wide.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::app::TestApp;
use common::observe::{eventually, every_outcome, inbox_drained, logs, teardown_within_a_minute};
use common::rabbit::RabbitNode;
use common::{claim, registration};
use secrecy::SecretString;

/// Teachers in the stream; each gets a registration and a claim.
const TEACHERS: u64 = 60;

/// How soon after the broker closes the channel the worker must consume on a new one. The
/// recovery timeout is 60 s: a worker that took the closed channel for a lost connection would
/// wait that long before giving the connection up.
const RESTART_WITHIN: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_the_broker_closes_is_replaced_at_once_and_its_lane_leaves_its_batch() {
    induction_reconciler::telemetry::install_crypto_provider();
    let logs = logs();
    logs.clear();
    let node = RabbitNode::start_with(|_| ("consumer_timeout = 2000\n".to_owned(), Vec::new()));
    // RabbitMQ checks a channel's consumer timeout on the channel's tick, once a minute unless
    // told otherwise; read when a channel opens.
    node.ctl(&[
        "eval",
        "application:set_env(rabbit, channel_tick_interval, 500).",
    ]);
    let mut app = TestApp::prepare(|settings| {
        settings.amqp.url = SecretString::from(node.url());
        settings.amqp.concurrency = 1;
        settings.amqp.batch_size = 5;
        settings.amqp.prefetch = 50;
        settings.amqp.recovery_timeout_seconds = 60;
        settings.worker.retry_min_millis = 100;
        settings.worker.retry_max_millis = 400;
    })
    .await;
    // The worker's sessions wait at most 200 ms for a lock: a transient error, retried.
    let alter = format!("alter database {} set lock_timeout = '200ms'", app.db_name);
    sqlx::query(sqlx::AssertSqlSafe(alter))
        .execute(app.store.pool())
        .await
        .unwrap();
    for n in 0..TEACHERS {
        let trn = format!("{}", 3_200_000 + n);
        app.publish(&registration(2 * n, &format!("R-{n}"), &trn))
            .await;
        app.publish(&claim(2 * n + 1, &format!("IP-{n}"), &trn))
            .await;
    }
    // Nothing can be written to the inbox until the lock goes.
    let mut lock = app.store.pool().begin().await.unwrap();
    sqlx::query("lock table inbox in exclusive mode")
        .execute(&mut *lock)
        .await
        .unwrap();
    app.start_worker().await;

    eventually("the worker consumes", Duration::from_secs(30), || async {
        logs.lines("consuming").len() == 1
    })
    .await;
    eventually(
        "the broker closes the consumer's channel",
        Duration::from_secs(30),
        || async { !logs.lines("consuming stopped").is_empty() },
    )
    .await;
    let closed = tokio::time::Instant::now();
    let stopped = logs.lines("consuming stopped");
    eprintln!("{}", stopped[0]);
    let error = stopped[0]["fields"]["error"].as_str().unwrap_or("");
    assert!(
        error.contains("406") || error.contains("PRECONDITION_FAILED"),
        "the log says why: {error:?}"
    );
    eventually(
        "the worker consumes on a new channel",
        RESTART_WITHIN,
        || async { logs.lines("consuming").len() >= 2 },
    )
    .await;
    eprintln!(
        "consuming again {:.1} s after the channel closed",
        closed.elapsed().as_secs_f64()
    );
    // The lock goes only once the closed channel's lane has let its batch go: released while
    // that lane's attempt still waits on it (up to the 200 ms lock timeout), the attempt commits
    // instead, and the lane never gets to its next check of the channel.
    eventually(
        "the closed channel's lane lets its batch go",
        Duration::from_secs(10),
        || async { !logs.lines("leaving them to their redelivery").is_empty() },
    )
    .await;
    lock.rollback().await.unwrap();

    // Everything is applied once the lock goes, and every outcome arrives.
    let mut received = HashSet::new();
    let (expected, _) = every_outcome(
        &mut app,
        2 * TEACHERS,
        Duration::from_secs(60),
        &mut received,
    )
    .await;
    assert_eq!(received, expected);
    assert_eq!(app.parked_waiting().await, 0, "nothing parked");
    inbox_drained(&app, &node).await;

    // The connection was kept: only the channel was replaced.
    assert_eq!(
        logs.lines("giving up this broker connection"),
        Vec::<serde_json::Value>::new(),
        "no connection was given up"
    );
    assert_eq!(
        logs.lines("lost the broker connection"),
        Vec::<serde_json::Value>::new(),
        "the log does not blame the connection for a closed channel"
    );
    // The closed channel's lane left the batch it was retrying to the redelivery, and did not
    // apply it later beside the new channel's lanes (whose acknowledgements would then be the
    // only ones that could go out).
    assert!(
        !logs.lines("leaving them to their redelivery").is_empty(),
        "the closed channel's lane let its batch go"
    );
    assert_eq!(
        logs.lines("could not acknowledge messages"),
        Vec::<serde_json::Value>::new(),
        "nothing applied on a closed channel"
    );
    teardown_within_a_minute(app).await;
}
