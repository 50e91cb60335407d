//! "Who may say what" (CONTRACT.md section 2), the worker's half, through the real broker: a
//! claim from a user not allowed to publish claims, a message with no `user_id`, and a
//! registration sent under the claims' routing key are each parked once as
//! `unauthorised_publisher` while the rest is applied; a forged `x-original-user-id` from a user
//! who is not an operator is ignored; an operator's replay of a message parked under a wrong
//! configuration is judged, and recorded in the history, as from its first publisher.

mod common;

use common::app::{TestApp, header};
use common::rabbit::BrokerUser;
use common::{bytes, claim, mid, registration};
use induction_reconciler::app::parked::{Action, Selection, act};
use induction_reconciler::broker::{Broker, json_properties};
use lapin::types::{AMQPValue, FieldTable};
use secrecy::SecretString;
use serde_json::Value;

fn with_original_user(user: &str) -> FieldTable {
    let mut headers = FieldTable::default();
    headers.insert(
        "x-original-user-id".into(),
        AMQPValue::LongString(user.into()),
    );
    headers
}

async fn published_by(app: &TestApp, message: u64) -> Option<String> {
    sqlx::query_scalar(
        "select published_by from history where message_id = $1::uuid and event = 'applied'",
    )
    .bind(mid(message))
    .fetch_optional(app.store.pool())
    .await
    .unwrap()
    .flatten()
}

#[tokio::test]
async fn messages_from_the_wrong_publisher_or_key_are_parked_and_the_rest_applied() {
    // The test's broker connection is `guest`: here a school-side user, not an operator.
    let mut app = TestApp::spawn_with(|s| {
        s.publishers.school_registration = vec!["guest".into()];
        s.publishers.ab_claim = vec!["ab-service".into()];
        s.publishers.operators = vec!["induction-operator".into()];
    })
    .await;
    let registration_ok = registration(1, "R-1", "4000001");
    app.publish(&registration_ok).await;
    // A claim from the school-side user.
    app.publish(&claim(2, "IP-2", "4000002")).await;
    // The same, naming the AB service as its original publisher: not an operator, so ignored.
    app.publish_raw(
        "ab.claim",
        &bytes(&claim(3, "IP-3", "4000003")),
        json_properties(&mid(3), with_original_user("ab-service")),
    )
    .await;
    // A registration under the claims' routing key.
    app.publish_raw(
        "ab.claim",
        &bytes(&registration(4, "R-4", "4000004")),
        json_properties(&mid(4), FieldTable::default()),
    )
    .await;
    // A registration with no user_id at all.
    app.publish_without_user_id(
        "school.registration",
        &bytes(&registration(5, "R-5", "4000005")),
    )
    .await;

    let outcome = app.next_outcome().await;
    assert_eq!(outcome["trn"], "4000001");
    let parked = app.take_parked_properties(4).await;
    assert_eq!(parked.len(), 4, "four messages parked");
    let mut details = Vec::new();
    for (properties, body) in &parked {
        let headers = properties.headers().clone().unwrap_or_default();
        assert_eq!(
            header(&headers, "x-parked-reason").as_deref(),
            Some("unauthorised_publisher")
        );
        let detail = header(&headers, "x-parked-detail").unwrap();
        let message: Value = serde_json::from_slice(body).unwrap();
        assert!(
            !detail.contains(message["payload"]["trn"].as_str().unwrap()),
            "the detail echoes no body data: {detail}"
        );
        // The parked copy carries the worker's own user, and the first publisher in the header.
        assert_eq!(
            properties.user_id().as_ref().map(|u| u.as_str()),
            Some("guest")
        );
        details.push((
            message["message_id"].as_str().unwrap().to_owned(),
            detail,
            header(&headers, "x-original-user-id"),
        ));
    }
    details.sort();
    let (claim2, claim3, key4, none5) = (&details[0], &details[1], &details[2], &details[3]);
    assert!(
        claim2.1.contains("user \"guest\" may not publish ab_claim"),
        "{}",
        claim2.1
    );
    assert_eq!(claim2.2.as_deref(), Some("guest"));
    assert!(
        claim3.1.contains("user \"guest\" may not publish ab_claim"),
        "forged header ignored: {}",
        claim3.1
    );
    assert_eq!(
        claim3.2.as_deref(),
        Some("guest"),
        "the forged original user is replaced"
    );
    assert!(
        key4.1.contains("routing key \"school.registration\""),
        "{}",
        key4.1
    );
    assert!(none5.1.contains("no AMQP user_id"), "{}", none5.1);
    assert_eq!(none5.2, None);
    assert!(
        app.take_parked_properties(1).await.is_empty(),
        "each parked once"
    );
    assert_eq!(
        published_by(&app, 1).await.as_deref(),
        Some("guest"),
        "the history names the publisher"
    );
    app.teardown().await;
}

/// A RabbitMQ user of the shared broker for one test, deleted when dropped.
#[tokio::test]
async fn an_operator_replay_is_judged_by_its_first_publisher() {
    let ab = BrokerUser::create("it-ab");
    // First the AB service's user is missing from the configuration: its claim is parked.
    let mut app = TestApp::spawn_with(|s| {
        s.publishers.ab_claim = vec!["someone-else".into()];
        s.publishers.operators = vec!["guest".into()];
    })
    .await;
    let ab_broker = Broker::connect(&SecretString::from(ab.url()), "test ab service")
        .await
        .expect("connect as the AB service's user");
    let publisher = ab_broker.publisher().await.unwrap();
    let body = bytes(&claim(1, "IP-1", "4100001"));
    publisher
        .publish(
            &app.settings.topology.input_exchange,
            "ab.claim",
            &body,
            json_properties(&mid(1), FieldTable::default()),
        )
        .await
        .unwrap();
    ab_broker.close().await;
    app.wait_until(
        "select exists (select 1 from parked_log where reason = 'unauthorised_publisher')",
    )
    .await;

    // Then the configuration is fixed and an operator (`guest`) replays it.
    app.stop_workers().await;
    let fixed = ab.name.clone();
    app.start_worker_with(move |s| {
        s.publishers.ab_claim = vec![fixed];
        s.publishers.operators = vec!["guest".into()];
    })
    .await;
    let replayed = act(&app.settings, Action::Replay, &Selection::default())
        .await
        .unwrap();
    assert_eq!(replayed.len(), 1);
    let outcome = app.next_outcome().await;
    assert_eq!(outcome["trn"], "4100001");
    assert_eq!(outcome["caused_by"]["message_id"], mid(1));
    assert_eq!(
        published_by(&app, 1).await,
        Some(ab.name.clone()),
        "judged as from the AB service"
    );
    app.teardown().await;
}
