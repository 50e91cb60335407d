//! The outcome message on the wire (CONTRACT.md section 4), and its conversion from and back to
//! the domain outcome (the worker stores the last outcome it emitted in this form).

use serde::{Deserialize, Serialize};
use time::{Date, OffsetDateTime};
use uuid::Uuid;

use crate::domain::{
    Cause, Claim, Discrepancy, InductionResult, MessageKind, Origin, Outcome, Programme, Reason,
    Reconciliation, Registration, Resolved, SchoolUrn, Source, SourceId, Status, Terms, Trn,
};

time::serde::format_description!(iso_date, Date, "[year]-[month]-[day]");

/// The outcome as published: one JSON object, `outcome_id` doubling as the AMQP `message_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutcomeMessage {
    /// Unique per outcome; consumers de-duplicate on it.
    pub outcome_id: Uuid,
    /// Always 1.
    pub schema_version: u32,
    /// The teacher.
    pub trn: String,
    /// Strictly increasing per TRN from 1.
    pub version: u64,
    /// `confirmed`, `provisional`, `conflict` or `closed`.
    pub status: String,
    /// The decision-table row.
    pub reason: String,
    /// `appropriate_body` and/or `training_programme` for a conflict.
    pub discrepancies: Vec<String>,
    /// True once the provisional spell is older than the configured age.
    pub overdue: bool,
    /// When the current provisional spell began.
    #[serde(with = "time::serde::rfc3339::option")]
    pub provisional_since: Option<OffsetDateTime>,
    /// The values to act on.
    pub resolved: ResolvedMessage,
    /// P's fields.
    pub school_registration: Option<RegistrationMessage>,
    /// K's or C's fields.
    pub induction_period: Option<InductionPeriodMessage>,
    /// The input that caused it; null for the overdue sweep.
    pub caused_by: Option<CauseMessage>,
    /// Copied from the cause.
    pub correlation_id: Option<String>,
    /// When the worker decided it.
    #[serde(with = "time::serde::rfc3339")]
    pub decided_at: OffsetDateTime,
}

/// `resolved`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResolvedMessage {
    /// The AB.
    pub appropriate_body_id: Option<String>,
    /// `appropriate_body`, `school` or null.
    pub appropriate_body_source: Option<String>,
    /// The programme.
    pub training_programme: Option<String>,
    /// `appropriate_body`, `school` or null.
    pub training_programme_source: Option<String>,
    /// Always from the current registration.
    pub lead_provider_id: Option<String>,
}

/// `school_registration`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistrationMessage {
    /// The registration's id.
    pub registration_id: String,
    /// The school.
    pub school_urn: u32,
    /// Start date.
    #[serde(with = "iso_date")]
    pub started_on: Date,
    /// Leaving date.
    #[serde(with = "iso_date::option")]
    pub finished_on: Option<Date>,
    /// The AB the school reports.
    pub appropriate_body_id: String,
    /// The mapped programme.
    pub training_programme: String,
    /// The lead provider.
    pub lead_provider_id: Option<String>,
    /// The origin of the snapshot these fields come from. Outcomes stored before origins
    /// existed have none and read back as `live`.
    #[serde(default)]
    pub origin: OriginField,
}

/// `induction_period`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InductionPeriodMessage {
    /// The induction period's id.
    pub induction_period_id: String,
    /// The claiming AB.
    pub appropriate_body_id: String,
    /// Start date.
    #[serde(with = "iso_date")]
    pub started_on: Date,
    /// End date.
    #[serde(with = "iso_date::option")]
    pub finished_on: Option<Date>,
    /// The mapped programme, or null when not reported.
    pub training_programme: Option<String>,
    /// Terms served.
    pub number_of_terms: Option<f64>,
    /// `pass`, `fail` or null.
    pub outcome: Option<String>,
    /// The origin of the snapshot these fields come from.
    #[serde(default)]
    pub origin: OriginField,
}

/// `caused_by`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CauseMessage {
    /// The input's id.
    pub message_id: Uuid,
    /// The input's type.
    pub message_type: String,
    /// The input's `occurred_at`, in the offset it was given in.
    #[serde(with = "time::serde::rfc3339")]
    pub occurred_at: OffsetDateTime,
    /// The input's `origin`.
    #[serde(default)]
    pub origin: OriginField,
}

/// `origin` on an outcome: `live` or `migration`, written as its wire text. Stored outcomes
/// that predate the field read back as `live` (everything before it was live).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OriginField {
    /// `live`.
    #[default]
    Live,
    /// `migration`.
    Migration,
}

