//! Each layer of the stack over a trivial inner service.

use std::io::Read;

use http_body_util::BodyExt;

use super::*;
use crate::http::{full, json_bytes, status};

/// An inner service that answers `answer(request)`.
fn stack_over<F>(answer: F) -> ClientService<Body>
where
    F: Fn(Request<Body>) -> Response<Body> + Clone + Send + Sync + 'static,
{
    let inner = tower::service_fn(move |req: Request<Body>| {
        let resp = answer(req);
        async move { Ok::<_, Infallible>(resp) }
    });
    around(inner, AccessLog::default())
}

fn get(headers: &[(&str, &str)]) -> Request<Body> {
    let mut req = Request::get("/x").body(full("")).unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    req
}

/// A JSON answer of `n` bytes (compressible: one repeated character).
fn json_of(n: usize) -> Response<Body> {
    let text = format!("\"{}\"", "a".repeat(n - 2));
    json_bytes(StatusCode::OK, text.into_bytes())
}

async fn body_of(resp: Response<Body>) -> Vec<u8> {
    resp.into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec()
}

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .unwrap();
    out
}

#[tokio::test]
async fn every_request_gets_a_fresh_uuid_that_the_inner_service_and_the_client_see() {
    // The inner service echoes the id it was given.
    let echo = |req: Request<Body>| {
        let id = req.headers().get(REQUEST_ID).cloned();
        let mut resp = status(StatusCode::OK);
        if let Some(id) = id {
            resp.headers_mut().insert("x-seen-id", id);
        }
        resp
    };
    let stack = stack_over(echo);
    let mut ids = Vec::new();
    for sent in [None, Some("client-chosen")] {
        let headers: Vec<(&str, &str)> = sent.map(|id| (REQUEST_ID, id)).into_iter().collect();
        let resp = stack.clone().oneshot(get(&headers)).await.unwrap();
        let id = resp.headers()[REQUEST_ID].to_str().unwrap().to_string();
        assert_eq!(
            resp.headers()["x-seen-id"],
            id.as_str(),
            "the same id inside"
        );
        assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
        assert_ne!(id, "client-chosen", "a client's id is replaced");
        ids.push(id);
    }
    assert_ne!(ids[0], ids[1]);
}

#[tokio::test]
async fn large_json_is_gzipped_only_when_asked() {
    let stack = stack_over(|_| json_of(4096));
    let plain = stack.clone().oneshot(get(&[])).await.unwrap();
    assert!(plain.headers().get(header::CONTENT_ENCODING).is_none());
    let plain = body_of(plain).await;
    assert_eq!(plain.len(), 4096);
    let asked = stack
        .oneshot(get(&[("accept-encoding", "gzip")]))
        .await
        .unwrap();
    assert_eq!(asked.headers()[header::CONTENT_ENCODING], "gzip");
    assert_eq!(asked.headers()[header::VARY], "accept-encoding");
    let zipped = body_of(asked).await;
    assert!(zipped.len() < 200, "{} bytes", zipped.len());
    assert_eq!(gunzip(&zipped), plain);
}

#[tokio::test]
async fn small_json_images_upgrades_and_encoded_answers_are_left_alone() {
    let png = |_: Request<Body>| {
        let mut resp = Response::new(full(vec![0u8; 4096]));
        resp.headers_mut()
            .insert(header::CONTENT_TYPE, "image/png".parse().unwrap());
        resp
    };
    let encoded = |_: Request<Body>| {
        let mut resp = json_of(4096);
        resp.headers_mut()
            .insert(header::CONTENT_ENCODING, "br".parse().unwrap());
        resp
    };
    let upgrade = |_: Request<Body>| status(StatusCode::SWITCHING_PROTOCOLS);
    let small = |_: Request<Body>| json_of(usize::from(COMPRESS_MIN_BYTES) - 1);
    let asks = [("accept-encoding", "gzip, br")];
    for (what, stack) in [
        ("png", stack_over(png)),
        ("encoded", stack_over(encoded)),
        ("101", stack_over(upgrade)),
        ("small", stack_over(small)),
    ] {
        let resp = stack.oneshot(get(&asks)).await.unwrap();
        let encoding = resp.headers().get(header::CONTENT_ENCODING);
        let expected = (what == "encoded").then_some("br");
        assert_eq!(encoding.map(|v| v.to_str().unwrap()), expected, "{what}");
        assert!(resp.headers().get(header::VARY).is_none(), "{what}");
    }
}

#[tokio::test]
async fn request_extensions_reach_the_inner_service() {
    // hyper's `OnUpgrade` and the connection's `ConnInfo` travel as extensions.
    let info = ConnInfo {
        peer: "192.0.2.1:5000".parse().unwrap(),
        local: "127.0.0.1:8188".parse().unwrap(),
        tls: false,
    };
    let stack = stack_over(move |req| match req.extensions().get::<ConnInfo>() {
        Some(seen) if seen.peer == info.peer => status(StatusCode::NO_CONTENT),
        _ => status(StatusCode::INTERNAL_SERVER_ERROR),
    });
    let mut req = get(&[]);
    req.extensions_mut().insert(info);
    let resp = stack.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
}

#[test]
fn json_is_recognised_with_parameters_and_any_case() {
    let is = |ct: &str| {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, ct.parse().unwrap());
        is_json(StatusCode::OK, Version::HTTP_11, &h, &Extensions::new())
    };
    assert!(is("application/json"));
    assert!(is("Application/JSON; charset=utf-8"));
    assert!(!is("application/jsonx"));
    assert!(!is("text/html"));
    assert!(!is_json(
        StatusCode::OK,
        Version::HTTP_11,
        &HeaderMap::new(),
        &Extensions::new()
    ));
}
