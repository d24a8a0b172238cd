//! The origin policy (design §2 "Origin"): ComfyUI's same-origin rule, applied against the
//! gate's own Host (the backends never see the browser's `Origin`), plus the operator's
//! `server.allowed_origins`.

use http::{Request, header};

use crate::protocol::origin::{is_loopback, same_origin_allows};

/// Whether a request may proceed: its `Origin` is listed in `allowed`, or ComfyUI's rule
/// (`server.py` `create_origin_only_middleware`: a loopback Host must match its Origin) lets it.
pub fn origin_allowed<B>(allowed: &[String], req: &Request<B>) -> bool {
    let h = |n: header::HeaderName| req.headers().get(n).and_then(|v| v.to_str().ok());
    if let Some(origin) = h(header::ORIGIN)
        && allowed.iter().any(|o| o == origin)
    {
        return true;
    }
    same_origin_allows(h(header::HOST), h(header::ORIGIN), is_loopback)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(host: &str, origin: Option<&str>) -> Request<()> {
        let mut b = Request::builder().header("host", host);
        if let Some(o) = origin {
            b = b.header("origin", o);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn a_listed_origin_passes_and_a_foreign_one_to_loopback_does_not() {
        let allowed = vec!["https://studio.example".to_string()];
        let foreign = req("127.0.0.1:8188", Some("https://evil.example"));
        assert!(!origin_allowed(&allowed, &foreign));
        let listed = req("127.0.0.1:8188", Some("https://studio.example"));
        assert!(origin_allowed(&allowed, &listed));
        assert!(
            origin_allowed(&[], &req("127.0.0.1:8188", None)),
            "no Origin: not a browser"
        );
        let same = req("127.0.0.1:8188", Some("http://127.0.0.1:8188"));
        assert!(origin_allowed(&[], &same));
    }
}
