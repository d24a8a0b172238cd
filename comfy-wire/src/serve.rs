//! The accept loop shared by the gate and comfy-sim: connections counted and capped, an
//! optional PROXY protocol header and TLS handshake, then HTTP/1.1 (with upgrades) or HTTP/2
//! served by hyper until the connection ends, idles out ([`crate::conn`]) or the listener stops
//! (all at once, a simulated crash, or drained, a graceful shutdown).
//!
//! HTTP/2 is chosen by its preface (hyper-util's auto builder, the only one that serves
//! upgrades); over TLS, ALPN `h2` is what makes a client send that preface, and a client that
//! negotiated `http/1.1` speaks HTTP/1.1. WebSocket upgrades are HTTP/1.1 only.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::Either;
use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::conn::{ConnLimits, ConnSlot, ConnectionStats, CountedIo, Requests, TrackedBody};
use crate::http::{Body, status};
use crate::tls::TlsAcceptor;

/// Streams one HTTP/2 connection may have open at once (nginx `http2_max_concurrent_streams`).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 128;
/// Facts about the connection a request arrived on.
#[derive(Clone, Copy, Debug)]
pub struct ConnInfo {
    /// The client: the TCP peer, or the client a trusted PROXY header names.
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// The connection is TLS (the request came in as `https`).
    pub tls: bool,
}

/// Timeouts and limits of the accept loop.
#[derive(Clone, Default)]
pub struct ServeOptions {
    /// Connection timeouts and caps, read once per accepted connection (swap them to change
    /// them for the next connections). Default [`ConnLimits::default`].
    pub limits: crate::conn::SharedLimits,
    /// Counts this listener's open connections; pass a clone in to read it from outside.
    pub stats: ConnectionStats,
    /// On stop: `None` drops every connection at once (a crash); `Some(d)` stops accepting and
    /// lets in-flight requests finish for up to `d` (a graceful shutdown).
    pub drain: Option<Duration>,
    /// `Some(trusted)`: every connection starts with a PROXY protocol header
    /// ([`crate::proxy_protocol`]; one missing, malformed or not complete within
    /// `header_read_timeout` closes the connection). The client it names becomes the
    /// connection's peer when `trusted(tcp peer)`; from any other peer it is read and ignored.
    /// Default `None`.
    pub proxy_protocol: Option<TrustedPeer>,
    /// `Some`: every connection is TLS, its handshake done within `header_read_timeout` of the
    /// accept. Default `None` (cleartext).
    pub tls: Option<Arc<TlsAcceptor>>,
}

/// Whether a TCP peer's PROXY protocol header is believed.
pub type TrustedPeer = Arc<dyn Fn(std::net::IpAddr) -> bool + Send + Sync>;

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("limits", &self.limits.load())
            .field("drain", &self.drain)
            .field("proxy_protocol", &self.proxy_protocol.is_some())
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// How long a connection closed for idling gets to finish closing (an HTTP/2 GOAWAY).
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Serves `handler` on `listener` until `stop` is cancelled, then drops or drains connections
/// as `options.drain` says (upgraded WebSocket streams are the handler's to close).
///
/// A connection over `max_connections` (or, once its client is known, over
/// `max_connections_per_ip` from that client: the TCP peer, or the client named by a trusted
/// PROXY header) is closed before anything is read from it (logged at debug).
pub async fn serve<H, F>(
    listener: TcpListener,
    handler: Arc<H>,
    options: ServeOptions,
    stop: CancellationToken,
) where
    H: Fn(Request<Incoming>, ConnInfo) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(_) => return,
    };
    let connections = TaskTracker::new();
    // Ends every connection: at once on a crash stop, after the drain on a graceful one.
    let kill = CancellationToken::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(err) => {
                tracing::debug!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let limits = options.limits.load_full();
        let Some(mut slot) = options.stats.admit(limits.max_connections) else {
            tracing::debug!(%peer, max = limits.max_connections, "over max_connections; closed");
            continue;
        };
        if options.proxy_protocol.is_none()
            && !slot.claim_ip(peer.ip(), limits.max_connections_per_ip)
        {
            tracing::debug!(%peer, max = limits.max_connections_per_ip, "over max_connections_per_ip; closed");
            continue;
        }
        let _ = stream.set_nodelay(true);
        let accepted = Accepted {
            stream,
            slot,
            peer,
            local,
            deadline: Instant::now() + limits.header_read_timeout,
            limits,
        };
        let ends = Ends {
            stop: stop.clone(),
            kill: kill.clone(),
            drain: options.drain.is_some(),
        };
        let (handler, options) = (handler.clone(), options.clone());
        connections.spawn(async move {
            // A stop (drain or crash) ends a connection still owing its PROXY header or TLS
            // handshake at once; once opened, `serve_connection` handles stops itself.
            let (kill, stop) = (ends.kill.clone(), ends.stop.clone());
            tokio::select! {
                biased;
                _ = kill.cancelled() => {}
                _ = stop.cancelled() => {}
                io = open(accepted, &options) => if let Some((io, info, limits, deadline)) = io {
                    match io {
                        Either::Left(tls) => serve_connection(tls, handler, info, &limits, deadline, ends).await,
                        Either::Right(plain) => serve_connection(plain, handler, info, &limits, deadline, ends).await,
                    }
                },
            }
        });
    }
    drop(listener);
    connections.close();
    if let Some(drain) = options.drain {
        let _ = tokio::time::timeout(drain, connections.wait()).await;
    }
    kill.cancel();
}

