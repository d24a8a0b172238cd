//! What a listener allows its client connections: how long one may sit idle, how many may be
//! open (all together and from one address), and how large a request head may be.
//!
//! Why here, in the accept loop, and not in hyper: hyper's HTTP/1 `header_read_timeout` starts
//! with the first byte of a head, so a client that connects and sends nothing (or finished its
//! last request) would keep its socket and file descriptor forever, and HTTP/2 has no idle
//! timeout at all. One rule covers every case, whatever the protocol: a connection with no
//! request in flight is closed once it has been idle for `header_read_timeout` before its first
//! request (measured from accept: the PROXY header, the TLS handshake, the h2 preface and a head
//! dribbled byte by byte all fall in it; nginx's `client_header_timeout`), or for
//! `keepalive_timeout` after its last response (nginx's `keepalive_timeout`). "In flight" is
//! counted where requests are served (a request is in flight from the service call until its
//! response body is finished or dropped), never guessed from bytes on the socket.
//!
//! The connection caps are counted by a slot held inside the connection's IO object
//! ([`CountedIo`]), so a connection upgraded to a WebSocket still counts until its socket closes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

/// The timeouts and caps of a listener's client connections. The accept loop reads them from
/// [`SharedLimits`] once per connection, so a swapped value applies to the next connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// Time from accept to a complete first request head: PROXY header, TLS handshake, h2
    /// preface and head together (nginx `client_header_timeout`). Default 10 s.
    pub header_read_timeout: Duration,
    /// An open connection with no request in flight is closed this long after its last response
    /// (HTTP/2: after its last stream ended; nginx `keepalive_timeout`). Default 75 s.
    pub keepalive_timeout: Duration,
    /// Open client connections, all peers together (upgraded WebSockets included); one more is
    /// closed at once, before anything is read from it. Default 10000.
    pub max_connections: usize,
    /// Open client connections from one client address (nginx `limit_conn` on the address);
    /// 0 = no cap. Default 0.
    pub max_connections_per_ip: usize,
    /// Largest request head in bytes: HTTP/1 read buffer (hyper `max_buf_size`, at least 8192;
    /// a bigger head is answered 431), HTTP/2 `SETTINGS_MAX_HEADER_LIST_SIZE`. Default 32768
    /// (nginx's `large_client_header_buffers 4 8k`).
    pub max_header_bytes: usize,
    /// Longest request target (path and query) in bytes; a longer one is answered 414 URI Too
    /// Long (RFC 9110 §15.5.15) before the handler runs. Default 8192.
    pub max_uri_bytes: usize,
    /// Longest a write to the client may wait because the client does not read (its socket
    /// buffer full): then the connection is closed (nginx `send_timeout`). Default 60 s.
    pub send_timeout: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(75),
            max_connections: 10_000,
            max_connections_per_ip: 0,
            max_header_bytes: 32 << 10,
            max_uri_bytes: 8 << 10,
            send_timeout: Duration::from_secs(60),
        }
    }
}

/// Limits shared with whoever may swap them (a config reload): `limits.store(Arc::new(new))`.
pub type SharedLimits = Arc<arc_swap::ArcSwap<ConnLimits>>;

/// A listener's open client connections, counted (cheap to clone; clones share the count).
#[derive(Clone, Default)]
pub struct ConnectionStats {
    inner: Arc<Counts>,
}

#[derive(Default)]
struct Counts {
    open: AtomicUsize,
    accepted: std::sync::atomic::AtomicU64,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

impl std::fmt::Debug for ConnectionStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionStats")
            .field("open", &self.open())
            .finish()
    }
}

impl ConnectionStats {
    /// Client connections open now: accepted and not yet closed, upgraded WebSockets included.
    pub fn open(&self) -> usize {
        self.inner.open.load(Ordering::Relaxed)
    }

    /// Connections the listener has accepted since it started, those closed at once for a cap
    /// included (nginx `stub_status` "accepts").
    pub fn accepted(&self) -> u64 {
        self.inner.accepted.load(Ordering::Relaxed)
    }

    /// A slot for one more connection (one more accepted), or `None` when `max` are open
    /// already.
    pub fn admit(&self, max: usize) -> Option<ConnSlot> {
        self.inner.accepted.fetch_add(1, Ordering::Relaxed);
        self.inner
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(ConnSlot {
            stats: self.clone(),
            ip: None,
        })
    }

    fn per_ip(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.inner.per_ip.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One open connection's place in [`ConnectionStats`]; freed when dropped.
#[derive(Debug)]
pub struct ConnSlot {
    stats: ConnectionStats,
    ip: Option<IpAddr>,
}

impl ConnSlot {
    /// Counts the connection against its client address too; false (nothing counted) when
    /// `max` connections from that client are open already. `max` 0 is no cap (nothing
    /// counted). A client is an IPv4 address (an IPv4-mapped IPv6 one counts as its IPv4) or
    /// an IPv6 /64: one host's usual share, which it can fill with addresses at will.
    pub fn claim_ip(&mut self, ip: IpAddr, max: usize) -> bool {
        if max == 0 || self.ip.is_some() {
            return true;
        }
        let ip = client_key(ip);
        let mut per_ip = self.stats.per_ip();
        let open = per_ip.entry(ip).or_insert(0);
        if *open >= max {
            if *open == 0 {
                per_ip.remove(&ip);
            }
            return false;
        }
        *open += 1;
        self.ip = Some(ip);
        true
    }
}

/// The address a per-client cap counts: IPv4 as it is (an IPv4-mapped IPv6 address as its
/// IPv4), IPv6 by its /64 prefix.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.stats.inner.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.ip {
            let mut per_ip = self.stats.per_ip();
            if let Some(open) = per_ip.get_mut(&ip) {
                *open -= 1;
                if *open == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
    }
}

/// A connection's stream holding its [`ConnSlot`]: the slot is freed when the stream is dropped,
/// whoever owns it then (hyper's connection, or a WebSocket handler after an upgrade). It also
/// keeps [`ConnLimits::send_timeout`]: a write that has waited that long on a client that does
/// not read fails with `TimedOut`, which ends the connection.
pub struct CountedIo<T> {
    io: T,
    _slot: ConnSlot,
    send_timeout: Duration,
    /// Running while a write waits on the client.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> CountedIo<T> {
    /// `io`, counted by `slot`, its writes bounded by `send_timeout`.
    pub fn new(io: T, slot: ConnSlot, send_timeout: Duration) -> Self {
        Self {
            io,
            _slot: slot,
            send_timeout,
            stalled: None,
        }
    }

