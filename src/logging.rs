//! Log set-up: `tracing` to stderr, text or JSON, filter from `RUST_LOG` or
//! the config's `log.level`.
//!
//! Nothing in the gateway logs a header value, a cookie, a token or a body:
//! the pipeline logs names and statuses only, credential types redact
//! themselves in `Debug`, and `headers::Redacted` is the only way headers
//! are ever printed.

use std::cell::RefCell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{Format, Full, Writer};
use tracing_subscriber::fmt::time::SystemTime as SystemTimeFormat;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Swaps the level filter of the installed subscriber (set by `init`).
type SetLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;
static SET_LEVEL: std::sync::OnceLock<SetLevel> = std::sync::OnceLock::new();

/// Installs the global subscriber. Call once, from `main`.
pub fn init(config: &LogConfig) {
    let from_env = EnvFilter::try_from_default_env().ok();
    let env_wins = from_env.is_some();
    let filter = from_env
        .or_else(|| EnvFilter::try_new(&config.level).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colour codes only for a person at a terminal: log files and
    // collectors get plain text (and the gateway skips the extra bytes).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // The handle's type follows the line format: keep it behind a closure.
    macro_rules! install {
        ($builder:expr) => {{
            // Last: the reload handle's type names the finished formatter.
            let builder = $builder.with_filter_reloading();
            let handle = builder.reload_handle();
            if !env_wins {
                let _ = SET_LEVEL.set(Box::new(move |level: &str| {
                    let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
                    handle.reload(filter).map_err(|e| e.to_string())
                }));
            }
            builder.try_init()
        }};
    }
    let result = match config.format {
        // A person at a terminal gets tracing's coloured lines; files and
        // collectors get the same text from `PlainLine`, which costs a
        // fraction of it (one line is written per request).
        LogFormat::Text if std::io::stderr().is_terminal() => install!(builder),
        LogFormat::Text => install!(builder.event_format(PlainLine::new())),
        LogFormat::Json => install!(builder.json().flatten_event(true)),
    };
    // A second call (tests, demo) keeps the first subscriber.
    let _ = result;
}

/// Applies a reloaded `log.level`. Nothing to do when no subscriber was
/// installed (tests) or when `RUST_LOG` is set (it wins, as at start-up).
pub fn set_level(level: &str) -> Result<(), String> {
    match SET_LEVEL.get() {
        Some(set) => set(level),
        None => Ok(()),
    }
}

/// tracing's default text line, `<time>  INFO <target>: <message> k=v ...`,
/// written without ANSI codes and, for the common field types, without
/// going through `core::fmt`: the request log line was about a tenth of the
/// gateway's instructions per request with tracing's own formatter.
///
/// Events inside a span and events from the `log` crate (rustls logs that
/// way) are rare and need more than this writes (span prefixes, the `log`
/// record's own target): they go to tracing's formatter itself.
struct PlainLine {
    fallback: Format<Full, SystemTimeFormat>,
}

impl PlainLine {
    fn new() -> Self {
        PlainLine {
            fallback: Format::default().with_ansi(false),
        }
    }
}

impl<S, N> FormatEvent<S, N> for PlainLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        if ctx.event_scope().is_some() || meta.fields().field("log.target").is_some() {
            return self.fallback.format_event(ctx, writer, event);
        }
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
    // `.` and six digits, zero-padded, then `Z`.
    let mut buf = [0; 20];
    let micros = crate::units::decimal(u64::from(now.subsec_micros()), &mut buf);
    writer.write_char('.')?;
    writer.write_str(&"000000"[micros.len()..])?;
    writer.write_str(micros)?;
    writer.write_char('Z')
}

