//! Postgres: the latest snapshot of every record, per-teacher state, the inbox of accepted
//! message ids, the transactional outbox and the per-teacher history.
//!
//! Invariants: never imports `broker`; every effect of one input message is written in one
//! transaction; locks are taken in one order (the record, then its teachers by TRN) so that any
//! number of workers can run at once.

mod audit;
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

pub use audit::{AuditRecord, Published, ResyncFilter, TeacherState};
pub use batch::{BatchItem, Contention};
pub use effects::{LeasedOutcome, Publishing, Written};
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
    /// Not processed: a batch that defers ([`Contention::Defer`]) found a lock it needs held by
    /// another transaction. Nothing of it was written, its id included; apply it again.
    Deferred,
}

/// The bounds a [`Store`] keeps: its pool size, the wait for a free connection, and every
/// operation (a query, or a whole transaction).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections in the pool, at most.
    pub max_connections: u32,
    /// How long to wait for a free connection (including the check that an idle one still
    /// answers) before treating the database as unavailable.
    pub acquire_timeout: Duration,
    /// How long one operation may take before it counts as a lost connection: its connection is
    /// dropped and the operation fails as transient. PostgreSQL ends a session left idle in a
    /// transaction after the same time, so that one whose client vanished releases its locks.
    pub operation_timeout: Duration,
}

impl Limits {
    /// The operation bound when none is configured (`database.operation_timeout_seconds`).
    pub const DEFAULT_OPERATION_TIMEOUT: Duration = Duration::from_secs(15);

    /// A pool of `max_connections` with the default operation bound.
    pub fn new(max_connections: u32, acquire_timeout: Duration) -> Self {
        Self {
            max_connections,
            acquire_timeout,
            operation_timeout: Self::DEFAULT_OPERATION_TIMEOUT,
        }
    }
}

/// A handle on the database.
///
/// Every operation is bounded (see [`Limits`]): a connection that stops answering without
/// closing (a black-holed network path) costs at most one operation bound, never a stuck lane.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    operation_timeout: Duration,
}

/// How long returning a connection to the pool may spend checking that it still answers. sqlx
/// checks every returned connection without a bound of its own; one that hangs is closed.
const RELEASE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

impl Store {
    /// Connects a pool. Fails fast when the database cannot be reached.
    pub async fn connect(url: &SecretString, limits: Limits) -> Result<Self, StoreError> {
        let options: PgConnectOptions = url.expose_secret().parse()?;
        let bound = limits.operation_timeout.as_millis().max(1).to_string();
        // Server-side: end a session idle in a transaction (its client gone) and notice a dead
        // client socket, so that locks held by a vanished worker are released. Every statement
        // is planned for its own arguments and the tables as they are now: a generic plan made
        // while a table was small (a new database, before autovacuum's first ANALYZE) kept
        // sequential scans of the inbox and the record tables as they grew, which more than
        // halved throughput and tripled latency after a backlog (issue 15, ARCHITECTURE
        // decision 25). No JIT compilation: every statement the worker runs reads and writes
        // rows by key, and PostgreSQL compiles a plan whose estimated cost passes
        // `jit_above_cost`, which before a table's first ANALYZE a keyed claim of the outbox
        // did: 10 to 90 ms of LLVM on every claim, PostgreSQL's CPU doubled over a backlog
        // (ARCHITECTURE decision 34).
        let options = options.application_name("induction-reconciler").options([
            ("plan_cache_mode", "force_custom_plan"),
            ("jit", "off"),
            ("idle_in_transaction_session_timeout", bound.as_str()),
            ("tcp_keepalives_idle", "10"),
            ("tcp_keepalives_interval", "5"),
            ("tcp_keepalives_count", "3"),
            ("tcp_user_timeout", bound.as_str()),
        ]);
        // A connection is checked when it goes back to the pool (bounded, below), not again
        // when it is taken: sqlx's default ping on acquire is one more round trip before every
        // transaction (issue 15). One that died while idle fails its first statement, and the
        // operation is retried on another, as any transient failure is.
        let pool = PgPoolOptions::new()
            .max_connections(limits.max_connections)
            .acquire_timeout(limits.acquire_timeout)
            .test_before_acquire(false)
            .after_release(|conn, _| {
                Box::pin(async move {
                    use sqlx::Connection;
                    match tokio::time::timeout(RELEASE_CHECK_TIMEOUT, conn.ping()).await {
                        Ok(Ok(())) => Ok(true),
                        Ok(Err(error)) => Err(error),
                        Err(_) => Err(sqlx::Error::Io(std::io::ErrorKind::TimedOut.into())),
                    }
                })
            })
            .connect_with(options)
            .await?;
        Ok(Self {
            pool,
            operation_timeout: limits.operation_timeout,
        })
    }

    /// Runs one operation within the operation bound. On the bound, the operation is dropped
    /// (with it any transaction, which PostgreSQL rolls back) and fails as transient.
    async fn bounded<T>(
        &self,
        what: &'static str,
        operation: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        bounded(self.operation_timeout, what, operation).await
    }

