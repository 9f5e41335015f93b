//! The command line: each subcommand is a few lines calling into the library.
//!
//! Exit codes: 0 success; 1 a check found problems or the gateway could not
//! start (busy port); 64 (`EX_USAGE`) a bad config for `serve`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};

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

/// Where the config file is: `--config`, else `KNOQ_GATEWAY_CONFIG`, else
/// the default.
#[derive(Args)]
struct ConfigPath {
    /// The config file [env: KNOQ_GATEWAY_CONFIG; default: /etc/knoq-gateway/gateway.toml].
    /// Relative paths inside it resolve against its own directory.
    #[arg(long, env = "KNOQ_GATEWAY_CONFIG", default_value = DEFAULT_CONFIG_PATH, hide_env = true, hide_default_value = true)]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway: the clients' port and the admin port, until SIGTERM
    /// or SIGINT (then drain). SIGHUP or an edit of the file reloads it.
    /// Exit 64 if the config has a problem.
    Serve {
        #[command(flatten)]
        config: ConfigPath,
    },
    /// Validate a config file and every file it names; exit 1 on any
    /// problem. Changes no file (without --online).
    Check {
        #[command(flatten)]
        config: ConfigPath,
        /// Also ask Knoq: one cheap authenticated read per account (charged
        /// to its read quota) and the SCIM token if configured; prints
        /// valid, rejected, missing or unreachable for each; exit 1 if any
        /// is not valid. Knoq's answer is applied as the gateway would (a
        /// rotated cookie is stored, a rejected one recorded as expired).
        #[arg(long)]
        online: bool,
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
    /// Run the simulated Knoq on its own, as a stand-in upstream.
    #[cfg(feature = "sim")]
    MockKnoq {
        /// Address to listen on (port 0 picks a free one; the log says which).
        #[arg(long)]
        listen: SocketAddr,
        /// Serve this certificate chain (PEM) instead of a self-signed one.
        #[arg(long, requires = "tls_key", conflicts_with = "cert_dir")]
        tls_cert: Option<PathBuf>,
        /// The private key (PEM) for --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Keep the self-signed certificate in this directory (made on the
        /// first start, reused after), so a gateway trusting it keeps working
        /// across restarts. Without it, each start makes a new one.
        #[arg(long)]
        cert_dir: Option<PathBuf>,
        /// Write the self-signed certificate (PEM) here once listening: the
        /// file for the gateway's upstream.ca_file.
        #[arg(long)]
        ca_out: Option<PathBuf>,
        /// Enable SCIM with the bearer token in this file (mode 0600).
        #[arg(long)]
        scim_token_file: Option<PathBuf>,
        /// Require `Origin` on reads too (the benchmark's upstream).
        #[arg(long)]
        require_origin: bool,
    },
    /// Start a simulated Knoq and a gateway, and print curl lines to try.
    #[cfg(feature = "sim")]
    Demo {
        /// The gateway's clients' port.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
}

#[derive(Subcommand)]
enum CredentialsCommand {
    /// Store a new cookie for USER (read from stdin, or --file), after
    /// asking Knoq whether it accepts it; a running gateway uses it within a
    /// second. The cookie is never echoed.
    Set {
        /// The [[users]] entry (Knoq account) the cookie belongs to.
        user: String,
        #[command(flatten)]
        config: ConfigPath,
        /// Read the cookie from this file (mode 0600) instead of stdin.
        #[arg(long)]
        file: Option<PathBuf>,
        /// Store it without asking Knoq first (a cookie Knoq rejects is
        /// otherwise not stored; one it cannot be asked about is stored).
        #[arg(long)]
        no_check: bool,
    },
    /// A table of every user's credential: state, last success, last
    /// rotation, source and why it is in force. Never shows a cookie.
    Status {
        #[command(flatten)]
        config: ConfigPath,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a fresh random token once, and the lines for its [[tokens]] entry.
    New {
        /// When the token stops working: a lifetime ("90d", "12h") or a
        /// date ("2027-03-01", 00:00 UTC) or an RFC 3339 time.
        #[arg(long)]
        expires: Option<String>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Token {
            command: TokenCommand::New { expires },
        } => report(token_new(expires.as_deref())),
        Command::Check { config, online } => check(&config.config, online),
        Command::Credentials {
            command:
                CredentialsCommand::Set {
                    user,
                    config,
                    file,
                    no_check,
                },
        } => report(credentials_set(
            &config.config,
            &user,
            file.as_deref(),
            !no_check,
        )),
        Command::Credentials {
            command: CredentialsCommand::Status { config },
        } => report(credentials_status(&config.config)),
        Command::Serve { config } => serve(&config.config),
        #[cfg(feature = "sim")]
        Command::MockKnoq {
            listen,
            tls_cert,
            tls_key,
            cert_dir,
            ca_out,
            scim_token_file,
            require_origin,
        } => {
            init_plain_logging();
            let tls = match (tls_cert, tls_key, cert_dir) {
                (Some(cert), Some(key), _) => knoq_sim::SimTls::Files { cert, key },
                (_, _, Some(dir)) => knoq_sim::SimTls::SelfSignedIn(dir),
                _ => knoq_sim::SimTls::SelfSigned,
            };
            let scim_token = match scim_token_file
                .as_deref()
                .map(crate::secrets::read_secret_line)
            {
                None => None,
                Some(Ok(token)) => Some(token),
                Some(Err(e)) => return report(Err(e)),
            };
            let options = knoq_sim::Standalone {
                listen,
                tls,
                origin_on_reads: require_origin,
                ca_out,
                scim_token,
            };
            let result =
                runtime().block_on(knoq_sim::run_standalone(options, crate::shutdown::signal()));
            report(result.map_err(|e| e.to_string()))
        }
        #[cfg(feature = "sim")]
        Command::Demo { listen } => {
            init_plain_logging();
            report(runtime().block_on(crate::demo::run(listen, crate::shutdown::signal())))
        }
    }
}

fn token_new(expires: Option<&str>) -> Result<(), String> {
    let now = crate::clock::Clock::now(&crate::clock::SystemClock::new());
    let expires = match expires {
        None => None,
        Some(text) => Some(
            crate::config::parse_expiry(text)
                .or_else(|| {
                    crate::units::parse_duration(text)
                        .ok()
                        .map(|d| now + d.as_millis() as u64)
                })
                .filter(|at| *at > now)
                .ok_or_else(|| {
                    format!("--expires \"{text}\": give a lifetime (\"90d\", \"12h\") or a future date (\"2027-03-01\") or RFC 3339 time")
                })?,
        ),
    };
    let token = crate::auth::new_token();
    println!("token (give it to the tool; it is shown only this once):\n  {token}\n");
    println!("config lines for its [[tokens]] entry:");
    println!("  sha256 = \"{}\"", crate::auth::digest_hex(&token));
    if let Some(at) = expires {
        println!("  expires = \"{}\"", crate::clock::format_rfc3339(at));
    }
    Ok(())
}

fn check(path: &Path, online: bool) -> ExitCode {
    let config = match Config::load(path).and_then(|c| crate::check(&c).map(|()| c)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    };
    println!(
        "{}: OK ({} users, {} tokens, upstream {})",
        path.display(),
        config.users.len(),
        config.tokens.len(),
        config.upstream.url
    );
    let clock = crate::clock::SystemClock::new();
    let mut notes = crate::health::of_credentials(&crate::credentials::status_from_files(&config));
    notes.extend(crate::health::of_tokens(
        &config,
        crate::clock::Clock::now(&clock),
    ));
    for p in &notes {
        println!("warning: {}: {}", p.subject, p.message);
    }
    if !online {
        return ExitCode::SUCCESS;
    }
    println!("asking Knoq at {}:", config.upstream.url);
    let all_valid = runtime().block_on(async move {
        let users: Vec<String> = config.users.iter().map(|u| u.name.clone()).collect();
        let gateway = match crate::assemble::for_online_check(config, Arc::new(clock)) {
            Ok(g) => g,
            Err(e) => {
                println!("  cannot ask: {e}");
                return false;
            }
        };
        let mut all_valid = true;
        for user in &users {
            let verdict = crate::verify::account(&gateway, user).await;
            all_valid &= verdict.is_valid();
            println!("  users {user}: {verdict}");
        }
        if let Some(verdict) = crate::verify::scim(&gateway).await {
            all_valid &= verdict.is_valid();
            println!("  scim token: {verdict}");
        }
        all_valid
    });
    if all_valid {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn serve(path: &Path) -> ExitCode {
    // Inside the runtime from the start: the shared store's connection
    // (made lazily, in the background) belongs to it.
    let runtime = runtime();
    let _inside = runtime.enter();
    let prepared = match Config::load(path).and_then(crate::prepare) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("knoq-gateway: {}: {e}", path.display());
            return ExitCode::from(EX_USAGE);
        }
    };
    crate::logging::init(&prepared.config.log);
    runtime.block_on(async move {
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

fn credentials_set(
    config: &Path,
    user: &str,
    file: Option<&Path>,
    ask: bool,
) -> Result<(), String> {
    let config = Config::load(config).map_err(|e| e.to_string())?;
    if !config.users.iter().any(|u| u.name == user) {
        return Err(format!("no [[users]] entry is named \"{user}\""));
    }
    let cookie = match file {
        Some(path) => crate::secrets::read_secret_line(path)?,
        None => read_cookie_from_stdin()?,
    };
    let cookie = cookie.trim().to_string();
    crate::credentials::parse_cookie(&cookie)?;
    let (cookie, checked) = if ask {
        let (verdict, latest) = runtime().block_on(ask_knoq(&config, user, &cookie))?;
        match verdict {
            crate::verify::Verdict::Valid => (latest, "Knoq accepted it"),
            crate::verify::Verdict::Unreachable(why) => {
                eprintln!("could not ask Knoq about it ({why})");
                (latest, "not checked: Knoq could not be asked")
            }
            crate::verify::Verdict::Rejected(_) | crate::verify::Verdict::Missing(_) => {
                return Err(format!(
                    "Knoq rejected this cookie (401), so it was not stored; copy a fresh one from a browser signed in to {} (or pass --no-check to store it anyway)",
                    config.upstream.origin.to_str().unwrap_or("Knoq")
                ));
            }
        }
    } else {
        (cookie, "not checked with Knoq (--no-check)")
    };
    crate::credentials::store_operator_cookie(&config, user, &cookie)?;
    eprintln!(
        "stored a new cookie for '{user}' ({} bytes; {checked}); a running gateway uses it within a second",
        cookie.len()
    );
    Ok(())
}

/// Asks Knoq about `cookie` for `user` before it is stored: through a
/// gateway whose only account is `user`, holding only this cookie, in a
/// scratch state directory (so nothing of the real one changes). Returns
/// the verdict and the cookie as it is after Knoq's answer (Knoq may
/// rotate it on the way).
async fn ask_knoq(
    config: &Config,
    user: &str,
    cookie: &str,
) -> Result<(crate::verify::Verdict, String), String> {
    let scratch = crate::state::Scratch::new("knoq-gateway-check")
        .map_err(|e| format!("cannot make a scratch directory: {e}"))?;
    let mut trial = config.clone();
    trial.state.dir = scratch.path().to_path_buf();
    trial.users.retain(|u| u.name == user);
    for u in &mut trial.users {
        u.cookie = crate::config::CookieSource::Stored;
    }
    trial.tokens.clear();
    trial.scim.token_file = None;
    crate::credentials::store_operator_cookie(&trial, user, cookie)?;
    let gateway =
        crate::assemble::for_online_check(trial, Arc::new(crate::clock::SystemClock::new()))
            .map_err(|e| e.to_string())?;
    let verdict = crate::verify::account(&gateway, user).await;
    let latest = gateway
        .credentials
        .cookie(user)
        .and_then(|v| v.to_str().ok().map(str::to_string))
        .unwrap_or_else(|| cookie.to_string());
    Ok((verdict, latest))
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
    let (rows, store, live) = match fetch_live_status(config.admin.listen) {
        Some((rows, store)) => (rows, store, true),
        None => (
            crate::credentials::status_from_files(&config),
            serde_json::Value::Null,
            false,
        ),
    };
    if let Some(kind) = store["kind"].as_str() {
        match store["mode"].as_str() {
            Some(mode) => println!("store: {kind} ({mode})"),
            None => println!("store: {kind}"),
        }
    }
    println!(
        "{:<20} {:<10} {:<24} {:<24} SOURCE",
        "USER", "STATE", "LAST SUCCESS", "LAST ROTATION"
    );
    let word = |v: serde_json::Result<serde_json::Value>| {
        v.ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    };
    for r in rows {
        println!(
            "{:<20} {:<10} {:<24} {:<24} {}",
            r.user,
            word(serde_json::to_value(r.state)),
            r.last_success.map_or("-".into(), format_ms),
            r.last_rotation.map_or("-".into(), format_ms),
            word(serde_json::to_value(r.source)),
        );
        println!("    why: {}", r.why);
        if let Some(problem) = &r.source_problem {
            println!("    problem: {problem}");
        }
        if let Some(generation) = r.shared_generation {
            println!("    shared generation: {generation}");
        }
    }
    if !live {
        println!("(the gateway's admin port did not answer: state read from the files; 'unchecked' means not known)");
    }
    Ok(())
}

/// Asks a running gateway's admin port for `/credentials`: every user's
/// status, and the store's kind and mode.
fn fetch_live_status(
    admin: SocketAddr,
) -> Option<(Vec<crate::credentials::UserStatus>, serde_json::Value)> {
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
    let mut json: serde_json::Value = serde_json::from_str(body).ok()?;
    let users = serde_json::from_value(json["users"].take()).ok()?;
    Some((users, json["store"].take()))
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
