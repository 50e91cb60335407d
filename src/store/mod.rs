//! Postgres: the latest snapshot of every record, per-teacher state, the inbox of accepted
//! message ids, the transactional outbox and the per-teacher history.
//!
//! Invariants: never imports `broker`; every effect of one input message is written in one
//! transaction; locks are taken in one order (the record, then its teachers by TRN) so that any
//! number of workers can run at once.

mod batch;
mod effects;
mod error;
mod locks;
mod outbox;
mod records;
mod teachers;

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use time::OffsetDateTime;
use uuid::Uuid;

pub use batch::BatchItem;
pub use error::StoreError;
pub use outbox::{OutboxBatch, OutboxRow, OutboxStatus};
pub use teachers::{Explanation, HistoryEntry};

use crate::domain::{Admission, Status, Trn, sweep};
use crate::messages::OutcomeMessage;
use effects::Effects;

/// The Postgres channel the outbox relay listens on.
pub const OUTBOX_CHANNEL: &str = "induction_reconciler_outbox";

/// The embedded migrations.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// What the store did with one accepted input message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// Recorded; the statuses of the outcomes written to the outbox.
    Applied {
        /// How the snapshot was admitted (`Latest`, or `Stale` for an older snapshot).
        admission: Admission,
        /// The status of each outcome written to the outbox.
        emitted: Vec<Status>,
    },
    /// This exact message was processed before.
    Duplicate,
    /// The `message_id` was accepted before with a different body.
    Reused,
}

/// A handle on the database.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    /// Connects a pool. Fails fast when the database cannot be reached.
    pub async fn connect(
        url: &SecretString,
        max_connections: u32,
        acquire_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let options: PgConnectOptions = url.expose_secret().parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(acquire_timeout)
            .connect_with(options.application_name("induction-reconciler"))
            .await?;
        Ok(Self { pool })
    }

    /// The pool, for the relay's listener and for tests.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies pending migrations.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        MIGRATOR.run(&self.pool).await.map_err(sqlx::Error::from)?;
        Ok(())
    }

    /// True when a trivial query succeeds.
    pub async fn ping(&self) -> bool {
        sqlx::query("select 1").execute(&self.pool).await.is_ok()
    }

    /// Re-emits every provisional spell older than `max_age` once with `overdue: true`, up to
    /// `limit` teachers. Safe with several workers: each teacher is re-checked under its lock.
    pub async fn sweep_overdue(
        &self,
        now: OffsetDateTime,
        max_age: time::Duration,
        limit: i64,
    ) -> Result<usize, StoreError> {
        let due: Vec<String> = sqlx::query_scalar(
            "select trn from teachers where status = 'provisional' and not overdue
             and provisional_since < $1 order by provisional_since limit $2",
        )
        .bind(now - max_age)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut swept = 0;
        for text in due {
            let trn =
                Trn::parse(&text).ok_or_else(|| StoreError::corrupt("a stored TRN is invalid"))?;
            if self.sweep_teacher(&trn, now, max_age).await? {
                swept += 1;
            }
        }
        Ok(swept)
    }

    /// Re-checks one teacher under its lock and writes its overdue outcome, if it is due.
    async fn sweep_teacher(
        &self,
        trn: &Trn,
        now: OffsetDateTime,
        max_age: time::Duration,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        locks::lock_teachers(&mut tx, &std::iter::once(trn.clone()).collect()).await?;
        let last = teachers::last_outcome(&mut tx, trn).await?;
        let Some((last, outcome)) = last.and_then(|l| sweep(&l, now, max_age).map(|o| (l, o)))
        else {
            return Ok(false);
        };
        let message = OutcomeMessage::new(Uuid::new_v4(), &outcome);
        let mut effects = Effects::default();
        effects.outcome(&outcome, "swept", &message, None)?;
        effects.teacher(&outcome, &message, last.version)?;
        effects.write(&mut tx, now).await?;
        tx.commit().await?;
        Ok(true)
    }
}

impl Store {
    /// Which of these body digests were parked before.
    pub async fn parked_before(
        &self,
        digests: &[[u8; 32]],
    ) -> Result<std::collections::HashSet<[u8; 32]>, StoreError> {
        let rows: Vec<Vec<u8>> = sqlx::query_scalar(
            "select distinct body_sha256 from parked_log where body_sha256 = any($1)",
        )
        .bind(digests.iter().map(|d| d.to_vec()).collect::<Vec<_>>())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|d| <[u8; 32]>::try_from(d.as_slice()).ok())
            .collect())
    }

    /// Records that these bodies were parked (with the broker's confirm).
    pub async fn record_parked(
        &self,
        parked: &[([u8; 32], &str)],
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        sqlx::query("insert into parked_log (body_sha256, reason, parked_at) select d, r, $3 from unnest($1::bytea[], $2::text[]) as x(d, r)")
            .bind(parked.iter().map(|(d, _)| d.to_vec()).collect::<Vec<_>>())
            .bind(parked.iter().map(|(_, r)| *r).collect::<Vec<_>>())
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// Gauges read from the database for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Gauges {
    /// Outcomes not yet published.
    pub outbox_backlog: i64,
    /// Age of the oldest unpublished outcome, in seconds.
    pub outbox_oldest_age_seconds: f64,
    /// Teachers whose last outcome is a conflict.
    pub open_conflicts: i64,
    /// Teachers in an overdue provisional spell.
    pub overdue_provisionals: i64,
}

impl Store {
    /// Reads the gauges.
    pub async fn gauges(&self) -> Result<Gauges, StoreError> {
        use sqlx::Row;
        let row = sqlx::query(
            "select (select count(*) from outbox where published_at is null) as backlog,
                    coalesce(extract(epoch from now() - (select min(created_at) from outbox where published_at is null)), 0)::float8 as oldest,
                    (select count(*) from teachers where status = 'conflict') as conflicts,
                    (select count(*) from teachers where status = 'provisional' and overdue) as overdue",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(Gauges {
            outbox_backlog: row.try_get("backlog")?,
            outbox_oldest_age_seconds: row.try_get("oldest")?,
            open_conflicts: row.try_get("conflicts")?,
            overdue_provisionals: row.try_get("overdue")?,
        })
    }
}
