//! `[tls]`: HTTPS on the client listener, and optionally a cleartext listener that sends every
//! request to it (nginx's `listen 443 ssl` with `return 301 https://$host$request_uri` on 80).
//!
//! Only the paths are checked here; the files are read when the gate starts (and on a reload),
//! where an unreadable or mismatched pair is reported naming its file.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;

use serde::Deserialize;
use toml::Spanned;

/// `[tls]` as written. `cert` and `key` come together, or not at all.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain, the server's certificate first, then intermediates. Default none
    /// (the client listener speaks cleartext HTTP).
    pub cert: Option<Spanned<PathBuf>>,
    /// PEM private key of that certificate (PKCS#8, PKCS#1 or SEC1). Default none.
    pub key: Option<Spanned<PathBuf>>,
    /// A cleartext listener whose every request is answered 308 Permanent Redirect to
    /// `https://` the same host and target (on the TLS listener's port unless it is 443).
    /// Default none. Needs `cert` and `key`.
    pub redirect_listen: Option<Spanned<SocketAddr>>,
}

/// `[tls]`, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tls {
    /// PEM certificate chain file.
    pub cert: PathBuf,
    /// PEM private key file.
    pub key: PathBuf,
    /// The cleartext redirecting listener, if any.
    pub redirect_listen: Option<SocketAddr>,
}

/// Where a `[tls]` error is (a byte range of the file), the field, and why.
type TlsProblem = (Option<Range<usize>>, &'static str, String);

/// `None` without a certificate; the field and why when half configured.
pub(super) fn check(raw: &TlsConfig) -> Result<Option<Tls>, TlsProblem> {
    match (&raw.cert, &raw.key) {
        (Some(cert), Some(key)) => Ok(Some(Tls {
            cert: cert.get_ref().clone(),
            key: key.get_ref().clone(),
            redirect_listen: raw.redirect_listen.as_ref().map(|r| *r.get_ref()),
        })),
        (Some(cert), None) => Err((
            Some(cert.span()),
            "tls.key",
            "`cert` needs its `key`".into(),
        )),
        (None, Some(key)) => Err((
            Some(key.span()),
            "tls.cert",
            "`key` needs its `cert`".into(),
        )),
        (None, None) => match &raw.redirect_listen {
            Some(r) => Err((
                Some(r.span()),
                "tls.redirect_listen",
                "redirects to HTTPS need `cert` and `key`".into(),
            )),
            None => Ok(None),
        },
    }
}

#[cfg(test)]
mod tests {
    use crate::config::parse;

    const BACKEND: &str = "[[backend]]\nurl = \"http://a:1\"\n";

    #[test]
    fn cert_and_key_come_together() {
        let c = parse(&format!("[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\nredirect_listen = \"0.0.0.0:80\"\n{BACKEND}"), "p.toml").unwrap();
        let tls = c.tls.expect("tls on");
        assert_eq!(tls.cert.to_str(), Some("c.pem"));
        assert_eq!(tls.redirect_listen.map(|a| a.port()), Some(80));
        assert!(parse(BACKEND, "p.toml").unwrap().tls.is_none());
        let e = parse(&format!("[tls]\ncert = \"c.pem\"\n{BACKEND}"), "p.toml").unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (2, "tls.key"), "{e}");
        let e = parse(
            &format!("[tls]\nredirect_listen = \"0.0.0.0:80\"\n{BACKEND}"),
            "p.toml",
        )
        .unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (2, "tls.redirect_listen"),
            "{e}"
        );
    }
}
