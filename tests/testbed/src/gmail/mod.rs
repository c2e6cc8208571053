//! A stateful Gmail API simulator (Gmail has no emulator): the oracle of the invariant tests.
//!
//! [`GmailSim::start`] serves, on a loopback port, `users.getProfile`, `users.history.list`,
//! `users.messages.list`, `users.messages.get`, `users.watch`, `users.stop` under
//! `/gmail/v1/users/{userId}/...`, the batch endpoint `POST /batch/gmail/v1` (see [`batch`]), an OAuth token endpoint at `/token` (refresh-token and
//! delegation-JWT grants), and a JSON control API under `/_sim/...` (see [`control`]).
//! Every change it makes and every call it answers is appended to a [`Ledger`].
//!
//! # Semantics (what tests may rely on)
//! - historyIds per mailbox strictly increase by a random gap (`history_id_gap`, seeded); one
//!   history record per change (kinds: messageAdded, messageDeleted, labelAdded, labelRemoved),
//!   whose id is the mailbox's historyId after the change. [`GmailSim::touch`] advances the
//!   historyId without a record (like drafts/settings changes do in Gmail).
//! - `history.list`: records strictly after `startHistoryId`, chronological; `maxResults`
//!   default 100, clamped to 500 (0 = default); `nextPageToken` only when another matching
//!   record exists; `history` absent when empty; `historyId` = the mailbox's current id (read
//!   in the same critical section as the records). `startHistoryId` below the retention horizon
//!   → 404 notFound; above the current id → empty page with the current id; missing or not a
//!   u64 → 400. `historyTypes` (repeated or comma-separated) keeps only records of those kinds;
//!   `labelId` keeps records whose message carried the label before or after the change.
//!   Label lists in records are snapshots taken at the time of the change. With
//!   `history_lag`, a change younger than the lag is not shown yet: the page and its historyId
//!   stop just before it (Gmail's history lagging its notification).
//! - Retention horizon: initially the mailbox's initial historyId; [`GmailSim::expire_history`]
//!   raises it to the current id (all history dropped); `history_retention` drops records older
//!   than the given age (the horizon becomes the last dropped record's id).
//! - `messages.list`: newest first (ids are fixed-width hex and increase with delivery),
//!   `labelIds` = must carry all, SPAM/TRASH excluded unless `includeSpamTrash=true` or asked
//!   for by `labelIds`; `q` is ignored; `resultSizeEstimate` is the exact count.
//! - Notifications: at most one per mailbox per `notify_min_interval`; the first change after a
//!   quiet interval is sent at once, later ones fold into one notification sent when the
//!   interval is over, carrying the historyId current at send time. A successful watch sends
//!   one notification (subject to the same interval). Label-filtered watches notify for changes
//!   whose message carried a watched label before or after the change (exclude: none).
//! - Watch: one push client per mailbox (per developer project: the simulator is one project).
//!   A `watch` is answered 400 `failedPrecondition` (status `FAILED_PRECONDITION`) "Only one
//!   user push notification client allowed per developer (call /stop then try again)" when
//!   (a) another `watch` of the same mailbox is still in processing, or (b) the mailbox has an
//!   unexpired watch on another topic. A `watch` on the same topic renews it (new expiration,
//!   new label filter, the immediate notification); after `stop` (or once the watch expired) any
//!   topic is accepted. The request is validated (400 `invalidArgument`) before these checks.
//!   (a) needs `watch_processing` > 0: the watch then stays in processing that long after
//!   validation, per mailbox; it ends when the call answers, fails, or its client goes away
//!   (a cancelled watch registers nothing). With 0 (default) check and registration are atomic,
//!   so concurrent same-topic watches all succeed one after another. `stop` is never refused
//!   by the rule and does not wait: a `stop` during a watch's processing is overtaken by that
//!   watch's registration. Latency/hang faults delay a call before processing starts (they do
//!   not hold the in-processing state). Conflicts are handler answers: charged (100 units) and
//!   recorded with `error_reason` `failedPrecondition`, `faulted` false. The reason is our guess
//!   (field reports give only the 400 and the message).
//! - Auth: `me` = the token's mailbox; an issued token used on another mailbox → 403
//!   `forbidden` "Delegation denied for <token's mailbox>"; static tokens are valid for every
//!   mailbox but cannot use `me` (400); missing token → 401 `required`; unknown, revoked or
//!   expired token → 401 `authError`. An unknown mailbox → 400 `failedPrecondition`
//!   "Mail service not enabled".
//! - Pipeline order of every Gmail call: auth → mailbox → concurrency limit → injected fault →
//!   quota → handler. Units are charged only when the quota check admits the call (so a 404 or
//!   400 from the handler, including a watch conflict, is charged; auth errors, faults and quota
//!   refusals are not). Whether Gmail charges refused calls is not documented.
//! - Ledger queries for schedulers: [`Ledger::watch_calls_for`], [`Ledger::calls_by_mailbox`],
//!   [`Ledger::overlapping_calls`] (two calls to one endpoint for one mailbox in flight at once,
//!   from `started`/`ended`); [`GmailSim::watch_expiration`], [`GmailSim::watch_topic`],
//!   [`GmailSim::watch_in_progress`]. Permanent failures of one mailbox are fault rules
//!   (e.g. [`FaultAction::mail_service_not_enabled`], `FaultAction::forbidden("domainPolicy")`,
//!   `FaultAction::status(401)` on [`Endpoint::Stop`]).
//! - Notification delay (`notify_delay`) is applied after the historyId is read, per
//!   notification, so delayed notifications can arrive out of order (as in the field).
//!
//! # Not modelled
//! `q` search, threads/labels/drafts endpoints, methods other than `messages.get` inside batch
//! requests, message bodies (`full`/`raw` answer like `metadata`; headers: [`metadata`]), scopes (any token may call any endpoint), Google's daily reset (the daily project quota is a sliding 24 h),
//! checking that the watch topic exists or grants publish to Gmail (a missing topic shows as a
//! `Failed` notification in the ledger), push delivery via HTTPS push subscriptions, the
//! minutes-long delay before `stop` takes effect (it is immediate here), several developer
//! projects watching one mailbox (every caller is the same project here), the duplicate push
//! subscriptions racing watches have produced in the field (here the racing call is refused
//! instead), and watch processing time other than the fixed `watch_processing`.

