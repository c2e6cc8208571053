//! The Redis connection: a single node or a cluster behind one type, and the retry rule for
//! idempotent operations.

use super::StoreError;
use crate::config::RedisTarget;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, Pipeline, RedisFuture, Value};
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
    pub async fn connect(target: &RedisTarget) -> Result<RedisConnection, StoreError> {
        match target {
            RedisTarget::Single(url) => {
                let client = redis::Client::open(url.as_str())?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_number_of_retries(RECONNECT_RETRIES);
                Ok(RedisConnection::Single(
                    ConnectionManager::new_with_config(client, config).await?,
                ))
            }
            RedisTarget::Cluster(nodes) => {
                let client = redis::cluster::ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(CONNECT_TIMEOUT)
                    .response_timeout(RESPONSE_TIMEOUT)
                    .build()?;
                Ok(RedisConnection::Cluster(
                    client.get_async_connection().await?,
                ))
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

/// Errors worth one more try: the connection dropped, timed out or was refused.
pub(super) fn is_transient(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_connection_refusal()
}
