//! Token auth (`[auth] mode = "token"`): which `[[users]]` entry a request speaks for.
//!
//! A token is accepted as `Authorization: Bearer TOKEN` (RFC 6750, what scripts send), as the
//! password of HTTP Basic with any user name (RFC 7617: what a browser can do for the web
//! frontend and its WebSocket, which cannot carry headers), or as `?token=` on `/ws` (what a
//! script's WebSocket client can do when it cannot set headers). The file holds only each
//! token's SHA-256; a presented token is hashed and compared with every user's digest in
//! constant time (`subtle`), so neither the match nor its position leaks through timing.
//!
//! Why the gate strips what it read: a backend must never see a user's token (it would land in
//! its logs), and the `comfy-user` a client sends is a claim, so the gate replaces it with the
//! authenticated name (ComfyUI's per-user data, `app/user_manager.py`, keys on that header).

use std::sync::Arc;

use base64::Engine;
use http::{HeaderMap, HeaderValue, Method, Uri, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::User;

/// ComfyUI's header naming the user (`app/user_manager.py` `get_request_user_id`).
pub const COMFY_USER: &str = "comfy-user";

/// The token a request presents: from `Authorization` (Bearer, or Basic's password), else, on
/// `/ws` only (`ws`), from `?token=`. `None` if it presents none.
pub fn presented_token(headers: &HeaderMap, uri: &Uri, ws: bool) -> Option<String> {
    if let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
            return Some(rest.to_string());
        }
        if scheme.eq_ignore_ascii_case("basic") {
            return basic_password(rest);
        }
        return None;
    }
    if !ws {
        return None;
    }
    form_urlencoded::parse(uri.query()?.as_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
        .filter(|t| !t.is_empty())
}

/// The password of a Basic credential (`base64(user:password)`); the user name is ignored.
fn basic_password(encoded: &str) -> Option<String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (_, password) = text.split_once(':')?;
    (!password.is_empty()).then(|| password.to_string())
}

/// The user whose token `token` is. Every user's digest is compared, in constant time, with
/// no early exit.
pub fn user_of(users: &[Arc<User>], token: &str) -> Option<Arc<User>> {
    let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    let mut found = None;
    for u in users {
        if bool::from(u.token_sha256.ct_eq(&digest)) {
            found = Some(u.clone());
        }
    }
    found
}

/// Headers of a request the gate forwards for `user`: the credential removed, `comfy-user`
/// set to the user's name (whatever the client claimed).
pub fn for_upstream(headers: &mut HeaderMap, user: &User) {
    headers.remove(header::AUTHORIZATION);
    headers.remove(COMFY_USER);
    if let Ok(v) = HeaderValue::from_str(&user.name) {
        headers.insert(COMFY_USER, v);
    }
}

/// Whether a user who is not an admin may have `method path` (after ComfyUI's `/api` prefix
/// is taken off) proxied to a backend: not under one of `admin_paths`; then reads (`GET`,
/// `HEAD`) of anything, and ComfyUI's per-user data (`user_data`) with any method but
/// creating ComfyUI users (`POST /users`). Writes to other routes (custom nodes' own) are an
/// admin's: the gate cannot know what they change for everyone.
pub fn user_may_proxy(
    method: &Method,
    path: &str,
    user_data: bool,
    admin_paths: &[String],
) -> bool {
    // ComfyUI serves every route also under `/api` (custom nodes' `/api/x` as `/api/api/x`):
    // the prefixes are matched with every leading `/api` taken off.
    let mut path = path;
    while let Some(rest) = path.strip_prefix("/api").filter(|r| r.starts_with('/')) {
        path = rest;
    }
    let under =
        |prefix: &String| path.starts_with(prefix.as_str()) || path == prefix.trim_end_matches('/');
    if admin_paths.iter().any(under) {
        return false;
    }
    let read = method == Method::GET || method == Method::HEAD;
    match (user_data, path) {
        (true, "/users") => read,
        (true, _) => true,
        (false, _) => read,
    }
}

/// Whether the request's credential is HTTP Basic: one a browser sends by itself, on any
/// site's requests to the gate (so those need the same-site check, `origin::credential_is_own`).
pub fn is_basic(headers: &HeaderMap) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split(' ').next())
        .is_some_and(|scheme| scheme.eq_ignore_ascii_case("basic"))
}

/// `uri` without its `token` query parameters (a credential a backend must not log); `None` if
/// it has none.
pub fn without_token(uri: &Uri) -> Option<Uri> {
    let query = uri.query()?;
    let pairs: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    if !pairs.iter().any(|(k, _)| k == "token") {
        return None;
    }
    let kept = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs.iter().filter(|(k, _)| k != "token"))
        .finish();
    let path_and_query = match kept.is_empty() {
        true => uri.path().to_string(),
        false => format!("{}?{kept}", uri.path()),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = path_and_query.parse().ok();
    Uri::from_parts(parts).ok()
}

