//! Reading every teacher in pages, for `verify` (the audit) and `resync`, and writing the
//! outcome of a teacher re-reconciled after a rule change.
//!
//! Pages are read in TRN order with a keyset cursor (never `offset`), so a million teachers
//! cost bounded memory and every page one index range scan. Each audit page is read in one
//! `repeatable read` snapshot: the worker writes a teacher's records and last outcome in one
//! transaction, so a page never sees one without the other, whatever runs meanwhile.

use sqlx::Row;
use time::OffsetDateTime;
use uuid::Uuid;

use super::effects::{Effects, Publishing};
use super::error::StoreError;
use super::outbox::OutboxRow;
use super::{Store, locks, records, teachers};
use crate::domain::{Outcome, Snapshot, Status, Trn, correct, reconcile};
use crate::messages::OutcomeMessage;

/// What is stored for one teacher: the latest snapshot of every record that counts for them
/// and the last outcome emitted.
#[derive(Debug, Clone)]
pub struct TeacherState {
    /// The teacher.
    pub trn: Trn,
    /// The latest snapshots of their records.
    pub records: Vec<Snapshot>,
    /// The last outcome emitted, if any.
    pub last: Option<Outcome>,
}

/// A teacher's latest outcome exactly as it was first published (its outbox row).
#[derive(Debug, Clone)]
pub struct Published {
    /// The teacher.
    pub trn: String,
    /// The outcome's outbox row: id, routing key, body bytes and trace context.
    pub row: OutboxRow,
}

/// Which teachers a resync sends.
#[derive(Debug, Clone, Default)]
pub struct ResyncFilter {
    /// Only these TRNs (all when empty).
    pub trns: Vec<String>,
    /// Only teachers whose latest outcome has one of these statuses (all when empty).
    pub statuses: Vec<String>,
}

/// The result of an audit, kept so that the worker can export it as metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditRecord {
    /// When the run started.
    pub started_at: OffsetDateTime,
    /// Teachers checked.
    pub checked: u64,
    /// Teachers whose stored outcome differs from what the rules give.
    pub differing: u64,
    /// Corrected outcomes written (`verify --emit`).
    pub emitted: u64,
}

fn parse_trn(text: &str) -> Result<Trn, StoreError> {
    Trn::parse(text).ok_or_else(|| StoreError::corrupt("a stored TRN is invalid"))
}

