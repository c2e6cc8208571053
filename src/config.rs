//! The one typed configuration, loaded from environment variables and validated once, before
//! anything starts. A bad or missing variable stops startup with a message naming the variable
//! and what is expected.
//!
//! [`VARIABLES`] is the single list of variables: `--help` prints it and a test checks that
//! README.md documents every entry.

use std::fmt;
use std::time::Duration;

/// One environment variable: name, meaning, default ("" = required or unset), example.
pub struct Variable {
    pub name: &'static str,
    pub meaning: &'static str,
    pub default: &'static str,
    pub example: &'static str,
}

const fn var(
    name: &'static str,
    meaning: &'static str,
    default: &'static str,
    example: &'static str,
) -> Variable {
    Variable {
        name,
        meaning,
        default,
        example,
    }
}

pub const VARIABLES: &[Variable] = &[
    var(
        "GMAIL_SYNC_SUBSCRIPTION",
        "Pub/Sub subscription the worker pulls Gmail notifications from (required by `run`)",
        "",
        "projects/acme/subscriptions/gmail-sync",
    ),
    var(
        "GMAIL_SYNC_TOPIC",
        "Pub/Sub topic Gmail publishes to; passed to users.watch (required by `mailbox add`)",
        "",
        "projects/acme/topics/gmail-push",
    ),
    var(
        "GMAIL_SYNC_REDIS_URL",
        "Redis URL (single node); ignored when GMAIL_SYNC_REDIS_CLUSTER_NODES is set",
        "redis://127.0.0.1:6379/",
        "rediss://:password@redis.internal:6380/0",
    ),
    var(
        "GMAIL_SYNC_REDIS_CLUSTER_NODES",
        "Comma-separated Redis Cluster seed nodes; enables cluster mode",
        "",
        "redis://10.0.0.1:6379,redis://10.0.0.2:6379",
    ),
    var(
        "GMAIL_SYNC_KEY_PREFIX",
        "Prefix of every Redis key, so several deployments can share one Redis (letters, digits, - _ . :)",
        "gmail-sync",
        "prod-eu",
    ),
    var(
        "GMAIL_SYNC_SHARDS",
        "Number of change-stream shards (1-1024); fixed for the life of a deployment",
        "16",
        "64",
    ),
    var(
        "GMAIL_SYNC_STREAM_MAXLEN",
        "Approximate cap (XADD MAXLEN ~) of each shard's change stream",
        "1000000",
        "200000",
    ),
    var(
        "GMAIL_SYNC_QUARANTINE_MAXLEN",
        "Approximate cap of the quarantine stream of malformed notifications",
        "100000",
        "10000",
    ),
    var(
        "GMAIL_SYNC_GMAIL_API_URL",
        "Base URL of the Gmail API (tests point it at the simulator)",
        "https://gmail.googleapis.com",
        "http://127.0.0.1:8085",
    ),
    var(
        "GMAIL_SYNC_DEV_ACCESS_TOKEN",
        "DEVELOPMENT ONLY: a static OAuth access token used for every mailbox",
        "",
        "ya29.dev-token",
    ),
    var(
        "GMAIL_SYNC_MAX_CONCURRENT_SYNCS",
        "Mailbox syncs running at once in one process",
        "64",
        "128",
    ),
    var(
        "GMAIL_SYNC_MAX_OUTSTANDING_MESSAGES",
        "Pub/Sub flow control: messages leased and not yet acked, per process",
        "1000",
        "2000",
    ),
    var(
        "GMAIL_SYNC_ACK_EXTENSION_SECS",
        "Ack deadline the client asks for and keeps extending (10-600)",
        "60",
        "30",
    ),
    var(
        "GMAIL_SYNC_MAX_LEASE_SECS",
        "Longest a message is held before Pub/Sub may redeliver it (60-3600)",
        "600",
        "1200",
    ),
    var(
        "GMAIL_SYNC_SHUTDOWN_TIMEOUT_SECS",
        "On SIGTERM, how long in-flight syncs may finish before the rest is nacked",
        "30",
        "20",
    ),
    var(
        "GMAIL_SYNC_MAILBOX_LEASE_MS",
        "TTL of the per-mailbox Redis lease (renewed every third of it while syncing)",
        "30000",
        "60000",
    ),
    var(
        "GMAIL_SYNC_HISTORY_PAGE_SIZE",
        "maxResults of users.history.list (1-500)",
        "500",
        "100",
    ),
    var(
        "GMAIL_SYNC_RESYNC_MAX_MESSAGES",
        "Messages listed by a full resync after Gmail answered 404 (newest first)",
        "1000",
        "5000",
    ),
    var(
        "GMAIL_SYNC_GMAIL_TIMEOUT_SECS",
        "Timeout of one Gmail HTTP request",
        "30",
        "10",
    ),
    var(
        "GMAIL_SYNC_GMAIL_MAX_ATTEMPTS",
        "Attempts per Gmail call on retryable errors (429, 403 rate limits, 5xx, timeouts)",
        "5",
        "3",
    ),
    var(
        "GMAIL_SYNC_SYNC_RETRIES",
        "Times a mailbox sync is retried (with backoff) before its notifications are nacked",
        "8",
        "5",
    ),
    var(
        "GMAIL_SYNC_SUMMARY_INTERVAL_SECS",
        "Interval of the one-line summary in the log (0 = off)",
        "60",
        "10",
    ),
    var(
        "GMAIL_SYNC_LOG_MAILBOX",
        "How mailboxes appear in logs: `hash` (stable 64-bit hash) or `plain`",
        "hash",
        "plain",
    ),
    var(
        "GMAIL_SYNC_HEALTH_DIR",
        "Directory of the liveness/readiness files read by `gmail-sync health`",
        "/tmp/gmail-sync",
        "/run/gmail-sync",
    ),
    var(
        "PUBSUB_EMULATOR_HOST",
        "Use the Pub/Sub emulator at HOST:PORT with anonymous credentials",
        "",
        "127.0.0.1:8085",
    ),
    var(
        "GOOGLE_APPLICATION_CREDENTIALS",
        "Service-account key file for Pub/Sub; unset = Application Default Credentials (Workload Identity)",
        "",
        "/var/secrets/sa.json",
    ),
    var(
        "RUST_LOG",
        "Log filter (tracing EnvFilter syntax); logs are JSON lines on stdout",
        "info",
        "info,gmail_sync=debug",
    ),
];

