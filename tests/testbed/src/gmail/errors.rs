//! Error bodies exactly as Google's front end writes them.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::time::{Duration, SystemTime};

/// The message Gmail answers to a second push client for one mailbox.
pub const WATCH_CONFLICT_MESSAGE: &str =
    "Only one user push notification client allowed per developer (call /stop then try again)";

/// The message of the 400 `failedPrecondition` for an account without Gmail.
pub const MAIL_SERVICE_NOT_ENABLED_MESSAGE: &str = "Mail service not enabled";

/// A Gmail API error: `{"error":{"code","message","errors":[{"message","domain","reason"}],"status"}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: u16,
    pub message: String,
    pub domain: String,
    pub reason: String,
    pub status: String,
    /// `Retry-After` header (seconds).
    pub retry_after: Option<u64>,
    /// Adds `location: Authorization` (auth errors) and a `WWW-Authenticate` header.
    pub auth_header: bool,
}

impl ApiError {
    pub fn new(code: u16, domain: &str, reason: &str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            domain: domain.to_string(),
            reason: reason.to_string(),
            status: status_for(code).to_string(),
            retry_after: None,
            auth_header: false,
        }
    }

    pub fn with_retry_after(mut self, secs: Option<u64>) -> Self {
        self.retry_after = secs;
        self
    }

    pub fn with_status(mut self, status: &str) -> Self {
        self.status = status.to_string();
        self
    }

    /// 400 `invalidArgument`.
    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(400, "global", "invalidArgument", message)
    }

    /// 404 `notFound` "Requested entity was not found." (stale history cursor, unknown message).
    pub fn not_found() -> Self {
        ApiError::new(404, "global", "notFound", "Requested entity was not found.")
    }

    /// 401 without credentials.
    pub fn login_required() -> Self {
        let mut e = ApiError::new(
            401,
            "global",
            "required",
            "Request is missing required authentication credential. Expected OAuth 2 access \
             token, login cookie or other valid authentication credential. See \
             https://developers.google.com/identity/sign-in/web/devconsole-project.",
        );
        e.auth_header = true;
        e
    }

    /// 401 for an unknown, revoked or expired access token.
    pub fn invalid_credentials() -> Self {
        let mut e = ApiError::new(
            401,
            "global",
            "authError",
            "Request had invalid authentication credentials. Expected OAuth 2 access token, \
             login cookie or other valid authentication credential. See \
             https://developers.google.com/identity/sign-in/web/devconsole-project.",
        );
        e.auth_header = true;
        e
    }

    /// 403 for a token of mailbox A used on mailbox B (what Gmail answers for delegation).
    pub fn delegation_denied(token_mailbox: &str) -> Self {
        ApiError::new(
            403,
            "global",
            "forbidden",
            format!("Delegation denied for {token_mailbox}"),
        )
    }

    /// 400 `failedPrecondition` "Mail service not enabled" (an account without Gmail).
    pub fn mail_service_not_enabled() -> Self {
        ApiError::new(
            400,
            "global",
            "failedPrecondition",
            MAIL_SERVICE_NOT_ENABLED_MESSAGE,
        )
        .with_status("FAILED_PRECONDITION")
    }

    /// 400 `failedPrecondition` "Only one user push notification client allowed per developer
    /// (call /stop then try again)": a `watch` racing another `watch` of the mailbox, or naming
    /// another topic than the mailbox's active watch. (The message and the 400 are field
    /// reports; the reason `failedPrecondition` / status `FAILED_PRECONDITION` is our best
    /// guess, not verified.)
    pub fn watch_conflict() -> Self {
        ApiError::new(400, "global", "failedPrecondition", WATCH_CONFLICT_MESSAGE)
            .with_status("FAILED_PRECONDITION")
    }

    /// 429 "Too many concurrent requests for user".
    pub fn too_many_concurrent() -> Self {
        ApiError::new(
            429,
            "global",
            "rateLimitExceeded",
            "Too many concurrent requests for user",
        )
    }

    /// A rate-limit refusal: 429 `rateLimitExceeded`, or 403 `userRateLimitExceeded` /
    /// `rateLimitExceeded`, with `Retry-After` and "Retry after <ISO time>" in the message.
    pub fn rate_limited(code: u16, reason: &str, retry_after: u64) -> Self {
        let what = match reason {
            "userRateLimitExceeded" => "User-rate limit exceeded.",
            "dailyLimitExceeded" => {
                "Quota exceeded for quota metric 'Queries' and limit 'Queries per day'."
            }
            _ => "Quota exceeded for quota metric 'Queries' and limit 'Queries per minute'.",
        };
        Self::rate_limited_saying(code, reason, what, retry_after)
    }

    /// The per-user minute spent, as Gmail's 429 says it: reason `rateLimitExceeded`, message
    /// "User-rate limit exceeded.  Retry after <time>".
    pub fn user_rate_limited(code: u16, retry_after: u64) -> Self {
        Self::rate_limited_saying(
            code,
            "rateLimitExceeded",
            "User-rate limit exceeded.",
            retry_after,
        )
    }

    fn rate_limited_saying(code: u16, reason: &str, what: &str, retry_after: u64) -> Self {
        let when = iso_time(SystemTime::now() + Duration::from_secs(retry_after));
        ApiError::new(
            code,
            "usageLimits",
            reason,
            format!("{what}  Retry after {when}"),
        )
        .with_retry_after(Some(retry_after))
    }

    pub fn body(&self) -> serde_json::Value {
        let mut item = json!({
            "message": self.message,
            "domain": self.domain,
            "reason": self.reason,
        });
        if self.auth_header {
            item["location"] = json!("Authorization");
            item["locationType"] = json!("header");
        }
        json!({"error": {
            "code": self.code,
            "message": self.message,
            "errors": [item],
            "status": self.status,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, json_body(&self.body())).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=UTF-8"),
        );
        if let Some(s) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.auth_header {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(
                    "Bearer realm=\"https://accounts.google.com/\", error=\"invalid_token\"",
                ),
            );
        }
        resp
    }
}