impl Store {
    /// The next `limit` teachers after `after` (in TRN order) that hold a record or an outcome,
    /// with what is stored for each, read in one consistent snapshot.
    pub async fn teachers_page(
        &self,
        after: Option<&Trn>,
        limit: i64,
    ) -> Result<Vec<TeacherState>, StoreError> {
        let after = after.map_or("", Trn::as_str).to_owned();
        self.bounded("a page of teachers", async move {
            let mut tx = self.pool().begin().await?;
            sqlx::query("set transaction isolation level repeatable read, read only")
                .execute(&mut *tx)
                .await?;
            let trns: Vec<String> = sqlx::query_scalar(
                "select trn from (
                   (select trn from teachers where trn > $1 order by trn limit $2)
                   union
                   (select distinct trn from registrations where trn > $1 order by trn limit $2)
                   union
                   (select distinct trn from induction_periods where trn > $1 order by trn limit $2)
                 ) as t order by trn limit $2",
            )
            .bind(&after)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
            let (snapshots, last) = records::held_by_teachers(&mut tx, &trns).await?;
            tx.commit().await?;

            let mut states = std::collections::BTreeMap::new();
            for t in &trns {
                let trn = parse_trn(t)?;
                let state = TeacherState {
                    trn: trn.clone(),
                    records: Vec::new(),
                    last: None,
                };
                states.insert(trn, state);
            }
            for snapshot in snapshots {
                states
                    .get_mut(snapshot.record.trn())
                    .ok_or_else(|| StoreError::corrupt("a record outside its page"))?
                    .records
                    .push(snapshot);
            }
            for outcome in last {
                let state = states
                    .get_mut(&outcome.trn)
                    .ok_or_else(|| StoreError::corrupt("an outcome outside its page"))?;
                state.last = Some(outcome);
            }
            Ok(states.into_values().collect())
        })
        .await
    }

    /// Re-reconciles one teacher under its lock (the lock live traffic takes) and, when the
    /// rules now give something a consumer would see as different, writes the corrected
    /// outcome as a new version with no cause (history event `reconciled`). Returns its status.
    pub async fn re_reconcile(
        &self,
        trn: &Trn,
        now: OffsetDateTime,
    ) -> Result<Option<Status>, StoreError> {
        self.bounded("a re-reconciliation", async {
            let mut tx = self.pool().begin().await?;
            locks::lock_teachers(&mut tx, &std::iter::once(trn.clone()).collect()).await?;
            let snapshots = records::for_teacher(&mut tx, trn).await?;
            let last = teachers::last_outcome(&mut tx, trn).await?;
            let Some(outcome) = correct(trn, last.as_ref(), reconcile(&snapshots), now) else {
                tx.commit().await?;
                return Ok(None);
            };
            let message = OutcomeMessage::new(Uuid::new_v4(), &outcome);
            let mut effects = Effects::default();
            effects.outcome(&outcome, "reconciled", &message, None)?;
            effects.teacher(&outcome, last.map_or(0, |l| l.version));
            effects.write(&mut tx, now, &Publishing::default()).await?;
            tx.commit().await?;
            Ok(Some(outcome.status()))
        })
        .await
    }

    /// Keeps the result of an audit run.
    pub async fn record_audit(
        &self,
        audit: &AuditRecord,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let query = sqlx::query(
            "insert into audits (started_at, finished_at, checked, differing, emitted)
             values ($1, $2, $3, $4, $5)",
        )
        .bind(audit.started_at)
        .bind(now)
        .bind(count(audit.checked))
        .bind(count(audit.differing))
        .bind(count(audit.emitted))
        .execute(self.pool());
        self.bounded("an audit record", async { Ok(query.await?) })
            .await?;
        Ok(())
    }

    /// How many teachers have an outcome that a resync with `filter` would send.
    pub async fn resync_count(&self, filter: &ResyncFilter) -> Result<u64, StoreError> {
        let query = sqlx::query_scalar(
            "select count(*) from teachers
             where (cardinality($1::text[]) = 0 or trn = any($1))
               and (cardinality($2::text[]) = 0 or status = any($2))",
        )
        .bind(&filter.trns)
        .bind(&filter.statuses)
        .fetch_one(self.pool());
        let count: i64 = self
            .bounded("a resync count", async { Ok(query.await?) })
            .await?;
        Ok(count.max(0) as u64)
    }

    /// The next `limit` teachers after `after` that `filter` selects, each with its latest
    /// outcome exactly as it was first published.
    pub async fn resync_page(
        &self,
        filter: &ResyncFilter,
        after: Option<&str>,
        limit: i64,
    ) -> Result<Vec<Published>, StoreError> {
        // The outbox keeps every outcome as published; should its row be gone (a database
        // restored without it), the teacher's stored last outcome is the same fields.
        let query = sqlx::query(
            "select t.trn, coalesce(o.id, 0) as id,
                    coalesce(o.outcome_id, (t.last_outcome->>'outcome_id')::uuid) as outcome_id,
                    coalesce(o.routing_key, 'outcome.' || t.status) as routing_key,
                    coalesce(o.body, convert_to(t.last_outcome::text, 'UTF8')) as body,
                    o.traceparent, coalesce(o.created_at, t.updated_at) as created_at
             from teachers t left join outbox o on o.trn = t.trn and o.version = t.version
             where t.trn > $1
               and (cardinality($2::text[]) = 0 or t.trn = any($2))
               and (cardinality($3::text[]) = 0 or t.status = any($3))
             order by t.trn
             limit $4",
        )
        .bind(after.unwrap_or(""))
        .bind(&filter.trns)
        .bind(&filter.statuses)
        .bind(limit)
        .fetch_all(self.pool());
        let rows = self
            .bounded("a page of outcomes to resync", async { Ok(query.await?) })
            .await?;
        rows.iter()
            .map(|row| {
                Ok(Published {
                    trn: row.try_get("trn")?,
                    row: OutboxRow::from_row(row)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(StoreError::from)
    }
}
