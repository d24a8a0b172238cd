//! The request path as the gate decides on it and as backends receive it: one normal form, so
//! the route the gate picks (its own answer, user data, a proxied route, a rate-limit class,
//! who may use it) is the route the backend would pick for the same bytes.
//!
//! Why: aiohttp (ComfyUI's server) matches routes on the percent-decoded path (since aiohttp
//! 3.10.6, `path_safe`), so `/hist%6fry` is its `/history`. A gate that matched the raw bytes
//! would proxy that request untouched to a backend that answers it as `/history`, past every
//! check the gate makes on its own `/history`. So the gate normalises first (RFC 3986 §6.2.2):
//! percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded and runs of `/`
//! merged (nginx's `merge_slashes`), and the request goes on, to the gate's routes and to
//! backends, with that path. Other escapes (`%2F`, `%20`, `%25` …) stay as they are: they are
//! data inside a segment (`/history/a%2Fb` names the prompt `a/b`), and aiohttp does not treat
//! them as route names either. A `.` or `..` segment (written or escaped) is a 400: browsers and
//! HTTP clients resolve them before sending, so only a request crafted to climb somewhere has
//! one, and refusing it is simpler to trust than resolving it.

use http::Uri;
use http::uri::PathAndQuery;

/// The normal form of `path` (without its query), or `None` if it has a `.` or `..` segment.
/// Pure; `path` is the raw request path, starting with `/` (an empty one is `/`).
pub fn normalize(path: &str) -> Option<String> {
    let decoded = decode_unreserved(path);
    let mut out = String::with_capacity(decoded.len());
    for segment in decoded.split('/') {
        match segment {
            "" => {}
            "." | ".." => return None,
            s => {
                out.push('/');
                out.push_str(s);
            }
        }
    }
    // A trailing slash is part of the route (`/api/` is not `/api`).
    if out.is_empty() || (decoded.len() > 1 && decoded.ends_with('/')) {
        out.push('/');
    }
    Some(out)
}

/// A path with a `.` or `..` segment (answered 400).
#[derive(Debug, PartialEq, Eq)]
pub struct DotSegment;

/// `uri` with its path in [`normalize`]d form (the query as it was); `Ok(None)` if it already
/// is.
pub fn normalized_uri(uri: &Uri) -> Result<Option<Uri>, DotSegment> {
    let path = uri.path();
    let normal = normalize(path).ok_or(DotSegment)?;
    if normal == path {
        return Ok(None);
    }
    let with_query = match uri.query() {
        Some(q) => format!("{normal}?{q}"),
        None => normal,
    };
    let mut parts = uri.clone().into_parts();
    // The normal form only drops and decodes characters of a valid path: it stays valid.
    parts.path_and_query = Some(PathAndQuery::try_from(with_query).map_err(|_| DotSegment)?);
    Uri::from_parts(parts).map(Some).map_err(|_| DotSegment)
}

/// Decodes `%XX` escapes of unreserved characters (RFC 3986 §2.3); every other byte, and every
/// other escape, is kept as it was.
fn decode_unreserved(path: &str) -> String {
    let b = path.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let (Some(hi), Some(lo)) = (
                b.get(i + 1).and_then(|&c| hex(c)),
                b.get(i + 2).and_then(|&c| hex(c)),
            )
        {
            let c = hi * 16 + lo;
            if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                out.push(c as char);
                i += 3;
                continue;
            }
        }
        // The path is ASCII (hyper's `Uri` refuses anything else), so bytes are chars.
        out.push(b[i] as char);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_of_route_names_are_decoded() {
        for (raw, normal) in [
            ("/hist%6fry", "/history"),
            ("/HIST%6Fry", "/HISTory"),
            ("/%61pi/jobs", "/api/jobs"),
            ("/promp%74", "/prompt"),
            ("/upload/imag%65", "/upload/image"),
            ("/%7e%2d%2E%5f", "/~-._"),
        ] {
            assert_eq!(normalize(raw).as_deref(), Some(normal), "{raw}");
        }
    }

    #[test]
    fn data_escapes_stay() {
        for raw in [
            "/history/a%2Fb",
            "/history/a%20b",
            "/view%3Fx",
            "/a%25b",
            "/a%2",
            "/a%",
            "/a%zz",
        ] {
            assert_eq!(normalize(raw).as_deref(), Some(raw), "{raw}");
        }
    }

    #[test]
    fn slashes_merge_and_dot_segments_are_refused() {
        for (raw, normal) in [
            ("", "/"),
            ("/", "/"),
            ("//history", "/history"),
            ("/api//jobs", "/api/jobs"),
            ("/api/", "/api/"),
            ("/a.b/.c/d..", "/a.b/.c/d.."),
        ] {
            assert_eq!(normalize(raw).as_deref(), Some(normal), "{raw}");
        }
        for dots in [
            "/..",
            "/./history",
            "/api/../history",
            "/api/%2e%2E/history",
            "/a/.",
            "/userdata/..",
        ] {
            assert_eq!(normalize(dots), None, "{dots}");
        }
    }

    #[test]
    fn the_query_is_kept() {
        let uri: Uri = "/vie%77?filename=a%2Fb.png&type=output".parse().unwrap();
        let normal = normalized_uri(&uri).unwrap().unwrap();
        assert_eq!(normal.to_string(), "/view?filename=a%2Fb.png&type=output");
        let already: Uri = "/view?x=1".parse().unwrap();
        assert_eq!(normalized_uri(&already), Ok(None));
        assert_eq!(normalized_uri(&"/../x".parse().unwrap()), Err(DotSegment));
    }
}
