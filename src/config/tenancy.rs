//! The multi-tenant sections of `proxy.toml`: `[auth]`, `[[users]]`, `[limits]`, the priority
//! bands of `[scheduler]` and `[audit]`, as written and as validated.
//!
//! Why here: users, their tokens, bands and limits are read by the edge (who is asking, may they
//! ask), by the scheduler (bands, fair-share weights, running caps) and by the audit log; the
//! config layer is the one they all import. Tokens are never in the file, only their SHA-256.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

/// `[auth]`: who may use the gate.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `"off"` (default: anyone who reaches the port, ComfyUI's open model) or `"token"` (every
    /// client request carries a `[[users]]` token: `Authorization: Bearer`, HTTP Basic with the
    /// token as password, or `?token=` on `/ws`).
    pub mode: AuthMode,
    /// The realm named in `WWW-Authenticate` (what a browser shows in its login box). Default
    /// `"comfy-gate"`.
    pub realm: Option<String>,
    /// Path prefixes (after ComfyUI's `/api` prefix is taken off) only admins may use, whatever
    /// the method, on routes the gate proxies. Besides these, a user (not an admin) may proxy
    /// only reads (`GET`, `HEAD`) and ComfyUI's per-user data (`/userdata`, `/v2/userdata`,
    /// `/settings`; not `POST /users`). Default [`DEFAULT_ADMIN_PATHS`]: ComfyUI's
    /// `/internal/` (logs with others' prompts, file lists) and ComfyUI-Manager's routes
    /// (installs, restarts).
    pub admin_paths: Option<Vec<String>>,
}

/// See [`AuthConfig::admin_paths`].
pub const DEFAULT_ADMIN_PATHS: [&str; 11] = [
    "/internal/",
    "/manager/",
    "/customnode/",
    "/externalmodel/",
    "/snapshot/",
    "/comfyui_manager/",
    "/v2/manager/",
    "/v2/customnode/",
    "/v2/externalmodel/",
    "/v2/snapshot/",
    "/v2/comfyui_manager/",
];

/// See [`AuthConfig::mode`].
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    #[default]
    Off,
    Token,
}

/// One `[[users]]` entry.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// The user's name: shown in logs, the audit log and `/admin/usage`, and forwarded to
    /// backends as ComfyUI's `comfy-user`. Required, unique.
    pub name: Spanned<String>,
    /// Hex SHA-256 of the user's token (`comfy-gate token NAME` prints one). Required, unique.
    pub token_sha256: Spanned<String>,
    /// The user's priority band, one of `scheduler.bands`. Default `scheduler.default_band`.
    #[serde(default)]
    pub priority: Option<Spanned<String>>,
    /// Share of GPU time against other users of the same band (weighted fair sharing).
    /// Default 1.0; must be positive.
    #[serde(default)]
    pub weight: Option<Spanned<f64>>,
    /// Sees and may act on every user's prompts, events and files; `front: true` moves a prompt
    /// ahead of everyone in its band. Default false.
    #[serde(default)]
    pub admin: bool,
    /// This user's own limits; each field left out is `[limits]`'s.
    #[serde(default)]
    pub limits: LimitOverrides,
}

/// `[limits]`: the defaults for every user, and for every client address of anonymous clients.
/// Each is 0 = off (the default): the gate limits nothing it was not told to.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Prompts accepted per minute (a GCRA rate: one every `60 / n` seconds). Default 0.
    pub prompts_per_minute: u32,
    /// Prompts that may come at once on top of that rate. Default 0: 1 when a rate is set.
    pub prompt_burst: u32,
    /// Prompts waiting at once (in the gate queue or a backend's, not started). Default 0.
    pub max_waiting: u32,
    /// Prompts sent to backends at once (running, or queued there). Default 0.
    pub max_running: u32,
    /// GPU-seconds of run time per UTC day; beyond it prompts are refused until midnight UTC.
    /// Default 0.
    pub gpu_seconds_per_day: u64,
    /// Requests per second in each route class: submit (`POST /prompt`), read (queue, history,
    /// jobs, object info, …), files (`/view`, uploads). Each class has its own bucket with a
    /// burst of one second's worth. Default 0.
    pub requests_per_second: u32,
    /// Upload bytes per second (`/upload/image`, `/upload/mask`), a burst of one second's worth
    /// or one whole body (`server.max_body_bytes`), whichever is larger. Default 0.
    pub upload_bytes_per_second: u64,
    /// WebSocket connections open at once from one client address (never per user: a limit on
    /// sockets is a limit on a machine). Default 0.
    pub ws_per_ip: u32,
}

