//! Who is asking. The identity scopes what a call without ids may touch (interrupt, queue clear,
//! history clear act on the caller's own prompts only), and later keys auth and rate limits.

use http::Request;
use sha2::{Digest, Sha256};

use std::net::IpAddr;

/// Hex characters of the key digest kept in an identity (64 bits: enough to tell keys apart,
/// short enough to log).
const KEY_DIGEST_HEX: usize = 16;

/// An API key (`Authorization`, hashed: never the key itself), else a `Comfy-User`, else the
/// client's address (the peer, or the client a trusted proxy names: [`super::forwarded`]):
/// `key:…`, `user:…` or `ip:…`.
pub fn identity<B>(req: &Request<B>, client: IpAddr) -> String {
    let h = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
    };
    if let Some(auth) = h("authorization") {
        let digest = format!("{:x}", Sha256::digest(auth.as_bytes()));
        return format!("key:{}", &digest[..KEY_DIGEST_HEX]);
    }
    if let Some(user) = h("comfy-user") {
        return format!("user:{user}");
    }
    format!("ip:{client}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> IpAddr {
        "10.1.2.3".parse().unwrap()
    }

    fn req(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder();
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn a_key_wins_over_a_user_and_is_never_shown() {
        let id = identity(
            &req(&[("authorization", "Bearer s3cret"), ("comfy-user", "al")]),
            info(),
        );
        assert!(
            id.starts_with("key:") && id.len() == 4 + KEY_DIGEST_HEX,
            "{id}"
        );
        assert!(!id.contains("s3cret"));
        let other = identity(&req(&[("authorization", "Bearer other")]), info());
        assert_ne!(id, other);
    }

    #[test]
    fn a_user_then_the_peer_address() {
        assert_eq!(identity(&req(&[("comfy-user", "al")]), info()), "user:al");
        assert_eq!(identity(&req(&[("comfy-user", "")]), info()), "ip:10.1.2.3");
        assert_eq!(identity(&req(&[]), info()), "ip:10.1.2.3");
    }
}
