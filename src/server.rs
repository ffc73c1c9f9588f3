//! The HTTP accept loop. Hand-written around hyper (rather than `axum::serve`)
//! for what a service facing the internet needs: a cap on open connections
//! with a share per remote address, idle connections dropped first when the
//! cap is reached, a deadline for request headers (slowloris) and for writing
//! an answer (a client that never reads), TCP_NODELAY, calm handling of an
//! exhausted descriptor table, and a graceful stop that finishes the requests
//! in flight.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::ingress::LogLimiter;

/// Most bytes hyper buffers for one connection, each way. It bounds the
/// request headers (431 beyond) and what a client that pipelines requests
/// without reading the answers can leave queued in the daemon: hyper stops
/// reading once its buffers are full, and the write deadline ends the rest.
/// hyper's default (about 400 KiB) made a few thousand such connections cost
/// hundreds of MiB.
pub const MAX_CONNECTION_BUFFER: usize = 64 * 1024;

/// The kernel's send buffer of a connection: room for many answers, and a
/// megabyte a second to a client 100 ms away.
const SEND_BUFFER: usize = 128 * 1024;

#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub max_connections: usize,
    /// Most of those slots one remote address may hold.
    pub max_connections_per_ip: usize,
    pub header_read_timeout: Duration,
    /// Longest an answer may wait for the client to take it.
    pub write_timeout: Duration,
    /// How long a stop waits for open connections to finish.
    pub grace: Duration,
}

/// Serves `router` until `stop` fires, then stops accepting and waits up to
/// `grace` for the connections that are open.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    opts: ServeOptions,
    stop: CancellationToken,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(opts.header_read_timeout)
        .max_buf_size(MAX_CONNECTION_BUFFER)
        .keep_alive(true);
    let http = Arc::new(http);
    let slots = Arc::new(Slots::new(
        opts.max_connections,
        opts.max_connections_per_ip,
    ));
    let connections = TaskTracker::new();
    let mut descriptors = DescriptorTrouble::default();
    loop {
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    descriptors.recovered();
                    a
                }
                Err(e) => {
                    descriptors.failed(&e, &slots);
                    tokio::select! {
                        _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                        _ = stop.cancelled() => break,
                    }
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let Some(slot) = slots.admit(remote.ip(), &stop).await else {
            if stop.is_cancelled() {
                break;
            }
            // This address holds its share, all busy: the new connection is
            // closed at once rather than queued behind the others.
            metrics::counter!("cancelwatch_connections_refused_total", "reason" => "per_ip_share")
                .increment(1);
            if let Some(left_out) = CONNECTION_LOG.admit(Instant::now()) {
                tracing::warn!(%remote, left_out, "connection refused: this address holds its share of server.max_connections");
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        // A fixed send buffer: the kernel's own grows to megabytes for a
        // peer that does not read, taking answers in (so the write deadline
        // never starts) long after the client stopped taking them.
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(SEND_BUFFER);
        let io = Watched::new(stream, slot.activity.clone(), opts.write_timeout);
        let router = router.clone();
        let activity = slot.activity.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut()
                .insert(ConnectInfo::<SocketAddr>(remote));
            let busy = activity.request_started();
            let answer = router.clone().oneshot(req);
            async move {
                let answer = answer.await;
                drop(busy);
                answer
            }
        });
        let http = http.clone();
        let stop = stop.clone();
        connections.spawn(async move {
            let conn = http.serve_connection(TokioIo::new(io), service);
            let mut conn = std::pin::pin!(conn);
            let mut closing = false;
            let ended = loop {
                tokio::select! {
                    ended = conn.as_mut() => break ended,
                    // Evicted to make room, or the daemon stops: an idle
                    // connection closes at once, a busy one after its answer.
                    _ = slot.evict.cancelled(), if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    _ = stop.cancelled(), if !closing => {
                        closing = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
            };
            if let Err(e) = ended {
                note_connection_error(&e, remote);
            }
            drop(slot);
        });
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(opts.grace, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the grace period; closing them");
    }
}

/// Raises the soft limit of open files to the hard one, and gives the
/// connections the daemon may hold within it: `max_connections`, or fewer
/// when the limit less `reserved` (the database, its readers, provider and
/// sink connections) leaves less room, with a warning saying so. Past the
/// limit every accept fails (EMFILE) and a health check cannot get in; below
/// it the cap closes idle connections instead.
pub fn fit_to_descriptors(max_connections: usize, reserved: usize) -> usize {
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => usize::try_from(limit).unwrap_or(usize::MAX),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read or raise the open-file limit; server.max_connections is used as set");
            return max_connections;
        }
    };
    let room = limit.saturating_sub(reserved).max(1);
    if max_connections <= room {
        return max_connections;
    }
    tracing::warn!(
        open_file_limit = limit,
        max_connections,
        used = room,
        "server.max_connections is more than the open-file limit leaves room for; \
         the lower cap is used (raise LimitNOFILE or ulimit -n)"
    );
    room
}

