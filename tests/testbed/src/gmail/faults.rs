//! Fault injection: rules matched per endpoint and mailbox, consumed in order.

use super::errors::{
    ApiError, MAIL_SERVICE_NOT_ENABLED_MESSAGE, WATCH_CONFLICT_MESSAGE, default_reason,
};
use super::ledger::Endpoint;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Identifies an injected rule (to remove it alone).
pub type FaultId = u64;

/// What a matching rule does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum FaultAction {
    /// Answer HTTP `status` with Gmail's error body. `reason`/`message`/`domain` default to the
    /// usual ones for the status; `retry_after` adds a `Retry-After: <seconds>` header.
    /// On the token endpoint the body is OAuth-shaped (`{"error": reason, ..}`).
    #[serde(rename_all = "camelCase")]
    Status {
        status: u16,
        #[serde(default)]
        reason: Option<String>,
        #[serde(default)]
        message: Option<String>,
        #[serde(default)]
        domain: Option<String>,
        #[serde(default)]
        retry_after: Option<u64>,
    },
    /// Delay the answer, then process the call normally.
    #[serde(rename_all = "camelCase")]
    Latency { millis: u64 },
    /// Never answer (until the client gives up or the simulator shuts down).
    Hang,
    /// 401 `authError` as for an expired access token.
    ExpiredToken,
}

impl FaultAction {
    /// Status with default reason/message.
    pub fn status(status: u16) -> Self {
        FaultAction::Status {
            status,
            reason: None,
            message: None,
            domain: None,
            retry_after: None,
        }
    }

    /// 429 `rateLimitExceeded` with `Retry-After` and "Retry after <ISO time>".
    pub fn too_many_requests(retry_after_secs: u64) -> Self {
        FaultAction::Status {
            status: 429,
            reason: Some("rateLimitExceeded".into()),
            message: None,
            domain: Some("usageLimits".into()),
            retry_after: Some(retry_after_secs),
        }
    }

    /// 403 with a rate reason (`rateLimitExceeded`, `userRateLimitExceeded`,
    /// `dailyLimitExceeded`) and `Retry-After`.
    pub fn rate_limit_403(reason: &str, retry_after_secs: Option<u64>) -> Self {
        FaultAction::Status {
            status: 403,
            reason: Some(reason.into()),
            message: None,
            domain: Some("usageLimits".into()),
            retry_after: retry_after_secs,
        }
    }

    /// 403 with a permanent reason (`domainPolicy`, `insufficientPermissions`).
    pub fn forbidden(reason: &str) -> Self {
        FaultAction::Status {
            status: 403,
            reason: Some(reason.into()),
            message: None,
            domain: Some("global".into()),
            retry_after: None,
        }
    }

    /// 400 `failedPrecondition` "Mail service not enabled" (status `FAILED_PRECONDITION`): the
    /// account has no Gmail (any more). Permanent; what an unknown mailbox answers too.
    pub fn mail_service_not_enabled() -> Self {
        FaultAction::Status {
            status: 400,
            reason: Some("failedPrecondition".into()),
            message: Some(MAIL_SERVICE_NOT_ENABLED_MESSAGE.into()),
            domain: Some("global".into()),
            retry_after: None,
        }
    }

    /// 400 `failedPrecondition` "Only one user push notification client allowed per developer
    /// (call /stop then try again)", the answer the simulator itself gives to a racing or
    /// other-topic `watch` (see [`super::SimConfig::watch_processing`]); injectable on its own
    /// to script a conflict without timing.
    pub fn watch_conflict() -> Self {
        FaultAction::Status {
            status: 400,
            reason: Some("failedPrecondition".into()),
            message: Some(WATCH_CONFLICT_MESSAGE.into()),
            domain: Some("global".into()),
            retry_after: None,
        }
    }

    pub fn latency(d: Duration) -> Self {
        FaultAction::Latency {
            millis: d.as_millis() as u64,
        }
    }

