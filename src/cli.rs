//! The command line: each subcommand is a few lines calling into the library.
//!
//! Exit codes: 0 success; 1 a check found problems or the gateway could not
//! start (busy port); 64 (`EX_USAGE`) a bad config for `serve`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{Config, DEFAULT_CONFIG_PATH};

const EX_USAGE: u8 = 64;

#[derive(Parser)]
#[command(
    name = "knoq-gateway",
    version,
    about = "Local authenticating reverse proxy for the Knoq API"
)]
#[cfg_attr(
    not(feature = "sim"),
    command(
        after_help = "This build has no simulated Knoq: `demo` and `mock-knoq` need the `sim` feature."
    )
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[arg(long, env = "KNOQ_GATEWAY_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Validate a config file and every file it names; exit 1 on any problem.
    Check {
        #[arg(long, env = "KNOQ_GATEWAY_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Knoq session cookies: replace one, or see how each is doing.
    Credentials {
        #[command(subcommand)]
        command: CredentialsCommand,
    },
    /// Bearer tokens for internal tools.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Run the simulated Knoq on its own.
    #[cfg(feature = "sim")]
    MockKnoq {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Require `Origin` on reads too (the benchmark's upstream).
        #[arg(long)]
        require_origin: bool,
    },
    /// Start a simulated Knoq and a gateway, and print curl lines to try.
    #[cfg(feature = "sim")]
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
}

#[derive(Subcommand)]
enum CredentialsCommand {
    /// Store a new cookie for USER (read from stdin, or --file); a running
    /// gateway uses it within a second. The cookie is never echoed.
    Set {
        user: String,
        #[arg(long, env = "KNOQ_GATEWAY_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Read the cookie from this file (mode 0600) instead of stdin.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// A table of every user's credential: state, last success, last
    /// rotation, source. Never shows a cookie.
    Status {
        #[arg(long, env = "KNOQ_GATEWAY_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a fresh random token once, and the sha256 line for the config.
    New,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Token {
            command: TokenCommand::New,
        } => {
            let token = crate::auth::new_token();
            println!("token (give it to the tool; it is shown only this once):\n  {token}\n");
            println!(
                "config line for its [[tokens]] entry:\n  sha256 = \"{}\"",
                crate::auth::digest_hex(&token)
            );
            ExitCode::SUCCESS
        }
        Command::Check { config } => check(&config),
        Command::Credentials {
            command: CredentialsCommand::Set { user, config, file },
        } => report(credentials_set(&config, &user, file.as_deref())),
        Command::Credentials {
            command: CredentialsCommand::Status { config },
        } => report(credentials_status(&config)),
        Command::Serve { config } => serve(&config),
        #[cfg(feature = "sim")]
        Command::MockKnoq {
            listen,
            tls_cert,
            tls_key,
            require_origin,
        } => {
            init_plain_logging();
            let tls = match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => knoq_sim::SimTls::Files { cert, key },
                _ => knoq_sim::SimTls::SelfSigned,
            };
            let result = runtime().block_on(knoq_sim::run_standalone(
                listen,
                tls,
                require_origin,
                crate::shutdown::signal(),
            ));
            report(result.map_err(|e| e.to_string()))
        }
        #[cfg(feature = "sim")]
        Command::Demo { listen } => {
            init_plain_logging();
            report(runtime().block_on(crate::demo::run(listen, crate::shutdown::signal())))
        }
    }
}

fn check(path: &Path) -> ExitCode {
    let result = Config::load(path).and_then(|c| crate::check(&c).map(|()| c));
    match result {
        Ok(c) => {
            println!(
                "{}: OK ({} users, {} tokens, upstream {})",
                path.display(),
                c.users.len(),
                c.tokens.len(),
                c.upstream.url
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}

fn serve(path: &Path) -> ExitCode {
    let prepared = match Config::load(path).and_then(crate::prepare) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("knoq-gateway: {}: {e}", path.display());
            return ExitCode::from(EX_USAGE);
        }
    };
    crate::logging::init(&prepared.config.log);
    runtime().block_on(async move {
        let server = &prepared.config.server;
        let bind = |addr: SocketAddr, what: &'static str| async move {
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr} ({what}): {e}"))
        };
        let proxy = match bind(server.listen, "server.listen").await {
            Ok(l) => l,
            Err(e) => return report(Err(e)),
        };
        let admin = match bind(prepared.config.admin.listen, "admin.listen").await {
            Ok(l) => l,
            Err(e) => return report(Err(e)),
        };
        tracing::info!(
            listen = %server.listen,
            admin = %prepared.config.admin.listen,
            tls = server.tls.is_some(),
            upstream = %prepared.config.upstream.url,
            users = prepared.config.users.len(),
            tokens = prepared.config.tokens.len(),
            "knoq-gateway serving"
        );
        crate::run(prepared, proxy, admin, crate::shutdown::signal()).await;
        tracing::info!("stopped");
        ExitCode::SUCCESS
    })
}

fn credentials_set(config: &Path, user: &str, file: Option<&Path>) -> Result<(), String> {
    let config = Config::load(config).map_err(|e| e.to_string())?;
    let cookie = match file {
        Some(path) => crate::secrets::read_secret_line(path)?,
        None => read_cookie_from_stdin()?,
    };
    crate::credentials::store_operator_cookie(&config, user, &cookie)?;
    eprintln!(
        "stored a new cookie for '{user}' ({} bytes); a running gateway uses it within a second",
        cookie.trim().len()
    );
    Ok(())
}

/// Reads one line from stdin; at a terminal, without echo.
fn read_cookie_from_stdin() -> Result<String, String> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        return rpassword::prompt_password(
            "Paste the Cookie header value (not shown), then Enter: ",
        )
        .map_err(|e| format!("cannot read from the terminal: {e}"));
    }
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .map_err(|e| format!("cannot read stdin: {e}"))?;
    Ok(line)
}

