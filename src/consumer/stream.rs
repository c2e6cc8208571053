//! The Pub/Sub adapter: the only code that knows `MessageStream` and `Handler`.
//!
//! [`consume`] spawns the reader, which turns `(Message, Handler)` pairs into [`Delivery`]
//! values on a bounded channel, runs the [`Consumer`] on that channel, and when the consumer
//! has drained, shuts the stream down (flushing the acks it batches).

use super::{Ack, Consumer, Deliveries, Delivery, QuarantineSink, SyncRunner};
use crate::health::PubSubLink;
use google_cloud_pubsub::model::Message;
use google_cloud_pubsub::subscriber::MessageStream;
use google_cloud_pubsub::subscriber::handler::Handler;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Deliveries buffered between the reader and the consumer. Small: the client's flow control
/// (`max_outstanding_messages`) is the real bound; this only decouples the two loops.
const DELIVERY_BUFFER: usize = 256;
/// How long the stream may take to flush its last acks at shutdown. Part of the stop budget:
/// shutdown timeout + this + the tracker drain must stay below the pod's
/// `terminationGracePeriodSeconds` (see ARCHITECTURE.md, "Tasks and shutdown").
pub(crate) const STREAM_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);

impl Ack for Handler {
    fn ack(self) {
        Handler::ack(self)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// The subscription stream ended with a permanent error (e.g. subscription deleted,
    /// permission revoked). The process exits non-zero after a graceful drain.
    #[error("the Pub/Sub stream failed permanently: {0}")]
    Stream(#[source] google_cloud_pubsub::Error),
    /// The reader task panicked: a bug, reported rather than swallowed.
    #[error("the Pub/Sub reader task failed: {0}")]
    Reader(#[source] tokio::task::JoinError),
}

/// Consumes `stream` with `consumer` until `shutdown` is cancelled or the stream fails for
/// good; returns after the drain. The reader tells `link` (readiness) when it pulls from the
/// stream, when messages arrive and when it stops.
pub(crate) async fn consume<S: SyncRunner, Q: QuarantineSink>(
    stream: MessageStream,
    consumer: Consumer<S, Q>,
    shutdown: CancellationToken,
    link: PubSubLink,
) -> Result<(), ConsumerError> {
    let (tx, receiver) = mpsc::channel::<Delivery<Handler>>(DELIVERY_BUFFER);
    let stop_reading = CancellationToken::new();
    let reader = consumer.tracker.spawn({
        let stop_reading = stop_reading.clone();
        async move {
            // The stream opens on the first `next()`: from here on the reader is pulling.
            link.opened();
            let read = read_stream(stream, tx, stop_reading, &link).await;
            link.closed();
            read
        }
    });
    consumer
        .run(
            Deliveries {
                receiver,
                stop_reading,
            },
            shutdown,
        )
        .await;
    // The consumer returns only after the reader closed the channel, so this does not wait.
    match reader.await.map_err(ConsumerError::Reader)? {
        Ok(Some(stream)) => {
            // Every handler is consumed by now, so WaitForProcessing only flushes acks.
            let token = stream.shutdown_token();
            drop(stream);
            if tokio::time::timeout(STREAM_FLUSH_TIMEOUT, token.shutdown())
                .await
                .is_err()
            {
                tracing::warn!(
                    timeout_s = STREAM_FLUSH_TIMEOUT.as_secs(),
                    "the Pub/Sub stream did not shut down in time"
                );
            }
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    }
}

fn delivery(message: Message, handler: Handler) -> Delivery<Handler> {
    Delivery {
        publish_time: message
            .publish_time
            .and_then(|t| SystemTime::try_from(t).ok()),
        data: message.data,
        message_id: message.message_id,
        ack: handler,
    }
}

/// Moves deliveries from the stream into the consumer's channel until told to stop or the
/// stream ends. Returns the stream (for a clean shutdown) or its permanent error; dropping
/// the sender closes the channel, which the consumer sees as the reader's end.
async fn read_stream(
    mut stream: MessageStream,
    tx: mpsc::Sender<Delivery<Handler>>,
    stop: CancellationToken,
    link: &PubSubLink,
) -> Result<Option<MessageStream>, ConsumerError> {
    loop {
        let item = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(Some(stream)),
            item = stream.next() => item,
        };
        match item {
            Some(Ok((message, handler))) => {
                link.answered();
                // Waiting here is the backpressure: the consumer is behind.
                let sent = tokio::select! {
                    biased;
                    _ = stop.cancelled() => return Ok(Some(stream)),
                    sent = tx.send(delivery(message, handler)) => sent,
                };
                if sent.is_err() {
                    return Ok(Some(stream));
                }
            }
            Some(Err(e)) => {
                tracing::error!(error = %e, "the Pub/Sub stream failed permanently");
                return Err(ConsumerError::Stream(e));
            }
            None => return Ok(None),
        }
    }
}
