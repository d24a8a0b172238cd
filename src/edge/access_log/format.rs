//! One access log line, in nginx's `combined` format or as JSON.
//!
//! The `combined` line is nginx's, byte for byte, so the parsers written for nginx read it:
//! `log_format combined '$remote_addr - $remote_user [$time_local] "$request" $status
//! $body_bytes_sent "$http_referer" "$http_user_agent"'`, with nginx's default escaping
//! (`"`, `\`, control bytes and bytes of 0x7F and above as `\xHH`, uppercase hex) and `-` for
//! an empty value. The time is UTC (`+0000`): the gate does not read the local zone (the
//! `time` crate cannot, safely, in a multi-threaded process).
//!
//! The JSON object uses nginx's variable names (`remote_addr`, `request_uri`, …, as people
//! write them in their `log_format … escape=json`), with `null` for what is absent, and adds
//! the gate's own facts (`user`, `backend`, `prompt_id`, `request_id`).

use std::net::IpAddr;
use std::time::Duration;

use http::HeaderValue;
use serde_json::json;

/// Everything one line says (see the module docs for the two shapes).
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// When the line is written (the request ended), ms since the Unix epoch (nginx's
    /// `$time_local`/`$time_iso8601` are the time of logging too).
    pub at_ms: i64,
    /// The client address the edge resolved (`$remote_addr` after `real_ip`).
    pub remote_addr: IpAddr,
    /// The gate user the request authenticated as (`$remote_user`; the gate's users present
    /// tokens, and this is the name their token belongs to). Also the JSON `user` field.
    pub user: Option<String>,
    /// `$request_method`.
    pub method: String,
    /// `$request_uri`: the path and query as the client sent them, except that a `token`
    /// query parameter (a credential, `/ws?token=`) is left out.
    pub uri: String,
    /// `$server_protocol`: `HTTP/1.0`, `HTTP/1.1`, `HTTP/2.0`.
    pub protocol: &'static str,
    /// `$status`; 499 when the client went away before the answer (nginx's code).
    pub status: u16,
    /// `$body_bytes_sent`: bytes of the response body sent (after compression).
    pub body_bytes_sent: u64,
    /// `$request_time`: from the request's arrival to the end of its response.
    pub request_time: Duration,
    /// `$http_referer`.
    pub referer: Option<HeaderValue>,
    /// `$http_user_agent`.
    pub user_agent: Option<HeaderValue>,
    /// `$request_id`: the `x-request-id` the gate gave the request.
    pub request_id: Option<HeaderValue>,
    /// The configured name of the backend that answered a proxied request.
    pub backend: Option<String>,
    /// The prompt a `POST /prompt` submitted.
    pub prompt_id: Option<String>,
    /// `$upstream_response_time` (to the backend's response head), when proxied.
    pub upstream_time: Option<Duration>,
}

impl Entry {
    /// The `combined` line, with its `\n`.
    pub fn combined(&self) -> String {
        let mut line = String::with_capacity(256);
        line.push_str(&self.remote_addr.to_string());
        line.push_str(" - ");
        push_field(&mut line, self.user.as_deref().map(str::as_bytes));
        line.push_str(" [");
        line.push_str(&time_local(self.at_ms));
        line.push_str("] \"");
        let request = format!("{} {} {}", self.method, self.uri, self.protocol);
        escape_into(&mut line, request.as_bytes());
        line.push_str(&format!("\" {} {} \"", self.status, self.body_bytes_sent));
        push_field(&mut line, self.referer.as_ref().map(HeaderValue::as_bytes));
        line.push_str("\" \"");
        push_field(
            &mut line,
            self.user_agent.as_ref().map(HeaderValue::as_bytes),
        );
        line.push_str("\"\n");
        line
    }