/// A user's `limits = { … }`: each field set replaces `[limits]`'s.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitOverrides {
    pub prompts_per_minute: Option<u32>,
    pub prompt_burst: Option<u32>,
    pub max_waiting: Option<u32>,
    pub max_running: Option<u32>,
    pub gpu_seconds_per_day: Option<u64>,
    pub requests_per_second: Option<u32>,
    pub upload_bytes_per_second: Option<u64>,
}

/// The limits of one user (or of one anonymous client address), 0 = off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub prompts_per_minute: u32,
    pub prompt_burst: u32,
    pub max_waiting: u32,
    pub max_running: u32,
    pub gpu_seconds_per_day: u64,
    pub requests_per_second: u32,
    pub upload_bytes_per_second: u64,
}

impl Limits {
    /// `[limits]` as every user's default.
    pub fn from_defaults(c: &LimitsConfig) -> Self {
        Self {
            prompts_per_minute: c.prompts_per_minute,
            prompt_burst: c.prompt_burst,
            max_waiting: c.max_waiting,
            max_running: c.max_running,
            gpu_seconds_per_day: c.gpu_seconds_per_day,
            requests_per_second: c.requests_per_second,
            upload_bytes_per_second: c.upload_bytes_per_second,
        }
    }

    /// These limits with a user's overrides applied.
    pub fn overridden(self, o: &LimitOverrides) -> Self {
        Self {
            prompts_per_minute: o.prompts_per_minute.unwrap_or(self.prompts_per_minute),
            prompt_burst: o.prompt_burst.unwrap_or(self.prompt_burst),
            max_waiting: o.max_waiting.unwrap_or(self.max_waiting),
            max_running: o.max_running.unwrap_or(self.max_running),
            gpu_seconds_per_day: o.gpu_seconds_per_day.unwrap_or(self.gpu_seconds_per_day),
            requests_per_second: o.requests_per_second.unwrap_or(self.requests_per_second),
            upload_bytes_per_second: o
                .upload_bytes_per_second
                .unwrap_or(self.upload_bytes_per_second),
        }
    }
}

/// `[audit]`: one JSON line per finished prompt.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Where the lines go: a file path (appended; reopened on SIGUSR1, logrotate's
    /// convention), `"stdout"`, or unset (default: no audit log; `/admin/usage` still sums).
    pub log: Option<String>,
}

/// One validated user.
#[derive(Clone, Debug, PartialEq)]
pub struct User {
    pub name: String,
    /// SHA-256 of the token.
    pub token_sha256: [u8; 32],
    /// Index into [`Auth::bands`].
    pub band: usize,
    /// Fair-share weight, positive.
    pub weight: f64,
    pub admin: bool,
    pub limits: Limits,
}

/// `[auth]`, `[[users]]`, `[limits]` and the bands, validated.
#[derive(Clone, Debug)]
pub struct Auth {
    pub mode: AuthMode,
    /// See [`AuthConfig::realm`].
    pub realm: String,
    /// In file order.
    pub users: Vec<Arc<User>>,
    /// `[limits]`: anonymous clients' limits (per client address), and every user's defaults.
    pub limits: Limits,
    /// See [`LimitsConfig::ws_per_ip`].
    pub ws_per_ip: u32,
    /// Priority band names, highest first (`scheduler.bands`).
    pub bands: Vec<String>,
    /// Index into `bands` of anonymous clients' and unassigned users' band.
    pub default_band: usize,
    /// See [`AuthConfig::admin_paths`].
    pub admin_paths: Vec<String>,
}

impl Default for Auth {
    fn default() -> Self {
        Self {
            mode: AuthMode::Off,
            realm: DEFAULT_REALM.to_string(),
            users: Vec::new(),
            limits: Limits::default(),
            ws_per_ip: 0,
            bands: default_bands(),
            default_band: 0,
            admin_paths: DEFAULT_ADMIN_PATHS.map(String::from).to_vec(),
        }
    }
}

impl Auth {
    /// Whether clients must present a token.
    pub fn required(&self) -> bool {
        self.mode == AuthMode::Token
    }

    /// The band index of a band name, if configured.
    pub fn band(&self, name: &str) -> Option<usize> {
        self.bands.iter().position(|b| b == name)
    }
}

/// See [`AuthConfig::realm`].
pub const DEFAULT_REALM: &str = "comfy-gate";

/// `scheduler.bands`' default: `interactive` before `batch`.
pub fn default_bands() -> Vec<String> {
    vec!["interactive".to_string(), "batch".to_string()]
}

