//! `packaging/knoq-gateway.service` is a unit systemd accepts, with the
//! directives the README's "Running as a service" relies on. Checked by
//! Debian's `systemd-analyze verify` (scripts/test installs the `systemd`
//! package), on a copy whose `ExecStart` names the binary just built
//! (verify checks that the program exists), everything else unchanged.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use support::TempDir;

const UNIT: &str = include_str!("../packaging/knoq-gateway.service");
const UNIT_FILE: &str = "knoq-gateway.service";
const EXEC_START: &str = "ExecStart=/usr/local/bin/knoq-gateway ";

/// Lines `systemd-analyze verify` may print that are not about this unit,
/// each with where it was seen: a pattern and why it is not ours.
///
/// None so far. For the unit as it is, verify printed nothing at all
/// (Debian 12, systemd 252, in a container without systemd as PID 1) as
/// root, as `nobody`, with `/run` (so `/run/systemd`) hidden under an
/// empty tmpfs, and in a fresh minimal Debian chroot (debootstrap
/// --variant=minbase, then scripts/test's installs), with and without
/// /proc. So every line it prints fails the test. A line that shows up
/// elsewhere and is demonstrably about another unit or the machine goes
/// here, with that setting; never one that names our unit file or says
/// "Unknown key", "Invalid" or "Failed to parse" (`never_noise` below).
const NOISE: &[(&str, &str)] = &[];

/// What no pattern of `NOISE` may let through.
fn never_noise(line: &str) -> bool {
    line.contains(UNIT_FILE)
        || [
            "Unknown key",
            "Unknown section",
            "Invalid",
            "Failed to parse",
        ]
        .iter()
        .any(|w| line.contains(w))
}

/// The lines of systemd-analyze's output that are complaints.
fn complaints(said: &str) -> Vec<&str> {
    said.lines()
        .filter(|l| !l.trim().is_empty())
        .filter(|l| never_noise(l) || !NOISE.iter().any(|(pattern, _)| l.contains(pattern)))
        .collect()
}

/// The unit's `key=value` lines as (section, key), each with every value
/// it is given, in order.
fn directives() -> HashMap<(String, String), Vec<String>> {
    let mut all: HashMap<(String, String), Vec<String>> = HashMap::new();
    let mut section = String::new();
    for line in UNIT.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        assert!(!line.ends_with('\\'), "no continued lines: {line}");
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (key, value) = line.split_once('=').expect("key=value");
        assert!(!section.is_empty(), "{key} before any section");
        all.entry((section.clone(), key.trim().to_string()))
            .or_default()
            .push(value.trim().to_string());
    }
    all
}

/// Runs `systemd-analyze verify` on a copy of the unit (`edit` applied to
/// its text) and returns whether it succeeded and what it printed.
fn verify(edit: impl Fn(&str) -> String) -> (bool, String) {
    let found = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        found.is_ok_and(|o| o.status.success()),
        "systemd-analyze is not on PATH: run ./scripts/test, which installs Debian's systemd package"
    );
    assert!(
        Path::new("/bin/kill").exists(),
        "/bin/kill (the unit's ExecReload, which verify checks) is missing: \
         run ./scripts/test, which installs Debian's procps package"
    );
    let dir = TempDir::new("unit");
    let unit = dir.0.join(UNIT_FILE);
    let built = env!("CARGO_BIN_EXE_knoq-gateway");
    assert_eq!(UNIT.matches(EXEC_START).count(), 1, "one {EXEC_START}");
    let text = UNIT.replace(EXEC_START, &format!("ExecStart={built} "));
    std::fs::write(&unit, edit(&text)).unwrap();
    let out = Command::new("systemd-analyze")
        // Every warning about the unit itself makes the exit status
        // non-zero (without it verify exits 0 on "Unknown key ...,
        // ignoring"); its dependencies' are left to the output check.
        .args(["verify", "--recursive-errors=no"])
        .arg(&unit)
        // Messages on stderr, at the usual level, whatever the caller's
        // environment says (SYSTEMD_LOG_TARGET=journal would hide them).
        .env("SYSTEMD_LOG_TARGET", "console")
        .env("SYSTEMD_LOG_LEVEL", "info")
        .env("SYSTEMD_LOG_COLOR", "0")
        .env_remove("SYSTEMD_UNIT_PATH")
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[test]
fn systemd_accepts_the_unit_without_a_complaint() {
    let (ok, said) = verify(str::to_string);
    assert!(ok, "systemd-analyze verify failed:\n{said}");
    let complaints = complaints(&said);
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify complains:\n{}",
        complaints.join("\n")
    );
}

#[test]
fn a_misspelt_directive_fails_verification() {
    // The check above would catch a typo: systemd's own verdict on one.
    let (ok, said) = verify(|text| text.replace("\nNoNewPrivileges=", "\nNoNewPrivilegs="));
    assert!(!ok, "verify accepted a misspelt directive:\n{said}");
    let complaints = complaints(&said);
    assert!(
        complaints
            .iter()
            .any(|l| l.contains(UNIT_FILE) && l.contains("Unknown key 'NoNewPrivilegs'")),
        "{said}"
    );
}

#[test]
fn the_unit_runs_hardened_as_its_own_user_with_readiness_and_reload() {
    let d = directives();
    let one = |section: &str, key: &str| -> &str {
        match d
            .get(&(section.to_string(), key.to_string()))
            .map(Vec::as_slice)
        {
            Some([value]) => value,
            other => panic!("[{section}] {key}: {other:?}"),
        }
    };
    let service = |key: &str| one("Service", key);
    assert_eq!(service("Type"), "notify");
    assert_eq!(service("NotifyAccess"), "main");
    assert_eq!(
        service("ExecStart"),
        "/usr/local/bin/knoq-gateway serve --config /etc/knoq-gateway/gateway.toml"
    );
    assert_eq!(service("ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(service("User"), "knoq-gateway");
    assert_eq!(service("Group"), "knoq-gateway");
    assert!(!d.contains_key(&("Service".into(), "DynamicUser".into())));
    assert_eq!(service("StateDirectory"), "knoq-gateway");
    assert_eq!(service("StateDirectoryMode"), "0700");
    assert_eq!(service("ConfigurationDirectory"), "knoq-gateway");
    assert_eq!(service("UMask"), "0077");
    assert_eq!(service("NoNewPrivileges"), "yes");
    assert_eq!(service("ProtectSystem"), "strict");
    assert_eq!(service("ProtectHome"), "yes");
    assert_eq!(service("PrivateTmp"), "yes");
    assert_eq!(service("CapabilityBoundingSet"), "");
    let families: Vec<&str> = service("RestrictAddressFamilies")
        .split_whitespace()
        .collect();
    // AF_UNIX for the notify socket.
    assert_eq!(families, ["AF_INET", "AF_INET6", "AF_UNIX"]);
    assert_eq!(service("Restart"), "on-failure");
    // Exit 64, a bad config, is not restarted.
    assert_eq!(service("RestartPreventExitStatus"), "64");
    // Longer than the default drain (server.shutdown_grace = 30s).
    let stop: u64 = service("TimeoutStopSec")
        .trim_end_matches('s')
        .parse()
        .unwrap();
    assert!(stop > 30, "TimeoutStopSec={stop}");
    // Room for server.max_connections' 4096 clients and more.
    let files: u64 = service("LimitNOFILE").parse().unwrap();
    assert!(files > 4096, "LimitNOFILE={files}");
    assert_eq!(one("Install", "WantedBy"), "multi-user.target");
}