    /// Opens up to `connections` of the pool's connections at once and returns them to it
    /// idle, within the operation bound; returns how many it held. sqlx opens a connection
    /// when no idle one is free, and the lane that needed it waited for the opening in its first
    /// seconds: about 95 ms with sqlx 0.9.0, whose handshake ran with Nagle's algorithm on,
    /// about 5 ms with 0.9.1 on the bench host (ARCHITECTURE decision 49). A connection that
    /// cannot be opened now is opened later, when needed, as before.
    pub async fn warm(&self, connections: u32) -> usize {
        let opening = (0..connections).map(|_| self.pool.acquire());
        let held = bounded(
            self.operation_timeout,
            "opening the pool's connections",
            async { Ok(futures_util::future::join_all(opening).await) },
        )
        .await
        .unwrap_or_default();
        held.iter().filter(|c| c.is_ok()).count()
    }

    /// The operation bound (see [`Limits`]).
    pub fn operation_timeout(&self) -> Duration {
        self.operation_timeout
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

    /// True when a trivial query succeeds within `within`.
    pub async fn ping(&self, within: Duration) -> bool {
        let query = sqlx::query("select 1").execute(&self.pool);
        matches!(tokio::time::timeout(within, query).await, Ok(Ok(_)))
    }

    /// Re-emits every provisional spell older than `max_age` once with `overdue: true`, up to
    /// `limit` teachers. Safe with several workers: each teacher is re-checked under its lock.
    pub async fn sweep_overdue(
        &self,
        now: OffsetDateTime,
        max_age: time::Duration,
        limit: i64,
    ) -> Result<usize, StoreError> {
        let due: Vec<String> = self
            .bounded("the overdue provisionals", async {
                Ok(sqlx::query_scalar(
                    "select trn from teachers where status = 'provisional' and not overdue
                     and provisional_since < $1 order by provisional_since limit $2",
                )
                .bind(now - max_age)
                .bind(limit)
                .fetch_all(&self.pool)
                .await?)
            })
            .await?;
        let mut swept = 0;
        for text in due {
            let trn =
                Trn::parse(&text).ok_or_else(|| StoreError::corrupt("a stored TRN is invalid"))?;
            let sweeping = self.sweep_teacher(&trn, now, max_age);
            if self.bounded("a sweep of one teacher", sweeping).await? {
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
        effects.teacher(&outcome, last.version);
        effects.write(&mut tx, now, &Publishing::default()).await?;
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
        let query = sqlx::query_scalar(
            "select distinct body_sha256 from parked_log where body_sha256 = any($1)",
        )
        .bind(digests.iter().map(|d| d.to_vec()).collect::<Vec<_>>())
        .fetch_all(&self.pool);
        let rows: Vec<Vec<u8>> = self
            .bounded("the parking log", async { Ok(query.await?) })
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
        let query = sqlx::query("insert into parked_log (body_sha256, reason, parked_at) select d, r, $3 from unnest($1::bytea[], $2::text[]) as x(d, r)")
            .bind(parked.iter().map(|(d, _)| d.to_vec()).collect::<Vec<_>>())
            .bind(parked.iter().map(|(_, r)| *r).collect::<Vec<_>>())
            .bind(now)
            .execute(&self.pool);
        self.bounded("a parking record", async { Ok(query.await?) })
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
    /// The last audit (`verify`): when it ran (Unix seconds) and how many teachers differed.
    pub last_audit: Option<(f64, i64)>,
}

impl Store {
    /// Reads the gauges.
    pub async fn gauges(&self) -> Result<Gauges, StoreError> {
        use sqlx::Row;
        let query = sqlx::query(
            "select (select count(*) from outbox where published_at is null) as backlog,
                    coalesce(extract(epoch from now() - (select min(created_at) from outbox where published_at is null)), 0)::float8 as oldest,
                    (select count(*) from teachers where status = 'conflict') as conflicts,
                    (select count(*) from teachers where status = 'provisional' and overdue) as overdue,
                    a.at as audit_at, a.differing as audit_differing
             from (select 1) as one
             left join lateral (select extract(epoch from finished_at)::float8 as at, differing
                                from audits order by id desc limit 1) as a on true",
        )
        .fetch_one(&self.pool);
        let row = self
            .bounded("the gauges", async { Ok(query.await?) })
            .await?;
        Ok(Gauges {
            outbox_backlog: row.try_get("backlog")?,
            outbox_oldest_age_seconds: row.try_get("oldest")?,
            open_conflicts: row.try_get("conflicts")?,
            overdue_provisionals: row.try_get("overdue")?,
            last_audit: row
                .try_get::<Option<f64>, _>("audit_at")?
                .zip(row.try_get::<Option<i64>, _>("audit_differing")?),
        })
    }
}

/// Runs `operation` within `limit`; on the bound it is dropped and fails as transient.
pub async fn bounded<T>(
    limit: Duration,
    what: &'static str,
    operation: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    tokio::time::timeout(limit, operation)
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::transient(format!(
                "no answer within {} s ({what}); the connection is dropped",
                limit.as_secs_f64()
            )))
        })
}
