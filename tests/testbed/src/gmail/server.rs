//! The Gmail REST routes and the pipeline every call goes through:
//! auth → mailbox resolution → concurrency → injected faults → quota → handler → ledger.

use super::Inner;
use super::auth::{JWT_BEARER_GRANT, Principal};
use super::config::QuotaErrorStyle;
use super::errors::{ApiError, OAuthError, json_ok};
use super::faults::FaultAction;
use super::ledger::{CallEntry, ChangeKind, Endpoint, LedgerEntry};
use super::mailbox::{HistoryError, HistoryQuery};
use super::quota::QuotaRefusal;
use super::state::WatchRefusal;
use super::wire::*;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

type S = State<Arc<Inner>>;

pub(crate) fn routes() -> Router<Arc<Inner>> {
    Router::new()
        .route("/gmail/v1/users/{user}/profile", get(profile))
        .route("/gmail/v1/users/{user}/history", get(history))
        .route("/gmail/v1/users/{user}/messages", get(messages_list))
        .route("/gmail/v1/users/{user}/messages/{id}", get(messages_get))
        .route("/gmail/v1/users/{user}/watch", post(watch))
        .route("/gmail/v1/users/{user}/stop", post(stop))
        .route("/batch/gmail/v1", post(super::batch::batch))
        .route("/token", post(token))
        .route("/v1/projects/-/serviceAccounts/{target}", post(sign_jwt))
}

/// One call in progress; recorded in the ledger when dropped (status 499 if never finished,
/// i.e. the client went away).
pub(super) struct Call {
    inner: Arc<Inner>,
    endpoint: Endpoint,
    /// The number of the batch request that carried it (see [`CallEntry::batch`]).
    pub(super) batch: Option<u64>,
    mailbox: Option<String>,
    bearer: Option<String>,
    cost: u64,
    entered: bool,
    pub(super) faulted: bool,
    started: SystemTime,
    done: Option<(u16, Option<String>)>,
}

impl Call {
    pub(super) fn new(inner: &Arc<Inner>, endpoint: Endpoint, bearer: Option<String>) -> Self {
        Call {
            inner: inner.clone(),
            endpoint,
            batch: None,
            mailbox: None,
            bearer,
            cost: 0,
            entered: false,
            faulted: false,
            started: SystemTime::now(),
            done: None,
        }
    }

    pub(super) fn fail(mut self, e: ApiError) -> Response {
        self.done = Some((e.code, Some(e.reason.clone())));
        e.into_response()
    }