/// A value that must never be printed: `Debug` shows `[redacted]` (invariant I7).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[derive(Clone, PartialEq, Eq)]
pub enum RedisTarget {
    Single(String),
    Cluster(Vec<String>),
}

impl RedisTarget {
    /// URLs may carry a password: show only scheme, host and port.
    pub fn describe(&self) -> String {
        fn host(url: &str) -> String {
            let (scheme, rest) = url.split_once("://").unwrap_or(("redis", url));
            let rest = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
            let host = rest.split('/').next().unwrap_or(rest);
            format!("{scheme}://{host}")
        }
        match self {
            RedisTarget::Single(url) => host(url),
            RedisTarget::Cluster(nodes) => {
                let hosts: Vec<_> = nodes.iter().map(|n| host(n)).collect();
                format!("cluster[{}]", hosts.join(","))
            }
        }
    }
}

/// Redis URLs may carry a password: `Debug` shows only what `describe` shows.
impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MailboxLogStyle {
    Hash,
    Plain,
}

#[derive(Clone, Debug)]
pub enum PubSubEndpoint {
    /// Google's service with Application Default Credentials.
    Google,
    /// The emulator at `http://HOST:PORT`, anonymous credentials.
    Emulator(String),
}

#[derive(Clone, Debug)]
pub struct Config {
    pub subscription: Option<String>,
    pub topic: Option<String>,
    pub pubsub: PubSubEndpoint,
    pub redis: RedisTarget,
    pub store: StoreSettings,
    pub gmail: GmailSettings,
    pub consumer: ConsumerSettings,
    pub sync: SyncSettings,
    pub summary_interval: Option<Duration>,
    pub log_mailbox: MailboxLogStyle,
    pub health_dir: std::path::PathBuf,
}

#[derive(Clone, Debug)]
pub struct StoreSettings {
    pub key_prefix: String,
    pub shards: u32,
    pub stream_maxlen: u64,
    pub quarantine_maxlen: u64,
}

