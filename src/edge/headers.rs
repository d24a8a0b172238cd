//! Header hygiene for proxied requests: hop-by-hop headers describe one connection, not the
//! message (RFC 9110 §7.6.1), so they never cross the gate; nor does a browser's `Origin`, which
//! the gate has already judged (ComfyUI would judge it again against the backend's own Host and
//! refuse).

use http::header::{self, HeaderMap, HeaderName};

/// RFC 9110 §7.6.1's connection-specific headers, plus the ones older proxies still send.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, those named in `Connection`, and `Origin`.
pub fn strip_for_upstream(headers: &mut HeaderMap) {
    remove_connection_named(headers);
    for h in &HOP_BY_HOP {
        headers.remove(h);
    }
    headers.remove(header::ORIGIN);
}

/// Removes hop-by-hop headers (and those named in `Connection`) from a backend's response
/// before it goes to the client.
pub fn strip_for_downstream(headers: &mut HeaderMap) {
    remove_connection_named(headers);
    for h in &HOP_BY_HOP {
        headers.remove(h);
    }
}

/// Removes the headers a `Connection` header names (RFC 9110 §7.6.1: they are hop-by-hop too).
fn remove_connection_named(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn hop_by_hop_and_origin_are_removed() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("origin", "http://evil"),
            ("transfer-encoding", "chunked"),
            ("comfy-user", "alice"),
        ]);
        strip_for_upstream(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["comfy-user"], "alice");
    }

    #[test]
    fn every_listed_header_goes_and_end_to_end_ones_stay() {
        let mut h = headers(&[
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authenticate", "Basic"),
            ("proxy-authorization", "Basic eA=="),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("upgrade", "websocket"),
            ("authorization", "Bearer k"),
            ("content-type", "application/json"),
            ("cookie", "a=1"),
        ]);
        strip_for_upstream(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["authorization", "content-type", "cookie"]);
    }

    #[test]
    fn connection_may_name_several_headers_over_several_lines() {
        let mut h = headers(&[
            ("connection", "X-A"),
            ("connection", " x-b ,close"),
            ("x-a", "1"),
            ("x-b", "2"),
            ("x-c", "3"),
        ]);
        strip_for_downstream(&mut h);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-c"]);
    }

    #[test]
    fn downstream_keeps_origin_and_content_headers() {
        let mut h = headers(&[
            ("origin", "http://a"),
            ("content-length", "3"),
            ("transfer-encoding", "chunked"),
        ]);
        strip_for_downstream(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["content-length", "origin"]);
    }
}