    pub(super) fn finish(mut self, r: Result<Response, ApiError>) -> Response {
        match r {
            Ok(resp) => {
                self.done = Some((resp.status().as_u16(), None));
                resp
            }
            Err(e) => self.fail(e),
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if self.entered
            && let Some(m) = &self.mailbox
        {
            self.inner.quota.lock().expect("quota").leave(m);
        }
        let (status, error_reason) = self.done.take().unwrap_or((499, None));
        let entry = CallEntry {
            endpoint: self.endpoint,
            mailbox: self.mailbox.take(),
            bearer: self.bearer.take(),
            cost: self.cost,
            status,
            error_reason,
            faulted: self.faulted,
            batch: self.batch,
            started: self.started,
            ended: SystemTime::now(),
        };
        if let Ok(mut st) = self.inner.state.lock() {
            st.ledger.push(LedgerEntry::Call(entry));
        }
    }
}

pub(super) fn bearer_of(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// Runs the pipeline up to the handler. On refusal the call is recorded and the answer returned.
async fn gate(
    inner: &Arc<Inner>,
    endpoint: Endpoint,
    user: &str,
    headers: &HeaderMap,
) -> Result<(Call, String), Response> {
    gate_in_batch(inner, endpoint, user, headers, None).await
}

/// [`gate`] for a call that came as part `batch` of a batch request (`None`: a direct call):
/// the same pipeline, so a part is authorized, faulted, charged and recorded like a call.
pub(super) async fn gate_in_batch(
    inner: &Arc<Inner>,
    endpoint: Endpoint,
    user: &str,
    headers: &HeaderMap,
    batch: Option<u64>,
) -> Result<(Call, String), Response> {
    let bearer = bearer_of(headers);
    let mut call = Call::new(inner, endpoint, bearer.clone());
    call.batch = batch;
    let Some(bearer) = bearer else {
        return Err(call.fail(ApiError::login_required()));
    };
    let principal = inner.auth.lock().expect("auth").principal(&bearer);
    let principal = match principal {
        Ok(p) => p,
        Err(e) => return Err(call.fail(e)),
    };
    // A token whose scopes allow no Gmail read (e.g. only gmail.send): Gmail's 403.
    let scope_ok = inner
        .auth
        .lock()
        .expect("auth")
        .scope_of(&bearer)
        .is_none_or(|scope| scope.split(' ').any(|s| GMAIL_READ_SCOPES.contains(&s)));
    if !scope_ok {
        return Err(call.fail(
            ApiError::new(
                403,
                "global",
                "insufficientPermissions",
                "Request had insufficient authentication scopes.",
            )
            .with_status("PERMISSION_DENIED"),
        ));
    }
    let email = match (&principal, user) {
        (Principal::Mailbox(m), "me") => m.clone(),
        (Principal::Any, "me") => {
            return Err(call.fail(ApiError::invalid(
                "gmail-sim: userId 'me' needs a token bound to a mailbox; static tokens are \
                 valid for every mailbox, so name the mailbox",
            )));
        }
        (Principal::Mailbox(m), u) if m != u => {
            call.mailbox = Some(u.to_string());
            return Err(call.fail(ApiError::delegation_denied(m)));
        }
        (_, u) => u.to_string(),
    };
    call.mailbox = Some(email.clone());
    if !inner
        .state
        .lock()
        .expect("state")
        .mailboxes
        .contains_key(&email)
    {
        return Err(call.fail(ApiError::mail_service_not_enabled()));
    }
    if inner.quota.lock().expect("quota").enter(&email).is_err() {
        return Err(call.fail(ApiError::too_many_concurrent()));
    }
    call.entered = true;
    let fault = inner
        .faults
        .lock()
        .expect("faults")
        .take(endpoint, Some(&email));
    if let Some(action) = fault {
        call.faulted = true;
        match action {
            FaultAction::Latency { millis } => {
                tokio::time::sleep(Duration::from_millis(millis)).await;
            }
            FaultAction::Hang => {
                inner.cancel.cancelled().await;
                return Err(call.fail(ApiError::new(
                    503,
                    "global",
                    "backendError",
                    "gmail-sim shutting down",
                )));
            }
            other => {
                let e = other.api_error().expect("status action");
                return Err(call.fail(e));
            }
        }
    }
    let (refusal, style, cost) = {
        let mut q = inner.quota.lock().expect("quota");
        let cost = q.cost(endpoint);
        (
            q.charge(&email, cost).err(),
            inner.knobs.lock().expect("knobs").quota_style,
            cost,
        )
    };
    if let Some(r) = refusal {
        let e = match (r, style) {
            // Gmail's 429 for the per-user minute says "User-rate limit exceeded" (field
            // reports); only the 403 style has a reason of its own for it.
            (QuotaRefusal::User(s), QuotaErrorStyle::TooManyRequests) => {
                ApiError::user_rate_limited(429, s)
            }
            (QuotaRefusal::User(s), QuotaErrorStyle::Forbidden) => {
                ApiError::rate_limited(403, "userRateLimitExceeded", s)
            }
            (QuotaRefusal::Project(s), QuotaErrorStyle::TooManyRequests) => {
                ApiError::rate_limited(429, "rateLimitExceeded", s)
            }
            (QuotaRefusal::Project(s), QuotaErrorStyle::Forbidden) => {
                ApiError::rate_limited(403, "rateLimitExceeded", s)
            }
            (QuotaRefusal::ProjectDay(s), _) => {
                ApiError::rate_limited(403, "dailyLimitExceeded", s)
            }
            (QuotaRefusal::Concurrency, _) => ApiError::too_many_concurrent(),
        };
        return Err(call.fail(e));
    }
    call.cost = cost;
    Ok((call, email))
}

/// Query string pairs, keeping repeated keys.
fn query_pairs(q: &Option<String>) -> Result<Vec<(String, String)>, ApiError> {
    match q {
        None => Ok(Vec::new()),
        Some(q) => serde_urlencoded::from_str::<Vec<(String, String)>>(q)
            .map_err(|e| ApiError::invalid(format!("Invalid query string: {e}"))),
    }
}

fn first<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

fn all<'a>(pairs: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    pairs
        .iter()
        .filter(|(k, _)| k == key)
        .flat_map(|(_, v)| v.split(','))
        .filter(|v| !v.is_empty())
        .collect()
}

/// `maxResults`: default 100, clamped to 500 (like Gmail); 0 = default.
fn max_results(pairs: &[(String, String)]) -> Result<usize, ApiError> {
    match first(pairs, "maxResults") {
        None | Some("") => Ok(100),
        Some(v) => match v.parse::<u64>() {
            Ok(0) => Ok(100),
            Ok(n) => Ok(n.min(500) as usize),
            Err(_) => Err(ApiError::invalid(format!(
                "Invalid value at 'max_results' (TYPE_UINT32), \"{v}\""
            ))),
        },
    }
}

const TOKEN_MASK: u64 = 0x6d61_696c_7369_6d21;

fn encode_page_token(prefix: char, v: u64) -> String {
    format!("{prefix}{:016x}", v ^ TOKEN_MASK)
}

fn decode_page_token(prefix: char, t: &str) -> Result<u64, ApiError> {
    t.strip_prefix(prefix)
        .filter(|h| h.len() == 16)
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .map(|v| v ^ TOKEN_MASK)
        .ok_or_else(|| ApiError::invalid("Invalid pageToken"))
}

fn parse_history_type(t: &str) -> Result<ChangeKind, ApiError> {
    match t {
        "messageAdded" | "MESSAGE_ADDED" => Ok(ChangeKind::MessageAdded),
        "messageDeleted" | "MESSAGE_DELETED" => Ok(ChangeKind::MessageDeleted),
        "labelAdded" | "LABEL_ADDED" => Ok(ChangeKind::LabelAdded),
        "labelRemoved" | "LABEL_REMOVED" => Ok(ChangeKind::LabelRemoved),
        other => Err(ApiError::invalid(format!(
            "Invalid value at 'history_types' (type.googleapis.com/google.apps.gmail.v1.\
             ListHistoryRequest.HistoryType), \"{other}\""
        ))),
    }
}

async fn profile(State(inner): S, Path(user): Path<String>, headers: HeaderMap) -> Response {
    let (call, email) = match gate(&inner, Endpoint::GetProfile, &user, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let r = {
        let st = inner.state.lock().expect("state");
        st.mailbox(&email).map(|mb| {
            json_ok(&ProfileJson {
                email_address: &mb.email,
                messages_total: mb.messages.len(),
                threads_total: mb.threads_total(),
                history_id: mb.history_id.to_string(),
            })
        })
    };
    call.finish(r.map_err(|_| ApiError::not_found()))
}

async fn history(
    State(inner): S,
    Path(user): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    let (call, email) = match gate(&inner, Endpoint::HistoryList, &user, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    call.finish(history_inner(&inner, &email, &q))
}

fn history_inner(inner: &Inner, email: &str, q: &Option<String>) -> Result<Response, ApiError> {
    let pairs = query_pairs(q)?;
    let start = match first(&pairs, "startHistoryId") {
        None | Some("") => {
            return Err(ApiError::new(
                400,
                "global",
                "invalidArgument",
                "Required parameter: startHistoryId",
            ));
        }
        Some(v) => v.parse::<u64>().map_err(|_| {
            ApiError::invalid(format!(
                "Invalid value at 'start_history_id' (TYPE_UINT64), \"{v}\""
            ))
        })?,
    };
    let max_results = max_results(&pairs)?;
    let after = match first(&pairs, "pageToken").filter(|t| !t.is_empty()) {
        Some(t) => Some(decode_page_token('h', t)?),
        None => None,
    };
    let types = all(&pairs, "historyTypes");
    let types = if types.is_empty() {
        None
    } else {
        Some(
            types
                .into_iter()
                .map(parse_history_type)
                .collect::<Result<Vec<_>, _>>()?,
        )
    };
    let label = first(&pairs, "labelId")
        .filter(|l| !l.is_empty())
        .map(str::to_string);
    let mut query = HistoryQuery {
        start,
        after,
        max_results,
        types,
        label,
        visible_until: None,
    };
    let page = {
        let mut st = inner.state.lock().expect("state");
        let retention = st.retention;
        query.visible_until = (!st.history_lag.is_zero())
            .then(|| std::time::Instant::now().checked_sub(st.history_lag))
            .flatten();
        let mb = st.mailbox_mut(email).map_err(|_| ApiError::not_found())?;
        mb.apply_retention(retention, std::time::Instant::now());
        mb.list_history(&query)
    };
    let page = page.map_err(|e| match e {
        HistoryError::NotFound => ApiError::not_found(),
    })?;
    let body = HistoryListJson {
        history: page
            .records
            .iter()
            .map(HistoryRecordJson::from_record)
            .collect(),
        next_page_token: page.next_after.map(|a| encode_page_token('h', a)),
        history_id: page.current.to_string(),
    };
    Ok(json_ok(&body))
}

async fn messages_list(
    State(inner): S,
    Path(user): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    let (call, email) = match gate(&inner, Endpoint::MessagesList, &user, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    call.finish(messages_list_inner(&inner, &email, &q))
}

fn messages_list_inner(
    inner: &Inner,
    email: &str,
    q: &Option<String>,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(q)?;
    let max_results = max_results(&pairs)?;
    let labels = all(&pairs, "labelIds");
    let include_spam_trash = first(&pairs, "includeSpamTrash") == Some("true");
    let before = match first(&pairs, "pageToken").filter(|t| !t.is_empty()) {
        Some(t) => Some(format!("{:016x}", decode_page_token('m', t)?)),
        None => None,
    };
    let st = inner.state.lock().expect("state");
    let mb = st.mailbox(email).map_err(|_| ApiError::not_found())?;
    let matches = |m: &super::mailbox::Message| {
        labels.iter().all(|l| m.labels.iter().any(|x| x == l))
            && (include_spam_trash
                || labels.iter().any(|l| *l == "SPAM" || *l == "TRASH")
                || !m.labels.iter().any(|x| x == "SPAM" || x == "TRASH"))
    };
    let total = mb.messages.values().filter(|m| matches(m)).count();
    let range = match &before {
        Some(b) => mb.messages.range::<String, _>(..b.clone()),
        None => mb.messages.range::<String, _>(..),
    };
    let mut out = Vec::new();
    let mut next = None;
    for (_, m) in range.rev() {
        if !matches(m) {
            continue;
        }
        if out.len() == max_results {
            next = out
                .last()
                .map(|r: &MessageRefJson| encode_page_token('m', parse_hex(r.id)));
            break;
        }
        out.push(MessageRefJson {
            id: &m.id,
            thread_id: &m.thread_id,
            label_ids: &[],
        });
    }
    Ok(json_ok(&MessageListJson {
        messages: out,
        next_page_token: next,
        result_size_estimate: total,
    }))
}

fn parse_hex(id: &str) -> u64 {
    u64::from_str_radix(id, 16).unwrap_or(0)
}

async fn messages_get(
    State(inner): S,
    Path((user, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    let (call, email) = match gate(&inner, Endpoint::MessagesGet, &user, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    call.finish(messages_get_inner(&inner, &email, &id, &q))
}

/// `users.messages.get` past the pipeline (direct or as a batch part).
pub(super) fn messages_get_inner(
    inner: &Inner,
    email: &str,
    id: &str,
    q: &Option<String>,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(q)?;
    let format = match first(&pairs, "format").unwrap_or("full") {
        "minimal" | "MINIMAL" => GetFormat::Minimal,
        "metadata" | "METADATA" | "full" | "FULL" | "raw" | "RAW" => GetFormat::Metadata {
            headers: all(&pairs, "metadataHeaders")
                .into_iter()
                .map(str::to_string)
                .collect(),
        },
        other => {
            return Err(ApiError::invalid(format!(
                "Invalid value at 'format' (type.googleapis.com/google.apps.gmail.v1.\
                 GetMessageRequest.Format), \"{other}\""
            )));
        }
    };
    if id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::invalid("Invalid id value"));
    }
    let st = inner.state.lock().expect("state");
    let mb = st.mailbox(email).map_err(|_| ApiError::not_found())?;
    let m = mb.messages.get(id).ok_or_else(ApiError::not_found)?;
    Ok(json_ok(&MessageJson::new(m, &format)))
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct WatchRequest {
    topic_name: Option<String>,
    #[serde(default)]
    label_ids: Vec<String>,
    label_filter_behavior: Option<String>,
    label_filter_action: Option<String>,
}

/// A validated `users.watch` request.
struct WatchSpec {
    topic: String,
    label_ids: Vec<String>,
    exclude: bool,
}

fn parse_watch(inner: &Inner, body: &[u8]) -> Result<WatchSpec, ApiError> {
    let req: WatchRequest = if body.iter().all(u8::is_ascii_whitespace) {
        WatchRequest::default()
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::invalid(format!("Invalid JSON payload received. {e}")))?
    };
    let project = inner.cfg.project.clone();
    let bad_topic = || {
        ApiError::invalid(format!(
            "Invalid topicName does not match projects/{}/topics/*",
            project.as_deref().unwrap_or("SOME-PROJECT")
        ))
    };
    let topic = req.topic_name.clone().ok_or_else(bad_topic)?;
    let parts: Vec<&str> = topic.split('/').collect();
    let ok = parts.len() == 4
        && parts[0] == "projects"
        && !parts[1].is_empty()
        && parts[2] == "topics"
        && !parts[3].is_empty()
        && project.as_deref().is_none_or(|p| p == parts[1]);
    if !ok {
        return Err(bad_topic());
    }
    let behavior = req
        .label_filter_behavior
        .or(req.label_filter_action)
        .unwrap_or_default()
        .to_ascii_lowercase();
    let exclude = match behavior.as_str() {
        "" | "include" => false,
        "exclude" => true,
        other => {
            return Err(ApiError::invalid(format!(
                "Invalid value at 'label_filter_behavior', \"{other}\""
            )));
        }
    };
    Ok(WatchSpec {
        topic,
        label_ids: req.label_ids,
        exclude,
    })
}

fn refusal(r: WatchRefusal) -> ApiError {
    match r {
        WatchRefusal::UnknownMailbox => ApiError::not_found(),
        WatchRefusal::Conflict => ApiError::watch_conflict(),
    }
}

/// A watch in processing for a mailbox; the claim is given back when dropped (the call
/// finished, failed, or the client went away and the handler future was dropped).
struct WatchClaim {
    inner: Arc<Inner>,
    email: String,
    claim: u64,
}

impl Drop for WatchClaim {
    fn drop(&mut self) {
        if let Ok(mut st) = self.inner.state.lock() {
            st.release_watch_claim(&self.email, self.claim);
        }
    }
}

async fn watch(
    State(inner): S,
    Path(user): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (call, email) = match gate(&inner, Endpoint::Watch, &user, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let r = watch_inner(&inner, &email, &body).await;
    call.finish(r)
}

async fn watch_inner(inner: &Arc<Inner>, email: &str, body: &[u8]) -> Result<Response, ApiError> {
    let spec = parse_watch(inner, body)?;
    let lifetime = inner.cfg.watch_lifetime;
    let processing = inner.knobs.lock().expect("knobs").watch_processing;
    let register = |st: &mut super::state::SimState| {
        st.watch(
            email,
            &spec.topic,
            spec.label_ids.clone(),
            spec.exclude,
            lifetime,
        )
        .map_err(|_| ApiError::not_found())
    };
    let (hid, expiration) = if processing.is_zero() {
        // Check and registration in one critical section: concurrent watches serialize.
        let mut st = inner.state.lock().expect("state");
        st.check_watch(email, &spec.topic).map_err(refusal)?;
        register(&mut st)?
    } else {
        let claim = inner
            .state
            .lock()
            .expect("state")
            .claim_watch(email, &spec.topic)
            .map_err(refusal)?;
        let _claim = WatchClaim {
            inner: inner.clone(),
            email: email.to_string(),
            claim,
        };
        tokio::select! {
            _ = tokio::time::sleep(processing) => {}
            _ = inner.cancel.cancelled() => {
                return Err(ApiError::new(503, "global", "backendError", "gmail-sim shutting down"));
            }
        }
        let mut st = inner.state.lock().expect("state");
        let r = register(&mut st)?;
        // Released in the same critical section as the registration.
        st.release_watch_claim(email, claim);
        r
    };
    Ok(json_ok(&WatchJson {
        history_id: hid.to_string(),
        expiration: expiration.to_string(),
    }))
}

async fn stop(State(inner): S, Path(user): Path<String>, headers: HeaderMap) -> Response {
    let (call, email) = match gate(&inner, Endpoint::Stop, &user, &headers).await {
        Ok(c) => c,
        Err(r) => return r,
    };
    let r = inner
        .state
        .lock()
        .expect("state")
        .stop(&email)
        .map(|_| StatusCode::NO_CONTENT.into_response())
        .map_err(|_| ApiError::not_found());
    call.finish(r)
}

/// The OAuth token endpoint (form-encoded).
async fn token(State(inner): S, body: Bytes) -> Response {
    let mut call = Call::new(&inner, Endpoint::Token, None);
    let oauth_fail = |mut call: Call, e: OAuthError| {
        call.done = Some((e.code, Some(e.error.clone())));
        e.into_response()
    };
    let Ok(form) = serde_urlencoded::from_bytes::<HashMap<String, String>>(&body) else {
        return oauth_fail(
            call,
            OAuthError::invalid_request("Invalid form-encoded body"),
        );
    };
    let grant = form.get("grant_type").cloned().unwrap_or_default();
    // Best-effort mailbox for fault matching and the ledger (verified below).
    call.mailbox = match grant.as_str() {
        "refresh_token" => form
            .get("refresh_token")
            .and_then(|t| inner.auth.lock().expect("auth").refresh_mailbox(t)),
        JWT_BEARER_GRANT => form.get("assertion").and_then(|a| {
            jsonwebtoken::dangerous::insecure_decode::<super::auth::DelegationClaims>(a)
                .ok()
                .and_then(|d| d.claims.sub)
        }),
        _ => None,
    };
    let fault = inner
        .faults
        .lock()
        .expect("faults")
        .take(Endpoint::Token, call.mailbox.as_deref());
    if let Some(action) = fault {
        call.faulted = true;
        match action {
            FaultAction::Latency { millis } => {
                tokio::time::sleep(Duration::from_millis(millis)).await
            }
            FaultAction::Hang => {
                inner.cancel.cancelled().await;
                return oauth_fail(call, OAuthError::new(503, "temporarily_unavailable", ""));
            }
            FaultAction::ExpiredToken => {
                return oauth_fail(
                    call,
                    OAuthError::invalid_grant("Token has been expired or revoked."),
                );
            }
            FaultAction::Status {
                status,
                reason,
                message,
                retry_after,
                ..
            } => {
                let mut e = OAuthError::new(
                    status,
                    reason.as_deref().unwrap_or(match status {
                        400 => "invalid_grant",
                        401 => "unauthorized_client",
                        429 => "rate_limit_exceeded",
                        _ => "internal_failure",
                    }),
                    message.unwrap_or_default(),
                );
                e.retry_after = retry_after;
                return oauth_fail(call, e);
            }
        }
    }
    let result = match grant.as_str() {
        "refresh_token" => inner.auth.lock().expect("auth").refresh_grant(&form),
        JWT_BEARER_GRANT => delegation(&inner, &form),
        "" => Err(OAuthError::invalid_request(
            "Required parameter is missing: grant_type",
        )),
        other => Err(OAuthError::new(
            400,
            "unsupported_grant_type",
            format!("Invalid grant_type: {other}"),
        )),
    };
    match result {
        Ok((email, resp)) => {
            call.mailbox = Some(email);
            call.done = Some((200, None));
            json_ok(&resp)
        }
        Err(e) => oauth_fail(call, e),
    }
}

fn delegation(
    inner: &Inner,
    form: &HashMap<String, String>,
) -> Result<(String, super::auth::TokenResponse), OAuthError> {
    let assertion = form
        .get("assertion")
        .filter(|a| !a.is_empty())
        .ok_or_else(|| OAuthError::invalid_request("Missing required parameter: assertion"))?;
    let claims = inner
        .auth
        .lock()
        .expect("auth")
        .verify_assertion(assertion, &inner.token_url())?;
    let email = claims.sub.unwrap_or_default();
    let exists = inner
        .state
        .lock()
        .expect("state")
        .mailboxes
        .contains_key(&email);
    if !exists {
        return Err(OAuthError::invalid_grant("Invalid email or User ID"));
    }
    let scope = claims.scope.unwrap_or_default();
    let resp = inner
        .auth
        .lock()
        .expect("auth")
        .delegation_grant(&email, scope)?;
    Ok((email, resp))
}

/// Scopes that allow reading history, labels and watch.
const GMAIL_READ_SCOPES: [&str; 4] = [
    "https://www.googleapis.com/auth/gmail.metadata",
    "https://www.googleapis.com/auth/gmail.readonly",
    "https://www.googleapis.com/auth/gmail.modify",
    "https://mail.google.com/",
];

#[derive(serde::Deserialize)]
struct SignJwtRequest {
    payload: String,
}

/// The fake IAM Credentials `projects/-/serviceAccounts/{email}:signJwt`.
async fn sign_jwt(
    State(inner): S,
    Path(target): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let bearer = bearer_of(&headers);
    let call = Call::new(&inner, Endpoint::IamSignJwt, bearer.clone());
    let Some(service_account) = target.strip_suffix(":signJwt") else {
        return call.fail(ApiError::not_found());
    };
    let Ok(request) = serde_json::from_slice::<SignJwtRequest>(&body) else {
        return call.fail(ApiError::invalid("Invalid JSON payload received."));
    };
    let signed = inner.auth.lock().expect("auth").sign_jwt(
        bearer.as_deref(),
        service_account,
        &request.payload,
    );
    call.finish(signed.map(|(key_id, signed_jwt)| {
        json_ok(&serde_json::json!({"keyId": key_id, "signedJwt": signed_jwt}))
    }))
}

/// Anything else: Gmail's 404 page as JSON.
pub(crate) async fn fallback() -> Response {
    ApiError::new(404, "global", "notFound", "Not Found").into_response()
}
