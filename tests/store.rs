//! The database layer on its own: each test has a fresh database and no broker, and calls the
//! store as the worker does (`apply_batch`, `claim_outbox`, `sweep_overdue`), so that the inbox
//! checks, the lock order and the outbox claim are tested where they live.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{Leftovers, NOW, bytes, claim, registration, set};
use induction_reconciler::domain::{Admission, Ledger, Status, Trn};
use induction_reconciler::messages::{Input, decode};
use induction_reconciler::store::{
    BatchItem, Contention, Handled, Limits, Publishing, Store, Written,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::Row;
use tokio::sync::Barrier;

/// A fresh, migrated database, dropped by `finish`, or when the test panics.
struct Db {
    name: String,
    store: Store,
    leftovers: Leftovers,
}

impl Db {
    async fn new() -> Self {
        induction_reconciler::telemetry::install_crypto_provider();
        let name = format!("st_{}", uuid::Uuid::new_v4().simple());
        common::create_database(&name).await;
        let leftovers = Leftovers::database(&name);
        let url = secrecy::SecretString::from(common::database_url(&name));
        let store = Store::connect(&url, Limits::new(8, Duration::from_secs(10)))
            .await
            .expect("connect to the test database");
        store.migrate().await.expect("migrate");
        Self {
            name,
            store,
            leftovers,
        }
    }

    /// A second store on the same database with one connection, so that `flush_statistics`
    /// flushes the counts of every statement it ran.
    async fn one_connection(&self) -> Store {
        let url = secrecy::SecretString::from(common::database_url(&self.name));
        Store::connect(&url, Limits::new(1, Duration::from_secs(10)))
            .await
            .expect("connect to the test database")
    }

    async fn finish(self) {
        self.store.pool().close().await;
        self.leftovers.remove().await;
    }

    /// Each teacher's outbox versions in order, and the version and status `teachers` holds.
    async fn teachers(&self) -> BTreeMap<String, (Vec<i64>, i64, String)> {
        let mut out: BTreeMap<String, (Vec<i64>, i64, String)> = BTreeMap::new();
        for row in sqlx::query("select trn, version, status from teachers")
            .fetch_all(self.store.pool())
            .await
            .unwrap()
        {
            let entry = out.entry(row.get("trn")).or_default();
            entry.1 = row.get("version");
            entry.2 = row.get("status");
        }
        for row in sqlx::query("select trn, version from outbox order by trn, version")
            .fetch_all(self.store.pool())
            .await
            .unwrap()
        {
            let trn: String = row.get("trn");
            out.entry(trn).or_default().0.push(row.get("version"));
        }
        out
    }
}

fn input(message: &Value) -> (Input, [u8; 32]) {
    let body = bytes(message);
    let decoded = decode(&body, NOW).expect("a valid test message");
    (decoded, Sha256::digest(&body).into())
}

/// The decoded messages as the items of a batch.
fn items(inputs: &[(Input, [u8; 32])]) -> Vec<BatchItem<'_>> {
    inputs
        .iter()
        .map(|(input, digest)| BatchItem {
            input,
            digest: *digest,
            traceparent: None,
        })
        .collect()
}

async fn apply(store: &Store, messages: &[Value]) -> Vec<Handled> {
    apply_at(store, messages, NOW).await
}

/// `apply`, with the worker's clock at `now`.
async fn apply_at(store: &Store, messages: &[Value], now: time::OffsetDateTime) -> Vec<Handled> {
    let inputs: Vec<(Input, [u8; 32])> = messages.iter().map(input).collect();
    let items = items(&inputs);
    store
        .apply_batch(&items, now)
        .await
        .expect("the batch commits")
}

/// `apply`, for a lane that publishes its own outcomes.
async fn apply_publishing(
    store: &Store,
    messages: &[Value],
    confirmed: &[i64],
    lease: bool,
) -> Written {
    let inputs: Vec<(Input, [u8; 32])> = messages.iter().map(input).collect();
    let items = items(&inputs);
    let publishing = Publishing {
        confirmed,
        lease_until: lease.then(|| NOW + Duration::from_secs(30)),
    };
    let (_, written) = store
        .apply_batch_publishing(&items, NOW, publishing, Contention::Wait)
        .await
        .expect("the batch commits");
    written
}

/// What the in-memory `Ledger` (the same as `simulate`) gives as each teacher's final status.
fn expected_statuses(messages: &[Value]) -> BTreeMap<String, String> {
    let mut ledger = Ledger::new();
    for message in messages {
        let (input, _) = input(message);
        ledger.apply(input.snapshot, input.cause, NOW);
    }
    let teachers: Vec<Trn> = ledger.teachers().cloned().collect();
    teachers
        .iter()
        .filter_map(|trn| {
            let outcome = ledger.last_outcome(trn)?;
            Some((
                trn.as_str().to_owned(),
                outcome.status().as_str().to_owned(),
            ))
        })
        .collect()
}

/// A store test that fails still drops its database, so that failed runs leave nothing on the
/// shared server (`common::Leftovers`).
#[tokio::test]
async fn a_test_that_panics_still_drops_its_database() {
    let (named, name) = tokio::sync::oneshot::channel();
    let failing = tokio::spawn(async move {
        let db = Db::new().await;
        apply(&db.store, &[registration(1, "R-1", "1000001")]).await;
        assert!(common::database_exists(&db.name).await);
        named.send(db.name.clone()).unwrap();
        panic!("this test fails on purpose, before Db::finish");
    });
    let failed = failing.await.expect_err("the task panics");
    assert!(failed.is_panic());
    let name = name.await.expect("the database was made before the panic");
    assert!(
        !common::database_exists(&name).await,
        "the failed test left its database {name} behind"
    );
}

/// The TCP sockets of this process connected to `port`, by local address, and whether each has
/// `TCP_NODELAY` (Linux: found through `/proc/self/fd`).
#[cfg(target_os = "linux")]
fn nodelay_of_sockets_to(port: u16) -> Vec<(std::net::SocketAddr, bool)> {
    use std::os::fd::BorrowedFd;
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let is_socket = std::fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"));
        if !is_socket {
            continue;
        }
        // SAFETY: borrowed for three system calls; had the descriptor been closed or reused by
        // another test's thread since, they fail or read another socket, which only this
        // test's count can notice, and only upwards.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&fd);
        let to_port = socket
            .peer_addr()
            .ok()
            .and_then(|address| address.as_socket())
            .is_some_and(|address| address.port() == port);
        let local = socket
            .local_addr()
            .ok()
            .and_then(|address| address.as_socket());
        if to_port && let (Some(local), Ok(nodelay)) = (local, socket.tcp_nodelay()) {
            found.push((local, nodelay));
        }
    }
    found
}

