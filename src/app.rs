//! Composition root: builds the parts from the [`Config`], starts every long-running task
//! through one [`Supervisor`] on one `TaskTracker`, and stops them all on one signal.
//!
//! `run(config, shutdown, counters)` is what `main` calls; tests call it the same way.

use crate::auth::refresh::{LookupFuture, StoredRefreshTokens};
use crate::auth::{AuthError, Credentials};
use crate::config::{Config, MetricsExport};
use crate::consumer::{Consumer, ShutdownMode, stream, subscription};
use crate::gmail::GmailClient;
use crate::health::{self, Health, PubSubLink};
use crate::mailbox::{KeyOrigin, Mailbox, MailboxLogStyle};
use crate::quota::Governor;
use crate::scheduler::{SchedulePolicy, Scheduler};
use crate::store::Store;
use crate::supervisor::{StopCause, Supervisor, TaskEnd, Tier};
use crate::sync::Syncer;
use crate::telemetry::Counters;
use crate::telemetry::otlp::OtlpExport;
use crate::vault::{Vault, VaultError};
use anyhow::Context;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long startup waits for Redis and Pub/Sub before giving up with a clear error.
pub(crate) const STARTUP_DEADLINE: Duration = Duration::from_secs(20);
/// Slack on top of the consumer's own drain bound (shutdown timeout + stream flush) before the
/// supervisor stops waiting for the workers: their last log lines and lease releases.
const WORKER_DRAIN_SLACK: Duration = Duration::from_secs(5);
/// How long background tasks (health, summary, metrics) get to stop: they leave a select, and
/// the metrics export makes its last export within `otlp::FINAL_EXPORT_TIMEOUT` (less).
const BACKGROUND_DRAIN: Duration = Duration::from_secs(5);
const _: () = assert!(
    crate::telemetry::otlp::FINAL_EXPORT_TIMEOUT.as_millis() < BACKGROUND_DRAIN.as_millis(),
    "the last metrics export must end within the background drain"
);

/// Why `run` returned with an error; the exit code says which (README, "Exit codes").
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Startup checks failed (Redis, Pub/Sub, health dir): nothing was consumed.
    #[error("startup failed: {0:#}")]
    Startup(anyhow::Error),
    /// The Gmail credentials are misconfigured (a key, a client, a scope, a delegation grant):
    /// the error says what to fix.
    #[error("Gmail credentials: {0}")]
    Credentials(crate::auth::AuthError),
    /// A long-running task failed, or ended without being asked to; the others were drained.
    #[error("task {task} {detail}")]
    Task { task: &'static str, detail: String },
}

impl AppError {
    /// 1: startup failed; 2: misconfigured credentials; 3: a task stopped the process after
    /// startup.
    pub fn exit_code(&self) -> i32 {
        match self {
            AppError::Startup(_) => 1,
            AppError::Credentials(_) => 2,
            AppError::Task { .. } => 3,
        }
    }
}

impl From<crate::config::ConfigError> for AppError {
    fn from(e: crate::config::ConfigError) -> AppError {
        AppError::Startup(e.into())
    }
}

