//! Reading and writing the latest snapshot of each source record.

use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use time::OffsetDateTime;
use uuid::Uuid;

use super::error::StoreError;
use crate::domain::{
    Claim, InductionResult, Origin, Programme, Record, Registration, SchoolUrn, Snapshot, SourceId,
    Stamp, Terms, Trn,
};

macro_rules! registration_columns {
    () => {
        "registration_id, trn, school_urn, started_on, finished_on, appropriate_body_id, \
         training_programme, lead_provider_id, deleted, occurred_at, occurred_at_ns, message_id, origin"
    };
}
macro_rules! claim_columns {
    () => {
        "induction_period_id, trn, appropriate_body_id, started_on, finished_on, training_programme, \
         number_of_terms_tenths, outcome, deleted, occurred_at, occurred_at_ns, message_id, origin"
    };
}

/// Splits a timestamp into what Postgres keeps (microseconds) and the nanoseconds beyond.
pub(crate) fn split_instant(at: OffsetDateTime) -> (OffsetDateTime, i16) {
    let nanos = at.nanosecond();
    let sub_micro = nanos % 1000;
    let truncated = at
        .replace_nanosecond(nanos - sub_micro)
        .expect("a smaller nanosecond is valid");
    (truncated, sub_micro as i16)
}

fn join_instant(at: OffsetDateTime, sub_micro: i16) -> OffsetDateTime {
    at + time::Duration::nanoseconds(i64::from(sub_micro))
}

/// The held snapshots of every record that counts for a teacher.
pub async fn for_teacher(conn: &mut PgConnection, trn: &Trn) -> Result<Vec<Snapshot>, StoreError> {
    for_teachers(conn, &[trn.as_str().to_owned()]).await
}

/// The held snapshots of every record that counts for any of the teachers.
pub async fn for_teachers(
    conn: &mut PgConnection,
    trns: &[String],
) -> Result<Vec<Snapshot>, StoreError> {
    let mut snapshots = Vec::new();
    for row in sqlx::query(concat!(
        "select ",
        registration_columns!(),
        " from registrations where trn = any($1)"
    ))
    .bind(trns)
    .fetch_all(&mut *conn)
    .await?
    {
        snapshots.push(registration_from_row(&row)?);
    }
    for row in sqlx::query(concat!(
        "select ",
        claim_columns!(),
        " from induction_periods where trn = any($1)"
    ))
    .bind(trns)
    .fetch_all(&mut *conn)
    .await?
    {
        snapshots.push(claim_from_row(&row)?);
    }
    Ok(snapshots)
}

/// What the teachers hold, in one round trip: the held snapshots of every record that counts
/// for any of them (as [`for_teachers`]) and their last outcomes (the outbox row of each
/// teacher's version): the SQL function `held_by_v2`, whose rows of one shape are told apart by
/// `kind`.
pub async fn held_by_teachers(
    conn: &mut PgConnection,
    trns: &[String],
) -> Result<(Vec<Snapshot>, Vec<crate::domain::Outcome>), StoreError> {
    let rows = sqlx::query("select * from held_by_v2($1)")
        .bind(trns)
        .fetch_all(&mut *conn)
        .await?;
    held_from_rows(&rows)
}

/// Rows of the SQL type `held_row_v2` (from `held_by_v2` and `lock_and_load_v2`), read back.
pub(super) fn held_from_rows(
    rows: &[PgRow],
) -> Result<(Vec<Snapshot>, Vec<crate::domain::Outcome>), StoreError> {
    let mut snapshots = Vec::new();
    let mut last = Vec::new();
    for row in rows {
        match row.try_get::<&str, _>("kind")? {
            "registration" => snapshots.push(registration_from_row(row)?),
            "claim" => snapshots.push(claim_from_row(row)?),
            _ => last.push(outcome_from_body(row.try_get("last_outcome")?)?),
        }
    }
    Ok((snapshots, last))
}

