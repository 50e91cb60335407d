//! The transactional outbox: outcomes are written in the same transaction as the state that
//! caused them, and published by the relay afterwards.
//!
//! Only the claim's scan in id order reads the partial indexes of pending rows. Every lookup of
//! rows by id or by TRN writes "not yet published" as `coalesce(published_at, 'infinity') =
//! 'infinity'`, which PostgreSQL cannot match to those indexes' predicate (`published_at is
//! null`), so that it goes through `outbox_pkey` or `outbox_trn_version_key` (ARCHITECTURE
//! decision 34). The partial indexes' statistics say "empty" whenever the table was last
//! analysed with nothing pending, which on a large outbox is nearly always; during a backlog the
//! planner then took a whole scan of a partial index, filtered by id or TRN, for the cheapest
//! plan, once for every statement (or every row) of every batch.

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

/// A batch of outbox rows claimed by one relay: already marked published in its transaction,
/// which commits (keeping the marks of what the broker confirmed) or rolls back (the rows stay
/// pending for the next round or the next relay).
pub struct OutboxBatch {
    tx: Transaction<'static, Postgres>,
    /// The store's operation bound, for the update and the commit.
    operation_timeout: std::time::Duration,
    /// The rows, in publishing order: teachers by their oldest row, each teacher's versions in
    /// order.
    pub rows: Vec<OutboxRow>,
    /// Each row's teacher, in the order of `rows`.
    trns: Vec<String>,
    /// True when the claim took fewer rows than its limit and, in its snapshot, an unpublished
    /// row that no lane holds waited behind an earlier version of its teacher that a lane holds
    /// leased (see [`super::Store::claim_outbox`]).
    pub waiting_on_lease: bool,
}

impl OutboxBatch {
    /// Keeps the rows in `published` marked and releases the batch. Any other row goes back to
    /// pending, and with it every later version of its teacher in the batch (whether or not the
    /// broker confirmed it), so that the next round sends that teacher's versions in order again;
    /// a consumer de-duplicates what it sees twice. Returns how many rows stay published.
    pub async fn complete(mut self, published: &[i64]) -> Result<usize, StoreError> {
        let mut failed_teachers: Vec<&str> = Vec::new();
        let mut unmark: Vec<i64> = Vec::new();
        for (row, trn) in self.rows.iter().zip(&self.trns) {
            if failed_teachers.contains(&trn.as_str()) || !published.contains(&row.id) {
                failed_teachers.push(trn);
                unmark.push(row.id);
            }
        }
        let kept = self.rows.len() - unmark.len();
        let limit = self.operation_timeout;
        super::bounded(limit, "the outbox update", async move {
            if !unmark.is_empty() {
                sqlx::query("update outbox set published_at = null where id = any($1)")
                    .bind(&unmark)
                    .execute(&mut *self.tx)
                    .await?;
            }
            self.tx.commit().await?;
            Ok(kept)
        })
        .await
    }

