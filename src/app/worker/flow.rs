//! Broker flow control: RabbitMQ blocks a connection that publishes while one of its resource
//! alarms (memory, disk) is raised, and says so (`connection.blocked`, `connection.unblocked`).
//! A blocked connection is healthy: lapin sends nothing on it, and the worker waits for the
//! unblock instead of taking the silence for a dead connection. [`Flow`] follows one component's
//! connection: it logs each transition once and keeps the `broker_blocked` gauge and `/readyz`
//! true.

use std::sync::Arc;

use futures_lite::StreamExt;

use crate::app::http::Health;
use crate::broker::Broker;
use crate::telemetry::events::{BrokerBlocked, BrokerUnblocked, Component};

/// Whether the broker blocks one component's connection, as last seen.
pub(super) struct Flow {
    component: Component,
    health: Arc<Health>,
    /// When the block began, while it lasts.
    since: Option<tokio::time::Instant>,
}

impl Flow {
    pub(super) fn new(component: Component, health: Arc<Health>) -> Self {
        Self {
            component,
            health,
            since: None,
        }
    }

    /// Notes whether the connection is blocked now (`reason` as the broker gave it).
    pub(super) fn observe(&mut self, blocked: bool, reason: Option<&str>) {
        match (self.since, blocked) {
            (None, true) => {
                self.since = Some(tokio::time::Instant::now());
                self.health.set_broker_blocked(self.component, true);
                BrokerBlocked {
                    component: self.component,
                    reason,
                }
                .emit();
            }
            (Some(since), false) => {
                self.since = None;
                self.health.set_broker_blocked(self.component, false);
                BrokerUnblocked {
                    component: self.component,
                    blocked_for: since.elapsed(),
                }
                .emit();
            }
            _ => {}
        }
    }

    /// Forgets a block without logging an unblock: the connection was given up, and a new one
    /// starts unblocked until the broker says otherwise.
    pub(super) fn forget(&mut self) {
        if self.since.take().is_some() {
            self.health.set_broker_blocked(self.component, false);
        }
    }

    /// Notes a connection event (only flow control matters here).
    fn event(&mut self, event: &lapin::Event) {
        match event {
            lapin::Event::ConnectionBlocked(reason) => self.observe(true, Some(reason)),
            lapin::Event::ConnectionUnblocked => self.observe(false, None),
            _ => {}
        }
    }

    /// Follows `broker`'s events, and its status every second (an event sent before this began
    /// is not heard), for as long as the caller polls it: it never ends.
    pub(super) async fn follow(&mut self, broker: &Broker) -> std::convert::Infallible {
        let mut events = Box::pin(broker.events());
        let mut listening = true;
        loop {
            self.observe(broker.is_blocked(), None);
            let tick = tokio::time::sleep(std::time::Duration::from_secs(1));
            if listening {
                tokio::select! {
                    event = events.next() => match event {
                        Some(event) => {
                            self.event(&event);
                        }
                        None => listening = false,
                    },
                    () = tick => {}
                }
            } else {
                tick.await;
            }
        }
    }
}

impl Drop for Flow {
    /// A component that stops no longer holds a blocked connection.
    fn drop(&mut self) {
        self.forget();
    }
}
