//! `users.messages.get` in batches: Gmail's batch endpoint (`POST /batch/gmail/v1`) takes a
//! `multipart/mixed` body of `application/http` parts, one request each, and answers
//! `multipart/mixed` with one `application/http` part per request, matched by `Content-ID`
//! (`<item-K>` → `<response-item-K>`). Each part counts as one call in Gmail's quota.
//!
//! Why by hand: the two formats are small (a boundary, a few header lines, a status line), the
//! tree has no multipart crate that writes `application/http` parts (`multer` is absent and
//! parses form-data only, `mime` only parses media types), and the parser below is pure
//! functions with their own tests (CRLF and bare LF, quoted boundaries, preamble and padding,
//! parts out of order, parts missing).
//!
//! Retries are per part: a round sends every message still pending (in batches of at most
//! [`BATCH_MAX_CALLS`]); parts answered 200 or 404 are done, parts answered 429/403 rate
//! limits/5xx (or lost with their whole batch) stay pending for the next round, after the
//! backoff of [`crate::retry::gmail_call`] (honouring the longest `Retry-After` seen). The
//! rounds share the client's attempt budget (`GMAIL_SYNC_GMAIL_MAX_ATTEMPTS`), so a message is
//! never fetched twice successfully and never retried forever.

use super::model::{FetchedMessage, MessageFormat, MessageMetadata};
use super::wire::{self, ErrorBody};
use super::{Attempt, GmailClient, GmailError, Method, REQUESTS_IN_TASK, classify};
use crate::auth::AccessToken;
use crate::mailbox::Mailbox;
use crate::telemetry::{Counters, StatusClass};
use rand::Rng;
use reqwest::StatusCode;
use std::time::Duration;

/// Calls per batch request. Gmail accepts 100 but advises against more than 50: the parts run
/// concurrently against the mailbox's per-user limits, so bigger batches draw more 429s.
pub(crate) const BATCH_MAX_CALLS: usize = 50;

impl GmailClient {
    /// The metadata of `ids` (one `users.messages.get` each, sent in batches), in the order of
    /// `ids`. A message Gmail answers 404 for is [`FetchedMessage::Gone`]. Fails only when a
    /// part fails for good, or is still failing after the attempt budget: then nothing is
    /// returned (the caller writes nothing half-enriched).
    pub async fn messages_metadata(
        &self,
        mailbox: &Mailbox,
        ids: &[String],
        format: &MessageFormat,
    ) -> Result<Vec<FetchedMessage>, GmailError> {
        // The whole batch paid in one go (one governor call); retried parts are not charged
        // again (Gmail does not charge the answers that make a retry).
        self.pay(
            mailbox,
            ids.len() as u64 * self.quota_units(Method::MessagesGet),
        )
        .await?;
        let mut results: Vec<Option<FetchedMessage>> = vec![None; ids.len()];
        let mut pending: Vec<usize> = (0..ids.len()).collect();
        let mut refreshed = false;
        let mut attempt = 0u32;
        while !pending.is_empty() {
            attempt += 1;
            let token = self.tokens.token(mailbox).await?;
            let mut still_pending = Vec::new();
            let mut retryable: Option<GmailError> = None;
            let mut retry_after: Option<Duration> = None;
            let mut rate_limited: Option<GmailError> = None;
            let mut unauthorized = false;
            for chunk in pending.chunks(BATCH_MAX_CALLS) {
                let targets: Vec<String> = chunk
                    .iter()
                    .map(|&i| self.message_target(mailbox, &ids[i], format))
                    .collect();
                let answers = match self.send_batch(&targets, &token).await {
                    Ok(answers) => answers,
                    Err(e) => vec![Err(e); chunk.len()],
                };
                for (&i, answer) in chunk.iter().zip(answers) {
                    match answer {
                        Ok(fetched) => results[i] = Some(fetched),
                        Err(Attempt::Unauthorized) => {
                            unauthorized = true;
                            still_pending.push(i);
                        }
                        Err(Attempt::Failed(e)) if e.is_retryable() => {
                            retry_after = retry_after.max(e.retry_after());
                            if matches!(e, GmailError::RateLimited { .. }) {
                                rate_limited = Some(e.clone());
                            }
                            retryable = Some(e);
                            still_pending.push(i);
                        }
                        Err(Attempt::Failed(e)) => return Err(e),
                    }
                }
            }
            pending = still_pending;
            if pending.is_empty() {
                break;
            }
            // Governor on: a rate-limited part defers the whole sync rather than sleeping here.
            if let Some(e) = &rate_limited
                && let Some(deferred) = self.defer_rate_limit(mailbox, e).await
            {
                return Err(deferred);
            }
            if unauthorized {
                if refreshed {
                    return Err(GmailError::Unauthorized);
                }
                // The token may have expired between cache check and use: refresh once.
                refreshed = true;
                self.tokens.invalidate(mailbox, &token);
                if retryable.is_none() {
                    attempt -= 1;
                    continue;
                }
            }
            let err = retryable.expect("pending parts failed retryably or unauthorized");
            if attempt >= self.max_attempts {
                return Err(err);
            }
            let delay = crate::retry::gmail_call(attempt, retry_after);
            tracing::debug!(
                attempt,
                parts = pending.len(),
                delay_ms = delay.as_millis() as u64,
                error = %err,
                "retrying failed parts of a Gmail batch"
            );
            tokio::time::sleep(delay).await;
        }
        Ok(results
            .into_iter()
            .map(|r| r.expect("every id answered"))
            .collect())
    }