/// A connection just accepted, before anything is read from it.
struct Accepted {
    stream: TcpStream,
    slot: ConnSlot,
    peer: SocketAddr,
    local: SocketAddr,
    /// Accept + `header_read_timeout`.
    deadline: Instant,
    limits: Arc<ConnLimits>,
}

/// What ends a connection from outside.
#[derive(Clone)]
struct Ends {
    stop: CancellationToken,
    kill: CancellationToken,
    drain: bool,
}

type Tls = tokio_rustls::server::TlsStream<CountedIo<TcpStream>>;
type Opened = (
    Either<Tls, CountedIo<TcpStream>>,
    ConnInfo,
    Arc<ConnLimits>,
    Instant,
);

/// Reads the PROXY header and does the TLS handshake, both by the connection's deadline;
/// `None` closes the connection.
async fn open(accepted: Accepted, options: &ServeOptions) -> Option<Opened> {
    let Accepted {
        mut stream,
        mut slot,
        peer,
        local,
        deadline,
        limits,
    } = accepted;
    let peer = match &options.proxy_protocol {
        Some(trusted) => {
            let client = proxied_peer(&mut stream, peer, trusted, deadline).await?;
            if !slot.claim_ip(client.ip(), limits.max_connections_per_ip) {
                tracing::debug!(%peer, %client, max = limits.max_connections_per_ip, "over max_connections_per_ip; closed");
                return None;
            }
            client
        }
        None => peer,
    };
    let io = CountedIo::new(stream, slot, limits.send_timeout);
    let io = match &options.tls {
        Some(tls) => match tokio::time::timeout_at(deadline, tls.acceptor().accept(io)).await {
            Ok(Ok(tls)) => Either::Left(tls),
            Ok(Err(err)) => {
                tracing::debug!(%peer, %err, "TLS handshake failed; connection closed");
                return None;
            }
            Err(_) => {
                tracing::debug!(%peer, "no TLS handshake in time; connection closed");
                return None;
            }
        },
        None => Either::Right(io),
    };
    let info = ConnInfo {
        peer,
        local,
        tls: options.tls.is_some(),
    };
    Some((io, info, limits, deadline))
}

