//! Gmail's batch endpoint, `POST /batch/gmail/v1`: a `multipart/mixed` body of
//! `application/http` parts, each one an HTTP request (`GET /gmail/v1/users/{u}/messages/{id}?..`
//! is the one modelled); the answer is `multipart/mixed` too, one `application/http` part per
//! request, `Content-ID: <response-ID>` for a request part's `Content-ID: <ID>`, in request
//! order.
//!
//! Each part goes through the same pipeline as a direct call (auth → mailbox → concurrency →
//! fault → quota → handler → ledger: one [`super::CallEntry`] per part, `batch` set), with the
//! outer request's headers (Authorization) unless the part sets its own. Parts are answered one
//! after another, so a latency fault on one part delays the ones after it. The batch itself is
//! recorded as an [`Endpoint::Batch`] entry (free); fault rules that name [`Endpoint::Batch`]
//! answer for the whole batch. More than [`MAX_PARTS`] parts, no part, or a body that is not
//! `multipart/mixed` → 400 for the whole batch (nothing recorded per part).
//!
//! Not modelled: other methods inside a batch (a part for anything but `messages.get` answers
//! 404), request bodies in parts, nested batches, parallel processing of parts.

use super::Inner;
use super::errors::ApiError;
use super::faults::FaultAction;
use super::ledger::Endpoint;
use super::server::{Call, gate_in_batch, messages_get_inner};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Gmail's limit of calls per batch request.
pub const MAX_PARTS: usize = 100;

/// One request part as parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestPart {
    pub content_id: Option<String>,
    pub method: String,
    /// Path and query, as on the request line.
    pub target: String,
    pub headers: Vec<(String, String)>,
}

pub(crate) async fn batch(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let number = inner.batches.fetch_add(1, Ordering::Relaxed) + 1;
    let mut call = Call::new(&inner, Endpoint::Batch, super::server::bearer_of(&headers));
    call.batch = Some(number);
    let fault = inner
        .faults
        .lock()
        .expect("faults")
        .take_named(Endpoint::Batch);
    if let Some(action) = fault {
        call.faulted = true;
        match action {
            FaultAction::Latency { millis } => {
                tokio::time::sleep(Duration::from_millis(millis)).await
            }
            FaultAction::Hang => {
                inner.cancel.cancelled().await;
                return call.fail(ApiError::new(
                    503,
                    "global",
                    "backendError",
                    "gmail-sim shutting down",
                ));
            }
            other => return call.fail(other.api_error().expect("status action")),
        }
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let parts = match parse_request(content_type, &body) {
        Ok(p) => p,
        Err(e) => return call.fail(e),
    };
    let boundary = format!("batch_sim_{number:08}");
    let mut out = Vec::new();
    for part in &parts {
        let answer = answer_part(&inner, &headers, part, number).await;
        out.extend_from_slice(
            format!("--{boundary}\r\nContent-Type: application/http\r\n").as_bytes(),
        );
        if let Some(id) = &part.content_id {
            out.extend_from_slice(format!("Content-ID: <response-{id}>\r\n").as_bytes());
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&http_bytes(answer).await);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    call.finish(Ok((
        [(
            header::CONTENT_TYPE,
            format!("multipart/mixed; boundary={boundary}"),
        )],
        out,
    )
        .into_response()))
}

/// One part through the pipeline: a `messages.get`, or 404 for what is not modelled.
async fn answer_part(
    inner: &Arc<Inner>,
    outer: &HeaderMap,
    part: &RequestPart,
    batch: u64,
) -> Response {
    let mut headers = outer.clone();
    for (name, value) in &part.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::try_from(name.as_str()),
            HeaderValue::from_str(value),
        ) {
            headers.insert(n, v);
        }
    }
    let (path, query) = match part.target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (part.target.as_str(), None),
    };
    let segments: Vec<&str> = path.split('/').collect();
    let (user, id) = match (part.method.as_str(), segments.as_slice()) {
        ("GET", ["", "gmail", "v1", "users", user, "messages", id]) => {
            (percent_decode(user), percent_decode(id))
        }
        _ => return ApiError::new(404, "global", "notFound", "Not Found").into_response(),
    };
    let (call, email) =
        match gate_in_batch(inner, Endpoint::MessagesGet, &user, &headers, Some(batch)).await {
            Ok(c) => c,
            Err(r) => return r,
        };
    call.finish(messages_get_inner(inner, &email, &id, &query))
}

/// A response as the bytes of an `application/http` part: status line, the headers a client
/// reads (Content-Type, Retry-After, WWW-Authenticate), blank line, body.
async fn http_bytes(r: Response) -> Vec<u8> {
    let status = r.status();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    for name in [
        header::CONTENT_TYPE,
        header::RETRY_AFTER,
        header::WWW_AUTHENTICATE,
    ] {
        if let Some(v) = r.headers().get(&name).and_then(|v| v.to_str().ok()) {
            out.push_str(&format!("{}: {v}\r\n", canonical(&name)));
        }
    }
    out.push_str("\r\n");
    let body = axum::body::to_bytes(r.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&body);
    bytes
}

