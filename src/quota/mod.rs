//! The Gmail quota governor, shared by every replica through Redis.
//!
//! Gmail's quota is a budget per user per minute and per project per minute (and per day under
//! the 2026 table), plus a cap on a user's requests in flight. Backing off after a 429 inside a
//! sync holds its concurrency slot and its mailbox lease while it sleeps; the governor instead
//! says *before* the work starts whether it fits:
//!
//! - [`Governor::admit`] — once per sync (after `begin` took the lease, before the first Gmail
//!   call) and per renewal: one script call that checks every budget, charges the first call's
//!   cost and takes an in-flight slot; [`Admission::Wait`] says how long to wait and why, and the
//!   caller gives everything back at once (the sync releases its lease and reports
//!   `Deferred`; the coalescer keeps the notifications and asks again then — never a nack).
//!   [`Admission::Granted`] carries a [`Permit`], whose drop frees the slot.
//! - [`Governor::pay`] — every Gmail call: drawn from what the admission prepaid (the common
//!   case, one `history.list`: no Redis call), else charged at the work's priority (a second
//!   page, a batch of `messages.get`: one script call for the whole batch); outside any
//!   admitted work (admin commands) recorded without waiting, so the workers see it.
//! - [`Governor::rate_limited`] — a 429/403 rate-limit answer blocks the budget it names for
//!   its Retry-After ("Retry after <time>" too), so every replica waits rather than asks.
//!
//! Priorities ([`Priority`]): notification-driven syncs may fill a whole budget, renewals 75 %
//! of it, fallback syncs 50 %, so background work never takes the headroom a burst of
//! notifications needs. `GMAIL_SYNC_QUOTA_GOVERNOR=off` turns it all off (no Redis call; the
//! Gmail client then retries 429s itself, as before): the baseline for measuring.

pub mod policy;

pub use policy::{Budget, CostTable, Limits, Priority, QuotaTable, WaitReason};

use crate::mailbox::Mailbox;
use crate::store::{
    ChargeMode, ChargeReply, QuotaKey, SlotRequest, Store, StoreError, WindowCharge,
};
use crate::telemetry::Counters;
use std::cell::Cell;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio_util::task::TaskTracker;

/// Gmail's per-user and per-project budgets are per minute.
const MINUTE: Duration = Duration::from_secs(60);
/// One-second buckets for the minute windows: a charge counts for 60-61 s (never less than a
/// true sliding minute, as Gmail's, never much more).
const MINUTE_BUCKET: Duration = Duration::from_secs(1);
/// The daily threshold as a sliding 24 h: whenever Google's day starts (midnight Pacific), no
/// 24 h hold more than the threshold.
const DAY: Duration = Duration::from_secs(86_400);
/// Hour buckets for the day window: at most 25 fields, a charge counts for 24-25 h.
const DAY_BUCKET: Duration = Duration::from_secs(3600);
/// How long an in-flight slot lasts unless released: a worker killed mid-sync loses its slots
/// after this. Longer than nearly every sync (a full resync of thousands of messages may
/// outlast it; it then stops counting against the cap, which errs on Gmail's 429 side, not on
/// a stuck mailbox).
const SLOT_TTL: Duration = Duration::from_secs(60);

/// Whether the governor runs (`GMAIL_SYNC_QUOTA_GOVERNOR`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GovernorMode {
    On,
    /// No admission, no charge, no block: Gmail's answers alone limit the work (measuring).
    Off,
}

/// The governor's configuration: on or off, the costs and the limits (a table's, with the
/// operator's overrides).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuotaSettings {
    pub mode: GovernorMode,
    pub table: QuotaTable,
    pub costs: CostTable,
    pub limits: Limits,
}

impl QuotaSettings {
    /// `table`'s costs and limits, governor on.
    pub fn of(table: QuotaTable) -> QuotaSettings {
        QuotaSettings {
            mode: GovernorMode::On,
            table,
            costs: CostTable::of(table),
            limits: Limits::of(table),
        }
    }
}

/// The governor failed to ask Redis: the work is retried like any Redis failure.
#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("quota governor: {0}")]
    Store(#[from] StoreError),
}

impl QuotaError {
    pub fn is_retryable(&self) -> bool {
        match self {
            QuotaError::Store(e) => e.is_retryable(),
        }
    }
}

