//! Decoding of Gmail push notifications as they arrive over StreamingPull.
//!
//! Over gRPC `Message::data` is the raw JSON `{"emailAddress": "...", "historyId": "..."}`
//! (base64 exists only in push envelopes). Anything else is [`Malformed`]: the consumer acks it
//! and copies its first bytes, with the reason, to the quarantine stream (invariant I6).

use crate::history_id::HistoryId;
use crate::mailbox::Mailbox;

/// Larger payloads are refused before parsing; a real notification is under 200 bytes.
pub const MAX_NOTIFICATION_BYTES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub mailbox: Mailbox,
    pub history_id: HistoryId,
}

/// Why a message is not a notification. The text is stored in the quarantine stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("payload of {0} bytes exceeds {MAX_NOTIFICATION_BYTES}")]
    Oversize(usize),
    #[error("payload is not a JSON notification: {0}")]
    NotJson(String),
    #[error("missing field {0}")]
    MissingField(&'static str),
    #[error("bad historyId: {0}")]
    BadHistoryId(String),
    #[error("bad emailAddress: {0}")]
    BadEmail(String),
}

pub fn decode(data: &[u8]) -> Result<Notification, Malformed> {
    if data.len() > MAX_NOTIFICATION_BYTES {
        return Err(Malformed::Oversize(data.len()));
    }
    // An object is required (serde would also map a JSON array onto a struct).
    let mut wire: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(data).map_err(|e| Malformed::NotJson(e.to_string()))?;
    let email = match wire.remove("emailAddress") {
        None | Some(serde_json::Value::Null) => {
            return Err(Malformed::MissingField("emailAddress"));
        }
        Some(serde_json::Value::String(s)) => s,
        // The value is not echoed: the reason is logged, and it could hold an address.
        Some(other) => {
            return Err(Malformed::BadEmail(format!(
                "not a string but {}",
                json_kind(&other)
            )));
        }
    };
    let history_id = match wire.remove("historyId") {
        None | Some(serde_json::Value::Null) => return Err(Malformed::MissingField("historyId")),
        Some(v) => serde_json::from_value::<HistoryId>(v)
            .map_err(|e| Malformed::BadHistoryId(e.to_string()))?,
    };
    let mailbox = Mailbox::parse(&email).map_err(|e| Malformed::BadEmail(e.0.to_string()))?;
    Ok(Notification {
        mailbox,
        history_id,
    })
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_string_and_number_history_ids() {
        let a = decode(br#"{"emailAddress":"User@x.com","historyId":"9007199254740993"}"#).unwrap();
        assert_eq!(a.mailbox.as_str(), "user@x.com");
        assert_eq!(a.history_id, HistoryId(9_007_199_254_740_993));
        let b = decode(br#"{"emailAddress":"user@x.com","historyId":9007199254740993}"#).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn classifies_bad_input() {
        assert!(matches!(decode(b"not json"), Err(Malformed::NotJson(_))));
        assert!(matches!(decode(b"[1,2]"), Err(Malformed::NotJson(_))));
        assert!(matches!(
            decode(br#"{"historyId":"1"}"#),
            Err(Malformed::MissingField("emailAddress"))
        ));
        assert!(matches!(
            decode(br#"{"emailAddress":"a@b.c"}"#),
            Err(Malformed::MissingField("historyId"))
        ));
        assert!(matches!(
            decode(br#"{"emailAddress":"nope","historyId":"1"}"#),
            Err(Malformed::BadEmail(_))
        ));
        assert!(matches!(
            decode(br#"{"emailAddress":"a@b.c","historyId":"-1"}"#),
            Err(Malformed::BadHistoryId(_))
        ));
        assert!(matches!(
            decode(br#"{"emailAddress":"a@b.c","historyId":1.5}"#),
            Err(Malformed::BadHistoryId(_))
        ));
        let big = vec![b' '; MAX_NOTIFICATION_BYTES + 1];
        assert!(matches!(decode(&big), Err(Malformed::Oversize(_))));
        let e = decode(br#"{"emailAddress":{"x":"alice@example.com"},"historyId":"1"}"#);
        let reason = e.unwrap_err().to_string();
        assert!(!reason.contains("alice"), "{reason}");
    }
}
