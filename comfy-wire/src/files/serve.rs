//! A file as aiohttp's `FileResponse` serves it (ComfyUI's `/view` of a stored file, `server.py`
//! → `aiohttp/web_fileresponse.py`): `Accept-Ranges: bytes`, an `ETag` of
//! `"<mtime_ns hex>-<size hex>"`, `Last-Modified` (the mtime rounded up to the second),
//! one byte range → 206 with `Content-Range: bytes a-b/size`, an unsatisfiable or multiple range
//! → 416 with `Content-Range: bytes */size`, `If-None-Match` / `If-Modified-Since` → 304,
//! `If-Match` / `If-Unmodified-Since` → 412, `If-Range` by date, and HEAD with GET's headers and
//! no body. Range parsing is the `http-range-header` crate's (the parser tower-http uses).
//!
//! Both comfy-sim and the gate's own store answer through here, so a client sees the same file
//! server whichever holds the file.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};
use http_range_header::SyntacticallyCorrectRange;

use crate::http::{Body, BoxError, empty_body, status};

/// A file's validators, as aiohttp computes them.
#[derive(Clone, Debug, PartialEq)]
pub struct Validators {
    pub size: u64,
    /// `"<mtime_ns hex>-<size hex>"`, quotes included.
    pub etag: String,
    /// The mtime rounded up to a whole second (aiohttp's `math.ceil`), as sent.
    pub last_modified: SystemTime,
}

impl Validators {
    /// From a file's metadata.
    pub fn of(meta: &std::fs::Metadata) -> Self {
        let mtime = meta.modified().unwrap_or(UNIX_EPOCH);
        let since = mtime.duration_since(UNIX_EPOCH).unwrap_or_default();
        let ceil = since.as_secs() + u64::from(since.subsec_nanos() > 0);
        Self {
            size: meta.len(),
            etag: format!("\"{:x}-{:x}\"", since.as_nanos(), meta.len()),
            last_modified: UNIX_EPOCH + Duration::from_secs(ceil),
        }
    }
}

