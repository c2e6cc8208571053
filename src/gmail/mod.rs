//! A small typed Gmail REST client for the seven endpoints gmail-sync uses (`messages.get` in
//! batches, see [`batch`]).
//!
//! Why not the generated `google-gmail1` crate: it brings a second HTTP stack (hyper-util's
//! legacy client, ring), while this client shares reqwest 0.13 and rustls/aws-lc-rs with
//! google-cloud-auth, and gives full control of retries and of the base URL (tests point it at
//! the simulator).
//!
//! Every call goes through [`GmailClient::call`], which classifies errors ([`GmailError`]) and
//! retries what is retryable with jittered exponential backoff that honours `Retry-After`.

mod batch;
mod model;

pub(crate) use batch::BATCH_MAX_CALLS;
mod wire;

pub use model::{
    FetchedMessage, HistoryChange, HistoryChangeKind, HistoryPage, ListedMessage, MessageFormat,
    MessageMetadata, MessagePage, Profile, Watch,
};

use crate::auth::{AccessToken, AuthError, TokenSource};
use crate::config::GmailSettings;
use crate::history_id::HistoryId;
use crate::mailbox::Mailbox;
use crate::quota::{Budget, CostTable, Deferral, Governor, Payment};
use crate::telemetry::{Counters, StatusClass};
use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::Duration;

/// The Gmail methods used; their quota cost is the configured table's
/// ([`crate::quota::CostTable`], `GMAIL_SYNC_QUOTA_TABLE`, `GMAIL_SYNC_MESSAGES_GET_COST`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    GetProfile,
    HistoryList,
    MessagesList,
    MessagesGet,
    Watch,
    Stop,
}

/// What went wrong, and therefore what to do about it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GmailError {
    /// `history.list` answered 404: the cursor is older than Gmail's history. Full resync.
    #[error("history before the cursor is no longer available (404)")]
    HistoryGone,
    /// 429, or 403 `rateLimitExceeded` / `userRateLimitExceeded` / `dailyLimitExceeded`;
    /// `budget` is what the answer says is exhausted (the governor blocks it).
    #[error("rate limited ({status} {reason})")]
    RateLimited {
        status: u16,
        reason: String,
        retry_after: Option<Duration>,
        budget: Budget,
    },
    /// Not sent: the quota governor says the budget is spent or blocked (a 429 fed back), so
    /// the work gives its slot and lease back and comes again after the deferral.
    #[error("deferred by the quota governor ({}) for {} ms", .0.reason.as_str(), .0.after.as_millis())]
    Deferred(Deferral),
    /// 5xx, timeouts, connection failures.
    #[error("transient failure: {detail}")]
    Transient {
        detail: String,
        retry_after: Option<Duration>,
    },
    /// `users.watch` answered 400 "Only one user push notification client allowed per
    /// developer (call /stop then try again)": another watch for this mailbox is active (other
    /// topic) or racing. The caller stops, then watches again.
    #[error("another push client is registered for this mailbox (watch conflict)")]
    WatchConflict,
    /// 401 again after refreshing the token: the user must re-consent.
    #[error("unauthorized (401) even with a fresh token")]
    Unauthorized,
    /// 400, 403 `domainPolicy` / `insufficientPermissions`, 404 outside history, ...
    #[error("permanent failure ({status} {reason}): {message}")]
    Permanent {
        status: u16,
        reason: String,
        message: String,
    },
    #[error("token: {0}")]
    Auth(#[from] AuthError),
}

impl GmailError {
    /// Worth trying again later (after backoff)?
    pub fn is_retryable(&self) -> bool {
        match self {
            GmailError::RateLimited { .. }
            | GmailError::Transient { .. }
            | GmailError::Deferred(_) => true,
            GmailError::Auth(e) => e.is_retryable(),
            GmailError::HistoryGone
            | GmailError::WatchConflict
            | GmailError::Unauthorized
            | GmailError::Permanent { .. } => false,
        }
    }

    /// A short, stable name of what failed (`403 insufficientPermissions`): the failure guard
    /// recognises a mass failure by it, so it holds no mailbox-specific text.
    pub fn cause(&self) -> String {
        match self {
            GmailError::HistoryGone => "404 history gone".into(),
            GmailError::RateLimited { status, reason, .. } => format!("{status} {reason}"),
            GmailError::Deferred(d) => format!("deferred ({})", d.reason.as_str()),
            GmailError::Transient { detail, .. } => detail.clone(),
            GmailError::WatchConflict => "400 watch conflict".into(),
            GmailError::Unauthorized => "401 with a fresh token".into(),
            GmailError::Permanent { status, reason, .. } => format!("{status} {reason}"),
            GmailError::Auth(e) => e.cause().into(),
        }
    }