/// A batch's write statement is larger than one TCP segment: with Nagle's algorithm on, its
/// last segment waited for the server's delayed acknowledgement of the first, 40 ms on Linux,
/// and so did the connection's own handshake. sqlx 0.9.0 left `TCP_NODELAY` off (the worker
/// set it itself until 0.9.1 set it again; ARCHITECTURE decision 23).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn every_database_connection_has_tcp_nodelay() {
    let db = Db::new().await;
    assert_eq!(
        db.store.warm(8).await,
        8,
        "the pool opens its eight connections"
    );
    let url: sqlx::postgres::PgConnectOptions = common::database_url(&db.name).parse().unwrap();
    let port = url.get_port();
    let sockets = nodelay_of_sockets_to(port);
    assert!(sockets.len() >= 8, "the pool's connections: {sockets:?}");
    // Another test's connection may be read between its connect and its option being set:
    // a socket counts as off only if it is still off a moment later.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let later = nodelay_of_sockets_to(port);
    let off: Vec<_> = sockets
        .iter()
        .filter(|&&(local, nodelay)| !nodelay && later.contains(&(local, false)))
        .collect();
    assert!(
        off.is_empty(),
        "database connections with Nagle's algorithm on: {off:?} of {sockets:?}"
    );
    db.finish().await;
}

#[tokio::test]
async fn a_batch_records_its_effects_and_the_inbox_tells_duplicates_from_reused_ids() {
    let db = Db::new().await;
    let first = registration(1, "R-1", "1000001");
    let handled = apply(&db.store, std::slice::from_ref(&first)).await;
    assert_eq!(
        handled,
        vec![Handled::Applied {
            admission: Admission::Latest {
                affected: vec![Trn::parse("1000001").unwrap()]
            },
            emitted: vec![Status::Provisional],
        }]
    );
    // The same message again, and another body under the same message id, in one batch with a
    // new message: only the new one is applied.
    let reused = set(first.clone(), "payload.school_urn", json!(654321));
    let claimed = claim(2, "IP-1", "1000001");
    let handled = apply(&db.store, &[first, reused, claimed]).await;
    assert_eq!(handled[0], Handled::Duplicate);
    assert_eq!(handled[1], Handled::Reused);
    assert!(matches!(
        &handled[2],
        Handled::Applied { emitted, .. } if emitted == &vec![Status::Confirmed]
    ));
    let teachers = db.teachers().await;
    assert_eq!(
        teachers["1000001"],
        (vec![1, 2], 2, "confirmed".to_owned()),
        "versions 1 and 2 in the outbox, the teacher at version 2"
    );
    let inbox: i64 = sqlx::query_scalar("select count(*) from inbox")
        .fetch_one(db.store.pool())
        .await
        .unwrap();
    assert_eq!(
        inbox, 2,
        "the duplicate and the reused id are not in the inbox"
    );
    db.finish().await;
}

#[tokio::test]
async fn a_stale_snapshot_is_recorded_and_emits_nothing() {
    let db = Db::new().await;
    let newer = set(
        registration(1, "R-1", "1000001"),
        "occurred_at",
        json!("2025-09-02T09:00:00Z"),
    );
    let older = set(
        registration(2, "R-1", "1000001"),
        "payload.school_urn",
        json!(111111),
    );
    apply(&db.store, &[newer]).await;
    let handled = apply(&db.store, &[older]).await;
    assert_eq!(
        handled,
        vec![Handled::Applied {
            admission: Admission::Stale,
            emitted: vec![]
        }]
    );
    let admission: String =
        sqlx::query_scalar("select admission from inbox where message_id = $1::uuid")
            .bind(common::mid(2))
            .fetch_one(db.store.pool())
            .await
            .unwrap();
    assert_eq!(admission, "stale");
    assert_eq!(db.teachers().await["1000001"].0, vec![1]);
    db.finish().await;
}

/// Two workers can each hold copies of the same messages (a publisher's retry) and apply them
/// in batches of their own, in different orders. Both commit, each message is applied once and
/// is a duplicate in the other batch: inserted in delivery order, each batch's inbox insert
/// waited on the other's and PostgreSQL failed one of them as a deadlock. A trigger that slows
/// every inbox insert makes both batches hold their first id before either reaches its second.
#[tokio::test]
async fn two_workers_applying_the_same_messages_in_opposite_orders_do_not_deadlock() {
    let db = Db::new().await;
    sqlx::raw_sql(
        "create function slow_inbox() returns trigger language plpgsql as
           $$ begin perform pg_sleep(0.3); return new; end $$;
         create trigger slow_inbox before insert on inbox for each row execute function slow_inbox();",
    )
    .execute(db.store.pool())
    .await
    .unwrap();
    let (one, two) = (
        registration(1, "R-1", "1000001"),
        registration(2, "R-2", "1000002"),
    );
    let barrier = Arc::new(Barrier::new(2));
    let run = |batch: Vec<Value>| {
        let (store, barrier) = (db.store.clone(), barrier.clone());
        tokio::spawn(async move {
            let inputs: Vec<(Input, [u8; 32])> = batch.iter().map(input).collect();
            barrier.wait().await;
            store.apply_batch(&items(&inputs), NOW).await
        })
    };
    let (first, second) = (
        run(vec![one.clone(), two.clone()]),
        run(vec![two.clone(), one.clone()]),
    );
    let first = first.await.unwrap().expect("the first batch commits");
    let second = second.await.unwrap().expect("the second batch commits");
    let applied = first
        .iter()
        .chain(&second)
        .filter(|h| matches!(h, Handled::Applied { .. }))
        .count();
    let duplicates = first
        .iter()
        .chain(&second)
        .filter(|h| matches!(h, Handled::Duplicate))
        .count();
    assert_eq!((applied, duplicates), (2, 2), "{first:?} {second:?}");
    assert_eq!(db.teachers().await.len(), 2);
    db.finish().await;
}

