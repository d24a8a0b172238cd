//! `[tls]`: HTTPS on the client listener, and optionally a cleartext listener that sends every
//! request to it (nginx's `listen 443 ssl` with `return 301 https://$host$request_uri` on 80);
//! and the certificate authorities trusted for `https://` backends (nginx's
//! `proxy_ssl_trusted_certificate`).
//!
//! The two sides are independent: a gate may speak cleartext to its clients and TLS to its
//! backends, or the other way round. For the listener only the paths are checked here; its files
//! are read when the gate starts (and on a reload), where an unreadable or mismatched pair is
//! reported naming its file. The backend CA bundle is read here, at load: a bundle that does not
//! parse would otherwise only show as backends that never come up, so it is a config error
//! naming the line and field instead.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
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
    /// PEM file of the certificate authorities that sign `https://` backends' certificates (one
    /// or more `CERTIFICATE` blocks). Set, these are the only roots trusted for backends: they
    /// replace the default, as nginx's `proxy_ssl_trusted_certificate` (a private CA should not
    /// share trust with every public one). Default none: Mozilla's roots (`webpki-roots`, built
    /// in; the platform's store is not read). A relative path is from the gate's working
    /// directory. Read at start and at each reload (a bad file is a config error); a changed
    /// bundle is applied by a restart.
    pub backend_ca: Option<Spanned<PathBuf>>,
}

/// `[tls] backend_ca`, read and checked: the trust anchors for `https://` backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendCa {
    /// The PEM file, as configured.
    pub path: PathBuf,
    /// Its certificates (DER), in file order; each parses as a trust anchor. Never empty.
    pub roots: Vec<CertificateDer<'static>>,
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
        (Some(cert), Some(key)) => {
            // Loaded here as the listener will load it, so that `comfy-gate check` and a reload
            // refuse a pair that would not serve (nginx -t does the same).
            if let Err(e) =
                comfy_wire::tls::TlsAcceptor::from_pem_files(cert.get_ref(), key.get_ref())
            {
                let at_key = matches!(&e, comfy_wire::tls::TlsError::File { path, .. } if path == key.get_ref())
                    || matches!(e, comfy_wire::tls::TlsError::Refused { .. });
                return Err(if at_key {
                    (Some(key.span()), "tls.key", e.to_string())
                } else {
                    (Some(cert.span()), "tls.cert", e.to_string())
                });
            }
            Ok(Some(Tls {
                cert: cert.get_ref().clone(),
                key: key.get_ref().clone(),
                redirect_listen: raw.redirect_listen.as_ref().map(|r| *r.get_ref()),
            }))
        }
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

/// `[tls] backend_ca` read: `None` when not set; the field and why (naming the file) when the
/// file is unreadable, holds no `CERTIFICATE` block, or a block that is not a certificate.
pub(super) fn check_backend_ca(raw: &TlsConfig) -> Result<Option<BackendCa>, TlsProblem> {
    let Some(spanned) = &raw.backend_ca else {
        return Ok(None);
    };
    let path = spanned.get_ref();
    let problem = |why: String| {
        let message = format!("{}: {why}", path.display());
        (Some(spanned.span()), "tls.backend_ca", message)
    };
    let roots = CertificateDer::pem_file_iter(path)
        .map_err(|e| problem(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| problem(format!("not a PEM certificate bundle: {e}")))?;
    if roots.is_empty() {
        return Err(problem("no CERTIFICATE block in the file".into()));
    }
    let mut store = rustls::RootCertStore::empty();
    for (i, der) in roots.iter().enumerate() {
        store.add(der.clone()).map_err(|e| {
            problem(format!(
                "certificate {} is not a CA certificate: {e}",
                i + 1
            ))
        })?;
    }
    Ok(Some(BackendCa {
        path: path.clone(),
        roots,
    }))
}

#[cfg(test)]
mod tests {
    use crate::config::parse;

    const BACKEND: &str = "[[backend]]\nurl = \"http://a:1\"\n";

    /// A certificate and its key for `localhost`, written in `dir`: their paths.
    fn pair(dir: &std::path::Path) -> (String, String) {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cert, key) = (dir.join("c.pem"), dir.join("k.pem"));
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.key_pair.serialize_pem()).unwrap();
        (cert.display().to_string(), key.display().to_string())
    }

    /// `comfy-gate check` loads the pair as the listener will: a missing file, garbage PEM or
    /// a key of another certificate is an error at the field's line.
    #[test]
    fn a_pair_that_would_not_serve_is_a_config_error() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair(dir.path());
        let text = |c: &str, k: &str| format!("[tls]\ncert = {c:?}\nkey = {k:?}\n{BACKEND}");
        let e = parse(&text("missing.pem", &key), "p.toml").unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (2, "tls.cert"), "{e}");
        std::fs::write(
            dir.path().join("bad.pem"),
            "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let bad = dir.path().join("bad.pem").display().to_string();
        let e = parse(&text(&bad, &key), "p.toml").unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (2, "tls.cert"), "{e}");
        let other = tempfile::tempdir().unwrap();
        let (_, other_key) = pair(other.path());
        let e = parse(&text(&cert, &other_key), "p.toml").unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (3, "tls.key"), "{e}");
    }

    #[test]
    fn cert_and_key_come_together() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair(dir.path());
        let c = parse(
            &format!(
                "[tls]\ncert = {cert:?}\nkey = {key:?}\nredirect_listen = \"0.0.0.0:80\"\n{BACKEND}"
            ),
            "p.toml",
        )
        .unwrap();
        let tls = c.tls.expect("tls on");
        assert_eq!(tls.cert.display().to_string(), cert);
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

    #[test]
    fn https_backends_default_to_port_443_and_verify_their_host() {
        let text = "[[backend]]\nurl = \"https://gpu.example\"\n[[backend]]\nurl = \"https://[::1]:8443\"\n[[backend]]\nurl = \"http://a\"\n";
        let c = parse(text, "p.toml").unwrap();
        let b = &c.backends;
        assert_eq!(b[0].base, "https://gpu.example:443");
        assert_eq!(
            (b[0].authority.as_str(), b[0].host()),
            ("gpu.example:443", "gpu.example")
        );
        assert!(b[0].uses_tls());
        assert_eq!((b[1].host(), b[1].uses_tls()), ("::1", true));
        assert_eq!(
            (b[2].base.as_str(), b[2].uses_tls()),
            ("http://a:80", false)
        );
        assert!(c.backend_ca.is_none(), "Mozilla's roots by default");
        assert!(
            c.tls.is_none(),
            "TLS to backends needs no listener certificate"
        );
    }

    #[test]
    fn backend_ca_is_read_at_load_and_needs_no_listener_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        let made = rcgen::generate_simple_self_signed(vec!["ca.example".into()]).unwrap();
        std::fs::write(&ca, made.cert.pem()).unwrap();
        let text = format!("[tls]\nbackend_ca = {ca:?}\n{BACKEND}");
        let c = parse(&text, "p.toml").unwrap();
        assert_eq!(c.backend_ca.map(|b| b.roots.len()), Some(1));
        std::fs::write(&ca, "not PEM\n").unwrap();
        let e = parse(&text, "p.toml").unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (2, "tls.backend_ca"), "{e}");
        assert!(e.message.contains("no CERTIFICATE block"), "{e}");
    }
}
