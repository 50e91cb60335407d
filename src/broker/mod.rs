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
pub use topology::{declare_topology, inbox_arguments, subscribe};

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
                    .with_max_delay(Duration::from_secs(5))
                    .with_jitter()
                    .with_max_times(60),
            );
        // lapin retries a first connection that is refused, in a thread of its own, until its
        // back-off runs out (minutes). Check the broker accepts TCP connections first, so that an
        // attempt while it is down fails at once and leaves nothing running behind it.
        let uri: lapin::uri::AMQPUri = url
            .expose_secret()
            .parse()
            .map_err(|_| BrokerError::invalid_url())?;
        let address = (uri.authority.host.as_str(), uri.authority.port);
        match tokio::time::timeout(OPERATION_TIMEOUT, tokio::net::TcpStream::connect(address)).await
        {
            Ok(Ok(_probe)) => {}
            Ok(Err(error)) => return Err(BrokerError::unreachable(&error)),
            Err(_) => return Err(BrokerError::timed_out("a TCP connection to the broker")),
        }
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
        bounded("a new channel", self.connection.create_channel()).await
    }

    /// A new channel in confirm mode, for publishing.
    pub async fn publisher(&self) -> Result<Publisher, BrokerError> {
        let channel = self.channel().await?;
        bounded(
            "confirm mode",
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
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

    /// What the connection is doing: up, being recovered by lapin, or gone for good.
    pub fn link(&self) -> Link {
        let status = self.connection.status();
        if status.connected() {
            Link::Up
        } else if status.reconnecting() || status.connecting() {
            Link::Recovering
        } else {
            Link::Down
        }
    }

    /// Waits up to `limit` for lapin's automatic recovery to bring the connection back. True
    /// when it is up; false when it is gone for good, `limit` passed, or `stop` fired.
    pub async fn wait_until_up(
        &self,
        limit: Duration,
        stop: &tokio_util::sync::CancellationToken,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match self.link() {
                Link::Up => return true,
                Link::Down => return false,
                Link::Recovering if tokio::time::Instant::now() >= deadline => return false,
                Link::Recovering => {}
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
                () = stop.cancelled() => return false,
            }
        }
    }

    /// Gives the connection up: closes it now if it is up, otherwise as soon as lapin's recovery
    /// brings it back (within ten minutes), so that a connection the worker replaced never
    /// returns with a consumer nobody reads holding messages back.
    pub fn retire(self) {
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
            while tokio::time::Instant::now() < deadline {
                match self.link() {
                    Link::Up => {
                        self.close().await;
                        return;
                    }
                    Link::Down => return,
                    Link::Recovering => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        });
    }

    /// Closes the connection politely; unacknowledged deliveries go back to their queues. Gives
    /// up after five seconds: a connection that is recovering may never answer.
    pub async fn close(&self) {
        let closing = self.connection.close(200, "shutting down".into());
        let _ = tokio::time::timeout(Duration::from_secs(5), closing).await;
    }
}

/// The state of a connection, as the worker's watchdogs see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Connected.
    Up,
    /// Lost, and lapin's automatic recovery is re-establishing it.
    Recovering,
    /// Closed or failed for good: recovery gave up or was not possible.
    Down,
}

/// A channel in confirm mode.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

/// How long any single broker operation (opening a channel, declaring, sending a message's
/// frames) may take. lapin queues operations on a connection that is being recovered, and one
/// caught at the moment the connection dropped can wait for ever; past this bound the worker
/// treats the connection as wedged and replaces it.
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs one broker operation, giving up after [`OPERATION_TIMEOUT`].
pub async fn bounded<T>(
    what: &str,
    operation: impl std::future::Future<Output = Result<T, lapin::Error>>,
) -> Result<T, BrokerError> {
    match tokio::time::timeout(OPERATION_TIMEOUT, operation).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(BrokerError::timed_out(what)),
    }
}

/// How long a publisher waits for the broker to confirm a message.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);

/// A message sent and waiting for its confirm.
pub struct PendingConfirm {
    confirm: PublisherConfirm,
    exchange: String,
    routing_key: String,
}

impl PendingConfirm {
    /// Waits for the broker: `Ok` only for a positive confirm of a routed message. Gives up
    /// after [`CONFIRM_TIMEOUT`]: lapin rejects the confirms of a lost connection only once its
    /// recovery starts, and a worker must not wait on a broker that is down for good.
    pub async fn wait(self) -> Result<(), BrokerError> {
        let confirmed = tokio::time::timeout(CONFIRM_TIMEOUT, self.confirm)
            .await
            .map_err(|_| BrokerError::timed_out("a publisher confirm"))?;
        match confirmed? {
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

    /// True while the channel is open (after lapin's recovery, too).
    pub fn is_open(&self) -> bool {
        self.channel.status().connected()
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
        let confirm = bounded(
            "a message to be sent",
            self.channel.basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body,
                properties.with_delivery_mode(2),
            ),
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
