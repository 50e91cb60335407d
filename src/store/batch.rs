//! Applying many input messages in one transaction, in three steps: one statement fills the
//! inbox, which decides duplicates and reused ids, and then locks the batch's records and
//! teachers and reads what those teachers hold; the messages are applied in order to a `Ledger`
//! seeded with that, exactly as `simulate` applies them; everything that changed is written with
//! one statement (`effects`). A batch that defers ([`Contention::Defer`]) takes no lock another
//! transaction holds, and leaves the messages that need one.

use std::collections::{BTreeSet, HashMap};

use sqlx::{PgConnection, Row};
use time::OffsetDateTime;
use uuid::Uuid;

use super::effects::{Effects, Publishing, Written};
use super::error::StoreError;
use super::locks::BatchLocks;
use super::outbox;
use super::records;
use super::{Handled, Store};
use crate::domain::{
    Admission, Ledger, Outcome, Receipt, RecordKey, Snapshot, SourceId, Trn, receipt,
};
use crate::messages::{Input, OutcomeMessage};

/// One message of a batch.
#[derive(Debug, Clone)]
pub struct BatchItem<'a> {
    /// The decoded message.
    pub input: &'a Input,
    /// SHA-256 of its body.
    pub digest: [u8; 32],
    /// The trace context to put on the outcomes it causes.
    pub traceparent: Option<String>,
}

impl Store {
    /// Records a batch of accepted inputs and everything they cause, in one transaction, and
    /// returns what happened to each, in order.
    ///
    /// A failure fails the whole batch (nothing is written); the caller retries it, or retries
    /// its messages one by one to find a message that cannot be processed.
    pub async fn apply_batch(
        &self,
        items: &[BatchItem<'_>],
        now: OffsetDateTime,
    ) -> Result<Vec<Handled>, StoreError> {
        let (results, _) = self
            .apply_batch_publishing(items, now, Publishing::default(), Contention::Wait)
            .await?;
        Ok(results)
    }

    /// [`Store::apply_batch`] for a lane that publishes its own outcomes: the same transaction
    /// marks the rows of `publishing.confirmed` published and leases the new outcomes the lane
    /// may publish once it returns (see [`Publishing`]). `publishing` may be a future (the lane
    /// waiting for the broker's confirms of what it published last): it runs beside the
    /// batch's first statement and is needed only by its write (ARCHITECTURE decision 47).
    /// With [`Contention::Defer`], messages that need a lock another transaction holds are left
    /// as [`Handled::Deferred`].
    pub async fn apply_batch_publishing<'p>(
        &self,
        items: &[BatchItem<'_>],
        now: OffsetDateTime,
        publishing: impl IntoFuture<Output = Publishing<'p>>,
        contention: Contention,
    ) -> Result<(Vec<Handled>, Written), StoreError> {
        self.bounded("a batch", async {
            let mut tx = self.pool().begin_with(BEGIN_BATCH).await?;
            let applied = apply_in(&mut tx, items, now, publishing, contention).await?;
            tx.commit().await?;
            Ok(applied)
        })
        .await
    }
}

/// How a batch's transaction starts, in one round trip with the `BEGIN` (ARCHITECTURE decisions
/// 25 and 30). Every statement of a batch finds its rows by key (message ids, record ids, TRNs,
/// outbox ids), and every key has an index:
///
/// - `enable_seqscan = off`: before a table's first `ANALYZE` (a new database: the first minute
///   of go-live, a backlog drained before autovacuum wakes) the planner has no statistics and
///   takes `trn = any($1)` over 150 TRNs for most of the table, so it read whole tables instead:
///   7 million rows by sequential scans while draining 40,000 messages (`pg_stat_user_tables`).
///   A cost penalty, not a ban: a sequential scan still runs where no index fits.
/// - `plan_cache_mode = force_generic_plan`: with sequential scans off, a plan made once for a
///   statement finds its rows through the same indexes as one made for each call (after 100,000
///   messages into a new database, about one index entry read per index scan of the record
///   tables), and planning the write statement anew for every batch was a third of the latency
///   at 1,000 msg/s, where a batch holds three messages. It was `auto` (a plan made once where
///   its estimated cost is no worse than the plans made for each call) until the outbox's
///   lookups stopped matching its partial indexes (ARCHITECTURE decision 34): the plan made once
///   then looks up as many outbox ids as a typical batch marks, those made for each call an
///   empty array, and `auto` planned the write statement anew for every batch. The connection's
///   default (`force_custom_plan`) stays for everything else the worker runs.
///
/// Both are for the transaction only.
const BEGIN_BATCH: &str =
    "BEGIN; SET LOCAL enable_seqscan = off; SET LOCAL plan_cache_mode = force_generic_plan";

/// What a batch does about a lock (of a record or a teacher) that another transaction holds:
/// another lane's batch, another worker's, the sweep or `verify --emit` (ARCHITECTURE decision
/// 44).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contention {
    /// Wait for it: every message is processed (`lock_and_load_v2`).
    Wait,
    /// Do not wait: the messages that need it, and every later message of the batch about the
    /// same record, are left as [`Handled::Deferred`] for a transaction that waits, and the
    /// rest are written now (`try_lock_and_load`).
    Defer,
}

