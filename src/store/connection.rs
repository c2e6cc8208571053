//! The Redis connection: a single node or a cluster behind one type, plain or TLS
//! (`rediss://`, rustls), with the user and password of the URL or of the configuration; why
//! a connection failed, in words an operator can act on; and the retry rule for idempotent
//! operations.

use super::StoreError;
use crate::config::{RedisNodes, RedisTarget};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, IntoConnectionInfo, Pipeline, RedisFuture, TlsCertificates, Value};
use std::time::Duration;

/// Connecting to a node gives up after this long (the caller reports Redis as unreachable).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Above the crate's 500 ms default: a large commit script is still a few ms, but a busy Redis
/// should slow syncs down, not fail every one of them.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnect attempts of the connection manager before a command fails.
const RECONNECT_RETRIES: usize = 3;
/// Attempts of an idempotent operation on connection-level errors (the connection manager
/// reports a dropped connection once and reconnects in the background).
pub(super) const IDEMPOTENT_ATTEMPTS: u32 = 3;
/// Pause before retry n is n × this: long enough for the manager to reconnect.
pub(super) const RETRY_STEP: Duration = Duration::from_millis(100);

/// A single Redis or a cluster; both multiplex one connection per node, are cheap to clone and
/// safe to share between tasks, so no pool is needed.
#[derive(Clone)]
pub enum RedisConnection {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl RedisConnection {
    /// Connects (every seed node of a cluster), TLS handshake and AUTH included, and sends one
    /// PING (a server that wants a password and got none refuses only commands); the error
    /// says what failed and which setting to check ([`StoreError::Connect`]).
    pub async fn connect(target: &RedisTarget) -> Result<RedisConnection, StoreError> {
        let connected = async {
            let mut conn = match &target.nodes {
                RedisNodes::Single(_) => {
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(CONNECT_TIMEOUT))
                        .set_response_timeout(Some(RESPONSE_TIMEOUT))
                        .set_number_of_retries(RECONNECT_RETRIES);
                    let client = single_client(target)?;
                    RedisConnection::Single(
                        ConnectionManager::new_with_config(client, config).await?,
                    )
                }
                RedisNodes::Cluster(_) => {
                    RedisConnection::Cluster(cluster_client(target)?.get_async_connection().await?)
                }
            };
            redis::cmd("PING").query_async::<()>(&mut conn).await?;
            Ok(conn)
        };
        connected.await.map_err(|e| connect_error(e, target))
    }
    /// `maxmemory-policy` of the node (single Redis: `None` for its address, the configured
    /// one) or of every master of a cluster (named by address), or why that node would not
    /// say (`CONFIG` is often refused on managed Redis). One round trip per master.
    pub(super) async fn maxmemory_policies(
        &self,
    ) -> redis::RedisResult<Vec<(Option<String>, Result<String, String>)>> {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg("maxmemory-policy");
        match self.clone() {
            RedisConnection::Single(mut c) => {
                let reply: Value = cmd.query_async(&mut c).await?;
                Ok(vec![(None, policy_of(reply))])
            }
            RedisConnection::Cluster(mut c) => {
                use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
                let reply = c
                    .route_command(
                        cmd,
                        RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
                    )
                    .await?;
                let Value::Map(per_node) = reply else {
                    return Ok(vec![(None, policy_of(reply))]);
                };
                Ok(per_node
                    .into_iter()
                    .map(|(node, reply)| {
                        let node = redis::from_redis_value::<String>(node).ok();
                        (node, policy_of(reply))
                    })
                    .collect())
            }
        }
    }