/// Runs the worker until `shutdown` is cancelled (then drains and returns `Ok`) or a task
/// ends on its own (then drains the rest and returns which task and why).
pub async fn run(
    config: Config,
    shutdown: CancellationToken,
    counters: Arc<Counters>,
) -> Result<(), AppError> {
    // First: files a killed process left must not make this one look live or ready.
    let health = Health::new(&config.health_dir);
    health.reset().map_err(AppError::Startup)?;
    let subscription = config.require_subscription()?.to_string();
    // The scheduler renews watches on this topic: without it every mailbox goes deaf in 7 days.
    let topic = config.require_topic()?.to_string();
    let store = connect_store_until(&config, WhenRefused::RetryUntilDeadline)
        .await
        .map_err(AppError::Startup)?;
    store
        .warn_if_keys_may_be_evicted(&config.redis.describe())
        .await;
    let credentials = credentials(&config, &store)?;
    for verified in check_credentials(&config, &credentials).await? {
        tracing::info!(mode = %config.auth.describe(), "credentials: {verified}");
    }
    let tracker = TaskTracker::new();
    // One governor for the consumer's syncs and the scheduler's work: the same client.
    let governor = Governor::new(
        store.clone(),
        &config.quota,
        counters.clone(),
        tracker.clone(),
    );
    let gmail = GmailClient::new(&config.gmail, credentials.token_source(), counters.clone())
        .map_err(AppError::Startup)?
        .with_governor(governor);
    let checker = subscription::Checker::connect(&config.pubsub, &subscription, STARTUP_DEADLINE)
        .await
        .context("Pub/Sub startup check")
        .map_err(AppError::Startup)?;
    let stream = subscription::open(&config.pubsub, &subscription, &config.consumer)
        .await
        .map_err(|e| AppError::Startup(e.into()))?;
    let metrics = match &config.metrics.export {
        MetricsExport::Otlp(otlp) => Some(
            OtlpExport::start(&config.metrics, otlp, &counters)
                .map_err(|e| AppError::Startup(e.into()))?,
        ),
        MetricsExport::Off(_) => None,
    };
    tracing::info!(
        subscription = %subscription,
        redis = %config.redis.describe(),
        gmail_api = %config.gmail.api_url,
        max_concurrent_syncs = config.consumer.max_concurrent_syncs,
        max_outstanding_bytes = config.consumer.max_outstanding_bytes,
        metrics = %config.metrics.describe(),
        quota_governor = ?config.quota.mode,
        quota_table = ?config.quota.table,
        quota_user_per_minute = config.quota.limits.user_per_minute,
        quarantine_cap_bytes =
            crate::store::quarantine::quarantine_memory_cap(config.store.quarantine_maxlen),
        "gmail-sync worker started"
    );
    if let MailboxLogStyle::Hash(key) = config.log_mailbox
        && key.origin() == KeyOrigin::Random
    {
        // Refusing to start would break every deployment that predates the variable, for a
        // property (linking log lines across processes) that only the operator can judge.
        tracing::warn!(
            "GMAIL_SYNC_LOG_HASH_KEY_FILE is not set: mailbox hashes in logs use a random key of \
             this process, so the same mailbox has a different hash on every replica and after \
             every restart"
        );
    }

    let heartbeat = Arc::new(AtomicU64::new(0));
    let mut supervisor = Supervisor::new(tracker.clone());

    let syncer = Arc::new(Syncer::new(
        gmail.clone(),
        store.clone(),
        config.sync.clone(),
        counters.clone(),
        config.log_mailbox,
    ));
    let guard = syncer.guard().clone();
    let link = PubSubLink::default();
    let checks = health::Checks::new(store.clone(), checker, guard, link.clone());
    let scheduler = Scheduler {
        store: store.clone(),
        gmail,
        syncer: syncer.clone(),
        topic,
        policy: SchedulePolicy::new(config.scheduler.clone(), config.store.shards),
        counters: counters.clone(),
        tracker: tracker.clone(),
        log_style: config.log_mailbox,
        heartbeat: heartbeat.clone(),
    };
    let consumer = Consumer {
        syncs: syncer,
        quarantine: Arc::new(store),
        settings: config.consumer.clone(),
        counters: counters.clone(),
        tracker: tracker.clone(),
        heartbeat: heartbeat.clone(),
    };
    supervisor.spawn("consumer", Tier::Worker, move |stop| async move {
        stream::consume(stream, consumer, stop, link).await?;
        Ok(())
    });
    supervisor.spawn("scheduler", Tier::Worker, move |stop| scheduler.run(stop));
    supervisor.spawn("health", Tier::Background, {
        let health = health.clone();
        move |stop| async move {
            health.keep_alive(heartbeat, checks, stop).await;
            Ok(())
        }
    });
    if let Some(every) = config.summary_interval {
        let counters = counters.clone();
        supervisor.spawn("summary", Tier::Background, move |stop| async move {
            crate::telemetry::log_summaries(counters, every, stop).await;
            Ok(())
        });
    }
    if let Some(export) = metrics {
        // Background: its last export (bounded by otlp::FINAL_EXPORT_TIMEOUT, inside
        // BACKGROUND_DRAIN) runs after the workers drained, with their final counts.
        supervisor.spawn("metrics", Tier::Background, move |stop| async move {
            export.run(stop).await;
            Ok(())
        });
    }

    // The consumer's own bound: its grace period, then the stream's ack flush.
    let consumer_drain = match ShutdownMode::from_timeout(config.consumer.shutdown_timeout) {
        ShutdownMode::Graceful { timeout } => timeout,
        ShutdownMode::NackImmediately => Duration::ZERO,
    } + stream::STREAM_FLUSH_TIMEOUT;
    let stopped = supervisor
        .run(
            &shutdown,
            // Not ready from the first moment of the stop, so probes see it before the drain.
            |cause| {
                health.mark_not_ready();
                if let StopCause::TaskEnded { task, end } = cause {
                    tracing::error!(task, end = ?end, "a task ended on its own; stopping the others");
                }
            },
            consumer_drain + WORKER_DRAIN_SLACK,
            BACKGROUND_DRAIN,
        )
        .await;
    for (task, end) in &stopped.failures {
        tracing::error!(task, end = ?end, "a task failed while stopping");
    }
    if stopped.stragglers > 0 {
        tracing::warn!(
            tasks = stopped.stragglers,
            "some tasks did not stop in time"
        );
    }
    crate::telemetry::log_summary(&counters, "final summary");
    match stopped.cause {
        StopCause::Requested => match stopped.failures.into_iter().next() {
            None => Ok(()),
            Some((task, end)) => Err(task_error(task, end)),
        },
        StopCause::TaskEnded { task, end } => Err(task_error(task, end)),
    }
}

fn task_error(task: &'static str, end: TaskEnd) -> AppError {
    let detail = match end {
        TaskEnd::Returned => "ended on its own".to_string(),
        TaskEnd::Failed(e) => format!("failed: {e:#}"),
        TaskEnd::Panicked(p) => format!("panicked: {p}"),
    };
    AppError::Task { task, detail }
}

