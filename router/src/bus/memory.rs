//! In-process bus for standalone mode: a publish calls the handler directly.
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use dashmap::DashSet;
use switchboard_protocol::SharedFrame;

use super::{Bus, BusError, BusHandler};

/// A bus inside one process. The handler is called synchronously and in
/// order, on the publisher's task (the edge's hub only queues the frame
/// there; its fan-out runs after the ack, ADR 0027).
/// Subscriptions match like NATS: `*` stands for one token.
#[derive(Default)]
pub struct MemoryBus {
    handler: OnceLock<Arc<dyn BusHandler>>,
    subjects: DashSet<String>,
    /// Subscriptions with a `*` token (a handful: one per node).
    patterns: DashSet<String>,
}

impl MemoryBus {
    /// An empty bus; the node sets its handler at startup.
    pub fn new() -> Self {
        Self::default()
    }

    fn wanted(&self, subject: &str) -> bool {
        self.subjects.contains(subject) || self.patterns.iter().any(|p| matches(&p, subject))
    }
}

/// NATS matching for patterns whose wildcards are `*` tokens.
fn matches(pattern: &str, subject: &str) -> bool {
    let mut s = subject.split('.');
    pattern
        .split('.')
        .all(|p| s.next().is_some_and(|t| p == "*" || p == t))
        && s.next().is_none()
}

#[async_trait]
impl Bus for MemoryBus {
    fn set_handler(&self, handler: Arc<dyn BusHandler>) {
        let _ = self.handler.set(handler);
    }

    async fn publish(&self, subject: &str, frame: SharedFrame) -> Result<(), BusError> {
        if self.wanted(subject)
            && let Some(h) = self.handler.get()
        {
            h.on_frame(subject, frame);
        }
        Ok(())
    }

    async fn subscribe(&self, subject: &str) -> Result<(), BusError> {
        if subject.split('.').any(|t| t == "*") {
            self.patterns.insert(subject.to_owned());
        } else {
            self.subjects.insert(subject.to_owned());
        }
        Ok(())
    }

    async fn unsubscribe(&self, subject: &str) -> Result<(), BusError> {
        self.subjects.remove(subject);
        self.patterns.remove(subject);
        Ok(())
    }

    fn subscriptions(&self) -> usize {
        self.subjects.len() + self.patterns.len()
    }
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn star_matches_one_token() {
        assert!(matches("sb.edge.e1.user.*", "sb.edge.e1.user.bob"));
        assert!(!matches("sb.edge.e1.user.*", "sb.edge.e2.user.bob"));
        assert!(!matches("sb.edge.e1.user.*", "sb.edge.e1.user"));
        assert!(!matches("sb.edge.e1.user.*", "sb.edge.e1.user.bob.x"));
        assert!(matches("sb.chat.c1", "sb.chat.c1"));
    }
}
