//! The files under `packaging/` agree with the daemon: the alerting rules
//! and the dashboard use only metrics the daemon exports.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every `cancelwatch_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("cancelwatch_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

/// The names under which the daemon exports metrics: the string literals
/// naming them in `src/`.
fn exported_metrics() -> BTreeSet<String> {
    let mut sources = Vec::new();
    let mut dirs = vec![repo("src")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                sources.push(std::fs::read_to_string(path).unwrap());
            }
        }
    }
    let quoted = |s: &String| {
        metric_names(s)
            .into_iter()
            .filter(|n| s.contains(&format!("\"{n}\"")))
            .collect::<Vec<_>>()
    };
    sources.iter().flat_map(quoted).collect()
}

/// A series name as exported: a histogram's `_bucket`, `_sum` and `_count`
/// belong to the histogram.
fn exported_as<'a>(series: &'a str, exported: &BTreeSet<String>) -> Option<&'a str> {
    if exported.contains(series) {
        return Some(series);
    }
    ["_bucket", "_sum", "_count"]
        .iter()
        .filter_map(|suffix| series.strip_suffix(suffix))
        .find(|base| exported.contains(*base))
}

#[test]
fn alerting_rules_and_dashboard_use_only_exported_metrics() {
    let exported = exported_metrics();
    assert!(exported.contains("cancelwatch_ready"), "{exported:?}");
    assert!(exported.contains("cancelwatch_ack_seconds"), "{exported:?}");

    let rules = read("packaging/prometheus/cancelwatch-rules.yml");
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("packaging/grafana/cancelwatch.json")).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            queries.push(target["expr"].as_str().unwrap().to_string());
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(definition) = variable["definition"].as_str() {
            queries.push(definition.to_string());
        }
    }
    assert!(queries.len() >= 10, "{queries:?}");

    for (file, text) in [
        ("the alerting rules", rules),
        ("the dashboard", queries.join("\n")),
    ] {
        let used = metric_names(&text);
        assert!(used.len() >= 8, "{file} names only {used:?}");
        let unknown: Vec<&String> = used
            .iter()
            .filter(|name| exported_as(name, &exported).is_none())
            .collect();
        assert!(
            unknown.is_empty(),
            "{file} use metrics the daemon does not export: {unknown:?}"
        );
    }
}
