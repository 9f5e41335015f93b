//! Log set-up: `tracing` to stderr, text or JSON, filter from `RUST_LOG` or
//! the config's `log.level`.
//!
//! Nothing in the gateway logs a header value, a cookie, a token or a body:
//! the pipeline logs names and statuses only, credential types redact
//! themselves in `Debug`, and `headers::Redacted` is the only way headers
//! are ever printed.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. Call once, from `main`.
pub fn init(config: &LogConfig) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colour codes only for a person at a terminal: log files and
    // collectors get plain text (and the gateway skips the extra bytes).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let result = match config.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // A second call (tests, demo) keeps the first subscriber.
    let _ = result;
}