/// A new token: 32 random bytes, hex, with a `cgt_` prefix (so a leaked one is recognisable
/// in a secret scanner), and its SHA-256 as `[[users]] token_sha256` takes it.
pub fn new_token() -> (String, String) {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let token = format!("cgt_{}", hex(&bytes));
    let digest = hex(&Sha256::digest(token.as_bytes()));
    (token, digest)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;

    fn user(name: &str, token: &str) -> Arc<User> {
        Arc::new(User {
            name: name.into(),
            token_sha256: Sha256::digest(token.as_bytes()).into(),
            band: 0,
            weight: 1.0,
            admin: false,
            limits: Limits::default(),
        })
    }

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        h
    }

    fn uri(s: &str) -> Uri {
        s.parse().unwrap()
    }

    #[test]
    fn bearer_basic_and_query_tokens() {
        let u = uri("/prompt");
        let t = |h: Option<&str>| presented_token(&headers(h), &u, false);
        assert_eq!(t(Some("Bearer abc")).as_deref(), Some("abc"));
        assert_eq!(t(Some("bearer   abc ")).as_deref(), Some("abc"));
        let basic = base64::engine::general_purpose::STANDARD.encode("anyone:abc");
        assert_eq!(t(Some(&format!("Basic {basic}"))).as_deref(), Some("abc"));
        // A colon in the password stays in it (RFC 7617: the user name ends at the first).
        let basic = base64::engine::general_purpose::STANDARD.encode(":a:b");
        assert_eq!(t(Some(&format!("Basic {basic}"))).as_deref(), Some("a:b"));
        for bad in [
            "Bearer",
            "Bearer ",
            "Basic !!!",
            "Basic Zm9v",
            "Digest x",
            "abc",
        ] {
            assert_eq!(t(Some(bad)), None, "{bad}");
        }
        assert_eq!(t(None), None);
        // `?token=` only on the socket.
        let q = uri("/ws?clientId=c&token=t%2B1");
        assert_eq!(
            presented_token(&headers(None), &q, true).as_deref(),
            Some("t+1")
        );
        assert_eq!(presented_token(&headers(None), &q, false), None);
        assert_eq!(
            presented_token(&headers(None), &uri("/ws?token="), true),
            None
        );
    }

    #[test]
    fn a_token_names_its_user_only() {
        let users = [user("al", "one"), user("bo", "two")];
        assert_eq!(user_of(&users, "two").unwrap().name, "bo");
        assert_eq!(user_of(&users, "one").unwrap().name, "al");
        assert!(user_of(&users, "three").is_none());
        assert!(user_of(&users, "").is_none());
        assert!(user_of(&[], "one").is_none());
    }

    #[test]
    fn upstream_sees_the_name_not_the_token_or_the_claim() {
        let mut h = headers(Some("Bearer secret"));
        h.insert(COMFY_USER, HeaderValue::from_static("admin"));
        for_upstream(&mut h, &user("al", "secret"));
        assert!(h.get(header::AUTHORIZATION).is_none());
        assert_eq!(h[COMFY_USER], "al");
    }

    #[test]
    fn users_proxy_reads_and_their_own_data_only() {
        let admin_paths: Vec<String> = crate::config::DEFAULT_ADMIN_PATHS
            .map(String::from)
            .to_vec();
        let may = |m: Method, p: &str, data: bool| user_may_proxy(&m, p, data, &admin_paths);
        assert!(may(Method::GET, "/extensions/x/main.js", false));
        assert!(may(Method::HEAD, "/", false));
        assert!(may(Method::GET, "/i18n", false));
        assert!(may(Method::POST, "/userdata/workflows%2Fa.json", true));
        assert!(may(Method::DELETE, "/userdata/a.json", true));
        assert!(may(Method::POST, "/settings/Comfy.X", true));
        assert!(may(Method::GET, "/users", true));
        assert!(!may(Method::POST, "/users", true), "creating ComfyUI users");
        assert!(!may(Method::POST, "/some_custom_node/run", false));
        assert!(!may(Method::GET, "/internal/logs", false));
        assert!(!may(Method::GET, "/internal", false));
        assert!(!may(Method::GET, "/manager/reboot", false));
        assert!(!may(Method::POST, "/customnode/install", false));
        assert!(
            !may(Method::GET, "/api/internal/logs", false),
            "every /api twin"
        );
        assert!(!may(Method::GET, "/api/api/manager/reboot", false));
        assert!(!may(
            Method::GET,
            "/v2/comfyui_manager/comfyui_switch_version",
            false
        ));
        assert!(may(Method::GET, "/api/i18n", false));
    }

    #[test]
    fn a_token_in_the_query_is_not_forwarded() {
        let uri: Uri = "/x?a=1&token=s3cret&b=2".parse().unwrap();
        assert_eq!(without_token(&uri).unwrap().to_string(), "/x?a=1&b=2");
        let only: Uri = "/x?token=s3cret".parse().unwrap();
        assert_eq!(without_token(&only).unwrap().to_string(), "/x");
        assert!(without_token(&"/x?a=1".parse().unwrap()).is_none());
        assert!(without_token(&"/x".parse().unwrap()).is_none());
    }

    #[test]
    fn new_tokens_are_random_and_hash_to_their_digest() {
        let (t1, d1) = new_token();
        let (t2, _) = new_token();
        assert_ne!(t1, t2);
        assert!(t1.starts_with("cgt_") && t1.len() == 4 + 64);
        let users = [Arc::new(User {
            token_sha256: crate::config::parse_sha256(&d1).unwrap(),
            ..(*user("x", "")).clone()
        })];
        assert!(user_of(&users, &t1).is_some());
    }
}
