//! The two kinds of transaction-scoped advisory lock (ARCHITECTURE.md, "Concurrency"), always
//! taken in this order: every record a batch carries a snapshot of, then every teacher it
//! touches, each kind in ascending key order, so that transactions cannot deadlock.

use std::collections::BTreeSet;

use sqlx::PgConnection;

use super::error::StoreError;
use crate::domain::{RecordKey, Trn};

/// Takes the records' advisory locks (class 1, keyed by a hash of kind and id) in ascending
/// key order. A hash collision only makes two records share a lock.
pub(super) async fn lock_records(
    conn: &mut PgConnection,
    keys: &[RecordKey],
) -> Result<(), StoreError> {
    let names: Vec<String> = keys
        .iter()
        .map(|k| format!("{}:{}", k.kind(), k.id()))
        .collect();
    sqlx::query(
        "select count(pg_advisory_xact_lock(1, h))
         from (select distinct hashtext(k) as h from unnest($1::text[]) as k order by h) as sorted",
    )
    .bind(names)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Takes the teachers' advisory locks (class 2) in ascending TRN order (a TRN is its own key).
pub(super) async fn lock_teachers(
    conn: &mut PgConnection,
    teachers: &BTreeSet<Trn>,
) -> Result<(), StoreError> {
    let keys: Vec<i32> = teachers
        .iter()
        .map(|t| t.as_str().parse().expect("a TRN is seven digits"))
        .collect();
    // Sorted in a subquery; the locks are taken as its rows are read. Should Postgres ever take
    // them out of order, a deadlock is detected, reported as 40P01 and the batch retried.
    sqlx::query("select count(pg_advisory_xact_lock(2, k)) from (select k from unnest($1::int4[]) as k order by k) as sorted")
        .bind(keys)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The TRNs the given records count for now (records not yet held are left out). Read under
/// the records' locks, so that they cannot change before the teachers are locked.
pub(super) async fn held_trns(
    conn: &mut PgConnection,
    keys: &[RecordKey],
) -> Result<BTreeSet<Trn>, StoreError> {
    let (registrations, claims): (Vec<&RecordKey>, Vec<&RecordKey>) = keys
        .iter()
        .partition(|k| matches!(k, RecordKey::Registration(_)));
    let ids = |ks: Vec<&RecordKey>| {
        ks.iter()
            .map(|k| k.id().as_str().to_owned())
            .collect::<Vec<_>>()
    };
    let trns: Vec<String> = sqlx::query_scalar(
        "select trn from registrations where registration_id = any($1)
         union select trn from induction_periods where induction_period_id = any($2)",
    )
    .bind(ids(registrations))
    .bind(ids(claims))
    .fetch_all(&mut *conn)
    .await?;
    trns.iter()
        .map(|t| Trn::parse(t).ok_or_else(|| StoreError::corrupt("a stored TRN is invalid")))
        .collect()
}