    /// The Gmail error this action answers (None for latency and hang).
    pub(crate) fn api_error(&self) -> Option<ApiError> {
        match self {
            FaultAction::Status {
                status,
                reason,
                message,
                domain,
                retry_after,
            } => {
                let (d, r, m) = default_reason(*status);
                let reason = reason.as_deref().unwrap_or(r);
                let domain = domain.as_deref().unwrap_or(d);
                if message.is_none()
                    && let Some(secs) = retry_after
                    && matches!(
                        reason,
                        "rateLimitExceeded" | "userRateLimitExceeded" | "dailyLimitExceeded"
                    )
                {
                    let mut e = ApiError::rate_limited(*status, reason, *secs);
                    e.domain = domain.to_string();
                    return Some(e);
                }
                let message = message.clone().unwrap_or_else(|| m.to_string());
                let mut e =
                    ApiError::new(*status, domain, reason, message).with_retry_after(*retry_after);
                if reason == "failedPrecondition" {
                    // Google's canonical status for this reason, whatever the HTTP code.
                    e = e.with_status("FAILED_PRECONDITION");
                }
                Some(e)
            }
            FaultAction::ExpiredToken => Some(ApiError::invalid_credentials()),
            FaultAction::Latency { .. } | FaultAction::Hang => None,
        }
    }
}

/// A fault rule: matches calls to `endpoint` (None = any) for `mailbox` (None = any); applies
/// `action` `remaining` more times (None = forever). The first matching rule with uses left
/// wins; rules are checked in the order they were injected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FaultRule {
    #[serde(default)]
    pub endpoint: Option<Endpoint>,
    #[serde(default)]
    pub mailbox: Option<String>,
    pub action: FaultAction,
    #[serde(default)]
    pub remaining: Option<u32>,
}

impl FaultRule {
    /// A rule for every call to `endpoint` of any mailbox, forever.
    pub fn new(endpoint: Option<Endpoint>, action: FaultAction) -> Self {
        FaultRule {
            endpoint,
            mailbox: None,
            action,
            remaining: None,
        }
    }

    pub fn for_mailbox(mut self, email: &str) -> Self {
        self.mailbox = Some(email.to_string());
        self
    }

    pub fn times(mut self, n: u32) -> Self {
        self.remaining = Some(n);
        self
    }
}

#[derive(Debug, Default)]
pub(crate) struct Faults {
    next_id: FaultId,
    rules: Vec<(FaultId, FaultRule)>,
}

impl Faults {
    pub fn add(&mut self, rule: FaultRule) -> FaultId {
        self.next_id += 1;
        self.rules.push((self.next_id, rule));
        self.next_id
    }

    pub fn remove(&mut self, id: FaultId) -> bool {
        let before = self.rules.len();
        self.rules.retain(|(i, _)| *i != id);
        self.rules.len() != before
    }

    pub fn clear(&mut self) {
        self.rules.clear();
    }

    pub fn list(&self) -> Vec<(FaultId, FaultRule)> {
        self.rules.clone()
    }

    /// One use of rule `pos`: its action; the rule goes once its uses are spent.
    fn consume(&mut self, pos: usize) -> FaultAction {
        let rule = &mut self.rules[pos].1;
        let action = rule.action.clone();
        if let Some(n) = rule.remaining.as_mut() {
            *n -= 1;
            if *n == 0 {
                self.rules.remove(pos);
            }
        }
        action
    }

    /// Consumes one use of the first rule that names `endpoint` itself (rules for any
    /// endpoint do not match): for batch requests as a whole, so existing catch-all rules keep
    /// applying to the calls inside them only.
    pub fn take_named(&mut self, endpoint: Endpoint) -> Option<FaultAction> {
        let pos = self
            .rules
            .iter()
            .position(|(_, r)| r.endpoint == Some(endpoint) && r.remaining != Some(0))?;
        Some(self.consume(pos))
    }

    /// Consumes one use of the first matching rule.
    pub fn take(&mut self, endpoint: Endpoint, mailbox: Option<&str>) -> Option<FaultAction> {
        if self.rules.is_empty() {
            return None;
        }
        let pos = self.rules.iter().position(|(_, r)| {
            r.endpoint.is_none_or(|e| e == endpoint)
                && r.mailbox.as_deref().is_none_or(|m| Some(m) == mailbox)
                && r.remaining != Some(0)
        })?;
        Some(self.consume(pos))
    }
}
