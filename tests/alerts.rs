//! The alert rules under deploy/ against synthetic series: each alert
//! fires when it should and stays quiet when it should not
//! (tests/alerts/alerts.test.yml, run with `promtool test rules`; promtool
//! comes with Debian's `prometheus` package, which scripts/ci-deps.sh
//! installs). The compose rules and the Kubernetes PrometheusRule are the
//! same groups (checked in tests/http_api.rs), so this covers both.

use std::path::Path;
use std::process::Command;

#[test]
fn every_alert_fires_and_stays_quiet_as_its_unit_tests_say() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/alerts");
    let output = Command::new("promtool")
        .args(["test", "rules", "alerts.test.yml"])
        .current_dir(&dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): run scripts/ci-deps.sh, which installs Debian's prometheus package")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{text}");
    assert!(text.contains("SUCCESS"), "{text}");
}

/// Every alert of the rules file has at least one test that expects it to
/// fire and one that expects it quiet.
#[test]
fn every_alert_has_a_firing_and_a_quiet_case() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let rules: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(root.join("deploy/compose/alerts.yml")).unwrap(),
    )
    .unwrap();
    let tests: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(root.join("tests/alerts/alerts.test.yml")).unwrap(),
    )
    .unwrap();
    let cases: Vec<(String, bool)> = tests["tests"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|t| t["alert_rule_test"].as_sequence().unwrap().iter())
        .map(|c| {
            let name = c["alertname"].as_str().unwrap().to_string();
            let fires = !c["exp_alerts"].as_sequence().unwrap().is_empty();
            (name, fires)
        })
        .collect();
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().unwrap();
            for fires in [true, false] {
                assert!(
                    cases.contains(&(name.to_string(), fires)),
                    "{name}: no case where it {}",
                    if fires { "fires" } else { "stays quiet" }
                );
            }
        }
    }
}
