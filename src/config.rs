//! The one typed configuration, loaded from environment variables and validated once, before
//! anything starts. A bad or missing variable stops startup with a message naming the variable
//! and what is expected.
//!
//! Each variable is defined once, as a field of `Environment`: clap's `env` gives its name,
//! `default_value` its default, `value_parser` its rule, the doc comment its meaning and
//! example. That definition is what [`Config::from_lookup`] parses with, what [`variables`]
//! lists, what `--help` prints and what the test of README.md's table compares with.

mod metrics;

pub use metrics::{
    ExportOff, MetricTemporality, MetricsExport, MetricsSettings, OtlpHeaders, OtlpSettings,
    shown_url,
};

use crate::mailbox::{LogHashKey, Mailbox, MailboxLogStyle};
use crate::quota::{CostTable, GovernorMode, QuotaSettings, QuotaTable};
use clap::error::{ContextKind, ContextValue};
use clap::{Args, Command, FromArgMatches};
use std::fmt;
use std::path::PathBuf;
use std::sync::LazyLock;
use std::time::Duration;

// Constants for the names that code outside the definition refers to (`require_subscription`,
// `require_topic`, the Redis URL and CA checks), so that each name is still written once.
const SUBSCRIPTION: &str = "GMAIL_SYNC_SUBSCRIPTION";
const TOPIC: &str = "GMAIL_SYNC_TOPIC";
const REDIS_URL: &str = "GMAIL_SYNC_REDIS_URL";
/// The token key files, named by `vault` when a file is bad.
pub(crate) const TOKEN_KEY_FILE: &str = "GMAIL_SYNC_TOKEN_KEY_FILE";
pub(crate) const TOKEN_KEY_PREVIOUS_FILE: &str = "GMAIL_SYNC_TOKEN_KEY_PREVIOUS_FILE";
const LOG_HASH_KEY_FILE: &str = "GMAIL_SYNC_LOG_HASH_KEY_FILE";
const MAX_LEASE: &str = "GMAIL_SYNC_MAX_LEASE_SECS";
const HISTORY_LAG: &str = "GMAIL_SYNC_HISTORY_LAG_SECS";
const REDIS_CA_FILE: &str = "GMAIL_SYNC_REDIS_CA_FILE";

/// Every environment variable gmail-sync reads or documents, in the order `--help` and README.md
/// list them. A field's doc comment is the variable's meaning, then an `e.g. EXAMPLE` paragraph;
/// `hide_env_values` marks a secret, whose value is never echoed. The `long` names only carry
/// looked-up values into clap's parser (see [`Environment::parse`]): they are not command-line
/// flags, because operators configure through the environment alone, and flags would put
/// secrets in `ps` output.
///
/// Adding a variable: a field here, and its use in [`Environment::into_config`].
#[derive(Args)]
struct Environment {
    /// Pub/Sub subscription the worker pulls Gmail notifications from (required by `run`)
    ///
    /// e.g. projects/acme/subscriptions/gmail-sync
    #[arg(long, env = SUBSCRIPTION, value_parser = resource_name("subscriptions"))]
    subscription: Option<String>,

    /// Pub/Sub topic Gmail publishes to; passed to users.watch (required by `mailbox add`)
    ///
    /// e.g. projects/acme/topics/gmail-push
    #[arg(long, env = TOPIC, value_parser = resource_name("topics"))]
    topic: Option<String>,

    /// Redis URL (single node), redis:// or rediss:// (TLS); ignored when
    /// GMAIL_SYNC_REDIS_CLUSTER_NODES is set
    ///
    /// e.g. rediss://:password@redis.internal:6380/0
    // No value parser: an ignored URL is not checked (as before), so `into_config` checks it
    // only when it is used.
    #[arg(long, env = REDIS_URL, hide_env_values = true, default_value = "redis://127.0.0.1:6379/")]
    redis_url: String,