pub mod auth;
pub mod batch;
pub mod config;
pub mod control;
pub mod errors;
pub mod faults;
pub mod fixtures;
pub mod ledger;
pub mod mailbox;
pub mod metadata;
pub mod notifier;
pub mod quota;
pub(crate) mod server;
pub mod state;
pub(crate) mod wire;

pub use config::{CostTable, IamSigner, QuotaConfig, QuotaErrorStyle, SimConfig};
pub use errors::{ApiError, OAuthError};
pub use faults::{FaultAction, FaultId, FaultRule};
pub use ledger::{
    CallEntry, ChangeEntry, ChangeKind, Endpoint, Ledger, LedgerEntry, NotificationEntry,
    NotificationOutcome,
};
pub use metadata::{MessageMeta, simulated_headers};
pub use state::{Delivered, MessageId, SimError};

use auth::Auth;
use faults::Faults;
use notifier::Publishers;
use quota::Quota;
use state::SimState;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Settings that can change at runtime.
#[derive(Debug, Clone)]
pub(crate) struct Knobs {
    pub history_id_as_number: bool,
    pub drop_probability: f64,
    pub delay: Option<(Duration, Duration)>,
    pub quota_style: QuotaErrorStyle,
    pub watch_processing: Duration,
}

pub(crate) struct Inner {
    pub cfg: SimConfig,
    pub addr: SocketAddr,
    pub state: Mutex<SimState>,
    pub auth: Mutex<Auth>,
    pub quota: Mutex<Quota>,
    pub faults: Mutex<Faults>,
    pub knobs: Mutex<Knobs>,
    pub publishers: Publishers,
    pub notifications_sent: AtomicU64,
    /// Batch requests received (numbers them, see `CallEntry::batch`).
    pub batches: AtomicU64,
    pub cancel: CancellationToken,
}

impl Inner {
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn token_url(&self) -> String {
        format!("http://{}/token", self.addr)
    }
}

/// Stops the server when the last [`GmailSim`] handle is dropped.
struct StopOnDrop(CancellationToken);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// A running simulator. A cheap `Clone` handle; the server stops when the last handle drops
/// or on [`GmailSim::shutdown`].
///
/// The mutating methods panic on misuse (unknown mailbox or message): they are test code.
#[derive(Clone)]
pub struct GmailSim {
    inner: Arc<Inner>,
    _stop: Arc<StopOnDrop>,
}

