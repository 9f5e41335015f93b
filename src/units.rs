//! Parsing of the human units the config file uses: durations (`"250ms"`,
//! `"5s"`, `"10m"`) and byte sizes (`"1MiB"`, `"64KiB"`); and the one
//! number formatter the per-request path uses instead of `format!`.
//!
//! Pure functions, no I/O: the config layer calls them and attaches the key
//! path to any error.

use std::time::Duration;

/// `n` in decimal, written into `buf` without going through `core::fmt`.
pub fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).expect("ASCII digits")
}

/// Appends `n` in decimal (see [`decimal`]).
pub fn push_decimal(out: &mut String, n: u64) {
    out.push_str(decimal(n, &mut [0; 20]));
}

/// Parses a duration written as a whole number followed by a unit:
/// `ms`, `s`, `m` (or `min`), `h`, `d`. `"0s"` is allowed.
///
/// A bare number is refused on purpose: `timeout = 60` could mean seconds
/// or milliseconds, and a config should not make the reader guess.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| {
        format!("\"{text}\" has no unit; write e.g. \"5s\", \"250ms\" or \"10m\"")
    })?;
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "\"{text}\" must start with a whole number, e.g. \"5s\""
        ));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("\"{text}\": the number is too large"))?;
    let unit_ms: u64 = match unit.trim() {
        "ms" => 1,
        "s" | "sec" => 1_000,
        "m" | "min" => 60_000,
        "h" | "hour" => 3_600_000,
        "d" | "day" => 86_400_000,
        other => {
            return Err(format!(
                "\"{text}\": unknown unit \"{other}\"; use ms, s, m, h or d"
            ))
        }
    };
    n.checked_mul(unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("\"{text}\" is too long"))
}

/// Parses a byte size: a whole number with an optional unit `B`, `KiB`,
/// `MiB`, `GiB` (powers of 1024) or `KB`, `MB`, `GB` (powers of 1000).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(format!(
            "\"{text}\" must start with a whole number, e.g. \"1MiB\""
        ));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("\"{text}\": the number is too large"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => {
            return Err(format!(
                "\"{text}\": unknown unit \"{other}\"; use B, KiB, MiB, GiB, KB, MB or GB"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("\"{text}\" is too large"))
}

/// Formats a duration the way the config file writes it, for messages.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms % 1000 != 0 {
        format!("{ms}ms")
    } else {
        format!("{}s", ms / 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_match_the_standard_formatter() {
        for n in [0, 7, 10, 99, 100, 65_535, 1_795_951_167_553, u64::MAX] {
            let mut s = String::from("x=");
            push_decimal(&mut s, n);
            assert_eq!(s, format!("x={n}"));
        }
    }

    #[test]
    fn durations_in_every_unit() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("10min"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn durations_without_unit_or_number_are_refused() {
        assert!(parse_duration("60").unwrap_err().contains("no unit"));
        assert!(parse_duration("s").unwrap_err().contains("whole number"));
        assert!(parse_duration("5 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("99999999999999999999s").is_err());
        assert!(
            parse_duration("18446744073709552s").is_err(),
            "overflow in ms"
        );
    }

    #[test]
    fn sizes_binary_and_decimal() {
        assert_eq!(parse_size("1MiB"), Ok(1_048_576));
        assert_eq!(parse_size("64KiB"), Ok(65_536));
        assert_eq!(parse_size("1MB"), Ok(1_000_000));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("512B"), Ok(512));
        assert!(parse_size("1 furlong").is_err());
        assert!(parse_size("MiB").is_err());
    }

    #[test]
    fn format_round_trips_whole_seconds_and_millis() {
        assert_eq!(format_duration(Duration::from_secs(5)), "5s");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn duration_and_size_parsers_never_panic(text in "\\PC{0,16}|[0-9]{0,22}[a-zA-Z ]{0,4}") {
                let _ = parse_duration(&text);
                let _ = parse_size(&text);
            }

            #[test]
            fn a_duration_written_as_the_config_writes_it_reads_back(ms in 0u64..1_000_000_000_000) {
                let d = Duration::from_millis(ms);
                prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
            }
        }
    }
}