/// Two appliers whose batches touch the same two teachers in opposite orders (and move a record
/// between them) are started together while a third transaction holds the lower teacher's lock.
/// Both queue behind it; once it is released both commit at the first attempt (no deadlock), and
/// the result is what the ledger gives whichever went first.
#[tokio::test]
async fn two_appliers_on_the_same_teachers_take_locks_in_one_order() {
    let db = Db::new().await;
    let (low, high) = ("1000001", "1000002");
    let a = vec![
        registration(1, "R-A", high),
        claim(2, "IP-A", low),
        set(
            registration(3, "R-M", low),
            "occurred_at",
            json!("2025-09-01T10:00:00Z"),
        ),
    ];
    let b = vec![
        claim(4, "IP-B", high),
        registration(5, "R-B", low),
        set(
            registration(6, "R-M", high),
            "occurred_at",
            json!("2025-09-01T11:00:00Z"),
        ),
    ];
    let blocker = common::hold_teacher(db.store.pool(), low).await;
    let barrier = Arc::new(Barrier::new(2));
    let run = |batch: Vec<Value>| {
        let (store, barrier) = (db.store.clone(), barrier.clone());
        tokio::spawn(async move {
            barrier.wait().await;
            apply(&store, &batch).await
        })
    };
    let (first, second) = (run(a.clone()), run(b.clone()));
    wait_for_lock_waiters(&db.store, 2).await;
    blocker.commit().await.unwrap();
    let (first, second) = (first.await.unwrap(), second.await.unwrap());
    assert!(
        first
            .iter()
            .chain(&second)
            .all(|h| matches!(h, Handled::Applied { .. }))
    );

    let all: Vec<Value> = a.into_iter().chain(b).collect();
    let expected = expected_statuses(&all);
    let teachers = db.teachers().await;
    for (trn, status) in &expected {
        let (versions, version, stored) = &teachers[trn];
        let gap_free: Vec<i64> = (1..=*version).collect();
        assert_eq!(
            versions, &gap_free,
            "teacher {trn}: versions gap-free and in order"
        );
        assert_eq!(stored, status, "teacher {trn}: the ledger's status");
    }
    let owner: String =
        sqlx::query_scalar("select trn from registrations where registration_id = 'R-M'")
            .fetch_one(db.store.pool())
            .await
            .unwrap();
    assert_eq!(owner, high, "the later snapshot of the moved record wins");
    db.finish().await;
}

/// Waits (polling the server, at most 30 s) until `n` transactions wait for an advisory lock.
async fn wait_for_lock_waiters(store: &Store, n: i64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "select count(*) from pg_locks where locktype = 'advisory' and not granted",
        )
        .fetch_one(store.pool())
        .await
        .unwrap();
        if waiting >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{waiting} of {n} appliers waiting for the teacher lock after 30 s"
        );
        tokio::task::yield_now().await;
    }
}

/// Two relays claiming at once get disjoint teachers; a relay that claims a teacher's lowest
/// unpublished version claims its later ones with it, in order, and the other relay gets none of
/// them; a version the broker did not confirm goes back to pending with every later one.
#[tokio::test]
async fn two_relays_claim_disjoint_teachers_and_versions_go_out_in_order() {
    let db = Db::new().await;
    let messages: Vec<Value> = (0..6u64)
        .map(|n| registration(n + 1, &format!("R-{n}"), &format!("100000{n}")))
        .chain([claim(10, "IP-0", "1000000")])
        .collect();
    apply(&db.store, &messages).await;
    let first = db.store.claim_outbox(3, NOW).await.unwrap();
    let second = db.store.claim_outbox(10, NOW).await.unwrap();
    let claimed = |batch: &induction_reconciler::store::OutboxBatch| {
        batch
            .rows
            .iter()
            .map(|r| {
                let body = serde_json::from_slice::<Value>(&r.body).unwrap();
                (
                    body["trn"].as_str().unwrap().to_owned(),
                    body["version"].as_i64().unwrap(),
                )
            })
            .collect::<Vec<(String, i64)>>()
    };
    let teacher = |n: u64, version: i64| (format!("100000{n}"), version);
    assert_eq!(
        claimed(&first),
        vec![teacher(0, 1), teacher(0, 2), teacher(1, 1), teacher(2, 1)],
        "three teachers, the first with both its versions, in order"
    );
    assert_eq!(
        claimed(&second),
        vec![teacher(3, 1), teacher(4, 1), teacher(5, 1)],
        "the other three teachers"
    );
    let ids = |batch: &induction_reconciler::store::OutboxBatch| {
        batch.rows.iter().map(|r| r.id).collect::<Vec<i64>>()
    };
    // The broker confirmed all of the second relay's rows, and of the first's all but teacher
    // 1000000's first version.
    let (a, b) = (ids(&first), ids(&second));
    assert_eq!(first.complete(&a[1..]).await.unwrap(), 2);
    assert_eq!(second.complete(&b).await.unwrap(), 3);
    let pending: Vec<(String, i64)> = sqlx::query_as(
        "select trn, version from outbox where published_at is null order by trn, version",
    )
    .fetch_all(db.store.pool())
    .await
    .unwrap();
    assert_eq!(pending, vec![teacher(0, 1), teacher(0, 2)]);
    let third = db.store.claim_outbox(10, NOW).await.unwrap();
    assert_eq!(claimed(&third), vec![teacher(0, 1), teacher(0, 2)]);
    let c = ids(&third);
    assert_eq!(third.complete(&c).await.unwrap(), 2);
    let fourth = db.store.claim_outbox(10, NOW).await.unwrap();
    assert!(fourth.is_empty(), "everything published");
    fourth.complete(&[]).await.unwrap();
    db.finish().await;
}

/// The relay's claim says when an outcome waits behind an earlier version another lane holds
/// leased (the relay then looks again soon, since that lane's mark may not wake it), and only
/// then.
#[tokio::test]
async fn a_claim_says_when_an_outcome_waits_behind_another_lanes_lease() {
    let db = Db::new().await;
    let first = apply_publishing(&db.store, &[registration(1, "R-0", "1000000")], &[], true).await;
    assert_eq!(first.leased.len(), 1);
    let batch = db.store.claim_outbox(10, NOW).await.unwrap();
    assert!(
        batch.is_empty() && !batch.waiting_on_lease,
        "nothing waits behind the lease"
    );
    batch.complete(&[]).await.unwrap();

    // Another lane's write for the same teacher: the first version is not among its confirmed.
    let second = apply_publishing(&db.store, &[claim(2, "IP-0", "1000000")], &[], true).await;
    assert!(second.leased.is_empty(), "it waits for the first version");
    let batch = db.store.claim_outbox(10, NOW).await.unwrap();
    assert!(batch.is_empty(), "the first version is still the lane's");
    assert!(batch.waiting_on_lease, "and the second waits behind it");
    batch.complete(&[]).await.unwrap();

    // The first lane marks its version: the second goes, and nothing waits any more.
    let ids: Vec<i64> = first.leased.iter().map(|l| l.row.id).collect();
    assert_eq!(db.store.mark_published(&ids, NOW).await.unwrap(), 1);
    let batch = db.store.claim_outbox(10, NOW).await.unwrap();
    assert_eq!(batch.len(), 1);
    assert!(!batch.waiting_on_lease);
    let relayed: Vec<i64> = batch.rows.iter().map(|r| r.id).collect();
    assert_eq!(batch.complete(&relayed).await.unwrap(), 1);
    db.finish().await;
}

