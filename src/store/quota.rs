//! The quota governor's shared state (`quota` decides, this module keeps count): sliding-window
//! budgets in hashes of per-bucket unit counts, an in-flight zset per user, and blocks from
//! Gmail's rate-limit answers. Three scripts: `quota_charge` (check + charge + slot, one step),
//! `quota_refund`, `quota_block`; the slot release is one `ZREM`.
//!
//! Hash slots: a user's window and in-flight keys carry the mailbox's shard tag, the project's
//! windows one tag of their own (`{PREFIX:quota}`), so on a cluster a charge that spans both is
//! two script calls — the user's first (the budget that refuses most often), then the
//! project's, refunding the user's if the project refuses. On a single Redis it is one call.

use super::script::ScriptCall;
use super::{BEGIN_KEYS, Begin, Key, Lease, Store, StoreError, begin_reply};
use crate::history_id::HistoryId;
use crate::mailbox::Mailbox;
use crate::store::RedisConnection;
use redis::Script;
use std::sync::LazyLock;
use std::time::Duration;

static CHARGE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("quota_charge.lua")));
static REFUND: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("quota_refund.lua")));
static BLOCK: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("quota_block.lua")));
static BEGIN_ADMIT: LazyLock<Script> = LazyLock::new(|| Script::new(&begin_admit_source()));

/// `begin_admit.lua` with the bodies of `begin.lua` and `quota_charge.lua` as its functions
/// `begin(KEYS, ARGV)` and `charge(KEYS, ARGV)` (their parameters shadow the globals, so each
/// body runs unchanged on its own slice of the keys and arguments): one source of truth for
/// each step, whether it runs alone or combined.
fn begin_admit_source() -> String {
    format!(
        "local function begin(KEYS, ARGV)\n{}\nend\nlocal function charge(KEYS, ARGV)\n{}\nend\n{}",
        include_str!("begin.lua"),
        include_str!("quota_charge.lua"),
        include_str!("begin_admit.lua")
    )
}

/// Which budget's window a charge or a block addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuotaKey<'a> {
    /// One user's units (and the block of a per-user rate limit).
    User(&'a Mailbox),
    ProjectMinute,
    ProjectDay,
}

/// One sliding window to check and charge.
#[derive(Clone, Copy, Debug)]
pub struct WindowCharge<'a> {
    pub key: QuotaKey<'a>,
    /// The most units the window may hold after the charge (ignored when recording).
    pub limit: u64,
    pub span: Duration,
    pub bucket: Duration,
}

/// An in-flight slot to take with the charge: `token` in the user's zset for at most `ttl`.
#[derive(Clone, Copy, Debug)]
pub struct SlotRequest<'a> {
    pub mailbox: &'a Mailbox,
    pub token: &'a str,
    pub cap: u32,
    pub ttl: Duration,
}

/// Whether a charge may be refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChargeMode {
    /// Refuse (write nothing) when a window is spent or blocked, or the slots are taken.
    Admit,
    /// Count the units whatever the windows hold (calls already made or not governed).
    Record,
}

/// What a charge did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChargeReply {
    Charged,
    /// `windows[index]`'s budget is spent; it has room again after `wait`.
    Spent {
        index: usize,
        wait: Duration,
    },
    /// `windows[index]` is blocked by a rate-limit answer for `wait` more.
    Blocked {
        index: usize,
        wait: Duration,
    },
    /// The user's in-flight slots are all taken (when one frees is not known).
    InFlight,
}

