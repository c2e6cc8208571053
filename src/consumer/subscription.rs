//! Connecting to Pub/Sub: clients, the startup check, and the stream settings.
//!
//! The StreamingPull client retries transient failures forever, so an unreachable endpoint, a
//! missing subscription or unusable credentials would look like a silent hang. Before pulling
//! we therefore read the subscription once through the admin API (same endpoint, same
//! credentials) with a deadline, and fail startup with a clear message.

use crate::config::{ConsumerSettings, PubSubEndpoint};
use google_cloud_auth::credentials::Credentials;
use google_cloud_pubsub::client::{Subscriber, SubscriptionAdmin};
use google_cloud_pubsub::subscriber::{MessageStream, ShutdownBehavior};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SubscriptionError {
    #[error("cannot build Pub/Sub credentials: {0}")]
    Credentials(String),
    #[error("cannot create the Pub/Sub client: {0}")]
    Client(String),
    #[error(
        "subscription {subscription} is not usable: {detail} (check GMAIL_SYNC_SUBSCRIPTION, that the \
         subscription exists, and that the credentials may subscribe to it)"
    )]
    Unusable {
        subscription: String,
        detail: String,
    },
    #[error(
        "no answer from Pub/Sub within {0:?} (check network access, PUBSUB_EMULATOR_HOST, and credentials)"
    )]
    Timeout(Duration),
}

fn credentials(endpoint: &PubSubEndpoint) -> Result<Credentials, SubscriptionError> {
    match endpoint {
        PubSubEndpoint::Emulator(_) => {
            Ok(google_cloud_auth::credentials::anonymous::Builder::new().build())
        }
        // Application Default Credentials: GOOGLE_APPLICATION_CREDENTIALS, gcloud's user file, or
        // the metadata server (Workload Identity on GKE).
        PubSubEndpoint::Google => google_cloud_auth::credentials::Builder::default()
            .build()
            .map_err(|e| SubscriptionError::Credentials(e.to_string())),
    }
}

/// Checks that `subscription` exists and is readable with our credentials, within `deadline`.
pub async fn check(
    endpoint: &PubSubEndpoint,
    subscription: &str,
    deadline: Duration,
) -> Result<(), SubscriptionError> {
    Checker::connect(endpoint, subscription, deadline)
        .await
        .map(|_| ())
}

/// The subscription check, with its admin client kept for later checks (the health task
/// repeats it while no message arrives: see `health::PubSubLink`).
#[derive(Clone, Debug)]
pub struct Checker {
    admin: SubscriptionAdmin,
    subscription: String,
}

impl Checker {
    /// Builds the admin client and checks the subscription once, both within `deadline`.
    pub async fn connect(
        endpoint: &PubSubEndpoint,
        subscription: &str,
        deadline: Duration,
    ) -> Result<Checker, SubscriptionError> {
        let mut builder = SubscriptionAdmin::builder().with_credentials(credentials(endpoint)?);
        if let PubSubEndpoint::Emulator(url) = endpoint {
            builder = builder.with_endpoint(url.clone());
        }
        let connect = async {
            let admin = builder
                .build()
                .await
                .map_err(|e| SubscriptionError::Client(e.to_string()))?;
            let checker = Checker {
                admin,
                subscription: subscription.to_string(),
            };
            checker.get().await?;
            Ok(checker)
        };
        match tokio::time::timeout(deadline, connect).await {
            Ok(result) => result,
            Err(_) => Err(SubscriptionError::Timeout(deadline)),
        }
    }

    /// Reads the subscription once (`GetSubscription`), within `deadline`.
    pub async fn check(&self, deadline: Duration) -> Result<(), SubscriptionError> {
        match tokio::time::timeout(deadline, self.get()).await {
            Ok(result) => result,
            Err(_) => Err(SubscriptionError::Timeout(deadline)),
        }
    }

    async fn get(&self) -> Result<(), SubscriptionError> {
        self.admin
            .get_subscription()
            .set_subscription(&self.subscription)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| SubscriptionError::Unusable {
                subscription: self.subscription.clone(),
                detail: e.to_string(),
            })
    }
}

/// Opens the StreamingPull stream.
///
/// Lease settings: the client extends every outstanding message every few seconds by
/// `ack_extension` (also the stream's ack deadline), so a crashed worker's messages return after
/// at most that long; 60 s by default keeps modack traffic low. `max_lease` bounds how long a
/// message may wait in the coalescer (busy lease, not-yet-visible retries) before Pub/Sub may
/// redeliver it; 10 minutes is far above any sync. Flow control bounds memory per process, by
/// count (`GMAIL_SYNC_MAX_OUTSTANDING_MESSAGES`) and by bytes
/// (`GMAIL_SYNC_MAX_OUTSTANDING_BYTES`, 16 MiB by default instead of the client's 100 MiB, which
/// a publisher of large messages could use to push the pod past its 128 MiB limit; real
/// notifications are under 200 bytes, so only hostile traffic ever meets that bound). The
/// concurrency of syncs is bounded separately by a semaphore.
pub async fn open(
    endpoint: &PubSubEndpoint,
    subscription: &str,
    settings: &ConsumerSettings,
) -> Result<MessageStream, SubscriptionError> {
    let mut builder = Subscriber::builder().with_credentials(credentials(endpoint)?);
    if let PubSubEndpoint::Emulator(url) = endpoint {
        builder = builder.with_endpoint(url.clone());
    }
    let client = builder
        .build()
        .await
        .map_err(|e| SubscriptionError::Client(e.to_string()))?;
    Ok(client
        .subscribe(subscription)
        .set_max_lease_extension(settings.ack_extension)
        .set_max_lease(settings.max_lease)
        .set_max_outstanding_messages(settings.max_outstanding_messages)
        .set_max_outstanding_bytes(settings.max_outstanding_bytes)
        // Our dispatcher acks or drops every handler before it shuts the stream down, so
        // waiting for processing only flushes the pending acks.
        .set_shutdown_behavior(ShutdownBehavior::WaitForProcessing)
        .build())
}
