//! The emission rule: whether a new reconciliation is worth telling consumers about, the
//! per-teacher version, the provisional spell and its overdue re-emission.

use time::{Duration, OffsetDateTime};
use uuid::Uuid;

use super::reconcile::{Reconciliation, Status};
use super::types::{Origin, Trn};

/// The two kinds of input message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// `school_registration`.
    SchoolRegistration,
    /// `ab_claim`.
    AbClaim,
}

impl MessageKind {
    /// The wire value of `message_type`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SchoolRegistration => "school_registration",
            Self::AbClaim => "ab_claim",
        }
    }
}

/// The input that caused an outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cause {
    /// The input's `message_id`.
    pub message_id: Uuid,
    /// The input's `message_type`.
    pub message_type: MessageKind,
    /// The input's `occurred_at`, with the offset it was given in.
    pub occurred_at: OffsetDateTime,
    /// The input's `correlation_id`, copied onto the outcome.
    pub correlation_id: Option<String>,
    /// The input's `origin`.
    pub origin: Origin,
}

/// An outcome the worker decided to emit, without its `outcome_id` (the shell assigns that).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The teacher.
    pub trn: Trn,
    /// Strictly increasing per teacher from 1.
    pub version: u64,
    /// Status, reason, discrepancies, resolved values and the deciding records.
    pub reconciliation: Reconciliation,
    /// True once the current provisional spell has outlived the configured age.
    pub overdue: bool,
    /// When the current provisional spell began.
    pub provisional_since: Option<OffsetDateTime>,
    /// The input that caused it; `None` for the overdue sweep and a re-reconciliation.
    pub caused_by: Option<Cause>,
    /// When the worker decided it.
    pub decided_at: OffsetDateTime,
}

impl Outcome {
    /// The status, for routing.
    pub fn status(&self) -> Status {
        self.reconciliation.status
    }

    /// True when a consumer would see a difference between `self` and `other` (everything but
    /// the version, the cause and when it was decided).
    pub fn visibly_differs(&self, reconciliation: &Reconciliation, overdue: bool) -> bool {
        self.reconciliation != *reconciliation || self.overdue != overdue
    }
}

/// Decides whether to emit after a teacher's records changed.
///
/// `last` is the last outcome emitted for the teacher, if any. Returns the outcome to emit, or
/// `None` when nothing a consumer can see has changed (or when the teacher's first outcome would
/// be `closed`).
pub fn emit(
    trn: &Trn,
    last: Option<&Outcome>,
    reconciliation: Reconciliation,
    cause: Cause,
    now: OffsetDateTime,
) -> Option<Outcome> {
    decide(trn, last, reconciliation, Some(cause), now)
}

/// Decides whether to emit after re-reconciling a teacher whose records did not change (an
/// audit after a deliberate rule change, `verify --emit`): the same rule as [`emit`], with no
/// cause.
pub fn correct(
    trn: &Trn,
    last: Option<&Outcome>,
    reconciliation: Reconciliation,
    now: OffsetDateTime,
) -> Option<Outcome> {
    decide(trn, last, reconciliation, None, now)
}

fn decide(
    trn: &Trn,
    last: Option<&Outcome>,
    reconciliation: Reconciliation,
    cause: Option<Cause>,
    now: OffsetDateTime,
) -> Option<Outcome> {
    if last.is_none() && reconciliation.status == Status::Closed {
        return None;
    }
    let continuing_spell = last.filter(|l| {
        l.status() == Status::Provisional && reconciliation.status == Status::Provisional
    });
    let (provisional_since, overdue) = match (reconciliation.status, continuing_spell) {
        (Status::Provisional, Some(l)) => (l.provisional_since, l.overdue),
        (Status::Provisional, None) => (Some(now), false),
        _ => (None, false),
    };
    if last.is_some_and(|l| !l.visibly_differs(&reconciliation, overdue)) {
        return None;
    }
    Some(Outcome {
        trn: trn.clone(),
        version: last.map_or(1, |l| l.version + 1),
        reconciliation,
        overdue,
        provisional_since,
        caused_by: cause,
        decided_at: now,
    })
}

/// The overdue sweep for one teacher: re-emits a provisional spell older than `max_age`, once.
pub fn sweep(last: &Outcome, now: OffsetDateTime, max_age: Duration) -> Option<Outcome> {
    let since = last.provisional_since?;
    let due = last.status() == Status::Provisional && !last.overdue && now - since > max_age;
    due.then(|| Outcome {
        trn: last.trn.clone(),
        version: last.version + 1,
        reconciliation: last.reconciliation.clone(),
        overdue: true,
        provisional_since: last.provisional_since,
        caused_by: None,
        decided_at: now,
    })
}