/// Whether an `If-None-Match` / `If-Match` list names `etag` (`*` matches anything; `weak`
/// ignores a `W/` prefix, as for If-None-Match).
fn etag_matches(list: &str, etag: &str, weak: bool) -> bool {
    list.split(',').map(str::trim).any(|tag| {
        if tag == "*" {
            return true;
        }
        let tag = if weak {
            tag.strip_prefix("W/").unwrap_or(tag)
        } else {
            tag
        };
        tag == etag
    })
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn header_date(headers: &HeaderMap, name: header::HeaderName) -> Option<SystemTime> {
    header_str(headers, name).and_then(|v| httpdate::parse_http_date(v).ok())
}

/// The status and byte range to answer with (the range inclusive), before any body is read.
#[derive(Debug, PartialEq)]
enum Plan {
    NotModified,
    PreconditionFailed,
    Unsatisfiable,
    Whole,
    Part(u64, u64),
}

fn plan(v: &Validators, headers: &HeaderMap) -> Plan {
    let if_match = header_str(headers, header::IF_MATCH);
    if if_match.is_some_and(|list| !etag_matches(list, &v.etag, false)) {
        return Plan::PreconditionFailed;
    }
    if if_match.is_none()
        && header_date(headers, header::IF_UNMODIFIED_SINCE).is_some_and(|d| v.last_modified > d)
    {
        return Plan::PreconditionFailed;
    }
    let if_none_match = header_str(headers, header::IF_NONE_MATCH);
    if if_none_match.is_some_and(|list| etag_matches(list, &v.etag, true)) {
        return Plan::NotModified;
    }
    if if_none_match.is_none()
        && header_date(headers, header::IF_MODIFIED_SINCE).is_some_and(|d| v.last_modified <= d)
    {
        return Plan::NotModified;
    }
    let Some(range) = header_str(headers, header::RANGE) else {
        return Plan::Whole;
    };
    // If-Range by date only, as aiohttp: a changed file is sent whole.
    if header_date(headers, header::IF_RANGE).is_some_and(|d| v.last_modified > d) {
        return Plan::Whole;
    }
    let Ok(parsed) = http_range_header::parse_range_header(range) else {
        return Plan::Unsatisfiable;
    };
    // aiohttp reads `bytes=-0` as the tail from offset -0, that is the whole file, as a 206.
    if parsed.clone().into_ranges() == [SyntacticallyCorrectRange::FromLast(0)] && v.size > 0 {
        return Plan::Part(0, v.size - 1);
    }
    match parsed.validate(v.size).as_deref() {
        Ok([one]) => Plan::Part(*one.start(), *one.end()),
        Ok([]) => Plan::Whole,
        // aiohttp parses a single range only; several are answered 416.
        _ => Plan::Unsatisfiable,
    }
}

/// Serves the file at `path` for a `method` (GET or HEAD) request with `headers`, with the
/// semantics in the module docs; 404 with an empty body when it is not a readable file.
/// `content_type` and `disposition` (when given: `/view` sets one, `/userdata/{file}` does not)
/// are set on every answer (ComfyUI passes both to the `FileResponse` it builds, so 304, 412
/// and 416 carry them too).
pub fn serve_file(
    path: &Path,
    method: &Method,
    headers: &HeaderMap,
    content_type: &str,
    disposition: Option<&str>,
) -> Response<Body> {
    let Some(meta) = std::fs::metadata(path).ok().filter(|m| m.is_file()) else {
        return status(StatusCode::NOT_FOUND);
    };
    let v = Validators::of(&meta);
    let mut resp = match plan(&v, headers) {
        Plan::NotModified => {
            let mut resp = status(StatusCode::NOT_MODIFIED);
            set_validators(&mut resp, &v);
            resp
        }
        Plan::PreconditionFailed => {
            let mut resp = status(StatusCode::PRECONDITION_FAILED);
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(0));
            resp
        }
        Plan::Unsatisfiable => {
            let mut resp = status(StatusCode::RANGE_NOT_SATISFIABLE);
            if let Ok(cr) = HeaderValue::from_str(&format!("bytes */{}", v.size)) {
                resp.headers_mut().insert(header::CONTENT_RANGE, cr);
            }
            resp
        }
        Plan::Whole => match send(path, method, &v, None) {
            Some(resp) => resp,
            None => return status(StatusCode::NOT_FOUND),
        },
        Plan::Part(a, b) => match send(path, method, &v, Some((a, b))) {
            Some(resp) => resp,
            None => return status(StatusCode::NOT_FOUND),
        },
    };
    // ComfyUI hands both headers to its `FileResponse`, so every answer carries them, 304, 412
    // and 416 included (ComfyUI 0.8.0 transcript, `tests/fixtures/comfyui-0.8.0/view.json`).
    if let Ok(ct) = HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    if let Some(cd) = disposition.and_then(disposition_value) {
        resp.headers_mut().insert(header::CONTENT_DISPOSITION, cd);
    }
    resp
}

fn set_validators(resp: &mut Response<Body>, v: &Validators) {
    let h = resp.headers_mut();
    if let Ok(tag) = HeaderValue::from_str(&v.etag) {
        h.insert(header::ETAG, tag);
    }
    if let Ok(date) = HeaderValue::from_str(&httpdate::fmt_http_date(v.last_modified)) {
        h.insert(header::LAST_MODIFIED, date);
    }
}

