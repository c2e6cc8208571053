//! Composition root: builds the parts from the [`Config`], spawns every task on one
//! `TaskTracker`, and stops them all through one `CancellationToken`.
//!
//! `run(config, shutdown, counters)` is what `main` calls; tests call it the same way.

use crate::auth::{NoCredentials, StaticToken, TokenSource};
use crate::config::Config;
use crate::consumer::{Consumer, subscription};
use crate::gmail::GmailClient;
use crate::health::Health;
use crate::store::Store;
use crate::sync::Syncer;
use crate::telemetry::Counters;
use anyhow::Context;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long startup waits for Redis and Pub/Sub before giving up with a clear error.
const STARTUP_DEADLINE: Duration = Duration::from_secs(20);

/// Runs the worker until `shutdown` is cancelled (then drains and returns `Ok`) or a part fails
/// for good (then drains and returns the error).
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    counters: Arc<Counters>,
) -> anyhow::Result<()> {
    let subscription = config.require_subscription()?.to_string();
    let store = connect_store(&config).await?;
    let gmail = gmail_client(&config, counters.clone())?;
    subscription::check(&config.pubsub, &subscription, STARTUP_DEADLINE)
        .await
        .context("Pub/Sub startup check")?;
    let stream = subscription::open(&config.pubsub, &subscription, &config.consumer).await?;
    tracing::info!(
        subscription = %subscription,
        redis = %config.redis.describe(),
        gmail_api = %config.gmail.api_url,
        max_concurrent_syncs = config.consumer.max_concurrent_syncs,
        "gmail-sync worker started"
    );

    let tracker = TaskTracker::new();
    let heartbeat = Arc::new(AtomicU64::new(0));
    // Background tasks (summary, health) stop on `background`; the consumer drains first.
    let background = CancellationToken::new();
    let health = Health::new(&config.health_dir);
    health.mark_ready()?;
    tracker.spawn(
        health
            .clone()
            .keep_alive(heartbeat.clone(), background.clone()),
    );
    if let Some(every) = config.summary_interval {
        tracker.spawn(crate::telemetry::log_summaries(
            counters.clone(),
            every,
            background.clone(),
        ));
    }
    let syncer = Arc::new(Syncer::new(
        gmail,
        store,
        config.sync.clone(),
        counters.clone(),
        config.log_mailbox,
    ));
    let consumer = Consumer {
        syncer,
        settings: config.consumer.clone(),
        counters: counters.clone(),
        tracker: tracker.clone(),
        heartbeat,
    };
    // Not ready from the first moment of shutdown, so probes see it before the drain ends.
    tracker.spawn({
        let (health, shutdown, background) = (health.clone(), shutdown.clone(), background.clone());
        async move {
            tokio::select! {
                _ = shutdown.cancelled() => health.mark_not_ready(),
                _ = background.cancelled() => {}
            }
        }
    });
    let result = consumer.run(stream, shutdown.clone()).await;
    health.mark_not_ready();
    background.cancel();
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(10), tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some tasks did not stop within 10 s");
    }
    crate::telemetry::log_summary(&counters, "final summary");
    result.map_err(anyhow::Error::from)
}

pub async fn connect_store(config: &Config) -> anyhow::Result<Store> {
    let connect = async {
        let store = Store::connect(&config.redis, &config.store).await?;
        store.ping().await?;
        Ok::<_, crate::store::StoreError>(store)
    };
    match tokio::time::timeout(STARTUP_DEADLINE, connect).await {
        Ok(Ok(store)) => Ok(store),
        Ok(Err(e)) => Err(anyhow::anyhow!(
            "cannot use Redis at {}: {e} (check GMAIL_SYNC_REDIS_URL / GMAIL_SYNC_REDIS_CLUSTER_NODES)",
            config.redis.describe()
        )),
        Err(_) => Err(anyhow::anyhow!(
            "no answer from Redis at {} within {STARTUP_DEADLINE:?}",
            config.redis.describe()
        )),
    }
}

pub fn gmail_client(config: &Config, counters: Arc<Counters>) -> anyhow::Result<GmailClient> {
    let tokens: Arc<dyn TokenSource> = match &config.gmail.dev_access_token {
        Some(token) => {
            tracing::warn!(
                "using GMAIL_SYNC_DEV_ACCESS_TOKEN for every mailbox: for development only"
            );
            Arc::new(StaticToken::new(token))
        }
        None => Arc::new(NoCredentials),
    };
    GmailClient::new(&config.gmail, tokens, counters)
}
