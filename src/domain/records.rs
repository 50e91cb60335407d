//! Source records (a school registration, an AB induction period) and how a new snapshot of a
//! record is admitted against the one already held.

use time::{Date, OffsetDateTime};

use super::types::{InductionResult, Origin, Programme, SchoolUrn, SourceId, Stamp, Terms, Trn};

/// The school's record of an ECT at that school, as it stands after a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    /// The school registration's id.
    pub registration_id: SourceId,
    /// The teacher.
    pub trn: Trn,
    /// The school.
    pub school_urn: SchoolUrn,
    /// When the ECT started (or will start) at the school.
    pub started_on: Date,
    /// When the ECT left the school, if they have.
    pub finished_on: Option<Date>,
    /// The AB the school reports.
    pub appropriate_body_id: SourceId,
    /// The training programme the school chose.
    pub training_programme: Programme,
    /// The lead provider, present exactly when the programme is provider-led.
    pub lead_provider_id: Option<SourceId>,
    /// True when the registration was undone.
    pub deleted: bool,
    /// Where this snapshot of the record comes from.
    pub origin: Origin,
}

/// The AB's induction period for an ECT, as it stands after a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The induction period's id.
    pub induction_period_id: SourceId,
    /// The teacher.
    pub trn: Trn,
    /// The claiming AB.
    pub appropriate_body_id: SourceId,
    /// When the induction period started.
    pub started_on: Date,
    /// When it ended (release, pass or fail).
    pub finished_on: Option<Date>,
    /// The programme as the AB reports it, if it does.
    pub training_programme: Option<Programme>,
    /// Terms served, present exactly when the period has finished.
    pub number_of_terms: Option<Terms>,
    /// Pass or fail; absent on a release or an open period.
    pub outcome: Option<InductionResult>,
    /// True when the claim was reverted.
    pub deleted: bool,
    /// Where this snapshot of the record comes from.
    pub origin: Origin,
}

/// One source record of either kind. The two id spaces are separate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A school registration.
    Registration(Registration),
    /// An AB claim.
    Claim(Claim),
}

/// Identifies a record: its kind and its id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RecordKey {
    /// A `registration_id`.
    Registration(SourceId),
    /// An `induction_period_id`.
    Claim(SourceId),
}

impl RecordKey {
    /// The kind of record as a short word (`registration` or `claim`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Registration(_) => "registration",
            Self::Claim(_) => "claim",
        }
    }

    /// The record's id.
    pub fn id(&self) -> &SourceId {
        match self {
            Self::Registration(id) | Self::Claim(id) => id,
        }
    }
}

impl Record {
    /// The record's identity.
    pub fn key(&self) -> RecordKey {
        match self {
            Self::Registration(r) => RecordKey::Registration(r.registration_id.clone()),
            Self::Claim(c) => RecordKey::Claim(c.induction_period_id.clone()),
        }
    }

    /// The teacher the record counts for.
    pub fn trn(&self) -> &Trn {
        match self {
            Self::Registration(r) => &r.trn,
            Self::Claim(c) => &c.trn,
        }
    }

    /// True when the snapshot says the record was undone.
    pub fn deleted(&self) -> bool {
        match self {
            Self::Registration(r) => r.deleted,
            Self::Claim(c) => c.deleted,
        }
    }
}

/// A record as one message reported it, with the stamp that orders it among its snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The record's state.
    pub record: Record,
    /// `(occurred_at, message_id)` of the message that carried it.
    pub stamp: Stamp,
}

impl Snapshot {
    /// When the fact changed at the source.
    pub fn occurred_at(&self) -> OffsetDateTime {
        self.stamp.occurred_at
    }
}

/// What admitting a snapshot does to the record it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// The snapshot becomes the record's latest. `affected` lists the teachers to reconcile,
    /// sorted and without repeats: the snapshot's TRN, and the previous TRN when it moved.
    Latest {
        /// Teachers whose status may have changed.
        affected: Vec<Trn>,
    },
    /// The record already holds this very snapshot (same `occurred_at` and `message_id`): it
    /// changes nothing, like a stale one. Not to be confused with a duplicate *message*, which
    /// the inbox recognises before any snapshot is admitted.
    AlreadyHeld,
    /// The record already holds a later snapshot; this one changes nothing.
    Stale,
}

/// Decides what a snapshot does given the latest snapshot held for its record, if any.
pub fn admit(held: Option<&Snapshot>, incoming: &Snapshot) -> Admission {
    match held {
        None => Admission::Latest {
            affected: vec![incoming.record.trn().clone()],
        },
        Some(held) if held.stamp == incoming.stamp => Admission::AlreadyHeld,
        Some(held) if held.stamp > incoming.stamp => Admission::Stale,
        Some(held) => {
            let mut affected = vec![incoming.record.trn().clone(), held.record.trn().clone()];
            affected.sort();
            affected.dedup();
            Admission::Latest { affected }
        }
    }
}
