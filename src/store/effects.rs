//! The one way effects are written: records, teachers, outbox rows, history and stale
//! admissions, as columns bound to one statement of data-modifying CTEs over `UNNEST`ed arrays
//! (one round trip), which also wakes the relay when it wrote outcomes. Batches of input
//! messages and the overdue sweep both write through here.

use sqlx::postgres::{PgArguments, Postgres};
use sqlx::query::Query;
use sqlx::{PgConnection, Row};
use time::OffsetDateTime;
use uuid::Uuid;

use super::OUTBOX_CHANNEL;
use super::error::StoreError;
use super::outbox::OutboxRow;
use super::records::split_instant;
use crate::domain::{
    InductionResult, Outcome, Programme, Record, RecordKey, Snapshot, SourceId, Trn,
};
use crate::messages::{Input, OutcomeMessage};

type Statement<'q> = Query<'q, Postgres, PgArguments>;

/// The statement. Placeholders: `$1` the time; then each column group in the order
/// `Effects::write` binds them (registrations `$2..$13`, claims `$14..$25`, teachers
/// `$26..$31`, outbox `$32..$37`, history `$38..$47`, stale `$48`); `$49` the relay's channel;
/// `$50` and `$51` the origins of the registrations and of the claims; `$52` the outbox rows to
/// mark published and `$53` the lease of the new ones ([`Publishing`]).
///
/// Teachers: a new one (previous version 0) is inserted, a known one updated where its stored
/// version is still the one read under its lock, each joined to its row by TRN; a teacher that
/// is neither is not counted, and the write fails. (An upsert whose conflict guard looked the
/// previous version up in the whole array, once for every updated teacher, cost the square of
/// the batch: 4 of a 31 ms write of 420 messages.) A teacher's last outcome is its outbox row
/// of that version (ARCHITECTURE decision 33): `last_outcome` is left null, and cleared where a
/// release before this one had filled it.
///
/// Outbox rows are looked up by id and TRN through the unique indexes: "not yet published" is
/// written so that the partial indexes cannot serve those lookups (see `store::outbox`).
const WRITE: &str = "with
 reg as (
   insert into registrations (registration_id, trn, school_urn, started_on, finished_on, appropriate_body_id,
       training_programme, lead_provider_id, deleted, occurred_at, occurred_at_ns, message_id, origin)
   select * from unnest($2::text[], $3::text[], $4::int4[], $5::date[], $6::date[], $7::text[], $8::text[],
       $9::text[], $10::bool[], $11::timestamptz[], $12::int2[], $13::uuid[], $50::text[])
   on conflict (registration_id) do update set trn = excluded.trn, school_urn = excluded.school_urn,
     started_on = excluded.started_on, finished_on = excluded.finished_on,
     appropriate_body_id = excluded.appropriate_body_id, training_programme = excluded.training_programme,
     lead_provider_id = excluded.lead_provider_id, deleted = excluded.deleted,
     occurred_at = excluded.occurred_at, occurred_at_ns = excluded.occurred_at_ns, message_id = excluded.message_id,
     origin = excluded.origin
   returning 1),
 ip as (
   insert into induction_periods (induction_period_id, trn, appropriate_body_id, started_on, finished_on,
       training_programme, number_of_terms_tenths, outcome, deleted, occurred_at, occurred_at_ns, message_id, origin)
   select * from unnest($14::text[], $15::text[], $16::text[], $17::date[], $18::date[], $19::text[], $20::int2[],
       $21::text[], $22::bool[], $23::timestamptz[], $24::int2[], $25::uuid[], $51::text[])
   on conflict (induction_period_id) do update set trn = excluded.trn,
     appropriate_body_id = excluded.appropriate_body_id, started_on = excluded.started_on,
     finished_on = excluded.finished_on, training_programme = excluded.training_programme,
     number_of_terms_tenths = excluded.number_of_terms_tenths, outcome = excluded.outcome,
     deleted = excluded.deleted, occurred_at = excluded.occurred_at,
     occurred_at_ns = excluded.occurred_at_ns, message_id = excluded.message_id, origin = excluded.origin
   returning 1),
 tch_new as (
   insert into teachers (trn, version, status, provisional_since, overdue, updated_at)
   select x.t, x.v, x.s, x.p, x.o, $1
   from unnest($26::text[], $27::int8[], $28::text[], $29::timestamptz[], $30::bool[], $31::int8[])
       as x(t, v, s, p, o, prev)
   where x.prev = 0
   on conflict (trn) do nothing
   returning 1),
 tch_next as (
   update teachers set version = x.v, status = x.s, provisional_since = x.p, overdue = x.o,
     last_outcome = null, updated_at = $1
   from unnest($26::text[], $27::int8[], $28::text[], $29::timestamptz[], $30::bool[], $31::int8[])
       as x(t, v, s, p, o, prev)
   where x.prev > 0 and teachers.trn = x.t and teachers.version = x.prev
   returning 1),
 mrk as (
   update outbox set published_at = $1
   where id = any($52::int8[]) and coalesce(published_at, 'infinity') = 'infinity'
   returning trn),
 obx as (
   insert into outbox (outcome_id, trn, version, routing_key, body, traceparent, created_at, lease_until)
   select x.i, x.t, x.v, x.k, x.b, x.p, $1,
     case when $53::timestamptz is not null and not exists (
       select 1 from outbox e where e.trn = x.t and coalesce(e.published_at, 'infinity') = 'infinity' and e.version < x.v and e.id <> all($52::int8[])
     ) then $53::timestamptz end
   from unnest($32::uuid[], $33::text[], $34::int8[], $35::text[], $36::bytea[], $37::text[])
       with ordinality as x(i, t, v, k, b, p, n)
   order by x.n
   returning id, outcome_id, lease_until is not null as leased),
 his as (
   insert into history (trn, at, event, message_id, message_type, record_kind, record_id, outcome_id, version, status,
       published_by)
   select x.t, $1, x.e, x.m, x.mt, x.rk, x.ri, x.o, x.v, x.s, x.pb
   from unnest($38::text[], $39::text[], $40::uuid[], $41::text[], $42::text[], $43::text[], $44::uuid[],
       $45::int8[], $46::text[], $47::text[]) with ordinality as x(t, e, m, mt, rk, ri, o, v, s, pb, n)
   order by x.n
   returning 1),
 stl as (update inbox set admission = 'stale' where message_id = any($48) returning 1)
 select (select count(*) from tch_new) + (select count(*) from tch_next) as teachers,
        (select count(*) from obx) as outcomes,
        (select count(*) from reg) + (select count(*) from ip) + (select count(*) from his) + (select count(*) from stl) as other,
        (select count(*) from mrk) as marked,
        (select coalesce(array_agg(id order by id), '{}') from obx where leased) as leased_ids,
        (select coalesce(array_agg(outcome_id order by id), '{}') from obx where leased) as leased_outcomes,
        case when exists (select 1 from obx where not leased)
               or exists (select 1 from mrk join outbox o on o.trn = mrk.trn and coalesce(o.published_at, 'infinity') = 'infinity' and o.lease_until is null)
             then pg_notify($49, '') end as notified";