    /// Runs an idempotent operation, retrying on connection-level errors.
    pub(super) async fn retrying<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: Fn(RedisConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match op(self.clone()).await {
                Ok(v) => return Ok(v),
                Err(e) if attempt < IDEMPOTENT_ATTEMPTS && is_transient(&e) => {
                    tokio::time::sleep(RETRY_STEP * attempt).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl ConnectionLike for RedisConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConnection::Single(c) => c.req_packed_command(cmd),
            RedisConnection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConnection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConnection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConnection::Single(c) => c.get_db(),
            RedisConnection::Cluster(c) => c.get_db(),
        }
    }
}

/// The policy in a `CONFIG GET maxmemory-policy` reply (a RESP2 array of name and value, or
/// a RESP3 map), or the node's error (e.g. `CONFIG` refused).
fn policy_of(reply: Value) -> Result<String, String> {
    if let Value::ServerError(e) = &reply {
        return Err(format!("{e:?}"));
    }
    let pairs: std::collections::HashMap<String, String> =
        redis::from_redis_value(reply).map_err(|e| e.to_string())?;
    pairs
        .get("maxmemory-policy")
        .cloned()
        .ok_or_else(|| "no maxmemory-policy in the reply".to_string())
}

/// Errors worth one more try: the connection dropped, timed out or was refused.
pub(super) fn is_transient(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_connection_refusal()
}

/// The client of a single-node target: its URL, with the configured user, password and CA.
/// Public for tools that need a plain `redis::Client` (e.g. `examples/consume_changes.rs`).
pub fn single_client(target: &RedisTarget) -> redis::RedisResult<redis::Client> {
    let [url] = target.nodes.urls() else {
        return Err(redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "a single-node client needs exactly one URL",
        )));
    };
    if target.uses_tls() {
        install_crypto_provider();
    }
    let info = url.as_str().into_connection_info()?;
    let mut settings = info.redis_settings().clone();
    if let Some(username) = &target.username {
        settings = settings.set_username(username);
    }
    if let Some(password) = &target.password {
        settings = settings.set_password(password.expose());
    }
    let info = info.set_redis_settings(settings);
    match tls_certificates(target) {
        Some(certificates) => redis::Client::build_with_tls(info, certificates),
        None => redis::Client::open(info),
    }
}

/// The client of a cluster target: its seed nodes, with the configured user, password and CA
/// applied to every node the cluster reports.
fn cluster_client(target: &RedisTarget) -> redis::RedisResult<redis::cluster::ClusterClient> {
    if target.uses_tls() {
        install_crypto_provider();
    }
    let mut builder = redis::cluster::ClusterClientBuilder::new(target.nodes.urls().to_vec())
        .connection_timeout(CONNECT_TIMEOUT)
        .response_timeout(RESPONSE_TIMEOUT);
    if let Some(username) = &target.username {
        builder = builder.username(username);
    }
    if let Some(password) = &target.password {
        builder = builder.password(password.expose());
    }
    if let Some(certificates) = tls_certificates(target) {
        builder = builder.certs(certificates);
    }
    builder.build()
}

/// The configured CA as the roots of the TLS client; `None`: the system's roots (what redis
/// loads through rustls-native-certs), or no TLS at all.
fn tls_certificates(target: &RedisTarget) -> Option<TlsCertificates> {
    target.ca.as_ref().map(|ca| TlsCertificates {
        client_tls: None,
        root_cert: Some(ca.pem.clone()),
    })
}

/// Installs aws-lc-rs as rustls's process-wide default CryptoProvider, once.
///
/// Why: redis builds its TLS configuration with `rustls::ClientConfig::builder()`, which takes
/// the process default, and nothing else in the process installs one (reqwest and
/// google-cloud-* hand aws-lc-rs to their own configurations explicitly). Left alone, rustls
/// infers the default from its crate features, which works only while exactly one provider
/// feature is enabled in the whole build: a dependency that also enabled `ring` would make
/// the first `rediss://` connection panic. Installing it here makes the choice explicit and
/// keeps one rustls with one provider (aws-lc-rs) for every TLS client of the process.
/// Harmless if a provider is already installed (that one stays).
pub fn install_crypto_provider() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

/// Turns a failed connection into what failed and what to check. Neither the URL nor the
/// password is part of the text: only the target's scheme, host and port, and variable names.
fn connect_error(e: redis::RedisError, target: &RedisTarget) -> StoreError {
    let (failed, hint) = diagnose(&e, target);
    StoreError::Connect {
        failed,
        hint,
        source: e,
    }
}

