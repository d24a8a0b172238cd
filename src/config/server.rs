//! `[server]`: the client-facing listener, its timeouts and caps (nginx's `listen`,
//! `client_*_timeout`, `keepalive_timeout`, `send_timeout`, `limit_conn`, header buffers).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// `[server]`: the client-facing listener and its limits.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Client-facing address. Default `127.0.0.1:8188` (ComfyUI's own default).
    pub listen: SocketAddr,
    /// Admin listener (`/healthz`, `/readyz`). Default `127.0.0.1:8189`.
    pub admin_listen: SocketAddr,
    /// Largest request body in bytes; more gets 413. Default 104857600 (100 MiB, as ComfyUI).
    pub max_body_bytes: u64,
    /// Time a client connection has, from accept, to send its first complete request head, in
    /// ms: PROXY header, TLS handshake, HTTP/2 preface and head together; a connection still
    /// without a request then is closed (nginx `client_header_timeout`). A later head is bounded
    /// by `keepalive_timeout_ms` from the end of the last response. Default 10000.
    pub header_read_timeout_ms: u64,
    /// A client connection with no request in flight (HTTP/2: no open stream) is closed this
    /// long after its last response, in ms (nginx `keepalive_timeout`). Default 75000.
    pub keepalive_timeout_ms: u64,
    /// Longest wait between two reads of a request body, in ms (nginx `client_body_timeout`).
    /// Default 60000. Over it the request fails: 408 when the gate reads the body itself, the
    /// end of the request (and its connection) when it streams it to a backend.
    pub body_read_timeout_ms: u64,
    /// Longest a write to a client may wait because the client reads nothing, in ms; then the
    /// connection is closed (nginx `send_timeout`). Default 60000.
    pub send_timeout_ms: u64,
    /// Open client connections, all clients together (WebSockets included); one more is closed
    /// at once, unread. Default 10000.
    pub max_connections: usize,
    /// Open client connections from one client address (the TCP peer, or the client a trusted
    /// PROXY header names); one more is closed at once. Default 0 = no cap (as nginx
    /// `limit_conn`, off unless configured).
    pub max_connections_per_ip: usize,
    /// Largest request head, in bytes (HTTP/1 request line and headers; HTTP/2 header list);
    /// a larger one gets 431. Default 32768 (nginx `large_client_header_buffers 4 8k`); at
    /// least 8192.
    pub max_header_bytes: usize,
    /// Longest request target (path and query), in bytes; a longer one gets 414. Default 8192.
    pub max_uri_bytes: usize,
    /// Origins allowed besides the gate's own (e.g. `https://studio.example.com`). Default none.
    pub allowed_origins: Vec<String>,
    /// Timeout of one request to a backend, in ms (file transfers and long reads). Default 60000.
    pub upstream_timeout_ms: u64,
    /// Where the durable state (queue, owners, history, uploads) lives; `--state-dir` overrides
    /// it. Default: `$STATE_DIRECTORY` (set by systemd) if set, else `./comfy-gate-state`.
    pub state_dir: Option<PathBuf>,
    /// Test-only faults: when true, a client request carrying the header
    /// `x-comfy-gate-test-fault: panic` panics in the gate's handling of it (tests/panics.rs
    /// shows the panic is contained), and one carrying `fail-store-commits=N` makes the state
    /// store's next N commits fail (tests/store_faults.rs). Never enable it in production.
    /// Default false.
    pub test_faults: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8188)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 8189)),
            max_body_bytes: 100 << 20,
            header_read_timeout_ms: 10_000,
            keepalive_timeout_ms: 75_000,
            body_read_timeout_ms: 60_000,
            send_timeout_ms: 60_000,
            max_connections: 10_000,
            max_connections_per_ip: 0,
            max_header_bytes: 32 << 10,
            max_uri_bytes: 8 << 10,
            allowed_origins: Vec::new(),
            upstream_timeout_ms: 60_000,
            state_dir: None,
            test_faults: false,
        }
    }
}
