//! Who asks, and whose a prompt is: the [`Caller`] the edge establishes for each request (its
//! user when auth is on, its client address always), and the [`Tenant`] a prompt keeps from it.
//!
//! Why one type: isolation (what a caller may see and touch), rate limits and quotas (keyed by
//! the tenant), fair share and priority (the tenant's weight and band) and the audit log all
//! ask the same question, and a prompt must answer it the same way after a restart, so the
//! answer is recorded with the prompt.

use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::{Auth, Limits, User};

/// The folder (of each file type) under which users' uploads are kept, one folder per user.
pub const UPLOADS_ROOT: &str = "users";

/// The caller of one request, as the edge established it.
#[derive(Clone, Debug)]
pub struct Caller {
    /// Scopes calls without ids (interrupt, queue and history clear): `user:NAME` with auth
    /// on; with auth off the open model's `key:…` / `user:…` / `ip:…` (see
    /// `edge::identity`), which a client can claim.
    pub identity: String,
    /// The authenticated user (auth on); `None` for anonymous clients (auth off).
    pub user: Option<Arc<User>>,
    /// The client's address: the peer, or the client trusted proxies name.
    pub client: IpAddr,
}

impl Caller {
    /// An anonymous caller (auth off) with the open model's `identity`.
    pub fn anonymous(identity: String, client: IpAddr) -> Self {
        Self {
            identity,
            user: None,
            client,
        }
    }

    /// An authenticated user.
    pub fn user(user: Arc<User>, client: IpAddr) -> Self {
        Self {
            identity: format!("user:{}", user.name),
            user: Some(user),
            client,
        }
    }

    /// What limits and fair share are keyed by: `user:NAME`, or `ip:ADDR` when anonymous (a
    /// `Comfy-User` header or an API key the gate does not know is the client's claim, so it
    /// never buys a share of its own).
    pub fn tenant_key(&self) -> String {
        match &self.user {
            Some(u) => format!("user:{}", u.name),
            None => format!("ip:{}", self.client),
        }
    }

    /// Sees and acts on everyone's prompts: an admin user, or anyone when auth is off.
    pub fn sees_all(&self) -> bool {
        self.user.as_ref().is_none_or(|u| u.admin)
    }

    /// Whether this caller may see or act on something of `owner` (a user name; `None`: made
    /// anonymously, with auth off). With auth off everyone may (ComfyUI's open model).
    pub fn may_access(&self, owner: Option<&str>) -> bool {
        match &self.user {
            None => true,
            Some(u) => u.admin || owner == Some(u.name.as_str()),
        }
    }

    /// Where an upload of this caller to `subfolder` is stored: a user's (not an admin's)
    /// under `users/NAME/`, so users never see or overwrite each other's uploads; anyone
    /// else's where asked. The answer names the folder, so ComfyUI's clients (which load what
    /// the answer names) need no change.
    pub fn upload_subfolder(&self, subfolder: &str) -> String {
        match self.user.as_ref().filter(|u| !u.admin) {
            Some(u) if subfolder.trim_matches('/').is_empty() => {
                format!("{UPLOADS_ROOT}/{}", u.name)
            }
            Some(u) => format!(
                "{UPLOADS_ROOT}/{}/{}",
                u.name,
                subfolder.trim_start_matches('/')
            ),
            None => subfolder.to_string(),
        }
    }

    /// The user whose upload folder `subfolder` is in, if any.
    pub fn upload_owner(subfolder: &str) -> Option<&str> {
        // Case ignored: one folder on a backend whose file system ignores case.
        let (root, rest) = subfolder.split_once('/')?;
        if !root.eq_ignore_ascii_case(UPLOADS_ROOT) {
            return None;
        }
        Some(rest.split('/').next().unwrap_or(rest)).filter(|n| !n.is_empty())
    }

    /// The user's name, forwarded to backends as ComfyUI's `comfy-user`.
    pub fn user_name(&self) -> Option<&str> {
        self.user.as_deref().map(|u| u.name.as_str())
    }

    /// This caller's limits: the user's, or `[limits]` for an anonymous client.
    pub fn limits(&self, auth: &Auth) -> Limits {
        self.user.as_ref().map_or(auth.limits, |u| u.limits)
    }

    /// The prompt-side record of this caller.
    pub fn tenant(&self, auth: &Auth) -> Tenant {
        let band = self.user.as_ref().map_or(auth.default_band, |u| u.band);
        Tenant {
            key: self.tenant_key(),
            user: self.user_name().map(str::to_string),
            client: Some(self.client.to_string()),
            band: auth.bands.get(band).cloned().unwrap_or_default(),
            weight: self.user.as_ref().map_or(1.0, |u| u.weight),
            admin: self.user.as_ref().is_some_and(|u| u.admin),
        }
    }
}

/// Whose a prompt is, recorded with it at submit (and persisted).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tenant {
    /// See [`Caller::tenant_key`]. Empty for records written before tenants existed.
    #[serde(default)]
    pub key: String,
    /// The user who submitted it (auth on).
    #[serde(default)]
    pub user: Option<String>,
    /// The client address it came from.
    #[serde(default)]
    pub client: Option<String>,
    /// Its priority band's name (`scheduler.bands`); an unknown name counts as the default.
    #[serde(default)]
    pub band: String,
    /// Its user's fair-share weight.
    #[serde(default = "one")]
    pub weight: f64,
    /// Submitted by an admin (`front: true` then moves it ahead of everyone in its band).
    #[serde(default)]
    pub admin: bool,
}

impl Default for Tenant {
    fn default() -> Self {
        Self {
            key: String::new(),
            user: None,
            client: None,
            band: String::new(),
            weight: 1.0,
            admin: false,
        }
    }
}

fn one() -> f64 {
    1.0
}
