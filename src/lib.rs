//! comfy-gate: a GPU-aware reverse proxy and load balancer in front of many ComfyUI instances.
//!
//! The simulated ComfyUI (comfy-sim) is a crate of its own, linked only by the `demo` command
//! (feature `demo`) and by the tests and benchmarks.

pub mod config;
#[cfg(feature = "demo")]
pub mod demo;
pub mod error;
pub mod gate;
pub mod loadtest;
pub mod telemetry;

/// The wire shapes, file rules and HTTP plumbing shared with comfy-sim live in comfy-wire; they
/// are re-exported so the gate's `crate::protocol::…`, `crate::files::…` and `crate::http::…`
/// paths keep their meaning.
pub use comfy_wire::{files, http, protocol};
