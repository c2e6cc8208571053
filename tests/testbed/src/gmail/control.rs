//! The JSON control API of the standalone simulator, under `/_sim/...` (no authentication;
//! loopback only). It maps onto the same state operations as the Rust API:
//!
//! | Method & path | Body → answer |
//! |---|---|
//! | `POST /_sim/mailboxes` | `{"email", "historyId"?}` → `{"email","historyId"}` |
//! | `GET /_sim/mailboxes` | → `[{"email","historyId","messagesTotal","watchTopic","watchExpiration","watchInProgress"}]` |
//! | `GET /_sim/mailboxes/{email}` | → `{"email","historyId","horizon","messages":{id:[labels]},"watchTopic","watchExpiration","watchInProgress"}` |
//! | `POST /_sim/mailboxes/{email}/deliver` | `{"labelIds":[..],"threadId"?}` → `{"id","threadId","historyId"}` |
//! | `POST /_sim/mailboxes/{email}/messages/{id}/delete` | → `{"historyId"}` |
//! | `POST /_sim/mailboxes/{email}/messages/{id}/modify` | `{"addLabelIds":[..],"removeLabelIds":[..]}` → `{"historyIds":[..]}` |
//! | `POST /_sim/mailboxes/{email}/burst` | `{"n"}` → `{"historyIds":[..]}` |
//! | `POST /_sim/mailboxes/{email}/touch` | → `{"historyId"}` (no history record) |
//! | `POST /_sim/mailboxes/{email}/expire` | `{"upTo"?}` → `{"horizon"}` |
//! | `GET /_sim/ledger?from=N` | → `{"entries":[..],"next":M}` |
//! | `GET/POST/DELETE /_sim/faults`, `DELETE /_sim/faults/{id}` | `FaultRule` JSON → `{"id"}` |
//! | `POST /_sim/quota` | `{"perUserPerMinute"?,"perProjectPerMinute"?,"perProjectPerDay"?,"maxConcurrentPerUser"?,"table"?: "classic"\|"2026","style"?: "tooManyRequests"\|"forbidden"}` |
//! | `POST /_sim/notify` | `{"dropProbability"?,"delayMs"?:[lo,hi],"historyIdAsNumber"?}` |
//! | `POST /_sim/watch` | `{"processingMs"?}` (`SimConfig::watch_processing`) → `{"processingMs"}` |
//! | `POST /_sim/tokens/refresh` | `{"token","email"}`; `POST /_sim/tokens/refresh/revoke` `{"token"}` |
//! | `POST /_sim/tokens/static` | `{"token"}`; `POST /_sim/tokens/expire` `{"email"?}` |
//! | `GET /_sim/stats` | → counters |
//!
//! Fault rules in JSON: `{"endpoint"?: "getProfile"|"historyList"|"messagesList"|"messagesGet"|
//! "watch"|"stop"|"token", "mailbox"?: "a@b", "remaining"?: n, "action": A}` with `A` one of
//! `{"kind":"status","status":503,"reason"?,"message"?,"domain"?,"retryAfter"?}`,
//! `{"kind":"latency","millis":200}`, `{"kind":"hang"}`, `{"kind":"expiredToken"}`.
//! `watchExpiration` is the epoch-ms string the last successful watch answered (null without a
//! watch); `watchInProgress` whether a watch call of the mailbox is being processed.

use super::Inner;
use super::config::{QuotaConfig, QuotaErrorStyle};
use super::faults::FaultRule;
use super::ledger::LedgerEntry;
use super::state::SimError;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

type S = State<Arc<Inner>>;