    /// Comma-separated Redis Cluster seed nodes, all redis:// or all rediss:// (TLS); enables
    /// cluster mode
    ///
    /// e.g. redis://10.0.0.1:6379,redis://10.0.0.2:6379
    #[arg(
        long,
        env = "GMAIL_SYNC_REDIS_CLUSTER_NODES",
        hide_env_values = true,
        value_parser = redis_cluster_nodes
    )]
    redis_cluster: Option<RedisNodes>,

    /// PEM file of the CA certificate(s) that signed the Redis server certificate, for
    /// rediss:// URLs; unset = the system's trusted roots
    ///
    /// e.g. /var/secrets/redis/server-ca.pem
    #[arg(long, env = REDIS_CA_FILE, value_parser = ca_file)]
    redis_ca_file: Option<CaFile>,

    /// Redis ACL user; unset = the user in the URL, else Redis's default user
    ///
    /// e.g. gmail-sync
    #[arg(long, env = "GMAIL_SYNC_REDIS_USERNAME")]
    redis_username: Option<String>,

    /// File holding the Redis password (a trailing newline is dropped); replaces a password
    /// in the URL
    ///
    /// e.g. /var/secrets/redis/password
    #[arg(long, env = "GMAIL_SYNC_REDIS_PASSWORD_FILE", value_parser = password_file)]
    redis_password_file: Option<Secret>,

    /// Prefix of every Redis key, so several deployments can share one Redis
    /// (letters, digits, - _ . :)
    ///
    /// e.g. prod-eu
    #[arg(long, env = "GMAIL_SYNC_KEY_PREFIX", default_value = "gmail-sync", value_parser = key_prefix)]
    key_prefix: String,

    /// Number of change-stream shards (1-1024); fixed for the life of a deployment
    ///
    /// e.g. 64
    #[arg(long, env = "GMAIL_SYNC_SHARDS", default_value = "16", value_parser = integer::<u32>(1, 1024))]
    shards: u32,

    /// Approximate cap (XADD MAXLEN ~) of each shard's change stream, in entries (at least 1000)
    ///
    /// e.g. 200000
    #[arg(
        long,
        env = "GMAIL_SYNC_STREAM_MAXLEN",
        default_value = "1000000",
        value_parser = integer::<u64>(1_000, u64::MAX)
    )]
    stream_maxlen: u64,

    /// Approximate cap of the quarantine stream of rejected notifications, in entries (at least
    /// 100); entries are bounded, so the stream stays under 1 KiB of Redis memory per entry
    /// (plus 100 entries of trimming slack)
    ///
    /// e.g. 1000
    #[arg(
        long,
        env = "GMAIL_SYNC_QUARANTINE_MAXLEN",
        default_value = "10000",
        value_parser = integer::<u64>(100, u64::MAX)
    )]
    quarantine_maxlen: u64,

    /// Base URL of the Gmail API (tests point it at the simulator)
    ///
    /// e.g. http://127.0.0.1:8085
    #[arg(
        long,
        env = "GMAIL_SYNC_GMAIL_API_URL",
        default_value = "https://gmail.googleapis.com",
        value_parser = http_url
    )]
    gmail_api_url: String,

    /// DEVELOPMENT ONLY: a static OAuth access token used for every mailbox
    ///
    /// e.g. ya29.dev-token
    #[arg(long, env = "GMAIL_SYNC_DEV_ACCESS_TOKEN", hide_env_values = true, value_parser = secret)]
    dev_access_token: Option<Secret>,

    /// OAuth 2.0 token endpoint that delegation assertions and refresh tokens are exchanged at
    ///
    /// e.g. http://127.0.0.1:8085/token
    #[arg(
        long,
        env = "GMAIL_SYNC_TOKEN_URL",
        default_value = "https://oauth2.googleapis.com/token",
        value_parser = http_url
    )]
    token_url: String,

    /// OAuth scopes asked for, space-separated (gmail.metadata covers history, labels and headers)
    ///
    /// e.g. https://www.googleapis.com/auth/gmail.readonly
    #[arg(
        long,
        env = "GMAIL_SYNC_GMAIL_SCOPES",
        default_value = "https://www.googleapis.com/auth/gmail.metadata",
        value_parser = scopes
    )]
    gmail_scopes: Scopes,

    /// Workspace domain-wide delegation, signed locally: the service account's JSON key file
    ///
    /// e.g. /var/run/secrets/gmail-sync/delegation-key.json
    #[arg(long, env = "GMAIL_SYNC_DELEGATION_KEY_FILE", value_parser = service_account_key_file)]
    delegation_key_file: Option<ServiceAccountKey>,

    /// Workspace domain-wide delegation, keyless: the service account IAM signJwt signs as (with ADC)
    ///
    /// e.g. gmail-sync-delegation@acme.iam.gserviceaccount.com
    #[arg(long, env = "GMAIL_SYNC_DELEGATION_SERVICE_ACCOUNT", value_parser = service_account_email)]
    delegation_service_account: Option<String>,

    /// Base URL of the IAM Credentials API used for keyless signing
    ///
    /// e.g. http://127.0.0.1:8085
    #[arg(
        long,
        env = "GMAIL_SYNC_IAM_CREDENTIALS_URL",
        default_value = "https://iamcredentials.googleapis.com",
        value_parser = http_url
    )]
    iam_credentials_url: String,

    /// Per-user refresh tokens: the OAuth client id the mailbox owners authorized
    ///
    /// e.g. 1234567890-abc.apps.googleusercontent.com
    #[arg(long, env = "GMAIL_SYNC_OAUTH_CLIENT_ID")]
    oauth_client_id: Option<String>,

    /// Per-user refresh tokens: the OAuth client secret (prefer GMAIL_SYNC_OAUTH_CLIENT_SECRET_FILE)
    ///
    /// e.g. GOCSPX-example
    #[arg(long, env = "GMAIL_SYNC_OAUTH_CLIENT_SECRET", hide_env_values = true, value_parser = secret)]
    oauth_client_secret: Option<Secret>,

    /// Per-user refresh tokens: a file holding the OAuth client secret
    ///
    /// e.g. /var/run/secrets/gmail-sync/oauth-client-secret
    #[arg(long, env = "GMAIL_SYNC_OAUTH_CLIENT_SECRET_FILE", value_parser = secret_file)]
    oauth_client_secret_file: Option<Secret>,

    /// A mailbox that startup mints a delegation token for, to prove delegation works
    ///
    /// e.g. postmaster@acme.com
    #[arg(long, env = "GMAIL_SYNC_PROBE_MAILBOX", value_parser = probe_mailbox)]
    probe_mailbox: Option<Mailbox>,

    /// Seconds a mailbox keeps failing for good before it is marked needing attention (0-86400); meanwhile a mass failure is told apart
    ///
    /// e.g. 300
    #[arg(
        long,
        env = "GMAIL_SYNC_FAILURE_SETTLE_SECS",
        default_value = "120",
        value_parser = seconds(0, 86_400)
    )]
    failure_settle: Duration,

    /// File with the key that seals the refresh tokens stored in Redis: one line, the base64 of
    /// 32 random bytes, made by `gmail-sync keys generate`; new tokens are always sealed with it
    ///
    /// e.g. /var/secrets/token-key/current
    // Only the path is configuration: `vault::Vault::from_config` reads the file, so a bad
    // file is refused naming this variable.
    #[arg(long, env = TOKEN_KEY_FILE)]
    token_key_file: Option<PathBuf>,

    /// File with the previous token key, still read during a key rotation until `gmail-sync
    /// keys rotate` has resealed every token; requires GMAIL_SYNC_TOKEN_KEY_FILE
    ///
    /// e.g. /var/secrets/token-key-previous/key
    #[arg(long, env = TOKEN_KEY_PREVIOUS_FILE)]
    token_key_previous_file: Option<PathBuf>,

    /// Mailbox syncs running at once in one process (1-10000)
    ///
    /// e.g. 128
    #[arg(
        long,
        env = "GMAIL_SYNC_MAX_CONCURRENT_SYNCS",
        default_value = "64",
        value_parser = integer::<usize>(1, 10_000)
    )]
    max_concurrent_syncs: usize,

    /// Pub/Sub flow control: messages leased and not yet acked, per process (1-1000000)
    ///
    /// e.g. 2000
    #[arg(
        long,
        env = "GMAIL_SYNC_MAX_OUTSTANDING_MESSAGES",
        default_value = "1000",
        value_parser = integer::<i64>(1, 1_000_000)
    )]
    max_outstanding_messages: i64,

    /// Pub/Sub flow control: bytes of messages leased and not yet acked, per process
    /// (65536-67108864); keep it well below the pod's memory limit (128Mi in deploy/)
    ///
    /// e.g. 8388608
    #[arg(
        long,
        env = "GMAIL_SYNC_MAX_OUTSTANDING_BYTES",
        default_value = "16777216",
        value_parser = integer::<i64>(65_536, 67_108_864)
    )]
    max_outstanding_bytes: i64,

    /// Ack deadline the client asks for and keeps extending, in seconds (10-600)
    ///
    /// e.g. 30
    #[arg(long, env = "GMAIL_SYNC_ACK_EXTENSION_SECS", default_value = "60", value_parser = seconds(10, 600))]
    ack_extension: Duration,

    /// Longest a message is held before Pub/Sub may redeliver it, in seconds (60-3600)
    ///
    /// e.g. 1200
    #[arg(long, env = MAX_LEASE, default_value = "600", value_parser = seconds(60, 3600))]
    max_lease: Duration,

    /// On SIGTERM, how long in-flight syncs may finish before the rest is nacked, in seconds
    /// (0-3600; 0 = nack at once)
    ///
    /// e.g. 20
    #[arg(
        long,
        env = "GMAIL_SYNC_SHUTDOWN_TIMEOUT_SECS",
        default_value = "30",
        value_parser = seconds(0, 3600)
    )]
    shutdown_timeout: Duration,

    /// TTL of the per-mailbox Redis lease, in milliseconds (1000-3600000); renewed every third
    /// of it while syncing
    ///
    /// e.g. 60000
    #[arg(
        long,
        env = "GMAIL_SYNC_MAILBOX_LEASE_MS",
        default_value = "30000",
        value_parser = milliseconds(1_000, 3_600_000)
    )]
    mailbox_lease: Duration,

    /// maxResults of users.history.list (1-500)
    ///
    /// e.g. 100
    #[arg(
        long,
        env = "GMAIL_SYNC_HISTORY_PAGE_SIZE",
        default_value = "500",
        value_parser = integer::<u32>(1, 500)
    )]
    history_page_size: u32,

    /// Messages listed by a full resync after Gmail answered 404, newest first (0-1000000)
    ///
    /// e.g. 5000
    #[arg(
        long,
        env = "GMAIL_SYNC_RESYNC_MAX_MESSAGES",
        default_value = "1000",
        value_parser = integer::<u32>(0, 1_000_000)
    )]
    resync_max_messages: u32,

    /// What `message_added` and `message_listed` entries carry besides ids and labels:
    /// `metadata` (the headers of GMAIL_SYNC_ENRICHMENT_HEADERS, snippet, size, internal date),
    /// `minimal` (snippet, size, internal date; no headers) or `off`; one users.messages.get per
    /// message, sent in batches before the commit
    ///
    /// e.g. minimal
    #[arg(long, env = "GMAIL_SYNC_ENRICHMENT", default_value = "metadata", value_parser = enrichment_mode)]
    enrichment: EnrichmentMode,

    /// Headers written by GMAIL_SYNC_ENRICHMENT=metadata, comma-separated (up to 20; each one
    /// becomes the field `header_NAME`, lower-cased with `-` as `_`)
    ///
    /// e.g. From,To,Subject,Date,List-Id
    #[arg(
        long,
        env = "GMAIL_SYNC_ENRICHMENT_HEADERS",
        default_value = "From,To,Cc,Subject,Date,Message-ID,In-Reply-To",
        value_parser = header_names
    )]
    enrichment_headers: HeaderNames,

    /// Quota units one users.messages.get costs (1-100); unset = GMAIL_SYNC_QUOTA_TABLE's (5
    /// classic, 20 for 2026); counted in the quota figures and charged by the quota governor
    ///
    /// e.g. 20
    #[arg(
        long,
        env = "GMAIL_SYNC_MESSAGES_GET_COST",
        value_parser = integer::<u64>(1, 100)
    )]
    messages_get_cost: Option<u64>,

    /// The quota governor that all replicas share through Redis: `on` (work waits for the
    /// per-user, per-project and in-flight budgets instead of drawing Gmail's 429s) or `off`
    ///
    /// e.g. off
    #[arg(long, env = "GMAIL_SYNC_QUOTA_GOVERNOR", default_value = "on", value_parser = governor_mode)]
    quota_governor: GovernorMode,

    /// Which of Gmail's quota tables the Google Cloud project is under: `classic` (15,000 units
    /// per user per minute, 1,200,000 per project per minute, messages.get 5) or `2026`
    /// (projects created from May 2026: 6,000 per user per minute, 80,000,000 per project per
    /// day, messages.get 20)
    ///
    /// e.g. 2026
    #[arg(long, env = "GMAIL_SYNC_QUOTA_TABLE", default_value = "classic", value_parser = quota_table)]
    quota_table: QuotaTable,

    /// Quota units per user (mailbox) per minute the governor allows (1-1000000000); unset =
    /// the table's
    ///
    /// e.g. 12000
    #[arg(long, env = "GMAIL_SYNC_QUOTA_USER_PER_MINUTE", value_parser = integer::<u64>(1, 1_000_000_000))]
    quota_user_per_minute: Option<u64>,

    /// Quota units per project per minute the governor allows, for all replicas together
    /// (0-1000000000; 0 = not governed); unset = the table's
    ///
    /// e.g. 1000000
    #[arg(long, env = "GMAIL_SYNC_QUOTA_PROJECT_PER_MINUTE", value_parser = integer::<u64>(0, 1_000_000_000))]
    quota_project_per_minute: Option<u64>,

    /// Quota units per project per 24 hours the governor allows (0-100000000000; 0 = no daily
    /// threshold); unset = the table's (none for classic, 80,000,000 for 2026)
    ///
    /// e.g. 60000000
    #[arg(long, env = "GMAIL_SYNC_QUOTA_PROJECT_PER_DAY", value_parser = integer::<u64>(0, 100_000_000_000))]
    quota_project_per_day: Option<u64>,

    /// Syncs and renewals of one mailbox in flight at once across all replicas (1-100); Gmail
    /// answers "Too many concurrent requests for user" above about 10 requests
    ///
    /// e.g. 4
    #[arg(
        long,
        env = "GMAIL_SYNC_QUOTA_USER_IN_FLIGHT",
        default_value = "8",
        value_parser = integer::<u32>(1, 100)
    )]
    quota_user_in_flight: u32,

    /// Timeout of one Gmail HTTP request, in seconds (1-600)
    ///
    /// e.g. 10
    #[arg(long, env = "GMAIL_SYNC_GMAIL_TIMEOUT_SECS", default_value = "30", value_parser = seconds(1, 600))]
    gmail_timeout: Duration,

    /// Attempts per Gmail call on retryable errors: 429, 403 rate limits, 5xx, timeouts (1-20)
    ///
    /// e.g. 3
    #[arg(
        long,
        env = "GMAIL_SYNC_GMAIL_MAX_ATTEMPTS",
        default_value = "5",
        value_parser = integer::<u32>(1, 20)
    )]
    gmail_max_attempts: u32,

    /// Times a failed mailbox sync is retried (with backoff) before its notifications are nacked
    /// (0-100)
    ///
    /// e.g. 5
    #[arg(long, env = "GMAIL_SYNC_SYNC_RETRIES", default_value = "8", value_parser = integer::<u32>(0, 100))]
    sync_retries: u32,

    /// How long a notification whose historyId Gmail's history does not show yet is retried,
    /// counted from its publish time, before it is quarantined and acked, in seconds (1-540;
    /// below GMAIL_SYNC_MAX_LEASE_SECS)
    ///
    /// e.g. 60
    // 45 s: Gmail's history catches up with a notification within seconds, and the default must
    // stay below the shortest message lease (60 s) so every GMAIL_SYNC_MAX_LEASE_SECS accepts it.
    // A forged notification then costs at most eight history.list reads (16 quota units).
    #[arg(long, env = HISTORY_LAG, default_value = "45", value_parser = seconds(1, 540))]
    history_lag: Duration,

    /// How long a mailbox's sync waits after the first notification it will cover arrived, so
    /// that the mailbox's notifications within it share one users.history.list, in milliseconds
    /// (0-5000; 0 = sync at once); notifications the committed cursor already covers are acked
    /// without waiting
    ///
    /// e.g. 500
    // WINDOW_DEFAULT. At most 5 s: the window adds to every notification's latency, and longer
    // waits only pay off for mailboxes that get several changes per window.
    #[arg(
        long,
        env = "GMAIL_SYNC_COALESCE_WINDOW_MS",
        default_value = "200",
        value_parser = milliseconds(0, 5_000)
    )]
    coalesce_window: Duration,

    /// How often each mailbox's users.watch is renewed, in seconds (5-518400); Gmail stops
    /// notifying 7 days after the last watch and recommends renewing daily
    ///
    /// e.g. 43200
    #[arg(
        long,
        env = "GMAIL_SYNC_RENEW_INTERVAL_SECS",
        default_value = "86400",
        value_parser = seconds(5, 518_400)
    )]
    renew_interval: Duration,

    /// Each renewal lands uniformly within plus or minus this many seconds of the interval, so
    /// renewals spread over the day (0-86399; below the interval; unset = half the interval)
    ///
    /// e.g. 3600
    #[arg(long, env = "GMAIL_SYNC_RENEW_JITTER_SECS", value_parser = seconds(0, 86_399))]
    renew_jitter: Option<Duration>,

    /// Cap on users.watch renewals per minute for the whole deployment, 100 quota units each,
    /// split evenly over the shards (1-1000000)
    ///
    /// e.g. 120
    #[arg(
        long,
        env = "GMAIL_SYNC_RENEWALS_PER_MINUTE",
        default_value = "600",
        value_parser = integer::<u32>(1, 1_000_000)
    )]
    renewals_per_minute: u32,

    /// How long a replica's claim on a due mailbox (renewal or fallback sync) lasts, in seconds
    /// (2-3600); a replica that dies mid-claim loses it after this
    ///
    /// e.g. 300
    #[arg(
        long,
        env = "GMAIL_SYNC_CLAIM_TIMEOUT_SECS",
        default_value = "120",
        value_parser = seconds(2, 3600)
    )]
    claim_timeout: Duration,

    /// A mailbox without a sync for this many seconds is synced anyway, because notifications
    /// can be dropped (1-604800)
    ///
    /// e.g. 1800
    #[arg(
        long,
        env = "GMAIL_SYNC_FALLBACK_SILENCE_SECS",
        default_value = "900",
        value_parser = seconds(1, 604_800)
    )]
    fallback_silence: Duration,

    /// Up to this many seconds are added to each silent mailbox's next fallback sync, to spread
    /// them (0-86400)
    ///
    /// e.g. 300
    #[arg(
        long,
        env = "GMAIL_SYNC_FALLBACK_JITTER_SECS",
        default_value = "120",
        value_parser = seconds(0, 86_400)
    )]
    fallback_jitter: Duration,

    /// How often the scheduler looks for due renewals and fallback syncs, in milliseconds
    /// (20-60000); one Redis call per shard when nothing is due
    ///
    /// e.g. 5000
    #[arg(
        long,
        env = "GMAIL_SYNC_SCHEDULER_TICK_MS",
        default_value = "1000",
        value_parser = milliseconds(20, 60_000)
    )]
    scheduler_tick: Duration,

    /// Warn (log line and counter) about watches that expire within this many seconds while
    /// their renewal keeps failing (60-604800)
    ///
    /// e.g. 86400
    #[arg(
        long,
        env = "GMAIL_SYNC_WATCH_WARN_HORIZON_SECS",
        default_value = "172800",
        value_parser = seconds(60, 604_800)
    )]
    watch_warn_horizon: Duration,

    /// Interval of the one-line summary in the log, in seconds (0-86400; 0 = off)
    ///
    /// e.g. 10
    #[arg(
        long,
        env = "GMAIL_SYNC_SUMMARY_INTERVAL_SECS",
        default_value = "60",
        value_parser = seconds(0, 86_400)
    )]
    summary_interval: Duration,

    /// `true` turns the metrics export off whatever else is set (`true` or `false`)
    ///
    /// e.g. true
    #[arg(
        long,
        env = "OTEL_SDK_DISABLED",
        default_value = "false",
        action = clap::ArgAction::Set,
        value_parser = metrics::boolean
    )]
    otel_sdk_disabled: bool,

    /// OTLP/HTTP collector base URL; metrics are pushed to it + /v1/metrics; unset (with
    /// OTEL_EXPORTER_OTLP_METRICS_ENDPOINT unset too) = metrics are not exported
    ///
    /// e.g. http://otel-collector.monitoring:4318
    // Secret like the Redis URL: a URL may carry a password or an API key in its query
    // (`check-config` shows it without them).
    #[arg(long, env = metrics::ENDPOINT, hide_env_values = true, value_parser = metrics::endpoint)]
    otlp_endpoint: Option<String>,

    /// Full URL metrics are pushed to, used as given; wins over OTEL_EXPORTER_OTLP_ENDPOINT
    ///
    /// e.g. http://otel-collector.monitoring:4318/v1/metrics
    #[arg(
        long,
        env = metrics::METRICS_ENDPOINT,
        hide_env_values = true,
        value_parser = metrics::endpoint
    )]
    otlp_metrics_endpoint: Option<String>,

    /// OTLP transport: only `http/protobuf` is built in (for gRPC collectors use their OTLP/HTTP
    /// port, 4318)
    ///
    /// e.g. http/protobuf
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_PROTOCOL",
        default_value = "http/protobuf",
        value_parser = metrics::protocol
    )]
    otlp_protocol: metrics::HttpProtobuf,

    /// OTLP transport of metrics; wins over OTEL_EXPORTER_OTLP_PROTOCOL (only `http/protobuf`)
    ///
    /// e.g. http/protobuf
    #[arg(long, env = "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", value_parser = metrics::protocol)]
    otlp_metrics_protocol: Option<metrics::HttpProtobuf>,

    /// Headers of every OTLP request, `name=value` pairs separated by commas, values
    /// URL-encoded (API keys: kept secret)
    ///
    /// e.g. x-api-key=abc123
    #[arg(long, env = "OTEL_EXPORTER_OTLP_HEADERS", hide_env_values = true, value_parser = metrics::headers)]
    otlp_headers: Option<metrics::OtlpHeaders>,

    /// Headers of every metrics request; replace OTEL_EXPORTER_OTLP_HEADERS
    ///
    /// e.g. x-api-key=abc123
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
        hide_env_values = true,
        value_parser = metrics::headers
    )]
    otlp_metrics_headers: Option<metrics::OtlpHeaders>,

    /// Bound of one OTLP export, the exporter's retries included, in milliseconds (1-600000)
    ///
    /// e.g. 5000
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_TIMEOUT",
        default_value = "10000",
        value_parser = milliseconds(1, 600_000)
    )]
    otlp_timeout: Duration,

    /// Bound of one metrics export, in milliseconds (1-600000); wins over OTEL_EXPORTER_OTLP_TIMEOUT
    ///
    /// e.g. 5000
    #[arg(long, env = "OTEL_EXPORTER_OTLP_METRICS_TIMEOUT", value_parser = milliseconds(1, 600_000))]
    otlp_metrics_timeout: Option<Duration>,

    /// Interval between two metrics exports, in milliseconds (100-3600000)
    ///
    /// e.g. 15000
    #[arg(
        long,
        env = "OTEL_METRIC_EXPORT_INTERVAL",
        default_value = "60000",
        value_parser = milliseconds(100, 3_600_000)
    )]
    metric_export_interval: Duration,

    /// Aggregation temporality of exported metrics: `cumulative`, `delta` or `lowmemory`
    ///
    /// e.g. delta
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",
        default_value = "cumulative",
        value_parser = metrics::temporality
    )]
    otlp_metrics_temporality: metrics::MetricTemporality,

    /// Resource attributes of the metrics, `key=value` pairs separated by commas, values
    /// URL-encoded
    ///
    /// e.g. deployment.environment.name=prod,k8s.namespace.name=gmail-sync-prod
    #[arg(long, env = "OTEL_RESOURCE_ATTRIBUTES", value_parser = metrics::resource_attributes)]
    otel_resource_attributes: Option<metrics::ResourceAttributes>,

    /// `service.name` of the metrics; unset = the one in OTEL_RESOURCE_ATTRIBUTES, else gmail-sync
    ///
    /// e.g. gmail-sync-eu
    #[arg(long, env = "OTEL_SERVICE_NAME")]
    otel_service_name: Option<String>,

    /// `k8s.pod.name` of the metrics (set it from the downward API's metadata.name); unset = the
    /// host name, which Kubernetes sets to the pod's name
    ///
    /// e.g. gmail-sync-7d9f8b6c5-x2kqz
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,

    /// How mailboxes appear in logs: `hash` (64-bit HMAC-SHA256 keyed with
    /// GMAIL_SYNC_LOG_HASH_KEY_FILE) or `plain`
    ///
    /// e.g. plain
    #[arg(long, env = "GMAIL_SYNC_LOG_MAILBOX", default_value = "hash", value_parser = mailbox_log_style)]
    log_mailbox: LogMailbox,

    /// File holding the secret key of the mailbox hashes in logs, 32 bytes or more (surrounding
    /// whitespace ignored); unset = a random key per process, so hashes differ between replicas
    /// and restarts
    ///
    /// e.g. /var/secrets/gmail-sync/log-hash-key
    #[arg(long, env = LOG_HASH_KEY_FILE)]
    log_hash_key_file: Option<PathBuf>,

    /// Directory of the liveness/readiness files read by `gmail-sync health`
    ///
    /// e.g. /run/gmail-sync
    #[arg(long, env = "GMAIL_SYNC_HEALTH_DIR", default_value = "/tmp/gmail-sync")]
    health_dir: PathBuf,

    /// Use the Pub/Sub emulator at HOST:PORT with anonymous credentials
    ///
    /// e.g. 127.0.0.1:8085
    #[arg(long, env = "PUBSUB_EMULATOR_HOST", value_parser = emulator_host)]
    pubsub_emulator: Option<PubSubEndpoint>,

    /// Service-account key file for Pub/Sub; unset = Application Default Credentials (Workload
    /// Identity)
    ///
    /// e.g. /var/secrets/sa.json
    // Read by google-cloud-auth itself; defined here to be documented with the rest.
    #[arg(long, env = "GOOGLE_APPLICATION_CREDENTIALS")]
    google_application_credentials: Option<PathBuf>,

    /// Log filter (tracing EnvFilter syntax); logs are JSON lines on stdout
    ///
    /// e.g. info,gmail_sync=debug
    // Read by tracing's EnvFilter in `telemetry::init_logging`; defined here to be documented.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    rust_log: String,
}