    /// The outcome of a write (or flush) attempt, with the stall timer kept: started when the
    /// client stops taking bytes, cleared when it takes some, an error when it ran out.
    fn watch<R>(
        &mut self,
        cx: &mut Context<'_>,
        attempt: Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        if attempt.is_ready() {
            self.stalled = None;
            return attempt;
        }
        let timeout = self.send_timeout;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client read nothing for {timeout:?} (send_timeout)"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CountedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let attempt = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(cx, attempt)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let attempt = Pin::new(&mut self.io).poll_flush(cx);
        self.watch(cx, attempt)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let attempt = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(cx, attempt)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Requests of one connection: how many are in flight, and whether any has started.
#[derive(Clone, Copy, Debug, Default)]
struct Activity {
    in_flight: usize,
    started: u64,
}

/// Counts one connection's requests in flight (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Requests(watch::Sender<Activity>);

impl Requests {
    /// A request has started; it is in flight until the guard is dropped.
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        self.0.send_modify(|a| {
            a.in_flight += 1;
            a.started += 1;
        });
        InFlight(self.clone())
    }

    /// Resolves when the connection has been idle too long: no request in flight at
    /// `first_deadline` before any request started, or for `keepalive` after the last one ended.
    pub(crate) fn idle_deadline(
        &self,
        first_deadline: Instant,
        keepalive: Duration,
    ) -> impl Future<Output = ()> + Send + 'static {
        let mut activity = self.0.subscribe();
        async move {
            loop {
                let now = *activity.borrow_and_update();
                if now.in_flight > 0 {
                    if activity.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                    continue;
                }
                let deadline = match now.started {
                    0 => first_deadline,
                    _ => Instant::now() + keepalive,
                };
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => return,
                    changed = activity.changed() => if changed.is_err() {
                        std::future::pending::<()>().await;
                    },
                }
            }
        }
    }
}

/// One request in flight on its connection; dropping it ends the request.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Requests>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .0
            .send_modify(|a| a.in_flight = a.in_flight.saturating_sub(1));
    }
}

/// A response body that keeps its request in flight until it is finished or dropped.
pub struct TrackedBody<B> {
    body: B,
    _in_flight: InFlight,
}

impl<B> TrackedBody<B> {
    pub(crate) fn new(body: B, in_flight: InFlight) -> Self {
        Self {
            body,
            _in_flight: in_flight,
        }
    }
}

impl<B> hyper::body::Body for TrackedBody<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_count_connections_all_together_and_per_address() {
        let stats = ConnectionStats::default();
        let a: IpAddr = [127, 0, 0, 1].into();
        let b: IpAddr = [127, 0, 0, 2].into();
        let mut first = stats.admit(3).expect("room");
        assert!(first.claim_ip(a, 1));
        let mut second = stats.admit(3).expect("room");
        assert!(!second.claim_ip(a, 1), "a's one connection is taken");
        assert!(second.claim_ip(b, 1));
        let third = stats.admit(3).expect("room");
        assert!(stats.admit(3).is_none(), "three open");
        assert_eq!(stats.open(), 3);
        drop(first);
        let mut again = stats.admit(3).expect("room after a close");
        assert!(again.claim_ip(a, 1), "a's slot is free again");
        drop((second, third, again));
        assert_eq!(stats.open(), 0);
        assert!(stats.per_ip().is_empty(), "no address left behind");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_is_measured_from_accept_then_from_the_last_response() {
        let requests = Arc::new(Requests::default());
        let start = Instant::now();
        let first = start + Duration::from_secs(10);
        requests.idle_deadline(first, Duration::from_secs(75)).await;
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(10),
            "no request: the head deadline"
        );

        let busy = requests.begin();
        let idle = requests.idle_deadline(first, Duration::from_secs(75));
        let mut idle = std::pin::pin!(idle);
        let waited = tokio::time::timeout(Duration::from_secs(300), &mut idle).await;
        assert!(waited.is_err(), "a request in flight is never idle");
        let ended = Instant::now();
        drop(busy);
        idle.await;
        assert_eq!(
            ended.elapsed(),
            Duration::from_secs(75),
            "keep-alive after the response"
        );
    }

    #[test]
    fn a_client_is_an_ipv4_address_or_an_ipv6_64() {
        let v4: IpAddr = "192.0.2.7".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(client_key(mapped), v4);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(other));
        let stats = ConnectionStats::default();
        let mut first = stats.admit(10).unwrap();
        let mut second = stats.admit(10).unwrap();
        assert!(first.claim_ip(a, 1));
        assert!(!second.claim_ip(b, 1), "the same /64 is one client");
    }
}