/// A lane's outcomes: leased to it by its write, left alone by the relay until the lane marks
/// them (with its next write), hands them back, or lets the lease run out; and never leased
/// while an earlier version of the teacher waits for the relay, so that versions stay in order.
#[tokio::test]
async fn a_lane_leases_its_outcomes_and_the_relay_takes_only_what_it_hands_back_or_lets_expire() {
    let db = Db::new().await;
    let teacher = |n: u64| format!("100000{n}");
    let versions = |written: &Written| {
        written
            .leased
            .iter()
            .map(|l| {
                let body = serde_json::from_slice::<Value>(&l.row.body).unwrap();
                (l.trn.clone(), body["version"].as_i64().unwrap())
            })
            .collect::<Vec<(String, i64)>>()
    };
    let claimed = |batch: &induction_reconciler::store::OutboxBatch| {
        batch
            .rows
            .iter()
            .map(|r| serde_json::from_slice::<Value>(&r.body).unwrap()["trn"].clone())
            .map(|t| t.as_str().unwrap().to_owned())
            .collect::<Vec<String>>()
    };

    // Teachers 0 and 1, leased to the lane: the relay leaves them.
    let first = apply_publishing(
        &db.store,
        &[
            registration(1, "R-0", &teacher(0)),
            registration(2, "R-1", &teacher(1)),
        ],
        &[],
        true,
    )
    .await;
    assert_eq!(versions(&first), vec![(teacher(0), 1), (teacher(1), 1)]);
    assert_eq!(first.leased[0].row.routing_key, "outcome.provisional");
    let batch = db.store.claim_outbox(10, NOW).await.unwrap();
    assert!(batch.is_empty(), "leased rows are not the relay's");
    batch.complete(&[]).await.unwrap();

    // The next write marks teacher 0's first version (confirmed) and leases its second.
    let ids: Vec<i64> = first.leased.iter().map(|l| l.row.id).collect();
    let second =
        apply_publishing(&db.store, &[claim(3, "IP-0", &teacher(0))], &ids[..1], true).await;
    assert_eq!(second.marked, 1);
    assert_eq!(versions(&second), vec![(teacher(0), 2)]);

    // Teacher 1's version was not confirmed: handed back, the relay takes it.
    db.store.release_leases(&ids[1..]).await.unwrap();
    let batch = db.store.claim_outbox(10, NOW).await.unwrap();
    assert_eq!(claimed(&batch), vec![teacher(1)]);
    let relayed: Vec<i64> = batch.rows.iter().map(|r| r.id).collect();
    assert_eq!(batch.complete(&relayed).await.unwrap(), 1);

    // Teacher 2's first version is the relay's (written without a lease); its second is not
    // leased either, so that the relay sends both, in order.
    let third = apply_publishing(
        &db.store,
        &[registration(4, "R-2", &teacher(2))],
        &[],
        false,
    )
    .await;
    assert!(third.leased.is_empty());
    let fourth = apply_publishing(&db.store, &[claim(5, "IP-2", &teacher(2))], &[], true).await;
    assert!(
        fourth.leased.is_empty(),
        "an earlier version waits for the relay"
    );
    let batch = db.store.claim_outbox(10, NOW).await.unwrap();
    assert_eq!(claimed(&batch), vec![teacher(2), teacher(2)]);
    let relayed: Vec<i64> = batch.rows.iter().map(|r| r.id).collect();
    assert_eq!(batch.complete(&relayed).await.unwrap(), 2);

    // Teacher 0's second version: the lane never marked it; once its lease ran out the relay
    // takes it.
    let batch = db.store.claim_outbox(10, NOW).await.unwrap();
    assert!(batch.is_empty());
    batch.complete(&[]).await.unwrap();
    let later = NOW + Duration::from_secs(31);
    let batch = db.store.claim_outbox(10, later).await.unwrap();
    assert_eq!(claimed(&batch), vec![teacher(0)]);
    let relayed: Vec<i64> = batch.rows.iter().map(|r| r.id).collect();
    assert_eq!(batch.complete(&relayed).await.unwrap(), 1);

    // A published row keeps its lease when its lane published it: the mark says who did.
    let by_lane: Vec<(String, i64)> = sqlx::query_as(
        "select trn, version from outbox where published_at is not null and lease_until is not null order by trn, version",
    )
    .fetch_all(db.store.pool())
    .await
    .unwrap();
    assert_eq!(by_lane, vec![(teacher(0), 1)]);
    let pending: i64 = sqlx::query_scalar("select count(*) from outbox where published_at is null")
        .fetch_one(db.store.pool())
        .await
        .unwrap();
    assert_eq!(pending, 0, "everything published once");
    assert_eq!(
        db.store.mark_published(&ids[..1], NOW).await.unwrap(),
        0,
        "already marked"
    );
    db.finish().await;
}

/// The sweep re-emits an overdue provisional once, even with two sweepers at the same time.
#[tokio::test]
async fn two_sweepers_re_emit_an_overdue_provisional_once() {
    let db = Db::new().await;
    apply(
        &db.store,
        &[
            registration(1, "R-1", "1000001"),
            registration(2, "R-2", "1000002"),
        ],
    )
    .await;
    let later = NOW + time::Duration::days(30);
    let max_age = time::Duration::days(7);
    // Not yet overdue a day later.
    let not_yet = NOW + time::Duration::days(1);
    assert_eq!(
        db.store.sweep_overdue(not_yet, max_age, 10).await.unwrap(),
        0
    );
    let (a, b) = tokio::join!(
        db.store.sweep_overdue(later, max_age, 10),
        db.store.sweep_overdue(later, max_age, 10)
    );
    assert_eq!(
        a.unwrap() + b.unwrap(),
        2,
        "one overdue outcome per teacher"
    );
    assert_eq!(db.store.sweep_overdue(later, max_age, 10).await.unwrap(), 0);
    let overdue: Vec<bool> = sqlx::query_scalar(
        "select (convert_from(body, 'utf8')::jsonb ->> 'overdue')::bool from outbox where version = 2 order by trn",
    )
    .fetch_all(db.store.pool())
    .await
    .unwrap();
    assert_eq!(overdue, vec![true, true]);
    db.finish().await;
}