/// A value that must never be printed: `Debug` shows `[redacted]` (invariant I7). Its memory
/// is wiped when it is dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Drop for Secret {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

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

/// Where Redis is and how to log in: what `Store::connect` needs.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisTarget {
    pub nodes: RedisNodes,
    /// GMAIL_SYNC_REDIS_USERNAME: replaces the URLs' user.
    pub username: Option<String>,
    /// Read from GMAIL_SYNC_REDIS_PASSWORD_FILE at startup: replaces the URLs' password.
    pub password: Option<Secret>,
    /// GMAIL_SYNC_REDIS_CA_FILE, read at startup: the roots trusted for `rediss://` instead of
    /// the system's. Only set with `rediss://` URLs.
    pub ca: Option<CaFile>,
}

/// A single node or cluster seed nodes, as `redis://` or `rediss://` URLs (all of one scheme).
#[derive(Clone, PartialEq, Eq)]
pub enum RedisNodes {
    Single(String),
    Cluster(Vec<String>),
}

/// PEM certificates read from a CA file (at least one `CERTIFICATE` block).
#[derive(Clone, PartialEq, Eq)]
pub struct CaFile {
    pub path: PathBuf,
    pub pem: Vec<u8>,
}

impl RedisTarget {
    /// Plain URLs, no user, password or CA of their own.
    pub fn new(nodes: RedisNodes) -> RedisTarget {
        RedisTarget {
            nodes,
            username: None,
            password: None,
            ca: None,
        }
    }

    /// Scheme, host and port of each node only: URLs may carry a password, and neither the
    /// password file's contents nor the user are shown.
    pub fn describe(&self) -> String {
        self.nodes.describe()
    }

    /// Whether the URLs are `rediss://` (they are all of one scheme).
    pub fn uses_tls(&self) -> bool {
        self.nodes.uses_tls()
    }
}

impl RedisNodes {
    /// URLs may carry a password: show only scheme, host and port.
    pub fn describe(&self) -> String {
        fn host(url: &str) -> String {
            let (scheme, rest) = url.split_once("://").unwrap_or(("redis", url));
            let rest = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
            let host = rest.split('/').next().unwrap_or(rest);
            format!("{scheme}://{host}")
        }
        match self {
            RedisNodes::Single(url) => host(url),
            RedisNodes::Cluster(nodes) => {
                let hosts: Vec<_> = nodes.iter().map(|n| host(n)).collect();
                format!("cluster[{}]", hosts.join(","))
            }
        }
    }

    pub fn urls(&self) -> &[String] {
        match self {
            RedisNodes::Single(url) => std::slice::from_ref(url),
            RedisNodes::Cluster(nodes) => nodes,
        }
    }

    pub fn uses_tls(&self) -> bool {
        self.urls().iter().any(|url| is_tls_url(url))
    }
}

fn is_tls_url(url: &str) -> bool {
    url.trim_start()
        .to_ascii_lowercase()
        .starts_with("rediss://")
}

/// Redis URLs may carry a password: `Debug` shows only what `describe` shows.
impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())?;
        if let Some(user) = &self.username {
            write!(f, " user {user}")?;
        }
        if self.password.is_some() {
            f.write_str(" password [redacted]")?;
        }
        if let Some(ca) = &self.ca {
            write!(f, " ca {}", ca.path.display())?;
        }
        Ok(())
    }
}