/// Writes fields as tracing's default formatter does, but with one rule
/// for every text value: the message bare, the rest as ` name=value`,
/// numbers and booleans bare, every other value (a string, a `%` Display,
/// a `?` Debug, an error and each of its causes) quoted and escaped like
/// `{:?}` writes a string. (tracing's own formatter quotes only strings,
/// so `error=disk full` and `user="a b"` would read differently.)
struct PlainFields<'a, 'w> {
    writer: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl PlainFields<'_, '_> {
    /// A number or a boolean: written as it is, unquoted.
    fn bare(&mut self, field: &Field, value: impl fmt::Display) {
        if self.result.is_err() {
            return;
        }
        self.result = self
            .name(field)
            .and_then(|()| write!(self.writer, "{value}"));
    }

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

/// Writes through to the line, escaping what could drive a terminal (ESC,
/// BEL, BS, FF, DEL, C1 controls) the way tracing does for messages.
struct Escaping<'a, 'w>(&'a mut Writer<'w>);

impl fmt::Write for Escaping<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(at) = rest.find(|c: char| {
            matches!(
                c,
                '\x1b' | '\x07' | '\x08' | '\x0c' | '\x7f' | '\u{80}'..='\u{9f}'
            )
        }) {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().expect("found above");
            match c {
                '\u{80}'..='\u{9f}' => write!(self.0, "\\u{{{:x}}}", c as u32)?,
                _ => write!(self.0, "\\x{:02x}", c as u32)?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

/// Writes through to the line as the inside of a quoted string: `"` and
/// `\\` escaped, control characters as `\n`, `\t`, `\r` or `\u{..}`,
/// as `{:?}` writes a string.
struct Quoting<'a, 'w>(&'a mut Writer<'w>);

impl fmt::Write for Quoting<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut rest = s;
        while let Some(at) = rest.find(|c: char| c == '"' || c == '\\' || c.is_control()) {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().expect("found above");
            match c {
                '"' => self.0.write_str("\\\"")?,
                '\\' => self.0.write_str("\\\\")?,
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                _ => write!(self.0, "\\u{{{:x}}}", c as u32)?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

impl Visit for PlainFields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        if field.name() == "message" {
            self.result = self
                .name(field)
                .and_then(|()| fmt::Write::write_str(&mut Escaping(self.writer), value));
            return;
        }
        self.result = self.name(field).and_then(|()| {
            let plain = value
                .bytes()
                .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\');
            if plain {
                self.writer.write_char('"')?;
                self.writer.write_str(value)?;
                self.writer.write_char('"')
            } else {
                write!(self.writer, "{value:?}")
            }
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.result.is_err() {
            return;
        }
        self.result = self.name(field).and_then(|()| {
            self.writer
                .write_str(crate::units::decimal(value, &mut [0; 20]))
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.bare(field, value);
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.bare(field, value);
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.bare(field, value);
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if self.result.is_err() {
            return;
        }
        // `name="<error>" name.sources=["<cause>", ...]`, each quoted like
        // any text value.
        self.result = self.name(field).and_then(|()| {
            self.writer.write_char('"')?;
            write!(Quoting(self.writer), "{value}")?;
            self.writer.write_char('"')?;
            if let Some(source) = value.source() {
                write!(self.writer, " {}.sources=[", field.name())?;
                let mut next = Some(source);
                let mut first = true;
                while let Some(e) = next {
                    if !std::mem::take(&mut first) {
                        self.writer.write_str(", ")?;
                    }
                    self.writer.write_char('"')?;
                    write!(Quoting(self.writer), "{e}")?;
                    self.writer.write_char('"')?;
                    next = e.source();
                }
                self.writer.write_char(']')?;
            }
            Ok(())
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        self.result = self.name(field).and_then(|()| {
            if field.name() == "message" {
                write!(Escaping(self.writer), "{value:?}")
            } else {
                // Display (`%`) and Debug (`?`) values are text like any
                // string field: quoted and escaped the same way, written
                // straight into the line (no copy per field).
                self.writer.write_char('"')?;
                write!(Quoting(self.writer), "{value:?}")?;
                self.writer.write_char('"')
            }
        });
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
            tracing::subscriber::with_default(
                builder.event_format(PlainLine::new()).finish(),
                &emit,
            );
        } else {
            tracing::subscriber::with_default(builder.finish(), &emit);
        }
        let text = String::from_utf8(out.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| l.split_once(' ').expect("a timestamp first").1.to_string() + "\n")
            .collect()
    }

    /// An error whose `source` is another error.
    #[derive(Debug)]
    struct Wrapped(std::io::Error);

    impl fmt::Display for Wrapped {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("outer")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
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
    fn plain_lines_are_tracings_format_with_every_text_value_quoted() {
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
            // Terminal controls in a message are escaped, as tracing does.
            tracing::warn!("bell\x07 esc\x1b[2J del\x7f c1\u{85} end");
            let text = "esc\x1b[2J in a str message";
            tracing::warn!(message = text, other = "x\x1by");
            // An error with causes: `error=... error.sources=[...]`.
            let inner = std::io::Error::other("inner \x1b cause");
            let outer = std::io::Error::other(Wrapped(inner));
            let dyn_err: &(dyn std::error::Error + 'static) = &outer;
            tracing::error!(error = dyn_err, "failed");
            // Inside a span: tracing's own formatter writes the prefix.
            let span = tracing::info_span!("outer", k = 1u64);
            span.in_scope(|| tracing::info!(status = 200u64, "in a span"));
        };
        let theirs = capture(false, emit);
        let ours = capture(true, emit);
        assert_eq!(theirs.lines().count(), 7, "{theirs}");
        assert!(!theirs.contains('\x1b'), "{theirs}");
        assert!(!ours.contains('\x1b'), "{ours}");
        // Lines with only strings, numbers and messages are tracing's own.
        for i in [1, 2, 3, 4, 6] {
            assert_eq!(ours.lines().nth(i), theirs.lines().nth(i), "line {i}");
        }
        // Every text value is quoted alike, whichever way it was recorded.
        assert_eq!(
            ours.lines().next().unwrap(),
            " INFO knoq_gateway::logging::tests: request request_id=\"kgw-1\" user=\"a b\" \
             quoted=\"say \\\"hi\\\"\\nand leave\" unicode=\"café\" status=200 delta=-3 ok=true \
             addr=\"127.0.0.1:8080\" list=\"[\\\"x\\\", \\\"y\\\"]\" error=\"disk \\\"full\\\"\""
        );
        assert_eq!(
            ours.lines().nth(5).unwrap(),
            "ERROR knoq_gateway::logging::tests: failed error=\"outer\" error.sources=[\"inner \\u{1b} cause\"]"
        );
    }

    #[test]
    fn plain_timestamps_are_rfc3339_with_microseconds() {
        let out = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || Sink(sink.clone()))
            .event_format(PlainLine::new())
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
