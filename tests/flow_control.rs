//! Broker flow control: a real memory alarm on a throwaway RabbitMQ node, raised while the
//! worker is in the middle of a stream and cleared again. The worker must say so (the
//! `broker_blocked` gauge, `/readyz`), keep its connections rather than take the silence for a
//! dead one, and resume by itself, losing and parking nothing.
//!
//! Its own binary: the worker runs in-process and its metrics are process-wide.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::app::TestApp;
use common::observe::{
    eventually, every_outcome, inbox_drained, logs, metric, reconnects, scrape,
    teardown_within_a_minute,
};
use common::rabbit::RabbitNode;
use common::{bytes, claim, free_port, http_get, registration};
use secrecy::SecretString;

/// Teachers in the stream; each gets a registration and a claim.
const TEACHERS: u64 = 1_000;

/// How long the alarm is held: longer than every bound the worker puts on a broker operation
/// (a send 30 s, a confirm 60 s, an acknowledgement 10 s, two heartbeats 20 s), each of which
/// would otherwise take the blocked connection's silence for a dead one and replace it.
const HELD: Duration = Duration::from_secs(65);

/// The scenarios share the process's metrics and log: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_mid_stream_is_reported_and_the_worker_resumes_losing_nothing() {
    alarm_mid_stream(None).await;
}

/// Parking publishes on the consumer's own connection, so the broker blocks that one too once
/// it parks during the alarm: its acknowledgements wait, the prefetch fills, and the lane that
/// parks waits for the unblock, and for the confirm of the park the block caught, instead of
/// sending it again. With a 5 s recovery timeout every bound on the consumer (the watchdog's
/// included) has time to take that silence for a dead connection within the alarm, and must
/// not. One invalid message, at the 600th teacher, parked once the alarm is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_after_a_message_is_parked_blocks_the_consumer_too_and_nothing_is_replaced()
{
    alarm_mid_stream(Some(600)).await;
}

