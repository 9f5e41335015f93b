//! `packaging/knoq-gateway.service` is a unit systemd accepts, with the
//! directives the README's "Running as a service" relies on. Checked by
//! Debian's `systemd-analyze verify` (scripts/test installs the `systemd`
//! package), on a copy whose `ExecStart` names the binary just built
//! (verify checks that the program exists).

mod support;

use std::collections::HashMap;
use std::process::Command;

use support::TempDir;

const UNIT: &str = include_str!("../packaging/knoq-gateway.service");

/// The unit's `key=value` lines, each key with every value it is given.
fn directives() -> HashMap<String, Vec<String>> {
    let mut all: HashMap<String, Vec<String>> = HashMap::new();
    for line in UNIT.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with('[') || line.is_empty() {
            continue;
        }
        let (key, value) = line.split_once('=').expect("key=value");
        all.entry(key.to_string())
            .or_default()
            .push(value.to_string());
    }
    all
}

#[test]
fn systemd_accepts_the_unit_without_a_complaint() {
    let found = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "systemd-analyze is not installed: run ./scripts/test, which installs Debian's systemd package"
    );
    let dir = TempDir::new("unit");
    let unit = dir.0.join("knoq-gateway.service");
    let built = env!("CARGO_BIN_EXE_knoq-gateway");
    assert!(UNIT.contains("ExecStart=/usr/local/bin/knoq-gateway "));
    std::fs::write(
        &unit,
        UNIT.replace(
            "ExecStart=/usr/local/bin/knoq-gateway ",
            &format!("ExecStart={built} "),
        ),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed: {said}"
    );
    // verify exits 0 on an unknown or misspelt directive ("Unknown key
    // ..., ignoring"), so what it prints about our unit is a failure too.
    // Lines about other units (a container's missing /run/systemd) are
    // not ours to fix.
    let ours: Vec<&str> = said
        .lines()
        .filter(|l| {
            l.contains("knoq-gateway")
                || ["Unknown", "Invalid", "Failed to parse", "ignoring"]
                    .iter()
                    .any(|w| l.contains(w))
        })
        .collect();
    assert!(ours.is_empty(), "systemd-analyze complains: {ours:#?}");
}

#[test]
fn the_unit_runs_hardened_as_its_own_user_with_readiness_and_reload() {
    let d = directives();
    let one = |key: &str| -> &str {
        match d.get(key).map(Vec::as_slice) {
            Some([value]) => value,
            other => panic!("{key}: {other:?}"),
        }
    };
    assert_eq!(one("Type"), "notify");
    assert_eq!(one("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(one("User"), "knoq-gateway");
    assert_eq!(one("StateDirectory"), "knoq-gateway");
    assert_eq!(one("StateDirectoryMode"), "0700");
    assert_eq!(one("ConfigurationDirectory"), "knoq-gateway");
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("ProtectHome"), "yes");
    assert_eq!(one("PrivateTmp"), "yes");
    assert_eq!(one("CapabilityBoundingSet"), "");
    assert_eq!(one("RestartPreventExitStatus"), "64");
    let families: Vec<&str> = one("RestrictAddressFamilies").split(' ').collect();
    assert_eq!(families, ["AF_INET", "AF_INET6", "AF_UNIX"]);
    assert!(one("ExecStart").ends_with("serve --config /etc/knoq-gateway/gateway.toml"));
    // Longer than the default drain (server.shutdown_grace = 30s).
    let stop: u64 = one("TimeoutStopSec").trim_end_matches('s').parse().unwrap();
    assert!(stop > 30, "{stop}");
}
