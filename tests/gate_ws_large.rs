//! Messages from backends larger than anything a client may send (issue 11, input 3), through the
//! gate over two sims: a 50 MB `executed` message (a text shown by `PreviewAny`) and a 20 MB
//! binary frame (a noise image sent by `SaveImageWebsocket`) reach the client byte for byte, and
//! at 5 MB too; the events the backends send around them are not lost. The 4 MiB limit on what
//! a server receives (aiohttp's default, which ComfyUI keeps) protects the gate from its
//! clients; its own backends are trusted to send what ComfyUI sends.

mod common;

use comfy_wire::files::images::Image;
use comfy_wire::protocol::frames;
use common::*;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// `len` bytes of varied ASCII, different for each `seed`.
fn text_of(len: usize, seed: u64) -> String {
    let mut out = String::with_capacity(len + 32);
    let mut line = 0u64;
    while out.len() < len {
        out.push_str(&format!("seed {seed} line {line:09} ~ "));
        line += 1;
    }
    out.truncate(len);
    out
}

fn kinds(frames: &[Frame], kind: &str) -> usize {
    frames.iter().filter(|f| f.kind() == kind).count()
}

/// Other clients' prompts, sampling `STEPS` steps each, submitted while the large one runs:
/// with two backends of two slots each, at least one of them shares its backend.
const BYSTANDERS: u64 = 3;
const STEPS: u64 = 4;

async fn start_bystanders(base: &str) -> Vec<Ws> {
    let mut sockets = Vec::new();
    for n in 0..BYSTANDERS {
        let sid = format!("bystander{n}");
        let mut ws = Ws::connect(base, Some(&sid)).await;
        ws.next().await;
        let body = json!({"prompt": steps(100 + n, STEPS), "client_id": sid, "prompt_id": sid});
        assert_eq!(post_json(base, "/prompt", &body).await.0, 200);
        sockets.push(ws);
    }
    sockets
}

/// Every bystander hears its whole run: every step, its image, its success and its end.
async fn bystanders_hear_everything(sockets: Vec<Ws>) {
    for (n, mut ws) in sockets.into_iter().enumerate() {
        let frames = ws.until_done(&format!("bystander{n}")).await;
        assert_eq!(kinds(&frames, "progress"), STEPS as usize, "bystander{n}");
        assert_eq!(kinds(&frames, "executed"), 1, "bystander{n}: its SaveImage");
        assert_eq!(kinds(&frames, "execution_success"), 1, "bystander{n}");
    }
}

/// A prompt whose `PreviewAny` shows a `len`-byte text, beside a sampler chain, run for a
/// client while other clients' prompts run.
async fn executed_message_of(len: usize) {
    let (a, b) = (sim().await, sim().await);
    let gate = gate(&[&a, &b]).await;
    let base = gate.url();
    let mut ws = Ws::connect(&base, Some("reader")).await;
    ws.next().await;
    let text = text_of(len, len as u64);
    let mut g = steps(7, STEPS);
    g["1"] = json!({"class_type": "PreviewAny", "inputs": {"source": text}});
    let body = json!({"prompt": g, "client_id": "reader", "prompt_id": "big"});
    // A body of up to 50 MB is parsed, stored and forwarded before the answer: on a loaded
    // 2-core machine in a debug build that can outlast the usual patience.
    let patient = reqwest::Client::builder()
        .timeout(6 * PATIENCE)
        .build()
        .expect("client");
    let (status, answer) = send_for_json(patient.post(format!("{base}/prompt")).json(&body)).await;
    assert_eq!(status, 200, "{answer}");
    let bystanders = start_bystanders(&base).await;

    let frames = ws.until_done("big").await;
    let shown = frames
        .iter()
        .find(|f| f.kind() == "executed" && f.data()["node"] == "1")
        .unwrap_or_else(|| {
            let seen: Vec<String> = frames.iter().map(Frame::kind).collect();
            panic!("PreviewAny's executed never reached the client; it got {seen:?}")
        });
    let got = shown.data()["output"]["text"][0].as_str().expect("a text");
    assert_eq!(got.len(), text.len());
    assert_eq!(sha256(got.as_bytes()), sha256(text.as_bytes()));
    assert_eq!(kinds(&frames, "progress"), STEPS as usize);
    assert_eq!(
        kinds(&frames, "executed"),
        2,
        "PreviewAny's and SaveImage's"
    );
    assert_eq!(kinds(&frames, "execution_success"), 1);
    bystanders_hear_everything(bystanders).await;

    let entry = wait_history(&base, "big").await;
    let kept = entry["outputs"]["1"]["text"][0].as_str().expect("kept");
    assert_eq!(sha256(kept.as_bytes()), sha256(text.as_bytes()));
}

