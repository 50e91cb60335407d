//! Publishing a batch at once (`Publisher::send_all`, `Publisher::publish_all`) on the machine's
//! RabbitMQ: every message arrives, in the order given (a teacher's versions must), each with a
//! result of its own, also while tasks on other threads publish on the same channel; on a closed
//! channel each fails, and none is left waiting.

mod common;

use std::time::Duration;

use common::app::amqp_url;
use futures_lite::StreamExt;
use induction_reconciler::broker::{Broker, Outgoing, json_properties};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicQosOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use secrecy::SecretString;

/// More than futures' `join_all` polls in order without its `FuturesOrdered` (30).
const MESSAGES: usize = 500;

async fn broker() -> Broker {
    Broker::connect(&SecretString::from(amqp_url()), "publisher test")
        .await
        .expect("the machine's RabbitMQ")
}

/// A fresh queue of the test's own: exclusive to its connection, so that the broker deletes it
/// when the test ends, however it ends.
async fn queue(broker: &Broker, arguments: FieldTable) -> String {
    let name = format!("ir-publisher-test-{}", uuid::Uuid::new_v4().simple());
    let channel = broker.channel().await.unwrap();
    let options = QueueDeclareOptions {
        exclusive: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(name.as_str().into(), options, arguments)
        .await
        .unwrap();
    name
}

async fn drain(broker: &Broker, queue: &str) -> Vec<Vec<u8>> {
    let channel = broker.channel().await.unwrap();
    let mut bodies = Vec::new();
    while let Some(m) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        bodies.push(m.delivery.data);
    }
    channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    bodies
}

fn bodies() -> Vec<Vec<u8>> {
    (0..MESSAGES)
        .map(|i| format!("{{\"n\":{i}}}").into_bytes())
        .collect()
}

fn outgoing<'a>(queue: &'a str, bodies: &'a [Vec<u8>]) -> impl Iterator<Item = Outgoing<'a>> {
    bodies.iter().map(move |body| Outgoing {
        exchange: "",
        routing_key: queue,
        body,
        properties: json_properties("", FieldTable::default()),
    })
}

#[tokio::test]
async fn a_batch_published_at_once_arrives_whole_and_in_order_each_confirmed() {
    let broker = broker().await;
    let queue = queue(&broker, FieldTable::default()).await;
    let publisher = broker.publisher().await.unwrap();
    let sent = bodies();

    let results = tokio::time::timeout(
        Duration::from_secs(60),
        publisher.publish_all(outgoing(&queue, &sent)),
    )
    .await
    .expect("confirmed within 60 s");
    assert_eq!(results.len(), MESSAGES);
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    // Unroutable is an error of its own message only.
    let mut mixed = bodies();
    mixed.truncate(3);
    let mut messages: Vec<Outgoing<'_>> = outgoing(&queue, &mixed).collect();
    messages[1].routing_key = "ir-publisher-test-no-such-queue";
    let results = publisher.publish_all(messages).await;
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    let unroutable = results[1]
        .as_ref()
        .expect_err("an unroutable message is refused");
    assert!(
        unroutable.to_string().contains("no queue is bound"),
        "{unroutable}"
    );

    let received = drain(&broker, &queue).await;
    let mut expected = sent.clone();
    expected.push(mixed[0].clone());
    expected.push(mixed[2].clone());
    assert_eq!(received.len(), expected.len());
    assert!(received == expected, "the messages arrived out of order");
    broker.close().await;
}

#[tokio::test]
async fn on_a_closed_channel_every_message_of_a_batch_fails_at_once() {
    let broker = broker().await;
    let queue = queue(&broker, FieldTable::default()).await;
    let publisher = broker.publisher().await.unwrap();
    publisher
        .channel()
        .close(200, "closed by the test".into())
        .await
        .unwrap();
    let sent = bodies();
    let results = tokio::time::timeout(
        Duration::from_secs(5),
        publisher.send_all(outgoing(&queue, &sent)),
    )
    .await
    .expect("no send waits on a closed channel");
    assert_eq!(results.len(), MESSAGES);
    assert!(results.iter().all(Result::is_err));
    assert!(drain(&broker, &queue).await.is_empty());
    broker.close().await;
}

/// The lanes and the relay publish on one channel from different threads. Into a queue that
/// holds at most a few messages and refuses more (`reject-publish`: a nack) while a consumer
/// empties it, so that acks and nacks alternate: every message confirmed must be in it, and none
/// refused. If two sends took their delivery tags in one order and reached the broker in the
/// other, each would get the other's confirm.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messages_sent_from_many_threads_on_one_channel_each_get_their_own_confirm() {
    const TASKS: usize = 8;
    const EACH: usize = 300;
    let broker = broker().await;
    let mut arguments = FieldTable::default();
    arguments.insert(ShortString::from("x-max-length"), AMQPValue::LongInt(20));
    arguments.insert(
        ShortString::from("x-overflow"),
        AMQPValue::LongString("reject-publish".into()),
    );
    let name = queue(&broker, arguments).await;
    let channel = broker.channel().await.unwrap();
    // A slow consumer (about 1,000 a second), so that the queue fills and empties again.
    channel
        .basic_qos(5, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            name.as_str().into(),
            "publisher-test".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let received = tokio::spawn(async move {
        let mut bodies = std::collections::HashSet::new();
        while let Ok(Some(Ok(delivery))) =
            tokio::time::timeout(Duration::from_secs(3), consumer.next()).await
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
            delivery.ack(BasicAckOptions::default()).await.unwrap();
            bodies.insert(delivery.data);
        }
        bodies
    });
    let publisher = broker.publisher().await.unwrap();
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let publisher = publisher.clone();
        let queue = name.clone();
        tasks.push(tokio::spawn(async move {
            let bodies: Vec<Vec<u8>> = (0..EACH)
                .map(|i| format!("{{\"task\":{task},\"n\":{i}}}").into_bytes())
                .collect();
            let mut results = Vec::new();
            for chunk in bodies.chunks(10) {
                let sent = publisher.publish_all(outgoing(&queue, chunk)).await;
                results.extend(
                    chunk
                        .iter()
                        .cloned()
                        .zip(sent.into_iter().map(|r| r.is_ok())),
                );
            }
            results
        }));
    }
    let mut confirmed = std::collections::HashSet::new();
    let mut refused = 0;
    for task in tasks {
        for (body, ok) in task.await.unwrap() {
            if ok {
                confirmed.insert(body);
            } else {
                refused += 1;
            }
        }
    }
    let received = received.await.unwrap();
    assert!(
        refused > 0 && !confirmed.is_empty(),
        "the test needs both confirms and refusals: {} confirmed, {refused} refused",
        confirmed.len()
    );
    let lost: Vec<_> = confirmed.difference(&received).collect();
    let unconfirmed: Vec<_> = received.difference(&confirmed).collect();
    assert!(
        lost.is_empty() && unconfirmed.is_empty(),
        "{} confirmed but not in the queue, {} in the queue but refused ({} confirmed, {refused} refused)",
        lost.len(),
        unconfirmed.len(),
        confirmed.len()
    );
    channel
        .queue_delete(name.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    broker.close().await;
}
