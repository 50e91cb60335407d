//! The operator commands run as processes against a worker's database and queues: `explain`,
//! `parked list | replay | purge`, `outbox status`, `check-config`, and `--help` for each.

mod common;

use std::process::{Command, Output};

use common::app::TestApp;
use common::{claim, registration, set};
use induction_reconciler::config::Settings;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_induction-reconciler");

fn run(settings: &Settings, args: &[&str]) -> Output {
    let t = &settings.topology;
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .env("DATABASE_URL", settings.database.url.expose_secret())
        .env("AMQP_URL", settings.amqp.url.expose_secret())
        .env("INDUCTION__TOPOLOGY__INPUT_EXCHANGE", &t.input_exchange)
        .env("INDUCTION__TOPOLOGY__INBOX_QUEUE", &t.inbox_queue)
        .env("INDUCTION__TOPOLOGY__OUTCOME_EXCHANGE", &t.outcome_exchange)
        .env("INDUCTION__TOPOLOGY__PARKING_QUEUE", &t.parking_queue)
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    assert!(
        output.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[test]
fn every_command_has_help() {
    for args in [
        vec!["--help"],
        vec!["run", "--help"],
        vec!["migrate", "--help"],
        vec!["publish", "--help"],
        vec!["watch", "--help"],
        vec!["simulate", "--help"],
        vec!["explain", "--help"],
        vec!["parked", "--help"],
        vec!["parked", "list", "--help"],
        vec!["parked", "replay", "--help"],
        vec!["parked", "purge", "--help"],
        vec!["outbox", "status", "--help"],
        vec!["check-config", "--help"],
        vec!["resync", "--help"],
        vec!["verify", "--help"],
    ] {
        let output = Command::new(BIN).args(&args).output().unwrap();
        assert!(output.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&output.stdout).contains("Usage:"),
            "{args:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_records_outcome_and_history() {
    let mut app = TestApp::spawn().await;
    // Loaded from ECF1: the record and the outcome say so.
    app.publish(&set(
        registration(1, "r1", "1000001"),
        "origin",
        json!("migration"),
    ))
    .await;
    app.next_outcome().await;
    app.publish(&set(
        claim(2, "ip1", "1000001"),
        "payload.appropriate_body_id",
        json!("AB-9"),
    ))
    .await;
    app.next_outcome().await;

    let text = stdout(&run(&app.settings, &["explain", "1000001"]));
    assert!(
        text.contains("Current outcome: conflict (claim_differs_from_registration), version 2"),
        "{text}"
    );
    assert!(text.contains("discrepancies: appropriate_body"));
    assert!(text.contains("appropriate body: AB-9 (from appropriate_body)"));
    assert!(text.contains("Records held (2)"));
    assert!(
        text.contains("applied    school_registration registration r1"),
        "{text}"
    );
    assert!(text.contains("emitted    version 2 conflict"), "{text}");

    let json: Value = serde_json::from_str(&stdout(&run(
        &app.settings,
        &["explain", "1000001", "--json"],
    )))
    .unwrap();
    assert_eq!(json["current_outcome"]["version"], 2);
    assert_eq!(json["records"].as_array().unwrap().len(), 2);
    let origins: Vec<&str> = json["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["origin"].as_str().unwrap())
        .collect();
    assert_eq!(origins, ["migration", "live"]);
    let current = &json["current_outcome"];
    assert_eq!(current["school_registration"]["origin"], "migration");
    assert_eq!(current["induction_period"]["origin"], "live");
    assert_eq!(current["caused_by"]["origin"], "live");
    assert_eq!(json["history"].as_array().unwrap().len(), 4);

    let unknown = stdout(&run(&app.settings, &["explain", "7777777"]));
    assert!(unknown.contains("No outcome has been emitted"));
    let bad = run(&app.settings, &["explain", "12"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("a TRN is exactly 7 digits"));
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_messages_are_listed_replayed_and_purged() {
    let mut app = TestApp::spawn().await;
    // Two messages parked for a bad field, one for an unknown type.
    let bad_trn = set(registration(1, "r1", "1000001"), "payload.trn", json!("1"));
    let bad_urn = set(
        registration(2, "r2", "1000002"),
        "payload.school_urn",
        json!(5),
    );
    app.publish(&bad_trn).await;
    app.publish(&bad_urn).await;
    app.publish_raw(
        "ab.claim",
        br#"{"message_type":"nope"}"#,
        lapin::BasicProperties::default(),
    )
    .await;
    app.publish(&registration(3, "r3", "1000003")).await;
    app.next_outcome().await;
    app.wait_for_inbox(1).await;

    // Listing leaves them parked; it prints no bodies.
    let list = run(&app.settings, &["parked", "list", "--json"]);
    let lines: Vec<Value> = stdout(&list)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert!(String::from_utf8_lossy(&list.stderr).contains("3 parked messages listed"));
    assert!(!stdout(&list).contains("1000001"));
    let reasons: Vec<&str> = lines
        .iter()
        .map(|l| l["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons.iter().filter(|r| **r == "invalid_field").count(), 2);
    assert_eq!(
        stdout(&run(&app.settings, &["parked", "list"]))
            .lines()
            .count(),
        3
    );

    // Replaying needs a selection; replay one by message id, after fixing nothing: it parks again.
    let refused = run(&app.settings, &["parked", "replay"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--all, --message-id or --reason"));
    let id = bad_urn["message_id"].as_str().unwrap();
    assert_eq!(
        stdout(&run(
            &app.settings,
            &["parked", "replay", "--message-id", id]
        ))
        .trim(),
        "1 parked messages replayed"
    );
    // The replayed message went back through the worker and was parked again, with its routing key.
    let deadline = tokio::time::Instant::now() + common::app::PATIENCE;
    loop {
        let again = stdout(&run(
            &app.settings,
            &["parked", "list", "--json", "--message-id", id],
        ));
        if again.lines().count() == 1 {
            let entry: Value = serde_json::from_str(again.trim()).unwrap();
            assert_eq!(entry["original_routing_key"], "school.registration");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replayed message never came back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }

    // Purge by reason, then everything.
    assert_eq!(
        stdout(&run(
            &app.settings,
            &["parked", "purge", "--reason", "unknown_message_type"]
        ))
        .trim(),
        "1 parked messages purged"
    );
    assert_eq!(
        stdout(&run(&app.settings, &["parked", "purge", "--all"])).trim(),
        "2 parked messages purged"
    );
    assert!(stdout(&run(&app.settings, &["parked", "list"])).is_empty());
    let unknown_reason = run(&app.settings, &["parked", "purge", "--reason", "whatever"]);
    assert!(String::from_utf8_lossy(&unknown_reason.stderr).contains("unknown reason code"));
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_status_and_check_config() {
    let mut app = TestApp::prepare(|_| {}).await;
    app.start_worker_with(|s| s.relay.enabled = false).await;
    app.publish(&registration(1, "r1", "1000001")).await;
    app.wait_until("select count(*) = 1 from outbox").await;
    let status = stdout(&run(&app.settings, &["outbox", "status"]));
    assert!(status.contains("pending: 1"), "{status}");
    assert!(status.contains("published: 0"));
    assert!(status.contains("last published: -"));

    let config = run(&app.settings, &["check-config"]);
    let text = stdout(&config);
    assert!(text.contains(&format!(
        "inbox_queue = \"{}\"",
        app.settings.topology.inbox_queue
    )));
    assert!(text.contains("amqp://guest:***@"), "{text}");
    assert!(!text.contains("guest:guest"));
    let with_password = Command::new(BIN)
        .args(["check-config"])
        .env(
            "DATABASE_URL",
            "postgres://app:hunter2@db.internal:5432/induction",
        )
        .output()
        .unwrap();
    let text = stdout(&with_password);
    assert!(text.contains("postgres://app:***@db.internal:5432/induction"));
    assert!(!text.contains("hunter2"));
    app.teardown().await;
}

/// The publisher lists come from the environment as comma-separated lists, and `check-config`
/// warns when one user may publish both types on a broker that is not local, and not on the
/// development defaults (everything `guest` on loopback).
#[test]
fn check_config_reads_publisher_lists_and_warns_about_one_user_for_both_types() {
    let check = |envs: &[(&str, &str)]| {
        let mut command = Command::new(BIN);
        command.args(["check-config"]).env_remove("AMQP_URL");
        for (key, value) in envs {
            command.env(key, value);
        }
        command.output().unwrap()
    };
    let defaults = check(&[]);
    assert!(defaults.status.success());
    assert!(
        !String::from_utf8_lossy(&defaults.stderr).contains("warning"),
        "the development defaults are quiet"
    );
    let shared = check(&[
        ("AMQP_URL", "amqp://worker:s3cret@rabbit.internal:5672/%2f"),
        (
            "INDUCTION__PUBLISHERS__AB_CLAIM",
            "ab-service,ab-bulk-loader",
        ),
        (
            "INDUCTION__PUBLISHERS__SCHOOL_REGISTRATION",
            "school-service,ab-bulk-loader",
        ),
    ]);
    let text = stdout(&shared);
    assert!(
        text.contains(r#"ab_claim = ["ab-service", "ab-bulk-loader"]"#),
        "{text}"
    );
    let warnings = String::from_utf8_lossy(&shared.stderr);
    assert!(
        warnings.contains(r#"user "ab-bulk-loader" may publish both"#),
        "{warnings}"
    );
    assert!(!warnings.contains("ab-service\" may"), "{warnings}");
    let separate = check(&[
        ("AMQP_URL", "amqp://worker:s3cret@rabbit.internal:5672/%2f"),
        ("INDUCTION__PUBLISHERS__AB_CLAIM", "ab-service"),
        (
            "INDUCTION__PUBLISHERS__SCHOOL_REGISTRATION",
            "school-service",
        ),
    ]);
    assert!(!String::from_utf8_lossy(&separate.stderr).contains("warning"));
}

/// `amqp.url` may list several nodes: commands (and the worker) connect to the first that
/// answers, and `check-config` shows every URL with its password redacted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_broker_urls_connect_to_the_first_that_answers() {
    let app = TestApp::prepare(|_| {}).await;
    let live = app.settings.amqp.url.expose_secret().to_owned();
    let mut settings = app.settings.clone();
    // Port 1 refuses connections: the first node is down.
    let list = format!("amqp://guest:guest@127.0.0.1:1/%2f,{live}");
    settings.amqp.url = SecretString::from(list.clone());
    let listed = run(&settings, &["parked", "list"]);
    assert!(
        listed.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let config = stdout(&run(&settings, &["check-config"]));
    assert!(
        config.contains("url = \"amqp://guest:***@127.0.0.1:1/%2f,amqp://guest:***@"),
        "{config}"
    );
    assert!(!config.contains("guest:guest"), "{config}");
    // Every node down: the command fails and says so.
    settings.amqp.url =
        SecretString::from("amqp://guest:guest@127.0.0.1:1/%2f,amqp://guest:guest@127.0.0.1:2/%2f");
    let down = run(&settings, &["parked", "list"]);
    assert!(!down.status.success());
    assert!(
        String::from_utf8_lossy(&down.stderr).contains("cannot connect to the broker"),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    app.teardown().await;
}