    /// How many rows were claimed.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when the claim found nothing to publish.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// How a claim's transaction starts, in one round trip with the `BEGIN` (ARCHITECTURE decision
/// 31): the claim reads the unpublished rows in id order through `outbox_pending_by_id` and
/// stops at its limit.
///
/// A partial index keeps the entries of rows published since the table's last vacuum (marking
/// a row published does not remove its entry), and autovacuum waits for a fifth of a large
/// table to change. A bitmap scan, which the planner takes for a few pending rows, reads every
/// one of those entries and never marks them dead, so each claim cost what was published since
/// the last vacuum: after 40,000 messages into a new database the claims and the writes'
/// checks had read 3.8 million index entries, 130 for every outcome (`pg_stat_user_indexes`).
/// An index scan marks the entries of dead rows as it passes them (later scans of either kind
/// skip them) and ends at the limit. Sequential scans are off for the same reason. For the
/// transaction only.
const BEGIN_CLAIM: &str =
    "BEGIN; SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off";

impl super::Store {
    /// Claims publishable outcomes in one statement, marking them published at `now` in a
    /// transaction that [`OutboxBatch::complete`] commits: the lowest unpublished version of up
    /// to `limit` teachers (rows another relay holds are skipped, so that versions go out in
    /// order even with several relays), with each such teacher's later unpublished versions, so
    /// that a teacher whose batch emitted several goes out in one round. No other relay can
    /// claim those later versions: they are not the lowest while the lowest is unpublished in
    /// its snapshot. Rows a lane holds leased are left to it until the lease runs out at `now`
    /// (and a teacher's later versions with them: they are not the lowest either).
    ///
    /// The same statement, so in the same snapshot, says whether such a later version waits
    /// ([`OutboxBatch::waiting_on_lease`]). That happens when two lanes, or two workers, write
    /// outcomes for one teacher (a record moved between teachers): the later write finds the
    /// earlier version leased and unpublished and leaves its own to the relay, waking it, but the
    /// relay must leave that teacher until the lane marks the earlier version. The mark wakes the
    /// relay only if it sees the later row, and a mark whose statement ran before the later
    /// write committed does not: the row then waited for the relay's poll
    /// (`relay.poll_interval_millis`, 2 s by default; docs/PERFORMANCE.md, "Ninth round"). The
    /// relay looks again soon while this holds (`app::relay`). Asked in a statement of its own,
    /// after the claim, it could see the mark the claim did not, and say nothing waited. It is
    /// asked only when the claim took fewer rows than its limit: that claim has read every
    /// pending row already, and a full one is followed by another round.
    pub async fn claim_outbox(
        &self,
        limit: i64,
        now: OffsetDateTime,
    ) -> Result<OutboxBatch, StoreError> {
        self.bounded("an outbox claim", async {
            let mut tx = self.pool().begin_with(BEGIN_CLAIM).await?;
            let found = sqlx::query(
                "with lowest as (
                   select o.id, o.trn
                   from outbox o
                   where o.published_at is null
                     and (o.lease_until is null or o.lease_until <= $2)
                     and o.version = (select e.version from outbox e where e.trn = o.trn and coalesce(e.published_at, 'infinity') = 'infinity' order by e.version limit 1)
                   order by o.id
                   limit $1
                   for update skip locked
                 ), later as (
                   select o.id
                   from outbox o
                   where coalesce(o.published_at, 'infinity') = 'infinity'
                     and (o.lease_until is null or o.lease_until <= $2)
                     and o.trn in (select trn from lowest)
                     and o.id not in (select id from lowest)
                   for update
                 ), claimed as (
                   update outbox set published_at = $2, lease_until = null
                   where id in (select id from lowest union all select id from later)
                   returning id, outcome_id, trn, version, routing_key, body, traceparent, created_at
                 ), waiting as (
                   select case when (select count(*) from claimed) < $1 then exists (
                     select 1 from outbox o
                     where o.published_at is null
                       and (o.lease_until is null or o.lease_until <= $2)
                       and exists (
                         select 1 from outbox e
                         where e.trn = o.trn and e.version < o.version
                           and coalesce(e.published_at, 'infinity') = 'infinity'
                           and e.lease_until > $2)
                   ) else false end as waiting_on_lease
                 )
                 select claimed.*, waiting.waiting_on_lease
                 from waiting left join claimed on true
                 order by min(claimed.id) over (partition by claimed.trn), claimed.version",
            )
            .bind(limit)
            .bind(now)
            .fetch_all(&mut *tx)
            .await?;
            let mut rows = Vec::with_capacity(found.len());
            let mut trns = Vec::with_capacity(found.len());
            let mut waiting_on_lease = false;
            for row in &found {
                waiting_on_lease = row.try_get("waiting_on_lease")?;
                // With nothing claimed, the one row says only that.
                if row.try_get::<Option<i64>, _>("id")?.is_some() {
                    rows.push(OutboxRow::from_row(row)?);
                    trns.push(row.try_get("trn")?);
                }
            }
            Ok(OutboxBatch {
                tx,
                operation_timeout: self.operation_timeout(),
                rows,
                trns,
                waiting_on_lease,
            })
        })
        .await
    }

    /// Marks published the rows a lane published itself and the broker confirmed, in a
    /// transaction of their own (a lane with nothing more to write). Returns how many were
    /// still unpublished.
    pub async fn mark_published(
        &self,
        ids: &[i64],
        now: OffsetDateTime,
    ) -> Result<u64, StoreError> {
        self.bounded("the outbox marks", async {
            let mut conn = self.pool().acquire().await?;
            mark_published(&mut conn, ids, now).await
        })
        .await
    }

    /// Hands rows a lane leased but could not publish to the relay: clears their lease and
    /// wakes the relay.
    pub async fn release_leases(&self, ids: &[i64]) -> Result<(), StoreError> {
        self.bounded("the outbox leases", async {
            sqlx::query(
                "with released as (
                   update outbox set lease_until = null
                   where id = any($1) and coalesce(published_at, 'infinity') = 'infinity'
                   returning 1)
                 select case when exists (select 1 from released) then pg_notify($2, '') end",
            )
            .bind(ids)
            .bind(super::OUTBOX_CHANNEL)
            .execute(self.pool())
            .await?;
            Ok(())
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

/// Marks rows a lane published published on `conn` (their lease stays, as the sign that their
/// lane published them), waking the relay if one of their teachers has later versions waiting
/// for it. Returns how many were still unpublished; none are touched when `ids` is empty.
pub(super) async fn mark_published(
    conn: &mut sqlx::PgConnection,
    ids: &[i64],
    now: OffsetDateTime,
) -> Result<u64, StoreError> {
    if ids.is_empty() {
        return Ok(0);
    }
    let row = sqlx::query(
        "with mrk as (
           update outbox set published_at = $2 where id = any($1) and coalesce(published_at, 'infinity') = 'infinity'
           returning trn)
         select (select count(*) from mrk) as marked,
                case when exists (
                  select 1 from mrk join outbox o on o.trn = mrk.trn and coalesce(o.published_at, 'infinity') = 'infinity' and o.lease_until is null
                ) then pg_notify($3, '') end as notified",
    )
    .bind(ids)
    .bind(now)
    .bind(super::OUTBOX_CHANNEL)
    .fetch_one(&mut *conn)
    .await?;
    let marked: i64 = row.try_get("marked")?;
    Ok(marked as u64)
}
