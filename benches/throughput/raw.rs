//! The raw limit: the same messages published with confirms to a quorum queue, consumed,
//! republished with confirms, and acknowledged, with no database.

use std::time::Instant;

use futures_lite::StreamExt;
use induction_reconciler::broker::{Broker, Outgoing, json_properties};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};

use crate::common::remove_topology;
use crate::common::workload::Generated;

/// Relays `stream` through two quorum queues; returns messages per second. With `backlog`, the
/// stream is published before the relay starts, and the relay is timed from its start.
pub async fn relay(
    broker: &Broker,
    prefix: &str,
    stream: &[Generated],
    backlog: bool,
) -> anyhow::Result<f64> {
    let input = format!("{prefix}.raw-in");
    let output = format!("{prefix}.raw-out");
    let timed = async {
        let channel = broker.channel().await?;
        declare(&channel, &input, &output).await?;
        let publisher = broker.publisher().await?;
        let mut forwarding = None;
        let mut started = Instant::now();
        if !backlog {
            forwarding = Some(forward(broker, &input, &output, stream.len()).await?);
            started = Instant::now();
        }
        for chunk in stream.chunks(1000) {
            let messages = chunk.iter().map(|message| Outgoing {
                exchange: "",
                routing_key: &input,
                body: &message.body,
                properties: json_properties("", FieldTable::default()),
            });
            for result in publisher.publish_all(messages).await {
                result?;
            }
        }
        let forwarding = match forwarding {
            Some(forwarding) => forwarding,
            None => {
                started = Instant::now();
                forward(broker, &input, &output, stream.len()).await?
            }
        };
        let finished = forwarding.await??;
        Ok::<_, anyhow::Error>(stream.len() as f64 / (finished - started).as_secs_f64())
    };
    let rate = timed.await;
    // Whether or not the relay ran to the end, its queues and exchange go.
    remove_topology(&[&input, &output], &[&output]).await;
    rate
}

/// Two durable quorum queues, the second behind a fanout exchange of its name.
async fn declare(channel: &lapin::Channel, input: &str, output: &str) -> anyhow::Result<()> {
    let mut quorum = FieldTable::default();
    quorum.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(input.into(), durable, quorum.clone())
        .await?;
    channel
        .queue_declare(output.into(), durable, quorum)
        .await?;
    let exchange = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            output.into(),
            lapin::ExchangeKind::Fanout,
            exchange,
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            output.into(),
            output.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// Consumes `input`, republishes each message to `output` with a confirm and then acknowledges
/// it, until `total` are done; resolves to when the last was acknowledged.
async fn forward(
    broker: &Broker,
    input: &str,
    output: &str,
    total: usize,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<Instant>>> {
    let relay_channel = broker.channel().await?;
    relay_channel
        .basic_qos(600, BasicQosOptions::default())
        .await?;
    let republisher = broker.publisher().await?;
    let mut consumer = relay_channel
        .basic_consume(
            input.into(),
            "raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let exchange = output.to_owned();
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    // The republishing channel must outlive the last confirm: the acker keeps a handle on it.
    let keep_open = republisher.clone();
    tokio::spawn(async move {
        for _ in 0..total {
            let Some(Ok(delivery)) = consumer.next().await else {
                break;
            };
            let confirm = republisher
                .send(&exchange, "", &delivery.data, delivery.properties.clone())
                .await?;
            if tx.send((delivery.acker, confirm)).await.is_err() {
                break;
            }
        }
        Ok::<_, anyhow::Error>(())
    });
    Ok(tokio::spawn(async move {
        let _keep_open = keep_open;
        let _channel = relay_channel;
        let mut done = 0;
        while let Some((acker, confirm)) = rx.recv().await {
            confirm.wait().await?;
            acker.ack(BasicAckOptions::default()).await?;
            done += 1;
            if done == total {
                break;
            }
        }
        anyhow::ensure!(
            done == total,
            "the raw relay stopped after {done} of {total}"
        );
        Ok(Instant::now())
    }))
}
