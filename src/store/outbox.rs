//! The transactional outbox: outcomes are written in the same transaction as the state that
//! caused them, and published by the relay afterwards.

use sqlx::{Postgres, Row, Transaction};
use time::OffsetDateTime;
use uuid::Uuid;

use super::error::StoreError;

/// One outcome waiting to be published.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    /// The row id.
    pub id: i64,
    /// The outcome id, also the AMQP `message_id`.
    pub outcome_id: Uuid,
    /// `outcome.<status>`.
    pub routing_key: String,
    /// The exact JSON bytes to publish.
    pub body: Vec<u8>,
    /// The W3C trace context of the input that caused it.
    pub traceparent: Option<String>,
    /// When it was committed.
    pub created_at: OffsetDateTime,
}

impl OutboxRow {
    /// Reads the row from a query's columns `id, outcome_id, routing_key, body, traceparent,
    /// created_at`.
    pub(super) fn from_row(row: &sqlx::postgres::PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: row.try_get("id")?,
            outcome_id: row.try_get("outcome_id")?,
            routing_key: row.try_get("routing_key")?,
            body: row.try_get("body")?,
            traceparent: row.try_get("traceparent")?,
            created_at: row.try_get("created_at")?,
        })
    }
}

/// The outbox at a glance, for `outbox status` and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxStatus {
    /// Outcomes not yet published.
    pub pending: i64,
    /// When the oldest pending outcome was committed.
    pub oldest_pending: Option<OffsetDateTime>,
    /// When an outcome was last published.
    pub last_published: Option<OffsetDateTime>,
    /// Outcomes published in all.
    pub published: i64,
}

/// A batch of outbox rows locked by one relay until it commits or rolls back.
pub struct OutboxBatch {
    tx: Transaction<'static, Postgres>,
    /// The store's operation bound, for the update and the commit.
    operation_timeout: std::time::Duration,
    /// The rows, oldest first.
    pub rows: Vec<OutboxRow>,
}

impl OutboxBatch {
    /// Marks the given rows published and releases the batch.
    pub async fn complete(
        mut self,
        published: &[i64],
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let limit = self.operation_timeout;
        super::bounded(limit, "the outbox update", async move {
            if !published.is_empty() {
                sqlx::query("update outbox set published_at = $2 where id = any($1)")
                    .bind(published)
                    .bind(now)
                    .execute(&mut *self.tx)
                    .await?;
            }
            self.tx.commit().await?;
            Ok(())
        })
        .await
    }
}

impl super::Store {
    /// Locks up to `limit` publishable outcomes: for each teacher, only the lowest unpublished
    /// version, so that versions go out in order even with several relays. Rows another relay
    /// holds are skipped.
    pub async fn claim_outbox(&self, limit: i64) -> Result<OutboxBatch, StoreError> {
        self.bounded("an outbox claim", async {
            let mut tx = self.pool().begin().await?;
            let rows = sqlx::query(
                "select o.id, o.outcome_id, o.routing_key, o.body, o.traceparent, o.created_at
                 from outbox o
                 where o.published_at is null
                   and not exists (select 1 from outbox e where e.trn = o.trn and e.published_at is null and e.version < o.version)
                 order by o.id
                 limit $1
                 for update skip locked",
            )
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(OutboxRow::from_row)
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
            Ok(OutboxBatch {
                tx,
                operation_timeout: self.operation_timeout(),
                rows,
            })
        })
        .await
    }

    /// The outbox at a glance.
    pub async fn outbox_status(&self) -> Result<OutboxStatus, StoreError> {
        let query = sqlx::query(
            "select count(*) filter (where published_at is null) as pending,
                    min(created_at) filter (where published_at is null) as oldest_pending,
                    max(published_at) as last_published,
                    count(*) filter (where published_at is not null) as published
             from outbox",
        )
        .fetch_one(self.pool());
        let row = self
            .bounded("the outbox status", async { Ok(query.await?) })
            .await?;
        Ok(OutboxStatus {
            pending: row.try_get("pending")?,
            oldest_pending: row.try_get("oldest_pending")?,
            last_published: row.try_get("last_published")?,
            published: row.try_get("published")?,
        })
    }
}
