//! The two kinds of transaction-scoped advisory lock (ARCHITECTURE.md, "Concurrency"), always
//! taken in this order: every record a batch carries a snapshot of, then every teacher it
//! touches, each kind in ascending key order, so that transactions cannot deadlock. A batch
//! takes both kinds, and reads what its teachers hold, in one round trip (`lock_and_load_v2`, a
//! SQL function); a single teacher's operations (`verify --emit`, the sweep) take only the
//! teacher's.

use std::collections::BTreeSet;

use sqlx::PgConnection;

use super::error::StoreError;
use super::records;
use crate::domain::{Outcome, RecordKey, Snapshot, Trn};

/// Locks a batch and reads what its teachers hold, in one round trip (the SQL function
/// `lock_and_load_v2`, which calls `lock_batch`): the records' advisory locks (class 1, keyed by a
/// hash of kind and id; a hash collision only makes two records share a lock), then every
/// teacher the batch touches: the TRN of each snapshot (`snapshot_trns`) and the TRN each record
/// counts for now, read under the records' locks so that it cannot change before the teachers
/// are locked. Returns, read under those locks, the held snapshots of every record that counts
/// for one of those teachers and their last outcomes.
pub(super) async fn lock_and_load(
    conn: &mut PgConnection,
    keys: &[RecordKey],
    snapshot_trns: &BTreeSet<Trn>,
) -> Result<(Vec<Snapshot>, Vec<Outcome>), StoreError> {
    let names: Vec<String> = keys
        .iter()
        .map(|k| format!("{}:{}", k.kind(), k.id()))
        .collect();
    let ids = |registration: bool| -> Vec<&str> {
        keys.iter()
            .filter(|k| matches!(k, RecordKey::Registration(_)) == registration)
            .map(|k| k.id().as_str())
            .collect()
    };
    let rows = sqlx::query("select * from lock_and_load_v2($1, $2, $3, $4)")
        .bind(names)
        .bind(ids(true))
        .bind(ids(false))
        .bind(snapshot_trns.iter().map(trn_key).collect::<Vec<i32>>())
        .fetch_all(&mut *conn)
        .await?;
    records::held_from_rows(&rows)
}

/// A teacher's lock key: its TRN as a number (seven digits fit an `int4`).
fn trn_key(trn: &Trn) -> i32 {
    trn.as_str().parse().expect("a TRN is seven digits")
}

/// Takes the teachers' advisory locks (class 2) in ascending TRN order (a TRN is its own key).
pub(super) async fn lock_teachers(
    conn: &mut PgConnection,
    teachers: &BTreeSet<Trn>,
) -> Result<(), StoreError> {
    let keys: Vec<i32> = teachers.iter().map(trn_key).collect();
    // Sorted in a subquery; the locks are taken as its rows are read. Should Postgres ever take
    // them out of order, a deadlock is detected, reported as 40P01 and the batch retried.
    sqlx::query("select count(pg_advisory_xact_lock(2, k)) from (select k from unnest($1::int4[]) as k order by k) as sorted")
        .bind(keys)
        .execute(&mut *conn)
        .await?;
    Ok(())
}
