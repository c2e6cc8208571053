//! Simulator configuration.

use std::time::Duration;

/// Quota limits (all `None` = unlimited, the default).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct QuotaConfig {
    /// Units per user per sliding 60 s window (Gmail: 15,000; 6,000 for new projects).
    pub per_user_per_minute: Option<u64>,
    /// Units per project per sliding 60 s window (Gmail: 1,200,000).
    pub per_project_per_minute: Option<u64>,
    /// Units per project per sliding 24 h (Gmail: 80,000,000 for projects created from May
    /// 2026; none before). Refused with 403 `dailyLimitExceeded` in either error style.
    pub per_project_per_day: Option<u64>,
    /// Calls in flight per user (Gmail answers 429 above ~10).
    pub max_concurrent_per_user: Option<u32>,
    /// Which of Gmail's cost tables the simulated project is under.
    pub table: CostTable,
}

/// Gmail's two quota tables' method costs (shared/reference/apis.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CostTable {
    /// Projects that used the API before May 2026: `messages.get` 5.
    #[default]
    #[serde(rename = "classic")]
    Classic,
    /// Projects created from May 2026: `messages.get` 20 (`history.list`, `messages.list`,
    /// `getProfile` unchanged; `watch` and `stop` were not published: kept).
    #[serde(rename = "2026")]
    Y2026,
}

impl QuotaConfig {
    /// Gmail's published limits for projects that used the API before May 2026.
    pub fn gmail() -> Self {
        QuotaConfig {
            per_user_per_minute: Some(15_000),
            per_project_per_minute: Some(1_200_000),
            per_project_per_day: None,
            max_concurrent_per_user: Some(10),
            table: CostTable::Classic,
        }
    }

    /// Gmail's published limits for projects created from May 2026.
    pub fn gmail_2026() -> Self {
        QuotaConfig {
            per_user_per_minute: Some(6_000),
            per_project_per_day: Some(80_000_000),
            table: CostTable::Y2026,
            ..QuotaConfig::gmail()
        }
    }

    /// Units one call of `endpoint` costs under this table.
    pub fn cost(&self, endpoint: super::Endpoint) -> u64 {
        match (self.table, endpoint) {
            (CostTable::Y2026, super::Endpoint::MessagesGet) => 20,
            _ => endpoint.cost(),
        }
    }
}

/// How a quota refusal looks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum QuotaErrorStyle {
    /// 429 `RESOURCE_EXHAUSTED`, reason `rateLimitExceeded` (both windows).
    #[default]
    TooManyRequests,
    /// 403 `PERMISSION_DENIED`, reason `userRateLimitExceeded` (per-user window) or
    /// `rateLimitExceeded` (project window).
    Forbidden,
}