impl fmt::Debug for RedisNodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl fmt::Debug for CaFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CaFile({})", self.path.display())
    }
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
    pub auth: AuthSettings,
    pub gmail: GmailSettings,
    /// The quota governor (`quota`): on or off, costs, limits.
    pub quota: QuotaSettings,
    pub consumer: ConsumerSettings,
    pub sync: SyncSettings,
    pub scheduler: SchedulerSettings,
    pub token_keys: TokenKeySettings,
    pub summary_interval: Option<Duration>,
    /// Metrics over OTLP (the `OTEL_*` variables, `config::metrics`).
    pub metrics: MetricsSettings,
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
    pub request_timeout: Duration,
    pub max_attempts: u32,
    /// Quota units per call (GMAIL_SYNC_QUOTA_TABLE, GMAIL_SYNC_MESSAGES_GET_COST).
    pub costs: CostTable,
}

#[derive(Clone, Debug)]
pub struct ConsumerSettings {
    pub max_concurrent_syncs: usize,
    pub max_outstanding_messages: i64,
    pub max_outstanding_bytes: i64,
    pub ack_extension: Duration,
    pub max_lease: Duration,
    pub shutdown_timeout: Duration,
    pub sync_retries: u32,
    /// How long a notification ahead of Gmail's history is retried (from its publish time)
    /// before it is quarantined (GMAIL_SYNC_HISTORY_LAG_SECS).
    pub history_lag: Duration,
    /// How long a sync waits for more notifications of its mailbox
    /// (GMAIL_SYNC_COALESCE_WINDOW_MS; zero: none).
    pub coalesce_window: Duration,
}

#[derive(Clone, Debug)]
pub struct SyncSettings {
    /// See `GMAIL_SYNC_FAILURE_SETTLE_SECS` and `failure_guard`.
    pub failure_settle: Duration,
    pub mailbox_lease: Duration,
    pub history_page_size: u32,
    pub resync_max_messages: u32,
    pub enrichment: Enrichment,
}

/// What `message_added` / `message_listed` entries are enriched with (GMAIL_SYNC_ENRICHMENT).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Enrichment {
    /// Ids and labels only: no `users.messages.get`.
    Off,
    /// `format=metadata`: these headers (GMAIL_SYNC_ENRICHMENT_HEADERS), snippet, size and
    /// internal date.
    Metadata { headers: std::sync::Arc<[String]> },
    /// `format=minimal`: snippet, size and internal date.
    Minimal,
}

/// The scheduler's periods (see `scheduler::SchedulePolicy` for how they combine).
#[derive(Clone, Debug)]
pub struct SchedulerSettings {
    pub renew_interval: Duration,
    pub renew_jitter: Duration,
    pub renewals_per_minute: u32,
    pub claim_timeout: Duration,
    pub fallback_silence: Duration,
    pub fallback_jitter: Duration,
    pub tick: Duration,
    pub warn_horizon: Duration,
}

/// Where Gmail tokens come from (see `auth`). Modes combine: a mailbox with a stored refresh
/// token uses it, any other uses delegation when it is configured.
#[derive(Clone, Debug)]
pub struct AuthSettings {
    pub token_url: String,
    pub scopes: Vec<String>,
    pub delegation: Option<DelegationSettings>,
    pub oauth_client: Option<OAuthClient>,
    pub probe_mailbox: Option<Mailbox>,
    /// Development only; excludes the other modes.
    pub dev_access_token: Option<Secret>,
}

impl AuthSettings {
    /// The modes in use, for logs and `check-config`.
    pub fn describe(&self) -> String {
        if self.dev_access_token.is_some() {
            return "development access token".into();
        }
        let mut modes = Vec::new();
        match self.delegation.as_ref().map(|d| &d.signing) {
            Some(DelegationSigning::KeyFile(key)) => modes.push(format!(
                "domain-wide delegation as {} (key file)",
                key.client_email
            )),
            Some(DelegationSigning::Iam {
                service_account, ..
            }) => modes.push(format!(
                "domain-wide delegation as {service_account} (keyless, IAM signJwt)"
            )),
            None => {}
        }
        if let Some(client) = &self.oauth_client {
            modes.push(format!("per-user refresh tokens (client {})", client.id));
        }
        if modes.is_empty() {
            "none".into()
        } else {
            modes.join(" + ")
        }
    }
}

#[derive(Clone, Debug)]
pub struct DelegationSettings {
    pub signing: DelegationSigning,
}

#[derive(Clone, Debug)]
pub enum DelegationSigning {
    /// Locally, with the key file's private key.
    KeyFile(ServiceAccountKey),
    /// Keyless, by IAM Credentials `signJwt` with Application Default Credentials.
    Iam {
        service_account: String,
        iam_url: String,
    },
}

/// The fields of a service-account JSON key that are used; the whole file stays a secret.
#[derive(Clone, Debug)]
pub struct ServiceAccountKey {
    pub client_email: String,
    pub private_key_id: String,
    pub json: Secret,
}

#[derive(Clone, Debug)]
pub struct OAuthClient {
    pub id: String,
    pub secret: Secret,
}

/// The scope list, as parsed from `GMAIL_SYNC_GMAIL_SCOPES`.
#[derive(Clone, Debug)]
struct Scopes(Vec<String>);

/// The auth variables, gathered for [`auth_settings`].
struct AuthVariables {
    dev_access_token: Option<Secret>,
    token_url: String,
    scopes: Scopes,
    delegation_key_file: Option<ServiceAccountKey>,
    delegation_service_account: Option<String>,
    iam_credentials_url: String,
    oauth_client_id: Option<String>,
    oauth_client_secret: Option<Secret>,
    oauth_client_secret_file: Option<Secret>,
    probe_mailbox: Option<Mailbox>,
}

/// The rules between the auth variables: one delegation signer, a client id with exactly one
/// secret, no development token next to real credentials.
fn auth_settings(v: AuthVariables) -> Result<AuthSettings, ConfigError> {
    let conflict = |name: &'static str, problem: &str| ConfigError {
        name,
        problem: problem.to_string(),
    };
    let delegation = match (v.delegation_key_file, v.delegation_service_account) {
        (Some(_), Some(_)) => {
            return Err(conflict(
                "GMAIL_SYNC_DELEGATION_SERVICE_ACCOUNT",
                "set either GMAIL_SYNC_DELEGATION_KEY_FILE (sign with a key) or                  GMAIL_SYNC_DELEGATION_SERVICE_ACCOUNT (keyless, IAM signJwt), not both",
            ));
        }
        (Some(key), None) => Some(DelegationSettings {
            signing: DelegationSigning::KeyFile(key),
        }),
        (None, Some(service_account)) => Some(DelegationSettings {
            signing: DelegationSigning::Iam {
                service_account,
                iam_url: v.iam_credentials_url,
            },
        }),
        (None, None) => None,
    };
    let secret = match (v.oauth_client_secret, v.oauth_client_secret_file) {
        (Some(_), Some(_)) => {
            return Err(conflict(
                "GMAIL_SYNC_OAUTH_CLIENT_SECRET",
                "set GMAIL_SYNC_OAUTH_CLIENT_SECRET or GMAIL_SYNC_OAUTH_CLIENT_SECRET_FILE, not both",
            ));
        }
        (a, b) => a.or(b),
    };
    let oauth_client = match (v.oauth_client_id, secret) {
        (Some(id), Some(secret)) => Some(OAuthClient { id, secret }),
        (None, None) => None,
        (Some(_), None) => {
            return Err(conflict(
                "GMAIL_SYNC_OAUTH_CLIENT_SECRET_FILE",
                "required with GMAIL_SYNC_OAUTH_CLIENT_ID: the OAuth client's secret",
            ));
        }
        (None, Some(_)) => {
            return Err(conflict(
                "GMAIL_SYNC_OAUTH_CLIENT_ID",
                "required with an OAuth client secret: the OAuth client's id",
            ));
        }
    };
    if v.dev_access_token.is_some() && (delegation.is_some() || oauth_client.is_some()) {
        return Err(conflict(
            "GMAIL_SYNC_DEV_ACCESS_TOKEN",
            "a development token cannot be combined with delegation or OAuth client credentials: \
             unset it",
        ));
    }
    if v.probe_mailbox.is_some() && delegation.is_none() {
        return Err(conflict(
            "GMAIL_SYNC_PROBE_MAILBOX",
            "only used with domain-wide delegation (GMAIL_SYNC_DELEGATION_KEY_FILE or \
             GMAIL_SYNC_DELEGATION_SERVICE_ACCOUNT)",
        ));
    }
    Ok(AuthSettings {
        token_url: v.token_url,
        scopes: v.scopes.0,
        delegation,
        oauth_client,
        probe_mailbox: v.probe_mailbox,
        dev_access_token: v.dev_access_token,
    })
}

/// Where the keys of the refresh-token vault are (`vault::Vault::from_config` reads them).
#[derive(Clone, Debug, Default)]
pub struct TokenKeySettings {
    /// Seals new values and opens values sealed with it; `None`: no vault.
    pub current_file: Option<PathBuf>,
    /// Only opens values (during a rotation).
    pub previous_file: Option<PathBuf>,
}

/// Startup refused: names the variable and says what is expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration: {name}: {problem}")]
pub struct ConfigError {
    pub name: &'static str,
    pub problem: String,
}

impl Config {
    /// Loads from the process environment; a value that is not UTF-8 counts as unset.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::from_lookup(|name| std::env::var(name).ok())
    }

    /// Loads from any lookup (tests pass a map); no other variable is read. The files that
    /// variables name (the Redis CA and password files) are read here, so that a missing one
    /// stops startup naming its variable. Empty values count as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        Environment::parse(&lookup)?.into_config()
    }

    /// The subscription, which `run` needs.
    pub fn require_subscription(&self) -> Result<&str, ConfigError> {
        self.subscription.as_deref().ok_or(ConfigError {
            name: SUBSCRIPTION,
            problem: "required: the full subscription name, projects/PROJECT/subscriptions/NAME"
                .into(),
        })
    }

    /// The topic, which `mailbox add` passes to users.watch.
    pub fn require_topic(&self) -> Result<&str, ConfigError> {
        self.topic.as_deref().ok_or(ConfigError {
            name: TOPIC,
            problem: "required: the full topic name, projects/PROJECT/topics/NAME".into(),
        })
    }
}

