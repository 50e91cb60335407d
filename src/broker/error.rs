//! Broker failures, split into transient (reconnect and retry) and permanent.

use std::fmt;

/// A failure talking to RabbitMQ.
#[derive(Debug)]
pub struct BrokerError {
    transient: bool,
    timed_out: bool,
    blocked: bool,
    description: String,
}

impl BrokerError {
    /// True when reconnecting and retrying may succeed.
    pub fn is_transient(&self) -> bool {
        self.transient
    }

    /// True when an operation got no answer in time: the connection may be wedged, so the worker
    /// replaces it rather than waiting for it.
    pub fn is_timeout(&self) -> bool {
        self.timed_out
    }

    /// True when the broker holds the connection back with flow control (`connection.blocked`,
    /// a memory or disk alarm): the connection is healthy, and the caller waits for the broker
    /// to unblock it rather than replacing it.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// The broker blocked the connection (a resource alarm) before a message could be sent or
    /// confirmed.
    pub fn blocked(what: &str) -> Self {
        Self {
            transient: true,
            timed_out: false,
            blocked: true,
            description: format!(
                "the broker is blocking the connection (a resource alarm); {what} waits until it unblocks"
            ),
        }
    }

    /// The broker refused a published message (a negative confirm).
    pub fn nacked(what: &str) -> Self {
        Self {
            transient: true,
            timed_out: false,
            blocked: false,
            description: format!("the broker did not confirm {what}"),
        }
    }

    /// The broker does not accept TCP connections (down, or the address is wrong).
    pub fn unreachable(error: &std::io::Error) -> Self {
        Self {
            transient: true,
            timed_out: false,
            blocked: false,
            description: format!("cannot open a TCP connection: {error}"),
        }
    }

    /// The TLS handshake failed. A certificate that cannot be verified (another CA, a wrong
    /// name, a client certificate refused) is a misconfiguration and not retried; a connection
    /// lost during the handshake is.
    pub fn tls(error: &std::io::Error) -> Self {
        Self {
            transient: error.kind() != std::io::ErrorKind::InvalidData,
            timed_out: false,
            blocked: false,
            description: format!("the TLS handshake with the broker failed: {error}"),
        }
    }

    /// The port of an `amqp://` URL answered the AMQP greeting with TLS.
    pub fn speaks_tls() -> Self {
        Self {
            transient: false,
            timed_out: false,
            blocked: false,
            description: "the broker's port expects TLS: use an amqps:// URL (and amqp.tls_ca_file for a private CA)".to_owned(),
        }
    }

    /// The port answered the AMQP greeting with something that is not AMQP 0-9-1.
    pub fn not_amqp() -> Self {
        Self {
            transient: false,
            timed_out: false,
            blocked: false,
            description: "the port does not speak AMQP 0-9-1".to_owned(),
        }
    }

    /// The AMQP URL cannot be parsed (its text is not repeated: it may hold a password).
    pub fn invalid_url() -> Self {
        Self {
            transient: false,
            timed_out: false,
            blocked: false,
            description: "the AMQP URL cannot be parsed".to_owned(),
        }
    }

    /// A connection, channel or consumer stopped working.
    pub fn lost(what: &str) -> Self {
        Self {
            transient: true,
            timed_out: false,
            blocked: false,
            description: format!("lost {what}"),
        }
    }

    /// The broker closed a channel that was working (a consumer that held a delivery past the
    /// broker's `consumer_timeout`, say): a new channel may work, whatever the reply code.
    pub fn channel_closed(error: &lapin::Error) -> Self {
        Self {
            transient: true,
            timed_out: false,
            blocked: false,
            description: format!("the broker closed the channel: {error}"),
        }
    }

    /// An operation on the broker did not finish in time.
    pub fn timed_out(what: &str) -> Self {
        Self {
            transient: true,
            timed_out: true,
            blocked: false,
            description: format!("timed out waiting for {what}"),
        }
    }

    /// The broker returned a mandatory message because no queue was bound for it.
    pub fn unroutable(exchange: &str, routing_key: &str) -> Self {
        Self {
            transient: false,
            timed_out: false,
            blocked: false,
            description: format!(
                "no queue is bound for exchange {exchange:?} with routing key {routing_key:?}"
            ),
        }
    }
}

impl fmt::Display for BrokerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.transient {
            "unavailable"
        } else {
            "failed"
        };
        write!(f, "broker {kind}: {}", self.description)
    }
}

impl std::error::Error for BrokerError {}

impl From<lapin::Error> for BrokerError {
    fn from(error: lapin::Error) -> Self {
        use lapin::ErrorKind as K;
        let transient = match error.kind() {
            K::IOError(_)
            | K::MissingHeartbeatError
            | K::InvalidChannelState(..)
            | K::InvalidConnectionState(_)
            | K::InvalidChannel(_)
            | K::RuntimeShutdownError(_)
            | K::ChannelsLimitReached => true,
            // A connection-level (hard) error closes the connection: reconnecting may help.
            // A channel-level (soft) error such as PRECONDITION_FAILED is a misconfiguration.
            K::ProtocolError(_) => error.is_amqp_hard_error(),
            _ => false,
        };
        // lapin's messages name the operation and the AMQP reply; they carry no message data.
        Self {
            transient,
            timed_out: false,
            blocked: false,
            description: error.to_string(),
        }
    }
}