/// Everything configurable. `Default` gives an unlimited, fault-free simulator that does not
/// publish notifications.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Port to listen on (127.0.0.1); 0 = any free port.
    pub port: u16,
    /// The Pub/Sub emulator (`http://127.0.0.1:PORT`). `None`: watch works, nothing is published
    /// (the ledger records the notification as `NoEndpoint`).
    pub pubsub_endpoint: Option<String>,
    /// Publish `"historyId": 123` (number) instead of `"historyId": "123"` (string, the default).
    pub notify_history_id_as_number: bool,
    /// Probability (0..=1) that a notification is dropped instead of published.
    pub notify_drop_probability: f64,
    /// A random delay (uniform in [min, max]) before each publish.
    pub notify_delay: Option<(Duration, Duration)>,
    /// At most one notification per mailbox per interval (Gmail: 1 s); changes within the
    /// interval fold into one notification sent when it is over.
    pub notify_min_interval: Duration,
    /// How long a watch lasts (Gmail: 7 days); after it, no notifications.
    pub watch_lifetime: Duration,
    /// How long a `users.watch` call stays "in processing" for its mailbox after its request
    /// was validated (0 = the default: validation, conflict check and registration are one atomic
    /// step). While a watch is in processing, another `watch` for the same mailbox is answered 400
    /// "Only one user push notification client allowed per developer" (what Gmail does to
    /// racing watch calls). Changeable at runtime ([`super::GmailSim::set_watch_processing`]).
    pub watch_processing: Duration,
    /// If set, `watch` only accepts topics of this project (Gmail requires the caller's project).
    pub project: Option<String>,
    pub quota: QuotaConfig,
    pub quota_error_style: QuotaErrorStyle,
    /// Lifetime of issued access tokens (Google: 3600 s).
    pub token_lifetime: Duration,
    /// Bearer tokens valid for every mailbox, forever (development tokens).
    pub static_tokens: Vec<String>,
    /// Valid refresh tokens: (refresh token, mailbox).
    pub refresh_tokens: Vec<(String, String)>,
    /// If set, the refresh-token grant requires this (client_id, client_secret).
    pub oauth_client: Option<(String, String)>,
    /// PEM public key that verifies delegation JWTs (RS256). `None`: the JWT grant is refused.
    pub service_account_public_key_pem: Option<String>,
    /// If set, a delegation JWT's `iss` must equal it.
    pub service_account_email: Option<String>,
    /// Scopes the Workspace admin authorized for the delegating client (Admin console,
    /// domain-wide delegation). A delegation JWT asking for any other scope is refused with
    /// `unauthorized_client`, as Google does. `None`: any scope.
    pub delegation_scopes: Option<Vec<String>>,
    /// The fake IAM Credentials `signJwt`: the private key (PKCS#8 PEM) of the service account
    /// it signs for, that account's email, and the key id it reports. `None`: signJwt is 404.
    pub iam_signer: Option<IamSigner>,
    /// Seed of every random choice (historyId gaps, ids, drops, delays, bursts).
    pub seed: u64,
    /// historyId increment per change, uniform in [min, max] (Gmail: increasing, not contiguous).
    pub history_id_gap: (u64, u64),
    /// Initial historyId of `add_mailbox` (`None`: random in 1,000..=10,000,000).
    pub initial_history_id: Option<u64>,
    /// Time-based history retention (records older than this are dropped; a startHistoryId
    /// before a dropped record answers 404). `None`: kept until `expire_history`.
    pub history_retention: Option<Duration>,
    /// How long a change stays invisible to `history.list` after it happened (its notification
    /// is sent at once): Gmail's history can lag its push notification by a moment. While a
    /// change is invisible, `history.list` answers as of just before it (its records and its
    /// `historyId` stop there). Zero (the default): visible at once. Changeable at runtime
    /// ([`super::GmailSim::set_history_lag`]).
    pub history_lag: Duration,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            port: 0,
            pubsub_endpoint: None,
            notify_history_id_as_number: false,
            notify_drop_probability: 0.0,
            notify_delay: None,
            notify_min_interval: Duration::from_secs(1),
            watch_lifetime: Duration::from_secs(7 * 24 * 3600),
            watch_processing: Duration::ZERO,
            project: None,
            quota: QuotaConfig::default(),
            quota_error_style: QuotaErrorStyle::default(),
            token_lifetime: Duration::from_secs(3600),
            static_tokens: Vec::new(),
            refresh_tokens: Vec::new(),
            oauth_client: None,
            service_account_public_key_pem: None,
            service_account_email: None,
            delegation_scopes: None,
            iam_signer: None,
            seed: 0x5EED_6D41_1C0D_E5EE,
            history_id_gap: (1, 20),
            initial_history_id: None,
            history_retention: None,
            history_lag: Duration::ZERO,
        }
    }
}

/// What the fake IAM Credentials endpoint signs with, and whom it lets call it.
#[derive(Clone, Debug)]
pub struct IamSigner {
    /// The service account `signJwt` signs for (`projects/-/serviceAccounts/{this}:signJwt`).
    pub service_account: String,
    /// Its private key, PKCS#8 PEM.
    pub private_key_pem: String,
    pub key_id: String,
    /// The caller's credential: the public key (PEM) that verifies the caller's self-signed
    /// JWT bearer (what Application Default Credentials from a service-account key send).
    pub caller_public_key_pem: String,
}