    /// The mailbox's authorization is what failed: Gmail refuses this user (scope not granted
    /// for it, Gmail disabled for it) or the token is refused. Fixed by re-authorizing it.
    pub fn needs_reauthorization(&self) -> bool {
        match self {
            GmailError::Unauthorized => true,
            GmailError::Auth(e) => e.scope() == crate::auth::FailureScope::Mailbox,
            GmailError::Permanent {
                status,
                reason,
                message,
            } => {
                (*status == 403 && reason == "insufficientPermissions")
                    || message.contains("Mail service not enabled")
            }
            _ => false,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            GmailError::RateLimited { retry_after, .. }
            | GmailError::Transient { retry_after, .. } => *retry_after,
            GmailError::Deferred(d) => Some(d.after),
            _ => None,
        }
    }

    /// The governor's deferral this error means, if it is one: a call it did not let out, or
    /// (governor on) a rate-limit answer it turned into a block.
    pub fn deferral(&self) -> Option<Deferral> {
        match self {
            GmailError::Deferred(d) => Some(*d),
            _ => None,
        }
    }
}

/// The part of Gmail's 400 answer that identifies a watch conflict.
const WATCH_CONFLICT_MESSAGE: &str = "Only one user push notification client allowed";

/// Whether `watch_taking_over` had to stop another client's watch first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Takeover {
    None,
    StoppedOther,
}

/// A watch's label filter (`labelIds` + `labelFilterBehavior`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelFilter {
    pub behavior: LabelFilterBehavior,
    pub label_ids: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabelFilterBehavior {
    Include,
    Exclude,
}

impl LabelFilterBehavior {
    pub fn as_str(self) -> &'static str {
        match self {
            LabelFilterBehavior::Include => "include",
            LabelFilterBehavior::Exclude => "exclude",
        }
    }
}

impl LabelFilter {
    /// The stored form: `include:ID,ID` / `exclude:ID,ID`.
    pub fn encode(&self) -> String {
        format!("{}:{}", self.behavior.as_str(), self.label_ids.join(","))
    }

    pub fn decode(stored: &str) -> Option<LabelFilter> {
        let (behavior, ids) = stored.split_once(':')?;
        let behavior = match behavior {
            "include" => LabelFilterBehavior::Include,
            "exclude" => LabelFilterBehavior::Exclude,
            _ => return None,
        };
        Some(LabelFilter {
            behavior,
            label_ids: ids
                .split(',')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
        })
    }
}

tokio::task_local! {
    /// Gmail requests sent by the current task, retries included: a sync scopes it to report
    /// its own calls (a global counter delta would include concurrent syncs).
    pub static REQUESTS_IN_TASK: std::cell::Cell<u32>;
}

#[derive(Clone)]
pub struct GmailClient {
    http: reqwest::Client,
    base: reqwest::Url,
    /// `{api_url}/batch/gmail/v1`.
    batch_url: reqwest::Url,
    tokens: Arc<dyn TokenSource>,
    max_attempts: u32,
    costs: CostTable,
    /// Every call pays the shared quota budgets first (off: no Redis call).
    governor: Governor,
    counters: Arc<Counters>,
}