/// How long the accept loop waits after a failed accept (out of descriptors
/// and the like) before it tries again: long enough not to spin, short enough
/// that a freed descriptor is used soon.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Lines about refused or evicted connections: at most one a second.
static CONNECTION_LOG: std::sync::LazyLock<LogLimiter> =
    std::sync::LazyLock::new(|| LogLimiter::new(Duration::from_secs(1)));

/// What hyper refuses or ends itself, before any route sees a request:
/// headers over [`MAX_CONNECTION_BUFFER`] (answered 431), headers not
/// finished within `server.header_read_timeout_secs`, an answer not taken
/// within `server.write_timeout_secs` (both closed without an answer).
/// Counted and logged (rate-limited); they name no provider, so they are not
/// refusal records.
fn note_connection_error(e: &hyper::Error, remote: SocketAddr) {
    let reason = if e.is_parse_too_large() {
        metrics::counter!("cancelwatch_http_refusals_total", "status" => "431").increment(1);
        "headers_too_large"
    } else if e.is_timeout() {
        "header_timeout"
    } else if std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<io::Error>())
        .is_some_and(|io| io.kind() == io::ErrorKind::TimedOut)
    {
        "write_timeout"
    } else {
        tracing::debug!(error = %e, %remote, "connection ended with an error");
        return;
    };
    metrics::counter!("cancelwatch_connections_cut_total", "reason" => reason).increment(1);
    if let Some(left_out) = CONNECTION_LOG.admit(Instant::now()) {
        tracing::warn!(%remote, reason, left_out, "connection ended by a server limit");
    }
}

/// Accept errors: out of descriptors (EMFILE, ENFILE) above all. Logged once
/// when they start and once when accepting has worked for
/// [`CALM_BEFORE_RECOVERED`], not once a try: near the limit, accepts fail
/// and succeed in turn as idle connections are closed.
#[derive(Default)]
struct DescriptorTrouble {
    /// When the trouble began, the failures since, and the last one.
    since: Option<(Instant, u64, Instant)>,
}

/// How long accepts must work before the trouble is said to be over.
const CALM_BEFORE_RECOVERED: Duration = Duration::from_secs(10);

impl DescriptorTrouble {
    fn failed(&mut self, e: &io::Error, slots: &Slots) {
        metrics::counter!("cancelwatch_accept_errors_total").increment(1);
        let now = Instant::now();
        match &mut self.since {
            Some((_, failures, last)) => {
                *failures += 1;
                *last = now;
            }
            None => {
                tracing::error!(error = %e, open = slots.open(), "cannot accept connections (out of file descriptors?); closing idle connections and retrying");
                self.since = Some((now, 1, now));
            }
        }
        // An idle connection's descriptor is the cheapest one to give back,
        // so that a health check or a delivery can be accepted.
        slots.evict_oldest_idle(None);
    }