#[tokio::test]
async fn a_5_mb_executed_message_reaches_the_client_intact() {
    executed_message_of(5_000_000).await;
}

#[tokio::test]
async fn a_50_mb_executed_message_reaches_the_client_intact() {
    executed_message_of(50_000_000).await;
}

/// A `side`×`side` noise image sent by `SaveImageWebsocket`, to a client that negotiated
/// preview metadata (type 4) and to one that did not (type 1), each with its own prompt; the
/// frame is the sim's PNG of that image, byte for byte. Returns the frame size.
async fn saved_image_frame_of(side: u32) -> usize {
    let (a, b) = (sim().await, sim().await);
    let gate = gate(&[&a, &b]).await;
    let base = gate.url();
    let mut modern = Ws::connect(&base, Some("modern")).await;
    modern.next().await;
    modern
        .send_json(json!({"type": "feature_flags", "data": {"supports_preview_metadata": true}}))
        .await;
    modern.until_kind("feature_flags").await;
    let mut legacy = Ws::connect(&base, Some("legacy")).await;
    legacy.next().await;

    let graph = |seed: u64| {
        let mut g = steps(seed, STEPS);
        g["i1"] = json!({"class_type": "EmptyImage", "inputs": {"width": side, "height": side, "batch_size": 1, "color": 0x808080}});
        g["i2"] = json!({"class_type": "ImageAddNoise", "inputs": {"image": ["i1", 0], "seed": seed, "strength": 1.0}});
        g["i3"] = json!({"class_type": "SaveImageWebsocket", "inputs": {"images": ["i2", 0]}});
        g
    };
    let expected = |seed: u64| {
        Image::solid(side, side, 0x808080)
            .add_noise(seed, 1.0)
            .to_png(&[], true)
    };
    for (sid, seed) in [("modern", 1), ("legacy", 2)] {
        let body = json!({"prompt": graph(seed), "client_id": sid, "prompt_id": sid});
        assert_eq!(post_json(&base, "/prompt", &body).await.0, 200);
    }
    let bystanders = start_bystanders(&base).await;

    let frames = modern.until_done("modern").await;
    let images: Vec<&Vec<u8>> = frames
        .iter()
        .filter_map(|f| match f {
            Frame::Binary(b) => Some(b),
            _ => None,
        })
        .collect();
    assert_eq!(images.len(), 1, "one frame for one image");
    let (meta, image) = frames::decode_preview_with_metadata(images[0]).expect("type 4");
    assert_eq!(meta["prompt_id"], "modern");
    assert_eq!(meta["node_id"], "i3");
    assert_eq!(meta["image_type"], "image/png");
    let want = expected(1);
    assert_eq!(image.len(), want.len());
    assert_eq!(sha256(image), sha256(&want));
    assert_eq!(kinds(&frames, "execution_success"), 1);
    assert_eq!(
        kinds(&frames, "progress"),
        STEPS as usize + 1,
        "the sampler's and the save's"
    );

    let frames = legacy.until_done("legacy").await;
    let images: Vec<&Vec<u8>> = frames
        .iter()
        .filter_map(|f| match f {
            Frame::Binary(b) => Some(b),
            _ => None,
        })
        .collect();
    assert_eq!(images.len(), 1);
    let frame = images[0];
    assert_eq!(frames::frame_type(frame), Some(frames::PREVIEW_IMAGE));
    assert_eq!(&frame[4..8], &frames::FORMAT_PNG.to_be_bytes());
    let want = expected(2);
    assert_eq!(frame.len() - 8, want.len());
    assert_eq!(sha256(&frame[8..]), sha256(&want));
    assert_eq!(kinds(&frames, "execution_success"), 1);
    bystanders_hear_everything(bystanders).await;

    // SaveImageWebsocket returns `{}`: nothing of it in the history's outputs.
    let entry = wait_history(&base, "legacy").await;
    assert_eq!(entry["outputs"].get("i3"), None::<&Value>);
    assert!(
        entry["outputs"].get("9").is_some(),
        "the SaveImage beside it"
    );
    want.len()
}

/// ComfyUI's own `websockets_api_example_ws_images` case: 1400×1400 (about 5.9 MB).
#[tokio::test]
async fn a_6_mb_saved_image_frame_reaches_the_client_intact() {
    let size = saved_image_frame_of(1400).await;
    assert!(size > 5_800_000, "{size} bytes");
}

#[tokio::test]
async fn a_20_mb_saved_image_frame_reaches_the_client_intact() {
    let size = saved_image_frame_of(2700).await;
    assert!(size > 20 << 20, "{size} bytes");
}