/// The connection's peer as its PROXY header names it (see [`ServeOptions::proxy_protocol`]);
/// `None` when the connection is to be closed.
async fn proxied_peer(
    stream: &mut TcpStream,
    peer: SocketAddr,
    trusted: &TrustedPeer,
    deadline: Instant,
) -> Option<SocketAddr> {
    use crate::proxy_protocol::{ProxyHeader, read_header};
    match tokio::time::timeout_at(deadline, read_header(stream)).await {
        Ok(Ok(ProxyHeader::Client(client))) if trusted(peer.ip()) => Some(client),
        Ok(Ok(ProxyHeader::Client(client))) => {
            tracing::debug!(%peer, %client, "PROXY header from a peer not trusted; ignored");
            Some(peer)
        }
        Ok(Ok(ProxyHeader::Own)) => Some(peer),
        Ok(Err(err)) => {
            tracing::debug!(%peer, %err, "PROXY header refused; connection closed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "no PROXY header in time; connection closed");
            None
        }
    }
}

/// Serves HTTP on one opened connection until it ends, idles out, or the listener stops.
async fn serve_connection<I, H, F>(
    io: I,
    handler: Arc<H>,
    info: ConnInfo,
    limits: &ConnLimits,
    deadline: Instant,
    ends: Ends,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>, ConnInfo) -> F + Send + Sync + 'static,
    F: Future<Output = Response<Body>> + Send + 'static,
{
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // hyper starts this timer as soon as a connection goes idle, not at the next head's
        // first byte: given the header timeout alone it would close idle keep-alive connections
        // before `keepalive_timeout`. The gate's own idle deadline bounds a head (a connection
        // still waiting for one is idle); hyper's only needs to be no shorter.
        .header_read_timeout(limits.header_read_timeout.max(limits.keepalive_timeout))
        // hyper refuses less than 8192; the config checks it, this keeps a bad value harmless.
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        // nginx's `http2_max_concurrent_streams`: what one connection may hold in flight.
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION);
    let requests = Arc::new(Requests::default());
    let idle = requests.idle_deadline(deadline, limits.keepalive_timeout);
    let max_uri_bytes = limits.max_uri_bytes;
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let in_flight = requests.begin();
        let answer = match refused(&mut req, max_uri_bytes) {
            Some(refusal) => Either::Left(std::future::ready(refusal)),
            None => Either::Right(handler(req, info)),
        };
        async move { Ok::<_, Infallible>(answer.await.map(|b| TrackedBody::new(b, in_flight))) }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let mut idle = std::pin::pin!(idle);
    let mut draining = false;
    let ended = loop {
        tokio::select! {
            biased;
            _ = ends.kill.cancelled() => return,
            _ = ends.stop.cancelled(), if !draining => {
                if !ends.drain {
                    return;
                }
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
            _ = &mut idle => {
                tracing::debug!(peer = %info.peer, "connection idle too long; closed");
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(IDLE_CLOSE_GRACE, conn.as_mut()).await;
                return;
            }
            ended = conn.as_mut() => break ended,
        }
    };
    if let Err(err) = ended {
        tracing::trace!(%err, "connection ended with an error");
    }
}

/// The answer to a request refused before its handler runs: a target longer than
/// `max_uri_bytes` gets 414 (RFC 9110 §15.5.15). An HTTP/2 request without `Host` gets one
/// from its `:authority` (RFC 9113 §8.3.1), so handlers see the host whatever the protocol.
fn refused<B>(req: &mut Request<B>, max_uri_bytes: usize) -> Option<Response<Body>> {
    let target = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target > max_uri_bytes {
        return Some(status(StatusCode::URI_TOO_LONG));
    }
    if req.version() == http::Version::HTTP_2
        && !req.headers().contains_key(header::HOST)
        && let Some(host) = req
            .uri()
            .authority()
            .and_then(|a| header::HeaderValue::from_str(a.as_str()).ok())
    {
        req.headers_mut().insert(header::HOST, host);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_targets_are_refused_and_h2_requests_get_their_host() {
        let mut long = Request::get(format!("/queue?{}", "q".repeat(100)))
            .body(())
            .unwrap();
        let answer = refused(&mut long, 64).expect("refused");
        assert_eq!(answer.status(), StatusCode::URI_TOO_LONG);
        let mut fits = Request::get("/queue?x=1").body(()).unwrap();
        assert!(refused(&mut fits, 64).is_none());
        assert!(!fits.headers().contains_key(header::HOST), "h1 untouched");
        let mut h2 = Request::get("https://gate.example:8443/queue")
            .version(http::Version::HTTP_2)
            .body(())
            .unwrap();
        assert!(refused(&mut h2, 64).is_none());
        assert_eq!(h2.headers()[header::HOST], "gate.example:8443");
    }
}
