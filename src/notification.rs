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

    // Fuzzing (issue 10): `decode` is the first code a hostile publisher's bytes reach.
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        /// Addresses as Gmail sends them: a local part, a dotted domain, any case.
        fn address() -> impl Strategy<Value = String> {
            (
                "[A-Za-z0-9._%+-]{1,40}",
                "[A-Za-z0-9-]{1,20}(\\.[A-Za-z0-9-]{1,10}){1,3}",
            )
                .prop_map(|(local, domain)| format!("{local}@{domain}"))
        }

        fn payload(email: &str, history_id: u64, as_number: bool) -> Vec<u8> {
            let email = serde_json::to_string(email).unwrap();
            if as_number {
                format!(r#"{{"emailAddress":{email},"historyId":{history_id}}}"#)
            } else {
                format!(r#"{{"emailAddress":{email},"historyId":"{history_id}"}}"#)
            }
            .into_bytes()
        }

        proptest! {
            #[test]
            fn fuzz_decode_never_panics_on_bytes(data in proptest::collection::vec(any::<u8>(), 0..6000)) {
                let result = decode(&data);
                if data.len() > MAX_NOTIFICATION_BYTES {
                    prop_assert_eq!(result, Err(Malformed::Oversize(data.len())));
                }
            }

            #[test]
            fn fuzz_well_formed_notifications_decode_exactly(
                email in address(),
                history_id in any::<u64>(),
                as_number in any::<bool>(),
            ) {
                let n = decode(&payload(&email, history_id, as_number)).unwrap();
                prop_assert_eq!(n.mailbox.as_str(), email.to_lowercase());
                prop_assert_eq!(n.history_id, HistoryId(history_id));
            }

            /// One byte of a real notification changed, dropped or duplicated: never a panic,
            /// and whatever still decodes names a valid mailbox.
            #[test]
            fn fuzz_mutated_notifications_never_panic(
                email in address(),
                history_id in any::<u64>(),
                at in any::<prop::sample::Index>(),
                byte in any::<u8>(),
                edit in 0..3u8,
            ) {
                let mut data = payload(&email, history_id, false);
                let i = at.index(data.len());
                match edit {
                    0 => data[i] = byte,
                    1 => { data.remove(i); }
                    _ => data.insert(i, byte),
                }
                if let Ok(n) = decode(&data) {
                    prop_assert_eq!(&Mailbox::parse(n.mailbox.as_str()).unwrap(), &n.mailbox);
                }
            }

            /// Any JSON object with the two keys holding any kind of value: a notification or
            /// a reason, and a reason never echoes the address it was given.
            #[test]
            fn fuzz_reasons_never_echo_the_address(
                email in address(),
                history_id in prop_oneof![
                    Just(serde_json::Value::Null),
                    any::<bool>().prop_map(serde_json::Value::from),
                    any::<i64>().prop_map(serde_json::Value::from),
                    any::<f64>().prop_map(serde_json::Value::from),
                    ".{0,30}".prop_map(serde_json::Value::from),
                ],
                email_kind in 0..4u8,
            ) {
                let email_value = match email_kind {
                    0 => serde_json::Value::from(email.clone()),
                    1 => serde_json::json!([email.clone()]),
                    2 => serde_json::json!({ "x": email.clone() }),
                    _ => serde_json::Value::from(format!("{email} {email}")),
                };
                let data = serde_json::json!({ "emailAddress": email_value, "historyId": history_id });
                if let Err(reason) = decode(data.to_string().as_bytes()) {
                    prop_assert!(!reason.to_string().contains(&email), "{}", reason);
                }
            }
        }
    }
}
