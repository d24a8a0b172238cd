//! `[access_log]`: nginx's `access_log` directive for the client listener. Off unless a path
//! is given, as the gate already logs what matters per prompt (`[audit]`); an operator who runs
//! the gate "like nginx" turns it on and gets the lines their log tools already parse.

use std::path::PathBuf;

use serde::Deserialize;

use crate::logfile::LogTarget;

/// `[access_log]`: one line per client request (`crate::edge::access_log`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AccessLog {
    /// Where the lines go: a file path (appended to; reopened by name on `SIGUSR1`,
    /// logrotate's convention), or `"-"` for standard output. Default: unset, no access log.
    pub path: Option<String>,
    /// The line's shape: `"combined"` (default; nginx's predefined `combined` format) or
    /// `"json"` (one object per line, nginx's variable names plus the gate's own).
    pub format: AccessLogFormat,
}

/// `[access_log] format`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// nginx's `combined`: `$remote_addr - $remote_user [$time_local] "$request" $status
    /// $body_bytes_sent "$http_referer" "$http_user_agent"`. The default.
    #[default]
    Combined,
    /// One JSON object per line.
    Json,
}

impl AccessLog {
    /// Where the lines go, `None` when the log is off (no path, or a blank one).
    pub fn target(&self) -> Option<LogTarget> {
        match self.path.as_deref().map(str::trim) {
            None | Some("") => None,
            Some("-") => Some(LogTarget::Stdout),
            Some(path) => Some(LogTarget::File(PathBuf::from(path))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AccessLog, toml::de::Error> {
        toml::from_str(text)
    }

    #[test]
    fn off_by_default_and_combined_unless_told() {
        let off = parse("").unwrap();
        assert_eq!(off.target(), None);
        assert_eq!(off.format, AccessLogFormat::Combined);
        let blank = parse("path = \" \"").unwrap();
        assert_eq!(blank.target(), None);
    }

    #[test]
    fn a_dash_is_stdout_and_anything_else_a_file() {
        assert_eq!(
            parse("path = \"-\"").unwrap().target(),
            Some(LogTarget::Stdout)
        );
        let file = parse("path = \"/var/log/comfy-gate/access.log\"\nformat = \"json\"").unwrap();
        assert_eq!(
            file.target(),
            Some(LogTarget::File("/var/log/comfy-gate/access.log".into()))
        );
        assert_eq!(file.format, AccessLogFormat::Json);
    }

    #[test]
    fn unknown_formats_and_fields_are_refused() {
        assert!(parse("format = \"common\"").is_err());
        assert!(parse("pathh = \"x\"").is_err());
    }
}
