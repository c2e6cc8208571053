//! The transport seam: what the consumer receives, whatever carried it.
//!
//! The consumer sees only [`Delivery`] values on a channel, each with an ack handle behind the
//! [`Ack`] trait. The Pub/Sub adapter (`stream`) is the only code that knows `MessageStream`
//! and `Handler`; tests feed deliveries with handles of their own.

use bytes::Bytes;
use std::time::SystemTime;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Something that can be acked. Dropping it without `ack` gives the message back (nack), as
/// the Pub/Sub `Handler` does: a forgotten handle can delay a message, never lose it.
pub trait Ack: Send + 'static {
    fn ack(self);
}

/// One message as received.
pub struct Delivery<A> {
    /// The raw payload (over gRPC: the notification's JSON, no base64).
    pub data: Bytes,
    pub message_id: String,
    pub publish_time: Option<SystemTime>,
    pub ack: A,
}

/// The consumer's inbound side: deliveries, and the switch that tells the reader to stop.
/// The reader closes the channel when it stops, for whatever reason.
pub struct Deliveries<A> {
    pub receiver: mpsc::Receiver<Delivery<A>>,
    pub stop_reading: CancellationToken,
}

/// The tests' ack handle: records "ack:ID" when acked and "nack:ID" when dropped unacked, in
/// one shared log, so a test reads what became of each message in order.
#[cfg(test)]
pub(crate) struct Probe {
    id: String,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    acked: bool,
}

#[cfg(test)]
impl Probe {
    pub(crate) fn new(
        id: impl ToString,
        log: &std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    ) -> Probe {
        Probe {
            id: id.to_string(),
            log: log.clone(),
            acked: false,
        }
    }
}

#[cfg(test)]
impl Ack for Probe {
    fn ack(mut self) {
        self.acked = true;
        self.log.lock().unwrap().push(format!("ack:{}", self.id));
    }
}

#[cfg(test)]
impl Drop for Probe {
    fn drop(&mut self) {
        if !self.acked {
            self.log.lock().unwrap().push(format!("nack:{}", self.id));
        }
    }
}
