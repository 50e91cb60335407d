//! Applying many input messages in one transaction: set-based reads and writes (`UNNEST`),
//! teachers locked in TRN order, and the messages applied in order to a `Ledger` seeded with
//! everything they can touch, exactly as `simulate` applies them.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sqlx::types::Json;
use sqlx::{PgConnection, Row};
use time::OffsetDateTime;
use uuid::Uuid;

use super::error::StoreError;
use super::records::{self, split_instant};
use super::{Handled, OUTBOX_CHANNEL, Store};
use crate::domain::{
    Admission, InductionResult, Ledger, Outcome, Programme, Record, RecordKey, Snapshot, SourceId,
    Trn,
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
        let mut tx = self.pool().begin().await?;
        let results = apply_in(&mut tx, items, now).await?;
        tx.commit().await?;
        Ok(results)
    }
}

async fn apply_in(
    conn: &mut PgConnection,
    items: &[BatchItem<'_>],
    now: OffsetDateTime,
) -> Result<Vec<Handled>, StoreError> {
    let mut results: Vec<Option<Handled>> = vec![None; items.len()];

    // 1. The inbox decides duplicates and reuse. Within the batch, the first occurrence of a
    //    message id stands for it; later ones compare with the digest accepted for that id.
    let mut first: HashMap<Uuid, usize> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        first.entry(item.input.message_id()).or_insert(i);
    }
    let firsts: Vec<usize> = {
        let mut v: Vec<usize> = first.values().copied().collect();
        v.sort_unstable();
        v
    };
    // One round trip: insert the new ids, and read the digests of those already accepted.
    let mut inserted: BTreeSet<Uuid> = BTreeSet::new();
    let mut accepted_digest: HashMap<Uuid, Vec<u8>> = HashMap::new();
    for row in sqlx::query(
        "with ins as (
           insert into inbox (message_id, body_sha256, message_type, admission, received_at)
           select id, digest, kind, 'latest', $4 from unnest($1::uuid[], $2::bytea[], $3::text[]) as t(id, digest, kind)
           on conflict (message_id) do nothing
           returning message_id)
         select t.id, ins.message_id is not null as inserted, i.body_sha256
         from unnest($1::uuid[]) as t(id)
         left join ins on ins.message_id = t.id
         left join inbox i on i.message_id = t.id",
    )
    .bind(firsts.iter().map(|&i| items[i].input.message_id()).collect::<Vec<_>>())
    .bind(firsts.iter().map(|&i| items[i].digest.to_vec()).collect::<Vec<_>>())
    .bind(firsts.iter().map(|&i| items[i].input.cause.message_type.as_str()).collect::<Vec<_>>())
    .bind(now)
    .fetch_all(&mut *conn)
    .await?
    {
        let id: Uuid = row.try_get("id")?;
        if row.try_get::<bool, _>("inserted")? {
            inserted.insert(id);
        } else if let Some(digest) = row.try_get::<Option<Vec<u8>>, _>("body_sha256")? {
            accepted_digest.insert(id, digest);
        }
    }
    // An id another transaction inserted while this statement ran is not in its snapshot: read
    // those digests again with a new statement, which sees the other transaction's commit.
    let unresolved: Vec<Uuid> = first
        .keys()
        .filter(|id| !inserted.contains(id) && !accepted_digest.contains_key(id))
        .copied()
        .collect();
    if !unresolved.is_empty() {
        for row in
            sqlx::query("select message_id, body_sha256 from inbox where message_id = any($1)")
                .bind(&unresolved)
                .fetch_all(&mut *conn)
                .await?
        {
            accepted_digest.insert(row.try_get("message_id")?, row.try_get("body_sha256")?);
        }
    }
    let mut to_apply = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let id = item.input.message_id();
        let is_first = first[&id] == i;
        if is_first && inserted.contains(&id) {
            to_apply.push(i);
            continue;
        }
        let accepted = accepted_digest
            .get(&id)
            .cloned()
            .unwrap_or_else(|| items[first[&id]].digest.to_vec());
        results[i] = Some(if accepted == item.digest {
            Handled::Duplicate
        } else {
            Handled::Reused
        });
    }
    if to_apply.is_empty() {
        return Ok(results
            .into_iter()
            .map(|r| r.expect("every item decided"))
            .collect());
    }

    // 2. Lock the batch's records, then every teacher they can touch (each snapshot's TRN and
    //    the TRN its record counts for now). Every writer of a record holds the record's lock, so
    //    once we hold it the record cannot move or appear under us. All transactions take record
    //    locks before teacher locks, each kind in ascending order, so they cannot deadlock.
    let keys: Vec<RecordKey> = to_apply
        .iter()
        .map(|&i| items[i].input.snapshot.record.key())
        .collect();
    lock_records(conn, &keys).await?;
    let mut teachers: BTreeSet<Trn> = to_apply
        .iter()
        .map(|&i| items[i].input.snapshot.record.trn().clone())
        .collect();
    teachers.extend(held_trns(conn, &keys).await?);
    lock_teachers(conn, &teachers).await?;

    // 3. Load what the locked teachers hold and apply the batch in order.
    let trns: Vec<String> = teachers.iter().map(|t| t.as_str().to_owned()).collect();
    let snapshots = records::for_teachers(conn, &trns).await?;
    let last = last_outcomes(conn, &trns).await?;
    let previous_versions: HashMap<Trn, u64> =
        last.iter().map(|o| (o.trn.clone(), o.version)).collect();
    let mut ledger = Ledger::seeded(snapshots, last);
    let mut changed: BTreeSet<RecordKey> = BTreeSet::new();
    let mut outbox: Vec<(OutcomeMessage, Option<String>)> = Vec::new();
    let mut history = History::default();
    let mut stale: Vec<Uuid> = Vec::new();
    for &i in &to_apply {
        let input = items[i].input;
        let key = input.snapshot.record.key();
        let trn = input.snapshot.record.trn().clone();
        let applied = ledger.apply(input.snapshot.clone(), input.cause.clone(), now);
        match &applied.admission {
            Admission::Latest { affected } => {
                changed.insert(key.clone());
                for moved_from in affected.iter().filter(|t| **t != trn) {
                    history.input(moved_from, "moved_away", input, &key);
                }
                history.input(&trn, "applied", input, &key);
            }
            Admission::Stale | Admission::AlreadyHeld => {
                stale.push(input.message_id());
                history.input(&trn, "stale", input, &key);
            }
        }
        let mut statuses = Vec::new();
        for outcome in &applied.outcomes {
            let message = OutcomeMessage::new(Uuid::new_v4(), outcome);
            history.outcome(&outcome.trn, "emitted", &message);
            statuses.push(outcome.status());
            outbox.push((message, items[i].traceparent.clone()));
        }
        results[i] = Some(Handled::Applied {
            admission: applied.admission,
            emitted: statuses,
        });
    }

    // 4. Write every effect with one statement.
    let latest: Vec<&Snapshot> = changed.iter().filter_map(|k| ledger.record(k)).collect();
    let mut final_outcomes: BTreeMap<Trn, &OutcomeMessage> = BTreeMap::new();
    for (message, _) in &outbox {
        final_outcomes.insert(
            Trn::parse(&message.trn).expect("an emitted TRN is valid"),
            message,
        );
    }
    let teachers = TeacherColumns::new(&final_outcomes, &previous_versions, &ledger)?;
    let outbox = OutboxColumns::new(&outbox)?;
    write_effects(conn, &latest, teachers, outbox, history, stale, now).await?;
    Ok(results
        .into_iter()
        .map(|r| r.expect("every item decided"))
        .collect())
}