    /// The request line target of one `messages.get`: path (mailbox percent-encoded as in
    /// direct calls) and query.
    fn message_target(&self, mailbox: &Mailbox, id: &str, format: &MessageFormat) -> String {
        let mut url = self.user_url(mailbox, "messages");
        url.path_segments_mut()
            .expect("checked at startup: an http(s) URL can be a base")
            .push(id);
        {
            let mut q = url.query_pairs_mut();
            match format {
                MessageFormat::Minimal => {
                    q.append_pair("format", "minimal");
                }
                MessageFormat::Metadata { headers } => {
                    q.append_pair("format", "metadata");
                    for h in headers.iter() {
                        q.append_pair("metadataHeaders", h);
                    }
                }
            }
        }
        format!("{}?{}", url.path(), url.query().unwrap_or_default())
    }

    /// One batch request: an answer per target, in order. `Err` for the whole batch when the
    /// request itself failed (every part is then retried).
    async fn send_batch(
        &self,
        targets: &[String],
        token: &AccessToken,
    ) -> Result<Vec<Result<FetchedMessage, Attempt>>, Attempt> {
        let n = targets.len() as u64;
        Counters::add(&self.counters.gmail_calls, n);
        Counters::add(
            &self.counters.gmail_quota_units,
            n * self.quota_units(Method::MessagesGet),
        );
        self.counters.gmail.spent(
            Method::MessagesGet,
            n * self.quota_units(Method::MessagesGet),
        );
        // Every part is counted once by the class of its own answer, or of the batch's when the
        // batch itself failed (`none`: no answer at all).
        let answered = |class: StatusClass, parts: u64| {
            self.counters
                .gmail
                .answered(Method::MessagesGet, class, parts)
        };
        let _ = REQUESTS_IN_TASK.try_with(|c| c.set(c.get() + n as u32));
        let boundary = fresh_boundary(targets);
        let response = self
            .http
            .post(self.batch_url.clone())
            .header(reqwest::header::AUTHORIZATION, token.authorization())
            .header(
                reqwest::header::CONTENT_TYPE,
                format!("multipart/mixed; boundary={boundary}"),
            )
            .body(request_body(&boundary, targets))
            .send()
            .await
            .inspect_err(|_| answered(StatusClass::NoAnswer, n))
            .map_err(|e| self.transient(format!("batch: {}", e.without_url())))?;
        let status = response.status();
        let content_type = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let header_retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(super::parse_retry_after_header);
        let body = response
            .bytes()
            .await
            .inspect_err(|_| answered(StatusClass::of(status.as_u16()), n))
            .map_err(|e| self.transient(format!("reading batch body: {}", e.without_url())))?;
        if !status.is_success() {
            answered(StatusClass::of(status.as_u16()), n);
            return Err(self.failed_answer(status, header_retry_after, &body));
        }
        let parts = parse_response(&content_type, &body)
            .inspect_err(|_| answered(StatusClass::NoAnswer, n))
            .map_err(|e| self.transient(format!("undecodable batch response: {e}")))?;
        let mut answers: Vec<Option<ResponsePart>> = (0..targets.len()).map(|_| None).collect();
        for part in parts {
            if let Some(slot) = part.index.and_then(|k| answers.get_mut(k)) {
                *slot = Some(part);
            }
        }
        Ok(answers
            .into_iter()
            .map(|part| match part {
                None => {
                    answered(StatusClass::NoAnswer, 1);
                    Err(self.transient("batch response lacks a part".into()))
                }
                Some(p) => {
                    answered(StatusClass::of(p.status), 1);
                    self.part_outcome(p)
                }
            })
            .collect())
    }

