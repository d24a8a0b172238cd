use super::*;

#[test]
fn the_exposition_is_openmetrics_with_units_and_prefix() {
    let m = Metrics::new(true);
    m.request("prompt", 200);
    m.queue_wait
        .get_or_create(&BackendLabel {
            backend: "a".into(),
        })
        .observe(0.3);
    let text = m.encode();
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(
        text.contains("comfy_gate_http_requests_total{route=\"prompt\",code=\"200\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("# UNIT comfy_gate_queue_wait_seconds seconds"),
        "{text}"
    );
    assert!(
        text.contains("comfy_gate_queue_wait_seconds_bucket{le=\"0.5\",backend=\"a\"} 1")
            || text.contains("comfy_gate_queue_wait_seconds_bucket{backend=\"a\",le=\"0.5\"} 1"),
        "{text}"
    );
    assert!(text.contains("comfy_gate_build_info{version="), "{text}");
    assert!(text.contains("comfy_gate_start_time_seconds "), "{text}");
}

#[test]
fn node_classes_past_the_cap_count_as_other() {
    let m = Metrics::new(true);
    for i in 0..MAX_NODE_CLASSES {
        assert_eq!(
            m.class_label(&format!("Class{i}")).class,
            format!("Class{i}")
        );
    }
    assert_eq!(m.class_label("OneTooMany").class, "other");
    assert_eq!(
        m.class_label("Class7").class,
        "Class7",
        "a known class keeps its series"
    );
    assert_eq!(m.class_label("").class, "other");
    assert_eq!(m.class_label(&"x".repeat(200)).class, "other");
}
