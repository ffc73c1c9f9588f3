//! The files under `packaging/` agree with each other and with the daemon:
//! the unit runs the configuration the package installs, with its database
//! in the unit's state directory; the alerting rules and the dashboard use
//! only metrics the daemon exports. (packaging/check.sh builds, installs and
//! checks the package itself.)

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use cancelwatch::Config;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The values of `key=` in the unit file, in order.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .map(str::to_string)
        .collect()
}

/// The one value of `key=` in the unit file.
fn unit_value(unit: &str, key: &str) -> String {
    let values = unit_values(unit, key);
    assert_eq!(values.len(), 1, "{key} in cancelwatch.service: {values:?}");
    values[0].clone()
}

/// Where the package installs `source`, from `[package.metadata.deb]`.
fn installed_as(source: &str) -> String {
    let manifest: toml::Value = toml::from_str(&read("Cargo.toml")).unwrap();
    let assets = manifest["package"]["metadata"]["deb"]["assets"]
        .as_array()
        .unwrap();
    let asset = assets
        .iter()
        .find(|a| a[0].as_str() == Some(source))
        .unwrap_or_else(|| panic!("{source} is not among the package's assets"));
    format!("/{}", asset[1].as_str().unwrap())
}

#[test]
fn the_unit_runs_the_packaged_configuration_in_its_state_directory() {
    let unit = read("packaging/cancelwatch.service");
    let config_path = installed_as("packaging/cancelwatch.toml");
    assert_eq!(config_path, "/etc/cancelwatch/cancelwatch.toml");
    assert_eq!(
        unit_value(&unit, "ExecStart"),
        format!("/usr/bin/cancelwatch --config {config_path} serve")
    );
    assert_eq!(installed_as("target/release/cancelwatch"), "/usr/bin/");

    // The configuration is valid, its database in the state directory.
    let config = Config::load(Some(&repo("packaging/cancelwatch.toml"))).unwrap();
    config.validate().unwrap();
    let state = Path::new("/var/lib").join(unit_value(&unit, "StateDirectory"));
    assert_eq!(
        config.database_path().unwrap().parent(),
        Some(state.as_path())
    );
    assert_eq!(Path::new(&unit_value(&unit, "WorkingDirectory")), state);
    assert!(config.listen_addr().unwrap().ip().is_loopback());

    // The user the unit runs as is the one the package creates.
    let user = unit_value(&unit, "User");
    let sysusers = read("packaging/cancelwatch.sysusers");
    assert!(
        sysusers
            .lines()
            .any(|l| l.split_whitespace().take(2).eq(["u", user.as_str()])),
        "packaging/cancelwatch.sysusers does not create {user}"
    );

    // systemd waits for the daemon's own graceful shutdown before SIGKILL.
    let stop: u64 = unit_value(&unit, "TimeoutStopSec").parse().unwrap();
    assert!(stop > config.server.shutdown_grace_secs + 10);
    assert!(
        unit_value(&unit, "LimitNOFILE").parse::<usize>().unwrap()
            > 2 * config.server.max_connections
    );
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