    fn part_outcome(&self, part: ResponsePart) -> Result<FetchedMessage, Attempt> {
        let status = StatusCode::from_u16(part.status).unwrap_or(StatusCode::BAD_GATEWAY);
        if status.is_success() {
            return serde_json::from_str::<wire::Message>(&part.body)
                .map(|m| FetchedMessage::Found(MessageMetadata::from(m)))
                .map_err(|e| {
                    Attempt::Failed(GmailError::Permanent {
                        status: part.status,
                        reason: "undecodableResponse".into(),
                        message: e.to_string(),
                    })
                });
        }
        if status == StatusCode::NOT_FOUND {
            return Ok(FetchedMessage::Gone);
        }
        Err(self.failed_answer(status, part.retry_after, part.body.as_bytes()))
    }

    fn transient(&self, detail: String) -> Attempt {
        Counters::inc(&self.counters.gmail_transient_errors);
        Attempt::Failed(GmailError::Transient {
            detail,
            retry_after: None,
        })
    }

    /// An error answer (a whole response or one part): classified, and counted.
    pub(super) fn failed_answer(
        &self,
        status: StatusCode,
        header_retry_after: Option<Duration>,
        body: &[u8],
    ) -> Attempt {
        let detail = serde_json::from_slice::<ErrorBody>(body)
            .unwrap_or_default()
            .error;
        let err = classify(status, detail.reason(), &detail.message, header_retry_after);
        match err {
            None => Attempt::Unauthorized,
            Some(e) => {
                match &e {
                    GmailError::RateLimited { .. } => {
                        Counters::inc(&self.counters.gmail_rate_limited)
                    }
                    GmailError::Transient { .. } => {
                        Counters::inc(&self.counters.gmail_transient_errors)
                    }
                    _ => {}
                }
                Attempt::Failed(e)
            }
        }
    }
}

/// A boundary that none of the request's lines contains (random: 96 bits).
fn fresh_boundary(targets: &[String]) -> String {
    loop {
        let boundary = format!("batch_{:024x}", rand::rng().random::<u128>() >> 32);
        if !targets.iter().any(|t| t.contains(&boundary)) {
            return boundary;
        }
    }
}

/// The multipart body: one `application/http` part per target, `Content-ID: <item-K>`.
fn request_body(boundary: &str, targets: &[String]) -> Vec<u8> {
    let mut body = String::with_capacity(targets.len() * 200);
    for (k, target) in targets.iter().enumerate() {
        // The part's content is the whole request: request line and the blank line ending its
        // (empty) header section; the CRLF before the next delimiter belongs to the delimiter.
        body.push_str(&format!(
            "--{boundary}\r\nContent-Type: application/http\r\nContent-ID: <item-{k}>\r\n\r\n\
             GET {target} HTTP/1.1\r\n\r\n\r\n"
        ));
    }
    body.push_str(&format!("--{boundary}--\r\n"));
    body.into_bytes()
}

/// One `application/http` part of a batch answer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ResponsePart {
    /// K of `Content-ID: <response-item-K>`; `None` when absent or not ours.
    index: Option<usize>,
    status: u16,
    retry_after: Option<Duration>,
    body: String,
}

/// The `boundary` parameter of a `multipart/*` Content-Type, quoted or not.
fn boundary_of(content_type: &str) -> Option<&str> {
    let mut params = content_type.split(';');
    let media = params.next()?.trim();
    if !media.to_ascii_lowercase().starts_with("multipart/") {
        return None;
    }
    params.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v);
        (k.trim().eq_ignore_ascii_case("boundary") && !v.is_empty()).then_some(v)
    })
}

