//! Where the configuration comes from: a file and the command line's overrides. The gate keeps
//! its [`Source`] so that a reload reads the configuration exactly as the start did
//! (`--listen`, `--backend` … still win over the file).

use std::net::SocketAddr;
use std::path::PathBuf;

use super::{Config, ConfigError, FileConfig, backend_from_url, parse_file, validate};

/// A configuration file (optional) and the overrides given beside it.
#[derive(Clone, Debug, Default)]
pub struct Source {
    /// `--config`: the TOML file (see `proxy.toml`). `None`: defaults plus overrides.
    pub path: Option<PathBuf>,
    /// `--listen`: replaces `server.listen`.
    pub listen: Option<SocketAddr>,
    /// `--admin-listen`: replaces `server.admin_listen`.
    pub admin_listen: Option<SocketAddr>,
    /// `--backend URL`, repeatable: when any, they replace the file's `[[backend]]` list.
    pub backends: Vec<String>,
    /// `--state-dir`: replaces `server.state_dir`.
    pub state_dir: Option<PathBuf>,
}

impl Source {
    /// A source that is only this file.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self {
            path: Some(path.into()),
            ..Self::default()
        }
    }

    /// Reads the file (if any), applies the overrides and validates the result. Errors name
    /// the file, the line and the field ([`ConfigError`]); a file that cannot be read is
    /// reported at line 0, field `(file)`.
    pub fn read(&self) -> Result<Config, ConfigError> {
        let (mut file, text, name) = match &self.path {
            Some(path) => {
                let name = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
                    file: name.clone(),
                    line: 0,
                    field: "(file)".into(),
                    message: e.to_string(),
                })?;
                (parse_file(&text, &name)?, text, name)
            }
            None => (
                FileConfig::default(),
                String::new(),
                "(command line)".to_string(),
            ),
        };
        if let Some(listen) = self.listen {
            file.server.listen = listen;
        }
        if let Some(admin) = self.admin_listen {
            file.server.admin_listen = admin;
        }
        if let Some(dir) = &self.state_dir {
            file.server.state_dir = Some(dir.clone());
        }
        if !self.backends.is_empty() {
            file.backends = self.backends.iter().map(|u| backend_from_url(u)).collect();
        }
        validate(file, &text, &name)
    }
}