pub(crate) fn routes() -> Router<Arc<Inner>> {
    Router::new()
        .route("/_sim/mailboxes", post(add_mailbox).get(list_mailboxes))
        .route("/_sim/mailboxes/{email}", get(get_mailbox))
        .route("/_sim/mailboxes/{email}/deliver", post(deliver))
        .route(
            "/_sim/mailboxes/{email}/messages/{id}/delete",
            post(delete_message),
        )
        .route("/_sim/mailboxes/{email}/messages/{id}/modify", post(modify))
        .route("/_sim/mailboxes/{email}/burst", post(burst))
        .route("/_sim/mailboxes/{email}/touch", post(touch))
        .route("/_sim/mailboxes/{email}/expire", post(expire))
        .route("/_sim/ledger", get(ledger))
        .route(
            "/_sim/faults",
            get(list_faults).post(add_fault).delete(clear_faults),
        )
        .route("/_sim/faults/{id}", delete(remove_fault))
        .route("/_sim/quota", post(set_quota))
        .route("/_sim/notify", post(set_notify))
        .route("/_sim/watch", post(set_watch))
        .route("/_sim/tokens/refresh", post(add_refresh))
        .route("/_sim/tokens/refresh/revoke", post(revoke_refresh))
        .route("/_sim/tokens/static", post(add_static))
        .route("/_sim/tokens/expire", post(expire_tokens))
        .route("/_sim/stats", get(stats))
}

struct CtlError(SimError);

impl IntoResponse for CtlError {
    fn into_response(self) -> Response {
        let code = match &self.0 {
            SimError::UnknownMailbox(_)
            | SimError::UnknownMessage(_)
            | SimError::UnknownThread(_) => StatusCode::NOT_FOUND,
            SimError::MailboxExists(_) => StatusCode::CONFLICT,
            SimError::Invalid(_) => StatusCode::BAD_REQUEST,
        };
        (code, Json(json!({"error": self.0.to_string()}))).into_response()
    }
}

impl From<SimError> for CtlError {
    fn from(e: SimError) -> Self {
        CtlError(e)
    }
}

type R = Result<Json<Value>, CtlError>;

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AddMailbox {
    email: String,
    history_id: Option<Value>,
}

