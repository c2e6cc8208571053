//! A loopback TCP proxy between worker processes and the Pub/Sub emulator that can reset every
//! connection on command: the "gRPC stream cut" fault (the emulator has no fault injection of
//! its own, see shared/reference/emulator.md).
//!
//! Each accepted connection is piped both ways to the upstream address by one task; a cut
//! cancels every connection's token, and dropping a socket with `SO_LINGER 0` sends an RST, so
//! the worker sees a reset connection (what a load balancer or a server restart would do), not
//! a clean close. New connections are accepted right away: the client reconnects by itself.

use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A running proxy; stops (and resets every connection) on [`CutProxy::shutdown`] or drop.
#[derive(Debug)]
pub struct CutProxy {
    addr: SocketAddr,
    /// The token of the current generation of connections: a cut cancels it and installs a
    /// fresh one (behind a mutex: the accept loop reads it, `cut` replaces it).
    generation: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
    tasks: TaskTracker,
    cuts: Arc<AtomicU64>,
}

impl CutProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<CutProxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the proxy")?;
        let addr = listener.local_addr()?;
        let generation = Arc::new(Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();
        let accept = {
            let generation = generation.clone();
            let stop = stop.clone();
            let tasks = tasks.clone();
            async move {
                loop {
                    let (client, _) = tokio::select! {
                        _ = stop.cancelled() => return,
                        accepted = listener.accept() => match accepted {
                            Ok(c) => c,
                            // A failed accept (fd limit) is retried; the proxy must not die.
                            Err(_) => { tokio::time::sleep(ACCEPT_RETRY).await; continue; }
                        },
                    };
                    let cut = generation.lock().await.child_token();
                    let stop = stop.clone();
                    tasks.spawn(pipe(client, upstream, cut, stop));
                }
            }
        };
        tasks.spawn(accept);
        Ok(CutProxy {
            addr,
            generation,
            stop,
            tasks,
            cuts: Arc::new(AtomicU64::new(0)),
        })
    }

    /// `127.0.0.1:PORT`, for `PUBSUB_EMULATOR_HOST`.
    pub fn host_port(&self) -> String {
        self.addr.to_string()
    }

    /// Resets every open connection (RST on both sides); later connections pass again.
    pub async fn cut(&self) {
        let mut current = self.generation.lock().await;
        current.cancel();
        *current = CancellationToken::new();
        self.cuts.fetch_add(1, Ordering::Relaxed);
    }

    /// How many cuts were made.
    pub fn cuts(&self) -> u64 {
        self.cuts.load(Ordering::Relaxed)
    }

    /// Stops accepting, resets every connection and waits for the tasks.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A failed `accept` is retried after this pause (so an fd shortage does not spin).
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

async fn pipe(
    mut client: TcpStream,
    upstream: SocketAddr,
    cut: CancellationToken,
    stop: CancellationToken,
) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        reset(client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    tokio::select! {
        _ = cut.cancelled() => {}
        _ = stop.cancelled() => {}
        // Either side closing ends the pair; the error (if any) is the peer's, not ours.
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
    }
    reset(client);
    reset(server);
}

/// Drops the socket with `SO_LINGER 0`: the kernel sends RST instead of FIN.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}
