//! Push notifications: a task that receives scheduled jobs (already folded per mailbox by the
//! state), claims each when due, reads the mailbox's historyId at send time and publishes
//! `{"emailAddress","historyId"}` to the watch's topic through the Pub/Sub emulator. HTTP
//! handlers never wait for it.

use super::Inner;
use super::ledger::{LedgerEntry, NotificationEntry, NotificationOutcome};
use super::state::NotifyJob;
use google_cloud_pubsub::client::{BasePublisher, Publisher};
use rand::Rng;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::OnceCell;
use tokio::sync::mpsc::UnboundedReceiver;

/// Lazily connected publishers, one per topic, sharing one connection.
pub(crate) struct Publishers {
    endpoint: Option<String>,
    base: OnceCell<Result<BasePublisher, String>>,
    topics: Mutex<HashMap<String, Publisher>>,
}

impl Publishers {
    pub fn new(endpoint: Option<String>) -> Self {
        Publishers {
            endpoint,
            base: OnceCell::new(),
            topics: Mutex::new(HashMap::new()),
        }
    }

    async fn publisher(&self, topic: &str) -> Result<Option<Publisher>, String> {
        let Some(endpoint) = &self.endpoint else {
            return Ok(None);
        };
        if let Some(p) = self.topics.lock().expect("publishers").get(topic) {
            return Ok(Some(p.clone()));
        }
        let base = self
            .base
            .get_or_init(|| async {
                BasePublisher::builder()
                    .with_endpoint(endpoint.clone())
                    .with_credentials(
                        google_cloud_auth::credentials::anonymous::Builder::new().build(),
                    )
                    .build()
                    .await
                    .map_err(|e| format!("connecting to the Pub/Sub emulator at {endpoint}: {e}"))
            })
            .await
            .as_ref()
            .map_err(Clone::clone)?;
        let mut topics = self.topics.lock().expect("publishers");
        let p = topics
            .entry(topic.to_string())
            .or_insert_with(|| base.publisher(topic.to_string()).build());
        Ok(Some(p.clone()))
    }
}

/// The notifier loop: one spawned task per due job (sleeping until due).
pub(crate) async fn run(inner: Arc<Inner>, mut rx: UnboundedReceiver<NotifyJob>) {
    let cancel = inner.cancel.clone();
    loop {
        let job = tokio::select! {
            _ = cancel.cancelled() => break,
            job = rx.recv() => match job { Some(j) => j, None => break },
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            let cancel = inner.cancel.clone();
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = fire(&inner, job) => {}
            }
        });
    }
}

async fn fire(inner: &Arc<Inner>, job: NotifyJob) {
    let at = tokio::time::Instant::from_std(job.at);
    tokio::time::sleep_until(at).await;
    let (topic, history_id, dropped, delay) = {
        let mut st = inner.state.lock().expect("state");
        let Some((topic, hid)) = st.take_notification(&job.email, job.generation, Instant::now())
        else {
            return;
        };
        let knobs = inner.knobs.lock().expect("knobs").clone();
        let dropped = knobs.drop_probability > 0.0
            && st.notify_rng.random_bool(knobs.drop_probability.min(1.0));
        let delay = knobs.delay.map(|(lo, hi)| {
            if hi > lo {
                st.notify_rng.random_range(lo..=hi)
            } else {
                lo
            }
        });
        (topic, hid, dropped, delay)
    };
    let as_number = inner.knobs.lock().expect("knobs").history_id_as_number;
    let payload = payload(&job.email, history_id, as_number);
    let outcome = if dropped {
        NotificationOutcome::Dropped
    } else {
        if let Some(d) = delay.filter(|d| !d.is_zero()) {
            tokio::time::sleep(d).await;
        }
        publish(inner, &topic, &payload).await
    };
    if matches!(outcome, NotificationOutcome::Published(_)) {
        inner.notifications_sent.fetch_add(1, Ordering::Relaxed);
    }
    inner
        .state
        .lock()
        .expect("state")
        .ledger
        .push(LedgerEntry::Notification(NotificationEntry {
            mailbox: job.email,
            topic,
            history_id,
            payload,
            outcome,
            at: SystemTime::now(),
        }));
}

async fn publish(inner: &Inner, topic: &str, payload: &str) -> NotificationOutcome {
    let publisher = match inner.publishers.publisher(topic).await {
        Ok(Some(p)) => p,
        Ok(None) => return NotificationOutcome::NoEndpoint,
        Err(e) => return NotificationOutcome::Failed(e),
    };
    let msg = google_cloud_pubsub::model::Message::new().set_data(payload.as_bytes().to_vec());
    match tokio::time::timeout(Duration::from_secs(30), publisher.publish(msg)).await {
        Ok(Ok(id)) => NotificationOutcome::Published(id),
        Ok(Err(e)) => NotificationOutcome::Failed(e.to_string()),
        Err(_) => NotificationOutcome::Failed("publish timed out after 30 s".to_string()),
    }
}

/// The notification payload Gmail publishes.
pub fn payload(email: &str, history_id: u64, as_number: bool) -> String {
    let email = serde_json::to_string(email).expect("string");
    if as_number {
        format!(r#"{{"emailAddress":{email},"historyId":{history_id}}}"#)
    } else {
        format!(r#"{{"emailAddress":{email},"historyId":"{history_id}"}}"#)
    }
}