/// Parses a batch answer into its parts. Lines may end in CRLF (as Gmail writes them) or LF.
fn parse_response(content_type: &str, body: &[u8]) -> Result<Vec<ResponsePart>, String> {
    let boundary = boundary_of(content_type)
        .ok_or_else(|| format!("not multipart with a boundary: {content_type:?}"))?;
    let text = std::str::from_utf8(body).map_err(|e| e.to_string())?;
    // JSON bodies hold no raw line breaks inside strings, so unifying line ends is safe.
    let text = format!("\n{}", text.replace("\r\n", "\n"));
    let delimiter = format!("\n--{boundary}");
    let mut chunks = text.split(delimiter.as_str());
    chunks.next(); // the preamble
    let mut parts = Vec::new();
    for chunk in chunks {
        if chunk.starts_with("--") {
            return Ok(parts);
        }
        // The rest of the delimiter line is transport padding.
        let (_, part) = chunk.split_once('\n').unwrap_or((chunk, ""));
        let (part_headers, http) = part
            .split_once("\n\n")
            .ok_or("a part without a blank line after its headers")?;
        let index = header(part_headers, "content-id").and_then(|v| {
            v.trim_start_matches('<')
                .trim_end_matches('>')
                .strip_prefix("response-item-")?
                .parse()
                .ok()
        });
        let (head, body) = http.split_once("\n\n").unwrap_or((http, ""));
        let (status_line, inner_headers) = head.split_once('\n').unwrap_or((head, ""));
        let status = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .filter(|_| status_line.starts_with("HTTP/"))
            .ok_or_else(|| format!("a part without a status line: {status_line:?}"))?;
        parts.push(ResponsePart {
            index,
            status,
            retry_after: header(inner_headers, "retry-after")
                .and_then(super::parse_retry_after_header),
            body: body.to_string(),
        });
    }
    Err("no closing delimiter".into())
}

