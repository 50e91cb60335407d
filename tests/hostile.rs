//! Hostile input through the broker (docs/RELIABILITY.md, scenario 6): a corpus of malformed
//! messages of every reason code, deeply nested, with huge numbers, 10 MB bodies, invalid UTF-8,
//! wrong content types and missing properties. Each must be parked once, unchanged, with the
//! reason the contract gives, and the worker must go on with the valid messages around them.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::app::{TestApp, header};
use common::{bytes, claim, poison_trigger_sql, registration, set, without};
use induction_reconciler::broker::json_properties;
use induction_reconciler::messages::peek;
use lapin::BasicProperties;
use lapin::types::FieldTable;
use serde_json::{Value, json};

const TEN_MB: usize = 10 * 1024 * 1024;

/// What the worker must do with a case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Parked(&'static str),
    Accepted,
}

struct Case {
    name: &'static str,
    routing_key: &'static str,
    body: Vec<u8>,
    properties: BasicProperties,
    expect: Expect,
}

fn case(name: &'static str, body: Vec<u8>, expect: Expect) -> Case {
    // Each type under its own routing key, as a producer must send it (CONTRACT.md section 2).
    let routing_key = match peek(&body).message_type.as_deref() {
        Some("ab_claim") => "ab.claim",
        _ => "school.registration",
    };
    Case {
        name,
        routing_key,
        body,
        properties: json_properties("", FieldTable::default()),
        expect,
    }
}

fn parked(name: &'static str, reason: &'static str, body: Vec<u8>) -> Case {
    case(name, body, Expect::Parked(reason))
}

/// The message's JSON text with the value at `path` replaced by `raw` text (for numbers and
/// literals serde_json would not write).
fn with_raw(message: Value, path: &str, raw: &str) -> Vec<u8> {
    let marked = set(message, path, json!("@@raw@@"));
    serde_json::to_string(&marked)
        .unwrap()
        .replace("\"@@raw@@\"", raw)
        .into_bytes()
}

/// A valid registration padded with an unknown field to exactly `size` bytes.
fn padded(n: u64, trn: &str, size: usize) -> Vec<u8> {
    let base = bytes(&set(
        registration(n, &format!("pad{n}"), trn),
        "padding",
        json!(""),
    ));
    let padding = size - base.len();
    let text = String::from_utf8(base).unwrap();
    let body = text.replace(
        "\"padding\":\"\"",
        &format!("\"padding\":\"{}\"", "x".repeat(padding)),
    );
    assert_eq!(body.len(), size);
    body.into_bytes()
}

fn reg(n: u64) -> Value {
    registration(n, &format!("hr{n}"), &format!("{}", 3_000_000 + n))
}

fn clm(n: u64) -> Value {
    claim(n, &format!("hc{n}"), &format!("{}", 3_000_000 + n))
}

/// A claim that has finished (released), as the base of the finished-claim rules.
fn finished_claim(n: u64) -> Value {
    let c = set(clm(n), "payload.finished_on", json!("2025-09-05"));
    set(c, "payload.number_of_terms", json!(1))
}

