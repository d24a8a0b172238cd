//! comfy-wire: what comfy-gate and comfy-sim both speak.
//!
//! The gate must look like one ComfyUI to its clients and the sim must look like ComfyUI to the
//! gate, so both build the same wire shapes (error bodies, WebSocket events and frames, job
//! listings, history pages), apply the same file rules (`input/`, `output/`, `temp/`, `/view`,
//! `/upload/image|mask`) and serve through the same small HTTP layer. Keeping that code here, in
//! a crate that depends on neither, lets the gate ship without the simulator and the simulator
//! run without the gate.
//!
//! The price of sharing is that a bug here is invisible to gate-vs-sim tests; the shapes are
//! also checked against what a real ComfyUI sends.

pub mod body_timeout;
pub mod conn;
pub mod files;
pub mod http;
pub mod protocol;
pub mod proxy_protocol;
pub mod serve;
pub mod tls;