/// The value of header `name` (case-insensitive) in a block of header lines.
fn header<'a>(lines: &'a str, name: &str) -> Option<&'a str> {
    lines.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch answer as Gmail writes it (headers and bodies from a real exchange, ids and
    /// addresses changed): CRLF, a quoted boundary in the Content-Type, parts out of order.
    const GMAIL_ANSWER: &str = "--batch_x7Kq2hJ0bzQ_ABQEJmT1RWg\r\n\
Content-Type: application/http\r\n\
Content-ID: <response-item-1>\r\n\
\r\n\
HTTP/1.1 404 Not Found\r\n\
Content-Type: application/json; charset=UTF-8\r\n\
Vary: Origin\r\n\
Vary: X-Origin\r\n\
\r\n\
{\r\n  \"error\": {\r\n    \"code\": 404,\r\n    \"message\": \"Requested entity was not found.\",\r\n    \"errors\": [\r\n      {\r\n        \"message\": \"Requested entity was not found.\",\r\n        \"domain\": \"global\",\r\n        \"reason\": \"notFound\"\r\n      }\r\n    ],\r\n    \"status\": \"NOT_FOUND\"\r\n  }\r\n}\r\n\
--batch_x7Kq2hJ0bzQ_ABQEJmT1RWg\r\n\
Content-Type: application/http\r\n\
Content-ID: <response-item-0>\r\n\
\r\n\
HTTP/1.1 200 OK\r\n\
Content-Type: application/json; charset=UTF-8\r\n\
\r\n\
{\r\n  \"id\": \"18c2a\",\r\n  \"threadId\": \"18c2a\",\r\n  \"labelIds\": [\"INBOX\"],\r\n  \"snippet\": \"Hello\",\r\n  \"payload\": {\r\n    \"mimeType\": \"multipart/alternative\",\r\n    \"headers\": [\r\n      {\"name\": \"From\", \"value\": \"Ann <ann@example.com>\"},\r\n      {\"name\": \"Subject\", \"value\": \"Lunch, \\\"maybe\\\"\"}\r\n    ]\r\n  },\r\n  \"sizeEstimate\": 4321,\r\n  \"historyId\": \"123\",\r\n  \"internalDate\": \"1700000000000\"\r\n}\r\n\
--batch_x7Kq2hJ0bzQ_ABQEJmT1RWg\r\n\
Content-Type: application/http\r\n\
Content-ID: <response-item-2>\r\n\
\r\n\
HTTP/1.1 429 Too Many Requests\r\n\
Content-Type: application/json; charset=UTF-8\r\n\
Retry-After: 7\r\n\
\r\n\
{\"error\":{\"code\":429,\"message\":\"Too many concurrent requests for user\",\"errors\":[{\"reason\":\"rateLimitExceeded\"}]}}\r\n\
--batch_x7Kq2hJ0bzQ_ABQEJmT1RWg--\r\n";

    const GMAIL_CONTENT_TYPE: &str = "multipart/mixed; boundary=\"batch_x7Kq2hJ0bzQ_ABQEJmT1RWg\"";

    #[test]
    fn parses_a_gmail_batch_answer() {
        let parts = parse_response(GMAIL_CONTENT_TYPE, GMAIL_ANSWER.as_bytes()).unwrap();
        let seen: Vec<(Option<usize>, u16)> = parts.iter().map(|p| (p.index, p.status)).collect();
        assert_eq!(seen, [(Some(1), 404), (Some(0), 200), (Some(2), 429)]);
        assert_eq!(parts[2].retry_after, Some(Duration::from_secs(7)));
        let m: wire::Message = serde_json::from_str(&parts[1].body).unwrap();
        let m = MessageMetadata::from(m);
        assert_eq!(
            m.headers,
            [
                ("From".to_string(), "Ann <ann@example.com>".to_string()),
                ("Subject".to_string(), "Lunch, \"maybe\"".to_string())
            ]
        );
        assert_eq!(
            (m.size_estimate, m.internal_date_ms),
            (4321, 1_700_000_000_000)
        );
        let e: ErrorBody = serde_json::from_str(&parts[0].body).unwrap();
        assert_eq!(e.error.reason(), "notFound");
    }

    #[test]
    fn parses_bare_lf_preamble_padding_and_unquoted_boundaries() {
        let body = "This is a preamble.\n--b1  \nContent-ID: <response-item-3>\n\nHTTP/1.1 500 Internal Server Error\n\n{}\n--b1\nContent-Type: application/http\n\nHTTP/1.1 200 OK\n\n{\"snippet\":\"x\"}\n--b1--\nepilogue";
        let parts = parse_response(
            "multipart/mixed; charset=utf-8; boundary=b1",
            body.as_bytes(),
        )
        .unwrap();
        assert_eq!(parts.len(), 2);
        assert_eq!((parts[0].index, parts[0].status), (Some(3), 500));
        assert_eq!(parts[0].body, "{}");
        assert_eq!((parts[1].index, parts[1].status), (None, 200));
        assert_eq!(parts[1].body, "{\"snippet\":\"x\"}");
    }

    #[test]
    fn refuses_what_is_not_a_batch_answer() {
        assert!(parse_response("application/json", b"{}").is_err());
        assert!(
            parse_response("multipart/mixed", b"--x--").is_err(),
            "no boundary"
        );
        assert!(
            parse_response(
                "multipart/mixed; boundary=x",
                b"--x\r\n\r\nHTTP/1.1 200 OK\r\n\r\n{}"
            )
            .is_err(),
            "cut short: no closing delimiter"
        );
        assert!(
            parse_response(
                "multipart/mixed; boundary=x",
                b"--x\r\n\r\ngarbage\r\n\r\n--x--"
            )
            .is_err()
        );
        assert_eq!(
            boundary_of("Multipart/Mixed; Boundary=\"a b\""),
            Some("a b")
        );
        assert_eq!(boundary_of("multipart/mixed; boundary=\"\""), None);
    }

    #[test]
    fn request_body_round_trips_through_the_simulator_shape() {
        let targets = vec![
            "/gmail/v1/users/a%40x.com/messages/1?format=minimal".to_string(),
            "/gmail/v1/users/a%40x.com/messages/2?format=metadata&metadataHeaders=From".to_string(),
        ];
        let boundary = fresh_boundary(&targets);
        let body = String::from_utf8(request_body(&boundary, &targets)).unwrap();
        assert!(body.starts_with(&format!("--{boundary}\r\nContent-Type: application/http\r\nContent-ID: <item-0>\r\n\r\nGET /gmail/v1/users/a%40x.com/messages/1?format=minimal HTTP/1.1\r\n\r\n")));
        assert!(body.contains("Content-ID: <item-1>\r\n\r\nGET /gmail/v1/users/a%40x.com/messages/2?format=metadata&metadataHeaders=From HTTP/1.1\r\n"));
        assert!(body.ends_with(&format!("\r\n--{boundary}--\r\n")));
        assert_eq!(body.matches(&format!("--{boundary}\r\n")).count(), 2);
    }

    // Fuzzing (issue 10): the hand-written multipart parser reads whatever a proxy or Gmail
    // answers; it must never panic, and must read back every answer written as Gmail writes it.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        struct Written {
            index: Option<usize>,
            status: u16,
            retry_after_s: Option<u64>,
            body: String,
        }

        fn part() -> impl Strategy<Value = Written> {
            (
                proptest::option::of(0usize..100),
                100u16..600,
                proptest::option::of(0u64..100_000),
                "[ -~\n]{0,120}",
            )
                .prop_map(|(index, status, retry_after_s, body)| Written {
                    index,
                    status,
                    retry_after_s,
                    body,
                })
        }

        fn render(boundary: &str, parts: &[Written], line_end: &str, preamble: &str) -> String {
            let mut out = String::from(preamble);
            if !preamble.is_empty() {
                out.push_str(line_end);
            }
            for p in parts {
                out.push_str(&format!(
                    "--{boundary}{line_end}Content-Type: application/http{line_end}"
                ));
                if let Some(k) = p.index {
                    out.push_str(&format!("Content-ID: <response-item-{k}>{line_end}"));
                }
                out.push_str(&format!(
                    "{line_end}HTTP/1.1 {} Whatever{line_end}",
                    p.status
                ));
                out.push_str(&format!(
                    "Content-Type: application/json; charset=UTF-8{line_end}"
                ));
                if let Some(s) = p.retry_after_s {
                    out.push_str(&format!("Retry-After: {s}{line_end}"));
                }
                out.push_str(line_end);
                out.push_str(&p.body.replace('\n', line_end));
                out.push_str(line_end);
            }
            out.push_str(&format!("--{boundary}--{line_end}"));
            out
        }

        proptest! {
            #[test]
            fn fuzz_written_answers_read_back_exactly(
                boundary in "[A-Za-z0-9_'()+,./:=?-]{1,40}",
                parts in proptest::collection::vec(part(), 0..8),
                crlf in any::<bool>(),
                quoted in any::<bool>(),
                preamble in "[ -~]{0,40}",
            ) {
                let delimiter = format!("\n--{boundary}");
                prop_assume!(parts.iter().all(|p| !format!("\n{}", p.body).contains(&delimiter)));
                prop_assume!(!format!("\n{preamble}").contains(&delimiter));
                let content_type = if quoted {
                    format!("multipart/mixed; boundary=\"{boundary}\"")
                } else {
                    format!("multipart/mixed; boundary={boundary}")
                };
                let text = render(&boundary, &parts, if crlf { "\r\n" } else { "\n" }, &preamble);
                let read = parse_response(&content_type, text.as_bytes()).unwrap();
                prop_assert_eq!(read.len(), parts.len());
                for (r, w) in read.iter().zip(&parts) {
                    prop_assert_eq!(r.index, w.index);
                    prop_assert_eq!(r.status, w.status);
                    prop_assert_eq!(r.retry_after, w.retry_after_s.map(Duration::from_secs));
                    prop_assert_eq!(&r.body, &w.body);
                }
            }

            #[test]
            fn fuzz_any_answer_is_parsed_or_refused_never_a_panic(
                content_type in prop_oneof![
                    ".{0,60}",
                    "multipart/[a-z]{0,8}; *boundary=\"?[ -~]{0,12}\"?(; *[a-z]{1,6}=[ -~]{0,8})?",
                ],
                body in proptest::collection::vec(any::<u8>(), 0..2000),
            ) {
                let _ = parse_response(&content_type, &body);
            }

            /// A real answer cut, spliced or with a byte changed: parsed or refused.
            #[test]
            fn fuzz_damaged_gmail_answers_never_panic(
                at in any::<prop::sample::Index>(),
                len in 0usize..64,
                byte in any::<u8>(),
                edit in 0..3u8,
            ) {
                let mut data = GMAIL_ANSWER.as_bytes().to_vec();
                let i = at.index(data.len());
                match edit {
                    0 => data.truncate(i),
                    1 => { data.drain(i..(i + len).min(data.len())); }
                    _ => data[i] = byte,
                }
                let _ = parse_response(GMAIL_CONTENT_TYPE, &data);
            }
        }
    }
}
