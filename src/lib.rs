//! comfy-gate: a GPU-aware reverse proxy and load balancer in front of many ComfyUI instances,
//! and comfy-sim, a simulated ComfyUI backend for tests, benchmarks and the demo.

pub mod config;
pub mod demo;
pub mod error;
pub mod files;
pub mod gate;
pub mod http;
pub mod loadtest;
pub mod protocol;
pub mod sched;
pub mod sim;
pub mod telemetry;
