//! Per-teacher state (the last outcome emitted) and history.

use sqlx::{PgConnection, Row};
use time::OffsetDateTime;
use uuid::Uuid;

use super::error::StoreError;
use super::records;
use crate::domain::{Outcome, Snapshot, Trn};
use crate::messages::OutcomeMessage;

/// The last outcome emitted for a teacher, as it was published, read as a batch reads it
/// (`held_by_v2`: the outbox row of the teacher's version, ARCHITECTURE decision 33).
async fn last_outcome_message(
    conn: &mut PgConnection,
    trn: &Trn,
) -> Result<Option<OutcomeMessage>, StoreError> {
    let stored: Option<Option<Vec<u8>>> =
        sqlx::query_scalar("select last_outcome from held_by_v2(array[$1]) where kind = 'teacher'")
            .bind(trn.as_str())
            .fetch_optional(conn)
            .await?;
    stored
        .map(|body| records::last_outcome_message(body.as_deref()))
        .transpose()
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

/// One line of a teacher's history.
#[derive(Debug, Clone)]
pub struct HistoryEntry {
    /// When it happened.
    pub at: OffsetDateTime,
    /// `applied`, `stale`, `moved_away`, `emitted`, `swept` or `reconciled`.
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
    /// The RabbitMQ user the input message was judged to come from (its AMQP `user_id`, or the
    /// original publisher of an operator's replay).
    pub published_by: Option<String>,
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
        self.bounded("an explanation", async {
            let mut conn = self.pool().acquire().await?;
            let records = records::for_teacher(&mut conn, trn).await?;
            let last_outcome = last_outcome_message(&mut conn, trn).await?;
            let history = sqlx::query(
                "select at, event, message_id, message_type, record_kind, record_id, outcome_id, version, status,
                        published_by
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
                    published_by: row.try_get("published_by")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
            Ok(Explanation {
                records,
                last_outcome,
                history,
            })
        })
        .await
    }
}