    /// The JSON line, with its `\n`.
    pub fn json(&self) -> String {
        let text = |v: &Option<HeaderValue>| {
            v.as_ref()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        let line = json!({
            "time": crate::sched::usage::rfc3339(self.at_ms),
            "remote_addr": self.remote_addr.to_string(),
            "remote_user": self.user,
            "request_method": self.method,
            "request_uri": self.uri,
            "server_protocol": self.protocol,
            "status": self.status,
            "body_bytes_sent": self.body_bytes_sent,
            "request_time": seconds(self.request_time),
            "http_referer": text(&self.referer),
            "http_user_agent": text(&self.user_agent),
            "request_id": text(&self.request_id),
            "user": self.user,
            "backend": self.backend,
            "prompt_id": self.prompt_id,
            "upstream_response_time": self.upstream_time.map(seconds),
        });
        let mut out = line.to_string();
        out.push('\n');
        out
    }

    /// A filled-in entry for tests.
    #[cfg(test)]
    pub fn example() -> Self {
        Entry {
            at_ms: 971_186_136_000,
            remote_addr: IpAddr::from([192, 0, 2, 7]),
            user: None,
            method: "GET".into(),
            uri: "/queue".into(),
            protocol: "HTTP/1.1",
            status: 200,
            body_bytes_sent: 42,
            request_time: Duration::from_millis(1234),
            referer: None,
            user_agent: Some(HeaderValue::from_static("curl/8.5.0")),
            request_id: Some(HeaderValue::from_static("0b5c4e1e")),
            backend: None,
            prompt_id: None,
            upstream_time: None,
        }
    }
}

/// Seconds with millisecond precision, as nginx prints `$request_time` (`0.012`).
fn seconds(d: Duration) -> f64 {
    d.as_millis() as f64 / 1000.0
}

/// A variable's value, escaped, or `-` when it is absent or empty (nginx's rule).
fn push_field(line: &mut String, value: Option<&[u8]>) {
    match value {
        Some(v) if !v.is_empty() => escape_into(line, v),
        _ => line.push('-'),
    }
}

/// nginx's default `log_format` escaping (`ngx_http_log_escape`): `"`, `\`, bytes below 0x20
/// and bytes of 0x7F and above become `\xHH` (uppercase hex); everything else is kept.
pub fn escape_into(line: &mut String, value: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in value {
        if !(0x20..0x7f).contains(&b) || b == b'"' || b == b'\\' {
            line.push_str("\\x");
            line.push(HEX[usize::from(b >> 4)] as char);
            line.push(HEX[usize::from(b & 0x0f)] as char);
        } else {
            line.push(b as char);
        }
    }
}

/// nginx's `$time_local` (`10/Oct/2000:13:55:36 +0000`), in UTC.
pub fn time_local(at_ms: i64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at_ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let month = MONTHS[usize::from(u8::from(t.month()) - 1)];
    format!(
        "{:02}/{month}/{:04}:{:02}:{:02}:{:02} +0000",
        t.day(),
        t.year(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combined_is_nginx_combined() {
        let line = Entry::example().combined();
        assert_eq!(
            line,
            "192.0.2.7 - - [10/Oct/2000:13:55:36 +0000] \"GET /queue HTTP/1.1\" 200 42 \"-\" \"curl/8.5.0\"\n"
        );
        let with = Entry {
            user: Some("alice".into()),
            referer: Some(HeaderValue::from_static("http://x/")),
            ..Entry::example()
        };
        assert!(with.combined().starts_with("192.0.2.7 - alice ["));
        assert!(with.combined().ends_with("\"http://x/\" \"curl/8.5.0\"\n"));
    }

    #[test]
    fn quotes_backslashes_and_non_printables_are_escaped_as_nginx_does() {
        let mut out = String::new();
        escape_into(&mut out, "a\"b\\c\td\u{7f}é~ ".as_bytes());
        assert_eq!(out, "a\\x22b\\x5Cc\\x09d\\x7F\\xC3\\xA9~ ");
        let sneaky = Entry {
            user_agent: Some(HeaderValue::from_bytes(b"x\" 500 \"evil").unwrap()),
            ..Entry::example()
        };
        assert!(
            sneaky.combined().ends_with("\"x\\x22 500 \\x22evil\"\n"),
            "{}",
            sneaky.combined()
        );
    }

    #[test]
    fn json_names_nginx_variables_and_the_gates_facts() {
        let e = Entry {
            user: Some("alice".into()),
            backend: Some("gpu0".into()),
            prompt_id: Some("p1".into()),
            upstream_time: Some(Duration::from_millis(7)),
            ..Entry::example()
        };
        let line = e.json();
        assert!(line.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "time",
                "remote_addr",
                "remote_user",
                "request_method",
                "request_uri",
                "server_protocol",
                "status",
                "body_bytes_sent",
                "request_time",
                "http_referer",
                "http_user_agent",
                "request_id",
                "user",
                "backend",
                "prompt_id",
                "upstream_response_time"
            ]
        );
        assert_eq!(v["time"], "2000-10-10T13:55:36.000Z");
        assert_eq!(v["request_time"], 1.234);
        assert_eq!(v["upstream_response_time"], 0.007);
        assert_eq!(v["http_referer"], serde_json::Value::Null);
        assert_eq!(
            (&v["user"], &v["backend"]),
            (&v["remote_user"], &"gpu0".into())
        );
    }

    #[test]
    fn time_local_pads_days_and_names_months() {
        assert_eq!(time_local(0), "01/Jan/1970:00:00:00 +0000");
        assert_eq!(time_local(1_709_251_199_999), "29/Feb/2024:23:59:59 +0000");
    }
}
