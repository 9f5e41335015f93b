//! Log set-up: `tracing` to stderr, text or JSON, filter from `RUST_LOG` or
//! the config's `log.level`.
//!
//! Nothing in the gateway logs a header value, a cookie, a token or a body:
//! the pipeline logs names and statuses only, credential types redact
//! themselves in `Debug`, and `headers::Redacted` is the only way headers
//! are ever printed.

use std::cell::RefCell;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
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
        // A person at a terminal gets tracing's coloured lines; files and
        // collectors get the same text from `PlainLine`, which costs a
        // fraction of it (one line is written per request).
        LogFormat::Text if std::io::stderr().is_terminal() => builder.try_init(),
        LogFormat::Text => builder.event_format(PlainLine).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    // A second call (tests, demo) keeps the first subscriber.
    let _ = result;
}

/// tracing's default text line, `<time>  INFO <target>: <message> k=v ...`,
/// written without ANSI codes and, for the common field types, without
/// going through `core::fmt`: the request log line was about a tenth of the
/// gateway's instructions per request with tracing's own formatter.
/// (The gateway records no spans, so there is no span context to print.)
struct PlainLine;

impl<S, N> FormatEvent<S, N> for PlainLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        write_timestamp(&mut writer)?;
        writer.write_str(match *meta.level() {
            Level::ERROR => " ERROR ",
            Level::WARN => "  WARN ",
            Level::INFO => "  INFO ",
            Level::DEBUG => " DEBUG ",
            Level::TRACE => " TRACE ",
        })?;
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        let mut fields = PlainFields {
            writer: &mut writer,
            first: true,
            result: Ok(()),
        };
        event.record(&mut fields);
        fields.result?;
        writer.write_char('\n')
    }
}

/// `2026-11-29T10:31:11.123456Z`, the date and time part cached per second.
fn write_timestamp(writer: &mut Writer<'_>) -> fmt::Result {
    thread_local! {
        static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    SECOND.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != secs {
            let mut text = crate::clock::format_rfc3339(secs * 1000);
            text.pop(); // the 'Z'
            *cached = (secs, text);
        }
        writer.write_str(&cached.1)
    })?;
    let micros = u64::from(now.subsec_micros());
    let mut frac = String::with_capacity(8);
    frac.push('.');
    // Six digits, zero-padded.
    let mut digits = String::with_capacity(6);
    crate::units::push_decimal(&mut digits, micros);
    for _ in digits.len()..6 {
        frac.push('0');
    }
    frac.push_str(&digits);
    frac.push('Z');
    writer.write_str(&frac)
}

/// Writes fields as tracing's default formatter does: the message bare,
/// the rest as ` name=value`, strings quoted and escaped like `{:?}`.
struct PlainFields<'a, 'w> {
    writer: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl PlainFields<'_, '_> {
    fn name(&mut self, field: &Field) -> fmt::Result {
        if !std::mem::take(&mut self.first) {
            self.writer.write_char(' ')?;
        }
        if field.name() != "message" {
            self.writer.write_str(field.name())?;
            self.writer.write_char('=')?;
        }
        Ok(())
    }
}

impl Visit for PlainFields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        self.result = self.name(field).and_then(|()| {
            let plain = value
                .bytes()
                .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
            match (field.name() == "message", plain) {
                (true, _) => self.writer.write_str(value),
                (false, true) => {
                    self.writer.write_char('"')?;
                    self.writer.write_str(value)?;
                    self.writer.write_char('"')
                }
                (false, false) => write!(self.writer, "{value:?}"),
            }
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.result.is_err() {
            return;
        }
        self.result = self.name(field).and_then(|()| {
            let mut digits = String::with_capacity(20);
            crate::units::push_decimal(&mut digits, value);
            self.writer.write_str(&digits)
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        self.result = self
            .name(field)
            .and_then(|()| write!(self.writer, "{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Runs `emit` under a text subscriber (tracing's own format or
    /// `PlainLine`) and returns what it wrote, minus the timestamp.
    fn capture(plain: bool, emit: impl Fn()) -> String {
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = out.clone();
        let make = move || Sink(sink.clone());
        let builder = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_max_level(Level::TRACE)
            .with_writer(make);
        if plain {
            tracing::subscriber::with_default(builder.event_format(PlainLine).finish(), &emit);
        } else {
            tracing::subscriber::with_default(builder.finish(), &emit);
        }
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| l.split_once(' ').expect("a timestamp first").1.to_string() + "\n")
            .collect()
    }

    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn plain_lines_match_tracings_own_text_format() {
        let emit = || {
            let err = std::io::Error::other("disk \"full\"");
            tracing::info!(
                request_id = "kgw-1",
                user = "a b",
                quoted = "say \"hi\"\nand leave",
                unicode = "café",
                status = 200u64,
                delta = -3i64,
                ok = true,
                addr = %"127.0.0.1:8080",
                list = ?["x", "y"],
                error = %err,
                "request"
            );
            tracing::warn!("no fields at all");
            tracing::error!(n = 0u64, "formatted {} message", 42);
        };
        let theirs = capture(false, emit);
        let ours = capture(true, emit);
        assert_eq!(theirs.lines().count(), 3, "{theirs}");
        assert_eq!(ours, theirs);
    }

    #[test]
    fn plain_timestamps_are_rfc3339_with_microseconds() {
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || Sink(sink.clone()))
            .event_format(PlainLine)
            .finish();
        tracing::subscriber::with_default(subscriber, || tracing::info!("tick"));
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        let stamp = text.split(' ').next().unwrap();
        assert_eq!(stamp.len(), "2026-11-29T10:31:11.123456Z".len(), "{stamp}");
        let at = crate::clock::parse_rfc3339_ms(&format!("{}Z", &stamp[..19])).expect(stamp);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(now.abs_diff(at) < 5_000, "{stamp} is not now");
        assert!(
            stamp.ends_with('Z') && stamp.as_bytes()[19] == b'.',
            "{stamp}"
        );
        assert!(stamp[20..26].bytes().all(|b| b.is_ascii_digit()), "{stamp}");
    }
}
