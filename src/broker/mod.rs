//! RabbitMQ: connections with automatic recovery (this file), the topology of CONTRACT.md
//! section 2 (`topology`), a publisher that waits for confirms (`publisher`), a consumer with its
//! QoS and cancel (`consumer`), and the parking queue's headers (`parking`).
//!
//! Invariants: never imports `store`, `messages` or `app`; every publish is persistent, mandatory
//! and confirmed; every operation on the broker is bounded in time.

mod acks;
mod consumer;
mod error;
pub mod parking;
mod publisher;
mod topology;

use std::sync::Arc;
use std::time::Duration;

use backon::ExponentialBuilder;
use lapin::options::ConfirmSelectOptions;
use lapin::{Channel, Connection, ConnectionProperties};
use secrecy::{ExposeSecret, SecretString};

pub use acks::{Acks, CountFrames, Settled};
pub use consumer::{Consumer, QueueReader, ack, ready, requeue};
pub use error::BrokerError;
pub use publisher::{
    CONFIRM_TIMEOUT, Outgoing, PendingConfirm, Publisher, WhenBlocked, json_properties,
};
pub use topology::{declare_topology, inbox_arguments, subscribe};

/// An AMQP connection that recovers by itself from network failures.
#[derive(Clone)]
pub struct Broker {
    connection: Arc<Connection>,
    /// The RabbitMQ user it is connected as: every message it publishes carries it as `user_id`.
    user: Arc<str>,
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
        let tls = Tls {
            ca_pem: ca_pem.map(str::to_owned),
            client: None,
        };
        Self::connect_with_tls(url, name, &tls, DEFAULT_RECOVERY).await
    }

    /// Connects with TLS settings for an `amqps://` URL: extra CA certificates, and a client
    /// certificate for brokers that require mutual TLS. lapin's automatic recovery of the
    /// connection pauses for at most about `recovery` in all between its attempts, then gives
    /// the connection up ([`Link::Down`]) and ends its I/O thread.
    pub async fn connect_with_tls(
        url: &SecretString,
        name: &str,
        tls: &Tls,
        recovery: Duration,
    ) -> Result<Self, BrokerError> {
        let properties = ConnectionProperties::default()
            .with_connection_name(name.into())
            .enable_auto_recover()
            .with_backoff(recovery_backoff(recovery));
        // lapin retries a first connection that fails, in a thread of its own, until its
        // back-off runs out (minutes). The probe below fails at once instead and leaves nothing
        // running behind it.
        let mut uri: lapin::uri::AMQPUri = url
            .expose_secret()
            .parse()
            .map_err(|_| BrokerError::invalid_url())?;
        // Heartbeats both ways are how a connection that vanished without a reset is noticed:
        // lapin closes it after two intervals with nothing read, and the broker requeues what
        // it held after two intervals with nothing from us. The URL's `heartbeat` wins.
        uri.query.heartbeat.get_or_insert(DEFAULT_HEARTBEAT_SECONDS);
        let tls = lapin::tcp::OwnedTLSConfig {
            identity: tls
                .client
                .as_ref()
                .map(|(cert, key)| lapin::tcp::OwnedIdentity::PKCS8 {
                    pem: cert.clone(),
                    key: key.clone(),
                }),
            cert_chain: tls.ca_pem.clone(),
        };
        let runtime = lapin::runtime::default_runtime()?;
        // Open and drop one connection the way lapin will (TCP, and the TLS handshake for
        // `amqps://`), so that an unreachable broker or a certificate that cannot be verified is
        // reported at once with its cause.
        if uri.scheme == lapin::uri::AMQPScheme::AMQP {
            greet(&uri.authority.host, uri.authority.port).await?;
        } else {
            let probing = {
                use lapin::tcp::AMQPUriTcpExt;
                uri.connect_with_config_async(tls.as_ref(), &runtime)
            };
            match tokio::time::timeout(OPERATION_TIMEOUT, probing).await {
                Ok(Ok(_probe)) => {}
                Ok(Err(error)) => return Err(BrokerError::tls(&error)),
                Err(_) => return Err(BrokerError::timed_out("a TLS connection to the broker")),
            }
        }
        let user = Arc::from(uri.authority.userinfo.username.as_str());
        let connection = Connection::connect_uri_with_config(uri, properties, tls, runtime).await?;
        Ok(Self {
            connection: Arc::new(connection),
            user,
        })
    }

    /// The RabbitMQ user this connection authenticated as.
    pub fn user(&self) -> &str {
        &self.user
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
        Ok(Publisher {
            channel,
            user: self.user.clone(),
            flow: self.connection.status().clone(),
            queueing: std::sync::Arc::default(),
        })
    }

    /// Declares the topology of CONTRACT.md section 2 on a channel of its own.
    pub async fn declare(&self, topology: &crate::config::Topology) -> Result<(), BrokerError> {
        let channel = self.channel().await?;
        tokio::time::timeout(OPERATION_TIMEOUT, declare_topology(&channel, topology))
            .await
            .map_err(|_| BrokerError::timed_out("the topology to be declared"))??;
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            channel.close(200, "declared".into()),
        )
        .await;
        Ok(())
    }

    /// Connection-level events (errors, re-established connections, flow control).
    pub fn events(&self) -> impl futures_lite::Stream<Item = lapin::Event> + Send + 'static {
        self.connection.events_listener()
    }

    /// True while the broker blocks the connection with flow control (`connection.blocked`, a
    /// memory or disk alarm): it is up, but lapin sends nothing on it until the broker unblocks
    /// it (no publish, no acknowledgement, no new channel).
    pub fn is_blocked(&self) -> bool {
        self.connection.status().blocked()
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

/// The plain `amqp://` probe: opens a TCP connection, sends the AMQP 0-9-1 protocol header and
/// reads the first byte of the answer. A broker answers with a method frame (`1`); a TLS
/// listener answers with a TLS record or closes the connection, which lapin alone would retry
/// in the background without saying why.
async fn greet(host: &str, port: u16) -> Result<(), BrokerError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connecting = tokio::net::TcpStream::connect((host, port));
    let mut stream = match tokio::time::timeout(OPERATION_TIMEOUT, connecting).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => return Err(BrokerError::unreachable(&error)),
        Err(_) => return Err(BrokerError::timed_out("a TCP connection to the broker")),
    };
    stream
        .write_all(b"AMQP\x00\x00\x09\x01")
        .await
        .map_err(|error| BrokerError::unreachable(&error))?;
    let mut first = [0_u8; 1];
    match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut first)).await {
        Ok(Ok(1)) if first[0] == 1 => Ok(()),
        Ok(Ok(1)) if matches!(first[0], 0x15 | 0x16) => Err(BrokerError::speaks_tls()),
        Ok(Ok(0)) => Err(BrokerError::lost(
            "the connection at the AMQP greeting (is it a TLS port? then use an amqps:// URL)",
        )),
        Ok(Ok(_)) => Err(BrokerError::not_amqp()),
        // No answer yet or a read error: let lapin find out.
        _ => Ok(()),
    }
}

