//! Issue 15, operations: what `deploy/` ships for monitoring the gate holds together.
//! `deploy/prometheus/prometheus.yml` and the alert rules pass `promtool check`, the rules'
//! unit tests (`deploy/prometheus/tests/`) pass `promtool test rules`, every alert has a test
//! case that fires it and one where it must not fire, and each of those cases fails when its
//! alert is broken (the alert made to never fire, or to fire at once). Rules and dashboard name
//! only metrics the gate exports (`METRICS`), every dashboard panel queries one, and the
//! dashboard's queries parse as PromQL.
//!
//! promtool comes from Debian's `prometheus` package, which `.ci/run` installs; outside CI a
//! machine without it skips the promtool checks.

#[path = "common/metric_names.rs"]
mod metric_names;
#[path = "common/tools.rs"]
mod tools;

use std::path::{Path, PathBuf};
use std::process::Command;

use metric_names::METRICS;

const CONFIG: &str = "deploy/prometheus/prometheus.yml";
const RULES: &str = "deploy/prometheus/rules/comfy-gate.rules.yml";
const RULE_TESTS: &str = "deploy/prometheus/tests/comfy-gate.test.yml";
const DASHBOARD: &str = "deploy/grafana/comfy-gate.json";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `promtool` on PATH, or `None` outside CI when it is missing (in CI, where `.ci/run`
/// installs it, a missing one fails the test).
fn promtool() -> Option<&'static str> {
    let install = "install Debian's `prometheus` package (promtool)";
    tools::find_tool(&[("promtool", &["--version"])], install)
}

/// Runs promtool with `args` in the repository root: whether it succeeded, and all it said.
fn run(promtool: &str, args: &[&Path]) -> (bool, String) {
    let out = Command::new(promtool)
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

/// The names in `text` that contain `comfy_gate_`: series, and recording rules' names
/// (`level:comfy_gate_…:operations`, with colons).
fn gate_names(text: &str) -> Vec<String> {
    let re = regex::Regex::new(r"[a-zA-Z_:][a-zA-Z0-9_:]*").unwrap();
    re.find_iter(text)
        .map(|m| m.as_str().to_owned())
        .filter(|name| name.contains("comfy_gate_"))
        .collect()
}

/// Whether `series` is one the gate exports: a name in `METRICS`, or a histogram's
/// `_bucket`, `_sum` or `_count`.
fn exported(series: &str) -> bool {
    METRICS.iter().any(|&(name, kind)| {
        series == name
            || (kind == "histogram"
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| series.strip_suffix(s) == Some(name)))
    })
}

/// One alert of the rules file, as read line by line (the file keeps `alert:`, `expr:` (one
/// line or an indented `|` block), `for:`, `labels:`, `annotations:` in that order).
#[derive(Debug)]
struct Alert {
    name: String,
    /// Line indexes of the whole `expr:` entry, its block included.
    expr_lines: std::ops::Range<usize>,
    /// Line index of `for:`.
    for_line: usize,
    expr: String,
    /// The rest of the rule, `for:` to the next rule or group.
    rest: String,
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

fn alerts(rules: &str) -> Vec<Alert> {
    let lines: Vec<&str> = rules.lines().collect();
    let mut alerts = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = line.trim_start().strip_prefix("- alert: ") else {
            continue;
        };
        let key = indent(line) + 2;
        // The rule's lines: up to the next line at or left of its `- ` dash, comments aside.
        let end = (i + 1..lines.len())
            .find(|&j| {
                let l = lines[j];
                !l.trim().is_empty() && !l.trim_start().starts_with('#') && indent(l) < key
            })
            .unwrap_or(lines.len());
        let at = |k: &str| {
            (i + 1..end)
                .find(|&j| indent(lines[j]) == key && lines[j].trim_start().starts_with(k))
                .unwrap_or_else(|| panic!("alert {name}: no `{k}` at its indentation"))
        };
        let (e, f) = (at("expr:"), at("for:"));
        assert!(e < f, "alert {name}: `expr:` comes before `for:`");
        let expr_lines = e..(e + 1..end).find(|&j| indent(lines[j]) <= key).unwrap();
        assert_eq!(expr_lines.end, f, "alert {name}: `for:` follows `expr:`");
        let expr = lines[expr_lines.clone()]
            .join("\n")
            .trim_start()
            .trim_start_matches("expr:")
            .trim()
            .trim_start_matches('|')
            .to_owned();
        alerts.push(Alert {
            name: name.trim().to_owned(),
            expr_lines,
            for_line: f,
            expr,
            rest: lines[f..end].join("\n"),
        });
    }
    alerts
}