/// The 200 (whole) or 206 (`range`, inclusive) answer; `None` when the file cannot be opened.
fn send(
    path: &Path,
    method: &Method,
    v: &Validators,
    range: Option<(u64, u64)>,
) -> Option<Response<Body>> {
    let (start, count) = match range {
        Some((a, b)) => (a, b - a + 1),
        None => (0, v.size),
    };
    let body = if method == Method::HEAD {
        empty_body()
    } else {
        file_part(path, start, count).ok()?
    };
    let mut resp = Response::new(body);
    if range.is_some() {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    set_validators(&mut resp, v);
    let h = resp.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    if let Some((a, b)) = range
        && let Ok(cr) = HeaderValue::from_str(&format!("bytes {a}-{b}/{}", v.size))
    {
        h.insert(header::CONTENT_RANGE, cr);
    }
    Some(resp)
}

/// A `Content-Disposition` value as aiohttp writes it: the name's UTF-8 bytes as they are
/// (`HeaderValue::from_str` would refuse anything not ASCII); `None` for a control character.
pub fn disposition_value(disposition: &str) -> Option<HeaderValue> {
    HeaderValue::from_bytes(disposition.as_bytes()).ok()
}

/// `count` bytes of the file at `path` from `start`, streamed (a video can be large).
fn file_part(path: &Path, start: u64, count: u64) -> std::io::Result<Body> {
    use futures_util::StreamExt;
    use std::io::{Seek, SeekFrom};
    use tokio::io::AsyncReadExt;
    let mut file = std::fs::File::open(path)?;
    file.seek(SeekFrom::Start(start))?;
    let reader = tokio::fs::File::from_std(file).take(count);
    let frames = tokio_util::io::ReaderStream::new(reader)
        .map(|chunk| chunk.map(hyper::body::Frame::data).map_err(BoxError::from));
    Ok(http_body_util::BodyExt::boxed(
        http_body_util::StreamBody::new(frames),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validators() -> Validators {
        Validators {
            size: 100,
            etag: "\"abc-64\"".into(),
            last_modified: UNIX_EPOCH + Duration::from_secs(1_000_000),
        }
    }

    fn with(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn ranges_as_aiohttp_answers_them() {
        let v = validators();
        let r = |s: &str| plan(&v, &with(&[(header::RANGE, s)]));
        assert_eq!(r("bytes=0-1"), Plan::Part(0, 1));
        assert_eq!(r("bytes=10-"), Plan::Part(10, 99));
        assert_eq!(r("bytes=-5"), Plan::Part(95, 99));
        assert_eq!(r("bytes=90-500"), Plan::Part(90, 99));
        assert_eq!(r("bytes=100-"), Plan::Unsatisfiable);
        assert_eq!(r("bytes=5-1"), Plan::Unsatisfiable);
        assert_eq!(r("bytes=0-1,5-6"), Plan::Unsatisfiable);
        assert_eq!(r("lines=0-1"), Plan::Unsatisfiable);
        assert_eq!(r("bytes=-0"), Plan::Part(0, 99));
        assert_eq!(r("bytes=-999"), Plan::Part(0, 99));
    }

    #[test]
    fn validators_give_not_modified_and_precondition_failed() {
        let v = validators();
        let date = httpdate::fmt_http_date(v.last_modified);
        let p = |h: &[(header::HeaderName, &str)]| plan(&v, &with(h));
        assert_eq!(
            p(&[(header::IF_NONE_MATCH, "\"abc-64\"")]),
            Plan::NotModified
        );
        assert_eq!(
            p(&[(header::IF_NONE_MATCH, "W/\"abc-64\"")]),
            Plan::NotModified
        );
        assert_eq!(p(&[(header::IF_NONE_MATCH, "\"other\"")]), Plan::Whole);
        assert_eq!(p(&[(header::IF_MODIFIED_SINCE, &date)]), Plan::NotModified);
        let earlier = httpdate::fmt_http_date(v.last_modified - Duration::from_secs(5));
        assert_eq!(p(&[(header::IF_MODIFIED_SINCE, &earlier)]), Plan::Whole);
        assert_eq!(
            p(&[(header::IF_MATCH, "\"other\"")]),
            Plan::PreconditionFailed
        );
        assert_eq!(
            p(&[(header::IF_RANGE, &earlier), (header::RANGE, "bytes=0-1")]),
            Plan::Whole
        );
    }
}