#[derive(Clone, Debug)]
pub struct GmailSettings {
    pub api_url: String,
    pub dev_access_token: Option<Secret>,
    pub request_timeout: Duration,
    pub max_attempts: u32,
}

#[derive(Clone, Debug)]
pub struct ConsumerSettings {
    pub max_concurrent_syncs: usize,
    pub max_outstanding_messages: i64,
    pub ack_extension: Duration,
    pub max_lease: Duration,
    pub shutdown_timeout: Duration,
    pub sync_retries: u32,
}

#[derive(Clone, Debug)]
pub struct SyncSettings {
    pub mailbox_lease: Duration,
    pub history_page_size: u32,
    pub resync_max_messages: u32,
}

/// Startup refused: names the variable and says what is expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {name}: {problem}")]
pub struct ConfigError {
    pub name: &'static str,
    pub problem: String,
}

impl Config {
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// Loads from any lookup (tests pass a map). Empty values count as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let env = Env(&lookup);
        let subscription = env
            .opt("GMAIL_SYNC_SUBSCRIPTION")
            .map(|v| resource_name("GMAIL_SYNC_SUBSCRIPTION", &v, "subscriptions"))
            .transpose()?;
        let topic = env
            .opt("GMAIL_SYNC_TOPIC")
            .map(|v| resource_name("GMAIL_SYNC_TOPIC", &v, "topics"))
            .transpose()?;
        let pubsub = match env.opt("PUBSUB_EMULATOR_HOST") {
            None => PubSubEndpoint::Google,
            Some(host) => {
                let valid = host
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
                if !valid || host.contains("://") {
                    return Err(ConfigError {
                        name: "PUBSUB_EMULATOR_HOST",
                        problem: format!("expected HOST:PORT (e.g. 127.0.0.1:8085), got {host:?}"),
                    });
                }
                PubSubEndpoint::Emulator(format!("http://{host}"))
            }
        };
        let redis = match env.opt("GMAIL_SYNC_REDIS_CLUSTER_NODES") {
            Some(nodes) => {
                let nodes: Vec<String> = nodes
                    .split(',')
                    .map(|n| n.trim().to_string())
                    .filter(|n| !n.is_empty())
                    .collect();
                for n in &nodes {
                    redis_url("GMAIL_SYNC_REDIS_CLUSTER_NODES", n)?;
                }
                if nodes.is_empty() {
                    return Err(ConfigError {
                        name: "GMAIL_SYNC_REDIS_CLUSTER_NODES",
                        problem: "expected at least one redis:// URL".into(),
                    });
                }
                RedisTarget::Cluster(nodes)
            }
            None => {
                let url = env.str_or("GMAIL_SYNC_REDIS_URL");
                redis_url("GMAIL_SYNC_REDIS_URL", &url)?;
                RedisTarget::Single(url)
            }
        };
        let key_prefix = env.str_or("GMAIL_SYNC_KEY_PREFIX");
        let prefix_ok = !key_prefix.is_empty()
            && key_prefix.len() <= 64
            && key_prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
        if !prefix_ok {
            return Err(ConfigError {
                name: "GMAIL_SYNC_KEY_PREFIX",
                problem: format!(
                    "expected 1-64 characters among letters, digits, '-', '_', '.', ':', got {key_prefix:?}"
                ),
            });
        }
        let api_url = env.str_or("GMAIL_SYNC_GMAIL_API_URL");
        if !(api_url.starts_with("http://") || api_url.starts_with("https://")) {
            return Err(ConfigError {
                name: "GMAIL_SYNC_GMAIL_API_URL",
                problem: format!("expected an http:// or https:// URL, got {api_url:?}"),
            });
        }
        let log_mailbox = match env.str_or("GMAIL_SYNC_LOG_MAILBOX").as_str() {
            "hash" => MailboxLogStyle::Hash,
            "plain" => MailboxLogStyle::Plain,
            other => {
                return Err(ConfigError {
                    name: "GMAIL_SYNC_LOG_MAILBOX",
                    problem: format!("expected `hash` or `plain`, got {other:?}"),
                });
            }
        };
        let summary_secs = env.num("GMAIL_SYNC_SUMMARY_INTERVAL_SECS", 0, 86_400)?;
        Ok(Config {
            subscription,
            topic,
            pubsub,
            redis,
            store: StoreSettings {
                key_prefix,
                shards: env.num("GMAIL_SYNC_SHARDS", 1, 1024)? as u32,
                stream_maxlen: env.num("GMAIL_SYNC_STREAM_MAXLEN", 1_000, u64::MAX)?,
                quarantine_maxlen: env.num("GMAIL_SYNC_QUARANTINE_MAXLEN", 100, u64::MAX)?,
            },
            gmail: GmailSettings {
                api_url: api_url.trim_end_matches('/').to_string(),
                dev_access_token: env.opt("GMAIL_SYNC_DEV_ACCESS_TOKEN").map(Secret),
                request_timeout: env.secs("GMAIL_SYNC_GMAIL_TIMEOUT_SECS", 1, 600)?,
                max_attempts: env.num("GMAIL_SYNC_GMAIL_MAX_ATTEMPTS", 1, 20)? as u32,
            },
            consumer: ConsumerSettings {
                max_concurrent_syncs: env.num("GMAIL_SYNC_MAX_CONCURRENT_SYNCS", 1, 10_000)?
                    as usize,
                max_outstanding_messages: env.num(
                    "GMAIL_SYNC_MAX_OUTSTANDING_MESSAGES",
                    1,
                    1_000_000,
                )? as i64,
                ack_extension: env.secs("GMAIL_SYNC_ACK_EXTENSION_SECS", 10, 600)?,
                max_lease: env.secs("GMAIL_SYNC_MAX_LEASE_SECS", 60, 3600)?,
                shutdown_timeout: env.secs("GMAIL_SYNC_SHUTDOWN_TIMEOUT_SECS", 0, 3600)?,
                sync_retries: env.num("GMAIL_SYNC_SYNC_RETRIES", 0, 100)? as u32,
            },
            sync: SyncSettings {
                mailbox_lease: env.millis("GMAIL_SYNC_MAILBOX_LEASE_MS", 1_000, 3_600_000)?,
                history_page_size: env.num("GMAIL_SYNC_HISTORY_PAGE_SIZE", 1, 500)? as u32,
                resync_max_messages: env.num("GMAIL_SYNC_RESYNC_MAX_MESSAGES", 0, 1_000_000)?
                    as u32,
            },
            summary_interval: (summary_secs > 0).then(|| Duration::from_secs(summary_secs)),
            log_mailbox,
            health_dir: env.str_or("GMAIL_SYNC_HEALTH_DIR").into(),
        })
    }

    /// The subscription, which `run` needs.
    pub fn require_subscription(&self) -> Result<&str, ConfigError> {
        self.subscription.as_deref().ok_or(ConfigError {
            name: "GMAIL_SYNC_SUBSCRIPTION",
            problem: "required: the full subscription name, projects/PROJECT/subscriptions/NAME"
                .into(),
        })
    }

    /// The topic, which `mailbox add` passes to users.watch.
    pub fn require_topic(&self) -> Result<&str, ConfigError> {
        self.topic.as_deref().ok_or(ConfigError {
            name: "GMAIL_SYNC_TOPIC",
            problem: "required: the full topic name, projects/PROJECT/topics/NAME".into(),
        })
    }
}