async fn apply_in<'p>(
    conn: &mut PgConnection,
    items: &[BatchItem<'_>],
    now: OffsetDateTime,
    publishing: impl IntoFuture<Output = Publishing<'p>>,
    contention: Contention,
) -> Result<(Vec<Handled>, Written), StoreError> {
    // `join!`, not `try_join!`: the lane's confirm wait is seen through even when the first
    // statement fails. Cut short, it would drop the confirms it had not yet sorted, and their
    // outcomes would stay leased, left for the relay until their lease ran out. It is bounded
    // (`LaneOutbox::before_write`), and a failing statement is rare.
    let (admitted, publishing) = tokio::join!(
        admit_and_lock(conn, items, now, contention),
        publishing.into_future()
    );
    let (mut results, (snapshots, last), blocked) = admitted?;
    let deferred = defer(items, &mut results, blocked);
    if !deferred.is_empty() {
        // Their ids were inserted with the others': the transaction that applies them decides
        // them again.
        sqlx::query("delete from inbox where message_id = any($1)")
            .bind(&deferred)
            .execute(&mut *conn)
            .await?;
    }
    let to_apply: Vec<usize> = (0..items.len()).filter(|&i| results[i].is_none()).collect();
    let written = if to_apply.is_empty() {
        // Nothing to write (every message a duplicate): the marks still go with this commit.
        Written {
            marked: outbox::mark_published(conn, publishing.confirmed, now).await?,
            leased: Vec::new(),
        }
    } else {
        let mut ledger = Ledgered::seeded(snapshots, last);
        for &i in &to_apply {
            results[i] = Some(ledger.apply(&items[i], now)?);
        }
        ledger.finish().write(conn, now, &publishing).await?
    };
    let results = results
        .into_iter()
        .map(|r| r.expect("every item decided"))
        .collect();
    Ok((results, written))
}

/// What the batch's teachers hold: the snapshots of their records and their last outcomes.
type Held = (Vec<Snapshot>, Vec<Outcome>);

/// What a batch that defers could not lock: records (their own lock, or the lock of the teacher
/// they count for now) and teachers. Empty for a batch that waits.
#[derive(Debug, Default)]
struct Blocked {
    records: BTreeSet<RecordKey>,
    teachers: BTreeSet<Trn>,
}

