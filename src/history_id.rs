//! Gmail historyIds: unsigned 64-bit, increasing but not contiguous.
//!
//! They are compared as integers here and as canonical decimal strings (length, then bytes) in
//! the Redis scripts: Lua numbers are doubles and lose precision above 2^53 (invariant I3).

use std::fmt;
use std::str::FromStr;

/// A Gmail historyId. `Display` gives the canonical decimal form (no sign, no leading zeros),
/// which is the only form ever written to Redis.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HistoryId(pub u64);

impl HistoryId {
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for HistoryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("historyId must be an unsigned 64-bit decimal integer, got {0:?}")]
pub struct InvalidHistoryId(pub String);

impl FromStr for HistoryId {
    type Err = InvalidHistoryId;

    /// Accepts only plain decimal digits: `u64::from_str` would also take a leading `+`. Any
    /// number of leading zeros, as `u64` does (a length limit here refused "000…0" of 21
    /// digits: found by fuzzing); the value, never the text, is written back.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(InvalidHistoryId(truncate(s)));
        }
        s.parse::<u64>()
            .map(HistoryId)
            .map_err(|_| InvalidHistoryId(truncate(s)))
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(32).collect()
}

/// Gmail documents historyId as a string but real notifications carry it as a JSON number too.
impl<'de> serde::Deserialize<'de> for HistoryId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = HistoryId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a historyId as a decimal string or an unsigned integer")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<HistoryId, E> {
                Ok(HistoryId(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<HistoryId, E> {
                u64::try_from(v)
                    .map(HistoryId)
                    .map_err(|_| E::custom("historyId is negative"))
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<HistoryId, E> {
                // A float cannot carry a historyId exactly above 2^53: refuse rather than guess.
                Err(E::custom("historyId is not an integer"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<HistoryId, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl serde::Serialize for HistoryId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_strings_and_numbers_exactly_beyond_2_pow_53() {
        let big = (1u64 << 53) + 1;
        let from_str: HistoryId = serde_json::from_str(&format!("\"{big}\"")).unwrap();
        let from_num: HistoryId = serde_json::from_str(&big.to_string()).unwrap();
        assert_eq!(from_str, HistoryId(big));
        assert_eq!(from_num, HistoryId(big));
        let max: HistoryId = serde_json::from_str(&format!("\"{}\"", u64::MAX)).unwrap();
        assert_eq!(max.get(), u64::MAX);
    }

    #[test]
    fn refuses_what_is_not_a_u64() {
        for bad in [
            "\"\"",
            "\"-1\"",
            "\"+5\"",
            "\"1.5\"",
            "1.5",
            "-3",
            "\"18446744073709551616\"",
            "\"12a\"",
            "null",
        ] {
            assert!(
                serde_json::from_str::<HistoryId>(bad).is_err(),
                "{bad} should be refused"
            );
        }
    }

    #[test]
    fn serializes_as_decimal_string() {
        assert_eq!(
            serde_json::to_string(&HistoryId(u64::MAX)).unwrap(),
            format!("\"{}\"", u64::MAX)
        );
    }

    // Fuzzing (issue 10): the parser every historyId passes through, from notifications, Gmail
    // answers and Redis. The Lua scripts' comparison is fuzzed against `u64` in the integration
    // tests (`store::fuzz_lua_history_id_comparison_agrees_with_u64`).
    mod fuzz {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn fuzz_from_str_takes_exactly_plain_u64_decimals(
                s in prop_oneof!["[0-9]{0,22}", "[-+ 0-9a-f.eE]{0,24}", ".{0,24}"],
            ) {
                let plain = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
                match (s.parse::<HistoryId>(), plain.then(|| s.parse::<u64>()).and_then(Result::ok)) {
                    (Ok(h), Some(n)) => prop_assert_eq!(h.get(), n),
                    (Err(_), None) => {}
                    (got, want) => prop_assert!(false, "{s:?}: parsed {got:?}, u64 says {want:?}"),
                }
            }

            #[test]
            fn fuzz_every_u64_round_trips_as_text_and_json(n in any::<u64>()) {
                let h = HistoryId(n);
                prop_assert_eq!(h.to_string().parse::<HistoryId>(), Ok(h));
                let as_string: HistoryId = serde_json::from_str(&serde_json::to_string(&h).unwrap()).unwrap();
                let as_number: HistoryId = serde_json::from_str(&n.to_string()).unwrap();
                prop_assert_eq!(as_string, h);
                prop_assert_eq!(as_number, h);
            }

            /// Canonical decimal strings order like the numbers: the rule the Lua scripts use
            /// (length first, then bytes).
            #[test]
            fn fuzz_canonical_text_orders_like_u64(a in any::<u64>(), b in any::<u64>()) {
                let (x, y) = (HistoryId(a).to_string(), HistoryId(b).to_string());
                prop_assert_eq!((x.len(), x.as_bytes()).cmp(&(y.len(), y.as_bytes())), a.cmp(&b));
            }
        }
    }
}
