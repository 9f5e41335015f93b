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
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Validate a config file and every file it names; exit 1 on any problem.
    Check {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Bearer tokens for internal tools.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Run the simulated Knoq on its own.
    MockKnoq {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Start a simulated Knoq and a gateway, and print curl lines to try.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
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
        Command::Serve { config } => serve(&config),
        Command::MockKnoq {
            listen,
            tls_cert,
            tls_key,
        } => {
            init_plain_logging();
            let tls = match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => crate::sim::SimTls::Files { cert, key },
                _ => crate::sim::SimTls::SelfSigned,
            };
            let result = runtime().block_on(crate::sim::run_standalone(
                listen,
                tls,
                crate::shutdown::signal(),
            ));
            report(result.map_err(|e| e.to_string()))
        }
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

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the tokio runtime can be built")
}

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