/// A validation error: the byte range it is at (its line), the field, the message.
pub type Problem = (Option<std::ops::Range<usize>>, String, String);

/// Validates users, limits and bands. `bands` and `default_band` are `scheduler`'s.
pub fn check(
    auth: &AuthConfig,
    users: &[UserConfig],
    limits: &LimitsConfig,
    bands: &[Spanned<String>],
    default_band: &Option<Spanned<String>>,
) -> Result<Auth, Problem> {
    let mut names: Vec<String> = Vec::new();
    for (i, b) in bands.iter().enumerate() {
        let name = b.get_ref().trim();
        if name.is_empty() || names.iter().any(|n| n == name) {
            let message = format!("band `{name}` is empty or listed twice");
            return Err((Some(b.span()), format!("scheduler.bands[{i}]"), message));
        }
        names.push(name.to_string());
    }
    if names.is_empty() {
        names = default_bands();
    }
    let band_of = |v: &Spanned<String>, field: String| {
        names
            .iter()
            .position(|n| n == v.get_ref().trim())
            .ok_or_else(|| {
                let message = format!(
                    "unknown band `{}` (scheduler.bands is {:?})",
                    v.get_ref(),
                    names
                );
                (Some(v.span()), field, message)
            })
    };
    let default_band = match default_band {
        Some(d) => band_of(d, "scheduler.default_band".into())?,
        None => 0,
    };
    let defaults = Limits::from_defaults(limits);
    let mut out: Vec<Arc<User>> = Vec::new();
    let mut tokens: HashMap<[u8; 32], usize> = HashMap::new();
    for (i, u) in users.iter().enumerate() {
        let name = u.name.get_ref().trim();
        let at = Some(u.name.span());
        if !valid_name(name) {
            let message = "must be 1 to 64 of A-Z a-z 0-9 . _ -, starting with a letter or \
                           digit (it names the user's upload folder and ComfyUI's comfy-user)"
                .to_string();
            return Err((at, format!("users[{i}].name"), message));
        }
        // Unique ignoring case: a user's folder is `users/NAME`, one folder on a backend whose
        // file system ignores case.
        if out.iter().any(|x| x.name.eq_ignore_ascii_case(name)) {
            let message = format!("the name `{name}` is taken by another user");
            return Err((at, format!("users[{i}].name"), message));
        }
        let token_sha256 = parse_sha256(u.token_sha256.get_ref()).ok_or_else(|| {
            let message = "must be 64 hex digits (the SHA-256 of the token; \
                           `comfy-gate token NAME` prints one)"
                .to_string();
            let at = Some(u.token_sha256.span());
            (at, format!("users[{i}].token_sha256"), message)
        })?;
        if let Some(other) = tokens.insert(token_sha256, i) {
            let message = format!("the same token as users[{other}]");
            let at = Some(u.token_sha256.span());
            return Err((at, format!("users[{i}].token_sha256"), message));
        }
        let band = match &u.priority {
            Some(p) => band_of(p, format!("users[{i}].priority"))?,
            None => default_band,
        };
        let weight = match &u.weight {
            Some(w) if !(w.get_ref().is_finite() && *w.get_ref() > 0.0) => {
                let message = "must be a positive number".to_string();
                return Err((Some(w.span()), format!("users[{i}].weight"), message));
            }
            Some(w) => *w.get_ref(),
            None => 1.0,
        };
        out.push(Arc::new(User {
            name: name.to_string(),
            token_sha256,
            band,
            weight,
            admin: u.admin,
            limits: defaults.overridden(&u.limits),
        }));
    }
    if auth.mode == AuthMode::Token && out.is_empty() {
        let message = "\"token\" needs at least one [[users]] entry".to_string();
        return Err((None, "auth.mode".into(), message));
    }
    let realm = auth.realm.clone().unwrap_or_else(|| DEFAULT_REALM.into());
    if realm.is_empty()
        || realm
            .chars()
            .any(|c| c == '"' || c == '\\' || c.is_control())
    {
        let message = "must be non-empty, without quotes, backslashes or control characters";
        return Err((None, "auth.realm".into(), message.into()));
    }
    let admin_paths = match &auth.admin_paths {
        Some(paths) => paths.clone(),
        None => DEFAULT_ADMIN_PATHS.map(String::from).to_vec(),
    };
    if let Some(bad) = admin_paths.iter().find(|p| !p.starts_with('/')) {
        let message = format!("`{bad}` must start with `/`");
        return Err((None, "auth.admin_paths".into(), message));
    }
    Ok(Auth {
        admin_paths,
        mode: auth.mode,
        realm,
        users: out,
        limits: defaults,
        ws_per_ip: limits.ws_per_ip,
        bands: names,
        default_band,
    })
}