impl From<Origin> for OriginField {
    fn from(origin: Origin) -> Self {
        match origin {
            Origin::Live => Self::Live,
            Origin::Migration => Self::Migration,
        }
    }
}

impl From<OriginField> for Origin {
    fn from(origin: OriginField) -> Self {
        match origin {
            OriginField::Live => Self::Live,
            OriginField::Migration => Self::Migration,
        }
    }
}

/// A stored outcome that cannot be read back into the domain.
#[derive(Debug, thiserror::Error)]
#[error("stored outcome has an invalid {0}")]
pub struct UnreadableOutcome(&'static str);

impl OutcomeMessage {
    /// The wire form of a domain outcome.
    pub fn new(outcome_id: Uuid, outcome: &Outcome) -> Self {
        let r = &outcome.reconciliation;
        Self {
            outcome_id,
            schema_version: 1,
            trn: outcome.trn.as_str().to_owned(),
            version: outcome.version,
            status: r.status.as_str().to_owned(),
            reason: r.reason.as_str().to_owned(),
            discrepancies: r
                .discrepancies
                .iter()
                .map(|d| d.as_str().to_owned())
                .collect(),
            overdue: outcome.overdue,
            provisional_since: outcome.provisional_since,
            resolved: ResolvedMessage {
                appropriate_body_id: r.resolved.appropriate_body_id.as_ref().map(text),
                appropriate_body_source: r
                    .resolved
                    .appropriate_body_source
                    .map(|s| s.as_str().to_owned()),
                training_programme: r.resolved.training_programme.map(|p| p.as_str().to_owned()),
                training_programme_source: r
                    .resolved
                    .training_programme_source
                    .map(|s| s.as_str().to_owned()),
                lead_provider_id: r.resolved.lead_provider_id.as_ref().map(text),
            },
            school_registration: r.school_registration.as_ref().map(|p| RegistrationMessage {
                registration_id: text(&p.registration_id),
                school_urn: p.school_urn.get(),
                started_on: p.started_on,
                finished_on: p.finished_on,
                appropriate_body_id: text(&p.appropriate_body_id),
                training_programme: p.training_programme.as_str().to_owned(),
                lead_provider_id: p.lead_provider_id.as_ref().map(text),
                origin: p.origin.into(),
            }),
            induction_period: r.induction_period.as_ref().map(|c| InductionPeriodMessage {
                induction_period_id: text(&c.induction_period_id),
                appropriate_body_id: text(&c.appropriate_body_id),
                started_on: c.started_on,
                finished_on: c.finished_on,
                training_programme: c.training_programme.map(|p| p.as_str().to_owned()),
                number_of_terms: c.number_of_terms.map(Terms::as_f64),
                outcome: c.outcome.map(|o| o.as_str().to_owned()),
                origin: c.origin.into(),
            }),
            caused_by: outcome.caused_by.as_ref().map(|c| CauseMessage {
                message_id: c.message_id,
                message_type: c.message_type.as_str().to_owned(),
                occurred_at: c.occurred_at,
                origin: c.origin.into(),
            }),
            correlation_id: outcome
                .caused_by
                .as_ref()
                .and_then(|c| c.correlation_id.clone()),
            decided_at: outcome.decided_at,
        }
    }

    /// The AMQP routing key: `outcome.<status>`.
    pub fn routing_key(&self) -> String {
        format!("outcome.{}", self.status)
    }

    /// Reads the message back into the domain outcome it was made from.
    pub fn to_domain(&self) -> Result<Outcome, UnreadableOutcome> {
        let bad = UnreadableOutcome;
        let trn = Trn::parse(&self.trn).ok_or(bad("trn"))?;
        let status = Status::ALL
            .into_iter()
            .find(|s| s.as_str() == self.status)
            .ok_or(bad("status"))?;
        let reason = [
            Reason::InductionCompleted,
            Reason::ClaimMatchesRegistration,
            Reason::ClaimDiffersFromRegistration,
            Reason::ClaimedWithoutRegistration,
            Reason::AwaitingClaim,
            Reason::NoOpenRecords,
        ]
        .into_iter()
        .find(|r| r.as_str() == self.reason)
        .ok_or(bad("reason"))?;
        let discrepancies = self
            .discrepancies
            .iter()
            .map(|d| {
                [Discrepancy::AppropriateBody, Discrepancy::TrainingProgramme]
                    .into_iter()
                    .find(|x| x.as_str() == d)
                    .ok_or(bad("discrepancy"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let school_registration = self
            .school_registration
            .as_ref()
            .map(|p| p.to_domain(&trn))
            .transpose()?;
        let induction_period = self
            .induction_period
            .as_ref()
            .map(|c| c.to_domain(&trn))
            .transpose()?;
        let caused_by = self
            .caused_by
            .as_ref()
            .map(|c| c.to_domain(self.correlation_id.clone()))
            .transpose()?;
        Ok(Outcome {
            trn,
            version: self.version,
            reconciliation: Reconciliation {
                status,
                reason,
                discrepancies,
                resolved: self.resolved.to_domain()?,
                school_registration,
                induction_period,
            },
            overdue: self.overdue,
            provisional_since: self.provisional_since,
            caused_by,
            decided_at: self.decided_at,
        })
    }
}

impl ResolvedMessage {
    fn to_domain(&self) -> Result<Resolved, UnreadableOutcome> {
        Ok(Resolved {
            appropriate_body_id: opt_id(&self.appropriate_body_id)?,
            appropriate_body_source: opt_source(&self.appropriate_body_source)?,
            training_programme: opt_programme(&self.training_programme)?,
            training_programme_source: opt_source(&self.training_programme_source)?,
            lead_provider_id: opt_id(&self.lead_provider_id)?,
        })
    }
}

impl RegistrationMessage {
    /// The registration an outcome was decided on (outcomes carry only open, undeleted ones).
    fn to_domain(&self, trn: &Trn) -> Result<Registration, UnreadableOutcome> {
        let bad = UnreadableOutcome;
        Ok(Registration {
            registration_id: id(&self.registration_id)?,
            trn: trn.clone(),
            school_urn: SchoolUrn::new(self.school_urn.into()).ok_or(bad("school_urn"))?,
            started_on: self.started_on,
            finished_on: self.finished_on,
            appropriate_body_id: id(&self.appropriate_body_id)?,
            training_programme: Programme::parse(&self.training_programme)
                .ok_or(bad("training_programme"))?,
            lead_provider_id: opt_id(&self.lead_provider_id)?,
            deleted: false,
            origin: self.origin.into(),
        })
    }
}

impl InductionPeriodMessage {
    /// The claim an outcome was decided on.
    fn to_domain(&self, trn: &Trn) -> Result<Claim, UnreadableOutcome> {
        let bad = UnreadableOutcome;
        let number_of_terms = self
            .number_of_terms
            .map(|t| Terms::from_tenths((t * 10.0).round() as u32).ok_or(bad("number_of_terms")))
            .transpose()?;
        let outcome = self
            .outcome
            .as_deref()
            .map(|o| InductionResult::parse(o).ok_or(bad("outcome")))
            .transpose()?;
        Ok(Claim {
            induction_period_id: id(&self.induction_period_id)?,
            trn: trn.clone(),
            appropriate_body_id: id(&self.appropriate_body_id)?,
            started_on: self.started_on,
            finished_on: self.finished_on,
            training_programme: opt_programme(&self.training_programme)?,
            number_of_terms,
            outcome,
            deleted: false,
            origin: self.origin.into(),
        })
    }
}

impl CauseMessage {
    fn to_domain(&self, correlation_id: Option<String>) -> Result<Cause, UnreadableOutcome> {
        let message_type = match self.message_type.as_str() {
            "school_registration" => MessageKind::SchoolRegistration,
            "ab_claim" => MessageKind::AbClaim,
            _ => return Err(UnreadableOutcome("message_type")),
        };
        Ok(Cause {
            message_id: self.message_id,
            message_type,
            occurred_at: self.occurred_at,
            correlation_id,
            origin: self.origin.into(),
        })
    }
}

fn text(id: &SourceId) -> String {
    id.as_str().to_owned()
}

fn id(text: &str) -> Result<SourceId, UnreadableOutcome> {
    SourceId::parse(text).ok_or(UnreadableOutcome("id"))
}

fn opt_id(text: &Option<String>) -> Result<Option<SourceId>, UnreadableOutcome> {
    text.as_deref().map(id).transpose()
}

fn opt_programme(text: &Option<String>) -> Result<Option<Programme>, UnreadableOutcome> {
    text.as_deref()
        .map(|t| Programme::parse(t).ok_or(UnreadableOutcome("training_programme")))
        .transpose()
}

fn opt_source(text: &Option<String>) -> Result<Option<Source>, UnreadableOutcome> {
    text.as_deref()
        .map(|t| match t {
            "appropriate_body" => Ok(Source::AppropriateBody),
            "school" => Ok(Source::School),
            _ => Err(UnreadableOutcome("source")),
        })
        .transpose()
}