impl GmailClient {
    pub fn new(
        settings: &GmailSettings,
        tokens: Arc<dyn TokenSource>,
        counters: Arc<Counters>,
    ) -> anyhow::Result<GmailClient> {
        let base = reqwest::Url::parse(&format!("{}/gmail/v1/users", settings.api_url))
            .ok()
            .filter(|u| !u.cannot_be_a_base())
            .ok_or_else(|| anyhow::anyhow!("GMAIL_SYNC_GMAIL_API_URL is not a usable base URL"))?;
        let batch_url = reqwest::Url::parse(&format!("{}/batch/gmail/v1", settings.api_url))?;
        let http = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(60))
            // reqwest's default retry policy replays requests the server refused at the
            // protocol level (HTTP/2 and HTTP/3 NACKs; this client speaks HTTP/1.1) and, to be
            // able to, copies every request (headers, URI, extensions) before sending it. Our
            // own loop (`call`) decides every retry; a policy allowed no retries copies nothing.
            .retry(reqwest::retry::never().max_retries_per_request(0))
            .user_agent(concat!("gmail-sync/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(GmailClient {
            http,
            base,
            batch_url,
            tokens,
            max_attempts: settings.max_attempts,
            costs: settings.costs,
            governor: Governor::off(),
            counters,
        })
    }

    /// The same client, paying every call to `governor` (and feeding rate limits back to it).
    pub fn with_governor(mut self, governor: Governor) -> GmailClient {
        self.governor = governor;
        self
    }

    /// The governor every call pays (off unless [`GmailClient::with_governor`]).
    pub(crate) fn governor(&self) -> &Governor {
        &self.governor
    }

    /// What one call of `method` costs in quota units, as configured.
    pub fn quota_units(&self, method: Method) -> u64 {
        self.costs.units(method)
    }

    /// Pays `units` for a call about to be sent (see [`Governor::pay`]); a deferral comes back
    /// as [`GmailError::Deferred`] and nothing is sent.
    async fn pay(&self, mailbox: &Mailbox, units: u64) -> Result<(), GmailError> {
        match self.governor.pay(mailbox, units).await {
            Ok(Payment::Paid) => Ok(()),
            Ok(Payment::Wait(d)) => Err(GmailError::Deferred(d)),
            Err(e) => Err(GmailError::Transient {
                detail: e.to_string(),
                retry_after: None,
            }),
        }
    }

    /// With the governor on, a rate-limit answer is not slept on here (that would hold the
    /// sync's slot and lease): it blocks its budget for every replica and becomes a deferral
    /// of the whole work. Off: `None`, the caller retries as before.
    async fn defer_rate_limit(&self, mailbox: &Mailbox, err: &GmailError) -> Option<GmailError> {
        let GmailError::RateLimited {
            budget,
            retry_after,
            ..
        } = err
        else {
            return None;
        };
        if !self.governor.is_on() {
            return None;
        }
        Some(
            match self
                .governor
                .rate_limited(mailbox, *budget, *retry_after)
                .await
            {
                Ok(d) => GmailError::Deferred(d),
                // Not recorded: still a deferral of this work, only the others do not know.
                Err(e) => {
                    tracing::warn!(error = %e, "could not feed a Gmail rate limit back to the quota governor");
                    GmailError::Deferred(Deferral {
                        after: crate::quota::policy::block_for(*budget, *retry_after),
                        reason: crate::quota::WaitReason::Blocked(*budget),
                    })
                }
            },
        )
    }

    /// `{base}/gmail/v1/users/{mailbox}/{rest}`, built from the URL parsed once at startup
    /// (parsing a URL string per request showed in the profile); the mailbox is
    /// percent-encoded as a path segment.
    fn user_url(&self, mailbox: &Mailbox, rest: &str) -> reqwest::Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("checked at startup: an http(s) URL can be a base")
            .push(mailbox.as_str())
            .push(rest);
        url
    }

    /// One page of `users.history.list`, all four record kinds, chronological.
    pub async fn history_page(
        &self,
        mailbox: &Mailbox,
        start: HistoryId,
        page_token: Option<&str>,
        page_size: u32,
    ) -> Result<HistoryPage, GmailError> {
        // The whole URL built once, query included, outside the per-attempt closure: this is
        // the call every sync makes (RequestBuilder::query re-encodes and re-parses per call).
        let mut url = self.user_url(mailbox, "history");
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("startHistoryId", &start.to_string())
                .append_pair("maxResults", &page_size.to_string());
            if let Some(t) = page_token {
                q.append_pair("pageToken", t);
            }
        }
        let result = self
            .call::<wire::HistoryPage>(Method::HistoryList, mailbox, |http| http.get(url.clone()))
            .await;
        match result {
            Ok(page) => Ok(HistoryPage::from(page)),
            Err(GmailError::Permanent { status: 404, .. }) => Err(GmailError::HistoryGone),
            Err(e) => Err(e),
        }
    }

    pub async fn profile(&self, mailbox: &Mailbox) -> Result<Profile, GmailError> {
        let url = self.user_url(mailbox, "profile");
        self.call::<wire::Profile>(Method::GetProfile, mailbox, |http| http.get(url.clone()))
            .await
            .map(Profile::from)
    }

    /// One page of `users.messages.list` (ids and thread ids, newest first).
    pub async fn list_messages(
        &self,
        mailbox: &Mailbox,
        page_token: Option<&str>,
        max_results: u32,
    ) -> Result<MessagePage, GmailError> {
        let url = self.user_url(mailbox, "messages");
        let size = max_results.to_string();
        self.call::<wire::MessageList>(Method::MessagesList, mailbox, |http| {
            let mut q: Vec<(&str, &str)> = vec![("maxResults", &size)];
            if let Some(t) = page_token {
                q.push(("pageToken", t));
            }
            http.get(url.clone()).query(&q)
        })
        .await
        .map(MessagePage::from)
    }

    /// `users.watch` on `topic`: the whole mailbox unless a label filter is given (label-scoped
    /// watches miss replies, which do not inherit the thread's labels).
    pub async fn watch(
        &self,
        mailbox: &Mailbox,
        topic: &str,
        filter: Option<&LabelFilter>,
    ) -> Result<Watch, GmailError> {
        let url = self.user_url(mailbox, "watch");
        let body = match filter {
            None => serde_json::json!({ "topicName": topic }),
            Some(f) => serde_json::json!({
                "topicName": topic,
                "labelIds": f.label_ids,
                "labelFilterBehavior": f.behavior.as_str(),
            }),
        };
        self.call::<wire::WatchResponse>(Method::Watch, mailbox, |http| {
            http.post(url.clone()).json(&body)
        })
        .await
        .map(Watch::from)
        .map_err(|e| match e {
            GmailError::Permanent {
                status: 400,
                ref message,
                ..
            } if message.contains(WATCH_CONFLICT_MESSAGE) => GmailError::WatchConflict,
            other => other,
        })
    }

    /// `watch`, and on a watch conflict `stop` then one more `watch`: Gmail allows one push
    /// client per mailbox and developer project. A conflict that outlives the stop is reported
    /// as transient (try again later), never looped on here.
    pub async fn watch_taking_over(
        &self,
        mailbox: &Mailbox,
        topic: &str,
        filter: Option<&LabelFilter>,
    ) -> Result<(Watch, Takeover), GmailError> {
        match self.watch(mailbox, topic, filter).await {
            Err(GmailError::WatchConflict) => {}
            other => return other.map(|w| (w, Takeover::None)),
        }
        self.stop(mailbox).await?;
        match self.watch(mailbox, topic, filter).await {
            Ok(w) => Ok((w, Takeover::StoppedOther)),
            Err(GmailError::WatchConflict) => Err(GmailError::Transient {
                detail: "watch conflict persists after users.stop".into(),
                retry_after: None,
            }),
            Err(e) => Err(e),
        }
    }

    pub async fn stop(&self, mailbox: &Mailbox) -> Result<(), GmailError> {
        let url = self.user_url(mailbox, "stop");
        self.call::<serde_json::Value>(Method::Stop, mailbox, |http| {
            http.post(url.clone())
                .header(reqwest::header::CONTENT_LENGTH, "0")
        })
        .await
        .map(|_| ())
    }

    /// Sends the request built by `build`, with the mailbox's token, retrying retryable errors
    /// up to `max_attempts` times and refreshing the token once on 401.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        mailbox: &Mailbox,
        build: impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
    ) -> Result<T, GmailError> {
        // Paid once per call: Gmail does not charge the answers that make a retry.
        self.pay(mailbox, self.quota_units(method)).await?;
        let mut refreshed = false;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let token = self.tokens.token(mailbox).await?;
            let outcome = self.send_once::<T>(method, &build, &token).await;
            let err = match outcome {
                Ok(v) => return Ok(v),
                Err(Attempt::Unauthorized) if !refreshed => {
                    // The token may have expired between cache check and use: refresh once.
                    refreshed = true;
                    self.tokens.invalidate(mailbox, &token);
                    attempt -= 1;
                    continue;
                }
                Err(Attempt::Unauthorized) => return Err(GmailError::Unauthorized),
                Err(Attempt::Failed(e)) => e,
            };
            if let Some(deferred) = self.defer_rate_limit(mailbox, &err).await {
                return Err(deferred);
            }
            if !err.is_retryable() || attempt >= self.max_attempts {
                return Err(err);
            }
            let delay = crate::retry::gmail_call(attempt, err.retry_after());
            tracing::debug!(method = ?method, attempt, delay_ms = delay.as_millis() as u64, error = %err, "retrying Gmail call");
            tokio::time::sleep(delay).await;
        }
    }

    async fn send_once<T: DeserializeOwned>(
        &self,
        method: Method,
        build: &impl Fn(&reqwest::Client) -> reqwest::RequestBuilder,
        token: &AccessToken,
    ) -> Result<T, Attempt> {
        Counters::inc(&self.counters.gmail_calls);
        Counters::add(&self.counters.gmail_quota_units, self.quota_units(method));
        self.counters.gmail.spent(method, self.quota_units(method));
        let _ = REQUESTS_IN_TASK.try_with(|n| n.set(n.get() + 1));
        let response = build(&self.http)
            .header(reqwest::header::AUTHORIZATION, token.authorization())
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                Counters::inc(&self.counters.gmail_transient_errors);
                self.counters
                    .gmail
                    .answered(method, StatusClass::NoAnswer, 1);
                // reqwest errors name the URL (mailbox address, no token): fine to keep.
                return Err(Attempt::Failed(GmailError::Transient {
                    detail: e.without_url().to_string(),
                    retry_after: None,
                }));
            }
        };
        let status = response.status();
        self.counters
            .gmail
            .answered(method, StatusClass::of(status.as_u16()), 1);
        if status.is_success() {
            let bytes = response.bytes().await.map_err(|e| {
                Attempt::Failed(GmailError::Transient {
                    detail: format!("reading body: {}", e.without_url()),
                    retry_after: None,
                })
            })?;
            // An empty body (users.stop answers 204) decodes as JSON null.
            let bytes: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
            return serde_json::from_slice(bytes).map_err(|e| {
                Attempt::Failed(GmailError::Permanent {
                    status: status.as_u16(),
                    reason: "undecodableResponse".into(),
                    message: e.to_string(),
                })
            });
        }
        let header_retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after_header);
        let body = response.bytes().await.unwrap_or_default();
        Err(self.failed_answer(status, header_retry_after, &body))
    }
}