    fn recovered(&mut self) {
        if let Some((since, failures, last)) = self.since {
            if last.elapsed() >= CALM_BEFORE_RECOVERED {
                tracing::info!(
                    failures,
                    secs = since.elapsed().as_secs(),
                    "accepting connections again"
                );
                self.since = None;
            }
        }
    }
}

/// Open connections: how many in all and per remote address, and how busy
/// each is, so that the cap can drop idle ones first.
struct Slots {
    max: usize,
    max_per_ip: usize,
    state: Mutex<Open>,
    /// A connection ended or went idle: an admission waiting for room looks again.
    changed: Arc<Notify>,
    epoch: Instant,
}

#[derive(Default)]
struct Open {
    next_id: u64,
    conns: HashMap<u64, (IpAddr, Arc<Activity>, CancellationToken)>,
    per_ip: HashMap<IpAddr, usize>,
}

/// A connection's place among the open ones; given back on drop.
struct Slot {
    id: u64,
    ip: IpAddr,
    slots: Arc<Slots>,
    activity: Arc<Activity>,
    evict: CancellationToken,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.slots.lock();
        open.conns.remove(&self.id);
        if let Some(n) = open.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.per_ip.remove(&self.ip);
            }
        }
        drop(open);
        self.slots.changed.notify_one();
    }
}