/// Everything one transaction writes.
#[derive(Default)]
pub(super) struct Effects {
    records: RecordColumns,
    teachers: TeacherColumns,
    outbox: OutboxColumns,
    history: History,
    stale: Vec<Uuid>,
}

impl Effects {
    /// A record's latest snapshot, to upsert.
    pub(super) fn record(&mut self, snapshot: &Snapshot) {
        self.records.push(snapshot);
    }

    /// An outcome: into the outbox (with the trace context of its cause) and the history.
    pub(super) fn outcome(
        &mut self,
        outcome: &Outcome,
        event: &str,
        message: &OutcomeMessage,
        traceparent: Option<String>,
    ) -> Result<(), StoreError> {
        self.history.outcome(&outcome.trn, event, message);
        self.outbox.push(message, traceparent)
    }

    /// A teacher's new last outcome, replacing version `previous` (0 for a new teacher): the
    /// statement writes it only if the stored version is still `previous`. Its message is the
    /// outbox row of its version, which [`Effects::outcome`] wrote.
    pub(super) fn teacher(&mut self, outcome: &Outcome, previous: u64) {
        self.teachers.push(outcome, previous);
    }

    /// A history line for an input message.
    pub(super) fn input(&mut self, trn: &Trn, event: &str, input: &Input, key: &RecordKey) {
        self.history.input(trn, event, input, key);
    }

    /// An input message admitted as stale.
    pub(super) fn stale(&mut self, message_id: Uuid) {
        self.stale.push(message_id);
    }

