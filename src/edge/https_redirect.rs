//! The cleartext listener of `[tls] redirect_listen`: every request is sent to the same host and
//! target over HTTPS (nginx's `return 301 https://$host$request_uri`), with 308 so a POST stays
//! a POST (RFC 9110 §15.4.9). Nothing is proxied or answered otherwise.

use http::{Request, Response, StatusCode, header};

use crate::http::{Body, status, text};

/// The 308 to `https://{host}{target}`: `host` is the request's `Host` (or its absolute URI's
/// host) without its port, followed by `:{https_port}` unless that is 443. A request naming no
/// host gets 400.
pub fn answer<B>(req: &Request<B>, https_port: u16) -> Response<Body> {
    let named = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    let Some(host) = named.and_then(host_without_port) else {
        return text(StatusCode::BAD_REQUEST, "no Host to redirect to");
    };
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let port = match https_port {
        443 => String::new(),
        p => format!(":{p}"),
    };
    let location = format!("https://{host}{port}{target}");
    let mut resp = status(StatusCode::PERMANENT_REDIRECT);
    match header::HeaderValue::from_str(&location) {
        Ok(v) => {
            resp.headers_mut().insert(header::LOCATION, v);
            resp
        }
        Err(_) => text(StatusCode::BAD_REQUEST, "no Host to redirect to"),
    }
}

/// `host[:port]` or `[v6][:port]` without the port; `None` when empty or not an authority.
fn host_without_port(authority: &str) -> Option<String> {
    let parsed: http::uri::Authority = authority.parse().ok()?;
    Some(parsed.host().to_string()).filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location(host: &str, target: &str, port: u16) -> String {
        let req = Request::post(target).header("host", host).body(()).unwrap();
        let resp = answer(&req, port);
        assert_eq!(resp.status(), StatusCode::PERMANENT_REDIRECT);
        resp.headers()[header::LOCATION]
            .to_str()
            .unwrap()
            .to_string()
    }

    #[test]
    fn same_host_and_target_over_https() {
        assert_eq!(
            location("gate.example:80", "/prompt?x=1", 443),
            "https://gate.example/prompt?x=1"
        );
        assert_eq!(
            location("gate.example", "/", 8443),
            "https://gate.example:8443/"
        );
        assert_eq!(location("[::1]:8080", "/queue", 443), "https://[::1]/queue");
        let no_host = Request::get("/").body(()).unwrap();
        assert_eq!(answer(&no_host, 443).status(), StatusCode::BAD_REQUEST);
    }
}
