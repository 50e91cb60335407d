//! The two kinds of transaction-scoped advisory lock (ARCHITECTURE.md, "Concurrency"), always
//! taken in this order: every record a batch carries a snapshot of, then every teacher it
//! touches, each kind in ascending key order, so that transactions cannot deadlock. A batch
//! takes both kinds, and reads what its teachers hold, in the round trip that fills the inbox
//! (`lock_and_load_v2`, a SQL function, with [`BatchLocks`]; or `try_lock_and_load`, which waits
//! for none of them and says what it could not lock, ARCHITECTURE decision 44); a single
//! teacher's operations (`verify --emit`, the sweep) take only the teacher's.

use std::collections::BTreeSet;

use sqlx::PgConnection;

use super::error::StoreError;
use crate::domain::{RecordKey, Trn};

/// What a batch locks, as the arguments of the SQL functions `lock_and_load_v2` (which calls
/// `lock_batch`) and `try_lock_and_load`: the records' advisory locks (class 1, keyed by a hash of kind and id; a hash
/// collision only makes two records share a lock), then every teacher the batch touches: the
/// TRN of each snapshot and the TRN each record counts for now, read under the records' locks
/// so that it cannot change before the teachers are locked. Under those locks the function
/// returns the held snapshots of every record that counts for one of those teachers and their
/// last outcomes (`records::held_from_rows` reads them). The batch calls it in the statement
/// that fills the inbox, after it (`store::batch`).
pub(super) struct BatchLocks {
    /// `kind:id` of every record, for the records' locks.
    pub record_names: Vec<String>,
    /// The ids of the registrations, and of the induction periods, whose TRN to read.
    pub registration_ids: Vec<String>,
    pub induction_period_ids: Vec<String>,
    /// The teachers' lock keys of the snapshots' TRNs.
    pub snapshot_trns: Vec<i32>,
}

impl BatchLocks {
    /// The locks for snapshots of the records `keys`, carrying the TRNs `snapshot_trns`.
    pub(super) fn new(keys: &[RecordKey], snapshot_trns: &BTreeSet<Trn>) -> Self {
        let ids = |registration: bool| -> Vec<String> {
            keys.iter()
                .filter(|k| matches!(k, RecordKey::Registration(_)) == registration)
                .map(|k| k.id().as_str().to_owned())
                .collect()
        };
        Self {
            record_names: keys
                .iter()
                .map(|k| format!("{}:{}", k.kind(), k.id()))
                .collect(),
            registration_ids: ids(true),
            induction_period_ids: ids(false),
            snapshot_trns: snapshot_trns.iter().map(trn_key).collect(),
        }
    }
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