/// The gauges run every few seconds on every replica. With a million teachers, counting the
/// overdue provisionals by reading every teacher cost the database about 110 ms a refresh
/// (docs/PERFORMANCE.md, fifteenth round); they are counted through an index of their own.
#[tokio::test]
async fn the_gauges_count_overdue_provisionals_without_reading_every_teacher() {
    let db = Db::new().await;
    let store = db.one_connection().await;
    let teacher = |n: u64| format!("{}", 6_000_000 + n);
    let registered = |range: std::ops::Range<u64>| -> Vec<Value> {
        range
            .map(|n| registration(n + 1, &format!("r{n}"), &teacher(n)))
            .collect()
    };
    // Five teachers provisional since NOW, 1,995 since twenty days later.
    apply(&store, &registered(0..5)).await;
    let later = NOW + time::Duration::days(20);
    for chunk in (5..2_000_u64).step_by(500) {
        apply_at(&store, &registered(chunk..(chunk + 500).min(2_000)), later).await;
    }
    // Ten days on, with a week allowed, only the first five are overdue.
    let sweep_at = NOW + time::Duration::days(10);
    let max_age = time::Duration::days(7);
    assert_eq!(
        store.sweep_overdue(sweep_at, max_age, 100).await.unwrap(),
        5
    );
    // As autovacuum would have, long before a table held a million teachers.
    sqlx::query("analyze teachers")
        .execute(store.pool())
        .await
        .unwrap();
    let before = scans(&store).await;
    let gauges = store.gauges().await.unwrap();
    let after = scans(&store).await;
    assert_eq!(gauges.overdue_provisionals, 5);
    assert_eq!(gauges.open_conflicts, 0);
    read_through_an_index(&before, &after, "teachers");
    store.pool().close().await;
    db.finish().await;
}

/// A teacher's outbox row of a version, as published.
async fn published_body(store: &Store, trn: &str, version: i64) -> Value {
    let body: Vec<u8> =
        sqlx::query_scalar("select body from outbox where trn = $1 and version = $2")
            .bind(trn)
            .bind(version)
            .fetch_one(store.pool())
            .await
            .unwrap();
    serde_json::from_slice(&body).unwrap()
}

/// ARCHITECTURE decision 33: the teacher's row keeps no copy of its last outcome; the next
/// batch, `explain` and a worker of the release before (during a rolling update, through
/// `held_by`) read the outbox row of its version; a teacher whose `last_outcome` a release
/// before stored is read from it where that row is missing, and the next write clears it. The
/// outbox refuses to lose the only copy.
#[tokio::test]
async fn a_teachers_last_outcome_is_the_outbox_row_of_its_version_for_this_release_and_the_one_before()
 {
    let db = Db::new().await;
    let trn = Trn::parse("1000001").unwrap();
    apply(&db.store, &[registration(1, "R-1", "1000001")]).await;
    // The claim's batch reads version 1 back to decide version 2.
    apply(&db.store, &[claim(2, "IP-1", "1000001")]).await;
    assert_eq!(
        db.teachers().await["1000001"],
        (vec![1, 2], 2, "confirmed".to_owned())
    );
    let stored_twice: i64 =
        sqlx::query_scalar("select count(*) from teachers where last_outcome is not null")
            .fetch_one(db.store.pool())
            .await
            .unwrap();
    assert_eq!(
        stored_twice, 0,
        "the last outcome is kept once, in the outbox"
    );
    let published = published_body(&db.store, "1000001", 2).await;
    let explained = db.store.explain(&trn).await.unwrap().last_outcome;
    assert_eq!(
        serde_json::to_value(explained).unwrap(),
        published,
        "explain shows version 2 as published"
    );
    let before: sqlx::types::Json<Value> = sqlx::query_scalar(
        "select last_outcome from held_by(array['1000001']) where kind = 'teacher'",
    )
    .fetch_one(db.store.pool())
    .await
    .unwrap();
    assert_eq!(
        before.0, published,
        "the release before reads the same through held_by"
    );

    // The only copy cannot be deleted, nor the outbox truncated; an older version can go.
    for (statement, refusal) in [
        (
            "delete from outbox where trn = '1000001' and version = 2",
            "is a teacher's last outcome and cannot be deleted",
        ),
        (
            "truncate outbox",
            "the outbox holds the teachers' last outcomes and cannot be truncated",
        ),
    ] {
        let error = sqlx::query(statement)
            .execute(db.store.pool())
            .await
            .expect_err(statement)
            .to_string();
        assert!(error.contains(refusal), "{statement}: {error}");
        assert!(
            !error.contains("1000001"),
            "the TRN is not in the error: {error}"
        );
    }
    sqlx::query("delete from outbox where trn = '1000001' and version = 1")
        .execute(db.store.pool())
        .await
        .expect("a version before the last may be deleted");

    // Stored by the release before, and its outbox row gone (a database restored without it).
    for statement in [
        "update teachers t set last_outcome = convert_from(o.body, 'UTF8')::jsonb
         from outbox o where o.trn = t.trn and o.version = t.version",
        "delete from outbox where trn = '1000001' and version = 2",
    ] {
        sqlx::query(statement)
            .execute(db.store.pool())
            .await
            .unwrap();
    }
    let explained = db.store.explain(&trn).await.unwrap().last_outcome;
    assert_eq!(serde_json::to_value(explained).unwrap(), published);
    // The school now names another AB: a conflict, version 3, decided from version 2.
    let moved = set(
        registration(3, "R-1", "1000001"),
        "payload.appropriate_body_id",
        json!("AB-2"),
    );
    apply(&db.store, &[moved]).await;
    assert_eq!(
        db.teachers().await["1000001"],
        (vec![3], 3, "conflict".to_owned())
    );
    let kept: Option<sqlx::types::Json<Value>> =
        sqlx::query_scalar("select last_outcome from teachers where trn = '1000001'")
            .fetch_one(db.store.pool())
            .await
            .unwrap();
    assert!(kept.is_none(), "the write cleared the copy: {kept:?}");
    let explained = db.store.explain(&trn).await.unwrap().last_outcome;
    assert_eq!(
        serde_json::to_value(explained).unwrap(),
        published_body(&db.store, "1000001", 3).await
    );
    db.finish().await;
}

/// Makes the counts of `store`'s one connection visible in PostgreSQL's statistics views: a
/// backend reports them when it goes idle, at most once a second unless told to.
async fn flush_statistics(store: &Store) {
    sqlx::query("select pg_stat_force_next_flush()")
        .execute(store.pool())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
}

/// Sequential and index scans of the record and teacher tables, as PostgreSQL counts them.
async fn scans(store: &Store) -> BTreeMap<String, (i64, i64)> {
    statistics(
        store,
        "select relname::text, seq_scan, coalesce(idx_scan, 0) from pg_stat_user_tables
         where relname in ('registrations', 'induction_periods', 'teachers', 'inbox', 'outbox')",
    )
    .await
}

/// Asserts that between two readings of [`scans`] `table` was read through an index and never
/// by a sequential scan.
fn read_through_an_index(
    before: &BTreeMap<String, (i64, i64)>,
    after: &BTreeMap<String, (i64, i64)>,
    table: &str,
) {
    let (seq_before, idx_before) = before[table];
    let (seq_after, idx_after) = after[table];
    assert_eq!(
        seq_after - seq_before,
        0,
        "{table} was read by a sequential scan"
    );
    assert!(
        idx_after > idx_before,
        "{table} was not read through an index"
    );
}

