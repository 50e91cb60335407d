//! A realistic generated stream of input messages, for the benchmark and the reliability suite:
//! registrations, corrections, moves, leavers, claims, releases, passes and fails, deletions,
//! duplicates, late stale snapshots and about 2% invalid messages. Deterministic for a seed.

use serde_json::{Value, json};
use time::format_description::well_known::Rfc3339;
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

/// One generated message.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The body as published.
    pub body: Vec<u8>,
    /// The routing key for its `message_type`.
    pub routing_key: &'static str,
    /// False for the deliberately invalid ones.
    pub valid: bool,
    /// True for exact re-sends of an earlier message.
    pub duplicate: bool,
}

struct Reg {
    id: String,
    trn: String,
    started_day: i64,
}

struct Claim {
    id: String,
    trn: String,
}

/// Generates `messages` messages over `teachers` TRNs (starting at `first_trn`).
pub fn generate(messages: usize, teachers: u32, first_trn: u32, seed: u64) -> Vec<Generated> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let base: OffsetDateTime = datetime!(2025-09-01 08:00 UTC);
    let mut out: Vec<Generated> = Vec::with_capacity(messages);
    let mut regs: Vec<Reg> = Vec::new();
    let mut claims: Vec<Claim> = Vec::new();
    let trn = |rng: &mut fastrand::Rng| format!("{}", first_trn + rng.u32(0..teachers.max(1)));
    let abs = ["AB-TSH-1", "AB-TSH-2", "AB-LA-3"];
    let mut n: u64 = seed.wrapping_mul(1_000_003) % 1_000_000;
    for i in 0..messages {
        n += 1;
        let message_id = format!("{:08x}-0000-4000-8000-{:012x}", seed as u32, n);
        let at = base + Duration::seconds(i as i64 * 7);
        let roll = rng.u32(0..100);
        let (message, valid, duplicate) = match roll {
            _ if roll < 5 && !out.is_empty() => {
                // An exact re-send of an earlier message.
                let earlier = out[rng.usize(0..out.len())].clone();
                out.push(Generated {
                    duplicate: true,
                    ..earlier
                });
                continue;
            }
            _ if roll < 7 => (invalid(&mut rng, &message_id, at), false, false),
            _ if roll < 37 || regs.is_empty() => {
                let r = Reg {
                    id: format!("REG-{seed}-{i}"),
                    trn: trn(&mut rng),
                    started_day: rng.i64(0..30),
                };
                let m = registration(
                    &message_id,
                    at,
                    &r.id,
                    &r.trn,
                    r.started_day,
                    abs[rng.usize(0..abs.len())],
                    rng.bool(),
                    None,
                    false,
                );
                regs.push(r);
                (m, true, false)
            }
            _ if roll < 47 => {
                let r = &regs[rng.usize(0..regs.len())];
                (
                    registration(
                        &message_id,
                        at,
                        &r.id,
                        &r.trn,
                        r.started_day,
                        abs[rng.usize(0..abs.len())],
                        rng.bool(),
                        None,
                        false,
                    ),
                    true,
                    false,
                )
            }
            _ if roll < 52 => {
                let k = rng.usize(0..regs.len());
                regs[k].trn = trn(&mut rng);
                let r = &regs[k];
                (
                    registration(
                        &message_id,
                        at,
                        &r.id,
                        &r.trn,
                        r.started_day,
                        abs[0],
                        true,
                        None,
                        false,
                    ),
                    true,
                    false,
                )
            }
            _ if roll < 57 => {
                let r = &regs[rng.usize(0..regs.len())];
                (
                    registration(
                        &message_id,
                        at,
                        &r.id,
                        &r.trn,
                        r.started_day,
                        abs[0],
                        true,
                        Some(r.started_day + 40),
                        false,
                    ),
                    true,
                    false,
                )
            }
            _ if roll < 80 || claims.is_empty() => {
                let c = Claim {
                    id: format!("IP-{seed}-{i}"),
                    trn: trn(&mut rng),
                };
                let m = claim(
                    &message_id,
                    at,
                    &c.id,
                    &c.trn,
                    abs[rng.usize(0..abs.len())],
                    rng.u8(0..3),
                    None,
                );
                claims.push(c);
                (m, true, false)
            }
            _ if roll < 85 => {
                let c = &claims[rng.usize(0..claims.len())];
                (
                    claim(&message_id, at, &c.id, &c.trn, abs[0], 0, Some(None)),
                    true,
                    false,
                )
            }
            _ if roll < 90 => {
                let c = &claims[rng.usize(0..claims.len())];
                let result = if rng.u8(0..10) == 0 { "fail" } else { "pass" };
                (
                    claim(
                        &message_id,
                        at,
                        &c.id,
                        &c.trn,
                        abs[0],
                        0,
                        Some(Some(result)),
                    ),
                    true,
                    false,
                )
            }
            _ if roll < 93 => {
                if rng.bool() {
                    let r = &regs[rng.usize(0..regs.len())];
                    (
                        registration(
                            &message_id,
                            at,
                            &r.id,
                            &r.trn,
                            r.started_day,
                            abs[0],
                            true,
                            None,
                            true,
                        ),
                        true,
                        false,
                    )
                } else {
                    let c = &claims[rng.usize(0..claims.len())];
                    let mut m = claim(&message_id, at, &c.id, &c.trn, abs[0], 0, None);
                    m["payload"]["deleted"] = json!(true);
                    (m, true, false)
                }
            }
            _ => {
                // A late, stale snapshot: older than anything else for the record.
                let r = &regs[rng.usize(0..regs.len())];
                let old = base - Duration::days(3) + Duration::seconds(i as i64);
                (
                    registration(
                        &message_id,
                        old,
                        &r.id,
                        &r.trn,
                        r.started_day,
                        abs[2],
                        false,
                        None,
                        false,
                    ),
                    true,
                    false,
                )
            }
        };
        let routing_key = if message["message_type"] == "ab_claim" {
            "ab.claim"
        } else {
            "school.registration"
        };
        let body = match message {
            Value::String(raw) => raw.into_bytes(),
            other => serde_json::to_vec(&other).expect("serialisable"),
        };
        out.push(Generated {
            body,
            routing_key,
            valid,
            duplicate,
        });
    }
    out
}