#[derive(Clone)]
enum Attempt {
    Unauthorized,
    Failed(GmailError),
}

/// Maps an error response to what to do. `None` = 401 (refresh the token).
fn classify(
    status: StatusCode,
    reason: &str,
    message: &str,
    header_retry_after: Option<Duration>,
) -> Option<GmailError> {
    let retry_after = header_retry_after.or_else(|| retry_after_in_message(message));
    let s = status.as_u16();
    Some(match s {
        401 => return None,
        429 => GmailError::RateLimited {
            status: s,
            reason: if reason.is_empty() {
                "tooManyRequests".into()
            } else {
                reason.into()
            },
            retry_after,
            budget: crate::quota::policy::budget_of_rate_limit(s, reason, message),
        },
        403 if matches!(
            reason,
            "rateLimitExceeded" | "userRateLimitExceeded" | "dailyLimitExceeded" | "quotaExceeded"
        ) =>
        {
            GmailError::RateLimited {
                status: s,
                reason: reason.into(),
                retry_after,
                budget: crate::quota::policy::budget_of_rate_limit(s, reason, message),
            }
        }
        408 | 500..=599 => GmailError::Transient {
            detail: format!("HTTP {s} {reason}"),
            retry_after,
        },
        _ => GmailError::Permanent {
            status: s,
            reason: reason.into(),
            message: message.chars().take(300).collect(),
        },
    })
}