impl Slots {
    fn new(max: usize, max_per_ip: usize) -> Slots {
        Slots {
            max,
            max_per_ip: max_per_ip.min(max),
            state: Mutex::new(Open::default()),
            changed: Arc::new(Notify::new()),
            epoch: Instant::now(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn open(&self) -> usize {
        self.lock().conns.len()
    }

    /// A slot for a connection from `ip`. At the cap, the oldest idle
    /// connection is closed to make room, and this waits for it to go (or,
    /// with none idle, for any to end or go idle). `None` when `ip` holds
    /// its share and none of its connections is idle, or at `stop`.
    async fn admit(self: &Arc<Self>, ip: IpAddr, stop: &CancellationToken) -> Option<Slot> {
        loop {
            let changed = self.changed.clone();
            let notified = changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            {
                let mut open = self.lock();
                let of_ip = open.per_ip.get(&ip).copied().unwrap_or(0);
                if of_ip < self.max_per_ip && open.conns.len() < self.max {
                    return Some(self.take(&mut open, ip));
                }
                let from = (of_ip >= self.max_per_ip).then_some(ip);
                let evicted = self.evict_oldest_idle_in(&mut open, from);
                if !evicted && from.is_some() {
                    return None;
                }
                if evicted {
                    metrics::counter!("cancelwatch_connections_evicted_total").increment(1);
                }
            }
            tokio::select! {
                _ = notified => {}
                _ = stop.cancelled() => return None,
            }
        }
    }

    fn take(self: &Arc<Self>, open: &mut Open, ip: IpAddr) -> Slot {
        let id = open.next_id;
        open.next_id += 1;
        let activity = Arc::new(Activity {
            idle_since_ms: AtomicU64::new(self.now_ms()),
            in_flight: AtomicUsize::new(0),
            slots: Arc::downgrade(self),
        });
        let evict = CancellationToken::new();
        open.conns.insert(id, (ip, activity.clone(), evict.clone()));
        *open.per_ip.entry(ip).or_default() += 1;
        Slot {
            id,
            ip,
            slots: self.clone(),
            activity,
            evict,
        }
    }

    /// Asks the connection idle the longest (of `ip`, if given) to close.
    fn evict_oldest_idle(&self, ip: Option<IpAddr>) -> bool {
        let mut open = self.lock();
        self.evict_oldest_idle_in(&mut open, ip)
    }

    fn evict_oldest_idle_in(&self, open: &mut Open, ip: Option<IpAddr>) -> bool {
        let oldest = open
            .conns
            .values()
            .filter(|(at, _, evict)| ip.map_or(true, |ip| ip == *at) && !evict.is_cancelled())
            .filter_map(|(_, activity, evict)| activity.idle_since().map(|since| (since, evict)))
            .min_by_key(|(since, _)| *since);
        match oldest {
            Some((_, evict)) => {
                evict.cancel();
                true
            }
            None => false,
        }
    }

    fn now_ms(&self) -> u64 {
        // Never 0: 0 means busy.
        self.epoch.elapsed().as_millis() as u64 + 1
    }
}

/// Whether a connection is idle (between requests, nothing of a new one read)
/// and since when. Requests a client pipelined and hyper has read but not yet
/// begun do not count: such a connection may be taken for idle between two
/// of them and closed at the cap after its current answer, which only
/// pipelining clients (no provider, no browser) meet.
struct Activity {
    /// Milliseconds since [`Slots::epoch`] when it went idle; 0 while busy.
    idle_since_ms: AtomicU64,
    /// Requests inside the router now.
    in_flight: AtomicUsize,
    slots: std::sync::Weak<Slots>,
}

impl Activity {
    fn idle_since(&self) -> Option<u64> {
        match self.idle_since_ms.load(Ordering::Relaxed) {
            0 => None,
            since => Some(since),
        }
    }

    fn busy(&self) {
        self.idle_since_ms.store(0, Ordering::Relaxed);
    }

    /// Its answers are all written: idle unless a request is inside the router.
    fn written(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0 && self.idle_since().is_none() {
            if let Some(slots) = self.slots.upgrade() {
                self.idle_since_ms.store(slots.now_ms(), Ordering::Relaxed);
                slots.changed.notify_one();
            }
        }
    }

    fn request_started(self: &Arc<Self>) -> InFlight {
        self.busy();
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

/// A request inside the router; the count goes down on drop (a dropped
/// request future too).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's socket, watched: reading marks the connection busy, a
/// completed flush (every answer handed to the kernel) idle; and a write that
/// cannot go on for `write_timeout` fails, so a client that pipelines
/// requests and never reads the answers is cut off rather than held forever
/// (hyper applies no deadline while it waits to write). The clock runs from
/// the first blocked write until everything is flushed, so a client taking
/// one byte now and then does not keep it open either.
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
    write_timeout: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Watched {
    fn new(stream: TcpStream, activity: Arc<Activity>, write_timeout: Duration) -> Watched {
        Watched {
            stream,
            activity,
            write_timeout,
            stalled: None,
        }
    }

    /// A write could not go on: starts the deadline, or fails once it passed.
    fn blocked<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let timeout = self.write_timeout;
        let deadline = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client did not take the answer within server.write_timeout_secs",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.busy();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.stream).poll_write(cx, buf) {
            Poll::Pending => self.blocked(cx),
            ready => ready,
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.stream).poll_write_vectored(cx, bufs) {
            Poll::Pending => self.blocked(cx),
            ready => ready,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match Pin::new(&mut self.stream).poll_flush(cx) {
            Poll::Ready(Ok(())) => {
                self.stalled = None;
                self.activity.written();
                Poll::Ready(Ok(()))
            }
            Poll::Pending => self.blocked(cx),
            other => other,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// At the cap, the connection idle the longest is the one asked to go;
    /// a busy one never is.
    #[tokio::test]
    async fn the_oldest_idle_connection_is_evicted_first() {
        let slots = Arc::new(Slots::new(3, 3));
        let stop = CancellationToken::new();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let busy = slots.admit(ip, &stop).await.unwrap();
        let _request = busy.activity.request_started();
        let oldest_idle = slots.admit(ip, &stop).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        let newer_idle = slots.admit(ip, &stop).await.unwrap();
        assert!(slots.evict_oldest_idle(None));
        assert!(oldest_idle.evict.is_cancelled());
        assert!(!newer_idle.evict.is_cancelled() && !busy.evict.is_cancelled());
        assert!(slots.evict_oldest_idle(None));
        assert!(newer_idle.evict.is_cancelled());
        assert!(
            !slots.evict_oldest_idle(None),
            "a busy connection is never evicted"
        );
    }
}
