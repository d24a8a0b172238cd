//! `[auth] mode = "token"`: every request names its user by a token (Bearer, HTTP Basic's
//! password, `?token=` on the socket) or gets 401; and each user sees and touches only their
//! own prompts, events, history, jobs, queue entries, outputs and uploads, while an admin sees
//! all. Real gate over comfy-sim, real HTTP and WebSocket clients.
mod common;

use base64::Engine;
use common::*;
use serde_json::{Value, json};

const USERS: [(&str, &str); 3] = [("alice", ""), ("bob", ""), ("root", "admin = true")];

async fn gate_with_users(sims: &[&comfy_sim::SimHandle]) -> comfy_gate::GateHandle {
    gate_with(sims, |f| {
        f.backends[0].max_inflight = Some(1);
        with_users(f, &USERS, "");
    })
    .await
}

/// A socket to `/ws?clientId=…&token=…` (`query` is what follows `clientId=`), or the HTTP
/// status the upgrade was refused with.
async fn connect(base: &str, query: &str) -> Result<Ws, u16> {
    let url = format!("{}/ws?clientId={query}", base.replacen("http", "ws", 1));
    match tokio_tungstenite::connect_async(&url).await {
        Ok(_) => Ok(Ws::connect(base, Some(query)).await),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("ws connect: {e}"),
    }
}

#[tokio::test]
async fn no_token_is_401_on_http_and_on_the_socket() {
    let sim = sim().await;
    let gate = gate_with_users(&[&sim]).await;
    let base = gate.url();
    for (method, path) in [
        ("GET", "/queue"),
        ("POST", "/prompt"),
        ("GET", "/"),
        ("GET", "/settings"),
    ] {
        let req = http().request(method.parse().unwrap(), format!("{base}{path}"));
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{method} {path}");
        let challenges: Vec<String> = resp
            .headers()
            .get_all("www-authenticate")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect();
        assert_eq!(
            challenges,
            ["Bearer realm=\"comfy-gate\"", "Basic realm=\"comfy-gate\""],
            "{method} {path}"
        );
        let body: Value = resp.json().await.unwrap();
        assert_eq!(
            body["error"]["type"], "unauthorized",
            "ComfyUI's error shape"
        );
        assert!(body["node_errors"].is_object());
    }
    // A token nobody has is no token.
    let (code, _) = get_as("mallory", &base, "/queue").await;
    assert_eq!(code, 401);
    assert_eq!(connect(&base, "c").await.err(), Some(401));
    assert_eq!(connect(&base, "c&token=tok-mallory").await.err(), Some(401));
    // Nothing was queued by any of it.
    assert_eq!(
        get_as("root", &base, "/queue").await.1["queue_pending"],
        json!([])
    );
    gate.shutdown().await;
}

#[tokio::test]
async fn bearer_basic_and_query_tokens_all_work() {
    let sim = sim().await;
    let gate = gate_with_users(&[&sim]).await;
    let base = gate.url();
    let (code, q) = get_as("alice", &base, "/queue").await;
    assert_eq!((code, q["queue_running"].clone()), (200, json!([])));
    let basic = http()
        .get(format!("{base}/queue"))
        .basic_auth("whoever", Some("tok-alice"))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 200);
    let mut ws = connect(&base, "c1&token=tok-alice").await.unwrap();
    let first = ws.next().await.unwrap();
    assert_eq!(first.kind(), "status");
    assert_eq!(
        first.data()["sid"],
        "c1",
        "the client's own sid, not the gate's key"
    );
    // The browser's way: Basic credentials on the upgrade request itself.
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("{}/ws?clientId=c2", base.replacen("http", "ws", 1))
        .into_client_request()
        .unwrap();
    let cred = base64::engine::general_purpose::STANDARD.encode("u:tok-bob");
    req.headers_mut()
        .insert("authorization", format!("Basic {cred}").parse().unwrap());
    let (mut basic_ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    use futures_util::StreamExt;
    let first = basic_ws.next().await.unwrap().unwrap();
    assert!(
        first.to_text().unwrap().contains("\"sid\":\"c2\""),
        "{first}"
    );
    // The gate's own submit path too.
    let (code, _) = post_as("alice", &base, "/prompt", &json!({"prompt": blur_graph(1)})).await;
    assert_eq!(code, 200);
    gate.shutdown().await;
}

