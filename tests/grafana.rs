//! The Grafana dashboard (`deploy/grafana/induction-reconciler.json`) loads and queries what the
//! worker exports: every panel's query is parsed by `promtool` (as recording rules of a generated
//! rule file, with Grafana's `$__rate_interval` given a value), and names only metrics that
//! `src/telemetry/metrics.rs` registers.

mod common;

use common::tools::{promtool, repo, stdout_of};
use serde_json::Value;

fn dashboard() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(repo("deploy/grafana/induction-reconciler.json")).unwrap(),
    )
    .unwrap()
}

fn queries() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in dashboard()["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap();
        for target in panel["targets"].as_array().unwrap() {
            out.push((
                title.to_owned(),
                target["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    out
}

#[test]
fn every_panel_query_parses_with_promtool() {
    let queries = queries();
    assert!(queries.len() >= 14, "{} queries", queries.len());
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (_, expr)) in queries.iter().enumerate() {
        let expr = expr.replace("$__rate_interval", "5m");
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard-queries.yaml");
    std::fs::write(&file, rules).unwrap();
    let checked = stdout_of(promtool().args(["check", "rules"]).arg(&file));
    assert!(
        checked.contains(&format!("SUCCESS: {} rules found", queries.len())),
        "{checked}"
    );
}

#[test]
fn the_dashboard_shows_what_the_issue_asks_and_only_metrics_the_worker_exports() {
    let source = std::fs::read_to_string(repo("src/telemetry/metrics.rs")).unwrap();
    let all: String = queries().iter().map(|(_, q)| format!("{q}\n")).collect();
    for word in all.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if let Some(name) = word.strip_prefix("induction_reconciler_") {
            let family = name
                .strip_suffix("_total")
                .or_else(|| name.strip_suffix("_bucket"))
                .unwrap_or(name);
            assert!(
                source.contains(&format!("\"{family}\"")),
                "the dashboard queries {word}, which metrics.rs does not register"
            );
        }
    }
    for needed in [
        "messages_consumed_total",
        "outcomes_emitted_total",
        "messages_parked_total",
        "message_processing_seconds_bucket",
        "outbox_backlog",
        "outbox_oldest_age_seconds",
        "open_conflicts",
        "overdue_provisionals",
        "broker_reconnects_total",
        "broker_blocked",
    ] {
        assert!(
            all.contains(&format!("induction_reconciler_{needed}")),
            "no panel shows {needed}"
        );
    }
    assert!(
        all.contains("histogram_quantile(0.99"),
        "no p99 latency panel"
    );
}
