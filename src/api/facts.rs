//! What a handler knows about a request that the access log wants and cannot see from the
//! wire: who the caller was, which backend answered, which prompt was submitted, how long the
//! backend took. Handlers attach it to their response as an extension; the access log layer
//! (`crate::edge::access_log`) takes it off before the response leaves, so no client ever sees
//! it. It lives here, below the edge, because handlers of both the API ([`super::router`]) and
//! the edge's passthrough add to it.

use std::net::IpAddr;
use std::time::Duration;

use http::Response;

/// A response's facts for its access log line (a response extension; every field optional).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccessFacts {
    /// The client address the edge resolved (trusted `X-Forwarded-For`/`Forwarded`/PROXY),
    /// nginx's `$remote_addr` after `real_ip`. `None` before the edge got that far (a bad
    /// path, a refused origin): the log falls back to the connection's peer.
    pub client: Option<IpAddr>,
    /// The gate user the request authenticated as (`[auth] mode = "token"`).
    pub user: Option<String>,
    /// The configured name of the backend that answered a proxied request.
    pub backend: Option<String>,
    /// The prompt a `POST /prompt` submitted (its id, given or minted).
    pub prompt_id: Option<String>,
    /// From sending the request to the backend's response head (nginx's
    /// `$upstream_header_time`; the body streams on afterwards).
    pub upstream_time: Option<Duration>,
}

impl AccessFacts {
    /// The facts already on `resp` (an empty set if none), to add to and put back with
    /// [`AccessFacts::attach`].
    pub fn take<B>(resp: &mut Response<B>) -> Self {
        resp.extensions_mut().remove::<Self>().unwrap_or_default()
    }

    /// Puts these facts on `resp` (replacing any there).
    pub fn attach<B>(self, resp: &mut Response<B>) {
        resp.extensions_mut().insert(self);
    }
}
