//! In-process bus for standalone mode: a publish calls the handler directly.
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use dashmap::DashSet;
use switchboard_protocol::SharedFrame;

use super::{Bus, BusError, BusHandler};

/// A bus inside one process. Delivery is synchronous and in order.
#[derive(Default)]
pub struct MemoryBus {
    handler: OnceLock<Arc<dyn BusHandler>>,
    subjects: DashSet<String>,
}

impl MemoryBus {
    /// An empty bus; the node sets its handler at startup.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait]
impl Bus for MemoryBus {
    fn set_handler(&self, handler: Arc<dyn BusHandler>) {
        let _ = self.handler.set(handler);
    }

    async fn publish(&self, subject: &str, frame: SharedFrame) -> Result<(), BusError> {
        if self.subjects.contains(subject)
            && let Some(h) = self.handler.get()
        {
            h.on_frame(subject, frame);
        }
        Ok(())
    }

    async fn subscribe(&self, subject: &str) -> Result<(), BusError> {
        self.subjects.insert(subject.to_owned());
        Ok(())
    }

    async fn unsubscribe(&self, subject: &str) -> Result<(), BusError> {
        self.subjects.remove(subject);
        Ok(())
    }

    fn subscriptions(&self) -> usize {
        self.subjects.len()
    }
}
