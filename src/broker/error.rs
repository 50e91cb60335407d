//! Broker failures, split into transient (reconnect and retry) and permanent.

use std::fmt;

/// A failure talking to RabbitMQ.
#[derive(Debug)]
pub struct BrokerError {
    transient: bool,
    description: String,
}

impl BrokerError {
    /// True when reconnecting and retrying may succeed.
    pub fn is_transient(&self) -> bool {
        self.transient
    }

    /// The broker refused a published message (a negative confirm).
    pub fn nacked(what: &str) -> Self {
        Self {
            transient: true,
            description: format!("the broker did not confirm {what}"),
        }
    }

    /// A connection, channel or consumer stopped working.
    pub fn lost(what: &str) -> Self {
        Self {
            transient: true,
            description: format!("lost {what}"),
        }
    }

    /// An operation on the broker did not finish in time.
    pub fn timed_out(what: &str) -> Self {
        Self {
            transient: true,
            description: format!("timed out waiting for {what}"),
        }
    }

    /// The broker returned a mandatory message because no queue was bound for it.
    pub fn unroutable(exchange: &str, routing_key: &str) -> Self {
        Self {
            transient: false,
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
            description: error.to_string(),
        }
    }
}