/// Work that must wait: how long, and which budget said so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deferral {
    pub after: Duration,
    pub reason: WaitReason,
}

/// The answer to [`Governor::admit`].
#[derive(Debug)]
pub enum Admission {
    /// Go: the first call is paid for, and the permit holds an in-flight slot until dropped.
    Granted(Permit),
    Wait(Deferral),
}

/// One admission as the script needs it: the windows to charge and the in-flight slot to take.
pub struct AdmissionRequest<'a> {
    shared: Arc<Shared>,
    mailbox: &'a Mailbox,
    priority: Priority,
    pub windows: Vec<WindowCharge<'a>>,
    token: String,
    cap: u32,
}

impl<'a> AdmissionRequest<'a> {
    /// The in-flight slot the admission takes.
    pub fn slot(&self) -> SlotRequest<'_> {
        SlotRequest {
            mailbox: self.mailbox,
            token: &self.token,
            cap: self.cap,
            ttl: SLOT_TTL,
        }
    }

    /// The script's answer as the decision, counted: granted with the slot's permit, or wait.
    pub fn decide(self, reply: ChargeReply) -> Admission {
        match self.shared.judge(reply, &self.windows, self.priority) {
            Payment::Paid => Admission::Granted(Permit {
                held: Some(Held {
                    shared: self.shared.clone(),
                    mailbox: self.mailbox.clone(),
                    token: self.token,
                }),
                given_back: AtomicBool::new(false),
            }),
            Payment::Wait(d) => Admission::Wait(d),
        }
    }
}

/// The answer to [`Governor::pay`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Payment {
    Paid,
    /// Not sent: the budget is spent or blocked; the work should give its resources back and
    /// come again after the deferral.
    Wait(Deferral),
}

/// The shared budgets (cheap to clone). [`Governor::off`] makes no Redis call at all.
#[derive(Clone)]
pub struct Governor {
    shared: Option<Arc<Shared>>,
}

struct Shared {
    store: Store,
    limits: Limits,
    counters: Arc<Counters>,
    /// Permits release their slot in a task of their own (a drop cannot await).
    tracker: TaskTracker,
}

impl std::fmt::Debug for Governor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Governor")
            .field("on", &self.shared.is_some())
            .finish()
    }
}

impl Governor {
    pub fn off() -> Governor {
        Governor { shared: None }
    }

    pub fn new(
        store: Store,
        settings: &QuotaSettings,
        counters: Arc<Counters>,
        tracker: TaskTracker,
    ) -> Governor {
        match settings.mode {
            GovernorMode::Off => Governor::off(),
            GovernorMode::On => Governor {
                shared: Some(Arc::new(Shared {
                    store,
                    limits: settings.limits,
                    counters,
                    tracker,
                })),
            },
        }
    }

    pub fn is_on(&self) -> bool {
        self.shared.is_some()
    }

    /// How many `messages.get` (of `unit_cost` each) a sync should fetch per commit: at most
    /// `ceiling` (a batch), and, governed, at most what fits in half a user's minute, so one
    /// part always fits once the window drains and a deferral loses little.
    pub fn fetches_per_commit(&self, unit_cost: u64, ceiling: usize) -> usize {
        match &self.shared {
            None => ceiling,
            Some(s) => policy::fetches_per_commit(s.limits.user_per_minute, unit_cost, ceiling),
        }
    }

    /// May `priority` work for `mailbox` start now, prepaying `units` (its first call)? One
    /// Redis script call (two on a cluster when the project is governed).
    pub async fn admit(
        &self,
        mailbox: &Mailbox,
        priority: Priority,
        units: u64,
    ) -> Result<Admission, QuotaError> {
        let Some(request) = self.request(mailbox, priority, units) else {
            return Ok(Admission::Granted(Permit::none()));
        };
        let reply = request
            .shared
            .store
            .quota_charge(
                units,
                &request.windows,
                Some(request.slot()),
                ChargeMode::Admit,
            )
            .await?;
        Ok(request.decide(reply))
    }