/// Marks as deferred, in order, every message still to apply whose record or TRN is blocked,
/// and blocks its record for the messages after it, so that a record's messages keep their
/// order. Returns the deferred messages' ids (each the first of its id in the batch, inserted
/// into the inbox by this transaction).
fn defer(
    items: &[BatchItem<'_>],
    results: &mut [Option<Handled>],
    mut blocked: Blocked,
) -> Vec<Uuid> {
    if blocked.records.is_empty() && blocked.teachers.is_empty() {
        return Vec::new();
    }
    let mut deferred = Vec::new();
    for (item, result) in items.iter().zip(results.iter_mut()) {
        if result.is_some() {
            continue;
        }
        let record = &item.input.snapshot.record;
        let key = record.key();
        if blocked.records.contains(&key) || blocked.teachers.contains(record.trn()) {
            blocked.records.insert(key);
            *result = Some(Handled::Deferred);
            deferred.push(item.input.message_id());
        }
    }
    deferred
}

/// Step 1: inserts the batch's new message ids into the inbox and judges the rest, then locks
/// the batch and reads what its teachers hold, in one round trip. Within the batch the first
/// occurrence of an id stands for it; later ones compare with the digest accepted for it.
/// `None` for the messages to apply.
async fn admit_and_lock(
    conn: &mut PgConnection,
    items: &[BatchItem<'_>],
    now: OffsetDateTime,
    contention: Contention,
) -> Result<(Vec<Option<Handled>>, Held, Blocked), StoreError> {
    let mut first: HashMap<Uuid, usize> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        first.entry(item.input.message_id()).or_insert(i);
    }
    let mut firsts: Vec<usize> = first.values().copied().collect();
    firsts.sort_unstable();
    let (inserted, accepted, held, blocked) =
        insert_ids_and_lock(conn, items, &firsts, now, contention).await?;
    let results = items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let id = item.input.message_id();
            if first[&id] == i && inserted.contains(&id) {
                return None;
            }
            let digest = accepted.get(&id).unwrap_or(&items[first[&id]].digest);
            Some(match receipt(Some(digest), &item.digest) {
                Receipt::Duplicate => Handled::Duplicate,
                Receipt::Reused | Receipt::New => Handled::Reused,
            })
        })
        .collect();
    Ok((results, held, blocked))
}