pub async fn connect_store(config: &Config) -> anyhow::Result<Store> {
    connect_store_until(config, WhenRefused::Fail).await
}

/// What startup does when Redis refuses the connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum WhenRefused {
    /// Admin commands: report it at once.
    Fail,
    /// `run`: ask again until [`STARTUP_DEADLINE`].
    RetryUntilDeadline,
}

/// With [`WhenRefused::RetryUntilDeadline`] (`run`), a Redis that refuses the connection (not up yet,
/// restarting, failing over) is asked again until [`STARTUP_DEADLINE`], so a worker restarted
/// during a short outage connects once Redis is back rather than exiting into the kubelet's
/// crash-loop backoff. Anything else (a login, TLS or address problem, no answer) fails at
/// once, as it does for the admin commands.
async fn connect_store_until(config: &Config, refused: WhenRefused) -> anyhow::Result<Store> {
    let deadline = tokio::time::Instant::now() + STARTUP_DEADLINE;
    let connect = Store::connect_and_ping(
        &config.redis,
        &config.store,
        (refused == WhenRefused::RetryUntilDeadline).then_some(deadline),
    );
    match tokio::time::timeout_at(deadline, connect).await {
        Ok(Ok(store)) => Ok(store),
        // A connect error names the node, what failed and what to check itself.
        Ok(Err(e @ crate::store::StoreError::Connect { .. })) => {
            Err(anyhow::anyhow!("cannot use Redis: {e}"))
        }
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

/// The Gmail client with the configured credentials. Runs inside the runtime (ADC).
pub fn gmail_client(
    config: &Config,
    store: &Store,
    counters: Arc<Counters>,
) -> Result<GmailClient, AppError> {
    let credentials = credentials(config, store)?;
    // An admin command's calls are recorded in the shared budgets (never deferred, outside
    // admitted work); its permits (`mailbox resync`) release on a tracker of its own, and a
    // command that exits first leaves the slot to its TTL.
    let governor = Governor::new(
        store.clone(),
        &config.quota,
        counters.clone(),
        TaskTracker::new(),
    );
    Ok(
        GmailClient::new(&config.gmail, credentials.token_source(), counters)
            .map_err(AppError::Startup)?
            .with_governor(governor),
    )
}

/// Refresh tokens as stored in Redis, sealed by the vault.
struct SealedRefreshTokens {
    store: Store,
    vault: Option<Vault>,
}

impl StoredRefreshTokens for SealedRefreshTokens {
    fn refresh_token<'a>(&'a self, mailbox: &'a Mailbox) -> LookupFuture<'a> {
        Box::pin(async move {
            let sealed = self.store.credential(mailbox).await.map_err(|e| {
                AuthError::Transient(format!("reading the stored refresh token: {e}"))
            })?;
            let Some(sealed) = sealed else {
                return Ok(None);
            };
            let Some(vault) = &self.vault else {
                return Err(AuthError::Misconfigured(format!(
                    "refresh tokens are stored but {} is not set: configure the key they were \
                     sealed with",
                    crate::config::TOKEN_KEY_FILE
                )));
            };
            vault.open(mailbox, &sealed).map(Some).map_err(|e| match e {
                // No configured key opens it: the deployment's keys are wrong, not the mailbox.
                VaultError::UnknownKey { .. } => AuthError::Misconfigured(e.to_string()),
                // This mailbox's value is damaged: store its token again.
                VaultError::Tampered { .. } | VaultError::Malformed(_) => {
                    AuthError::NoCredential(e.to_string())
                }
            })
        })
    }
}

pub(crate) fn credentials(config: &Config, store: &Store) -> Result<Credentials, AppError> {
    if config.auth.dev_access_token.is_some() {
        tracing::warn!("using GMAIL_SYNC_DEV_ACCESS_TOKEN for every mailbox: for development only");
    }
    let vault = Vault::from_config(&config.token_keys)
        .map_err(|e| AppError::Credentials(AuthError::Misconfigured(e.to_string())))?;
    let stored = SealedRefreshTokens {
        store: store.clone(),
        vault,
    };
    Credentials::new(&config.auth, Arc::new(stored)).map_err(AppError::Credentials)
}

/// Proves the credentials work before anything is consumed (see `Credentials::check`).
pub(crate) async fn check_credentials(
    config: &Config,
    credentials: &Credentials,
) -> Result<Vec<String>, AppError> {
    match tokio::time::timeout(
        STARTUP_DEADLINE,
        credentials.check(config.auth.probe_mailbox.as_ref()),
    )
    .await
    {
        Ok(Ok(verified)) => Ok(verified),
        Ok(Err(e)) if e.is_retryable() => Err(AppError::Startup(anyhow::anyhow!(
            "Gmail credentials could not be checked: {e}"
        ))),
        Ok(Err(e)) => Err(AppError::Credentials(e)),
        Err(_) => Err(AppError::Startup(anyhow::anyhow!(
            "the token endpoint ({}) did not answer within {STARTUP_DEADLINE:?}",
            config.auth.token_url
        ))),
    }
}