    /// The admission [`Governor::admit`] would ask for, to be sent by the caller (with
    /// `begin`, in one script: [`Store::begin_admit`]) and decided by
    /// [`AdmissionRequest::decide`]; `None` when the governor is off (admitted, no slot).
    pub fn request<'a>(
        &self,
        mailbox: &'a Mailbox,
        priority: Priority,
        units: u64,
    ) -> Option<AdmissionRequest<'a>> {
        let shared = self.shared.as_ref()?;
        Some(AdmissionRequest {
            shared: shared.clone(),
            mailbox,
            priority,
            windows: shared.windows(mailbox, priority, units),
            token: format!("{:032x}", rand::random::<u128>()),
            cap: policy::in_flight_for(shared.limits.user_in_flight, priority),
        })
    }

    /// Pays for one Gmail call (or a batch) of `units` about to be sent for `mailbox`: from the
    /// current work's prepaid units first ([`within`]), then charged at its priority; outside
    /// any admitted work, recorded without waiting.
    pub async fn pay(&self, mailbox: &Mailbox, units: u64) -> Result<Payment, QuotaError> {
        let Some(shared) = &self.shared else {
            return Ok(Payment::Paid);
        };
        let scoped = SCOPE.try_with(|s| {
            let covered = s.prepaid.get().min(units);
            s.prepaid.set(s.prepaid.get() - covered);
            (s.priority, units - covered)
        });
        let (priority, rest, mode) = match scoped {
            Ok((_, 0)) => return Ok(Payment::Paid),
            Ok((priority, rest)) => (priority, rest, ChargeMode::Admit),
            // Admin commands: an operator's call is not deferred, but the workers must see it.
            Err(_) => (Priority::Notification, units, ChargeMode::Record),
        };
        let windows = shared.windows(mailbox, priority, rest);
        let reply = shared
            .store
            .quota_charge(rest, &windows, None, mode)
            .await?;
        Ok(shared.judge(reply, &windows, priority))
    }

    /// Gmail answered a rate limit for `mailbox` (`budget` from its body): blocks that budget
    /// for its Retry-After so no replica asks again meanwhile, and says how long to wait.
    /// Off: nothing to block, the client retries by itself.
    pub async fn rate_limited(
        &self,
        mailbox: &Mailbox,
        budget: Budget,
        retry_after: Option<Duration>,
    ) -> Result<Deferral, QuotaError> {
        let block = policy::block_for(budget, retry_after);
        let deferral = Deferral {
            after: block,
            reason: WaitReason::Blocked(budget),
        };
        let Some(shared) = &self.shared else {
            return Ok(deferral);
        };
        Counters::inc(&shared.counters.quota_blocks);
        // A project budget the governor does not count (its limit unset) blocks the user:
        // the answer is still about this mailbox's calls.
        let key = match budget {
            Budget::ProjectMinute if shared.limits.project_per_minute.is_some() => {
                QuotaKey::ProjectMinute
            }
            Budget::ProjectDay if shared.limits.project_per_day.is_some() => QuotaKey::ProjectDay,
            _ => QuotaKey::User(mailbox),
        };
        shared.store.quota_block(key, block).await?;
        tracing::debug!(
            budget = budget.as_str(),
            block_ms = block.as_millis() as u64,
            "Gmail rate limit fed back to the quota governor"
        );
        Ok(deferral)
    }
}

