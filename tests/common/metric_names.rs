//! The gate's metric names and types, one list for the tests that hold the alert rules and
//! the Grafana dashboard to them (`tests/prometheus_rules.rs`) and the test that holds the
//! gate's real `/metrics` to it (`tests/observability.rs`).

/// Every series the gate exports at `/metrics` (issue 15), as `(name, type)`: counters with
/// their `_total`, histograms by their base name (scraped as `_bucket`, `_sum`, `_count`).
/// Kept as one list so that it can be checked against a real scrape.
pub const METRICS: &[(&str, &str)] = &[
    ("comfy_gate_http_requests_total", "counter"),
    ("comfy_gate_prompts_submitted_total", "counter"),
    ("comfy_gate_prompts_finished_total", "counter"),
    ("comfy_gate_prompts_retried_total", "counter"),
    ("comfy_gate_prompts_evacuated_total", "counter"),
    ("comfy_gate_nodes_cached_total", "counter"),
    ("comfy_gate_checkpoint_loads_total", "counter"),
    ("comfy_gate_placement_decisions_total", "counter"),
    ("comfy_gate_upstream_reconnects_total", "counter"),
    ("comfy_gate_rate_limited_total", "counter"),
    ("comfy_gate_connections_accepted_total", "counter"),
    ("comfy_gate_queue_wait_seconds", "histogram"),
    ("comfy_gate_run_seconds", "histogram"),
    ("comfy_gate_end_to_end_seconds", "histogram"),
    ("comfy_gate_node_execution_seconds", "histogram"),
    ("comfy_gate_checkpoint_load_seconds", "histogram"),
    ("comfy_gate_queue_depth", "gauge"),
    ("comfy_gate_queue_oldest_wait_seconds", "gauge"),
    ("comfy_gate_backend_up", "gauge"),
    ("comfy_gate_backend_draining", "gauge"),
    ("comfy_gate_backend_slots_in_use", "gauge"),
    ("comfy_gate_backend_slots", "gauge"),
    ("comfy_gate_gpu_memory_total_bytes", "gauge"),
    ("comfy_gate_gpu_memory_free_bytes", "gauge"),
    ("comfy_gate_gpu_utilization_ratio", "gauge"),
    ("comfy_gate_gpu_memory_utilization_ratio", "gauge"),
    ("comfy_gate_gpu_temperature_celsius", "gauge"),
    ("comfy_gate_gpu_power_watts", "gauge"),
    ("comfy_gate_websocket_clients", "gauge"),
    ("comfy_gate_connections_open", "gauge"),
    ("comfy_gate_build_info", "gauge"),
    ("comfy_gate_start_time_seconds", "gauge"),
];