/// The TRNs the given records count for now (records not yet held are left out).
async fn held_trns(
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

/// Takes the records' advisory locks (class 1, keyed by a hash of kind and id) in ascending
/// key order. A hash collision only makes two records share a lock.
async fn lock_records(conn: &mut PgConnection, keys: &[RecordKey]) -> Result<(), StoreError> {
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

/// Takes the teachers' advisory locks in ascending TRN order (a TRN is its own lock key).
pub(crate) async fn lock_teachers(
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

async fn last_outcomes(
    conn: &mut PgConnection,
    trns: &[String],
) -> Result<Vec<Outcome>, StoreError> {
    let stored: Vec<Json<OutcomeMessage>> =
        sqlx::query_scalar("select last_outcome from teachers where trn = any($1)")
            .bind(trns)
            .fetch_all(&mut *conn)
            .await?;
    stored
        .into_iter()
        .map(|Json(m)| {
            m.to_domain()
                .map_err(|e| StoreError::corrupt(e.to_string()))
        })
        .collect()
}

/// Writes records, teachers, outbox, history and stale admissions in one statement (one round
/// trip), and wakes the relay when outcomes were written.
async fn write_effects(
    conn: &mut PgConnection,
    latest: &[&Snapshot],
    t: TeacherColumns,
    o: OutboxColumns,
    h: History,
    stale: Vec<Uuid>,
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    let (r, c) = record_columns(latest);
    let expected_teachers = t.trn.len() as i64;
    let row = sqlx::query(
        "with
         reg as (
           insert into registrations (registration_id, trn, school_urn, started_on, finished_on, appropriate_body_id,
               training_programme, lead_provider_id, deleted, occurred_at, occurred_at_ns, message_id)
           select * from unnest($2::text[], $3::text[], $4::int4[], $5::date[], $6::date[], $7::text[], $8::text[],
               $9::text[], $10::bool[], $11::timestamptz[], $12::int2[], $13::uuid[])
           on conflict (registration_id) do update set trn = excluded.trn, school_urn = excluded.school_urn,
             started_on = excluded.started_on, finished_on = excluded.finished_on,
             appropriate_body_id = excluded.appropriate_body_id, training_programme = excluded.training_programme,
             lead_provider_id = excluded.lead_provider_id, deleted = excluded.deleted,
             occurred_at = excluded.occurred_at, occurred_at_ns = excluded.occurred_at_ns, message_id = excluded.message_id
           returning 1),
         ip as (
           insert into induction_periods (induction_period_id, trn, appropriate_body_id, started_on, finished_on,
               training_programme, number_of_terms_tenths, outcome, deleted, occurred_at, occurred_at_ns, message_id)
           select * from unnest($14::text[], $15::text[], $16::text[], $17::date[], $18::date[], $19::text[], $20::int2[],
               $21::text[], $22::bool[], $23::timestamptz[], $24::int2[], $25::uuid[])
           on conflict (induction_period_id) do update set trn = excluded.trn,
             appropriate_body_id = excluded.appropriate_body_id, started_on = excluded.started_on,
             finished_on = excluded.finished_on, training_programme = excluded.training_programme,
             number_of_terms_tenths = excluded.number_of_terms_tenths, outcome = excluded.outcome,
             deleted = excluded.deleted, occurred_at = excluded.occurred_at,
             occurred_at_ns = excluded.occurred_at_ns, message_id = excluded.message_id
           returning 1),
         tch as (
           insert into teachers (trn, version, status, provisional_since, overdue, last_outcome, updated_at)
           select x.t, x.v, x.s, x.p, x.o, x.b::jsonb, $1
           from unnest($26::text[], $27::int8[], $28::text[], $29::timestamptz[], $30::bool[], $31::text[])
               as x(t, v, s, p, o, b)
           on conflict (trn) do update set version = excluded.version, status = excluded.status,
             provisional_since = excluded.provisional_since, overdue = excluded.overdue,
             last_outcome = excluded.last_outcome, updated_at = excluded.updated_at
           where teachers.version = (select y.prev from unnest($26::text[], $32::int8[]) as y(t, prev) where y.t = teachers.trn)
           returning 1),
         obx as (
           insert into outbox (outcome_id, trn, version, routing_key, body, traceparent, created_at)
           select x.i, x.t, x.v, x.k, x.b, x.p, $1
           from unnest($33::uuid[], $34::text[], $35::int8[], $36::text[], $37::bytea[], $38::text[])
               with ordinality as x(i, t, v, k, b, p, n)
           order by x.n
           returning 1),
         his as (
           insert into history (trn, at, event, message_id, message_type, record_kind, record_id, outcome_id, version, status)
           select x.t, $1, x.e, x.m, x.mt, x.rk, x.ri, x.o, x.v, x.s
           from unnest($39::text[], $40::text[], $41::uuid[], $42::text[], $43::text[], $44::text[], $45::uuid[],
               $46::int8[], $47::text[]) with ordinality as x(t, e, m, mt, rk, ri, o, v, s, n)
           order by x.n
           returning 1),
         stl as (update inbox set admission = 'stale' where message_id = any($48) returning 1)
         select (select count(*) from tch) as teachers,
                (select count(*) from obx) as outcomes,
                (select count(*) from reg) + (select count(*) from ip) + (select count(*) from his) + (select count(*) from stl) as other,
                case when (select count(*) from obx) > 0 then pg_notify($49, '') end as notified",
    )
    .bind(now)
    .bind(r.id).bind(r.trn).bind(r.urn).bind(r.started).bind(r.finished).bind(r.ab).bind(r.programme)
    .bind(r.lead_provider).bind(r.deleted).bind(r.at).bind(r.ns).bind(r.message)
    .bind(c.id).bind(c.trn).bind(c.ab).bind(c.started).bind(c.finished).bind(c.programme).bind(c.terms)
    .bind(c.outcome).bind(c.deleted).bind(c.at).bind(c.ns).bind(c.message)
    .bind(t.trn).bind(t.version).bind(t.status).bind(t.since).bind(t.overdue).bind(t.body).bind(t.previous)
    .bind(o.id).bind(o.trn).bind(o.version).bind(o.key).bind(o.body).bind(o.traceparent)
    .bind(h.trn).bind(h.event).bind(h.message_id).bind(h.message_type).bind(h.record_kind).bind(h.record_id)
    .bind(h.outcome_id).bind(h.version).bind(h.status)
    .bind(stale)
    .bind(OUTBOX_CHANNEL)
    .fetch_one(&mut *conn)
    .await?;
    let written: i64 = row.try_get("teachers")?;
    if written != expected_teachers {
        return Err(StoreError::corrupt(
            "a teacher's version did not follow on from the one read under its lock",
        ));
    }
    Ok(())
}

fn record_columns(latest: &[&Snapshot]) -> (RegistrationColumns, ClaimColumns) {
    let mut r = RegistrationColumns::default();
    let mut c = ClaimColumns::default();
    for snapshot in latest {
        let (occurred_at, ns) = split_instant(snapshot.stamp.occurred_at);
        match &snapshot.record {
            Record::Registration(x) => {
                r.id.push(x.registration_id.as_str().to_owned());
                r.trn.push(x.trn.as_str().to_owned());
                r.urn.push(x.school_urn.get() as i32);
                r.started.push(x.started_on);
                r.finished.push(x.finished_on);
                r.ab.push(x.appropriate_body_id.as_str().to_owned());
                r.programme.push(x.training_programme.as_str().to_owned());
                r.lead_provider
                    .push(x.lead_provider_id.as_ref().map(|l| l.as_str().to_owned()));
                r.deleted.push(x.deleted);
                r.at.push(occurred_at);
                r.ns.push(ns);
                r.message.push(snapshot.stamp.message_id);
            }
            Record::Claim(x) => {
                c.id.push(x.induction_period_id.as_str().to_owned());
                c.trn.push(x.trn.as_str().to_owned());
                c.ab.push(x.appropriate_body_id.as_str().to_owned());
                c.started.push(x.started_on);
                c.finished.push(x.finished_on);
                c.programme.push(
                    x.training_programme
                        .map(Programme::as_str)
                        .map(str::to_owned),
                );
                c.terms
                    .push(x.number_of_terms.map(|t| i16::from(t.tenths())));
                c.outcome
                    .push(x.outcome.map(InductionResult::as_str).map(str::to_owned));
                c.deleted.push(x.deleted);
                c.at.push(occurred_at);
                c.ns.push(ns);
                c.message.push(snapshot.stamp.message_id);
            }
        }
    }
    (r, c)
}

#[derive(Default)]
struct RegistrationColumns {
    id: Vec<String>,
    trn: Vec<String>,
    urn: Vec<i32>,
    started: Vec<time::Date>,
    finished: Vec<Option<time::Date>>,
    ab: Vec<String>,
    programme: Vec<String>,
    lead_provider: Vec<Option<String>>,
    deleted: Vec<bool>,
    at: Vec<OffsetDateTime>,
    ns: Vec<i16>,
    message: Vec<Uuid>,
}

#[derive(Default)]
struct ClaimColumns {
    id: Vec<String>,
    trn: Vec<String>,
    ab: Vec<String>,
    started: Vec<time::Date>,
    finished: Vec<Option<time::Date>>,
    programme: Vec<Option<String>>,
    terms: Vec<Option<i16>>,
    outcome: Vec<Option<String>>,
    deleted: Vec<bool>,
    at: Vec<OffsetDateTime>,
    ns: Vec<i16>,
    message: Vec<Uuid>,
}

/// Each teacher's last outcome, with the version it must replace (0 for a new teacher): the
/// database refuses a version that does not follow on from the one read under the lock.
#[derive(Default)]
struct TeacherColumns {
    trn: Vec<String>,
    version: Vec<i64>,
    previous: Vec<i64>,
    status: Vec<String>,
    since: Vec<Option<OffsetDateTime>>,
    overdue: Vec<bool>,
    body: Vec<String>,
}

impl TeacherColumns {
    fn new(
        last: &BTreeMap<Trn, &OutcomeMessage>,
        previous: &HashMap<Trn, u64>,
        ledger: &Ledger,
    ) -> Result<Self, StoreError> {
        let mut t = Self::default();
        for (trn, message) in last {
            let outcome = ledger
                .last_outcome(trn)
                .expect("an emitted teacher has a last outcome");
            t.trn.push(trn.as_str().to_owned());
            t.version.push(outcome.version as i64);
            t.previous.push(previous.get(trn).map_or(0, |v| *v as i64));
            t.status.push(outcome.status().as_str().to_owned());
            t.since.push(outcome.provisional_since);
            t.overdue.push(outcome.overdue);
            t.body.push(
                serde_json::to_string(message).map_err(|e| StoreError::corrupt(e.to_string()))?,
            );
        }
        Ok(t)
    }
}

/// Outbox rows, in emission order.
#[derive(Default)]
struct OutboxColumns {
    id: Vec<Uuid>,
    trn: Vec<String>,
    version: Vec<i64>,
    key: Vec<String>,
    body: Vec<Vec<u8>>,
    traceparent: Vec<Option<String>>,
}

impl OutboxColumns {
    fn new(outbox: &[(OutcomeMessage, Option<String>)]) -> Result<Self, StoreError> {
        let mut o = Self::default();
        for (message, traceparent) in outbox {
            o.id.push(message.outcome_id);
            o.trn.push(message.trn.clone());
            o.version.push(message.version as i64);
            o.key.push(message.routing_key());
            o.body
                .push(serde_json::to_vec(message).map_err(|e| StoreError::corrupt(e.to_string()))?);
            o.traceparent.push(traceparent.clone());
        }
        Ok(o)
    }
}

/// History rows collected during a batch.
#[derive(Default)]
struct History {
    trn: Vec<String>,
    event: Vec<String>,
    message_id: Vec<Option<Uuid>>,
    message_type: Vec<Option<String>>,
    record_kind: Vec<Option<String>>,
    record_id: Vec<Option<String>>,
    outcome_id: Vec<Option<Uuid>>,
    version: Vec<Option<i64>>,
    status: Vec<Option<String>>,
}

impl History {
    fn input(&mut self, trn: &Trn, event: &str, input: &Input, key: &RecordKey) {
        self.trn.push(trn.as_str().to_owned());
        self.event.push(event.to_owned());
        self.message_id.push(Some(input.message_id()));
        self.message_type
            .push(Some(input.cause.message_type.as_str().to_owned()));
        self.record_kind.push(Some(key.kind().to_owned()));
        self.record_id
            .push(Some(SourceId::as_str(key.id()).to_owned()));
        self.outcome_id.push(None);
        self.version.push(None);
        self.status.push(None);
    }

    fn outcome(&mut self, trn: &Trn, event: &str, message: &OutcomeMessage) {
        self.trn.push(trn.as_str().to_owned());
        self.event.push(event.to_owned());
        self.message_id.push(None);
        self.message_type.push(None);
        self.record_kind.push(None);
        self.record_id.push(None);
        self.outcome_id.push(Some(message.outcome_id));
        self.version.push(Some(message.version as i64));
        self.status.push(Some(message.status.clone()));
    }
}