/// Inserts the ids of `firsts` into the inbox, then locks the records of every message of the
/// batch and every teacher they touch and reads what those teachers hold ([`BatchLocks`]), in
/// one statement. Returns the ids inserted, the digests already accepted for the others, what
/// the teachers hold, and, with [`Contention::Defer`], what it could not lock because another
/// transaction holds it (it then reads only the teachers it locked).
///
/// The locks cover the batch's duplicates too, which are known only once the inbox has answered:
/// one round trip fewer for every batch (a fifth of them), for a few locks more in the batches
/// that carry a duplicate. The answer is a row of its own, not columns on every row the
/// function returns: a batch of 500 messages reads about a thousand rows, and the answer's
/// arrays on each of them made the worker read 25 MB a batch. The inbox goes first: `union all`
/// runs its branches in order, so a batch waiting on another transaction's insert of the same
/// id holds no lock meanwhile, as when they were two statements.
///
/// The ids are inserted in ascending order (ARCHITECTURE decision 38). Two workers can hold
/// copies of the same messages (a publisher's retry), each in a batch of its own: inserted in
/// delivery order, one batch waited on the other's insert of one id while the other waited on
/// its insert of another, and PostgreSQL broke the deadlock after `deadlock_timeout` (1 s) by
/// failing one of them. In one order, the second batch waits for the first to finish.
async fn insert_ids_and_lock(
    conn: &mut PgConnection,
    items: &[BatchItem<'_>],
    firsts: &[usize],
    now: OffsetDateTime,
    contention: Contention,
) -> Result<(BTreeSet<Uuid>, HashMap<Uuid, [u8; 32]>, Held, Blocked), StoreError> {
    let mut inserted = BTreeSet::new();
    let mut accepted = HashMap::new();
    let ids: Vec<Uuid> = firsts
        .iter()
        .map(|&i| items[i].input.message_id())
        .collect();
    let keys: Vec<RecordKey> = items
        .iter()
        .map(|item| item.input.snapshot.record.key())
        .collect();
    let snapshot_trns: BTreeSet<Trn> = items
        .iter()
        .map(|item| item.input.snapshot.record.trn().clone())
        .collect();
    let locks = BatchLocks::new(&keys, &snapshot_trns);
    let statement = match contention {
        Contention::Wait => INSERT_IDS_AND_LOCK,
        Contention::Defer => INSERT_IDS_AND_TRY_LOCKS,
    };
    let rows = sqlx::query(statement)
        .bind(&ids)
        .bind(
            firsts
                .iter()
                .map(|&i| items[i].digest.to_vec())
                .collect::<Vec<_>>(),
        )
        .bind(
            firsts
                .iter()
                .map(|&i| items[i].input.cause.message_type.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(now)
        .bind(&locks.record_names)
        .bind(&locks.registration_ids)
        .bind(&locks.induction_period_ids)
        .bind(&locks.snapshot_trns)
        .fetch_all(&mut *conn)
        .await?;
    // The inbox's answer is the one row with `ids`; the others are what the teachers hold, and
    // what a batch that defers could not lock.
    let mut answer = None;
    let mut held_rows = Vec::with_capacity(rows.len());
    let mut blocked = Blocked::default();
    for row in rows {
        if let Some(ids) = row.try_get::<Option<Vec<Uuid>>, _>("ids")? {
            answer = Some((ids, row));
        } else if row.try_get::<&str, _>("kind")? == "blocked" {
            blocked_from_row(&row, &mut blocked)?;
        } else {
            held_rows.push(row);
        }
    }
    let (answered, answer) =
        answer.ok_or_else(|| StoreError::corrupt("the inbox gave no answer"))?;
    let inserted_flags: Vec<bool> = answer.try_get("inserted")?;
    let digests: Vec<Vec<u8>> = answer.try_get("digests")?;
    for ((id, was_inserted), digest) in answered.into_iter().zip(inserted_flags).zip(digests) {
        if was_inserted {
            inserted.insert(id);
        } else if !digest.is_empty() {
            accepted.insert(id, digest_of(&digest)?);
        }
    }
    let held = records::held_from_rows(&held_rows)?;
    // An id another transaction inserted while this statement ran is not in its snapshot: read
    // those digests again with a new statement, which sees the other transaction's commit.
    let unresolved: Vec<Uuid> = ids
        .into_iter()
        .filter(|id| !inserted.contains(id) && !accepted.contains_key(id))
        .collect();
    if !unresolved.is_empty() {
        for row in
            sqlx::query("select message_id, body_sha256 from inbox where message_id = any($1)")
                .bind(&unresolved)
                .fetch_all(&mut *conn)
                .await?
        {
            let digest: Vec<u8> = row.try_get("body_sha256")?;
            accepted.insert(row.try_get("message_id")?, digest_of(&digest)?);
        }
    }
    Ok((inserted, accepted, held, blocked))
}

/// The statement of [`insert_ids_and_lock`] with the function that locks and loads: `$1..$4`
/// the inbox's columns and the time, `$5..$8` the [`BatchLocks`].
macro_rules! insert_ids_and {
    ($lock_and_load:literal) => {
        concat!(
            "with ins as (
           insert into inbox (message_id, body_sha256, message_type, admission, received_at)
           select id, digest, kind, 'latest', $4 from unnest($1::uuid[], $2::bytea[], $3::text[]) as t(id, digest, kind)
           order by id
           on conflict (message_id) do nothing
           returning message_id),
         answer as (
           select coalesce(array_agg(t.id), '{}') as ids,
                  coalesce(array_agg(ins.message_id is not null), '{}') as inserted,
                  coalesce(array_agg(coalesce(i.body_sha256, '')), '{}') as digests
           from unnest($1::uuid[]) as t(id)
           left join ins on ins.message_id = t.id
           left join inbox i on i.message_id = t.id)
         select answer.ids, answer.inserted, answer.digests, (null::held_row_v2).* from answer
         union all
         select null, null, null, held.* from ",
            $lock_and_load,
            "($5, $6, $7, $8) as held"
        )
    };
}

/// Waiting for every lock.
const INSERT_IDS_AND_LOCK: &str = insert_ids_and!("lock_and_load_v2");
/// Waiting for none: rows of kind `blocked` say what it could not lock (the migration of
/// `try_lock_and_load`).
const INSERT_IDS_AND_TRY_LOCKS: &str = insert_ids_and!("try_lock_and_load");

/// A row of kind `blocked`: a record (by its id column) or a teacher (by `trn`).
fn blocked_from_row(row: &sqlx::postgres::PgRow, blocked: &mut Blocked) -> Result<(), StoreError> {
    let id = |column: &str| -> Result<Option<SourceId>, StoreError> {
        row.try_get::<Option<&str>, _>(column)?
            .map(|v| {
                SourceId::parse(v).ok_or_else(|| {
                    StoreError::corrupt(format!("a blocked record has an invalid {column}"))
                })
            })
            .transpose()
    };
    if let Some(id) = id("registration_id")? {
        blocked.records.insert(RecordKey::Registration(id));
    } else if let Some(id) = id("induction_period_id")? {
        blocked.records.insert(RecordKey::Claim(id));
    } else {
        let trn: &str = row.try_get("trn")?;
        let trn = Trn::parse(trn)
            .ok_or_else(|| StoreError::corrupt("a blocked teacher has an invalid trn"))?;
        blocked.teachers.insert(trn);
    }
    Ok(())
}

fn digest_of(stored: &[u8]) -> Result<[u8; 32], StoreError> {
    <[u8; 32]>::try_from(stored)
        .map_err(|_| StoreError::corrupt("a stored body digest is not 32 bytes"))
}

/// Step 2: a ledger seeded with what the locked teachers hold, the messages applied to it in
/// order, and the effects collected on the way.
struct Ledgered {
    ledger: Ledger,
    previous_versions: HashMap<Trn, u64>,
    changed: BTreeSet<RecordKey>,
    /// The teachers the batch emitted for.
    emitted_for: BTreeSet<Trn>,
    effects: Effects,
}

impl Ledgered {
    fn seeded(snapshots: Vec<Snapshot>, last: Vec<Outcome>) -> Self {
        let previous_versions = last.iter().map(|o| (o.trn.clone(), o.version)).collect();
        Self {
            ledger: Ledger::seeded(snapshots, last),
            previous_versions,
            changed: BTreeSet::new(),
            emitted_for: BTreeSet::new(),
            effects: Effects::default(),
        }
    }

    fn apply(&mut self, item: &BatchItem<'_>, now: OffsetDateTime) -> Result<Handled, StoreError> {
        let input = item.input;
        let key = input.snapshot.record.key();
        let trn = input.snapshot.record.trn().clone();
        let applied = self
            .ledger
            .apply(input.snapshot.clone(), input.cause.clone(), now);
        match &applied.admission {
            Admission::Latest { affected } => {
                self.changed.insert(key.clone());
                for moved_from in affected.iter().filter(|t| **t != trn) {
                    self.effects.input(moved_from, "moved_away", input, &key);
                }
                self.effects.input(&trn, "applied", input, &key);
            }
            Admission::Stale | Admission::AlreadyHeld => {
                self.effects.stale(input.message_id());
                self.effects.input(&trn, "stale", input, &key);
            }
        }
        let mut emitted = Vec::new();
        for outcome in &applied.outcomes {
            let message = OutcomeMessage::new(Uuid::new_v4(), outcome);
            self.effects
                .outcome(outcome, "emitted", &message, item.traceparent.clone())?;
            emitted.push(outcome.status());
            self.emitted_for.insert(outcome.trn.clone());
        }
        Ok(Handled::Applied {
            admission: applied.admission,
            emitted,
        })
    }

    /// The effects: the latest snapshot of every changed record, and each teacher's last
    /// outcome replacing the version read under its lock.
    fn finish(mut self) -> Effects {
        for key in &self.changed {
            if let Some(snapshot) = self.ledger.record(key) {
                self.effects.record(snapshot);
            }
        }
        for trn in &self.emitted_for {
            let outcome = self
                .ledger
                .last_outcome(trn)
                .expect("an emitted teacher has a last outcome");
            let previous = self.previous_versions.get(trn).copied().unwrap_or(0);
            self.effects.teacher(outcome, previous);
        }
        self.effects
    }
}