fn corpus(reused: &Value) -> Vec<Case> {
    use Expect::Accepted;
    let mut cases = vec![
        // too_large: the size is checked before anything else.
        parked(
            "one byte over the limit",
            "too_large",
            padded(1, "3100001", 65_537),
        ),
        parked("10 MB of JSON", "too_large", padded(2, "3100002", TEN_MB)),
        parked("10 MB of 0xff bytes", "too_large", vec![0xff; TEN_MB]),
        parked("10 MB of open brackets", "too_large", vec![b'['; TEN_MB]),
        // invalid_utf8
        parked(
            "0xff in a string",
            "invalid_utf8",
            b"{\"message_type\":\"\xff\"}".to_vec(),
        ),
        parked(
            "overlong encoding",
            "invalid_utf8",
            b"{\"a\":\"\xc0\xaf\"}".to_vec(),
        ),
        parked(
            "encoded surrogate",
            "invalid_utf8",
            b"{\"a\":\"\xed\xa0\x80\"}".to_vec(),
        ),
        parked(
            "truncated sequence",
            "invalid_utf8",
            b"{\"a\":\"\xe2\x82".to_vec(),
        ),
        parked(
            "Latin-1 text",
            "invalid_utf8",
            b"{\"school\":\"Caf\xe9\"}".to_vec(),
        ),
        parked("UTF-16 with a byte order mark", "invalid_utf8", {
            let mut utf16 = vec![0xff, 0xfe];
            for unit in String::from_utf8(bytes(&reg(3))).unwrap().encode_utf16() {
                utf16.extend_from_slice(&unit.to_le_bytes());
            }
            utf16
        }),
        // invalid_json
        parked("empty body", "invalid_json", Vec::new()),
        parked("whitespace", "invalid_json", b" \n\t ".to_vec()),
        parked("null", "invalid_json", b"null".to_vec()),
        parked("an array of a message", "invalid_json", {
            let mut array = b"[".to_vec();
            array.extend(bytes(&reg(4)));
            array.push(b']');
            array
        }),
        parked("a number", "invalid_json", b"42".to_vec()),
        parked(
            "a string",
            "invalid_json",
            b"\"school_registration\"".to_vec(),
        ),
        parked(
            "truncated object",
            "invalid_json",
            bytes(&reg(5))[..40].to_vec(),
        ),
        parked("trailing garbage", "invalid_json", {
            let mut body = bytes(&reg(6));
            body.extend_from_slice(b" x");
            body
        }),
        parked("two objects", "invalid_json", {
            let mut body = bytes(&reg(7));
            body.extend(bytes(&reg(8)));
            body
        }),
        parked("30,000 nested arrays", "invalid_json", {
            let mut body = b"{\"payload\":".to_vec();
            body.extend(std::iter::repeat_n(b'[', 30_000));
            body.extend(std::iter::repeat_n(b']', 30_000));
            body.push(b'}');
            body
        }),
        parked("10,000 nested objects", "invalid_json", {
            let mut body = "{\"a\":".repeat(10_000).into_bytes();
            body.push(b'1');
            body.extend(std::iter::repeat_n(b'}', 10_000));
            body
        }),
        parked(
            "NaN",
            "invalid_json",
            with_raw(reg(9), "schema_version", "NaN"),
        ),
        parked(
            "single quotes",
            "invalid_json",
            b"{'message_type':'ab_claim'}".to_vec(),
        ),
        parked("trailing comma", "invalid_json", {
            let text = String::from_utf8(bytes(&reg(10))).unwrap();
            format!("{},}}", &text[..text.len() - 1]).into_bytes()
        }),
        parked("a comment", "invalid_json", {
            let text = String::from_utf8(bytes(&reg(11))).unwrap();
            format!("// registration\n{text}").into_bytes()
        }),
        parked("UTF-8 byte order mark", "invalid_json", {
            let mut body = b"\xef\xbb\xbf".to_vec();
            body.extend(bytes(&reg(12)));
            body
        }),
        parked("raw NUL in a string", "invalid_json", {
            with_raw(reg(13), "payload.appropriate_body_id", "\"AB\u{0}1\"")
        }),
        parked("lone surrogate escape", "invalid_json", {
            with_raw(reg(14), "payload.appropriate_body_id", "\"\\ud800\"")
        }),
        // unknown_message_type
        parked(
            "message_type missing",
            "unknown_message_type",
            bytes(&without(reg(15), "message_type")),
        ),
        parked(
            "message_type null",
            "unknown_message_type",
            bytes(&set(reg(16), "message_type", Value::Null)),
        ),
        parked(
            "message_type a number",
            "unknown_message_type",
            bytes(&set(reg(17), "message_type", json!(1))),
        ),
        parked(
            "message_type in another case",
            "unknown_message_type",
            bytes(&set(reg(18), "message_type", json!("School_Registration"))),
        ),
        parked(
            "message_type empty",
            "unknown_message_type",
            bytes(&set(reg(19), "message_type", json!(""))),
        ),
        parked(
            "message_type an array",
            "unknown_message_type",
            bytes(&set(reg(20), "message_type", json!(["ab_claim"]))),
        ),
        parked(
            "message_type unknown",
            "unknown_message_type",
            bytes(&set(reg(21), "message_type", json!("teacher_deleted"))),
        ),
        // unauthorised_publisher: a claim under the registrations' routing key (and, below, a
        // registration under the claims'; no user_id and a user not allowed are in
        // tests/publishers.rs).
        Case {
            routing_key: "school.registration",
            ..parked(
                "a claim under the registration routing key",
                "unauthorised_publisher",
                bytes(&clm(97)),
            )
        },
        // unsupported_schema_version
        parked(
            "schema_version missing",
            "unsupported_schema_version",
            bytes(&without(reg(22), "schema_version")),
        ),
        parked(
            "schema_version null",
            "unsupported_schema_version",
            bytes(&set(reg(23), "schema_version", Value::Null)),
        ),
        parked(
            "schema_version a string",
            "unsupported_schema_version",
            bytes(&set(reg(24), "schema_version", json!("1"))),
        ),
        parked(
            "schema_version 1.0",
            "unsupported_schema_version",
            with_raw(reg(25), "schema_version", "1.0"),
        ),
        parked(
            "schema_version 1e0",
            "unsupported_schema_version",
            with_raw(reg(26), "schema_version", "1e0"),
        ),
        parked(
            "schema_version 2",
            "unsupported_schema_version",
            bytes(&set(reg(27), "schema_version", json!(2))),
        ),
        parked(
            "schema_version -1",
            "unsupported_schema_version",
            bytes(&set(reg(28), "schema_version", json!(-1))),
        ),
        parked(
            "schema_version beyond 64 bits",
            "unsupported_schema_version",
            with_raw(reg(29), "schema_version", "18446744073709551617"),
        ),
        parked(
            "schema_version true",
            "unsupported_schema_version",
            bytes(&set(reg(30), "schema_version", json!(true))),
        ),
        // invalid_field: the envelope
        parked(
            "message_id missing",
            "invalid_field",
            bytes(&without(reg(31), "message_id")),
        ),
        parked(
            "message_id not a UUID",
            "invalid_field",
            bytes(&set(reg(32), "message_id", json!("not-a-uuid"))),
        ),
        parked(
            "message_id in braces",
            "invalid_field",
            bytes(&set(
                reg(33),
                "message_id",
                json!("{00000000-0000-4000-8000-000000000021}"),
            )),
        ),
        parked(
            "occurred_at without an offset",
            "invalid_field",
            bytes(&set(reg(34), "occurred_at", json!("2025-09-01T09:00:00"))),
        ),
        parked(
            "occurred_at a date",
            "invalid_field",
            bytes(&set(reg(35), "occurred_at", json!("2025-09-01"))),
        ),
        parked(
            "occurred_at a number",
            "invalid_field",
            bytes(&set(reg(36), "occurred_at", json!(1_756_717_200))),
        ),
        parked(
            "correlation_id a number",
            "invalid_field",
            bytes(&set(reg(37), "correlation_id", json!(7))),
        ),
        parked(
            "payload missing",
            "invalid_field",
            bytes(&without(reg(38), "payload")),
        ),
        parked(
            "payload an array",
            "invalid_field",
            bytes(&set(reg(39), "payload", json!([]))),
        ),
        // invalid_field: a registration
        parked(
            "trn of 6 digits",
            "invalid_field",
            bytes(&set(reg(40), "payload.trn", json!("310004"))),
        ),
        parked(
            "trn of 8 digits",
            "invalid_field",
            bytes(&set(reg(41), "payload.trn", json!("31000410"))),
        ),
        parked(
            "trn with a letter",
            "invalid_field",
            bytes(&set(reg(42), "payload.trn", json!("31OOO42"))),
        ),
        parked(
            "trn a number",
            "invalid_field",
            bytes(&set(reg(43), "payload.trn", json!(3_100_043))),
        ),
        parked(
            "trn of Arabic-Indic digits",
            "invalid_field",
            bytes(&set(reg(44), "payload.trn", json!("٣١٠٠٠٤٤"))),
        ),
        parked(
            "school_urn below the range",
            "invalid_field",
            bytes(&set(reg(45), "payload.school_urn", json!(99_999))),
        ),
        parked(
            "school_urn a string",
            "invalid_field",
            bytes(&set(reg(46), "payload.school_urn", json!("123456"))),
        ),
        parked(
            "school_urn a fraction",
            "invalid_field",
            with_raw(reg(47), "payload.school_urn", "123456.5"),
        ),
        parked(
            "school_urn beyond 64 bits",
            "invalid_field",
            with_raw(
                reg(48),
                "payload.school_urn",
                "123456789012345678901234567890",
            ),
        ),
        parked(
            "school_urn 1e400",
            "invalid_json",
            with_raw(reg(49), "payload.school_urn", "1e400"),
        ),
        parked(
            "started_on before September 2021",
            "invalid_field",
            bytes(&set(reg(50), "payload.started_on", json!("2021-08-31"))),
        ),
        parked(
            "started_on 30 February",
            "invalid_field",
            bytes(&set(reg(51), "payload.started_on", json!("2023-02-30"))),
        ),
        parked(
            "finished_on before started_on",
            "invalid_field",
            bytes(&set(reg(52), "payload.finished_on", json!("2025-08-31"))),
        ),
        parked(
            "appropriate_body_id of 65 characters",
            "invalid_field",
            bytes(&set(
                reg(53),
                "payload.appropriate_body_id",
                json!("A".repeat(65)),
            )),
        ),
        parked(
            "appropriate_body_id with a space",
            "invalid_field",
            bytes(&set(reg(54), "payload.appropriate_body_id", json!("AB 1"))),
        ),
        parked(
            "appropriate_body_id empty",
            "invalid_field",
            bytes(&set(reg(55), "payload.appropriate_body_id", json!(""))),
        ),
        parked(
            "training_programme unknown",
            "invalid_field",
            bytes(&set(
                reg(56),
                "payload.training_programme",
                json!("blended"),
            )),
        ),
        parked(
            "provider_led without a lead provider",
            "invalid_field",
            bytes(&without(reg(57), "payload.lead_provider_id")),
        ),
        parked(
            "school_led with a lead provider",
            "invalid_field",
            bytes(&set(
                reg(58),
                "payload.training_programme",
                json!("school_led"),
            )),
        ),
        parked(
            "deleted a string",
            "invalid_field",
            bytes(&set(reg(59), "payload.deleted", json!("true"))),
        ),
        parked(
            "registration_id missing",
            "invalid_field",
            bytes(&without(reg(60), "payload.registration_id")),
        ),
        // invalid_field: a claim
        Case {
            routing_key: "ab.claim",
            ..parked(
                "claim started after it occurred",
                "invalid_field",
                bytes(&set(clm(61), "payload.started_on", json!("2025-09-11"))),
            )
        },
        Case {
            routing_key: "ab.claim",
            ..parked(
                "claim finished without number_of_terms",
                "invalid_field",
                bytes(&without(finished_claim(62), "payload.number_of_terms")),
            )
        },
        Case {
            routing_key: "ab.claim",
            ..parked(
                "number_of_terms with two decimals",
                "invalid_field",
                with_raw(finished_claim(63), "payload.number_of_terms", "1.25"),
            )
        },
        Case {
            routing_key: "ab.claim",
            ..parked(
                "number_of_terms 17",
                "invalid_field",
                bytes(&set(
                    finished_claim(64),
                    "payload.number_of_terms",
                    json!(17),
                )),
            )
        },
        Case {
            routing_key: "ab.claim",
            ..parked(
                "number_of_terms negative",
                "invalid_field",
                bytes(&set(
                    finished_claim(65),
                    "payload.number_of_terms",
                    json!(-1),
                )),
            )
        },
        Case {
            routing_key: "ab.claim",
            ..parked(
                "number_of_terms without finished_on",
                "invalid_field",
                bytes(&set(clm(66), "payload.number_of_terms", json!(2))),
            )
        },
        Case {
            routing_key: "ab.claim",
            ..parked(
                "outcome without finished_on",
                "invalid_field",
                bytes(&set(clm(67), "payload.outcome", json!("pass"))),
            )
        },
        Case {
            routing_key: "ab.claim",
            ..parked(
                "outcome unknown",
                "invalid_field",
                bytes(&set(finished_claim(68), "payload.outcome", json!("passed"))),
            )
        },
        Case {
            routing_key: "ab.claim",
            ..parked(
                "legacy programme unknown",
                "invalid_field",
                bytes(&set(
                    clm(69),
                    "payload.induction_programme",
                    json!("blended"),
                )),
            )
        },
        // occurred_at_in_future
        parked(
            "occurred_at next year",
            "occurred_at_in_future",
            bytes(&set(reg(70), "occurred_at", json!("2999-01-01T00:00:00Z"))),
        ),
        parked(
            "occurred_at in year 9999",
            "occurred_at_in_future",
            bytes(&set(
                reg(71),
                "occurred_at",
                json!("9999-12-31T23:59:59+14:00"),
            )),
        ),
        // message_id_reused
        parked(
            "a message_id reused with other bytes",
            "message_id_reused",
            bytes(&set(reused.clone(), "payload.school_urn", json!(111_111))),
        ),
        parked("a message_id reused in other case", "message_id_reused", {
            let upper = reused["message_id"].as_str().unwrap().to_uppercase();
            bytes(&set(reused.clone(), "message_id", json!(upper)))
        }),
        // processing_failed: the trigger installed by the test fails for this record.
        parked(
            "a record the database refuses",
            "processing_failed",
            bytes(&registration(72, "poison", "3100072")),
        ),
        // Bad input without the usual properties is still parked, with its reason.
        Case {
            properties: BasicProperties::default(),
            ..parked("no properties at all", "invalid_json", b"{\"no\":".to_vec())
        },
        Case {
            properties: BasicProperties::default().with_content_type("text/plain".into()),
            ..parked("text/plain and not JSON", "invalid_json", b"hello".to_vec())
        },
        // The body decides: valid JSON with odd properties is accepted (ARCHITECTURE.md).
        Case {
            properties: BasicProperties::default(),
            ..case("valid, no properties", bytes(&reg(73)), Accepted)
        },
        Case {
            properties: BasicProperties::default().with_content_type("text/plain".into()),
            ..case("valid, text/plain", bytes(&reg(74)), Accepted)
        },
        Case {
            properties: BasicProperties::default()
                .with_content_type("application/xml".into())
                .with_content_encoding("gzip".into()),
            ..case("valid, claiming XML and gzip", bytes(&reg(75)), Accepted)
        },
        // The routing key does decide (CONTRACT.md section 2, revised 2026-12-01).
        Case {
            routing_key: "ab.claim",
            ..parked(
                "valid, on the other routing key",
                "unauthorised_publisher",
                bytes(&reg(76)),
            )
        },
        case(
            "valid, exactly 65,536 bytes",
            padded(77, "3100077", 65_536),
            Accepted,
        ),
        case(
            "valid, with a huge number in an unknown field",
            with_raw(reg(78), "extra", "123456789012345678901234567890"),
            Accepted,
        ),
    ];
    // Names and bodies are unique, so that each parked message identifies its case.
    let names: BTreeSet<_> = cases.iter().map(|c| c.name).collect();
    assert_eq!(names.len(), cases.len(), "case names are unique");
    let bodies: BTreeSet<_> = cases.iter().map(|c| c.body.clone()).collect();
    assert_eq!(bodies.len(), cases.len(), "case bodies are unique");
    cases.sort_by_key(|c| c.name);
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_corpus_is_parked_case_by_case_and_the_worker_goes_on() {
    let mut app = TestApp::spawn().await;
    sqlx::raw_sql(sqlx::AssertSqlSafe(poison_trigger_sql("poison")))
        .execute(app.store.pool())
        .await
        .unwrap();
    let reused = reg(79);
    app.publish(&reused).await;
    assert_eq!(app.next_outcome().await["version"], 1);

    let cases = corpus(&reused);
    let to_park: Vec<&Case> = cases
        .iter()
        .filter(|c| matches!(c.expect, Expect::Parked(_)))
        .collect();
    assert!(to_park.len() >= 60, "at least 60 malformed messages");
    let reasons: BTreeSet<&str> = to_park
        .iter()
        .filter_map(|c| match c.expect {
            Expect::Parked(reason) => Some(reason),
            Expect::Accepted => None,
        })
        .collect();
    assert_eq!(reasons.len(), 10, "every reason code: {reasons:?}");

    for c in &cases {
        app.publish_raw(c.routing_key, &c.body, c.properties.clone())
            .await;
    }
    // A valid message after the corpus is applied: nothing held it up.
    app.publish(&reg(80)).await;
    let mut seen_trns = BTreeSet::new();
    for outcome in app.outcomes_until_quiet(Duration::from_secs(3)).await {
        seen_trns.insert(outcome["trn"].as_str().unwrap().to_owned());
    }
    assert!(
        seen_trns.contains("3000080"),
        "the message after the corpus was applied"
    );

    // Each malformed message parked exactly once, unchanged, with its reason.
    let parked = app.take_parked(to_park.len()).await;
    assert_eq!(parked.len(), to_park.len(), "each malformed message parked");
    assert_eq!(app.parked_waiting().await, 0, "nothing parked twice");
    let by_body: BTreeMap<&[u8], &Case> = cases.iter().map(|c| (c.body.as_slice(), c)).collect();
    let mut parked_names = BTreeSet::new();
    for (headers, body) in &parked {
        let c = by_body
            .get(body.as_slice())
            .unwrap_or_else(|| panic!("a parked body ({} bytes) is not in the corpus", body.len()));
        let reason = header(headers, "x-parked-reason").unwrap();
        assert_eq!(
            Expect::Parked(reason_static(&reason)),
            c.expect,
            "{}",
            c.name
        );
        assert!(parked_names.insert(c.name), "{} parked twice", c.name);
        let detail = header(headers, "x-parked-detail").unwrap();
        assert!(!detail.is_empty(), "{}: a detail", c.name);
        assert!(detail.len() < 300, "{}: a short detail: {detail}", c.name);
        assert!(
            !detail.contains("3100") && !detail.contains("30000") && !detail.contains("Caf"),
            "{}: the detail echoes data: {detail}",
            c.name
        );
        assert!(header(headers, "x-parked-at").is_some(), "{}", c.name);
        assert_eq!(
            header(headers, "x-original-routing-key").as_deref(),
            Some(c.routing_key),
            "{}",
            c.name
        );
    }

    // Only the accepted messages are seen; the corpus left nothing else behind.
    let inbox: i64 = sqlx::query_scalar("select count(*) from inbox")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    let accepted = cases
        .iter()
        .filter(|c| c.expect == Expect::Accepted)
        .count();
    assert_eq!(
        inbox,
        accepted as i64 + 2,
        "the accepted cases, the reused and the last"
    );
    let teachers: Vec<String> = sqlx::query_scalar("select trn from teachers order by 1")
        .fetch_all(app.store.pool())
        .await
        .unwrap();
    let expected: BTreeSet<String> = [
        "3000073", "3000074", "3000075", "3000078", "3000079", "3000080", "3100077",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(teachers.into_iter().collect::<BTreeSet<_>>(), expected);
    app.teardown().await;
}

fn reason_static(reason: &str) -> &'static str {
    [
        "too_large",
        "invalid_utf8",
        "invalid_json",
        "unknown_message_type",
        "unauthorised_publisher",
        "unsupported_schema_version",
        "invalid_field",
        "occurred_at_in_future",
        "message_id_reused",
        "processing_failed",
    ]
    .into_iter()
    .find(|r| *r == reason)
    .unwrap_or_else(|| panic!("an unknown reason code: {reason}"))
}
