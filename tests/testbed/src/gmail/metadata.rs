//! The metadata of simulated messages. A message's headers are a pure function of what the
//! ledger already records about it (mailbox, id, thread id, delivery time), so a check can
//! compute what gmail-sync must have written without asking the simulator (see
//! [`MessageMeta`], carried by the ledger's `messageAdded` entries).
//!
//! - `From: sender-<first 6 of thread>@example.com`, `To: <mailbox>`;
//! - `Cc: cc-<last 6 of id>@example.com` only when the id's last hex digit is even (so some
//!   messages lack a requested header);
//! - `Subject: Simulated thread <thread>, "quoted" — ü` (`Re: ` for replies: commas, quotes and
//!   UTF-8 on purpose);
//! - `Date`: the internal date, RFC 5322 (IMF-fixdate, `GMT`);
//! - `Message-ID: <<id>@gmail-sim.invalid>`; replies (id ≠ thread id) also
//!   `In-Reply-To: <<thread>@gmail-sim.invalid>` (the thread's first message);
//! - `Received: from sim.invalid by gmail-sim.invalid`, a header nobody asks for by default.

use serde::Serialize;
use std::time::{Duration, UNIX_EPOCH};

/// What `users.messages.get?format=metadata` answers for a message (all headers, in order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MessageMeta {
    pub headers: Vec<(String, String)>,
    pub snippet: String,
    pub size_estimate: u64,
    pub internal_date_ms: u64,
}

impl MessageMeta {
    /// The headers whose name is in `names` (case-insensitive), in message order, as
    /// `metadataHeaders` selects them.
    pub fn headers_named<'a>(
        &'a self,
        names: &'a [&str],
    ) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.headers
            .iter()
            .filter(|(n, _)| names.iter().any(|w| w.eq_ignore_ascii_case(n)))
            .map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// The value of header `name` (case-insensitive), if the message has it.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The headers of the simulated message `id` of thread `thread_id` in `email`'s mailbox,
/// delivered at `internal_date_ms` (see the module documentation).
pub fn simulated_headers(
    email: &str,
    id: &str,
    thread_id: &str,
    internal_date_ms: u64,
) -> Vec<(String, String)> {
    let reply = id != thread_id;
    let head = |s: &str, n: usize| s.chars().take(n).collect::<String>();
    let tail = |s: &str, n: usize| s[s.len().saturating_sub(n)..].to_string();
    let mut h: Vec<(String, String)> = vec![
        (
            "Received".into(),
            "from sim.invalid by gmail-sim.invalid".into(),
        ),
        (
            "From".into(),
            format!("sender-{}@example.com", head(thread_id, 6)),
        ),
        ("To".into(), email.to_string()),
    ];
    let even = id
        .chars()
        .last()
        .and_then(|c| c.to_digit(16))
        .is_some_and(|d| d % 2 == 0);
    if even {
        h.push(("Cc".into(), format!("cc-{}@example.com", tail(id, 6))));
    }
    h.push((
        "Subject".into(),
        format!(
            "{}Simulated thread {thread_id}, \"quoted\" — ü",
            if reply { "Re: " } else { "" }
        ),
    ));
    h.push((
        "Date".into(),
        httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_millis(internal_date_ms)),
    ));
    h.push(("Message-ID".into(), format!("<{id}@gmail-sim.invalid>")));
    if reply {
        h.push((
            "In-Reply-To".into(),
            format!("<{thread_id}@gmail-sim.invalid>"),
        ));
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_a_pure_function_of_the_message() {
        let a = simulated_headers(
            "a@x",
            "00000000000000a2",
            "00000000000000a2",
            1_700_000_000_000,
        );
        assert_eq!(
            a,
            simulated_headers(
                "a@x",
                "00000000000000a2",
                "00000000000000a2",
                1_700_000_000_000
            )
        );
        let names: Vec<&str> = a.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "Received",
                "From",
                "To",
                "Cc",
                "Subject",
                "Date",
                "Message-ID"
            ]
        );
        assert!(
            a.iter()
                .any(|(n, v)| n == "Date" && v == "Tue, 14 Nov 2023 22:13:20 GMT")
        );
        let r = simulated_headers("a@x", "00000000000000b3", "00000000000000a2", 0);
        let meta = MessageMeta {
            headers: r,
            snippet: String::new(),
            size_estimate: 0,
            internal_date_ms: 0,
        };
        assert_eq!(
            meta.header("in-reply-to"),
            Some("<00000000000000a2@gmail-sim.invalid>")
        );
        assert_eq!(meta.header("Cc"), None, "odd id: no Cc");
        assert!(meta.header("subject").unwrap().starts_with("Re: "));
        assert_eq!(meta.headers_named(&["to", "FROM"]).count(), 2);
    }
}
