//! The broker's half of "who may say what" (CONTRACT.md section 2): the shipped
//! `deploy/rabbitmq/definitions.json`, loaded into a throwaway RabbitMQ node, lets each producer
//! publish its own message type only, refuses a forged `user_id`, keeps the worker's user from
//! publishing inputs, and lets a claim from the AB's user through to the worker.

mod common;

use std::time::Duration;

use common::rabbit::RabbitNode;
use common::{bytes, claim, mid, registration};
use induction_reconciler::broker::{Broker, json_properties};
use induction_reconciler::config::Settings;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use secrecy::SecretString;

const USERS: [&str; 4] = [
    "induction-reconciler",
    "induction-operator",
    "school-service",
    "ab-service",
];

fn url(node: &RabbitNode, user: &str) -> SecretString {
    SecretString::from(format!(
        "amqp://{user}:pw-{user}@127.0.0.1:{}/induction",
        node.port
    ))
}

async fn connect(node: &RabbitNode, user: &str) -> Broker {
    Broker::connect(&url(node, user), "permissions test")
        .await
        .unwrap_or_else(|e| panic!("connect as {user}: {e}"))
}

/// Publishes with a confirm as `user`; the broker's refusal as text, or `None` if accepted.
async fn refusal(node: &RabbitNode, user: &str, key: &str, body: &[u8]) -> Option<String> {
    let broker = connect(node, user).await;
    let publisher = broker.publisher().await.unwrap();
    let result = publisher
        .publish(
            "induction.events",
            key,
            body,
            json_properties("", FieldTable::default()),
        )
        .await;
    broker.close().await;
    result.err().map(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_definitions_let_each_producer_publish_only_its_own_type() {
    induction_reconciler::telemetry::install_crypto_provider();
    let node = RabbitNode::start();
    let definitions = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/rabbitmq/definitions.json"
    );
    let definitions = std::fs::read(definitions).unwrap();
    node.import_definitions(&definitions);
    for user in USERS {
        node.ctl(&["change_password", user, &format!("pw-{user}")]);
    }
    let registration_body = bytes(&registration(1, "R-1", "4200001"));
    let claim_body = bytes(&claim(2, "IP-2", "4200002"));

    // Each producer under its own key is accepted; under the other's, refused by the broker.
    assert_eq!(
        refusal(
            &node,
            "school-service",
            "school.registration",
            &registration_body
        )
        .await,
        None
    );
    let refused = refusal(&node, "school-service", "ab.claim", &claim_body).await;
    assert!(
        refused
            .as_deref()
            .is_some_and(|e| e.contains("ACCESS_REFUSED")),
        "{refused:?}"
    );
    let refused = refusal(
        &node,
        "ab-service",
        "school.registration",
        &registration_body,
    )
    .await;
    assert!(
        refused
            .as_deref()
            .is_some_and(|e| e.contains("ACCESS_REFUSED")),
        "{refused:?}"
    );
    // The worker's own user cannot publish inputs at all.
    let refused = refusal(&node, "induction-reconciler", "ab.claim", &claim_body).await;
    assert!(
        refused
            .as_deref()
            .is_some_and(|e| e.contains("ACCESS_REFUSED")),
        "{refused:?}"
    );

    // A user_id that is not the connection's user is refused (406), whatever the key.
    let school = connect(&node, "school-service").await;
    let channel = school.channel().await.unwrap();
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let forged = json_properties("", FieldTable::default()).with_user_id("ab-service".into());
    let sent = channel
        .basic_publish(
            "induction.events".into(),
            "school.registration".into(),
            BasicPublishOptions::default(),
            &registration_body,
            forged,
        )
        .await;
    let outcome = match sent {
        Ok(confirm) => confirm.await.map(|_| ()),
        Err(error) => Err(error),
    };
    // The broker closes the channel; lapin reports it on the confirm or on the next call.
    let closed = match outcome {
        Err(error) => error.to_string(),
        Ok(()) => channel
            .basic_publish(
                "induction.events".into(),
                "school.registration".into(),
                BasicPublishOptions::default(),
                b"{}",
                json_properties("", FieldTable::default()),
            )
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default(),
    };
    assert!(
        closed.contains("PRECONDITION_FAILED") || closed.contains("406"),
        "{closed}"
    );
    school.close().await;

    // The AB's claim goes through the broker and the worker, which runs as its own user with
    // the topology managed by the definitions.
    let mut settings = Settings::load(None).unwrap();
    settings.amqp.url = url(&node, "induction-reconciler");
    settings.amqp.declare_topology = false;
    settings.publishers.school_registration = vec!["school-service".into()];
    settings.publishers.ab_claim = vec!["ab-service".into()];
    settings.publishers.operators = vec!["induction-operator".into()];
    let worker = common::LoneWorker::start(settings).await;
    assert_eq!(
        refusal(&node, "ab-service", "ab.claim", &claim_body).await,
        None
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let applied = loop {
        let published_by: Option<Option<String>> = sqlx::query_scalar(
            "select published_by from history where message_id = $1::uuid and event = 'applied'",
        )
        .bind(mid(2))
        .fetch_optional(worker.store.pool())
        .await
        .unwrap();
        if let Some(by) = published_by {
            break by;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the claim was not applied within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(applied.as_deref(), Some("ab-service"));
    worker.stop().await;
}
