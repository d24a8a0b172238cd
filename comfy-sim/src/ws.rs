//! `GET /ws`: sid choice, the first `status`, the reconnect `executing` replay and the
//! `feature_flags` exchange, exactly as ComfyUI's `websocket_handler`.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use http::{Request, Response};
use hyper::body::Incoming;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use super::instance::{Instance, lock};
use comfy_wire::http::{Body, serve_comfy_websocket};

pub fn handle(inst: Arc<Instance>, mut req: Request<Incoming>) -> Response<Body> {
    serve_comfy_websocket(&mut req, move |sid, ws| serve_socket(inst, sid, ws))
}

async fn serve_socket<S>(
    inst: Arc<Instance>,
    sid: String,
    ws: tokio_tungstenite::WebSocketStream<S>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut sink, mut stream) = ws.split();
    let (mut rx, dropped) = inst.hub.register(&sid);
    // Initial state, to this socket only.
    inst.hub.send_json(
        "status",
        json!({ "status": inst.queue_info(), "sid": sid }),
        Some(&sid),
    );
    let replay = {
        let ctx = lock(&inst.exec);
        (ctx.client_id.as_deref() == Some(sid.as_str()))
            .then(|| ctx.last_node_id.clone())
            .flatten()
    };
    if let Some(node) = replay {
        inst.hub
            .send_json("executing", json!({ "node": node }), Some(&sid));
    }
    let mut first_message = true;
    loop {
        tokio::select! {
            _ = inst.stop.cancelled() => break,
            _ = dropped.cancelled() => {
                let _ = sink.close().await;
                break;
            }
            out = rx.recv() => {
                let Some(msg) = out else { break };
                while inst.faults.hang.load(std::sync::atomic::Ordering::SeqCst) {
                    tokio::select! {
                        _ = inst.stop.cancelled() => return,
                        _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
                    }
                }
                if sink.send(msg).await.is_err() {
                    break;
                }
            }
            incoming = stream.next() => {
                match incoming {
                    Some(Ok(Message::Text(text))) => {
                        if let Some(flags) = comfy_wire::protocol::client_feature_flags(&text, first_message) {
                            inst.hub.set_feature_flags(&sid, flags);
                            inst.hub.send_json("feature_flags", inst.features(), Some(&sid));
                        }
                        first_message = false;
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                }
            }
        }
    }
    inst.hub.unregister(&sid);
}