/// A user name: 1 to 64 of `[A-Za-z0-9._-]`, the first a letter or digit. Safe as a path
/// component and in a header.
pub fn valid_name(name: &str) -> bool {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.chars().all(ok)
}

/// 64 hex digits (either case) as 32 bytes.
pub fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim().as_bytes();
    if hex.len() != 64 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use crate::config::{AuthMode, parse};

    const DIGEST_A: &str = "a665a45920422f9d417e4867efdc4fb8a04a1f3fff1fa07e998e86f7f7a27ae3";
    const DIGEST_B: &str = "b665a45920422f9d417e4867efdc4fb8a04a1f3fff1fa07e998e86f7f7a27ae3";
    const BACKEND: &str = "[[backend]]\nurl = \"http://a:1\"\n";

    fn user(name: &str, digest: &str, extra: &str) -> String {
        format!("[[users]]\nname = \"{name}\"\ntoken_sha256 = \"{digest}\"\n{extra}")
    }

    #[test]
    fn users_bands_and_limits_validate() {
        let text = format!(
            "[auth]\nmode = \"token\"\n[limits]\nprompts_per_minute = 10\nmax_running = 2\nws_per_ip = 8\n{}{}{BACKEND}",
            user(
                "al",
                DIGEST_A,
                "priority = \"batch\"\nweight = 2.5\nadmin = true\n"
            ),
            user(
                "bo",
                &DIGEST_B.to_uppercase(),
                "limits = { max_running = 5 }\n"
            ),
        );
        let c = parse(&text, "p.toml").unwrap();
        let a = &c.auth;
        assert_eq!(a.mode, AuthMode::Token);
        assert_eq!(a.bands, ["interactive", "batch"]);
        let (al, bo) = (&a.users[0], &a.users[1]);
        assert_eq!((al.band, al.weight, al.admin), (1, 2.5, true));
        assert_eq!((bo.band, bo.weight, bo.admin), (0, 1.0, false));
        assert_eq!(
            (al.limits.prompts_per_minute, al.limits.max_running),
            (10, 2)
        );
        assert_eq!(
            (bo.limits.prompts_per_minute, bo.limits.max_running),
            (10, 5)
        );
        assert_eq!(a.ws_per_ip, 8);
        // Auth off by default, everything open.
        let c = parse(BACKEND, "p.toml").unwrap();
        assert_eq!(c.auth.mode, AuthMode::Off);
        assert_eq!(c.auth.limits, crate::config::Limits::default());
        assert_eq!(c.scheduler.max_queued, 100_000);
    }

    /// `comfy-gate check`'s errors name the line and field: an unknown band, a token twice, a
    /// malformed digest, a name that cannot be a folder, token mode without users.
    #[test]
    fn errors_name_line_and_field() {
        let cases = [
            (
                format!("{}{BACKEND}", user("al", DIGEST_A, "priority = \"vip\"\n")),
                4,
                "users[0].priority",
            ),
            (
                format!(
                    "{}{}{BACKEND}",
                    user("al", DIGEST_A, ""),
                    user("bo", DIGEST_A, "")
                ),
                6,
                "users[1].token_sha256",
            ),
            (
                format!("{}{BACKEND}", user("al", "abc", "")),
                3,
                "users[0].token_sha256",
            ),
            (
                format!("{}{BACKEND}", user("../al", DIGEST_A, "")),
                2,
                "users[0].name",
            ),
            (
                format!(
                    "{}{}{BACKEND}",
                    user("al", DIGEST_A, ""),
                    user("al", DIGEST_B, "")
                ),
                5,
                "users[1].name",
            ),
            (
                format!("{}{BACKEND}", user("al", DIGEST_A, "weight = 0.0\n")),
                4,
                "users[0].weight",
            ),
            (
                format!("[scheduler]\nbands = [\"a\", \"a\"]\n{BACKEND}"),
                2,
                "scheduler.bands[1]",
            ),
            (
                format!("[scheduler]\ndefault_band = \"x\"\n{BACKEND}"),
                2,
                "scheduler.default_band",
            ),
            (
                format!("[auth]\nmode = \"token\"\n{BACKEND}"),
                0,
                "auth.mode",
            ),
        ];
        for (text, line, field) in cases {
            let e = parse(&text, "p.toml").unwrap_err();
            assert_eq!((e.line, e.field.as_str()), (line, field), "{e}\n{text}");
        }
    }
}