/// TLS settings for `amqps://` connections.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    /// CA certificates (PEM) to trust besides the system's roots.
    pub ca_pem: Option<String>,
    /// The client certificate chain and its key (both PEM), for mutual TLS.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
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

/// How long lapin's automatic recovery of a lost connection goes on, unless the caller says
/// otherwise: the worker's `amqp.recovery_timeout_seconds` by default.
pub const DEFAULT_RECOVERY: Duration = Duration::from_secs(60);

/// lapin's back-off between attempts to bring a lost connection back: from 200 ms up to 5 s,
/// pausing for at most about `recovery` in all. Past that lapin gives the connection up
/// ([`Link::Down`]) and its I/O thread ends, with the connection's buffers (two of 32 frames
/// each, 8 MiB at RabbitMQ's default `frame_max`). Without the bound, a connection the worker had
/// given up and replaced went on knocking at an address that had gone for 60 attempts, about
/// five minutes, holding its thread and buffers beside its replacement's (docs/RELIABILITY.md).
/// An attempt lapin has begun is not cut short: at a black-holed address one lasts the system's
/// TCP connect timeout.
fn recovery_backoff(recovery: Duration) -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .with_max_times(60)
        .with_total_delay(Some(recovery))
}

/// The AMQP heartbeat interval asked for when the URL names none (`?heartbeat=N`): a connection
/// that goes silent is given up by both ends within about twice this.
pub const DEFAULT_HEARTBEAT_SECONDS: u16 = 10;

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