fn stamp(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).expect("formattable")
}

fn day(offset: i64) -> String {
    (datetime!(2025-09-01 00:00 UTC).date() + Duration::days(offset)).to_string()
}

#[allow(clippy::too_many_arguments)]
fn registration(
    id: &str,
    at: OffsetDateTime,
    reg: &str,
    trn: &str,
    started: i64,
    ab: &str,
    provider_led: bool,
    finished: Option<i64>,
    deleted: bool,
) -> Value {
    json!({
        "message_id": id, "message_type": "school_registration", "schema_version": 1, "occurred_at": stamp(at),
        "payload": {
            "registration_id": reg, "trn": trn, "school_urn": 100000 + (started as u32 * 7919) % 899999,
            "started_on": day(started), "finished_on": finished.map(day), "appropriate_body_id": ab,
            "training_programme": if provider_led { "fip" } else { "school_led" },
            "lead_provider_id": provider_led.then_some("LP-AMBITION"), "deleted": deleted,
        }
    })
}

fn claim(
    id: &str,
    at: OffsetDateTime,
    ip: &str,
    trn: &str,
    ab: &str,
    programme: u8,
    finished: Option<Option<&str>>,
) -> Value {
    let finished_on = finished.map(|_| stamp_date(at));
    json!({
        "message_id": id, "message_type": "ab_claim", "schema_version": 1, "occurred_at": stamp(at),
        "payload": {
            "induction_period_id": ip, "trn": trn, "appropriate_body_id": ab, "started_on": "2025-09-01",
            "training_programme": ([None, Some("provider_led"), Some("school_led")])[programme as usize % 3],
            "finished_on": finished_on, "number_of_terms": finished.map(|_| 3.5), "outcome": finished.flatten(),
        }
    })
}

fn stamp_date(at: OffsetDateTime) -> String {
    at.date().to_string()
}

/// One of several kinds of broken message, as a raw body where JSON cannot express it.
fn invalid(rng: &mut fastrand::Rng, id: &str, at: OffsetDateTime) -> Value {
    let good = registration(id, at, "REG-X", "1234567", 0, "AB-TSH-1", true, None, false);
    let mut broken = good.clone();
    match rng.u8(0..6) {
        0 => broken["payload"]["trn"] = json!("12345"),
        1 => broken["schema_version"] = json!(2),
        2 => broken["message_type"] = json!("teacher_merged"),
        3 => broken["payload"]["lead_provider_id"] = json!(null),
        4 => return Value::String("{\"message_id\": \"truncated".to_owned()),
        _ => broken["occurred_at"] = json!("2999-01-01T00:00:00Z"),
    }
    broken
}

/// One open, provider-led registration for each of `count` teachers from `first_trn`, reported
/// before anything `generate` makes: the state a database holds after a bulk load, for the
/// benchmark's runs against a populated database.
pub fn seed_registrations(first_trn: u32, count: u32) -> impl Iterator<Item = Vec<u8>> {
    let at = datetime!(2025-08-01 00:00 UTC);
    (0..count).map(move |g| {
        let message_id = format!("5eed0000-0000-4000-8000-{:012x}", u64::from(g));
        let message = registration(
            &message_id,
            at,
            &format!("SEED-{g}"),
            &(first_trn + g).to_string(),
            0,
            "AB-TSH-1",
            true,
            None,
            false,
        );
        serde_json::to_vec(&message).expect("serialisable")
    })
}