/// The alert test cases of a promtool test file, as `(alertname, fires)`: `fires` when its
/// `exp_alerts:` lists alerts, not when it is `exp_alerts: []`.
fn alert_cases(tests: &str) -> Vec<(String, bool)> {
    let lines: Vec<&str> = tests
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let mut cases = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = line.strip_prefix("alertname:") else {
            continue;
        };
        let fires = match lines.get(i + 1).copied() {
            Some("exp_alerts: []") => false,
            Some("exp_alerts:") => {
                assert!(
                    lines
                        .get(i + 2)
                        .is_some_and(|l| l.starts_with("- exp_labels:")),
                    "{name}: an alert expected with exp_labels"
                );
                true
            }
            other => panic!("{name}: `exp_alerts:` must follow `alertname:`, not {other:?}"),
        };
        cases.push((name.trim().to_owned(), fires));
    }
    cases
}

#[test]
fn the_prometheus_config_passes_promtool_check_config() {
    let Some(promtool) = promtool() else {
        return;
    };
    let (ok, said) = run(
        promtool,
        &["check".as_ref(), "config".as_ref(), CONFIG.as_ref()],
    );
    assert!(ok, "promtool check config {CONFIG}:\n{said}");
    // The config names the rules file, which check config checks too.
    assert!(said.contains("1 rule files found"), "{said}");
    assert!(read(CONFIG).contains("rules/comfy-gate.rules.yml"));
    // The default admin listener, as src/config/server.rs has it.
    assert!(read(CONFIG).contains(r#"targets: ["127.0.0.1:8189"]"#));
}

#[test]
fn the_rules_pass_promtool_check_rules() {
    let Some(promtool) = promtool() else {
        return;
    };
    let (ok, said) = run(
        promtool,
        &["check".as_ref(), "rules".as_ref(), RULES.as_ref()],
    );
    assert!(ok, "promtool check rules {RULES}:\n{said}");
    assert!(said.contains("SUCCESS"), "{said}");
}

#[test]
fn the_rules_unit_tests_pass() {
    let Some(promtool) = promtool() else {
        return;
    };
    let (ok, said) = run(
        promtool,
        &["test".as_ref(), "rules".as_ref(), RULE_TESTS.as_ref()],
    );
    assert!(ok, "promtool test rules {RULE_TESTS}:\n{said}");
    assert!(said.contains("SUCCESS"), "{said}");
}

#[test]
fn every_alert_is_documented_and_tested_firing_and_quiet() {
    let alerts = alerts(&read(RULES));
    assert!(alerts.len() >= 10, "{alerts:#?}");
    let cases = alert_cases(&read(RULE_TESTS));
    let monitoring = read("docs/monitoring.md");
    for alert in &alerts {
        let name = &alert.name;
        assert!(!alert.expr.is_empty(), "{name}: no expr");
        assert!(
            cases.iter().any(|(n, fires)| n == name && *fires),
            "{name}: no test case where it fires"
        );
        assert!(
            cases.iter().any(|(n, fires)| n == name && !*fires),
            "{name}: no test case where it must not fire (exp_alerts: [])"
        );
        for key in ["severity:", "summary:", "description:"] {
            assert!(alert.rest.contains(key), "{name}: no {key}");
        }
        assert!(
            monitoring.contains(&format!("`{name}`")),
            "{name}: not in docs/monitoring.md"
        );
    }
    for (name, _) in &cases {
        assert!(
            alerts.iter().any(|a| &a.name == name),
            "the tests name {name}, which the rules do not have"
        );
    }
}

#[test]
fn the_rules_name_only_exported_metrics() {
    let rules = read(RULES);
    let lines = || rules.lines().filter(|l| !l.trim_start().starts_with('#'));
    let recorded: Vec<&str> = lines()
        .filter_map(|l| l.trim_start().strip_prefix("- record: "))
        .map(str::trim)
        .collect();
    assert!(recorded.len() >= 2, "{recorded:?}");
    let named: Vec<String> = lines().flat_map(gate_names).collect();
    assert!(named.len() > recorded.len());
    for name in named {
        assert!(
            exported(&name) || recorded.contains(&name.as_str()),
            "{RULES} names {name}, neither in METRICS nor recorded there"
        );
    }
}

/// Breaks each alert in two ways and runs the unit tests on the broken copy: made to never
/// fire, some case expecting it must fail; made to fire at once (`vector(1)`, `for: 0m`), some
/// case expecting `exp_alerts: []` must fail. A case that passes either way tests nothing.
#[test]
fn every_alert_test_fails_when_its_alert_is_broken() {
    let Some(promtool) = promtool() else {
        return;
    };
    let rules = read(RULES);
    let lines: Vec<&str> = rules.lines().collect();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("rules")).unwrap();
    std::fs::create_dir_all(dir.path().join("tests")).unwrap();
    let tests = dir.path().join("tests/comfy-gate.test.yml");
    std::fs::write(&tests, read(RULE_TESTS)).unwrap();
    let mutated_rules = dir.path().join("rules/comfy-gate.rules.yml");

    for alert in alerts(&rules) {
        let key = " ".repeat(indent(lines[alert.for_line]));
        for (expr, for_, expected) in [
            ("vector(1) < 0", None, "expected"),
            ("vector(1)", Some("0m"), "[]"),
        ] {
            let mut broken: Vec<String> = Vec::new();
            for (i, line) in lines.iter().enumerate() {
                match for_ {
                    _ if i == alert.expr_lines.start => broken.push(format!("{key}expr: {expr}")),
                    _ if alert.expr_lines.contains(&i) => {}
                    Some(for_) if i == alert.for_line => broken.push(format!("{key}for: {for_}")),
                    _ => broken.push(line.to_string()),
                }
            }
            std::fs::write(&mutated_rules, broken.join("\n")).unwrap();
            let (ok, said) = run(promtool, &["test".as_ref(), "rules".as_ref(), &tests]);
            let name = &alert.name;
            assert!(
                !ok,
                "{name} as `{expr}`: the unit tests still pass:\n{said}"
            );
            // promtool reports each failed case as `alertname: NAME, time: T,` then `exp:[…]`.
            let failed: Vec<&str> = said
                .split("alertname: ")
                .skip(1)
                .filter(|case| case.starts_with(&format!("{name},")))
                .collect();
            let quiet = |case: &&str| case.contains("exp:[],");
            let hit = if expected == "[]" {
                failed.iter().any(quiet)
            } else {
                failed.iter().any(|c| !quiet(c))
            };
            assert!(
                hit,
                "{name} as `{expr}`: no case expecting {expected} for it failed:\n{said}"
            );
        }
    }
}

fn panels(dashboard: &serde_json::Value) -> Vec<&serde_json::Value> {
    let mut all = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        all.push(panel);
        if let Some(inner) = panel["panels"].as_array() {
            all.extend(inner);
        }
    }
    all
}

