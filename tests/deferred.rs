//! A teacher whose lock another transaction holds (another worker's batch, the sweep, `verify
//! --emit`) does not hold up the other teachers of the batch it is in (ARCHITECTURE decisions 44
//! and 46).
//!
//! Its own binary: the worker runs in-process and its metrics are process-wide, so the count of
//! deferrals read here is this test's alone.

mod common;

use std::time::Duration;

use common::app::TestApp;
use common::registration;

/// The held teacher's message is deferred by the batch it arrives in, carried into the lane's
/// next batch, deferred there again (the lock is still held) and then applied by a transaction
/// that waits for the lock: the other teacher's outcome goes out at once, the held one's as soon
/// as the lock is released, and the message was deferred exactly twice.
#[tokio::test]
async fn a_held_teacher_does_not_hold_up_the_rest_of_its_batch() {
    let port = common::free_port();
    let mut app = TestApp::prepare(|s| {
        s.amqp.concurrency = 1;
        s.http.enabled = true;
        s.http.listen = format!("127.0.0.1:{port}");
    })
    .await;
    let (held, free) = ("1000001", "1000002");
    let blocker = common::hold_teacher(app.store.pool(), held).await;
    // Both wait in the queue before the worker starts: one lane.
    app.publish(&registration(1, "r-held", held)).await;
    app.publish(&registration(2, "r-free", free)).await;
    app.start_worker().await;
    let first = app.next_outcome().await;
    assert_eq!(
        first["trn"], free,
        "the free teacher's outcome, while the other is held"
    );
    assert!(
        app.outcomes_until_quiet(Duration::from_millis(500))
            .await
            .is_empty(),
        "nothing for the held teacher while its lock is held"
    );
    // Operators see the deferrals: once in the batch it arrived in, once in the next batch,
    // which carried it; a worker that waited for the lock after the first would count one.
    assert_eq!(
        deferrals(port).await,
        2.0,
        "the held teacher's message deferred, carried and deferred again"
    );
    blocker.commit().await.unwrap();
    let second = app.next_outcome().await;
    assert_eq!(
        second["trn"], held,
        "the held teacher's outcome once released"
    );
    assert_eq!(
        deferrals(port).await,
        2.0,
        "applied by the transaction that waited, not deferred a third time"
    );
    app.teardown().await;
}

/// The worker's count of deferrals, from its `/metrics`.
async fn deferrals(port: u16) -> f64 {
    let (_, metrics) = common::http_get(port, "/metrics").await.unwrap();
    common::sample(&metrics, "induction_reconciler_messages_deferred_total")
}
