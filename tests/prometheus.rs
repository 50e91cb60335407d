//! The alert and recording rules (`deploy/prometheus/`) as an operator loads them: `promtool`
//! accepts them, their unit tests show each alert firing on a bad series and quiet on a healthy
//! one, the Kubernetes `PrometheusRule` carries exactly the same rules, and every alert of
//! README.md's table is a rule.

mod common;

use common::tools::{promtool, repo, stdout_of};
use serde_json::Value;

fn yaml(relative: &str) -> Value {
    serde_saphyr::from_str(&std::fs::read_to_string(repo(relative)).unwrap()).unwrap()
}

#[test]
fn promtool_accepts_the_rules_and_their_unit_tests_pass() {
    let checked = stdout_of(
        promtool()
            .arg("check")
            .arg("rules")
            .arg(repo("deploy/prometheus/rules.yaml")),
    );
    assert!(checked.contains("SUCCESS: 14 rules found"), "{checked}");
    let tested = stdout_of(promtool().current_dir(repo("deploy/prometheus")).args([
        "test",
        "rules",
        "rules.test.yaml",
    ]));
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn every_alert_has_a_unit_test_that_fires_it_and_one_that_keeps_it_quiet() {
    let rules = yaml("deploy/prometheus/rules.yaml");
    let tests = yaml("deploy/prometheus/rules.test.yaml");
    let mut fired = std::collections::BTreeSet::new();
    let mut quiet = std::collections::BTreeSet::new();
    for test in tests["tests"].as_array().unwrap() {
        for case in test["alert_rule_test"].as_array().unwrap() {
            let name = case["alertname"].as_str().unwrap().to_owned();
            match case.get("exp_alerts").and_then(Value::as_array) {
                Some(alerts) if !alerts.is_empty() => fired.insert(name),
                _ => quiet.insert(name),
            };
        }
    }
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let Some(alert) = rule["alert"].as_str() else {
                continue;
            };
            assert!(fired.contains(alert), "{alert} is never shown firing");
            assert!(quiet.contains(alert), "{alert} is never shown quiet");
            assert!(
                rule["labels"]["severity"].is_string(),
                "{alert}: no severity"
            );
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{alert}: no summary"
            );
            let runbook = rule["annotations"]["runbook_url"].as_str().unwrap_or("");
            assert!(
                runbook.ends_with("#runbook"),
                "{alert}: runbook {runbook:?}"
            );
        }
    }
}

#[test]
fn the_prometheus_rule_manifest_carries_exactly_the_rules_file() {
    let manifest = yaml("deploy/kubernetes/prometheusrule.yaml");
    assert_eq!(manifest["kind"], "PrometheusRule");
    assert_eq!(manifest["spec"], yaml("deploy/prometheus/rules.yaml"));
}

#[test]
fn every_alert_of_the_readme_table_is_a_rule() {
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    let table = readme
        .split("### What to alert on")
        .nth(1)
        .unwrap()
        .split("###")
        .next()
        .unwrap();
    let rules = std::fs::read_to_string(repo("deploy/prometheus/rules.yaml")).unwrap();
    // Each row names the metric its rule is about, in its expression sketch; RabbitMQ's own
    // inbox metric is the one row that is not ours (KEDA scales on it).
    let mut rows = 0;
    for row in table
        .lines()
        .filter(|l| l.starts_with("| ") && l.contains("induction_reconciler_"))
    {
        let metric = row
            .split('`')
            .flat_map(|code| code.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')))
            .find(|word| word.starts_with("induction_reconciler_"))
            .unwrap();
        assert!(
            rules.contains(metric),
            "no rule uses {metric} (README row: {row})"
        );
        rows += 1;
    }
    assert!(rows >= 10, "only {rows} rows");
}