/// Keeps autovacuum off the outbox, so that what a test reads of it is what the worker left.
async fn outbox_without_autovacuum(store: &Store) {
    sqlx::query("alter table outbox set (autovacuum_enabled = false)")
        .execute(store.pool())
        .await
        .unwrap();
}

/// Two counts by name from one of PostgreSQL's statistics views, on `store`'s one connection,
/// after flushing them.
async fn statistics(store: &Store, query: &'static str) -> BTreeMap<String, (i64, i64)> {
    flush_statistics(store).await;
    sqlx::query(query)
        .fetch_all(store.pool())
        .await
        .unwrap()
        .into_iter()
        .map(|row| (row.get(0), (row.get(1), row.get(2))))
        .collect()
}

/// Before a table's first `ANALYZE` (a new database, a backlog drained before autovacuum
/// wakes) the planner has no statistics and takes `trn = any(...)` over many TRNs for most of a
/// table; a batch still finds its rows through their indexes instead of reading whole tables,
/// and its statements are not planned anew for every batch (ARCHITECTURE decisions 25 and 30).
#[tokio::test]
async fn a_batch_on_tables_never_analysed_finds_its_rows_through_their_indexes_with_plans_made_once()
 {
    let db = Db::new().await;
    let store = db.one_connection().await;
    let teacher = |n: u64| format!("{}", 4_000_000 + n);
    for chunk in 0..6_u64 {
        let messages: Vec<Value> = (chunk * 500..(chunk + 1) * 500)
            .flat_map(|n| {
                [
                    registration(2 * n, &format!("r{n}"), &teacher(n)),
                    claim(2 * n + 1, &format!("ip{n}"), &teacher(n)),
                ]
            })
            .collect();
        apply(&store, &messages).await;
    }
    let analysed: i64 = sqlx::query_scalar(
        "select count(*) from pg_stat_user_tables
         where relname in ('registrations', 'induction_periods') and last_autoanalyze is not null",
    )
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(
        analysed, 0,
        "autovacuum analysed the tables: the test proves nothing"
    );

    let before = scans(&store).await;
    // A second school registers 150 of the 3,000 teachers.
    let messages: Vec<Value> = (0..150_u64)
        .map(|n| registration(10_000 + n, &format!("s{n}"), &teacher(n * 20)))
        .collect();
    let handled = apply(&store, &messages).await;
    assert_eq!(handled.len(), 150);
    let after = scans(&store).await;
    // The batch's statements went on with plans made once (PostgreSQL makes five custom plans
    // before it compares); the scans above were made through those plans.
    let plans: Vec<(String, i64)> =
        sqlx::query_as("select statement, generic_plans from pg_prepared_statements")
            .fetch_all(store.pool())
            .await
            .unwrap();
    for statement in [
        "insert into inbox",
        "lock_and_load_v2(",
        "insert into registrations",
    ] {
        let generic = plans
            .iter()
            .filter(|(text, _)| text.contains(statement))
            .map(|(_, generic)| *generic)
            .sum::<i64>();
        assert!(
            generic > 0,
            "the statement with {statement} was planned anew every time"
        );
    }
    for table in [
        "registrations",
        "induction_periods",
        "teachers",
        "inbox",
        "outbox",
    ] {
        read_through_an_index(&before, &after, table);
    }
    store.pool().close().await;
    db.finish().await;
}

/// Index entries read from the outbox's two partial indexes so far, on `store`'s one connection.
async fn pending_entries_read(store: &Store) -> i64 {
    flush_statistics(store).await;
    sqlx::query_scalar(
        "select sum(idx_tup_read)::int8 from pg_stat_user_indexes
         where indexrelname in ('outbox_pending', 'outbox_pending_by_id')",
    )
    .fetch_one(store.pool())
    .await
    .unwrap()
}

/// Marking a row published leaves its entry in the partial indexes of pending rows until the
/// table is vacuumed, and autovacuum waits for a fifth of a large table to change. A lane's
/// write and the relay's claim still read only the pending rows they need, not every entry of
/// what was published since the last vacuum (ARCHITECTURE decision 31): on tables never
/// analysed, a claim read them all by a bitmap scan, and a write read them all once for every
/// outcome it wrote.
#[tokio::test]
async fn writes_and_claims_read_the_pending_rows_not_everything_published_since_the_last_vacuum() {
    let db = Db::new().await;
    let store = db.one_connection().await;
    // Before the table's first vacuum, whenever autovacuum would come.
    outbox_without_autovacuum(&store).await;
    let teacher = |n: u64| format!("{}", 5_000_000 + n);
    // Lanes' writes of 40 outcomes each, leased, each marking the previous one's published.
    let write = |round: u64, confirmed: Vec<i64>| {
        let messages: Vec<Value> = (0..40_u64)
            .map(|n| {
                let teacher_n = round * 40 + n;
                registration(teacher_n + 1, &format!("r{teacher_n}"), &teacher(teacher_n))
            })
            .collect();
        let store = &store;
        async move { apply_publishing(store, &messages, &confirmed, true).await }
    };
    // 1,960 outcomes published, 40 pending.
    let mut confirmed: Vec<i64> = Vec::new();
    for round in 0..50 {
        let written = write(round, confirmed).await;
        assert_eq!(
            written.leased.len(),
            40,
            "no earlier version waits: all leased"
        );
        confirmed = written.leased.iter().map(|l| l.row.id).collect();
    }

    let before = pending_entries_read(&store).await;
    let written = write(50, confirmed).await;
    assert_eq!((written.marked, written.leased.len()), (40, 40));
    let after_write = pending_entries_read(&store).await;
    // The first claim after them passes the entries of the published rows once, and marks them
    // dead for every later scan.
    store
        .claim_outbox(500, NOW)
        .await
        .unwrap()
        .complete(&[])
        .await
        .unwrap();
    let before_claims = pending_entries_read(&store).await;
    for _ in 0..3 {
        let batch = store.claim_outbox(500, NOW).await.unwrap();
        assert!(batch.is_empty(), "every pending row is leased");
        batch.complete(&[]).await.unwrap();
    }
    let after_claims = pending_entries_read(&store).await;
    // Marking reads each marked row's entry and a claim passes the 40 leased rows; neither
    // reads the 2,000 published ones again.
    assert!(
        after_write - before <= 200,
        "a write of 40 outcomes read {} entries of the pending indexes",
        after_write - before
    );
    assert!(
        after_claims - before_claims <= 3 * 100,
        "three claims read {} entries of the pending indexes",
        after_claims - before_claims
    );
    store.pool().close().await;
    db.finish().await;
}