fn canonical(name: &HeaderName) -> &'static str {
    match name.as_str() {
        "content-type" => "Content-Type",
        "retry-after" => "Retry-After",
        _ => "WWW-Authenticate",
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `boundary` parameter of a `multipart/mixed` Content-Type (quoted or not).
pub fn boundary_of(content_type: &str) -> Option<String> {
    let mut params = content_type.split(';');
    let mime = params.next()?.trim();
    if !mime.eq_ignore_ascii_case("multipart/mixed") {
        return None;
    }
    params.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').to_string())
            .filter(|b| !b.is_empty())
    })
}

/// Parses a batch request body into its parts (CRLF or bare LF line ends).
pub fn parse_request(content_type: &str, body: &[u8]) -> Result<Vec<RequestPart>, ApiError> {
    let boundary = boundary_of(content_type).ok_or_else(|| {
        ApiError::invalid("gmail-sim: a batch request is multipart/mixed with a boundary")
    })?;
    let text = String::from_utf8_lossy(body);
    let text = text.replace("\r\n", "\n");
    let delimiter = format!("--{boundary}");
    let mut parts = Vec::new();
    let mut closed = false;
    // Everything before the first delimiter is preamble; a delimiter starts a line.
    let mut chunks = format!("\n{text}")
        .split(&format!("\n{delimiter}"))
        .map(str::to_string)
        .collect::<Vec<_>>()
        .into_iter();
    chunks.next();
    for chunk in chunks {
        if chunk.starts_with("--") {
            closed = true;
            break;
        }
        // The rest of the delimiter line (transport padding), then the part.
        let chunk = chunk.split_once('\n').map_or("", |(_, rest)| rest);
        let (part_headers, inner) = chunk.split_once("\n\n").unwrap_or((chunk, ""));
        let content_id = part_headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case("content-id").then(|| {
                v.trim()
                    .trim_start_matches('<')
                    .trim_end_matches('>')
                    .to_string()
            })
        });
        let mut lines = inner.lines();
        let request_line = lines.next().unwrap_or("").trim();
        let mut words = request_line.split_whitespace();
        let (Some(method), Some(target)) = (words.next(), words.next()) else {
            return Err(ApiError::invalid(format!(
                "gmail-sim: a batch part without a request line: {request_line:?}"
            )));
        };
        let headers = lines
            .take_while(|l| !l.trim().is_empty())
            .filter_map(|l| {
                l.split_once(':')
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            })
            .collect();
        parts.push(RequestPart {
            content_id,
            method: method.to_string(),
            target: target.to_string(),
            headers,
        });
    }
    if !closed {
        return Err(ApiError::invalid(
            "gmail-sim: the batch body does not end with its closing delimiter",
        ));
    }
    if parts.is_empty() {
        return Err(ApiError::invalid("gmail-sim: an empty batch request"));
    }
    if parts.len() > MAX_PARTS {
        return Err(ApiError::new(
            400,
            "global",
            "invalidArgument",
            format!(
                "Too many requests in batch: {} (at most {MAX_PARTS})",
                parts.len()
            ),
        ));
    }
    Ok(parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gmail_shaped_requests() {
        let body = "preamble\r\n--b1\r\nContent-Type: application/http\r\nContent-ID: <item-0>\r\n\r\n\
                    GET /gmail/v1/users/a%40x/messages/00000000000000a2?format=metadata HTTP/1.1\r\n\r\n\r\n\
                    --b1\nContent-Type: application/http\n\nGET /gmail/v1/users/me/messages/x\nAuthorization: Bearer t\n\n--b1--\r\n";
        let parts = parse_request("multipart/mixed; boundary=\"b1\"", body.as_bytes()).unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].content_id.as_deref(), Some("item-0"));
        assert_eq!(
            parts[0].target,
            "/gmail/v1/users/a%40x/messages/00000000000000a2?format=metadata"
        );
        assert_eq!(parts[1].content_id, None);
        assert_eq!(
            parts[1].headers,
            vec![("Authorization".to_string(), "Bearer t".to_string())]
        );
        assert_eq!(percent_decode("a%40x%2By"), "a@x+y");
        assert!(parse_request("application/json", body.as_bytes()).is_err());
        assert!(
            parse_request("multipart/mixed; boundary=b1", b"--b1--").is_err(),
            "no part"
        );
        let many: String = (0..=MAX_PARTS)
            .map(|_| "--b\r\n\r\nGET /x HTTP/1.1\r\n\r\n")
            .collect::<String>()
            + "--b--";
        assert_eq!(
            parse_request("multipart/mixed; boundary=b", many.as_bytes())
                .unwrap_err()
                .code,
            400
        );
    }
}