fn u64_of(v: &Value) -> Result<u64, SimError> {
    match v {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
    .ok_or_else(|| SimError::Invalid(format!("not a u64: {v}")))
}

async fn add_mailbox(State(inner): S, Json(b): Json<AddMailbox>) -> R {
    let initial = b.history_id.as_ref().map(u64_of).transpose()?;
    let h = inner
        .state
        .lock()
        .expect("state")
        .add_mailbox(&b.email, initial)?;
    Ok(Json(json!({"email": b.email, "historyId": h.to_string()})))
}

async fn list_mailboxes(State(inner): S) -> R {
    let st = inner.state.lock().expect("state");
    let mut v: Vec<Value> = st
        .mailboxes
        .values()
        .map(|m| {
            json!({
                "email": m.email,
                "historyId": m.history_id.to_string(),
                "messagesTotal": m.messages.len(),
                "watchTopic": m.watch.as_ref().map(|w| w.topic.clone()),
                "watchExpiration": m.watch.as_ref().map(|w| w.expiration_ms.to_string()),
                "watchInProgress": m.watch_claim.is_some(),
            })
        })
        .collect();
    v.sort_by(|a, b| a["email"].as_str().cmp(&b["email"].as_str()));
    Ok(Json(Value::Array(v)))
}

async fn get_mailbox(State(inner): S, Path(email): Path<String>) -> R {
    let st = inner.state.lock().expect("state");
    let m = st.mailbox(&email)?;
    let messages: serde_json::Map<String, Value> = m
        .messages
        .iter()
        .map(|(id, msg)| (id.clone(), json!(msg.labels)))
        .collect();
    Ok(Json(json!({
        "email": m.email,
        "historyId": m.history_id.to_string(),
        "horizon": m.horizon.to_string(),
        "messages": messages,
        "watchTopic": m.watch.as_ref().map(|w| w.topic.clone()),
        "watchExpiration": m.watch.as_ref().map(|w| w.expiration_ms.to_string()),
        "watchInProgress": m.watch_claim.is_some(),
    })))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct DeliverBody {
    label_ids: Vec<String>,
    thread_id: Option<String>,
}

async fn deliver(State(inner): S, Path(email): Path<String>, body: Option<Json<DeliverBody>>) -> R {
    let b = body.map(|Json(b)| b).unwrap_or_default();
    let labels: Vec<&str> = if b.label_ids.is_empty() {
        vec!["INBOX", "UNREAD"]
    } else {
        b.label_ids.iter().map(String::as_str).collect()
    };
    let d = inner
        .state
        .lock()
        .expect("state")
        .deliver(&email, &labels, b.thread_id.as_deref())?;
    Ok(Json(json!(d)))
}

async fn delete_message(State(inner): S, Path((email, id)): Path<(String, String)>) -> R {
    let h = inner.state.lock().expect("state").delete(&email, &id)?;
    Ok(Json(json!({"historyId": h.to_string()})))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct ModifyBody {
    add_label_ids: Vec<String>,
    remove_label_ids: Vec<String>,
}

async fn modify(
    State(inner): S,
    Path((email, id)): Path<(String, String)>,
    Json(b): Json<ModifyBody>,
) -> R {
    let mut st = inner.state.lock().expect("state");
    let add: Vec<&str> = b.add_label_ids.iter().map(String::as_str).collect();
    let remove: Vec<&str> = b.remove_label_ids.iter().map(String::as_str).collect();
    let mut ids = Vec::new();
    if !add.is_empty() {
        ids.extend(st.add_labels(&email, &id, &add)?);
    }
    if !remove.is_empty() {
        ids.extend(st.remove_labels(&email, &id, &remove)?);
    }
    let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
    Ok(Json(json!({"historyIds": ids})))
}

#[derive(Deserialize)]
struct BurstBody {
    n: usize,
}

async fn burst(State(inner): S, Path(email): Path<String>, Json(b): Json<BurstBody>) -> R {
    let ids = inner.state.lock().expect("state").burst(&email, b.n)?;
    let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
    Ok(Json(json!({"historyIds": ids})))
}

async fn touch(State(inner): S, Path(email): Path<String>) -> R {
    let h = inner.state.lock().expect("state").touch(&email)?;
    Ok(Json(json!({"historyId": h.to_string()})))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct ExpireBody {
    up_to: Option<Value>,
}

async fn expire(State(inner): S, Path(email): Path<String>, body: Option<Json<ExpireBody>>) -> R {
    let b = body.map(|Json(b)| b).unwrap_or_default();
    let up_to = b.up_to.as_ref().map(u64_of).transpose()?;
    let mut st = inner.state.lock().expect("state");
    let m = st.mailbox_mut(&email)?;
    match up_to {
        Some(h) => m.expire_up_to(h),
        None => m.expire_all(),
    }
    Ok(Json(json!({"horizon": m.horizon.to_string()})))
}

async fn ledger(State(inner): S, Query(q): Query<HashMap<String, String>>) -> R {
    let from: usize = q.get("from").and_then(|f| f.parse().ok()).unwrap_or(0);
    let st = inner.state.lock().expect("state");
    let entries: &[LedgerEntry] = st.ledger.get(from..).unwrap_or(&[]);
    Ok(Json(json!({"entries": entries, "next": st.ledger.len()})))
}

async fn list_faults(State(inner): S) -> R {
    let rules = inner.faults.lock().expect("faults").list();
    let v: Vec<Value> = rules
        .into_iter()
        .map(|(id, r)| json!({"id": id, "rule": r}))
        .collect();
    Ok(Json(Value::Array(v)))
}

async fn add_fault(State(inner): S, Json(rule): Json<FaultRule>) -> R {
    let id = inner.faults.lock().expect("faults").add(rule);
    Ok(Json(json!({"id": id})))
}

async fn clear_faults(State(inner): S) -> R {
    inner.faults.lock().expect("faults").clear();
    Ok(Json(json!({})))
}

async fn remove_fault(State(inner): S, Path(id): Path<u64>) -> R {
    let removed = inner.faults.lock().expect("faults").remove(id);
    Ok(Json(json!({"removed": removed})))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct QuotaBody {
    #[serde(flatten)]
    quota: QuotaConfig,
    style: Option<QuotaErrorStyle>,
}

async fn set_quota(State(inner): S, Json(b): Json<QuotaBody>) -> R {
    inner.quota.lock().expect("quota").set_config(b.quota);
    if let Some(style) = b.style {
        inner.knobs.lock().expect("knobs").quota_style = style;
    }
    Ok(Json(json!({})))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct NotifyBody {
    drop_probability: Option<f64>,
    delay_ms: Option<(u64, u64)>,
    history_id_as_number: Option<bool>,
}

async fn set_notify(State(inner): S, Json(b): Json<NotifyBody>) -> R {
    let mut k = inner.knobs.lock().expect("knobs");
    if let Some(p) = b.drop_probability {
        k.drop_probability = p;
    }
    if let Some((lo, hi)) = b.delay_ms {
        k.delay = (hi > 0).then(|| (Duration::from_millis(lo), Duration::from_millis(hi)));
    }
    if let Some(n) = b.history_id_as_number {
        k.history_id_as_number = n;
    }
    Ok(Json(json!({})))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", default)]
struct WatchBody {
    processing_ms: Option<u64>,
}

async fn set_watch(State(inner): S, body: Option<Json<WatchBody>>) -> R {
    let b = body.map(|Json(b)| b).unwrap_or_default();
    let mut k = inner.knobs.lock().expect("knobs");
    if let Some(ms) = b.processing_ms {
        k.watch_processing = Duration::from_millis(ms);
    }
    Ok(Json(
        json!({"processingMs": k.watch_processing.as_millis() as u64}),
    ))
}

#[derive(Deserialize)]
struct TokenBody {
    token: String,
    email: Option<String>,
}

async fn add_refresh(State(inner): S, Json(b): Json<TokenBody>) -> Result<Json<Value>, CtlError> {
    let email = b
        .email
        .ok_or_else(|| SimError::Invalid("email is required".into()))?;
    inner
        .auth
        .lock()
        .expect("auth")
        .add_refresh_token(&b.token, &email);
    Ok(Json(json!({})))
}

async fn revoke_refresh(State(inner): S, Json(b): Json<TokenBody>) -> R {
    inner
        .auth
        .lock()
        .expect("auth")
        .revoke_refresh_token(&b.token);
    Ok(Json(json!({})))
}

async fn add_static(State(inner): S, Json(b): Json<TokenBody>) -> R {
    inner.auth.lock().expect("auth").add_static_token(&b.token);
    Ok(Json(json!({})))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ExpireTokensBody {
    email: Option<String>,
}

async fn expire_tokens(State(inner): S, body: Option<Json<ExpireTokensBody>>) -> R {
    let b = body.map(|Json(b)| b).unwrap_or_default();
    inner
        .auth
        .lock()
        .expect("auth")
        .expire_access_tokens(b.email.as_deref());
    Ok(Json(json!({})))
}

async fn stats(State(inner): S) -> R {
    let st = inner.state.lock().expect("state");
    let (mut changes, mut calls, mut notifications, mut units) = (0u64, 0u64, 0u64, 0u64);
    for e in &st.ledger {
        match e {
            LedgerEntry::Change(_) => changes += 1,
            LedgerEntry::Call(c) => {
                calls += 1;
                units += c.cost;
            }
            LedgerEntry::Notification(_) => notifications += 1,
        }
    }
    let tokens = inner.auth.lock().expect("auth").issued;
    Ok(Json(json!({
        "mailboxes": st.mailboxes.len(),
        "changes": changes,
        "calls": calls,
        "quotaUnits": units,
        "notifications": notifications,
        "notificationsSent": inner.notifications_sent.load(Ordering::Relaxed),
        "tokensIssued": tokens,
        "ledgerEntries": st.ledger.len(),
    })))
}