/// Index scans of each outbox index so far, and entries read, on `store`'s one connection.
async fn outbox_index_reads(store: &Store) -> BTreeMap<String, (i64, i64)> {
    statistics(
        store,
        "select indexrelname::text, idx_scan, idx_tup_read from pg_stat_user_indexes
         where relname = 'outbox'",
    )
    .await
}

/// A large outbox is nearly always analysed with nothing pending, so the partial indexes of
/// pending rows look empty to the planner; when a backlog builds up, a plan that scans one of
/// them whole and filters by id or TRN still looks cheapest. The lanes' writes and marks, their
/// hand-backs and the relay's claim look rows up through the unique indexes instead
/// (ARCHITECTURE decision 34), so what they read does not grow with the backlog. Without that,
/// the marks read every pending entry.
#[tokio::test]
async fn a_backlog_on_an_outbox_analysed_when_nothing_was_pending_is_read_through_the_unique_indexes()
 {
    let db = Db::new().await;
    let store = db.one_connection().await;
    outbox_without_autovacuum(&store).await;
    // 50,000 published outcomes of other teachers, analysed: nothing pending.
    sqlx::query(
        "insert into outbox (outcome_id, trn, version, routing_key, body, created_at, published_at)
         select gen_random_uuid(), (4000000 + g % 10000)::text, g / 10000 + 1, 'outcome.confirmed',
                '{}'::bytea, now(), now()
         from generate_series(0, 49999) as g",
    )
    .execute(store.pool())
    .await
    .unwrap();
    sqlx::query("vacuum analyze outbox")
        .execute(store.pool())
        .await
        .unwrap();
    let teacher = |n: u64| format!("{}", 5_000_000 + n);
    let messages = |round: u64| -> Vec<Value> {
        (0..40_u64)
            .map(|n| {
                let teacher_n = round * 40 + n;
                registration(teacher_n + 1, &format!("r{teacher_n}"), &teacher(teacher_n))
            })
            .collect()
    };
    // A backlog for the relay: 1,200 outcomes written without a lease.
    for round in 0..30 {
        apply(&store, &messages(round)).await;
    }
    // A lane's write leases 40; its next write marks them and leases 40 more.
    let leased = apply_publishing(&store, &messages(30), &[], true).await;
    let confirmed: Vec<i64> = leased.leased.iter().map(|l| l.row.id).collect();
    let before = outbox_index_reads(&store).await;
    let written = apply_publishing(&store, &messages(31), &confirmed, true).await;
    assert_eq!((written.marked, written.leased.len()), (40, 40));
    // The marks of a lane with nothing more to write, and a hand-back to the relay.
    let ids: Vec<i64> = written.leased.iter().map(|l| l.row.id).collect();
    assert_eq!(store.mark_published(&ids[..20], NOW).await.unwrap(), 20);
    store.release_leases(&ids[20..]).await.unwrap();
    let after_lane = outbox_index_reads(&store).await;
    // The relay claims 100 teachers' rows.
    let batch = store.claim_outbox(100, NOW).await.unwrap();
    assert_eq!(
        batch.len(),
        100,
        "the oldest 100 teachers, one version each"
    );
    batch.complete(&[]).await.unwrap();
    let after_claim = outbox_index_reads(&store).await;

    let read = |from: &BTreeMap<String, (i64, i64)>,
                to: &BTreeMap<String, (i64, i64)>,
                index: &str| { to[index].1 - from[index].1 };
    assert_eq!(
        read(&before, &after_lane, "outbox_pending_by_id"),
        0,
        "the lane's write, marks and hand-back read the pending rows' index (1,280 rows pending)"
    );
    assert!(
        read(&after_lane, &after_claim, "outbox_pending_by_id") <= 150,
        "a claim of 100 read {} entries of the pending rows' index (1,280 rows pending)",
        read(&after_lane, &after_claim, "outbox_pending_by_id")
    );
    // Nothing reads pending rows by TRN through an index of their own, so there is none to
    // write (migration 20261206000003): every outbox index is one of these.
    let indexes: Vec<&str> = after_claim.keys().map(String::as_str).collect();
    assert_eq!(
        indexes,
        [
            "outbox_outcome_id_key",
            "outbox_pending_by_id",
            "outbox_pkey",
            "outbox_trn_version_key"
        ],
        "the outbox's indexes"
    );
    store.pool().close().await;
    db.finish().await;
}

/// The database's own checks of identifiers admit what the contract's pattern
/// `^[A-Za-z0-9._:-]{1,64}$` admits and refuse the rest, naming the constraint (migration
/// `20261206000001` wrote them without a counted repetition).
#[tokio::test]
async fn the_identifier_checks_admit_the_contracts_identifiers_and_refuse_the_rest() {
    let db = Db::new().await;
    let insert = |n: u32, column: &'static str, value: Option<String>| {
        let pool = db.store.pool().clone();
        async move {
            let mut id = Some(format!("REG-{n}"));
            let mut ab = Some("AB-1".to_owned());
            let mut provider = Some("LP-1".to_owned());
            match column {
                "registration_id" => id = value,
                "appropriate_body_id" => ab = value,
                _ => provider = value,
            }
            let programme = if provider.is_some() {
                "provider_led"
            } else {
                "school_led"
            };
            sqlx::query(
                "insert into registrations (registration_id, trn, school_urn, started_on,
                   appropriate_body_id, training_programme, lead_provider_id, deleted, occurred_at,
                   occurred_at_ns, message_id)
                 values ($1, '1234567', 100001, date '2025-09-01', $2, $3, $4, false, now(), 0,
                   gen_random_uuid())",
            )
            .bind(id)
            .bind(ab)
            .bind(programme)
            .bind(provider)
            .execute(&pool)
            .await
        }
    };
    let longest = "a".repeat(64);
    let admitted = [
        "A.b_c:d-9",
        "x",
        longest.as_str(),
        "0f8b2c1e-4d5a-4b6c-9d7e-8f9a0b1c2d3e",
    ];
    let refused = ["", "a/b", "a b", "é", "a\n", "AB-1;"];
    let mut n = 0;
    for column in ["registration_id", "appropriate_body_id", "lead_provider_id"] {
        for value in admitted {
            n += 1;
            let result = insert(n, column, Some(value.to_owned())).await;
            assert!(result.is_ok(), "{column} {value:?} refused: {result:?}");
        }
        for value in refused
            .iter()
            .map(|v| v.to_string())
            .chain(["a".repeat(65)])
        {
            n += 1;
            let error = insert(n, column, Some(value.clone())).await.unwrap_err();
            let constraint = error
                .as_database_error()
                .and_then(|e| e.constraint())
                .map(str::to_owned);
            assert_eq!(
                constraint.as_deref(),
                Some(format!("registrations_{column}_check").as_str()),
                "{column} {value:?}: {error}"
            );
        }
    }
    n += 1;
    insert(n, "lead_provider_id", None)
        .await
        .expect("no lead provider for a school-led programme");
    // A claim's two identifiers, at the length bound.
    for (period, ab, refused_by) in [
        (longest.clone(), "AB-1".to_owned(), None),
        (
            "a".repeat(65),
            "AB-1".to_owned(),
            Some("induction_periods_induction_period_id_check"),
        ),
        (
            "IP-2".to_owned(),
            "a".repeat(65),
            Some("induction_periods_appropriate_body_id_check"),
        ),
        (
            "IP-3".to_owned(),
            "a/b".to_owned(),
            Some("induction_periods_appropriate_body_id_check"),
        ),
    ] {
        let result = sqlx::query(
            "insert into induction_periods (induction_period_id, trn, appropriate_body_id,
               started_on, deleted, occurred_at, occurred_at_ns, message_id)
             values ($1, '1234567', $2, date '2025-09-01', false, now(), 0, gen_random_uuid())",
        )
        .bind(&period)
        .bind(&ab)
        .execute(db.store.pool())
        .await;
        let constraint = result.as_ref().err().map(|error| {
            error
                .as_database_error()
                .and_then(|e| e.constraint())
                .map(str::to_owned)
        });
        assert_eq!(
            constraint,
            refused_by.map(|c| Some(c.to_owned())),
            "{period} {ab}"
        );
    }
    db.finish().await;
}