impl Environment {
    /// Parses what `lookup` finds, with clap.
    ///
    /// clap's `Arg::env` reads the *process* environment when the argument is built, and its
    /// parser falls back to what it read. `from_lookup` must depend on its lookup alone
    /// (integration tests build several configs from different maps in one process), so the
    /// parser is a copy of the definition with that reading detached (`env(None)`), and each
    /// non-blank value the lookup finds is handed to it as the command line `--LONG=VALUE`
    /// (after `=`, clap takes the rest verbatim, leading `-` included). Defaults, value parsers
    /// and the typed struct are then clap's ordinary derive machinery. `from_env` is the same
    /// path with `std::env::var` as the lookup.
    fn parse(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Environment, ConfigError> {
        let command_line: Vec<String> = variables()
            .iter()
            .filter_map(|variable| {
                let value = lookup(variable.name).filter(|value| !value.trim().is_empty())?;
                Some(format!("--{}={value}", variable.long))
            })
            .collect();
        let mut parser = DEFINITION.clone().mut_args(|arg| arg.env(None::<&str>));
        let matches = parser
            .try_get_matches_from_mut(command_line)
            .map_err(|error| refused(&parser, &error))?;
        Ok(Environment::from_arg_matches(&matches)
            .expect("the matches come from Environment's own definition"))
    }

    /// The rules that involve more than one variable, and the `Config` the rest of the code uses.
    fn into_config(self) -> Result<Config, ConfigError> {
        // Destructured in full, so that a new field cannot be left out here by accident.
        let Environment {
            subscription,
            topic,
            redis_url,
            redis_cluster,
            redis_ca_file,
            redis_username,
            redis_password_file,
            key_prefix,
            shards,
            stream_maxlen,
            quarantine_maxlen,
            gmail_api_url,
            dev_access_token,
            token_url,
            gmail_scopes,
            delegation_key_file,
            delegation_service_account,
            iam_credentials_url,
            oauth_client_id,
            oauth_client_secret,
            oauth_client_secret_file,
            probe_mailbox,
            failure_settle,
            token_key_file,
            token_key_previous_file,
            max_concurrent_syncs,
            max_outstanding_messages,
            max_outstanding_bytes,
            ack_extension,
            max_lease,
            shutdown_timeout,
            mailbox_lease,
            history_page_size,
            resync_max_messages,
            enrichment,
            enrichment_headers,
            messages_get_cost,
            quota_governor,
            quota_table,
            quota_user_per_minute,
            quota_project_per_minute,
            quota_project_per_day,
            quota_user_in_flight,
            gmail_timeout,
            gmail_max_attempts,
            sync_retries,
            history_lag,
            coalesce_window,
            renew_interval,
            renew_jitter,
            renewals_per_minute,
            claim_timeout,
            fallback_silence,
            fallback_jitter,
            scheduler_tick,
            watch_warn_horizon,
            summary_interval,
            otel_sdk_disabled,
            otlp_endpoint,
            otlp_metrics_endpoint,
            // Checked by their value parser: `http/protobuf` is all there is.
            otlp_protocol: _,
            otlp_metrics_protocol: _,
            otlp_headers,
            otlp_metrics_headers,
            otlp_timeout,
            otlp_metrics_timeout,
            metric_export_interval,
            otlp_metrics_temporality,
            otel_resource_attributes,
            otel_service_name,
            pod_name,
            log_mailbox,
            log_hash_key_file,
            health_dir,
            pubsub_emulator,
            google_application_credentials: _,
            rust_log: _,
        } = self;
        let quota = {
            let mut q = QuotaSettings::of(quota_table);
            q.mode = quota_governor;
            if let Some(cost) = messages_get_cost {
                q.costs.messages_get = cost;
            }
            if let Some(limit) = quota_user_per_minute {
                q.limits.user_per_minute = limit;
            }
            if let Some(limit) = quota_project_per_minute {
                q.limits.project_per_minute = (limit > 0).then_some(limit);
            }
            if let Some(limit) = quota_project_per_day {
                q.limits.project_per_day = (limit > 0).then_some(limit);
            }
            q.limits.user_in_flight = quota_user_in_flight;
            q
        };
        let renew_jitter = renew_jitter.unwrap_or(renew_interval / 2);
        if renew_jitter >= renew_interval {
            return Err(ConfigError {
                name: "GMAIL_SYNC_RENEW_JITTER_SECS",
                problem: format!(
                    "expected less than GMAIL_SYNC_RENEW_INTERVAL_SECS ({}), got {}",
                    renew_interval.as_secs(),
                    renew_jitter.as_secs()
                ),
            });
        }
        let auth = auth_settings(AuthVariables {
            dev_access_token,
            token_url,
            scopes: gmail_scopes,
            delegation_key_file,
            delegation_service_account,
            iam_credentials_url,
            oauth_client_id,
            oauth_client_secret,
            oauth_client_secret_file,
            probe_mailbox,
        })?;
        if token_key_previous_file.is_some() && token_key_file.is_none() {
            return Err(ConfigError {
                name: TOKEN_KEY_PREVIOUS_FILE,
                problem: format!(
                    "requires {TOKEN_KEY_FILE} (the current key, which seals new tokens); \
                     during a rotation both are set"
                ),
            });
        }
        if history_lag >= max_lease {
            return Err(ConfigError {
                name: HISTORY_LAG,
                problem: format!(
                    "expected less than {MAX_LEASE} ({}), got {}: a notification must not outwait \
                     its message lease",
                    max_lease.as_secs(),
                    history_lag.as_secs()
                ),
            });
        }
        let log_mailbox = match log_mailbox {
            LogMailbox::Plain => MailboxLogStyle::Plain,
            // The key file is read only when hashes are logged (like an ignored Redis URL, an
            // unused file is not checked).
            LogMailbox::Hash => MailboxLogStyle::Hash(match log_hash_key_file {
                Some(path) => read_log_hash_key(&path)?,
                None => LogHashKey::random(),
            }),
        };
        let nodes = match redis_cluster {
            Some(cluster) => cluster,
            None => {
                redis_url_is_valid(&redis_url)
                    .map_err(|expected| variable(REDIS_URL).refuse(&expected, &redis_url))?;
                RedisNodes::Single(redis_url)
            }
        };
        if redis_ca_file.is_some() && !nodes.uses_tls() {
            // A CA for a plain connection would be ignored: the operator meant TLS.
            return Err(ConfigError {
                name: REDIS_CA_FILE,
                problem: format!(
                    "set, but Redis is reached without TLS ({}): use rediss:// URLs, or unset it",
                    nodes.describe()
                ),
            });
        }
        let url_has_password = || {
            nodes.urls().iter().any(|url| {
                redis::IntoConnectionInfo::into_connection_info(url.as_str())
                    .is_ok_and(|info| info.redis_settings().password().is_some())
            })
        };
        if redis_username.is_some() && redis_password_file.is_none() && !url_has_password() {
            // Redis logs in only with a password: a user alone would be ignored.
            return Err(ConfigError {
                name: "GMAIL_SYNC_REDIS_USERNAME",
                problem: "set without a password: set GMAIL_SYNC_REDIS_PASSWORD_FILE too".into(),
            });
        }
        let redis = RedisTarget {
            nodes,
            username: redis_username,
            password: redis_password_file,
            ca: redis_ca_file,
        };
        Ok(Config {
            subscription,
            topic,
            pubsub: pubsub_emulator.unwrap_or(PubSubEndpoint::Google),
            redis,
            store: StoreSettings {
                key_prefix,
                shards,
                stream_maxlen,
                quarantine_maxlen,
            },
            auth,
            gmail: GmailSettings {
                api_url: gmail_api_url,
                request_timeout: gmail_timeout,
                max_attempts: gmail_max_attempts,
                costs: quota.costs,
            },
            quota,
            consumer: ConsumerSettings {
                max_concurrent_syncs,
                max_outstanding_messages,
                max_outstanding_bytes,
                ack_extension,
                max_lease,
                shutdown_timeout,
                sync_retries,
                history_lag,
                coalesce_window,
            },
            sync: SyncSettings {
                failure_settle,
                mailbox_lease,
                history_page_size,
                resync_max_messages,
                enrichment: match enrichment {
                    EnrichmentMode::Off => Enrichment::Off,
                    EnrichmentMode::Minimal => Enrichment::Minimal,
                    EnrichmentMode::Metadata => Enrichment::Metadata {
                        headers: enrichment_headers.0.into(),
                    },
                },
            },
            scheduler: SchedulerSettings {
                renew_interval,
                renew_jitter,
                renewals_per_minute,
                claim_timeout,
                fallback_silence,
                fallback_jitter,
                tick: scheduler_tick,
                warn_horizon: watch_warn_horizon,
            },
            token_keys: TokenKeySettings {
                current_file: token_key_file,
                previous_file: token_key_previous_file,
            },
            summary_interval: (!summary_interval.is_zero()).then_some(summary_interval),
            metrics: metrics::settings(metrics::MetricsVariables {
                sdk_disabled: otel_sdk_disabled,
                endpoint: otlp_endpoint,
                metrics_endpoint: otlp_metrics_endpoint,
                headers: otlp_headers,
                metrics_headers: otlp_metrics_headers,
                timeout: otlp_timeout,
                metrics_timeout: otlp_metrics_timeout,
                interval: metric_export_interval,
                temporality: otlp_metrics_temporality,
                resource_attributes: otel_resource_attributes,
                service_name: otel_service_name,
                pod_name,
            })?,
            log_mailbox,
            health_dir,
        })
    }
}

/// The error startup prints for a value clap's parser refused.
fn refused(parser: &Command, error: &clap::Error) -> ConfigError {
    // clap names the argument by its display form (`--shards <SHARDS>`), keeps the value, and
    // keeps the value parser's message as the error's source.
    let context = |kind| match error.get(kind) {
        Some(ContextValue::String(text)) => Some(text.as_str()),
        _ => None,
    };
    let failing_arg = context(ContextKind::InvalidArg);
    let variable = parser
        .get_arguments()
        .find(|arg| failing_arg == Some(arg.to_string().as_str()))
        .and_then(|arg| variables().iter().find(|v| arg.get_long() == Some(v.long)))
        .unwrap_or_else(|| {
            panic!(
                "clap refused the environment without naming a variable ({})",
                error.kind()
            )
        });
    let expected = std::error::Error::source(error)
        .map_or_else(|| error.kind().to_string(), ToString::to_string);
    variable.refuse(
        &expected,
        context(ContextKind::InvalidValue).unwrap_or_default(),
    )
}

/// One environment variable as `--help` and README.md show it, read from its clap definition.
pub struct Variable {
    pub name: &'static str,
    pub meaning: String,
    /// `None`: unset unless given (some commands require it).
    pub default: Option<&'static str>,
    pub example: String,
    /// The value is never echoed, neither by `--help` nor in errors (clap's `hide_env_values`):
    /// it may hold a password or a token.
    pub secret: bool,
    /// The internal `--LONG` name that carries the value into clap's parser.
    long: &'static str,
}

/// Every variable, in the order of the definition.
pub fn variables() -> &'static [Variable] {
    &VARIABLES
}

/// The clap definition of [`Environment`], built once. Building it reads the process environment
/// (clap's `Arg::env` does), but nothing uses what it read: see [`Environment::parse`].
static DEFINITION: LazyLock<Command> = LazyLock::new(|| {
    Environment::augment_args(
        Command::new("gmail-sync environment")
            .no_binary_name(true)
            .disable_help_flag(true)
            .disable_version_flag(true),
    )
});

static VARIABLES: LazyLock<Vec<Variable>> =
    LazyLock::new(|| DEFINITION.get_arguments().map(Variable::of).collect());

impl Variable {
    fn of(arg: &'static clap::Arg) -> Variable {
        let name = arg
            .get_env()
            .and_then(|name| name.to_str())
            .expect("every field of Environment names its variable with `env`");
        let meaning = arg.get_help().map(ToString::to_string);
        let long_help = arg.get_long_help().map(ToString::to_string);
        let example = long_help
            .as_deref()
            .and_then(|help| help.split("\n\n").find_map(|p| p.strip_prefix("e.g. ")));
        let (Some(meaning), Some(example)) = (meaning.clone(), example) else {
            panic!("the doc comment of {name} needs its meaning, then an `e.g. EXAMPLE` paragraph");
        };
        Variable {
            name,
            meaning,
            default: arg
                .get_default_values()
                .first()
                .map(|default| default.to_str().expect("defaults are UTF-8")),
            example: example.to_string(),
            secret: arg.is_hide_env_values_set(),
            long: arg
                .get_long()
                .expect("every field of Environment has `long`"),
        }
    }

