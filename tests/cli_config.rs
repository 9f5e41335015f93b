//! Where the CLI finds its config, and what it says about a bad one: the
//! `--config` flag, else `KNOQ_GATEWAY_CONFIG`, else the default path; and
//! every problem on one line with its key path.

mod support;

use std::process::Command;

use support::TempDir;

fn check(args: &[&str], env: Option<&std::path::Path>) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_knoq-gateway"));
    cmd.arg("check").args(args).current_dir("/");
    cmd.env_remove("KNOQ_GATEWAY_CONFIG");
    if let Some(path) = env {
        cmd.env("KNOQ_GATEWAY_CONFIG", path);
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn the_config_comes_from_the_flag_else_the_environment_else_the_default() {
    let dir = TempDir::new("cli-config");
    let from_env = dir.0.join("env.toml");
    std::fs::write(&from_env, "[server]\nmax_bdy = \"1MiB\"\n").unwrap();
    let from_flag = dir.0.join("flag.toml");
    std::fs::write(&from_flag, "[upstream]\ntimeuot = \"5s\"\n").unwrap();

    let (code, text) = check(&[], Some(&from_env));
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("server.max_bdy: unknown key (did you mean max_body?), line 2"),
        "the file named by KNOQ_GATEWAY_CONFIG was read: {text}"
    );

    let flag = from_flag.to_str().unwrap();
    let (code, text) = check(&["--config", flag], Some(&from_env));
    assert_ne!(code, 0, "{text}");
    assert!(
        text.contains("upstream.timeuot: unknown key (did you mean timeout?), line 2"),
        "--config wins over the environment: {text}"
    );
    assert!(!text.contains("max_bdy"), "{text}");

    // Neither: the documented default, the service layout's path, and
    // how to name another.
    let (code, text) = check(&[], None);
    assert_ne!(code, 0);
    assert!(text.contains("/etc/knoq-gateway/gateway.toml"), "{text}");
    assert!(text.contains("--config or KNOQ_GATEWAY_CONFIG"), "{text}");
}

#[test]
fn git_ignores_every_secret_and_state_path_the_docs_suggest() {
    let root = env!("CARGO_MANIFEST_DIR");
    if !std::path::Path::new(root).join(".git").exists() {
        // Not a checkout (a packaged source): there is nothing to commit.
        return;
    }
    for path in [
        "config/secrets/alice.cookie",
        "config/secrets/scim.token",
        "config/state/quota.journal",
        "config/state/credentials/alice.json",
        "config/gateway.toml",
        "secrets/alice.cookie",
        "state/quota.journal",
    ] {
        let ignored = Command::new("git")
            .args(["check-ignore", "-q", "--no-index", path])
            .current_dir(root)
            .status()
            .unwrap()
            .success();
        assert!(ignored, "{path} would be offered for a commit");
    }
}

#[test]
fn every_command_and_option_is_described_in_help() {
    let subcommands: &[&[&str]] = &[
        &[],
        &["serve"],
        &["check"],
        &["credentials"],
        &["credentials", "set"],
        &["credentials", "status"],
        &["token"],
        &["token", "new"],
        &["mock-knoq"],
        &["demo"],
    ];
    for path in subcommands {
        let out = Command::new(env!("CARGO_BIN_EXE_knoq-gateway"))
            .args(*path)
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "{path:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let mut section = "";
        let mut seen = 0;
        for (i, line) in lines.iter().enumerate() {
            if !line.starts_with(' ') && line.ends_with(':') {
                section = line;
                continue;
            }
            let entry = line.trim_start();
            let is_entry = match section {
                "Options:" => entry.starts_with('-') && line.starts_with("  "),
                "Commands:" | "Arguments:" => {
                    line.starts_with("  ") && !line.starts_with("        ") && !entry.is_empty()
                }
                _ => false,
            };
            if !is_entry {
                continue;
            }
            seen += 1;
            // The description follows on the same line (after two spaces) or
            // on the next, indented further.
            let inline = entry
                .split_once("  ")
                .is_some_and(|(_, d)| !d.trim().is_empty());
            let below = lines.get(i + 1).is_some_and(|next| {
                next.starts_with("          ") && !next.trim_start().starts_with('-')
            });
            assert!(
                inline || below,
                "`knoq-gateway {} --help`: {entry:?} has no description\n{text}",
                path.join(" ")
            );
        }
        assert!(seen > 0, "{path:?}: nothing parsed in\n{text}");
    }
}
