//! Reading `proxy.toml`: parsing, and the validation that names the file, the line and the
//! field of the first thing wrong.

use std::path::Path;

use toml::Spanned;

use super::{Backend, BackendConfig, Config, Edge, FileConfig, GpuSelector};

/// A configuration error: where it is and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {field}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub field: String,
    pub message: String,
}

/// Parses a backend URL, `http://host[:port]` or `https://host[:port]` (port 80 and 443 by
/// default, RFC 9110 §4.2), into `(base, authority)`: `scheme://host:port` and `host:port`. The
/// error says why in words (no scheme, another scheme, a path).
pub fn parse_backend_url(url: &str) -> Result<(String, String), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    let (scheme, default_port) = match uri.scheme_str() {
        Some("http") => ("http", 80),
        Some("https") => ("https", 443),
        Some(other) => {
            let message = format!("scheme `{other}` is not supported (use http:// or https://)");
            return Err(message);
        }
        None => return Err(format!("`{url}` has no scheme (expected http://host:port)")),
    };
    let authority = uri
        .authority()
        .ok_or_else(|| format!("`{url}` has no host"))?
        .to_string();
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(format!(
            "`{url}` has a path; backends are addressed at their root"
        ));
    }
    let authority = if authority.contains(':') && !authority.ends_with(']') {
        authority
    } else {
        format!("{authority}:{default_port}")
    };
    Ok((format!("{scheme}://{authority}"), authority))
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Parses and validates `text` read from `file`.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
    validate(parse_file(text, file)?, text, file)
}

/// Parses `text` read from `file` without validating it: a TOML syntax error, an unknown field
/// or a value of the wrong type is reported with its line and field.
pub fn parse_file(text: &str, file: &str) -> Result<FileConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| line_of(text, s.start)).unwrap_or(0);
        let message = e.message().to_string();
        // A bad value (an unknown enum name, a wrong type) is reported at its key's line.
        let key_on_line = e.span().and_then(|s| {
            let start = text[..s.start.min(text.len())]
                .rfind('\n')
                .map_or(0, |i| i + 1);
            text[start..]
                .split('=')
                .next()
                .map(|k| k.trim().to_string())
        });
        let field = message
            .split('`')
            .nth(1)
            .filter(|_| message.contains("field"))
            .map(str::to_string)
            .or(key_on_line.filter(|k| !k.is_empty() && !k.starts_with('[')))
            .unwrap_or_else(|| "(syntax)".to_string());
        ConfigError {
            file: file.to_string(),
            line,
            field,
            message,
        }
    })
}

/// Validates a parsed file (or one built from the command line, with an empty `text`).
pub fn validate(raw: FileConfig, text: &str, file: &str) -> Result<Config, ConfigError> {
    let err = |span: Option<std::ops::Range<usize>>, field: &str, message: String| ConfigError {
        file: file.to_string(),
        line: span.map(|s| line_of(text, s.start)).unwrap_or(0),
        field: field.to_string(),
        message,
    };
    check_limits(&raw).map_err(|(field, message)| err(None, field, message))?;
    let (backends, home) = check_backends(&raw, &err)?;
    let edge = check_edge(&raw, &err)?;
    let tls =
        super::tls::check(&raw.tls).map_err(|(span, field, message)| err(span, field, message))?;
    let backend_ca = super::tls::check_backend_ca(&raw.tls)
        .map_err(|(span, field, message)| err(span, field, message))?;
    let s = &raw.scheduler;
    let auth = super::tenancy::check(
        &raw.auth,
        &raw.users,
        &raw.limits,
        &s.bands,
        &s.default_band,
    )
    .map_err(|(span, field, message)| err(span, &field, message))?;
    Ok(Config {
        edge,
        auth,
        audit: raw.audit,
        access_log: raw.access_log,
        tls,
        backend_ca,
        server: raw.server,
        scheduler: raw.scheduler,
        health: raw.health,
        recovery: raw.recovery,
        placement: raw.placement,
        telemetry: raw.telemetry,
        metrics: raw.metrics,
        cache: raw.cache,
        backends,
        home: home.unwrap_or(0),
    })
}

/// Makes a [`ConfigError`] at a byte range of the file (its line), for a field.
type ErrorAt<'a> = dyn Fn(Option<std::ops::Range<usize>>, &str, String) -> ConfigError + 'a;