    /// Startup refuses `value`: says what is expected, and what was given unless it is secret.
    fn refuse(&'static self, expected: &str, value: &str) -> ConfigError {
        ConfigError {
            name: self.name,
            problem: if self.secret {
                expected.to_string()
            } else {
                format!("{expected}, got {value:?}")
            },
        }
    }
}

fn variable(name: &str) -> &'static Variable {
    variables()
        .iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("{name} is not defined in Environment"))
}

/// The variable table printed after `--help`.
pub(crate) fn help_table() -> String {
    let mut out = String::from("Environment variables:\n");
    for v in variables() {
        let default = v
            .default
            .map(|default| format!(" [default: {default}]"))
            .unwrap_or_default();
        out.push_str(&format!(
            "  {}\n      {}{}\n      e.g. {}\n",
            v.name, v.meaning, default, v.example
        ));
    }
    out
}

// The value parsers of `Environment`. Each one says only what it expects ("expected ...");
// `Variable::refuse` adds the variable's name and, unless it is secret, the value.

/// What clap accepts as a value parser: the parsed value, or what was expected.
trait ValueRule<T>: Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static {}

impl<T, F> ValueRule<T> for F where F: Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static {}

/// A whole number from `min` to `max` (`u64::MAX`: no upper bound), blanks around it allowed,
/// as the field's type `T` (the range fits it).
fn integer<T: TryFrom<u64> + 'static>(min: u64, max: u64) -> impl ValueRule<T> {
    move |value| {
        value
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|n| (min..=max).contains(n))
            .and_then(|n| T::try_from(n).ok())
            .ok_or_else(|| {
                if max == u64::MAX {
                    format!("expected an integer >= {min}")
                } else {
                    format!("expected an integer from {min} to {max}")
                }
            })
    }
}

/// A duration given as a whole number of seconds from `min` to `max`.
fn seconds(min: u64, max: u64) -> impl ValueRule<Duration> {
    let count = integer::<u64>(min, max);
    move |value| count(value).map(Duration::from_secs)
}

/// A duration given as a whole number of milliseconds from `min` to `max`.
fn milliseconds(min: u64, max: u64) -> impl ValueRule<Duration> {
    let count = integer::<u64>(min, max);
    move |value| count(value).map(Duration::from_millis)
}

/// A full Pub/Sub resource name, `projects/PROJECT/{kind}/NAME`.
fn resource_name(kind: &'static str) -> impl ValueRule<String> {
    move |value| {
        let parts: Vec<&str> = value.split('/').collect();
        let valid = parts.len() == 4
            && parts[0] == "projects"
            && !parts[1].is_empty()
            && parts[2] == kind
            && !parts[3].is_empty();
        if valid {
            Ok(value.to_string())
        } else {
            Err(format!("expected projects/PROJECT/{kind}/NAME"))
        }
    }
}

fn redis_url_is_valid(url: &str) -> Result<(), String> {
    redis::IntoConnectionInfo::into_connection_info(url)
        .map(|_| ())
        .map_err(|_| "expected a redis:// or rediss:// URL (e.g. redis://127.0.0.1:6379/)".into())
}

fn redis_cluster_nodes(value: &str) -> Result<RedisNodes, String> {
    let nodes: Vec<String> = value
        .split(',')
        .map(|node| node.trim().to_string())
        .filter(|node| !node.is_empty())
        .collect();
    for node in &nodes {
        redis_url_is_valid(node)?;
    }
    if nodes.is_empty() {
        return Err("expected at least one redis:// URL".into());
    }
    if nodes.iter().any(|n| is_tls_url(n)) != nodes.iter().all(|n| is_tls_url(n)) {
        return Err(
            "expected the same scheme on every node (all redis:// or all rediss://)".into(),
        );
    }
    Ok(RedisNodes::Cluster(nodes))
}

/// A file read at startup; the error names the path and the reason, never the contents.
fn read_file(path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("expected a readable file ({e})"))
}

/// PEM CA certificates, checked here so that a wrong file stops startup rather than every
/// connection attempt.
fn ca_file(value: &str) -> Result<CaFile, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let pem = read_file(value)?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("expected PEM certificates ({e})"))?;
    if certificates.is_empty() {
        return Err("expected PEM certificates (-----BEGIN CERTIFICATE-----), found none".into());
    }
    Ok(CaFile {
        path: PathBuf::from(value),
        pem,
    })
}

/// The password file's contents less one trailing newline (`echo` and most secret stores add
/// one; a password cannot end with one).
fn password_file(value: &str) -> Result<Secret, String> {
    let bytes = read_file(value)?;
    let text = String::from_utf8(bytes).map_err(|_| "expected a UTF-8 text file".to_string())?;
    let password = text
        .strip_suffix('\n')
        .map_or(text.as_str(), |t| t.strip_suffix('\r').unwrap_or(t));
    if password.is_empty() {
        return Err("expected a file holding the password, found an empty one".into());
    }
    Ok(Secret::new(password))
}

/// 1-64 characters that cannot break a key or its `{...}` hash tag.
fn key_prefix(value: &str) -> Result<String, String> {
    let valid = !value.is_empty()
        && value.len() <= 64
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if valid {
        Ok(value.to_string())
    } else {
        Err("expected 1-64 characters among letters, digits, '-', '_', '.', ':'".into())
    }
}

/// An http(s) base URL, kept without its trailing slashes (request paths are appended to it).
fn http_url(value: &str) -> Result<String, String> {
    if value.starts_with("http://") || value.starts_with("https://") {
        Ok(value.trim_end_matches('/').to_string())
    } else {
        Err("expected an http:// or https:// URL".into())
    }
}

/// GMAIL_SYNC_ENRICHMENT as given; the headers are added in `into_config`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EnrichmentMode {
    Off,
    Metadata,
    Minimal,
}

fn enrichment_mode(value: &str) -> Result<EnrichmentMode, String> {
    match value.trim() {
        "off" => Ok(EnrichmentMode::Off),
        "metadata" => Ok(EnrichmentMode::Metadata),
        "minimal" => Ok(EnrichmentMode::Minimal),
        _ => Err("expected `off`, `metadata` or `minimal`".into()),
    }
}

fn governor_mode(value: &str) -> Result<GovernorMode, String> {
    match value.trim() {
        "on" => Ok(GovernorMode::On),
        "off" => Ok(GovernorMode::Off),
        _ => Err("expected `on` or `off`".into()),
    }
}

fn quota_table(value: &str) -> Result<QuotaTable, String> {
    match value.trim() {
        "classic" => Ok(QuotaTable::Classic),
        "2026" => Ok(QuotaTable::Y2026),
        _ => Err("expected `classic` or `2026`".into()),
    }
}

/// GMAIL_SYNC_ENRICHMENT_HEADERS: header names as given (their case is kept for the request).
#[derive(Clone, Debug, PartialEq, Eq)]
struct HeaderNames(Vec<String>);

/// Headers per entry at most: each is a `metadataHeaders` parameter of every
/// `messages.get` (URL length) and a field of every entry (Redis memory).
const ENRICHMENT_HEADERS_MAX: usize = 20;

fn header_names(value: &str) -> Result<HeaderNames, String> {
    let names: Vec<String> = value
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(String::from)
        .collect();
    let expected = || {
        format!(
            "expected 1 to {ENRICHMENT_HEADERS_MAX} comma-separated header names (letters, \
             digits and -), none twice"
        )
    };
    let valid = |n: &String| n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    let mut seen = std::collections::HashSet::new();
    // Two names that differ only in case would be one header and one field.
    let distinct = names.iter().all(|n| seen.insert(n.to_ascii_lowercase()));
    if names.is_empty()
        || names.len() > ENRICHMENT_HEADERS_MAX
        || !names.iter().all(valid)
        || !distinct
    {
        return Err(expected());
    }
    Ok(HeaderNames(names))
}

/// GMAIL_SYNC_LOG_MAILBOX as given; the key is added in `into_config`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LogMailbox {
    Hash,
    Plain,
}

fn mailbox_log_style(value: &str) -> Result<LogMailbox, String> {
    match value {
        "hash" => Ok(LogMailbox::Hash),
        "plain" => Ok(LogMailbox::Plain),
        _ => Err("expected `hash` or `plain`".into()),
    }
}

/// A key file larger than this is not a key (a wrong path, e.g. a whole bundle).
const LOG_HASH_KEY_FILE_MAX: u64 = 4096;

/// Reads the log-hash key; errors name the variable and the path, never the content.
fn read_log_hash_key(path: &std::path::Path) -> Result<LogHashKey, ConfigError> {
    use std::io::Read;
    let refuse = |problem: String| ConfigError {
        name: LOG_HASH_KEY_FILE,
        problem,
    };
    let mut content = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(LOG_HASH_KEY_FILE_MAX + 1).read_to_end(&mut content))
        .map_err(|e| refuse(format!("cannot read {}: {e}", path.display())))?;
    if content.len() as u64 > LOG_HASH_KEY_FILE_MAX {
        return Err(refuse(format!(
            "{} is larger than {LOG_HASH_KEY_FILE_MAX} bytes: expected a key file",
            path.display()
        )));
    }
    LogHashKey::from_secret(&content).map_err(|e| refuse(format!("{}: {e}", path.display())))
}

/// `HOST:PORT` of the Pub/Sub emulator, which speaks plain HTTP.
fn emulator_host(value: &str) -> Result<PubSubEndpoint, String> {
    let valid = value
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if valid && !value.contains("://") {
        Ok(PubSubEndpoint::Emulator(format!("http://{value}")))
    } else {
        Err("expected HOST:PORT (e.g. 127.0.0.1:8085)".into())
    }
}

fn secret(value: &str) -> Result<Secret, String> {
    Ok(Secret::new(value))
}

/// Longest secret file read (a key file is ~2.4 KB; anything much larger is the wrong file).
const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// The contents of a secret file; the path is not secret and is named in errors.
fn read_secret_file(path: &str) -> Result<String, String> {
    let size = std::fs::metadata(path)
        .map_err(|e| format!("expected a readable file, cannot read {path}: {e}"))?
        .len();
    if size > MAX_SECRET_FILE_BYTES {
        return Err(format!(
            "expected a small secret file, {path} has {size} bytes"
        ));
    }
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))
}

/// A file holding one secret; a trailing newline (as editors and `kubectl create secret
/// --from-file` leave it) is not part of it.
fn secret_file(path: &str) -> Result<Secret, String> {
    let contents = read_secret_file(path)?;
    let value = contents.trim_end_matches(['\n', '\r']);
    if value.is_empty() {
        return Err(format!("expected a non-empty secret in {path}"));
    }
    Ok(Secret::new(value))
}

/// A service-account JSON key file, checked for the fields signing needs.
fn service_account_key_file(path: &str) -> Result<ServiceAccountKey, String> {
    let contents = read_secret_file(path)?;
    let json: serde_json::Value = serde_json::from_str(&contents)
        .map_err(|_| format!("expected a service-account JSON key in {path}, it is not JSON"))?;
    let field = |name: &str| {
        json.get(name)
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty())
            .map(str::to_string)
            .ok_or_else(|| format!("expected a service-account JSON key in {path}: no {name:?}"))
    };
    if field("type")? != "service_account" {
        return Err(format!(
            "expected a key of type \"service_account\" in {path} (an OAuth client or user \
             credential file does not sign delegation assertions)"
        ));
    }
    field("private_key")?;
    Ok(ServiceAccountKey {
        client_email: field("client_email")?,
        private_key_id: field("private_key_id")?,
        json: Secret::new(contents),
    })
}

