//! A generated backlog shaped like the history docs/MIGRATION.md loads: ECF1 school records
//! (legacy programme values, ECF1 appropriate-body ids, corrections and leavers, participants
//! without a TRN) and AB-portal induction periods (legacy `induction_programme`, releases,
//! passes and fails, some years old), as JSON lines without `origin` (the loader stamps it with
//! `publish --origin migration`). Deterministic for a seed; the lines are shuffled, because any
//! load order gives the same result.

use serde_json::{Value, json};
use time::format_description::well_known::Rfc3339;
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

/// A generated backlog.
pub struct Backlog {
    /// The JSON lines, in load order.
    pub lines: Vec<Vec<u8>>,
    /// How many are ECF1 participants without a TRN (parked `invalid_field`).
    pub without_trn: usize,
}

const ECF1_PROGRAMMES: [&str; 7] = [
    "full_induction_programme",
    "core_induction_programme",
    "design_our_own",
    "school_funded_fip",
    "fip",
    "cip",
    "diy",
];
const PORTAL_PROGRAMMES: [&str; 5] = ["fip", "cip", "diy", "unknown", "pre_september_2021"];
/// AB ids as the AB service knows them; ECF1's own ids are translated to these (MIGRATION.md),
/// and the one ECF1 AB with no match keeps its `ECF1:` form.
const ABS: [&str; 4] = [
    "AB-TSH-1",
    "AB-TSH-2",
    "AB-LA-3",
    "ECF1:5d4c3b2a-1f0e-4d9c-8b7a-6f5e4d3c2b1a",
];

fn at(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).expect("formattable")
}

fn day(base: time::Date, days: i64) -> String {
    (base + Duration::days(days)).to_string()
}

/// About `snapshots` lines over `teachers` TRNs from `first_trn`.
pub fn backlog(snapshots: usize, teachers: u32, first_trn: u32, seed: u64) -> Backlog {
    let mut rng = fastrand::Rng::with_seed(seed);
    let ecf1_start = datetime!(2021-09-01 08:00 UTC);
    let mut lines = Vec::with_capacity(snapshots);
    let mut without_trn = 0;
    let mut n: u64 = 0;
    let mut next_id = |rng: &mut fastrand::Rng| {
        n += 1;
        format!("ecf10000-{:04x}-4000-8000-{:012x}", rng.u16(..), n)
    };
    let mut record = 0u64;
    while lines.len() < snapshots {
        record += 1;
        let trn = (first_trn + rng.u32(0..teachers.max(1))).to_string();
        let first_at = ecf1_start + Duration::hours(rng.i64(0..30_000));
        if rng.u8(0..100) < 55 {
            // An ECF1 induction record: the school's registration, then corrections or a leaver.
            let started = time::Date::from_calendar_date(2021, time::Month::September, 1)
                .expect("valid")
                + Duration::days(rng.i64(0..1_200));
            let programme = ECF1_PROGRAMMES[rng.usize(..ECF1_PROGRAMMES.len())];
            let provider_led = matches!(
                programme,
                "full_induction_programme" | "school_funded_fip" | "fip"
            );
            let mut payload = json!({
                "registration_id": format!("ECF1-IR-{seed}-{record}"),
                "trn": trn,
                "school_urn": 100_000 + rng.u32(0..900_000),
                "started_on": started.to_string(),
                "appropriate_body_id": ABS[rng.usize(..ABS.len())],
                "training_programme": programme,
                "lead_provider_id": if provider_led { json!(format!("LP-{}", rng.u8(1..6))) } else { Value::Null },
                // ECF1 fields the contract does not know: ignored, never stored.
                "participant_profile_id": format!("{:x}", rng.u64(..)),
                "induction_status": "active",
            });
            let trn_less = rng.u8(0..100) < 2;
            if trn_less {
                // A participant ECF1 never validated: no TRN. Sent anyway, so that it is parked
                // and counted, not lost without trace.
                payload.as_object_mut().expect("object").remove("trn");
            }
            let corrections = rng.usize(0..3);
            if trn_less {
                without_trn += corrections + 1;
            }
            for k in 0..=corrections {
                let mut p = payload.clone();
                if k > 0 {
                    p["appropriate_body_id"] = json!(ABS[rng.usize(..ABS.len())]);
                    if k == corrections && rng.bool() {
                        p["finished_on"] = json!(day(started, rng.i64(30..400)));
                    }
                }
                lines.push(envelope(
                    &next_id(&mut rng),
                    "school_registration",
                    first_at + Duration::days(k as i64 * 20),
                    p,
                ));
            }
        } else {
            // An AB-portal induction period: opened, then perhaps released, passed or failed.
            let started = time::Date::from_calendar_date(2019, time::Month::September, 1)
                .expect("valid")
                + Duration::days(rng.i64(0..1_800));
            let opened_at = OffsetDateTime::new_utc(started, time::Time::MIDNIGHT)
                + Duration::hours(rng.i64(9..17));
            let payload = json!({
                "induction_period_id": format!("PORTAL-IP-{seed}-{record}"),
                "trn": trn,
                "appropriate_body_id": ABS[rng.usize(..3)],
                "started_on": started.to_string(),
                "induction_programme": PORTAL_PROGRAMMES[rng.usize(..PORTAL_PROGRAMMES.len())],
            });
            lines.push(envelope(
                &next_id(&mut rng),
                "ab_claim",
                opened_at,
                payload.clone(),
            ));
            if rng.u8(0..100) < 60 {
                let finished_days = rng.i64(60..700);
                let mut p = payload;
                p["finished_on"] = json!(day(started, finished_days));
                p["number_of_terms"] = json!(f64::from(rng.u8(0..61)) / 10.0 + 0.0);
                p["outcome"] = match rng.u8(0..3) {
                    0 => Value::Null,
                    1 => json!("pass"),
                    _ => json!("fail"),
                };
                lines.push(envelope(
                    &next_id(&mut rng),
                    "ab_claim",
                    opened_at + Duration::days(finished_days + 1),
                    p,
                ));
            }
        }
    }
    rng.shuffle(&mut lines);
    Backlog { lines, without_trn }
}

fn envelope(
    message_id: &str,
    message_type: &str,
    occurred_at: OffsetDateTime,
    payload: Value,
) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "message_id": message_id,
        "message_type": message_type,
        "schema_version": 1,
        "occurred_at": at(occurred_at),
        "correlation_id": "ecf1-migration",
        "payload": payload,
    }))
    .expect("serialisable")
}