/// The variable table as shown by `--help`.
pub fn help_table() -> String {
    let mut out = String::from("Environment variables:\n");
    for v in VARIABLES {
        let default = if v.default.is_empty() {
            String::new()
        } else {
            format!(" [default: {}]", v.default)
        };
        out.push_str(&format!(
            "  {}\n      {}{}\n      e.g. {}\n",
            v.name, v.meaning, default, v.example
        ));
    }
    out
}

struct Env<'a, F: Fn(&str) -> Option<String>>(&'a F);

impl<F: Fn(&str) -> Option<String>> Env<'_, F> {
    fn opt(&self, name: &str) -> Option<String> {
        (self.0)(name).filter(|v| !v.trim().is_empty())
    }

    fn default_of(name: &str) -> &'static str {
        VARIABLES
            .iter()
            .find(|v| v.name == name)
            .map(|v| v.default)
            .expect("every variable read is listed in VARIABLES")
    }

    fn str_or(&self, name: &str) -> String {
        self.opt(name)
            .unwrap_or_else(|| Self::default_of(name).to_string())
    }

    fn secs(&self, name: &'static str, min: u64, max: u64) -> Result<Duration, ConfigError> {
        self.num(name, min, max).map(Duration::from_secs)
    }

    fn millis(&self, name: &'static str, min: u64, max: u64) -> Result<Duration, ConfigError> {
        self.num(name, min, max).map(Duration::from_millis)
    }

    fn num(&self, name: &'static str, min: u64, max: u64) -> Result<u64, ConfigError> {
        let raw = self.str_or(name);
        match raw.trim().parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(ConfigError {
                name,
                problem: if max == u64::MAX {
                    format!("expected an integer >= {min}, got {raw:?}")
                } else {
                    format!("expected an integer from {min} to {max}, got {raw:?}")
                },
            }),
        }
    }
}