    /// Writes everything in one statement. Fails (and so rolls the transaction back) if a
    /// teacher's stored version was not the one the caller read under its lock. With
    /// `publishing`, it also marks what the caller's lane published before, and leases the new
    /// outcomes the lane may publish itself; it returns those.
    pub(super) async fn write(
        mut self,
        conn: &mut PgConnection,
        now: OffsetDateTime,
        publishing: &Publishing<'_>,
    ) -> Result<Written, StoreError> {
        let expected_teachers = self.teachers.trn.len() as i64;
        let origins = self.records.take_origins();
        // What a lane may publish itself, kept for it before the columns are bound.
        let candidates = match publishing.lease_until {
            Some(_) => self.outbox.rows(now),
            None => Vec::new(),
        };
        let statement = sqlx::query(WRITE).bind(now);
        let statement = self.records.bind(statement);
        let statement = self.teachers.bind(statement);
        let statement = self.outbox.bind(statement);
        let statement = self.history.bind(statement);
        let row = statement
            .bind(self.stale)
            .bind(OUTBOX_CHANNEL)
            .bind(origins.0)
            .bind(origins.1)
            .bind(publishing.confirmed)
            .bind(publishing.lease_until)
            .fetch_one(&mut *conn)
            .await?;
        let written: i64 = row.try_get("teachers")?;
        if written != expected_teachers {
            return Err(StoreError::corrupt(
                "a teacher's version did not follow on from the one read under its lock",
            ));
        }
        let ids: Vec<i64> = row.try_get("leased_ids")?;
        let outcome_ids: Vec<Uuid> = row.try_get("leased_outcomes")?;
        let mut by_outcome: std::collections::HashMap<Uuid, i64> =
            outcome_ids.into_iter().zip(ids).collect();
        // In the order written, which is each teacher's versions in order.
        let leased = candidates
            .into_iter()
            .filter_map(|mut leased| {
                leased.row.id = by_outcome.remove(&leased.row.outcome_id)?;
                Some(leased)
            })
            .collect();
        Ok(Written {
            marked: row.try_get::<i64, _>("marked")? as u64,
            leased,
        })
    }
}

/// What a lane that publishes its own outcomes asks of a write (see the `outbox.lease_until`
/// migration). The default asks nothing: the outcomes are the relay's.
#[derive(Debug, Clone, Default)]
pub struct Publishing<'a> {
    /// Outbox rows the lane published before and the broker confirmed: marked published by the
    /// same statement (which wakes the relay if one of their teachers has later versions waiting
    /// for it: another lane's, after a record moved between teachers).
    pub confirmed: &'a [i64],
    /// Lease the new outcomes until then, for the lane to publish after the commit, except a
    /// teacher's whose earlier outcomes are not all published (or among `confirmed`): those go
    /// to the relay, which keeps each teacher's versions in order.
    pub lease_until: Option<OffsetDateTime>,
}

/// A `Publishing` known now, for [`Store::apply_batch_publishing`](super::Store), which also
/// takes one the lane is still waiting for.
impl<'a> IntoFuture for Publishing<'a> {
    type Output = Self;
    type IntoFuture = std::future::Ready<Self>;

    fn into_future(self) -> Self::IntoFuture {
        std::future::ready(self)
    }
}

/// What a write did for a lane that publishes its own outcomes.
#[derive(Debug, Default)]
pub struct Written {
    /// Rows of `Publishing::confirmed` marked published now (others were already).
    pub marked: u64,
    /// The new outcomes leased to the lane, each teacher's versions in order.
    pub leased: Vec<LeasedOutcome>,
}

/// An outcome leased to the lane that wrote it.
#[derive(Debug, Clone)]
pub struct LeasedOutcome {
    /// The row, as the relay would publish it.
    pub row: OutboxRow,
    /// Its teacher.
    pub trn: String,
}

/// The latest snapshots of registrations and claims, as columns.
#[derive(Default)]
struct RecordColumns {
    r: RegistrationColumns,
    c: ClaimColumns,
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
    origin: Vec<&'static str>,
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
    origin: Vec<&'static str>,
}