impl Store {
    /// Checks and charges `units` to every window (all or nothing) and takes `slot` if given.
    /// Windows and slot may span two hash slots (a user's, the project's): see the module.
    pub async fn quota_charge(
        &self,
        units: u64,
        windows: &[WindowCharge<'_>],
        slot: Option<SlotRequest<'_>>,
        mode: ChargeMode,
    ) -> Result<ChargeReply, StoreError> {
        let split = matches!(self.conn, RedisConnection::Cluster(_));
        let user: Vec<usize> = (0..windows.len())
            .filter(|&i| matches!(windows[i].key, QuotaKey::User(_)))
            .collect();
        let project: Vec<usize> = (0..windows.len())
            .filter(|&i| !matches!(windows[i].key, QuotaKey::User(_)))
            .collect();
        if !split || user.is_empty() || project.is_empty() {
            let all: Vec<usize> = (0..windows.len()).collect();
            return self
                .charge_group(units, windows, &all, slot, mode)
                .await
                .map(|(reply, _)| reply);
        }
        let (reply, at) = self.charge_group(units, windows, &user, slot, mode).await?;
        if reply != ChargeReply::Charged {
            return Ok(reply);
        }
        let (reply, _) = self
            .charge_group(units, windows, &project, None, mode)
            .await?;
        if reply != ChargeReply::Charged {
            // Best effort: a refund that fails leaves the user's window over-counted, which
            // only makes the governor stricter until the units leave the window.
            let _ = self.refund_group(units, at, windows, &user, slot).await;
        }
        Ok(reply)
    }

    /// Gives an in-flight slot back.
    pub async fn quota_release(&self, mailbox: &Mailbox, token: &str) -> Result<(), StoreError> {
        let key = self.keys.in_flight(mailbox);
        let _: i64 = self
            .conn
            .retrying(|mut c| {
                let mut cmd = redis::cmd("ZREM");
                cmd.arg(key).arg(token);
                async move { cmd.query_async(&mut c).await }
            })
            .await?;
        Ok(())
    }

    /// Blocks the budget of `key` for `duration` (a later block already there is kept).
    pub async fn quota_block(
        &self,
        key: QuotaKey<'_>,
        duration: Duration,
    ) -> Result<(), StoreError> {
        let mut call = ScriptCall::new(&BLOCK, 1);
        call.key(self.window_key(key))
            .arg((duration.as_millis() as u64).max(1));
        let _: i64 = self
            .conn
            .retrying(|mut c| {
                let call = &call;
                async move { call.invoke(&mut c).await }
            })
            .await?;
        Ok(())
    }

    fn window_key<'a>(&'a self, key: QuotaKey<'a>) -> Key<'a> {
        match key {
            QuotaKey::User(m) => self.keys.quota_user(m),
            QuotaKey::ProjectMinute => self.keys.quota_project_minute(),
            QuotaKey::ProjectDay => self.keys.quota_project_day(),
        }
    }

    /// One script call over `windows[group]` (one hash slot); also returns Redis's time of the
    /// charge, which a refund needs.
    async fn charge_group(
        &self,
        units: u64,
        windows: &[WindowCharge<'_>],
        group: &[usize],
        slot: Option<SlotRequest<'_>>,
        mode: ChargeMode,
    ) -> Result<(ChargeReply, u64), StoreError> {
        let mut call = ScriptCall::new(&CHARGE, charge_key_count(group, slot));
        self.charge_keys(&mut call, windows, group, slot);
        charge_args(&mut call, units, windows, group, slot, mode);
        // A retry after a lost reply may charge twice: that over-counts, which is safe.
        let (outcome, index, value): (String, i64, i64) = self
            .conn
            .retrying(|mut c| {
                let call = &call;
                async move { call.invoke(&mut c).await }
            })
            .await?;
        charge_reply(&outcome, index, value, group)
    }

    /// `quota_charge.lua`'s keys for a charge over `windows[group]` ([`charge_key_count`] of
    /// them), added to `call` (alone, or after `begin`'s in `begin_admit`).
    fn charge_keys(
        &self,
        call: &mut ScriptCall<'_>,
        windows: &[WindowCharge<'_>],
        group: &[usize],
        slot: Option<SlotRequest<'_>>,
    ) {
        for &i in group {
            call.key(self.window_key(windows[i].key));
        }
        if let Some(s) = slot {
            call.key(self.keys.in_flight(s.mailbox));
        }
    }

    /// Whether [`Store::begin_admit`] can do `begin` and the admission in one script: on a
    /// single Redis always; on a cluster the project's windows are in a slot of their own.
    pub fn can_begin_admit(&self) -> bool {
        !matches!(self.conn, RedisConnection::Cluster(_))
    }

    /// [`Store::begin`], then, if it took the lease, [`Store::quota_charge`] of `units` to
    /// `windows` with `slot` in mode admit, in one script; a refused charge gives the lease
    /// back in the same step. `None` for the charge when the lease was not taken (nothing was
    /// charged). Only where [`Store::can_begin_admit`].
    pub async fn begin_admit(
        &self,
        mailbox: &Mailbox,
        target: HistoryId,
        lease: &Lease,
        units: u64,
        windows: &[WindowCharge<'_>],
        slot: SlotRequest<'_>,
    ) -> Result<(Begin, Option<ChargeReply>), StoreError> {
        let all: Vec<usize> = (0..windows.len()).collect();
        let slot = Some(slot);
        let mut call = ScriptCall::new(&BEGIN_ADMIT, BEGIN_KEYS + charge_key_count(&all, slot));
        // Every key before every argument: begin's, then the charge's.
        self.begin_keys(&mut call, mailbox);
        self.charge_keys(&mut call, windows, &all, slot);
        Store::begin_args(&mut call, target, lease);
        charge_args(&mut call, units, windows, &all, slot, ChargeMode::Admit);
        // A retry after a lost reply finds its own lease (begin) and charges again: that
        // over-counts, which is safe (as a retried charge alone).
        let (outcome, cursor, charged, index, value): (String, String, String, i64, i64) = self
            .conn
            .retrying(|mut c| {
                let call = &call;
                async move { call.invoke(&mut c).await }
            })
            .await?;
        let begin = begin_reply(&outcome, &cursor)?;
        if !matches!(begin, Begin::Leased { .. }) {
            return Ok((begin, None));
        }
        let (reply, _) = charge_reply(&charged, index, value, &all)?;
        Ok((begin, Some(reply)))
    }

    async fn refund_group(
        &self,
        units: u64,
        at: u64,
        windows: &[WindowCharge<'_>],
        group: &[usize],
        slot: Option<SlotRequest<'_>>,
    ) -> Result<(), StoreError> {
        let mut call = ScriptCall::new(&REFUND, charge_key_count(group, slot));
        self.charge_keys(&mut call, windows, group, slot);
        call.arg(units)
            .arg(at)
            .arg(slot.map_or("", |s| s.token))
            .arg(group.len());
        for &i in group {
            call.arg((windows[i].bucket.as_millis() as u64).max(1));
        }
        let _: i64 = self
            .conn
            .retrying(|mut c| {
                let call = &call;
                async move { call.invoke(&mut c).await }
            })
            .await?;
        Ok(())
    }
}

/// How many keys a charge (or its refund) over `group`, with or without a slot, takes.
fn charge_key_count(group: &[usize], slot: Option<SlotRequest<'_>>) -> usize {
    group.len() + usize::from(slot.is_some())
}

/// `quota_charge.lua`'s arguments for a charge over `windows[group]`, added to `call` after
/// every key.
fn charge_args(
    call: &mut ScriptCall<'_>,
    units: u64,
    windows: &[WindowCharge<'_>],
    group: &[usize],
    slot: Option<SlotRequest<'_>>,
    mode: ChargeMode,
) {
    call.arg(units)
        .arg(match mode {
            ChargeMode::Admit => "admit",
            ChargeMode::Record => "record",
        })
        .arg(slot.map_or("", |s| s.token))
        .arg(slot.map_or(0, |s| s.cap))
        .arg(slot.map_or(0, |s| (s.ttl.as_millis() as u64).max(1)))
        .arg(group.len());
    for &i in group {
        let w = &windows[i];
        call.arg(w.limit)
            .arg(w.span.as_millis() as u64)
            .arg((w.bucket.as_millis() as u64).max(1));
    }
}

/// `quota_charge.lua`'s reply as a [`ChargeReply`] (and Redis's time of a charge made).
fn charge_reply(
    outcome: &str,
    index: i64,
    value: i64,
    group: &[usize],
) -> Result<(ChargeReply, u64), StoreError> {
    let window = |i: i64| {
        usize::try_from(i - 1)
            .ok()
            .and_then(|k| group.get(k).copied())
            .ok_or_else(|| StoreError::Protocol(format!("quota_charge: window {i}")))
    };
    let wait = Duration::from_millis(value.max(0) as u64);
    let reply = match outcome {
        "ok" => return Ok((ChargeReply::Charged, value.max(0) as u64)),
        "spent" => ChargeReply::Spent {
            index: window(index)?,
            wait,
        },
        "blocked" => ChargeReply::Blocked {
            index: window(index)?,
            wait,
        },
        "in_flight" => ChargeReply::InFlight,
        other => return Err(StoreError::Protocol(format!("quota_charge: {other}"))),
    };
    Ok((reply, 0))
}