/// The numeric fields' bounds: `(field, message)` for the first one out of bounds.
fn check_limits(raw: &FileConfig) -> Result<(), (&'static str, String)> {
    let server = &raw.server;
    let rules: [(bool, &'static str, &str); 12] = [
        (
            raw.scheduler.max_inflight == 0,
            "scheduler.max_inflight",
            "must be at least 1",
        ),
        (
            raw.health.unhealthy_threshold == 0 || raw.health.healthy_threshold == 0,
            "health",
            "thresholds must be at least 1",
        ),
        (
            raw.health.interval_ms == 0 || raw.health.timeout_ms == 0,
            "health",
            "interval_ms and timeout_ms must be positive",
        ),
        (
            raw.health.socket_silence_ms < 3,
            "health.socket_silence_ms",
            "must be at least 3 (the gate pings three times in it)",
        ),
        (
            raw.recovery.stall_timeout_ms == 0 || raw.recovery.max_run_time_s == 0,
            "recovery",
            "stall_timeout_ms and max_run_time_s must be positive",
        ),
        (
            raw.placement.affinity_window == 0,
            "placement.affinity_window",
            "must be at least 1",
        ),
        (
            raw.server.max_body_bytes == 0,
            "server.max_body_bytes",
            "must be positive",
        ),
        (
            server.header_read_timeout_ms == 0
                || server.keepalive_timeout_ms == 0
                || server.body_read_timeout_ms == 0
                || server.send_timeout_ms == 0,
            "server",
            "header_read_timeout_ms, keepalive_timeout_ms, body_read_timeout_ms and send_timeout_ms must be positive",
        ),
        (
            server.max_connections == 0,
            "server.max_connections",
            "must be at least 1",
        ),
        (
            server.max_header_bytes < 8192,
            "server.max_header_bytes",
            "must be at least 8192 (the smallest HTTP/1 read buffer hyper takes)",
        ),
        (
            server.max_uri_bytes == 0,
            "server.max_uri_bytes",
            "must be at least 1",
        ),
        (
            !(raw.placement.vram_margin.is_finite() && raw.placement.vram_margin >= 1.0),
            "placement.vram_margin",
            "must be a number of at least 1",
        ),
    ];
    match rules.iter().find(|(bad, _, _)| *bad) {
        Some((_, field, message)) => Err((field, message.to_string())),
        None => Ok(()),
    }
}

/// The `[[backend]]` entries, checked: each URL parsed, no base or name twice (backends are
/// keyed by name), at most one home; and the index of the home backend.
fn check_backends(
    raw: &FileConfig,
    err: &ErrorAt<'_>,
) -> Result<(Vec<Backend>, Option<usize>), ConfigError> {
    let mut backends: Vec<Backend> = Vec::new();
    let mut home = None;
    for (i, b) in raw.backends.iter().enumerate() {
        let span = || Some(b.url.span());
        let field = format!("backend[{i}].url");
        let (base, authority) =
            parse_backend_url(b.url.get_ref().trim()).map_err(|m| err(span(), &field, m))?;
        if backends.iter().any(|x| x.base == base) {
            return Err(err(span(), &field, format!("`{base}` is listed twice")));
        }
        let name = b.name.clone().unwrap_or_else(|| authority.clone());
        if backends.iter().any(|x| x.name == name) {
            let message = format!("the name `{name}` is taken by another backend");
            return Err(err(span(), &format!("backend[{i}].name"), message));
        }
        if b.max_inflight == Some(0) {
            let field = format!("backend[{i}].max_inflight");
            return Err(err(span(), &field, "must be at least 1".into()));
        }
        if b.home {
            if home.is_some() {
                let field = format!("backend[{i}].home");
                return Err(err(span(), &field, "only one backend can be home".into()));
            }
            home = Some(i);
        }
        let gpu = match &b.gpu {
            Some(g) => Some(
                GpuSelector::parse(g).map_err(|m| err(span(), &format!("backend[{i}].gpu"), m))?,
            ),
            None => None,
        };
        // Where a later reload names this backend in its errors.
        let line = err(span(), &field, String::new()).line;
        backends.push(Backend {
            line,
            name,
            base,
            authority,
            max_inflight: b.max_inflight.unwrap_or(raw.scheduler.max_inflight),
            gpu,
        });
    }
    if backends.is_empty() {
        let message = "at least one [[backend]] (or --backend URL) is required".into();
        return Err(err(None, "backend", message));
    }
    Ok((backends, home))
}

/// `[edge]`: each trusted proxy a CIDR or a single address (`/32` or `/128`).
fn check_edge(raw: &FileConfig, err: &ErrorAt<'_>) -> Result<Edge, ConfigError> {
    let mut trusted = Vec::new();
    for (i, spanned) in raw.edge.trusted_proxies.iter().enumerate() {
        let entry = spanned.get_ref().trim();
        let net = entry
            .parse::<ipnet::IpNet>()
            .or_else(|_| entry.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .map_err(|_| {
                let message = format!("`{entry}` is neither a CIDR (10.0.0.0/8) nor an address");
                err(
                    Some(spanned.span()),
                    &format!("edge.trusted_proxies[{i}]"),
                    message,
                )
            })?;
        trusted.push(net);
    }
    Ok(Edge {
        trusted_proxies: trusted,
        real_ip_header: raw.edge.real_ip_header,
        proxy_protocol: raw.edge.proxy_protocol,
    })
}

/// Reads and validates a file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        line: 0,
        field: "(file)".into(),
        message: e.to_string(),
    })?;
    parse(&text, &file)
}

/// Builds a backend entry from a command-line `--backend URL`.
pub fn backend_from_url(url: &str) -> BackendConfig {
    BackendConfig {
        url: Spanned::new(0..0, url.to_string()),
        name: None,
        max_inflight: None,
        home: false,
        gpu: None,
    }
}