/// A teacher's last outcome as it was published, parsed. Every teacher has one: a teacher's
/// row is only ever written with the outbox row of its version.
pub(super) fn last_outcome_message(
    body: Option<&[u8]>,
) -> Result<crate::messages::OutcomeMessage, StoreError> {
    let body = body.ok_or_else(|| {
        StoreError::corrupt("a teacher has neither an outbox row of its version nor a last outcome")
    })?;
    // Where it fails and how, not serde's message, which may quote a value (the TRN).
    serde_json::from_slice(body).map_err(|e| {
        StoreError::corrupt(format!(
            "a stored last outcome does not read as an outcome ({:?} error at column {})",
            e.classify(),
            e.column()
        ))
    })
}

/// A stored last outcome, read back into the domain.
fn outcome_from_body(body: Option<&[u8]>) -> Result<crate::domain::Outcome, StoreError> {
    last_outcome_message(body)?
        .to_domain()
        .map_err(|e| StoreError::corrupt(e.to_string()))
}

fn corrupt(what: &str) -> StoreError {
    StoreError::corrupt(format!("a stored record has an invalid {what}"))
}

fn id(row: &PgRow, column: &str) -> Result<SourceId, StoreError> {
    SourceId::parse(row.try_get::<&str, _>(column)?).ok_or_else(|| corrupt(column))
}

fn opt_id(row: &PgRow, column: &str) -> Result<Option<SourceId>, StoreError> {
    row.try_get::<Option<&str>, _>(column)?
        .map(|v| SourceId::parse(v).ok_or_else(|| corrupt(column)))
        .transpose()
}

fn stamp(row: &PgRow) -> Result<Stamp, StoreError> {
    Ok(Stamp {
        occurred_at: join_instant(row.try_get("occurred_at")?, row.try_get("occurred_at_ns")?),
        message_id: row.try_get::<Uuid, _>("message_id")?,
    })
}

fn origin(row: &PgRow) -> Result<Origin, StoreError> {
    Origin::parse(row.try_get::<&str, _>("origin")?).ok_or_else(|| corrupt("origin"))
}

fn trn(row: &PgRow) -> Result<Trn, StoreError> {
    Trn::parse(row.try_get::<&str, _>("trn")?).ok_or_else(|| corrupt("trn"))
}

fn registration_from_row(row: &PgRow) -> Result<Snapshot, StoreError> {
    let urn: i32 = row.try_get("school_urn")?;
    let record = Registration {
        registration_id: id(row, "registration_id")?,
        trn: trn(row)?,
        school_urn: SchoolUrn::new(urn as u64).ok_or_else(|| corrupt("school_urn"))?,
        started_on: row.try_get("started_on")?,
        finished_on: row.try_get("finished_on")?,
        appropriate_body_id: id(row, "appropriate_body_id")?,
        training_programme: Programme::parse(row.try_get("training_programme")?)
            .ok_or_else(|| corrupt("training_programme"))?,
        lead_provider_id: opt_id(row, "lead_provider_id")?,
        deleted: row.try_get("deleted")?,
        origin: origin(row)?,
    };
    Ok(Snapshot {
        record: Record::Registration(record),
        stamp: stamp(row)?,
    })
}

fn claim_from_row(row: &PgRow) -> Result<Snapshot, StoreError> {
    let terms: Option<i16> = row.try_get("number_of_terms_tenths")?;
    let record = Claim {
        induction_period_id: id(row, "induction_period_id")?,
        trn: trn(row)?,
        appropriate_body_id: id(row, "appropriate_body_id")?,
        started_on: row.try_get("started_on")?,
        finished_on: row.try_get("finished_on")?,
        training_programme: row
            .try_get::<Option<&str>, _>("training_programme")?
            .map(|p| Programme::parse(p).ok_or_else(|| corrupt("training_programme")))
            .transpose()?,
        number_of_terms: terms
            .map(|t| Terms::from_tenths(t as u32).ok_or_else(|| corrupt("number_of_terms")))
            .transpose()?,
        outcome: row
            .try_get::<Option<&str>, _>("outcome")?
            .map(|o| InductionResult::parse(o).ok_or_else(|| corrupt("outcome")))
            .transpose()?,
        deleted: row.try_get("deleted")?,
        origin: origin(row)?,
    };
    Ok(Snapshot {
        record: Record::Claim(record),
        stamp: stamp(row)?,
    })
}