impl Shared {
    /// The windows a charge of `units` at `priority` must fit in (at most three).
    fn windows<'a>(
        &self,
        mailbox: &'a Mailbox,
        priority: Priority,
        units: u64,
    ) -> Vec<WindowCharge<'a>> {
        // Sized for all three windows up front: a `vec![..]` of one and a push grew it once
        // per admission.
        let mut windows = Vec::with_capacity(3);
        windows.push(WindowCharge {
            key: QuotaKey::User(mailbox),
            limit: policy::limit_for(self.limits.user_per_minute, priority, units),
            span: MINUTE,
            bucket: MINUTE_BUCKET,
        });
        if let Some(limit) = self.limits.project_per_minute {
            windows.push(WindowCharge {
                key: QuotaKey::ProjectMinute,
                limit: policy::limit_for(limit, priority, units),
                span: MINUTE,
                bucket: MINUTE_BUCKET,
            });
        }
        if let Some(limit) = self.limits.project_per_day {
            windows.push(WindowCharge {
                key: QuotaKey::ProjectDay,
                limit: policy::limit_for(limit, priority, units),
                span: DAY,
                bucket: DAY_BUCKET,
            });
        }
        windows
    }

    /// The reply as a decision, counted.
    fn judge(
        &self,
        reply: ChargeReply,
        windows: &[WindowCharge<'_>],
        priority: Priority,
    ) -> Payment {
        let budget_of = |i: usize| match windows[i].key {
            QuotaKey::User(_) => Budget::UserMinute,
            QuotaKey::ProjectMinute => Budget::ProjectMinute,
            QuotaKey::ProjectDay => Budget::ProjectDay,
        };
        let (wait, reason) = match reply {
            ChargeReply::Charged => {
                Counters::inc(&self.counters.quota_granted);
                return Payment::Paid;
            }
            ChargeReply::Spent { index, wait } => (wait, WaitReason::Spent(budget_of(index))),
            ChargeReply::Blocked { index, wait } => (wait, WaitReason::Blocked(budget_of(index))),
            ChargeReply::InFlight => (
                policy::IN_FLIGHT_RECHECK,
                WaitReason::Spent(Budget::UserInFlight),
            ),
        };
        let c = &self.counters;
        Counters::inc(match reason {
            WaitReason::Spent(Budget::UserMinute) => &c.quota_deferred_user,
            WaitReason::Spent(Budget::UserInFlight) => &c.quota_deferred_in_flight,
            WaitReason::Spent(Budget::ProjectMinute | Budget::ProjectDay) => {
                &c.quota_deferred_project
            }
            WaitReason::Blocked(_) => &c.quota_deferred_blocked,
        });
        Counters::inc(match priority {
            Priority::Notification => &c.quota_deferred_notification,
            Priority::Renewal => &c.quota_deferred_renewal,
            Priority::Fallback => &c.quota_deferred_fallback,
        });
        Payment::Wait(Deferral {
            after: policy::deferral(wait, rand::random::<f64>()),
            reason,
        })
    }
}

/// An admitted piece of work's in-flight slot; dropping it gives the slot back (in a task on
/// the app's tracker; if that fails, the slot's TTL frees it), unless the work's final commit
/// already did ([`Permit::slot_token`], [`Permit::given_back`]).
#[derive(Debug)]
pub struct Permit {
    held: Option<Held>,
    /// Set once the final commit's script removed the slot itself: nothing left to give back.
    /// Atomic only because a sync borrows its permit across awaits in a `Send` future.
    given_back: AtomicBool,
}

impl Permit {
    /// A permit without a slot (the governor is off).
    pub(crate) fn none() -> Permit {
        Permit {
            held: None,
            given_back: AtomicBool::new(false),
        }
    }

    /// The slot's token, for the final commit to remove in the same script (one Redis round
    /// trip and one task less per sync than the release on drop); `None` without a slot (the
    /// governor is off).
    pub fn slot_token(&self) -> Option<&str> {
        self.held.as_ref().map(|h| h.token.as_str())
    }

    /// The final commit removed the slot: dropping the permit no longer releases it.
    pub fn given_back(&self) {
        self.given_back.store(true, Ordering::Relaxed);
    }
}

struct Held {
    shared: Arc<Shared>,
    mailbox: Mailbox,
    token: String,
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Held")
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let Some(held) = self.held.take() else {
            return;
        };
        if self.given_back.load(Ordering::Relaxed) {
            return;
        }
        // Outside a runtime (a test dropping a permit late) the TTL frees the slot.
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let tracker = held.shared.tracker.clone();
        tracker.spawn(async move {
            if let Err(e) = held.shared.store.quota_release(&held.mailbox, &held.token).await {
                tracing::debug!(error = %e, "could not release an in-flight slot; its TTL frees it");
            }
        });
    }
}

/// The admitted work the current task does: its priority and what its admission prepaid.
struct Scope {
    priority: Priority,
    prepaid: Cell<u64>,
}

tokio::task_local! {
    static SCOPE: Scope;
}

/// Runs `work` as admitted work of `priority` whose admission prepaid `prepaid` units: the
/// Gmail calls it makes pay from that first ([`Governor::pay`]).
pub async fn within<F: Future>(priority: Priority, prepaid: u64, work: F) -> F::Output {
    SCOPE
        .scope(
            Scope {
                priority,
                prepaid: Cell::new(prepaid),
            },
            work,
        )
        .await
}