/// `apply`, for a batch that defers (a lane's first attempt at its batch).
async fn apply_deferring(store: &Store, messages: &[Value]) -> Vec<Handled> {
    let inputs: Vec<(Input, [u8; 32])> = messages.iter().map(input).collect();
    let items = items(&inputs);
    let (results, _) = store
        .apply_batch_publishing(&items, NOW, Publishing::default(), Contention::Defer)
        .await
        .expect("the batch commits");
    results
}

/// While another transaction holds one teacher's lock and one record's, a batch that defers
/// returns at once: it writes the messages it could lock, and leaves as deferred, with nothing of
/// them written (not even their ids), the message about the held teacher, the move of a record
/// that counts for that teacher, the message about the held record, and the later messages about
/// records it deferred (one of them about a free teacher), so that a record's snapshots keep their
/// order. Applied afterwards by a batch that waits, they give what the ledger
/// gives for the whole stream.
#[tokio::test]
async fn a_batch_that_defers_writes_what_it_can_lock_and_leaves_the_rest() {
    let db = Db::new().await;
    let (held_teacher, free, other) = ("1000001", "1000002", "1000003");
    let before = vec![
        registration(1, "R-MOVING", held_teacher),
        registration(2, "R-HELD", other),
    ];
    assert!(
        apply(&db.store, &before)
            .await
            .iter()
            .all(|h| matches!(h, Handled::Applied { .. }))
    );
    let at = |message: Value, when: &str| set(message, "occurred_at", json!(when));
    let batch = vec![
        registration(10, "R-FREE", free),
        claim(11, "IP-HELD-TEACHER", held_teacher),
        at(registration(12, "R-MOVING", free), "2025-09-01T10:00:00Z"),
        registration(13, "R-HELD", other),
        claim(14, "IP-FREE", free),
        at(registration(15, "R-MOVING", other), "2025-09-01T11:00:00Z"),
        at(claim(16, "IP-HELD-TEACHER", free), "2025-09-01T11:00:00Z"),
    ];
    let mut blocker = common::hold_teacher(db.store.pool(), held_teacher).await;
    sqlx::query("select pg_advisory_xact_lock(1, hashtext('registration:R-HELD'))")
        .execute(&mut *blocker)
        .await
        .unwrap();

    let results = tokio::time::timeout(Duration::from_secs(20), apply_deferring(&db.store, &batch))
        .await
        .expect("a batch that defers does not wait for another transaction's locks");
    let deferred: Vec<bool> = results
        .iter()
        .map(|h| matches!(h, Handled::Deferred))
        .collect();
    assert_eq!(
        deferred,
        [false, true, true, true, false, true, true],
        "deferred: the held teacher's claim, the move away from it, the held record, and the \
         later snapshots of the moving record and of the held teacher's claim; {results:?}"
    );
    assert!(
        results
            .iter()
            .filter(|h| !matches!(h, Handled::Deferred))
            .all(|h| matches!(h, Handled::Applied { .. }))
    );
    let inbox: Vec<uuid::Uuid> =
        sqlx::query_scalar("select message_id from inbox order by message_id")
            .fetch_all(db.store.pool())
            .await
            .unwrap();
    let mut written: Vec<uuid::Uuid> = before
        .iter()
        .chain([&batch[0], &batch[4]])
        .map(|m| m["message_id"].as_str().unwrap().parse().unwrap())
        .collect();
    written.sort();
    assert_eq!(inbox, written, "only the written messages' ids");
    let owner: String =
        sqlx::query_scalar("select trn from registrations where registration_id = 'R-MOVING'")
            .fetch_one(db.store.pool())
            .await
            .unwrap();
    assert_eq!(owner, held_teacher, "the move waits with its teacher");
    let teachers = db.teachers().await;
    assert_eq!(
        teachers[held_teacher].0,
        [1],
        "no outcome for the held teacher"
    );
    assert!(
        !teachers.contains_key(other) || teachers[other].0 == [1],
        "nothing new for the teacher of the held record"
    );

    blocker.commit().await.unwrap();
    let rest: Vec<Value> = batch
        .iter()
        .zip(&deferred)
        .filter(|(_, d)| **d)
        .map(|(m, _)| m.clone())
        .collect();
    assert!(
        apply(&db.store, &rest)
            .await
            .iter()
            .all(|h| matches!(h, Handled::Applied { .. }))
    );
    let all: Vec<Value> = before.iter().chain(&batch).cloned().collect();
    let expected = expected_statuses(&all);
    let teachers = db.teachers().await;
    for (trn, status) in &expected {
        let (versions, version, stored) = &teachers[trn];
        let gap_free: Vec<i64> = (1..=*version).collect();
        assert_eq!(versions, &gap_free, "teacher {trn}: versions gap-free");
        assert_eq!(stored, status, "teacher {trn}: the ledger's status");
    }
    db.finish().await;
}

/// With nothing held by another transaction, a batch that defers defers nothing.
#[tokio::test]
async fn a_batch_that_defers_defers_nothing_uncontended() {
    let db = Db::new().await;
    let batch = vec![
        registration(1, "R-1", "1000001"),
        claim(2, "IP-1", "1000001"),
        registration(3, "R-1", "1000002"),
    ];
    let results = apply_deferring(&db.store, &batch).await;
    assert!(
        results.iter().all(|h| matches!(h, Handled::Applied { .. })),
        "{results:?}"
    );
    db.finish().await;
}
