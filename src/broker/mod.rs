//! RabbitMQ: connections with automatic recovery, the topology of CONTRACT.md section 2, and a
//! publisher that waits for confirms.
//!
//! Invariants: never imports `store`; every publish is persistent, mandatory and confirmed.

mod error;
mod topology;

use std::sync::Arc;
use std::time::Duration;

use backon::ExponentialBuilder;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, PublisherConfirm,
};
use secrecy::{ExposeSecret, SecretString};

pub use error::BrokerError;
pub use topology::{declare_topology, inbox_arguments};

/// An AMQP connection that recovers by itself from network failures.
#[derive(Clone)]
pub struct Broker {
    connection: Arc<Connection>,
}

impl Broker {
    /// Connects, naming the connection so operators can see it in the management UI.
    pub async fn connect(url: &SecretString, name: &str) -> Result<Self, BrokerError> {
        Self::connect_with_ca(url, name, None).await
    }

    /// Connects, trusting `ca_pem` (PEM certificates) for an `amqps://` URL in addition to the
    /// system's roots.
    pub async fn connect_with_ca(
        url: &SecretString,
        name: &str,
        ca_pem: Option<&str>,
    ) -> Result<Self, BrokerError> {
        let properties = ConnectionProperties::default()
            .with_connection_name(name.into())
            .enable_auto_recover()
            .with_backoff(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(200))
                    .with_max_delay(Duration::from_secs(10))
                    .with_jitter()
                    .with_max_times(60),
            );
        let tls = lapin::tcp::OwnedTLSConfig {
            identity: None,
            cert_chain: ca_pem.map(str::to_owned),
        };
        let runtime = lapin::runtime::default_runtime()?;
        let connection =
            Connection::connect_with_config(url.expose_secret(), properties, tls, runtime).await?;
        Ok(Self {
            connection: Arc::new(connection),
        })
    }

    /// A new channel.
    pub async fn channel(&self) -> Result<Channel, BrokerError> {
        Ok(self.connection.create_channel().await?)
    }

    /// A new channel in confirm mode, for publishing.
    pub async fn publisher(&self) -> Result<Publisher, BrokerError> {
        let channel = self.channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Publisher { channel })
    }

    /// Connection-level events (errors, re-established connections, flow control).
    pub fn events(&self) -> impl futures_lite::Stream<Item = lapin::Event> + Send + 'static {
        self.connection.events_listener()
    }

    /// True while the connection is usable.
    pub fn is_connected(&self) -> bool {
        self.connection.status().connected()
    }

    /// Closes the connection politely; unacknowledged deliveries go back to their queues. Gives
    /// up after five seconds: a connection that is recovering may never answer.
    pub async fn close(&self) {
        let closing = self.connection.close(200, "shutting down".into());
        let _ = tokio::time::timeout(Duration::from_secs(5), closing).await;
    }
}

/// A channel in confirm mode.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

/// A message sent and waiting for its confirm.
pub struct PendingConfirm {
    confirm: PublisherConfirm,
    exchange: String,
    routing_key: String,
}

impl PendingConfirm {
    /// Waits for the broker: `Ok` only for a positive confirm of a routed message.
    pub async fn wait(self) -> Result<(), BrokerError> {
        match self.confirm.await? {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => {
                Err(BrokerError::unroutable(&self.exchange, &self.routing_key))
            }
            Confirmation::Nack(None) => Err(BrokerError::nacked("a message")),
        }
    }
}

impl Publisher {
    /// The channel, for consumers of the same connection.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Sends a persistent, mandatory message and returns its pending confirm, so that a caller
    /// can send many before waiting for any.
    pub async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<PendingConfirm, BrokerError> {
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body,
                properties.with_delivery_mode(2),
            )
            .await?;
        Ok(PendingConfirm {
            confirm,
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
        })
    }

    /// Sends one message and waits for its confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        self.send(exchange, routing_key, body, properties)
            .await?
            .wait()
            .await
    }
}

/// JSON message properties: persistent, `application/json`, with the given headers.
pub fn json_properties(message_id: &str, headers: FieldTable) -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_message_id(message_id.into())
        .with_app_id("induction-reconciler".into())
        .with_delivery_mode(2)
        .with_headers(headers)
}
