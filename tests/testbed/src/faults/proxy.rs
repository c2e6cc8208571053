//! A loopback TCP proxy between worker processes and the Pub/Sub emulator that can reset every
//! connection on command (the "gRPC stream cut" fault) and hold one worker's bytes to the
//! emulator (its acks and modacks; the "kill after commit" fault). The emulator has no fault
//! injection of its own (see shared/reference/emulator.md).
//!
//! Each accepted connection is piped both ways to the upstream address by one task; a cut
//! cancels every connection's token, and dropping a socket with `SO_LINGER 0` sends an RST, so
//! the worker sees a reset connection (what a load balancer or a server restart would do), not
//! a clean close. New connections are accepted right away: the client reconnects by itself.
//!
//! Lanes: the proxy forwards gRPC without decoding it, so it cannot tell one worker's bytes
//! from another's on a shared port. Each worker therefore gets a listening port of its own
//! ([`CutProxy::open_lane`], its `PUBSUB_EMULATOR_HOST`). A held lane
//! ([`CutProxy::hold`]) stops forwarding client → emulator bytes on every connection of the
//! lane, present and future (bytes read while held wait in the proxy); emulator → client bytes
//! still flow, so the worker keeps receiving and committing while none of its acks arrive.
//! [`CutProxy::close_lane`] resets the lane's connections without forwarding what was held, as
//! if the worker had died before sending it; [`CutProxy::release`] forwards it late instead.
//!
//! Tapped ([`CutProxy::start_tapped`]): the proxy also decodes the gRPC it forwards and hands
//! every delivery and ack to an [`AckTap`], deliveries before they reach the worker and acks
//! before they reach the emulator (after the tap judged them): see [`super::acks`].

use super::acks::{self, AckTap, GrpcReader, Side};
use anyhow::{Context, Result};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as SyncMutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Mutex, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// One listening port of the proxy (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LaneId(pub(super) u64);

/// What the proxy keeps per lane.
#[derive(Debug)]
struct Lane {
    addr: SocketAddr,
    /// `true` while the lane's client → upstream bytes are held.
    held: watch::Sender<bool>,
    /// Cancelled when the lane closes: its listener stops and its connections are reset.
    closed: CancellationToken,
}

/// A running proxy; stops (and resets every connection) on [`CutProxy::shutdown`] or drop.
#[derive(Debug)]
pub struct CutProxy {
    upstream: SocketAddr,
    /// The lane opened by [`CutProxy::start`] ([`CutProxy::host_port`]): never held.
    shared: LaneId,
    lanes: Arc<SyncMutex<HashMap<LaneId, Lane>>>,
    next_lane: AtomicU64,
    /// The token of the current generation of connections: a cut cancels it and installs a
    /// fresh one (behind a mutex: the accept loops read it, `cut` replaces it).
    generation: Arc<Mutex<CancellationToken>>,
    stop: CancellationToken,
    tasks: TaskTracker,
    cuts: Arc<AtomicU64>,
    tap: Option<Arc<AckTap>>,
}