/// Grafana's variables as a PromQL parser would see them after Grafana substituted them.
fn substituted(expr: &str) -> String {
    expr.replace("$__rate_interval", "5m")
        .replace("$instance", ".*")
        .replace("$backend", ".*")
}

#[test]
fn the_dashboard_parses_and_every_panel_queries_a_gate_metric() {
    let text = read(DASHBOARD);
    let dashboard: serde_json::Value = serde_json::from_str(&text).expect(DASHBOARD);
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    let vars = dashboard["templating"]["list"].as_array().unwrap();
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no ${name} variable"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    assert_eq!(var("backend")["type"], "query");
    assert!(
        var("backend")["definition"]
            .as_str()
            .unwrap()
            .starts_with("label_values(comfy_gate_")
    );

    let mut ids = std::collections::HashSet::new();
    let mut exprs = Vec::new();
    let panels = panels(&dashboard);
    for panel in &panels {
        let title = panel["title"].as_str().unwrap();
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "{title}: id reused"
        );
        assert!(panel["gridPos"]["w"].as_u64().unwrap() <= 24, "{title}");
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().unwrap();
        let mut queries_gate = false;
        for target in targets {
            let expr = target["expr"].as_str().unwrap();
            // Plain series only: the dashboard must not need the rules loaded.
            for series in gate_names(expr) {
                assert!(exported(&series), "{title}: {series} is not in METRICS");
                queries_gate = true;
            }
            exprs.push(substituted(expr));
        }
        assert!(
            queries_gate,
            "{title}: no target queries a comfy_gate_ metric"
        );
    }
    assert!(panels.len() >= 20, "{} panels", panels.len());

    // Every query parses as PromQL: promtool checks them as recording rules.
    let Some(promtool) = promtool() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard.rules.yml");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(expr).unwrap()
        ));
    }
    std::fs::write(&file, &rules).unwrap();
    let (ok, said) = run(promtool, &["check".as_ref(), "rules".as_ref(), &file]);
    assert!(ok, "the dashboard's queries:\n{said}\n{rules}");
}