impl std::fmt::Debug for GmailSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GmailSim")
            .field("base_url", &self.base_url())
            .finish()
    }
}

fn ok<T>(r: Result<T, SimError>) -> T {
    r.unwrap_or_else(|e| panic!("{e}"))
}

impl GmailSim {
    /// Binds 127.0.0.1:`cfg.port` (0 = any free port) and serves until shut down.
    pub async fn start(cfg: SimConfig) -> anyhow::Result<GmailSim> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", cfg.port)).await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let cancel = CancellationToken::new();
        let inner = Arc::new(Inner {
            addr,
            state: Mutex::new(SimState::new(&cfg, tx)),
            auth: Mutex::new(Auth::new(&cfg)?),
            quota: Mutex::new(Quota::new(cfg.quota.clone())),
            faults: Mutex::new(Faults::default()),
            knobs: Mutex::new(Knobs {
                history_id_as_number: cfg.notify_history_id_as_number,
                drop_probability: cfg.notify_drop_probability,
                delay: cfg.notify_delay,
                quota_style: cfg.quota_error_style,
                watch_processing: cfg.watch_processing,
            }),
            publishers: Publishers::new(cfg.pubsub_endpoint.clone()),
            notifications_sent: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            cancel: cancel.clone(),
            cfg,
        });
        tokio::spawn(notifier::run(inner.clone(), rx));
        let app = server::routes()
            .merge(control::routes())
            .fallback(server::fallback)
            .with_state(inner.clone());
        let shutdown = cancel.clone();
        tokio::spawn(async move {
            let r = axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "gmail-sim server failed");
            }
        });
        Ok(GmailSim {
            inner,
            _stop: Arc::new(StopOnDrop(cancel)),
        })
    }

    /// `http://127.0.0.1:PORT` (the product appends `/gmail/v1/...`).
    pub fn base_url(&self) -> String {
        self.inner.base_url()
    }

    /// `http://127.0.0.1:PORT/token` (also the required `aud` of delegation JWTs).
    pub fn token_url(&self) -> String {
        self.inner.token_url()
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    pub fn config(&self) -> &SimConfig {
        &self.inner.cfg
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SimState> {
        self.inner.state.lock().expect("gmail-sim state")
    }

    /// Adds a mailbox with the configured (or a random) initial historyId; returns it.
    pub fn add_mailbox(&self, email: &str) -> u64 {
        ok(self.state().add_mailbox(email, None))
    }

    /// Adds a mailbox at a given initial historyId (1..=u64::MAX/2; above 2^53 is fine).
    pub fn add_mailbox_at(&self, email: &str, initial_history_id: u64) {
        ok(self.state().add_mailbox(email, Some(initial_history_id)));
    }

    /// Whether the mailbox exists.
    pub fn has_mailbox(&self, email: &str) -> bool {
        self.state().mailboxes.contains_key(email)
    }

    /// Delivers a new message in a new thread; returns its id (= the thread id).
    pub fn deliver(&self, email: &str, label_ids: &[&str]) -> MessageId {
        ok(self.state().deliver(email, label_ids, None)).id
    }

    /// Delivers a message into an existing thread (a reply); returns its id.
    pub fn reply(&self, email: &str, thread_id: &str, label_ids: &[&str]) -> MessageId {
        ok(self.state().deliver(email, label_ids, Some(thread_id))).id
    }

    /// Delivers and returns id, thread id and the new historyId.
    pub fn deliver_full(
        &self,
        email: &str,
        label_ids: &[&str],
        thread_id: Option<&str>,
    ) -> Delivered {
        ok(self.state().deliver(email, label_ids, thread_id))
    }

    /// Deletes a message permanently; returns the new historyId.
    pub fn delete(&self, email: &str, id: &str) -> u64 {
        ok(self.state().delete(email, id))
    }

    /// Adds labels; returns the new historyId, or `None` if the message already had them all
    /// (no record, like Gmail).
    pub fn add_labels(&self, email: &str, id: &str, labels: &[&str]) -> Option<u64> {
        ok(self.state().add_labels(email, id, labels))
    }

    /// Removes labels; returns the new historyId, or `None` if the message had none of them.
    pub fn remove_labels(&self, email: &str, id: &str, labels: &[&str]) -> Option<u64> {
        ok(self.state().remove_labels(email, id, labels))
    }

    /// Advances the historyId without a history record (drafts, settings...); returns it.
    pub fn touch(&self, email: &str) -> u64 {
        ok(self.state().touch(email))
    }

    /// `n` random changes of all four kinds at once (one lock); returns their historyIds.
    pub fn burst(&self, email: &str, n: usize) -> Vec<u64> {
        ok(self.state().burst(email, n))
    }

    pub fn current_history_id(&self, email: &str) -> u64 {
        ok(self.state().mailbox(email).map(|m| m.history_id))
    }

    /// Drops all history up to now: a `history.list` from any older cursor answers 404.
    pub fn expire_history(&self, email: &str) {
        ok(self.state().mailbox_mut(email).map(|m| m.expire_all()));
    }

    /// Delivers a message and drops all history up to and including it, in one step (one
    /// lock): no `history.list` can see the message's record, so every cursor of the mailbox is
    /// now below the horizon and its next `history.list` answers 404, as for a mailbox whose
    /// worker was away longer than Gmail keeps history. (A separate [`Self::deliver`] and
    /// [`Self::expire_history`] leave a moment in which a sync could read the record and
    /// commit the cursor up to the horizon, which is accepted: no 404.)
    pub fn deliver_and_expire(&self, email: &str, label_ids: &[&str]) -> Delivered {
        let mut st = self.state();
        let delivered = ok(st.deliver(email, label_ids, None));
        ok(st.mailbox_mut(email).map(|m| m.expire_all()));
        delivered
    }

    /// Drops history up to and including `history_id` (cursors below it answer 404).
    pub fn expire_history_up_to(&self, email: &str, history_id: u64) {
        ok(self
            .state()
            .mailbox_mut(email)
            .map(|m| m.expire_up_to(history_id)));
    }

    /// Per-mailbox time-based retention (overrides `SimConfig::history_retention`).
    pub fn set_history_retention(&self, email: &str, retention: Option<Duration>) {
        ok(self
            .state()
            .mailbox_mut(email)
            .map(|m| m.retention = retention));
    }

    /// See `SimConfig::history_lag`.
    pub fn set_history_lag(&self, lag: Duration) {
        self.state().history_lag = lag;
    }

    /// The oldest startHistoryId `history.list` accepts for the mailbox.
    pub fn history_horizon(&self, email: &str) -> u64 {
        ok(self.state().mailbox(email).map(|m| m.horizon))
    }

    /// Live messages → their labels.
    pub fn messages(&self, email: &str) -> BTreeMap<MessageId, Vec<String>> {
        ok(self.state().mailbox(email).map(|m| {
            m.messages
                .iter()
                .map(|(id, msg)| (id.clone(), msg.labels.clone()))
                .collect()
        }))
    }

    /// The thread id of a live message.
    pub fn thread_of(&self, email: &str, id: &str) -> Option<String> {
        self.state()
            .mailbox(email)
            .ok()?
            .messages
            .get(id)
            .map(|m| m.thread_id.clone())
    }

    /// The topic of the mailbox's active watch.
    pub fn watch_topic(&self, email: &str) -> Option<String> {
        ok(self
            .state()
            .mailbox(email)
            .map(|m| m.watch.as_ref().map(|w| w.topic.clone())))
    }

    /// The `expiration` (epoch ms) of the mailbox's registered watch, as its last successful
    /// `watch` answered it; `None` without a watch (never watched, or stopped). An expired watch
    /// still shows (compare with the clock).
    pub fn watch_expiration(&self, email: &str) -> Option<u64> {
        ok(self
            .state()
            .mailbox(email)
            .map(|m| m.watch.as_ref().map(|w| w.expiration_ms)))
    }

    /// Whether a `watch` call of the mailbox is in processing now (see
    /// [`SimConfig::watch_processing`]); lets a test send the racing call at the right moment.
    pub fn watch_in_progress(&self, email: &str) -> bool {
        ok(self.state().mailbox(email).map(|m| m.watch_claim.is_some()))
    }

    /// Changes [`SimConfig::watch_processing`] (applies to watch calls that start afterwards).
    pub fn set_watch_processing(&self, d: Duration) {
        self.inner.knobs.lock().expect("knobs").watch_processing = d;
    }

    /// A snapshot of the ledger.
    pub fn ledger(&self) -> Ledger {
        Ledger {
            entries: self.state().ledger.clone(),
        }
    }

    /// Number of ledger entries so far (cheap).
    pub fn ledger_len(&self) -> usize {
        self.state().ledger.len()
    }

    /// Ledger entries from index `from` on (cheap incremental reads).
    pub fn ledger_since(&self, from: usize) -> Vec<LedgerEntry> {
        let st = self.state();
        st.ledger.get(from..).map(<[_]>::to_vec).unwrap_or_default()
    }

    /// Adds a fault rule; returns its id.
    pub fn inject(&self, rule: FaultRule) -> FaultId {
        self.inner.faults.lock().expect("faults").add(rule)
    }

    /// Removes one fault rule.
    pub fn remove_fault(&self, id: FaultId) -> bool {
        self.inner.faults.lock().expect("faults").remove(id)
    }

    /// Removes every fault rule.
    pub fn clear_faults(&self) {
        self.inner.faults.lock().expect("faults").clear();
    }

    /// The active fault rules (with their remaining counts).
    pub fn faults(&self) -> Vec<(FaultId, FaultRule)> {
        self.inner.faults.lock().expect("faults").list()
    }

    pub fn add_refresh_token(&self, token: &str, email: &str) {
        self.inner
            .auth
            .lock()
            .expect("auth")
            .add_refresh_token(token, email);
    }

    /// Revokes a refresh token (→ `invalid_grant`) and the access tokens issued from it.
    pub fn revoke_refresh_token(&self, token: &str) {
        self.inner
            .auth
            .lock()
            .expect("auth")
            .revoke_refresh_token(token);
    }

    pub fn add_static_token(&self, token: &str) {
        self.inner
            .auth
            .lock()
            .expect("auth")
            .add_static_token(token);
    }

    /// Withdraws (false) or restores domain-wide delegation for a mailbox: the JWT grant then
    /// answers 401 `unauthorized_client`.
    pub fn set_delegation_allowed(&self, email: &str, allowed: bool) {
        self.inner
            .auth
            .lock()
            .expect("auth")
            .set_delegation_allowed(email, allowed);
    }

    /// Makes issued access tokens of `email` (or all) expire now (→ 401 on next use).
    pub fn expire_access_tokens(&self, email: Option<&str>) {
        self.inner
            .auth
            .lock()
            .expect("auth")
            .expire_access_tokens(email);
    }

    /// Revokes issued access tokens of `email` (or all).
    pub fn revoke_access_tokens(&self, email: Option<&str>) {
        self.inner
            .auth
            .lock()
            .expect("auth")
            .revoke_access_tokens(email);
    }

    /// Access tokens issued by the token endpoint so far.
    pub fn tokens_issued(&self) -> u64 {
        self.inner.auth.lock().expect("auth").issued
    }

    /// Replaces the quota limits (usage so far is kept).
    pub fn set_quota(&self, quota: QuotaConfig) {
        self.inner.quota.lock().expect("quota").set_config(quota);
    }

    pub fn set_quota_error_style(&self, style: QuotaErrorStyle) {
        self.inner.knobs.lock().expect("knobs").quota_style = style;
    }

    /// Forgets quota usage (windows restart empty).
    pub fn reset_quota(&self) {
        self.inner.quota.lock().expect("quota").reset();
    }

    /// Units charged to `email` in the current 60 s window.
    pub fn quota_used(&self, email: &str) -> u64 {
        self.inner.quota.lock().expect("quota").used_by(email)
    }

    /// Calls in flight for `email` (counted against `max_concurrent_per_user`).
    pub fn in_flight(&self, email: &str) -> u32 {
        self.inner.quota.lock().expect("quota").in_flight(email)
    }

    pub fn set_notify_drop_probability(&self, p: f64) {
        self.inner.knobs.lock().expect("knobs").drop_probability = p;
    }

    pub fn set_notify_delay(&self, delay: Option<(Duration, Duration)>) {
        self.inner.knobs.lock().expect("knobs").delay = delay;
    }

    pub fn set_notify_history_id_as_number(&self, as_number: bool) {
        self.inner.knobs.lock().expect("knobs").history_id_as_number = as_number;
    }

    /// Notifications published successfully to Pub/Sub.
    pub fn notifications_sent(&self) -> u64 {
        self.inner.notifications_sent.load(Ordering::Relaxed)
    }

    /// Stops serving (idempotent). Hanging calls are answered 503.
    pub fn shutdown(&self) {
        self.inner.cancel.cancel();
    }

    /// Resolves when the simulator has been shut down.
    pub async fn stopped(&self) {
        self.inner.cancel.cancelled().await
    }
}