fn service_account_email(value: &str) -> Result<String, String> {
    let value = value.trim();
    if value.contains('@') && !value.contains(char::is_whitespace) {
        Ok(value.to_string())
    } else {
        Err("expected a service account email, NAME@PROJECT.iam.gserviceaccount.com".into())
    }
}

fn scopes(value: &str) -> Result<Scopes, String> {
    let scopes: Vec<String> = value
        .split([' ', ','])
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if scopes.is_empty() || scopes.iter().any(|s| !s.starts_with("https://")) {
        return Err("expected space-separated scope URLs, e.g. https://www.googleapis.com/auth/gmail.metadata".into());
    }
    Ok(Scopes(scopes))
}

fn probe_mailbox(value: &str) -> Result<Mailbox, String> {
    Mailbox::parse(value).map_err(|e| format!("expected an email address ({})", e.0))
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
        for v in variables() {
            assert!(readme.contains(v.name), "README.md lacks {}", v.name);
        }
        // The table row says what the definition says: meaning, default and example.
        let row = |v: &Variable| {
            let default = v.default.map_or("—".to_string(), |d| format!("`{d}`"));
            format!(
                "| `{}` | {} | {default} | `{}` |",
                v.name, v.meaning, v.example
            )
        };
        let table: Vec<String> = variables().iter().map(row).collect();
        let stale: Vec<&String> = table.iter().filter(|r| !readme.contains(*r)).collect();
        assert!(
            stale.is_empty(),
            "README.md's environment table differs from the definitions in rows:\n{}\n\nthe table \
             should read:\n{}",
            stale
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
            table.join("\n")
        );
        let section = readme
            .split("### Environment variables")
            .nth(1)
            .and_then(|rest| rest.split("\n#").next())
            .expect("README.md has an Environment variables section");
        for line in section.lines().filter(|l| l.starts_with("| `")) {
            assert!(
                table.iter().any(|r| r == line),
                "README.md documents a variable that is not defined: {line}"
            );
        }
    }

    #[test]
    fn every_variable_has_a_meaning_and_an_example() {
        for v in variables() {
            assert!(!v.meaning.is_empty() && !v.example.is_empty(), "{}", v.name);
        }
    }

    #[test]
    fn empty_values_count_as_unset() {
        for blank in ["", "  "] {
            let c = load(&[
                ("GMAIL_SYNC_SHARDS", blank),
                ("GMAIL_SYNC_SUBSCRIPTION", blank),
            ])
            .unwrap();
            assert_eq!(c.store.shards, 16);
            assert_eq!(c.subscription, None);
        }
    }

    /// Integration tests build configs from maps in one process: the process environment must
    /// not leak into `from_lookup`. Setting variables here would race with the other tests, so
    /// the check runs in a copy of this test binary whose environment holds them.
    #[test]
    fn only_the_lookup_is_read() {
        const IN_CHILD: &str = "GMAIL_SYNC_CONFIG_TEST_CHILD";
        if std::env::var_os(IN_CHILD).is_some() {
            let c = load(&[]).unwrap();
            assert_eq!(c.store.shards, 16);
            assert!(c.auth.dev_access_token.is_none());
            assert_eq!(load(&[("GMAIL_SYNC_SHARDS", "8")]).unwrap().store.shards, 8);
            let c = Config::from_env().unwrap();
            assert_eq!(c.store.shards, 7);
            assert_eq!(
                c.auth.dev_access_token.as_ref().map(Secret::expose),
                Some("from-the-process")
            );
            assert!(!help_table().contains("from-the-process"));
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "config::tests::only_the_lookup_is_read"])
            .env(IN_CHILD, "1")
            .env("GMAIL_SYNC_SHARDS", "7")
            .env("GMAIL_SYNC_DEV_ACCESS_TOKEN", "from-the-process")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("1 passed"),
            "{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn refusals_say_what_is_expected_as_before() {
        let problem = |name: &str, value: &str| load(&[(name, value)]).unwrap_err().problem;
        assert_eq!(
            problem("GMAIL_SYNC_SHARDS", "lots"),
            "expected an integer from 1 to 1024, got \"lots\""
        );
        assert_eq!(
            problem("GMAIL_SYNC_STREAM_MAXLEN", "999"),
            "expected an integer >= 1000, got \"999\""
        );
        assert_eq!(
            problem("GMAIL_SYNC_SUBSCRIPTION", "my-sub"),
            "expected projects/PROJECT/subscriptions/NAME, got \"my-sub\""
        );
        assert_eq!(
            problem("PUBSUB_EMULATOR_HOST", "localhost"),
            "expected HOST:PORT (e.g. 127.0.0.1:8085), got \"localhost\""
        );
        assert_eq!(
            problem("GMAIL_SYNC_REDIS_CLUSTER_NODES", " , "),
            "expected at least one redis:// URL"
        );
        // A value starting with '-' is a value, not an option.
        assert_eq!(
            problem("GMAIL_SYNC_SHARDS", "-5"),
            "expected an integer from 1 to 1024, got \"-5\""
        );
    }

    /// A file in a fresh directory of its own, for the file-reading variables.
    fn temp_file(name: &str, contents: &[u8]) -> String {
        let dir = std::env::temp_dir().join(format!(
            "gmail-sync-config-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path.display().to_string()
    }

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";

    #[test]
    fn redis_tls_and_password_file_are_read() {
        let password = temp_file("password", b"s3cret-pw\n");
        let ca = temp_file("ca.pem", PEM.as_bytes());
        let c = load(&[
            ("GMAIL_SYNC_REDIS_URL", "rediss://redis.internal:6380/0"),
            ("GMAIL_SYNC_REDIS_CA_FILE", &ca),
            ("GMAIL_SYNC_REDIS_USERNAME", "gmail-sync"),
            ("GMAIL_SYNC_REDIS_PASSWORD_FILE", &password),
        ])
        .unwrap();
        assert!(c.redis.uses_tls());
        assert_eq!(c.redis.describe(), "rediss://redis.internal:6380");
        assert_eq!(
            c.redis.password.as_ref().map(Secret::expose),
            Some("s3cret-pw")
        );
        assert_eq!(c.redis.username.as_deref(), Some("gmail-sync"));
        assert_eq!(
            c.redis.ca.as_ref().map(|ca| ca.pem.as_slice()),
            Some(PEM.as_bytes())
        );
        assert!(!format!("{c:?}").contains("s3cret-pw"));
        // CRLF too; a password of its own stays as it is.
        let crlf = temp_file("password", b"pw\r\n");
        let c = load(&[("GMAIL_SYNC_REDIS_PASSWORD_FILE", &crlf)]).unwrap();
        assert_eq!(c.redis.password.unwrap().expose(), "pw");
        // Cluster: every node rediss://.
        let c = load(&[
            (
                "GMAIL_SYNC_REDIS_CLUSTER_NODES",
                "rediss://10.0.0.1:6379,rediss://10.0.0.2:6379",
            ),
            ("GMAIL_SYNC_REDIS_CA_FILE", &ca),
        ])
        .unwrap();
        assert!(c.redis.uses_tls() && c.redis.ca.is_some());
    }

    #[test]
    fn redis_files_and_tls_mistakes_name_the_variable() {
        let empty = temp_file("password", b"\n");
        let not_pem = temp_file("ca.pem", b"hello");
        let ca = temp_file("ca.pem", PEM.as_bytes());
        type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);
        let cases: [Case; 6] = [
            (
                &[("GMAIL_SYNC_REDIS_PASSWORD_FILE", "/nonexistent/password")],
                "GMAIL_SYNC_REDIS_PASSWORD_FILE",
                "expected a readable file (No such file or directory (os error 2)), got \"/nonexistent/password\"",
            ),
            (
                &[("GMAIL_SYNC_REDIS_PASSWORD_FILE", &empty)],
                "GMAIL_SYNC_REDIS_PASSWORD_FILE",
                "found an empty one",
            ),
            (
                &[
                    ("GMAIL_SYNC_REDIS_URL", "rediss://h:6380"),
                    ("GMAIL_SYNC_REDIS_CA_FILE", "/nonexistent/ca.pem"),
                ],
                "GMAIL_SYNC_REDIS_CA_FILE",
                "expected a readable file",
            ),
            (
                &[
                    ("GMAIL_SYNC_REDIS_URL", "rediss://h:6380"),
                    ("GMAIL_SYNC_REDIS_CA_FILE", &not_pem),
                ],
                "GMAIL_SYNC_REDIS_CA_FILE",
                "found none",
            ),
            (
                &[("GMAIL_SYNC_REDIS_CA_FILE", &ca)],
                "GMAIL_SYNC_REDIS_CA_FILE",
                "use rediss:// URLs",
            ),
            (
                &[("GMAIL_SYNC_REDIS_USERNAME", "gmail-sync")],
                "GMAIL_SYNC_REDIS_USERNAME",
                "GMAIL_SYNC_REDIS_PASSWORD_FILE",
            ),
        ];
        for (pairs, name, expected) in cases {
            let err = load(pairs).unwrap_err();
            assert_eq!(err.name, name, "{err}");
            assert!(err.problem.contains(expected), "{err}");
        }
        let err = load(&[(
            "GMAIL_SYNC_REDIS_CLUSTER_NODES",
            "rediss://10.0.0.1:6379,redis://10.0.0.2:6379",
        )])
        .unwrap_err();
        assert!(err.problem.contains("same scheme"), "{err}");
        // A user with the URL's password is fine.
        load(&[
            ("GMAIL_SYNC_REDIS_URL", "redis://:pw@h:6379"),
            ("GMAIL_SYNC_REDIS_USERNAME", "gmail-sync"),
        ])
        .unwrap();
    }

    #[test]
    fn values_are_read_as_before() {
        let c = load(&[
            ("GMAIL_SYNC_SHARDS", " 64 "),
            ("GMAIL_SYNC_GMAIL_API_URL", "http://127.0.0.1:8085//"),
            ("GMAIL_SYNC_SUMMARY_INTERVAL_SECS", "0"),
            ("GMAIL_SYNC_LOG_MAILBOX", "plain"),
            ("GMAIL_SYNC_MAILBOX_LEASE_MS", "1500"),
            (
                "GMAIL_SYNC_REDIS_CLUSTER_NODES",
                "redis://10.0.0.1:6379, ,redis://10.0.0.2:6379",
            ),
            // Ignored with cluster nodes, so not checked (as before).
            ("GMAIL_SYNC_REDIS_URL", "not a url"),
        ])
        .unwrap();
        assert_eq!(c.store.shards, 64);
        assert_eq!(c.gmail.api_url, "http://127.0.0.1:8085");
        assert_eq!(c.summary_interval, None);
        assert_eq!(c.log_mailbox, MailboxLogStyle::Plain);
        assert_eq!(c.sync.mailbox_lease, Duration::from_millis(1500));
        assert!(
            matches!(c.redis.nodes, RedisNodes::Cluster(ref n) if n == &["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"])
        );
        let c = load(&[]).unwrap();
        assert_eq!(c.summary_interval, Some(Duration::from_secs(60)));
        assert_eq!(c.consumer.ack_extension, Duration::from_secs(60));
        assert_eq!(c.gmail.api_url, "https://gmail.googleapis.com");
        assert!(c.redis == RedisTarget::new(RedisNodes::Single("redis://127.0.0.1:6379/".into())));
    }

    #[test]
    fn secrets_are_never_echoed() {
        for name in [
            "GMAIL_SYNC_REDIS_URL",
            "GMAIL_SYNC_REDIS_CLUSTER_NODES",
            "GMAIL_SYNC_DEV_ACCESS_TOKEN",
        ] {
            assert!(
                variable(name).secret,
                "{name} must be marked hide_env_values"
            );
        }
        for (name, value) in [
            (
                "GMAIL_SYNC_REDIS_URL",
                "redis-ish://:hunter2@10.1.2.3:6379/",
            ),
            (
                "GMAIL_SYNC_REDIS_CLUSTER_NODES",
                "redis://:hunter2@10.0.0.1:6379,http://:hunter2@x",
            ),
        ] {
            let err = load(&[(name, value)]).unwrap_err();
            assert_eq!(err.name, name);
            assert!(!err.to_string().contains("hunter2"), "{err}");
        }
        // `--help` shows examples and defaults, never what the environment holds.
        assert!(!help_table().contains("hunter2"));
    }

    #[test]
    fn help_lists_every_variable_with_meaning_default_and_example() {
        let help = help_table();
        for v in variables() {
            let default = v
                .default
                .map(|d| format!(" [default: {d}]"))
                .unwrap_or_default();
            let entry = format!(
                "  {}\n      {}{default}\n      e.g. {}\n",
                v.name, v.meaning, v.example
            );
            assert!(help.contains(&entry), "--help lacks {entry}");
        }
    }

    /// Ranges written in a meaning, "(MIN-MAX" or "(at least MIN", are the ones enforced; every
    /// integer variable states its range.
    #[test]
    fn stated_ranges_are_the_enforced_ones() {
        for v in variables() {
            let refused = |value: &str| load(&[(v.name, value)]).is_err();
            let stated = v.meaning.split('(').skip(1).find_map(|part| {
                let digits = |s: &str| {
                    s.chars()
                        .take_while(char::is_ascii_digit)
                        .collect::<String>()
                };
                if let Some(rest) = part.strip_prefix("at least ") {
                    return Some((digits(rest).parse::<u64>().ok()?, None));
                }
                let min = digits(part);
                let max = digits(part.strip_prefix(&format!("{min}-"))?);
                Some((min.parse().ok()?, Some(max.parse::<u64>().ok()?)))
            });
            let is_integer =
                load(&[(v.name, "x")]).is_err_and(|e| e.problem.starts_with("expected an integer"));
            let Some((min, max)) = stated else {
                assert!(!is_integer, "{} should state its range", v.name);
                continue;
            };
            assert!(is_integer, "{}", v.name);
            assert!(!refused(&min.to_string()), "{} refuses {min}", v.name);
            if min > 0 {
                assert!(
                    refused(&(min - 1).to_string()),
                    "{} accepts {}",
                    v.name,
                    min - 1
                );
            }
            if let Some(max) = max {
                assert!(!refused(&max.to_string()), "{} refuses {max}", v.name);
                assert!(
                    refused(&(max + 1).to_string()),
                    "{} accepts {}",
                    v.name,
                    max + 1
                );
            }
        }
    }

    #[test]
    fn quota_settings_are_a_table_with_overrides() {
        let c = load(&[]).unwrap();
        assert_eq!(c.quota, QuotaSettings::of(QuotaTable::Classic));
        assert_eq!(c.quota.mode, GovernorMode::On);
        let c = load(&[("GMAIL_SYNC_QUOTA_TABLE", "2026")]).unwrap();
        assert_eq!(c.quota.limits.user_per_minute, 6_000);
        assert_eq!(c.quota.limits.project_per_day, Some(80_000_000));
        assert_eq!(
            c.gmail.costs.messages_get, 20,
            "the table's cost is the client's"
        );
        let c = load(&[
            ("GMAIL_SYNC_QUOTA_TABLE", "2026"),
            ("GMAIL_SYNC_QUOTA_GOVERNOR", "off"),
            ("GMAIL_SYNC_MESSAGES_GET_COST", "7"),
            ("GMAIL_SYNC_QUOTA_USER_PER_MINUTE", "100"),
            ("GMAIL_SYNC_QUOTA_PROJECT_PER_MINUTE", "0"),
            ("GMAIL_SYNC_QUOTA_PROJECT_PER_DAY", "0"),
            ("GMAIL_SYNC_QUOTA_USER_IN_FLIGHT", "3"),
        ])
        .unwrap();
        assert_eq!(c.quota.mode, GovernorMode::Off);
        assert_eq!(c.quota.costs.messages_get, 7);
        assert_eq!(c.gmail.costs.messages_get, 7);
        assert_eq!(c.quota.limits.user_per_minute, 100);
        assert_eq!(c.quota.limits.project_per_minute, None);
        assert_eq!(c.quota.limits.project_per_day, None);
        assert_eq!(c.quota.limits.user_in_flight, 3);
        for (name, bad) in [
            ("GMAIL_SYNC_QUOTA_GOVERNOR", "maybe"),
            ("GMAIL_SYNC_QUOTA_TABLE", "2025"),
            ("GMAIL_SYNC_QUOTA_USER_PER_MINUTE", "0"),
            ("GMAIL_SYNC_QUOTA_USER_IN_FLIGHT", "0"),
            ("GMAIL_SYNC_QUOTA_PROJECT_PER_DAY", "-1"),
        ] {
            assert_eq!(load(&[(name, bad)]).unwrap_err().name, name, "{bad}");
        }
    }

    #[test]
    fn enrichment_settings() {
        let c = load(&[]).unwrap();
        let Enrichment::Metadata { headers } = &c.sync.enrichment else {
            panic!("metadata by default");
        };
        assert_eq!(
            headers.join(","),
            "From,To,Cc,Subject,Date,Message-ID,In-Reply-To"
        );
        assert_eq!(c.gmail.costs.messages_get, 5);
        let c = load(&[
            ("GMAIL_SYNC_ENRICHMENT", "minimal"),
            ("GMAIL_SYNC_MESSAGES_GET_COST", "20"),
        ])
        .unwrap();
        assert_eq!(c.sync.enrichment, Enrichment::Minimal);
        assert_eq!(c.gmail.costs.messages_get, 20);
        let c = load(&[("GMAIL_SYNC_ENRICHMENT_HEADERS", " List-Id , From,")]).unwrap();
        assert_eq!(
            c.sync.enrichment,
            Enrichment::Metadata {
                headers: vec!["List-Id".to_string(), "From".to_string()].into()
            }
        );
        assert_eq!(
            load(&[("GMAIL_SYNC_ENRICHMENT", "all")]).unwrap_err().name,
            "GMAIL_SYNC_ENRICHMENT"
        );
        let many = (0..=ENRICHMENT_HEADERS_MAX)
            .map(|i| format!("X-{i}"))
            .collect::<Vec<_>>()
            .join(",");
        for bad in ["From,from", "Fr om", "From:", ",", many.as_str()] {
            let e = load(&[("GMAIL_SYNC_ENRICHMENT_HEADERS", bad)]).unwrap_err();
            assert_eq!(e.name, "GMAIL_SYNC_ENRICHMENT_HEADERS", "{bad}");
        }
    }

    #[test]
    fn a_previous_token_key_needs_a_current_one() {
        let err = load(&[("GMAIL_SYNC_TOKEN_KEY_PREVIOUS_FILE", "/keys/old")]).unwrap_err();
        assert_eq!(err.name, "GMAIL_SYNC_TOKEN_KEY_PREVIOUS_FILE");
        assert!(err.problem.contains("GMAIL_SYNC_TOKEN_KEY_FILE"), "{err}");
        let c = load(&[
            ("GMAIL_SYNC_TOKEN_KEY_FILE", "/keys/new"),
            ("GMAIL_SYNC_TOKEN_KEY_PREVIOUS_FILE", "/keys/old"),
        ])
        .unwrap();
        assert_eq!(
            c.token_keys.current_file.as_deref(),
            Some(std::path::Path::new("/keys/new"))
        );
        assert!(c.token_keys.previous_file.is_some());
    }

    #[test]
    fn log_hash_key_comes_from_its_file_or_is_random_per_process() {
        use crate::mailbox::{KeyOrigin, Mailbox};
        let dir = std::env::temp_dir().join(format!("gmail-sync-key-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good");
        std::fs::write(&good, "0123456789abcdef0123456789abcdef\n").unwrap();
        let short = dir.join("short");
        std::fs::write(&short, "hunter2hunter2\n").unwrap();
        let path = |p: &std::path::Path| p.display().to_string();
        let m = Mailbox::parse("alice@example.com").unwrap();

        let a = load(&[(LOG_HASH_KEY_FILE, &path(&good))]).unwrap();
        let b = load(&[(LOG_HASH_KEY_FILE, &path(&good))]).unwrap();
        let MailboxLogStyle::Hash(key) = a.log_mailbox else {
            panic!("hash is the default")
        };
        assert_eq!(key.origin(), KeyOrigin::File);
        assert_eq!(
            m.for_log(a.log_mailbox),
            m.for_log(b.log_mailbox),
            "one key, one pseudonym"
        );

        let r1 = load(&[]).unwrap();
        let r2 = load(&[]).unwrap();
        assert!(
            matches!(r1.log_mailbox, MailboxLogStyle::Hash(k) if k.origin() == KeyOrigin::Random)
        );
        assert_ne!(m.for_log(r1.log_mailbox), m.for_log(r2.log_mailbox));

        let err = load(&[(LOG_HASH_KEY_FILE, &path(&short))]).unwrap_err();
        assert_eq!(err.name, LOG_HASH_KEY_FILE);
        assert!(err.problem.contains("at least 32"), "{err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        let err = load(&[(LOG_HASH_KEY_FILE, &path(&dir.join("missing")))]).unwrap_err();
        assert_eq!(err.name, LOG_HASH_KEY_FILE);
        // Not read when addresses are logged in plain.
        let c = load(&[
            (LOG_HASH_KEY_FILE, &path(&dir.join("missing"))),
            ("GMAIL_SYNC_LOG_MAILBOX", "plain"),
        ])
        .unwrap();
        assert_eq!(c.log_mailbox, MailboxLogStyle::Plain);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn history_lag_must_stay_inside_the_message_lease() {
        let c = load(&[]).unwrap();
        assert_eq!(c.consumer.history_lag, Duration::from_secs(45));
        assert!(c.consumer.history_lag < c.consumer.max_lease);
        let err = load(&[(HISTORY_LAG, "300"), (MAX_LEASE, "300")]).unwrap_err();
        assert_eq!(err.name, HISTORY_LAG);
        assert!(load(&[(HISTORY_LAG, "299"), (MAX_LEASE, "300")]).is_ok());
    }

    #[test]
    fn flow_control_bytes_default_is_far_below_the_pod_limit() {
        let c = load(&[]).unwrap();
        assert_eq!(c.consumer.max_outstanding_bytes, 16 << 20);
        let limit = include_str!("../deploy/k8s/deployment.yaml")
            .lines()
            .skip_while(|l| !l.contains("limits:"))
            .find_map(|l| l.trim().strip_prefix("memory: "))
            .and_then(|v| v.strip_suffix("Mi"))
            .and_then(|v| v.parse::<i64>().ok())
            .expect("deployment.yaml has a memory limit in Mi");
        assert!(
            c.consumer.max_outstanding_bytes * 4 <= limit << 20,
            "flow control may hold a quarter of the pod's memory at most"
        );
    }

    #[test]
    fn required_values_name_defined_variables() {
        let c = load(&[]).unwrap();
        for err in [
            c.require_subscription().unwrap_err(),
            c.require_topic().unwrap_err(),
        ] {
            assert_eq!(variable(err.name).default, None);
        }
    }
}