fn credentials_status(path: &Path) -> Result<(), String> {
    let config = Config::load(path).map_err(|e| e.to_string())?;
    let (rows, live) = match fetch_live_status(config.admin.listen) {
        Some(rows) => (rows, true),
        None => (crate::credentials::status_from_files(&config), false),
    };
    println!(
        "{:<20} {:<10} {:<24} {:<24} SOURCE",
        "USER", "STATE", "LAST SUCCESS", "LAST ROTATION"
    );
    for r in rows {
        let state = serde_json::to_value(r.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let source = serde_json::to_value(r.source)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        println!(
            "{:<20} {:<10} {:<24} {:<24} {}",
            r.user,
            state,
            r.last_success.map_or("-".into(), format_ms),
            r.last_rotation.map_or("-".into(), format_ms),
            source
        );
    }
    if !live {
        println!("(the gateway's admin port did not answer: state read from the files; 'unchecked' means not known)");
    }
    Ok(())
}

/// Asks a running gateway's admin port for `/credentials`.
fn fetch_live_status(admin: SocketAddr) -> Option<Vec<crate::credentials::UserStatus>> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_secs(2);
    let mut s = std::net::TcpStream::connect_timeout(&admin, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    write!(
        s,
        "GET /credentials HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        admin.ip()
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let body = text.split_once("\r\n\r\n")?.1;
    let json: serde_json::Value = serde_json::from_str(body).ok()?;
    json["users"]
        .as_array()?
        .iter()
        .map(|u| {
            Some(crate::credentials::UserStatus {
                user: u["user"].as_str()?.to_string(),
                state: serde_json::from_value(u["state"].clone()).ok()?,
                last_success: u["last_success"].as_u64(),
                last_rotation: u["last_rotation"].as_u64(),
                source: serde_json::from_value(u["source"].clone()).ok()?,
            })
        })
        .collect()
}

/// Unix milliseconds as `2026-11-29T08:56:01Z`.
fn format_ms(ms: u64) -> String {
    crate::clock::format_rfc3339(ms)
}

/// Tokio's work-stealing runtime, one worker per CPU; on a single CPU
/// (pinned with taskset, or a container's cpuset or quota) the
/// single-threaded runtime, which does the same work without the
/// scheduler's cross-thread bookkeeping (about 3% of the instructions
/// per request).
fn runtime() -> tokio::runtime::Runtime {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut builder = if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder
        .enable_all()
        .build()
        .expect("the tokio runtime can be built")
}

/// Text logs at `info`, for the simulator's subcommands (no config file).
#[cfg(feature = "sim")]
fn init_plain_logging() {
    crate::logging::init(&crate::config::LogConfig {
        format: crate::config::LogFormat::Text,
        level: "info".into(),
    });
}

fn report(result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("knoq-gateway: {e}");
            ExitCode::FAILURE
        }
    }
}