/// What failed, and what to check or set: from the error's kind and server code, or from the
/// text of its chain (rustls's reasons, such as `UnknownIssuer`, are only there).
fn diagnose(e: &redis::RedisError, target: &RedisTarget) -> (String, String) {
    const URL_VARS: &str = "GMAIL_SYNC_REDIS_URL / GMAIL_SYNC_REDIS_CLUSTER_NODES";
    let at = target.describe();
    let tls = target.uses_tls();
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    let has = |needle: &str| text.contains(needle);
    let credentials = || {
        let password = if target.password.is_some() {
            "the password in GMAIL_SYNC_REDIS_PASSWORD_FILE"
        } else {
            "the password in the URL (or GMAIL_SYNC_REDIS_PASSWORD_FILE)"
        };
        let user = if target.username.is_some() {
            "the user in GMAIL_SYNC_REDIS_USERNAME"
        } else {
            "the user in the URL (none: Redis's default user)"
        };
        format!("check {password} and {user}")
    };
    let trust = || match &target.ca {
        Some(ca) => format!(
            "check that GMAIL_SYNC_REDIS_CA_FILE ({}) holds the CA that signed the server \
             certificate",
            ca.path.display()
        ),
        None => "set GMAIL_SYNC_REDIS_CA_FILE to the CA that signed the server certificate \
                 (the system's trusted roots do not include it)"
            .into(),
    };

    if e.kind() == redis::ErrorKind::AuthenticationFailed || e.code() == Some("WRONGPASS") {
        return (
            format!("authentication at {at} failed: Redis refused the user or password"),
            credentials(),
        );
    }
    if e.code() == Some("NOAUTH") {
        return (
            format!("authentication at {at} failed: Redis requires a password, none was given"),
            "set GMAIL_SYNC_REDIS_PASSWORD_FILE (or a password in the URL)".into(),
        );
    }
    if e.code() == Some("NOPERM") {
        return (
            format!("the Redis user may not run a command gmail-sync needs at {at}"),
            "check the user's ACL rules (gmail-sync needs its keys and scripting)".into(),
        );
    }
    if tls && has("invalid peer certificate") {
        let (why, hint) = if has("UnknownIssuer") || has("BadSignature") {
            (
                "the server certificate is not signed by a trusted CA",
                trust(),
            )
        } else if has("NotValidForName") {
            (
                "the server certificate is not valid for the host in the URL",
                format!(
                    "check that the host in {URL_VARS} is a name or address the certificate lists"
                ),
            )
        } else if has("Expired") || has("NotValidYet") {
            (
                "the server certificate has expired or is not valid yet",
                "check the Redis server certificate's dates and this machine's clock".into(),
            )
        } else {
            ("the server certificate was refused", trust())
        };
        return (format!("TLS handshake with {at} failed: {why}"), hint);
    }
    if tls && (has("corrupt message") || has("InvalidContentType") || has("HandshakeFailure")) {
        return (
            format!("TLS handshake with {at} failed: the port does not speak TLS"),
            format!("check {URL_VARS}: rediss:// needs Redis's tls-port, redis:// its plain port"),
        );
    }
    if e.is_connection_refusal() {
        return (
            format!("connection to {at} refused"),
            format!("check that Redis runs and the host and port in {URL_VARS}"),
        );
    }
    if e.is_timeout() {
        let plain_port = if tls {
            " (a rediss:// URL on a plain, non-TLS port also waits until this timeout)"
        } else {
            ""
        };
        return (
            format!("no answer from {at} within {CONNECT_TIMEOUT:?}"),
            format!("check the host and port in {URL_VARS}{plain_port} and the network path"),
        );
    }
    if !tls && (e.is_connection_dropped() || e.is_io_error()) {
        return (
            format!("Redis at {at} closed the connection"),
            format!(
                "check {URL_VARS}: a port that serves TLS needs rediss:// (and maybe \
                 GMAIL_SYNC_REDIS_CA_FILE)"
            ),
        );
    }
    if tls && (e.is_connection_dropped() || e.is_io_error()) {
        return (
            format!("TLS connection to {at} failed"),
            format!("check {URL_VARS} and GMAIL_SYNC_REDIS_CA_FILE"),
        );
    }
    (
        format!("connecting to {at} failed"),
        format!("check {URL_VARS} and the Redis credentials"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn the_policy_is_read_from_resp2_and_resp3_replies() {
        let resp2 = Value::Array(vec![bulk("maxmemory-policy"), bulk("allkeys-lru")]);
        assert_eq!(policy_of(resp2), Ok("allkeys-lru".to_string()));
        let resp3 = Value::Map(vec![(bulk("maxmemory-policy"), bulk("noeviction"))]);
        assert_eq!(policy_of(resp3), Ok("noeviction".to_string()));
        assert!(policy_of(Value::Array(vec![])).is_err());
    }
}
