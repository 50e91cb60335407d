//! Per-teacher state (the last outcome emitted) and history.

use sqlx::types::Json;
use sqlx::{PgConnection, Row};
use time::OffsetDateTime;
use uuid::Uuid;

use super::error::StoreError;
use super::records;
use crate::domain::{Outcome, Snapshot, Trn};
use crate::messages::{Input, OutcomeMessage};

/// The last outcome emitted for a teacher, as it was published.
async fn last_outcome_message(
    conn: &mut PgConnection,
    trn: &Trn,
) -> Result<Option<OutcomeMessage>, StoreError> {
    let stored: Option<Json<OutcomeMessage>> =
        sqlx::query_scalar("select last_outcome from teachers where trn = $1")
            .bind(trn.as_str())
            .fetch_optional(conn)
            .await?;
    Ok(stored.map(|Json(message)| message))
}

/// The last outcome emitted for a teacher, read back into the domain.
pub async fn last_outcome(
    conn: &mut PgConnection,
    trn: &Trn,
) -> Result<Option<Outcome>, StoreError> {
    last_outcome_message(conn, trn)
        .await?
        .map(|message| {
            message
                .to_domain()
                .map_err(|e| StoreError::corrupt(e.to_string()))
        })
        .transpose()
}

/// Saves an emitted outcome as the teacher's last.
pub async fn save(
    conn: &mut PgConnection,
    outcome: &Outcome,
    message: &OutcomeMessage,
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    sqlx::query(
        "insert into teachers (trn, version, status, provisional_since, overdue, last_outcome, updated_at)
         values ($1, $2, $3, $4, $5, $6, $7)
         on conflict (trn) do update set version = excluded.version, status = excluded.status,
           provisional_since = excluded.provisional_since, overdue = excluded.overdue,
           last_outcome = excluded.last_outcome, updated_at = excluded.updated_at
         where teachers.version + 1 = excluded.version",
    )
    .bind(outcome.trn.as_str())
    .bind(outcome.version as i64)
    .bind(outcome.status().as_str())
    .bind(outcome.provisional_since)
    .bind(outcome.overdue)
    .bind(Json(message))
    .bind(now)
    .execute(conn)
    .await
    .map_err(StoreError::from)
    .and_then(|done| {
        if done.rows_affected() == 1 {
            Ok(())
        } else {
            Err(StoreError::corrupt("teacher version did not follow on (concurrent writer?)"))
        }
    })
}

/// Appends a history entry for a teacher.
pub async fn record_history(
    conn: &mut PgConnection,
    trn: &Trn,
    now: OffsetDateTime,
    event: &str,
    input: Option<&Input>,
    outcome: Option<&OutcomeMessage>,
) -> Result<(), StoreError> {
    let key = input.map(|i| i.snapshot.record.key());
    sqlx::query(
        "insert into history (trn, at, event, message_id, message_type, record_kind, record_id, outcome_id, version, status)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(trn.as_str())
    .bind(now)
    .bind(event)
    .bind(input.map(Input::message_id))
    .bind(input.map(|i| i.cause.message_type.as_str()))
    .bind(key.as_ref().map(|k| k.kind()))
    .bind(key.as_ref().map(|k| k.id().as_str()))
    .bind(outcome.map(|o| o.outcome_id))
    .bind(outcome.map(|o| o.version as i64))
    .bind(outcome.map(|o| o.status.as_str()))
    .execute(conn)
    .await?;
    Ok(())
}

/// One line of a teacher's history.
#[derive(Debug, Clone)]
pub struct HistoryEntry {
    /// When it happened.
    pub at: OffsetDateTime,
    /// `applied`, `stale`, `moved_away`, `emitted` or `swept`.
    pub event: String,
    /// The input message, for applied and stale snapshots.
    pub message_id: Option<Uuid>,
    /// Its type.
    pub message_type: Option<String>,
    /// `registration` or `claim`.
    pub record_kind: Option<String>,
    /// The record's id.
    pub record_id: Option<String>,
    /// The outcome, for emissions.
    pub outcome_id: Option<Uuid>,
    /// Its version.
    pub version: Option<i64>,
    /// Its status.
    pub status: Option<String>,
}

/// Everything held about one teacher, for `explain`.
#[derive(Debug, Clone)]
pub struct Explanation {
    /// The latest snapshot of every record that counts for the teacher.
    pub records: Vec<Snapshot>,
    /// The last outcome emitted.
    pub last_outcome: Option<OutcomeMessage>,
    /// What was applied and emitted, oldest first.
    pub history: Vec<HistoryEntry>,
}

impl super::Store {
    /// Everything held about one teacher.
    pub async fn explain(&self, trn: &Trn) -> Result<Explanation, StoreError> {
        let mut conn = self.pool().acquire().await?;
        let records = records::for_teacher(&mut conn, trn).await?;
        let last_outcome = last_outcome_message(&mut conn, trn).await?;
        let history = sqlx::query(
            "select at, event, message_id, message_type, record_kind, record_id, outcome_id, version, status
             from history where trn = $1 order by id",
        )
        .bind(trn.as_str())
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|row| {
            Ok(HistoryEntry {
                at: row.try_get("at")?,
                event: row.try_get("event")?,
                message_id: row.try_get("message_id")?,
                message_type: row.try_get("message_type")?,
                record_kind: row.try_get("record_kind")?,
                record_id: row.try_get("record_id")?,
                outcome_id: row.try_get("outcome_id")?,
                version: row.try_get("version")?,
                status: row.try_get("status")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
        Ok(Explanation {
            records,
            last_outcome,
            history,
        })
    }
}