/// A stream of registrations and claims (and, with `invalid_every`, a registration with an
/// invalid TRN after every so many teachers), an alarm raised once some outcomes have arrived,
/// held for [`HELD`] and cleared.
async fn alarm_mid_stream(invalid_every: Option<u64>) {
    let _alone = ONE_AT_A_TIME.lock().await;
    induction_reconciler::telemetry::install_crypto_provider();
    let logs = logs();
    logs.clear();
    let node = RabbitNode::start();
    let port = free_port();
    let mut app = TestApp::prepare(|settings| {
        settings.amqp.url = SecretString::from(node.url());
        // One lane applying one message at a time: slow enough that the alarm lands mid-stream.
        settings.amqp.concurrency = 1;
        settings.amqp.batch_size = 1;
        settings.http.enabled = true;
        settings.http.listen = format!("127.0.0.1:{port}");
        settings.http.gauge_refresh_seconds = 1;
        if invalid_every.is_some() {
            // More deliveries than the prefetch after the one parked, and bounds short enough
            // to replace the blocked connection while the alarm is held, if they judged it dead.
            settings.amqp.prefetch = 200;
            settings.amqp.recovery_timeout_seconds = 5;
        }
    })
    .await;
    let mut invalid: HashSet<Vec<u8>> = HashSet::new();
    for n in 0..TEACHERS {
        let trn = format!("{}", 3_100_000 + n);
        app.publish(&registration(3 * n, &format!("R-{n}"), &trn))
            .await;
        app.publish(&claim(3 * n + 1, &format!("IP-{n}"), &trn))
            .await;
        if invalid_every.is_some_and(|every| n % every == every - 1) {
            let bad = registration(3 * n + 2, &format!("R-bad-{n}"), "12");
            app.publish(&bad).await;
            invalid.insert(bytes(&bad));
        }
    }
    app.start_worker().await;

    // Some outcomes arrive, then the broker raises its memory alarm.
    let mut received: HashSet<String> = HashSet::new();
    while received.len() < 100 {
        let outcome = app.next_outcome().await;
        received.insert(outcome["outcome_id"].as_str().unwrap().to_owned());
    }
    let (before, status, _) = scrape(port).await;
    assert_eq!(status, 200, "ready before the alarm");
    assert_eq!(
        metric(&before, "induction_reconciler_broker_blocked", ""),
        Some(0.0),
        "the gauge is exported, at 0, before any alarm"
    );
    let reconnects_before = reconnects(&before);
    node.ctl(&["set_vm_memory_high_watermark", "0.0000001"]);
    let alarm_raised = tokio::time::Instant::now();

    // The worker reports it: the gauge at 1 and /readyz 503 "broker blocked".
    eventually(
        "the gauge and /readyz report the block",
        Duration::from_secs(20),
        || async {
            let (metrics, status, body) = scrape(port).await;
            metric(&metrics, "induction_reconciler_broker_blocked", "") == Some(1.0)
                && status == 503
                && body.trim() == "broker blocked"
                && metric(
                    &metrics,
                    "induction_reconciler_not_ready",
                    "{reason=\"broker_blocked\"}",
                ) == Some(1.0)
        },
    )
    .await;
    eprintln!(
        "blocked reported {:.1} s after the alarm; connections:\n{}",
        alarm_raised.elapsed().as_secs_f64(),
        node.query(&["list_connections", "name", "state"])
    );
    // Held past every bound: the worker keeps its connections, and the consumer goes on
    // applying messages into the database (training is not held up) until it has a message to
    // park, though no outcome can be published.
    let applied_at_block: i64 = count(&app, "select count(*) from inbox").await;
    tokio::time::sleep(HELD).await;
    let (during, status, body) = scrape(port).await;
    for line in logs.lines("") {
        if line["level"] != "INFO" {
            eprintln!("{line}");
        }
    }
    assert_eq!((status, body.trim()), (503, "broker blocked"));
    assert_eq!(
        reconnects(&during),
        reconnects_before,
        "no connection was replaced while the broker blocked it"
    );
    assert_eq!(
        http_get(port, "/livez").await.map(|(status, _)| status),
        Some(200),
        "live: a restart cannot clear the broker's alarm"
    );
    let applied_during: i64 = count(&app, "select count(*) from inbox").await;
    eprintln!(
        "applied while blocked: {} (from {applied_at_block} to {applied_during})",
        applied_during - applied_at_block
    );
    let quiet = app.outcomes_until_quiet(Duration::from_millis(500)).await;
    for outcome in &quiet {
        received.insert(outcome["outcome_id"].as_str().unwrap().to_owned());
    }

    // The alarm clears; the worker resumes by itself.
    node.ctl(&["set_vm_memory_high_watermark", "0.4"]);
    let cleared = tokio::time::Instant::now();
    let (expected, duplicates) = every_outcome(
        &mut app,
        2 * TEACHERS,
        Duration::from_secs(120),
        &mut received,
    )
    .await;
    eprintln!(
        "all {} outcomes received {:.1} s after the alarm cleared ({duplicates} duplicates)",
        expected.len(),
        cleared.elapsed().as_secs_f64()
    );
    assert_eq!(
        received, expected,
        "every outcome arrived, and none that the outbox does not hold"
    );
    // Every invalid message parked (at least once), and nothing else.
    let mut parked: HashSet<Vec<u8>> = HashSet::new();
    if !invalid.is_empty() {
        eventually(
            "every invalid message is parked",
            Duration::from_secs(60),
            || async { app.parked_waiting().await as usize >= invalid.len() },
        )
        .await;
        let waiting = app.parked_waiting().await as usize;
        parked.extend(
            app.take_parked(waiting)
                .await
                .into_iter()
                .map(|(_, body)| body),
        );
        eprintln!(
            "parked {waiting} copies of {} invalid messages",
            invalid.len()
        );
        // The broker blocked the connection as it read the park's header, and read its body
        // only after the unblock: the lane waited for that confirm instead of sending it again.
        assert_eq!(waiting, invalid.len(), "each parked once");
    }
    assert_eq!(parked, invalid, "parked: exactly the invalid messages");
    assert_eq!(app.parked_waiting().await, 0);
    // Every delivery is acknowledged once the alarm clears: the acknowledgements queued on a
    // blocked connection go out with the unblock, and none is left unacknowledged on the
    // channel (which would hold its messages from every other consumer until it closed).
    inbox_drained(&app, &node).await;

    eventually(
        "the gauge and /readyz recover",
        Duration::from_secs(20),
        || async {
            let (metrics, status, _) = scrape(port).await;
            metric(&metrics, "induction_reconciler_broker_blocked", "") == Some(0.0)
                && status == 200
        },
    )
    .await;
    let (after, _, _) = scrape(port).await;
    assert_eq!(
        reconnects(&after),
        reconnects_before,
        "the worker resumed on the connections it had"
    );

    // Logged once each way per blocked connection, with the broker's reason; nothing else broke.
    let blocked = logs.lines("the broker is blocking this connection");
    let unblocked = logs.lines("the broker unblocked this connection");
    let components = |lines: &[serde_json::Value]| -> Vec<String> {
        let mut c: Vec<String> = lines
            .iter()
            .map(|l| l["fields"]["component"].as_str().unwrap_or("").to_owned())
            .collect();
        c.sort();
        c
    };
    // The relay always publishes; the consumer's connection publishes only when it parks.
    let expected_components: Vec<String> = if invalid.is_empty() {
        vec!["relay".into()]
    } else {
        vec!["consumer".into(), "relay".into()]
    };
    assert_eq!(components(&blocked), expected_components, "{blocked:?}");
    assert_eq!(components(&unblocked), expected_components, "{unblocked:?}");
    for line in &blocked {
        assert_eq!(line["level"], "WARN");
        let reason = line["fields"]["reason"].as_str().unwrap_or("");
        assert!(reason.contains("memory"), "the broker's reason: {reason:?}");
    }
    for line in &unblocked {
        assert!(
            line["fields"]["blocked_s"].as_f64().unwrap() > 1.0,
            "{line}"
        );
    }
    // Nor is an acknowledgement held back by the block reported as lost: it is written at the
    // unblock (the queue ends with nothing unacknowledged, above).
    for quiet in [
        "giving up this broker connection",
        "outbox relay interrupted",
        "consuming stopped",
        "could not acknowledge messages",
    ] {
        assert_eq!(
            logs.lines(quiet),
            Vec::<serde_json::Value>::new(),
            "{quiet}"
        );
    }
    // Leave no worker on the node, whatever happened above.
    teardown_within_a_minute(app).await;
}

async fn count(app: &TestApp, query: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(query.to_owned()))
        .fetch_one(app.store.pool())
        .await
        .unwrap()
}