/// `Retry-After: <seconds>` or `Retry-After: <HTTP-date>`.
fn parse_retry_after_header(v: &str) -> Option<Duration> {
    if let Ok(secs) = v.trim().parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v.trim()).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Gmail's 429 messages may say "Retry after 2026-11-22T08:00:00.000Z".
fn retry_after_in_message(message: &str) -> Option<Duration> {
    let idx = message.find("Retry after ")?;
    let rest = &message[idx + "Retry after ".len()..];
    let stamp = rest.split_whitespace().next()?.trim_end_matches(['.', ',']);
    let at =
        time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339).ok()?;
    let now = time::OffsetDateTime::now_utc();
    Some(Duration::try_from(at - now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_urls_escape_the_mailbox_as_one_path_segment() {
        let settings = GmailSettings {
            api_url: "http://127.0.0.1:9/base".into(),
            request_timeout: Duration::from_secs(1),
            max_attempts: 1,
            costs: CostTable::of(crate::quota::QuotaTable::Classic),
        };
        let client = GmailClient::new(
            &settings,
            Arc::new(crate::auth::NoCredentials),
            Arc::default(),
        )
        .unwrap();
        let m = Mailbox::parse("A.B+tag/x?y#z%@Example.com").unwrap();
        assert_eq!(
            client.user_url(&m, "history").as_str(),
            "http://127.0.0.1:9/base/gmail/v1/users/a.b+tag%2Fx%3Fy%23z%25@example.com/history"
        );
    }

    #[test]
    fn classification() {
        let c = |s: u16, reason: &str| classify(StatusCode::from_u16(s).unwrap(), reason, "", None);
        assert!(c(401, "authError").is_none());
        assert!(matches!(c(429, ""), Some(GmailError::RateLimited { .. })));
        assert!(matches!(
            c(403, "userRateLimitExceeded"),
            Some(GmailError::RateLimited { .. })
        ));
        assert!(matches!(
            c(403, "rateLimitExceeded"),
            Some(GmailError::RateLimited { .. })
        ));
        assert!(matches!(
            c(403, "domainPolicy"),
            Some(GmailError::Permanent { .. })
        ));
        assert!(matches!(
            c(403, "insufficientPermissions"),
            Some(GmailError::Permanent { .. })
        ));
        assert!(matches!(
            c(503, "backendError"),
            Some(GmailError::Transient { .. })
        ));
        assert!(matches!(
            c(400, "badRequest"),
            Some(GmailError::Permanent { .. })
        ));
        assert!(c(429, "").unwrap().is_retryable());
        assert!(!c(403, "domainPolicy").unwrap().is_retryable());
    }

    #[test]
    fn retry_after_sources() {
        assert_eq!(parse_retry_after_header("7"), Some(Duration::from_secs(7)));
        let future = time::OffsetDateTime::now_utc() + time::Duration::seconds(90);
        let msg = format!(
            "User-rate limit exceeded.  Retry after {}",
            future
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap()
        );
        let d = retry_after_in_message(&msg).unwrap();
        assert!(
            d > Duration::from_secs(80) && d <= Duration::from_secs(90),
            "{d:?}"
        );
        let e = classify(StatusCode::TOO_MANY_REQUESTS, "", &msg, None).unwrap();
        assert!(e.retry_after().is_some());
    }

    // Fuzzing (issue 10): error answers decide retry versus give up; whatever the status,
    // reason, message or Retry-After, the decision is made without a panic, and a rate limit
    // or a 5xx is always retryable.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn fuzz_every_error_answer_gets_a_decision(
                status in 100u16..1000,
                reason in prop_oneof![
                    Just("rateLimitExceeded".to_string()),
                    Just("userRateLimitExceeded".to_string()),
                    Just("failedPrecondition".to_string()),
                    ".{0,30}",
                ],
                message in prop_oneof![
                    ".{0,80}",
                    "Retry after [0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?Z[.,]?",
                    "Retry after .{0,40}",
                ],
                header in proptest::option::of(prop_oneof![
                    "[0-9]{1,25}",
                    ".{0,40}",
                    "(Mon|Tue|Sun), [0-9]{2} (Jan|Dec) [0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} GMT",
                ]),
            ) {
                let header = header.as_deref().and_then(parse_retry_after_header);
                let status = StatusCode::from_u16(status).unwrap();
                match classify(status, &reason, &message, header) {
                    None => prop_assert_eq!(status.as_u16(), 401),
                    Some(e) => {
                        let s = status.as_u16();
                        if s == 429 || s == 408 || (500..600).contains(&s) {
                            prop_assert!(e.is_retryable(), "{s} {reason}: {e:?}");
                        }
                        if let Some(after) = e.retry_after() {
                            prop_assert!(crate::retry::gmail_call(1, Some(after)) <= Duration::from_secs(300));
                        }
                        let _ = e.cause();
                    }
                }
            }

            /// "Retry after <RFC 3339>" in the future is read back to within a second.
            #[test]
            fn fuzz_retry_after_in_the_message_is_read(secs in 2u64..86_400, millis in 0u32..1000) {
                let at = time::OffsetDateTime::now_utc()
                    + time::Duration::seconds(secs as i64)
                    + time::Duration::milliseconds(i64::from(millis));
                let stamp = at.format(&time::format_description::well_known::Rfc3339).unwrap();
                let read = retry_after_in_message(&format!("Retry after {stamp}.")).unwrap();
                let want = Duration::from_secs(secs) + Duration::from_millis(u64::from(millis));
                prop_assert!(read <= want && want - read < Duration::from_secs(1), "{read:?} vs {want:?}");
            }
        }
    }
}
