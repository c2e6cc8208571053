//! Mailbox registration and removal: what `mailbox add|import|remove` do.
//!
//! Adding is idempotent: `users.watch` on the configured topic, then the mailbox is stored with
//! the watch's historyId as its baseline cursor, unless it already has one (so nothing between
//! the old cursor and now is skipped), its renewal and first fallback sync are scheduled, and an
//! `attention` mark is cleared (re-enable after a permanent error was fixed).
//!
//! Removing calls `users.stop`, then deletes the mailbox's state, lease, claim and schedule
//! entries in one script; the change entries already written stay. A mailbox whose grant is
//! gone (stop answers a permanent error) is still removed, with a warning.

use crate::config::Config;
use crate::gmail::{GmailClient, GmailError, LabelFilter};
use crate::history_id::HistoryId;
use crate::mailbox::Mailbox;
use crate::scheduler::SchedulePolicy;
use crate::store::{Store, StoreError, WatchPlan, now_ms};
use crate::telemetry::Counters;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("users.watch failed: {0}")]
    Watch(#[source] GmailError),
    #[error("users.stop failed: {0} (nothing was removed; run the command again)")]
    Stop(#[source] GmailError),
    #[error("redis: {0}")]
    Store(#[from] StoreError),
}

impl RegistryError {
    /// Worth running the command again as it is (a transient Gmail or Redis failure)?
    pub fn is_retryable(&self) -> bool {
        match self {
            RegistryError::Watch(e) | RegistryError::Stop(e) => e.is_retryable(),
            RegistryError::Store(e) => e.is_retryable(),
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Registered {
    pub mailbox: String,
    /// False if the mailbox was already registered (its cursor was kept).
    pub created: bool,
    pub cursor: HistoryId,
    pub watch_history_id: HistoryId,
    pub watch_expiration_ms: u64,
    /// When the scheduler renews the watch (epoch s).
    pub next_renewal_s: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Removed {
    pub mailbox: String,
    /// False if it was not registered (nothing to delete; stop was still sent).
    pub was_registered: bool,
    /// Gmail confirmed `users.stop`.
    pub stopped: bool,
    /// Why `users.stop` was refused for good (e.g. the grant is gone), if it was.
    pub warning: Option<String>,
}

pub struct Registry {
    gmail: GmailClient,
    store: Store,
    topic: String,
    policy: SchedulePolicy,
}

impl Registry {
    pub fn new(gmail: GmailClient, store: Store, topic: &str, policy: SchedulePolicy) -> Registry {
        Registry {
            gmail,
            store,
            topic: topic.to_string(),
            policy,
        }
    }

    /// Everything from the configuration: Redis (checked), the Gmail client, the topic.
    pub async fn from_config(config: &Config) -> anyhow::Result<Registry> {
        let topic = config.require_topic()?;
        let store = crate::app::connect_store(config).await?;
        let gmail = crate::app::gmail_client(config, &store, Arc::new(Counters::default()))?;
        let policy = SchedulePolicy::new(config.scheduler.clone(), config.store.shards);
        Ok(Registry::new(gmail, store, topic, policy))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn gmail(&self) -> &GmailClient {
        &self.gmail
    }

    pub async fn add(
        &self,
        mailbox: &Mailbox,
        filter: Option<&LabelFilter>,
    ) -> Result<Registered, RegistryError> {
        let watch = match self.gmail.watch(mailbox, &self.topic, filter).await {
            // Another client's watch (e.g. an old topic): stop it and watch again, once.
            Err(GmailError::WatchConflict) => {
                self.gmail
                    .stop(mailbox)
                    .await
                    .map_err(RegistryError::Stop)?;
                self.gmail.watch(mailbox, &self.topic, filter).await
            }
            other => other,
        }
        .map_err(RegistryError::Watch)?;
        let now = now_ms();
        let renew_at_s = self.policy.next_renewal_s(now);
        let plan = WatchPlan {
            expiration_ms: watch.expiration_ms,
            renew_at_s,
            first_look_ms: self.policy.first_look_ms(now, renew_at_s),
            labels: filter.map(LabelFilter::encode),
        };
        let (created, cursor) = self
            .store
            .register(mailbox, watch.history_id, &plan)
            .await?;
        Ok(Registered {
            mailbox: mailbox.to_string(),
            created,
            cursor,
            watch_history_id: watch.history_id,
            watch_expiration_ms: watch.expiration_ms,
            next_renewal_s: renew_at_s,
        })
    }

    pub async fn remove(&self, mailbox: &Mailbox) -> Result<Removed, RegistryError> {
        let (stopped, warning) = match self.gmail.stop(mailbox).await {
            Ok(()) => (true, None),
            Err(e) if e.is_retryable() => return Err(RegistryError::Stop(e)),
            // The grant is gone (or the mailbox): Gmail will stop notifying on its own.
            Err(e) => (false, Some(format!("users.stop refused: {e}"))),
        };
        let was_registered = self.store.remove(mailbox).await?;
        Ok(Removed {
            mailbox: mailbox.to_string(),
            was_registered,
            stopped,
            warning,
        })
    }
}