/// Google's canonical status name for an HTTP code.
pub fn status_for(code: u16) -> &'static str {
    match code {
        400 => "INVALID_ARGUMENT",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "NOT_FOUND",
        409 => "ABORTED",
        412 => "FAILED_PRECONDITION",
        429 => "RESOURCE_EXHAUSTED",
        499 => "CANCELLED",
        500 => "INTERNAL",
        501 => "NOT_IMPLEMENTED",
        502 | 503 => "UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        _ => "UNKNOWN",
    }
}

/// The default `reason` for an injected status.
pub fn default_reason(code: u16) -> (&'static str, &'static str, &'static str) {
    // (domain, reason, message)
    match code {
        400 => ("global", "badRequest", "Bad Request"),
        401 => ("global", "authError", "Invalid Credentials"),
        403 => ("global", "forbidden", "Forbidden"),
        404 => ("global", "notFound", "Requested entity was not found."),
        429 => ("global", "rateLimitExceeded", "Too many requests"),
        500 => ("global", "backendError", "Internal error encountered."),
        502 => ("global", "badGateway", "Bad Gateway"),
        503 => (
            "global",
            "backendError",
            "The service is currently unavailable.",
        ),
        504 => ("global", "backendError", "Deadline exceeded"),
        _ => ("global", "unknown", "Error"),
    }
}

/// An OAuth token-endpoint error: `{"error": "invalid_grant", "error_description": ".."}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthError {
    pub code: u16,
    pub error: String,
    pub description: String,
    pub retry_after: Option<u64>,
}

impl OAuthError {
    pub fn new(code: u16, error: &str, description: impl Into<String>) -> Self {
        OAuthError {
            code,
            error: error.to_string(),
            description: description.into(),
            retry_after: None,
        }
    }

    pub fn invalid_grant(description: impl Into<String>) -> Self {
        OAuthError::new(400, "invalid_grant", description)
    }

    pub fn invalid_request(description: impl Into<String>) -> Self {
        OAuthError::new(400, "invalid_request", description)
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code).unwrap_or(StatusCode::BAD_REQUEST);
        let body = json!({"error": self.error, "error_description": self.description});
        let mut resp = (status, json_body(&body)).into_response();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        if let Some(s) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        resp
    }
}

pub(crate) fn json_body(v: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec(v).expect("serializable")
}

/// A JSON 200 response.
pub(crate) fn json_ok(v: &impl serde::Serialize) -> Response {
    let mut resp = (StatusCode::OK, json_body(v)).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=UTF-8"),
    );
    resp
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-05-01T12:00:00.000Z`.
pub fn iso_time(t: SystemTime) -> String {
    let d = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// Howard Hinnant's days → (year, month, day).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_time_formats() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_777_636_800_123);
        assert_eq!(iso_time(t), "2026-05-01T12:00:00.123Z");
        assert_eq!(iso_time(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }
}
