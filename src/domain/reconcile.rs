//! The reconcile function: one teacher's status as a pure function of the latest snapshots of
//! the records that count for them (CONTRACT.md section 4).

use super::records::{Claim, Record, Registration, Snapshot};
use super::types::{Programme, SourceId};

/// The status of a teacher's induction data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// The AB's record decides and nothing disagrees with it.
    Confirmed,
    /// The school's report stands until the AB confirms it.
    Provisional,
    /// The AB and the school disagree.
    Conflict,
    /// No open records remain.
    Closed,
}

impl Status {
    /// The wire value, also the last part of the outcome's routing key.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Confirmed => "confirmed",
            Self::Provisional => "provisional",
            Self::Conflict => "conflict",
            Self::Closed => "closed",
        }
    }

    /// Every status, for listings and metrics.
    pub const ALL: [Status; 4] = [
        Self::Confirmed,
        Self::Provisional,
        Self::Conflict,
        Self::Closed,
    ];
}

/// Why the status is what it is: one per row of the decision table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A pass or fail decides.
    InductionCompleted,
    /// The open claim agrees with the current registration.
    ClaimMatchesRegistration,
    /// The open claim disagrees with the current registration.
    ClaimDiffersFromRegistration,
    /// An open claim and no current registration.
    ClaimedWithoutRegistration,
    /// A current registration and no open claim.
    AwaitingClaim,
    /// Neither.
    NoOpenRecords,
}

impl Reason {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InductionCompleted => "induction_completed",
            Self::ClaimMatchesRegistration => "claim_matches_registration",
            Self::ClaimDiffersFromRegistration => "claim_differs_from_registration",
            Self::ClaimedWithoutRegistration => "claimed_without_registration",
            Self::AwaitingClaim => "awaiting_claim",
            Self::NoOpenRecords => "no_open_records",
        }
    }
}

/// A field on which the claim and the registration disagree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Discrepancy {
    /// Different appropriate bodies.
    AppropriateBody,
    /// Both report a programme and they differ.
    TrainingProgramme,
}

impl Discrepancy {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AppropriateBody => "appropriate_body",
            Self::TrainingProgramme => "training_programme",
        }
    }
}

/// Who a resolved value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// The deciding claim.
    AppropriateBody,
    /// The current registration.
    School,
}

impl Source {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AppropriateBody => "appropriate_body",
            Self::School => "school",
        }
    }
}

/// The values consumers should act on, trusting the AB over the school.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resolved {
    /// The AB supporting the induction.
    pub appropriate_body_id: Option<SourceId>,
    /// Where `appropriate_body_id` came from; `None` exactly when it is `None`.
    pub appropriate_body_source: Option<Source>,
    /// The training programme.
    pub training_programme: Option<Programme>,
    /// Where `training_programme` came from; `None` exactly when it is `None`.
    pub training_programme_source: Option<Source>,
    /// Always the current registration's lead provider.
    pub lead_provider_id: Option<SourceId>,
}

/// The result of reconciling one teacher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconciliation {
    /// The status.
    pub status: Status,
    /// Which row of the decision table applied.
    pub reason: Reason,
    /// What disagrees, for a conflict; empty otherwise.
    pub discrepancies: Vec<Discrepancy>,
    /// The values to act on.
    pub resolved: Resolved,
    /// P, the current school registration.
    pub school_registration: Option<Registration>,
    /// K where it exists, else C.
    pub induction_period: Option<Claim>,
}

/// Reconciles one teacher from the latest snapshot of every record that counts for them.
///
/// Deleted snapshots are ignored. The order of `records` does not matter.
pub fn reconcile<'a>(records: impl IntoIterator<Item = &'a Snapshot>) -> Reconciliation {
    let mut current: Option<(&Registration, &Snapshot)> = None;
    let mut completed: Option<(&Claim, &Snapshot)> = None;
    let mut open: Option<(&Claim, &Snapshot)> = None;

    for snapshot in records {
        match &snapshot.record {
            _ if snapshot.record.deleted() => {}
            Record::Registration(r) if r.finished_on.is_none() => {
                let key = |(r, s): (&Registration, &Snapshot)| {
                    (r.started_on, s.occurred_at(), r.registration_id.clone())
                };
                if current.is_none_or(|c| key((r, snapshot)) > key(c)) {
                    current = Some((r, snapshot));
                }
            }
            Record::Registration(_) => {}
            Record::Claim(c) if c.outcome.is_some() => {
                let key = |(c, s): (&Claim, &Snapshot)| {
                    (
                        c.finished_on,
                        s.occurred_at(),
                        c.induction_period_id.clone(),
                    )
                };
                if completed.is_none_or(|k| key((c, snapshot)) > key(k)) {
                    completed = Some((c, snapshot));
                }
            }
            Record::Claim(c) if c.finished_on.is_none() => {
                let key = |(c, s): (&Claim, &Snapshot)| {
                    (c.started_on, s.occurred_at(), c.induction_period_id.clone())
                };
                if open.is_none_or(|o| key((c, snapshot)) > key(o)) {
                    open = Some((c, snapshot));
                }
            }
            Record::Claim(_) => {}
        }
    }

    let p = current.map(|(r, _)| r);
    let k = completed.map(|(c, _)| c);
    let c = open.map(|(c, _)| c);
    decide(p, k, c)
}

/// Applies the decision table to the chosen P, K and C.
fn decide(p: Option<&Registration>, k: Option<&Claim>, c: Option<&Claim>) -> Reconciliation {
    let deciding = k.or(c);
    let (status, reason, discrepancies) = match (k, c, p) {
        (Some(_), _, _) => (Status::Confirmed, Reason::InductionCompleted, vec![]),
        (None, Some(c), Some(p)) => {
            let mut found = Vec::new();
            if c.appropriate_body_id != p.appropriate_body_id {
                found.push(Discrepancy::AppropriateBody);
            }
            if c.training_programme
                .is_some_and(|claimed| claimed != p.training_programme)
            {
                found.push(Discrepancy::TrainingProgramme);
            }
            if found.is_empty() {
                (Status::Confirmed, Reason::ClaimMatchesRegistration, found)
            } else {
                (
                    Status::Conflict,
                    Reason::ClaimDiffersFromRegistration,
                    found,
                )
            }
        }
        (None, Some(_), None) => (
            Status::Confirmed,
            Reason::ClaimedWithoutRegistration,
            vec![],
        ),
        (None, None, Some(_)) => (Status::Provisional, Reason::AwaitingClaim, vec![]),
        (None, None, None) => (Status::Closed, Reason::NoOpenRecords, vec![]),
    };

    let (appropriate_body_id, appropriate_body_source) = match (deciding, p) {
        (Some(claim), _) => (
            Some(claim.appropriate_body_id.clone()),
            Some(Source::AppropriateBody),
        ),
        (None, Some(p)) => (Some(p.appropriate_body_id.clone()), Some(Source::School)),
        (None, None) => (None, None),
    };
    let (training_programme, training_programme_source) =
        match (deciding.and_then(|claim| claim.training_programme), p) {
            (Some(programme), _) => (Some(programme), Some(Source::AppropriateBody)),
            (None, Some(p)) => (Some(p.training_programme), Some(Source::School)),
            (None, None) => (None, None),
        };

    Reconciliation {
        status,
        reason,
        discrepancies,
        resolved: Resolved {
            appropriate_body_id,
            appropriate_body_source,
            training_programme,
            training_programme_source,
            lead_provider_id: p.and_then(|p| p.lead_provider_id.clone()),
        },
        school_registration: p.cloned(),
        induction_period: deciding.cloned(),
    }
}