impl CutProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<CutProxy> {
        CutProxy::start_with(upstream, None).await
    }

    /// The same, every connection read by `tap` as well (see the module docs).
    pub async fn start_tapped(upstream: SocketAddr, tap: Arc<AckTap>) -> Result<CutProxy> {
        CutProxy::start_with(upstream, Some(tap)).await
    }

    async fn start_with(upstream: SocketAddr, tap: Option<Arc<AckTap>>) -> Result<CutProxy> {
        let mut proxy = CutProxy {
            upstream,
            shared: LaneId(0),
            lanes: Arc::new(SyncMutex::new(HashMap::new())),
            next_lane: AtomicU64::new(0),
            generation: Arc::new(Mutex::new(CancellationToken::new())),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            cuts: Arc::new(AtomicU64::new(0)),
            tap,
        };
        proxy.shared = proxy.open_lane().await?.0;
        Ok(proxy)
    }

    /// `127.0.0.1:PORT` of the shared lane, for `PUBSUB_EMULATOR_HOST`.
    pub fn host_port(&self) -> String {
        self.lane_addr(self.shared)
            .map(|a| a.to_string())
            .unwrap_or_default()
    }

    /// The lanes open now (a closed lane's worker is gone).
    pub fn open_lanes(&self) -> HashSet<LaneId> {
        self.lanes().keys().copied().collect()
    }

    fn lane_addr(&self, lane: LaneId) -> Option<SocketAddr> {
        self.lanes().get(&lane).map(|l| l.addr)
    }

    fn lanes(&self) -> std::sync::MutexGuard<'_, HashMap<LaneId, Lane>> {
        self.lanes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new lane: a free loopback port of its own; returns it and its `127.0.0.1:PORT`.
    pub async fn open_lane(&self) -> Result<(LaneId, String)> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the proxy")?;
        let addr = listener.local_addr()?;
        let id = LaneId(self.next_lane.fetch_add(1, Ordering::Relaxed));
        let (held, _) = watch::channel(false);
        let closed = self.stop.child_token();
        let accept = {
            let generation = self.generation.clone();
            let closed = closed.clone();
            let tasks = self.tasks.clone();
            let held = held.subscribe();
            let upstream = self.upstream;
            let tap = self.tap.clone();
            async move {
                loop {
                    let (client, _) = tokio::select! {
                        _ = closed.cancelled() => return,
                        accepted = listener.accept() => match accepted {
                            Ok(c) => c,
                            // A failed accept (fd limit) is retried; the proxy must not die.
                            Err(_) => { tokio::time::sleep(ACCEPT_RETRY).await; continue; }
                        },
                    };
                    let cut = generation.lock().await.child_token();
                    let tap = tap.clone().map(|t| (t, id));
                    tasks.spawn(pipe(
                        client,
                        upstream,
                        cut,
                        closed.clone(),
                        held.clone(),
                        tap,
                    ));
                }
            }
        };
        self.tasks.spawn(accept);
        self.lanes().insert(id, Lane { addr, held, closed });
        Ok((id, addr.to_string()))
    }

    /// Stops forwarding the lane's client → emulator bytes (see the module docs).
    pub fn hold(&self, lane: LaneId) {
        if let Some(l) = self.lanes().get(&lane) {
            l.held.send_replace(true);
        }
    }

    /// Forwards what the lane held, and everything after it again.
    pub fn release(&self, lane: LaneId) {
        if let Some(l) = self.lanes().get(&lane) {
            l.held.send_replace(false);
        }
    }

    /// Stops the lane's listener and resets its connections; bytes it held are never sent.
    pub fn close_lane(&self, lane: LaneId) {
        if let Some(l) = self.lanes().remove(&lane) {
            l.closed.cancel();
        }
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
/// The proxy's read buffer per direction and connection.
const CHUNK: usize = 16 * 1024;

async fn pipe(
    mut client: TcpStream,
    upstream: SocketAddr,
    cut: CancellationToken,
    closed: CancellationToken,
    held: watch::Receiver<bool>,
    tap: Option<(Arc<AckTap>, LaneId)>,
) {
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        reset(client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    {
        let (mut from_client, mut to_client) = client.split();
        let (mut from_server, mut to_server) = server.split();
        let up = forward_unless_held(&mut from_client, &mut to_server, held, tap.clone());
        let down = forward_down(&mut from_server, &mut to_client, tap);
        tokio::select! {
            // A reset first: a closed lane also ends the held copy (its sender is gone), and
            // that must not pass for a clean end.
            biased;
            _ = cut.cancelled() => {}
            // The lane closed (its worker is gone) or the proxy stops.
            _ = closed.cancelled() => {}
            // Either side failing ends the pair, both closing too; the error (if any) is the
            // peer's, not ours.
            _ = async { tokio::try_join!(up, down) } => return,
        }
    }
    reset(client);
    reset(server);
}

/// Copies `from` → `to` like `tokio::io::copy`, but each chunk read waits while the lane is
/// held, and a tap judges the acks it completes before it is written; EOF is passed on (as a
/// shutdown of `to`) the same way.
async fn forward_unless_held(
    from: &mut tokio::net::tcp::ReadHalf<'_>,
    to: &mut tokio::net::tcp::WriteHalf<'_>,
    mut held: watch::Receiver<bool>,
    tap: Option<(Arc<AckTap>, LaneId)>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut reader = GrpcReader::new(Side::Client);
    loop {
        let n = from.read(&mut buf).await?;
        // Bytes read while held wait here; a lane that closes meanwhile resets the connection
        // (the `select!` in `pipe`), so they are never sent, and never count as acks.
        held.wait_for(|h| !*h)
            .await
            .map_err(|_| std::io::Error::other("the proxy lane is gone"))?;
        if n == 0 {
            return to.shutdown().await;
        }
        if let Some((tap, lane)) = &tap {
            for message in reader.push(&buf[..n]) {
                tap.forwarding(*lane, acks::client_ops(&message)).await;
            }
            tap.undecoded(reader.take_undecoded());
        }
        to.write_all(&buf[..n]).await?;
    }
}

/// Copies emulator → worker; a tap records the deliveries of each chunk before it is written.
async fn forward_down(
    from: &mut tokio::net::tcp::ReadHalf<'_>,
    to: &mut tokio::net::tcp::WriteHalf<'_>,
    tap: Option<(Arc<AckTap>, LaneId)>,
) -> std::io::Result<()> {
    let Some((tap, lane)) = tap else {
        tokio::io::copy(from, to).await?;
        return to.shutdown().await;
    };
    let mut buf = vec![0u8; CHUNK];
    let mut reader = GrpcReader::new(Side::Server);
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        for message in reader.push(&buf[..n]) {
            let delivered = acks::deliveries(&message);
            if !delivered.is_empty() {
                tap.delivered(lane, delivered);
            }
        }
        tap.undecoded(reader.take_undecoded());
        to.write_all(&buf[..n]).await?;
    }
}

/// Drops the socket with `SO_LINGER 0`: the kernel sends RST instead of FIN.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server: what the proxy forwards comes back.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    /// Reads what arrives within `wait` (the test waits for an absence, so it needs a bound).
    async fn read_within(s: &mut TcpStream, wait: Duration) -> Vec<u8> {
        let mut buf = [0u8; 64];
        match tokio::time::timeout(wait, s.read(&mut buf)).await {
            Ok(Ok(n)) => buf[..n].to_vec(),
            _ => Vec::new(),
        }
    }

    const QUIET: Duration = Duration::from_millis(300);
    const ARRIVES: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_held_lane_forwards_nothing_until_released_and_other_lanes_pass() {
        let proxy = CutProxy::start(echo().await).await.unwrap();
        let (lane, held_port) = proxy.open_lane().await.unwrap();
        let mut held = TcpStream::connect(&held_port).await.unwrap();
        let mut other = TcpStream::connect(proxy.host_port()).await.unwrap();
        held.write_all(b"before").await.unwrap();
        assert_eq!(read_within(&mut held, ARRIVES).await, b"before");
        proxy.hold(lane);
        held.write_all(b"ack").await.unwrap();
        other.write_all(b"free").await.unwrap();
        assert_eq!(read_within(&mut other, ARRIVES).await, b"free");
        assert!(
            read_within(&mut held, QUIET).await.is_empty(),
            "held bytes passed"
        );
        proxy.release(lane);
        assert_eq!(read_within(&mut held, ARRIVES).await, b"ack");
        proxy.shutdown().await;
    }

    #[tokio::test]
    async fn closing_a_held_lane_resets_it_without_sending_what_it_held() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = CutProxy::start(upstream.local_addr().unwrap())
            .await
            .unwrap();
        let (lane, port) = proxy.open_lane().await.unwrap();
        let mut client = TcpStream::connect(&port).await.unwrap();
        let (mut server, _) = upstream.accept().await.unwrap();
        proxy.hold(lane);
        client.write_all(b"ack").await.unwrap();
        tokio::time::sleep(QUIET).await;
        proxy.close_lane(lane);
        let mut got = Vec::new();
        // The upstream side sees the connection end (reset or EOF), never the held bytes.
        let ended = tokio::time::timeout(ARRIVES, server.read_to_end(&mut got)).await;
        assert!(ended.is_ok(), "the closed lane's connection still runs");
        assert!(got.is_empty(), "held bytes were sent: {got:?}");
        proxy.shutdown().await;
    }
}