fn resource_name(name: &'static str, value: &str, kind: &str) -> Result<String, ConfigError> {
    let parts: Vec<&str> = value.split('/').collect();
    let ok = parts.len() == 4
        && parts[0] == "projects"
        && !parts[1].is_empty()
        && parts[2] == kind
        && !parts[3].is_empty();
    if ok {
        Ok(value.to_string())
    } else {
        Err(ConfigError {
            name,
            problem: format!("expected projects/PROJECT/{kind}/NAME, got {value:?}"),
        })
    }
}

fn redis_url(name: &'static str, url: &str) -> Result<(), ConfigError> {
    redis::IntoConnectionInfo::into_connection_info(url)
        .map(|_| ())
        .map_err(|_| ConfigError {
            name,
            // The URL may hold a password: never echo it.
            problem: "expected a redis:// or rediss:// URL (e.g. redis://127.0.0.1:6379/)".into(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_are_valid() {
        let c = load(&[]).unwrap();
        assert_eq!(c.store.shards, 16);
        assert_eq!(c.store.key_prefix, "gmail-sync");
        assert!(matches!(c.pubsub, PubSubEndpoint::Google));
        assert!(c.require_subscription().is_err());
    }

    #[test]
    fn bad_values_name_the_variable() {
        let cases = [
            ("GMAIL_SYNC_SHARDS", "0"),
            ("GMAIL_SYNC_SHARDS", "lots"),
            ("GMAIL_SYNC_SUBSCRIPTION", "my-sub"),
            ("GMAIL_SYNC_TOPIC", "projects/p/subscriptions/x"),
            ("GMAIL_SYNC_KEY_PREFIX", "{bad}"),
            ("GMAIL_SYNC_REDIS_URL", "http://nope"),
            ("PUBSUB_EMULATOR_HOST", "http://localhost:8085"),
            ("GMAIL_SYNC_LOG_MAILBOX", "loud"),
            ("GMAIL_SYNC_HISTORY_PAGE_SIZE", "501"),
            ("GMAIL_SYNC_GMAIL_API_URL", "gmail.googleapis.com"),
        ];
        for (name, value) in cases {
            let err = load(&[(name, value)]).unwrap_err();
            assert_eq!(err.name, name, "{value}");
            assert!(err.to_string().contains(name));
        }
    }

    #[test]
    fn emulator_host_maps_to_http_endpoint() {
        let c = load(&[("PUBSUB_EMULATOR_HOST", "127.0.0.1:8085")]).unwrap();
        assert!(
            matches!(c.pubsub, PubSubEndpoint::Emulator(ref e) if e == "http://127.0.0.1:8085")
        );
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let c = load(&[
            ("GMAIL_SYNC_DEV_ACCESS_TOKEN", "ya29.very-secret"),
            ("GMAIL_SYNC_REDIS_URL", "redis://:hunter2@10.1.2.3:6379/"),
        ])
        .unwrap();
        let shown = format!("{c:?} {}", c.redis.describe());
        assert!(!shown.contains("very-secret"));
        assert!(!shown.contains("hunter2"));
        assert!(c.redis.describe() == "redis://10.1.2.3:6379");
    }

    #[test]
    fn readme_documents_every_variable() {
        let readme = include_str!("../README.md");
        for v in VARIABLES {
            assert!(readme.contains(v.name), "README.md lacks {}", v.name);
        }
    }
}