impl RecordColumns {
    fn push(&mut self, snapshot: &Snapshot) {
        let (occurred_at, ns) = split_instant(snapshot.stamp.occurred_at);
        match &snapshot.record {
            Record::Registration(x) => {
                let r = &mut self.r;
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
                r.origin.push(x.origin.as_str());
            }
            Record::Claim(x) => {
                let c = &mut self.c;
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
                c.origin.push(x.origin.as_str());
            }
        }
    }

    /// The origins of the registrations and of the claims, bound after the rest (`$50`, `$51`).
    fn take_origins(&mut self) -> (Vec<&'static str>, Vec<&'static str>) {
        (
            std::mem::take(&mut self.r.origin),
            std::mem::take(&mut self.c.origin),
        )
    }

    /// Binds `$2..$25`.
    fn bind(self, q: Statement<'_>) -> Statement<'_> {
        let (r, c) = (self.r, self.c);
        q.bind(r.id)
            .bind(r.trn)
            .bind(r.urn)
            .bind(r.started)
            .bind(r.finished)
            .bind(r.ab)
            .bind(r.programme)
            .bind(r.lead_provider)
            .bind(r.deleted)
            .bind(r.at)
            .bind(r.ns)
            .bind(r.message)
            .bind(c.id)
            .bind(c.trn)
            .bind(c.ab)
            .bind(c.started)
            .bind(c.finished)
            .bind(c.programme)
            .bind(c.terms)
            .bind(c.outcome)
            .bind(c.deleted)
            .bind(c.at)
            .bind(c.ns)
            .bind(c.message)
    }
}

/// Each teacher's last outcome, with the version it must replace.
#[derive(Default)]
struct TeacherColumns {
    trn: Vec<String>,
    version: Vec<i64>,
    status: Vec<String>,
    since: Vec<Option<OffsetDateTime>>,
    overdue: Vec<bool>,
    previous: Vec<i64>,
}

impl TeacherColumns {
    fn push(&mut self, outcome: &Outcome, previous: u64) {
        self.trn.push(outcome.trn.as_str().to_owned());
        self.version.push(outcome.version as i64);
        self.status.push(outcome.status().as_str().to_owned());
        self.since.push(outcome.provisional_since);
        self.overdue.push(outcome.overdue);
        self.previous.push(previous as i64);
    }

    /// Binds `$26..$31`.
    fn bind(self, q: Statement<'_>) -> Statement<'_> {
        q.bind(self.trn)
            .bind(self.version)
            .bind(self.status)
            .bind(self.since)
            .bind(self.overdue)
            .bind(self.previous)
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
    fn push(
        &mut self,
        message: &OutcomeMessage,
        traceparent: Option<String>,
    ) -> Result<(), StoreError> {
        self.id.push(message.outcome_id);
        self.trn.push(message.trn.clone());
        self.version.push(message.version as i64);
        self.key.push(message.routing_key());
        self.body
            .push(serde_json::to_vec(message).map_err(|e| StoreError::corrupt(e.to_string()))?);
        self.traceparent.push(traceparent);
        Ok(())
    }

    /// The rows as the relay would read them back (their ids are not known yet), created at
    /// `now`.
    fn rows(&self, now: OffsetDateTime) -> Vec<LeasedOutcome> {
        (0..self.id.len())
            .map(|i| LeasedOutcome {
                row: OutboxRow {
                    id: 0,
                    outcome_id: self.id[i],
                    routing_key: self.key[i].clone(),
                    body: self.body[i].clone(),
                    traceparent: self.traceparent[i].clone(),
                    created_at: now,
                },
                trn: self.trn[i].clone(),
            })
            .collect()
    }

    /// Binds `$32..$37`.
    fn bind(self, q: Statement<'_>) -> Statement<'_> {
        q.bind(self.id)
            .bind(self.trn)
            .bind(self.version)
            .bind(self.key)
            .bind(self.body)
            .bind(self.traceparent)
    }
}

/// History rows, in the order they happened.
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
    published_by: Vec<Option<String>>,
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
        self.published_by.push(input.publisher.clone());
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
        self.published_by.push(None);
    }

    /// Binds `$38..$47`.
    fn bind(self, q: Statement<'_>) -> Statement<'_> {
        q.bind(self.trn)
            .bind(self.event)
            .bind(self.message_id)
            .bind(self.message_type)
            .bind(self.record_kind)
            .bind(self.record_id)
            .bind(self.outcome_id)
            .bind(self.version)
            .bind(self.status)
            .bind(self.published_by)
    }
}