/// The prompt ids of the frames that carry one.
fn prompt_ids(frames: &[Frame]) -> Vec<String> {
    frames
        .iter()
        .filter_map(|f| f.data()["prompt_id"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn users_see_and_touch_only_their_own_and_an_admin_sees_all() {
    let sim = sim().await;
    let gate = gate_with_users(&[&sim]).await;
    let base = gate.url();
    // Bob connects first with the clientId Alice will use: it does not make him her.
    let mut bob_ws = connect(&base, "shared&token=tok-bob").await.unwrap();
    let mut alice_ws = connect(&base, "shared&token=tok-alice").await.unwrap();
    let submit = |id: &str, g: Value| json!({"prompt": g, "prompt_id": id, "client_id": "shared"});
    // Alice's long prompt holds the one slot; one of hers and one of Bob's wait behind it.
    assert_eq!(
        post_as("alice", &base, "/prompt", &submit("a-run", steps(1, 8000)))
            .await
            .0,
        200
    );
    assert_eq!(
        post_as("alice", &base, "/prompt", &submit("a-wait", blur_graph(1)))
            .await
            .0,
        200
    );
    assert_eq!(
        post_as("bob", &base, "/prompt", &submit("b-wait", blur_graph(2)))
            .await
            .0,
        200
    );

    let queue_of = |who: &'static str| {
        let base = base.clone();
        async move { queue_ids(&get_as(who, &base, "/queue").await.1) }
    };
    assert_eq!(queue_of("alice").await, ["a-run", "a-wait"]);
    assert_eq!(queue_of("bob").await, ["b-wait"]);
    assert_eq!(queue_of("root").await, ["a-run", "a-wait", "b-wait"]);
    let jobs = |v: &Value| -> Vec<String> {
        v["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(jobs(&get_as("bob", &base, "/api/jobs").await.1), ["b-wait"]);
    assert_eq!(get_as("bob", &base, "/api/jobs/a-run").await.0, 404);
    assert_eq!(get_as("root", &base, "/api/jobs/a-run").await.0, 200);

    // Bob can neither delete nor interrupt Alice's prompts, by id or by clearing.
    post_as(
        "bob",
        &base,
        "/queue",
        &json!({"delete": ["a-wait"], "clear": true}),
    )
    .await;
    post_as("bob", &base, "/interrupt", &json!({"prompt_id": "a-run"})).await;
    post_as("bob", &base, "/interrupt", &json!({})).await;
    assert_eq!(queue_of("alice").await, ["a-run", "a-wait"]);
    assert_eq!(
        queue_of("bob").await,
        Vec::<String>::new(),
        "his own clear took his"
    );

    // Alice's prompts finish as hers, with her events on her socket only.
    let a_run = alice_ws.until_done("a-run").await;
    assert!(
        a_run.iter().any(|f| f.kind() == "execution_success"),
        "not interrupted by Bob"
    );
    let a_wait = alice_ws.until_done("a-wait").await;
    assert!(a_wait.iter().any(|f| f.kind() == "executed"));
    let history = |who: &'static str| {
        let base = base.clone();
        async move {
            let (_, h) = get_as(who, &base, "/history").await;
            let mut ids: Vec<String> = h.as_object().unwrap().keys().cloned().collect();
            ids.sort();
            ids
        }
    };
    assert_eq!(history("alice").await, ["a-run", "a-wait"]);
    assert_eq!(history("bob").await, Vec::<String>::new());
    assert_eq!(history("root").await, ["a-run", "a-wait"]);
    assert_eq!(get_as("bob", &base, "/history/a-wait").await.1, json!({}));
    assert!(get_as("root", &base, "/history/a-wait").await.1["a-wait"].is_object());

    // Bob cannot read her output; she and the admin can.
    let (_, h) = get_as("alice", &base, "/history/a-wait").await;
    let image = h["a-wait"]["outputs"]["3"]["images"][0].clone();
    let query = format!(
        "/view?filename={}&subfolder={}&type={}",
        image["filename"].as_str().unwrap(),
        image["subfolder"].as_str().unwrap(),
        image["type"].as_str().unwrap()
    );
    let view = |who: &str| {
        http()
            .get(format!("{base}{query}"))
            .bearer_auth(format!("tok-{who}"))
            .send()
    };
    assert_eq!(view("bob").await.unwrap().status(), 404);
    assert_eq!(view("alice").await.unwrap().status(), 200);
    assert_eq!(view("root").await.unwrap().status(), 200);

    // Freeing the fleet's memory is an admin's call: it unloads everyone's models.
    assert_eq!(
        post_as("bob", &base, "/free", &json!({"unload_models": true}))
            .await
            .0,
        403
    );
    assert_eq!(
        post_as("root", &base, "/free", &json!({"unload_models": true}))
            .await
            .0,
        200
    );

    // Bob's socket, though it uses the same clientId, heard none of Alice's prompts.
    let mut heard = Vec::new();
    while let Ok(Some(f)) = bob_ws
        .next_within(std::time::Duration::from_millis(300))
        .await
    {
        heard.push(f);
    }
    let ids = prompt_ids(&heard);
    assert!(ids.is_empty(), "Bob heard {ids:?}");
    gate.shutdown().await;
}

#[tokio::test]
async fn uploads_live_in_their_users_folder() {
    let sim = sim().await;
    let gate = gate_with_users(&[&sim]).await;
    let base = gate.url();
    let form = || {
        reqwest::multipart::Form::new().part(
            "image",
            reqwest::multipart::Part::bytes(png(8, 8, 7)).file_name("cat.png"),
        )
    };
    let upload = |who: &str| {
        http()
            .post(format!("{base}/upload/image"))
            .bearer_auth(format!("tok-{who}"))
            .multipart(form())
    };
    let (code, saved) = send_for_json(upload("alice")).await;
    assert_eq!(code, 200);
    assert_eq!(
        saved,
        json!({"name": "cat.png", "subfolder": "users/alice", "type": "input"})
    );
    // Bob's upload of the same name is his own file, not a rename of hers or an overwrite.
    let (_, bob_saved) = send_for_json(upload("bob")).await;
    assert_eq!(bob_saved["subfolder"], "users/bob");
    let view = |who: &str, sub: &str| {
        http()
            .get(format!(
                "{base}/view?filename=cat.png&type=input&subfolder={sub}"
            ))
            .bearer_auth(format!("tok-{who}"))
            .send()
    };
    assert_eq!(view("alice", "users/alice").await.unwrap().status(), 200);
    assert_eq!(view("bob", "users/alice").await.unwrap().status(), 404);
    assert_eq!(view("root", "users/alice").await.unwrap().status(), 200);
    // Bob cannot load her file in a prompt (as ComfyUI refuses a file it does not have).
    let graph = files::load_and_save("users/alice/cat.png", "stolen");
    let (code, body) = post_as("bob", &base, "/prompt", &json!({"prompt": graph})).await;
    assert_eq!(code, 400, "{body}");
    assert_eq!(
        body["node_errors"]["1"]["errors"][0]["type"],
        "custom_validation_failed"
    );
    let graph = files::load_and_save("users/alice/cat.png", "mine");
    let (code, body) = post_as("alice", &base, "/prompt", &json!({"prompt": graph})).await;
    assert_eq!(code, 200, "{body}");
    gate.shutdown().await;
}

/// Auth off (ComfyUI's open model): a second socket with the same clientId takes it over, and
/// the first is told so in its close frame, never closed or orphaned silently.
#[tokio::test]
async fn with_auth_off_a_taken_client_id_closes_the_owner_with_a_reason() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let sim = sim().await;
    let gate = gate(&[&sim]).await;
    let url = format!("{}/ws?clientId=mine", gate.url().replacen("http", "ws", 1));
    let (mut owner, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let first = owner.next().await.unwrap().unwrap();
    assert!(first.to_text().unwrap().contains("\"sid\":\"mine\""));
    let (_taker, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let close = loop {
        match tokio::time::timeout(PATIENCE, owner.next())
            .await
            .expect("a close frame")
        {
            Some(Ok(Message::Close(frame))) => break frame.expect("a close frame with a code"),
            Some(Ok(_)) => continue,
            other => panic!("closed without a close frame: {other:?}"),
        }
    };
    assert_eq!(u16::from(close.code), comfy_gate::sessions::REPLACED_CODE);
    assert!(close.reason.contains("clientId"), "{}", close.reason);
    gate.shutdown().await;
}

/// What a user cannot get past: an escaped route name (`/hist%6fry` is ComfyUI's `/history`),
/// a HEAD instead of a GET, routes only admins may use, an upload that climbs out of its
/// folder, a loader value that spells another user's folder another way.
#[tokio::test]
async fn no_spelling_gets_a_user_past_the_isolation() {
    let sim = sim().await;
    let gate = gate_with_users(&[&sim]).await;
    let base = gate.url();
    let body = json!({"prompt": blur_graph(1), "prompt_id": "a1"});
    assert_eq!(post_as("alice", &base, "/prompt", &body).await.0, 200);
    history_as("alice", &base, "a1").await;
    // Sent as raw bytes: an HTTP client library would tidy the dots itself.
    for path in ["/hist%6fry", "/api/hist%6Fry", "//history", "/%61pi/jobs"] {
        let (code, body) = raw_get(&base, path, "tok-bob").await;
        assert_eq!(code, 200, "{path}");
        assert!(!body.contains("a1"), "{path} showed Alice's prompt: {body}");
    }
    for dots in ["/../history", "/api/../history", "/api/%2e%2e/history"] {
        assert_eq!(raw_get(&base, dots, "tok-bob").await.0, 400, "{dots}");
    }
    // HEAD is the gate's GET: its size is Bob's empty history, not the backend's.
    let head = http()
        .head(format!("{base}/history"))
        .bearer_auth("tok-bob")
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], "2", "`{{}}`");
    // Escaped control routes are the gate's own, scoped like the plain ones.
    post_as("bob", &base, "/hist%6fry", &json!({"clear": true})).await;
    assert!(get_as("alice", &base, "/history/a1").await.1["a1"].is_object());
    assert_eq!(post_as("bob", &base, "/fre%65", &json!({})).await.0, 403);
    // Routes the gate proxies: reads yes, an admin's routes and others' writes no.
    assert_eq!(get_as("bob", &base, "/internal/logs").await.0, 403);
    assert_eq!(
        post_as("bob", &base, "/some_custom_node/run", &json!({}))
            .await
            .0,
        403
    );
    assert_eq!(
        post_as("bob", &base, "/users", &json!({"username": "x"}))
            .await
            .0,
        403
    );
    assert_eq!(
        post_as("root", &base, "/users", &json!({"username": "x"}))
            .await
            .0,
        200
    );
    for manager in [
        "/api/v2/comfyui_manager/comfyui_switch_version?ver=v0",
        "/api/api/internal/logs",
    ] {
        assert_eq!(get_as("bob", &base, manager).await.0, 403, "{manager}");
    }
    // Uploads cannot climb out of the user's folder.
    let upload = |sub: &str, name: &str| {
        let form = reqwest::multipart::Form::new()
            .part(
                "image",
                reqwest::multipart::Part::bytes(png(8, 8, 1)).file_name(name.to_string()),
            )
            .text("subfolder", sub.to_string())
            .text("overwrite", "true");
        http()
            .post(format!("{base}/upload/image"))
            .bearer_auth("tok-alice")
            .multipart(form)
    };
    for (sub, name) in [
        ("../bob", "x.png"),
        ("", "../bob/x.png"),
        ("a/../..", "x.png"),
    ] {
        let (code, v) = send_for_json(upload(sub, name)).await;
        assert_eq!(code, 400, "{sub} {name}: {v}");
    }
    // Bob's upload cannot be loaded by Alice under another spelling.
    let form = reqwest::multipart::Form::new().part(
        "image",
        reqwest::multipart::Part::bytes(png(8, 8, 2)).file_name("x.png"),
    );
    let bobs = http()
        .post(format!("{base}/upload/image"))
        .bearer_auth("tok-bob")
        .multipart(form);
    assert_eq!(send_for_json(bobs).await.0, 200);
    for spelling in [
        "users//bob/x.png",
        "users/./bob/x.png",
        "users/alice/../bob/x.png",
        "Users/Bob/x.png",
        "../input/users/bob/x.png [output]",
        "users\\bob\\x.png",
    ] {
        let graph = files::load_and_save(spelling, "stolen");
        let (code, v) = post_as("alice", &base, "/prompt", &json!({"prompt": graph})).await;
        assert_eq!(code, 400, "{spelling}: {v}");
    }
    // Nor save into another user's folder.
    let mut plant = blur_graph(3);
    plant["3"]["inputs"]["filename_prefix"] = json!("users/bob/planted");
    let (code, v) = post_as("alice", &base, "/prompt", &json!({"prompt": plant})).await;
    assert_eq!(code, 400, "{v}");
    gate.shutdown().await;
}

/// A browser sends a user's HTTP Basic credentials with any site's requests: another site's
/// page can neither post prompts nor open the user's socket with them. The gate's own pages,
/// and scripts with a bearer token, can.
#[tokio::test]
async fn another_site_cannot_use_a_browsers_basic_credentials() {
    let sim = sim().await;
    let gate = gate_with_users(&[&sim]).await;
    let base = gate.url();
    let host = base.trim_start_matches("http://").to_string();
    let body = json!({"prompt": blur_graph(1)}).to_string();
    let post = |origin: Option<&str>, fetch_site: Option<&str>, basic: bool| {
        let mut req = http()
            .post(format!("{base}/api/prompt"))
            .header("content-type", "text/plain")
            .body(body.clone());
        req = match basic {
            true => req.basic_auth("alice", Some("tok-alice")),
            false => req.bearer_auth("tok-alice"),
        };
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        if let Some(f) = fetch_site {
            req = req.header("sec-fetch-site", f);
        }
        req.send()
    };
    let own = format!("http://{host}");
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(
        status(
            post(Some("https://evil.example"), None, true)
                .await
                .unwrap()
        ),
        403
    );
    assert_eq!(status(post(Some("null"), None, true).await.unwrap()), 403);
    assert_eq!(
        status(post(None, Some("cross-site"), true).await.unwrap()),
        403
    );
    assert_eq!(
        status(post(Some(&own), Some("same-origin"), true).await.unwrap()),
        200
    );
    assert_eq!(
        status(post(None, None, true).await.unwrap()),
        200,
        "a script with Basic"
    );
    let bearer = post(None, Some("cross-site"), false);
    assert_eq!(
        status(bearer.await.unwrap()),
        200,
        "a bearer token is never sent by itself"
    );
    // The socket: cross-site WebSocket hijacking.
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let cred = base64::engine::general_purpose::STANDARD.encode("u:tok-alice");
    let socket = |origin: &str| {
        let mut req = format!("ws://{host}/ws?clientId=c")
            .into_client_request()
            .unwrap();
        let h = req.headers_mut();
        h.insert("authorization", format!("Basic {cred}").parse().unwrap());
        h.insert("origin", origin.parse().unwrap());
        tokio_tungstenite::connect_async(req)
    };
    match socket("https://evil.example").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("expected a 403, got {:?}", other.map(|_| ())),
    }
    assert!(socket(&own).await.is_ok());
    let known = queue_ids(&get_as("alice", &base, "/queue").await.1).len()
        + get_as("alice", &base, "/history")
            .await
            .1
            .as_object()
            .unwrap()
            .len();
    assert_eq!(known, 3, "the three accepted prompts only");
    gate.shutdown().await;
}

/// `GET path` sent as written, with a bearer `token`; the status and the body.
async fn raw_get(base: &str, path: &str, token: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    let code = answer[9..12].parse().unwrap();
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}
