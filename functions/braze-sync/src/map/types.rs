//! Amperity's column types (Boolean, Date, Datetime, Decimal, Float, Integer, String, Varchar)
//! and how a cell of each becomes the value Braze receives: booleans from every spelling
//! Amperity writes, integers as JSON integers, decimals and floats rounded in *decimal* (so
//! `2.675` rounds to `2.68` and nothing prints as `0.30000000000000004`), dates and datetimes
//! as ISO 8601 UTC, strings trimmed and held to 255 characters.

use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, Utc};

use crate::vocab::Cell;
pub use crate::vocab::{AmperityType, decimal_text};

/// Braze's limit on string values, in characters.
pub const MAX_STRING_CHARS: usize = 255;

/// A parse failure: the reason, for the reject.
pub type Reason = String;

/// Parses the boolean spellings Amperity (and common tools) write: `true`/`false`, `t`/`f`,
/// `yes`/`no`, `y`/`n`, `1`/`0`, `on`/`off`, in any case.
pub fn parse_bool(cell: &Cell<'_>) -> Result<bool, Reason> {
    match cell {
        Cell::Bool(b) => Ok(*b),
        Cell::Int(0) => Ok(false),
        Cell::Int(1) => Ok(true),
        Cell::Str(s) => {
            let t = s.trim();
            if ["true", "t", "yes", "y", "1", "on"]
                .iter()
                .any(|w| t.eq_ignore_ascii_case(w))
            {
                Ok(true)
            } else if ["false", "f", "no", "n", "0", "off"]
                .iter()
                .any(|w| t.eq_ignore_ascii_case(w))
            {
                Ok(false)
            } else {
                Err(format!(
                    "{t:?} is not a boolean (true/false, t/f, yes/no, y/n, 1/0)"
                ))
            }
        }
        other => Err(format!("{} is not a boolean", describe(other))),
    }
}

/// Parses an integer; an integral decimal (`42.0`) is accepted.
pub fn parse_int(cell: &Cell<'_>) -> Result<i64, Reason> {
    match cell {
        Cell::Int(i) => Ok(*i),
        Cell::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(*f as i64),
        Cell::Decimal { unscaled, scale } => {
            let text = decimal_text(*unscaled, *scale);
            parse_int(&Cell::Str(&text))
        }
        Cell::Str(s) => {
            let t = s.trim();
            if let Ok(i) = t.parse::<i64>() {
                return Ok(i);
            }
            match split_decimal(t) {
                Some((neg, int, frac)) if frac.bytes().all(|b| b == b'0') => {
                    let int = if int.is_empty() { "0" } else { int };
                    int.parse::<i64>()
                        .map(|v| if neg { -v } else { v })
                        .map_err(|_| format!("{t:?} is out of the Integer range"))
                }
                _ => Err(format!("{t:?} is not an integer")),
            }
        }
        other => Err(format!("{} is not an integer", describe(other))),
    }
}

/// Parses a Decimal or Float and rounds it to `round` digits (half away from zero, in
/// decimal), returning the `f64` whose shortest text is the rounded decimal.
pub fn parse_number(cell: &Cell<'_>, round: Option<u8>) -> Result<f64, Reason> {
    let finish = |v: f64| if v == 0.0 { 0.0 } else { v };
    let text: std::borrow::Cow<'_, str> = match cell {
        Cell::Int(i) => return Ok(*i as f64),
        Cell::Float(f) => {
            if !f.is_finite() {
                return Err(format!("{f} is not a finite number"));
            }
            if round.is_none() {
                return Ok(finish(*f));
            }
            format!("{f}").into()
        }
        Cell::Decimal { unscaled, scale } => decimal_text(*unscaled, *scale).into(),
        Cell::Str(s) => s.trim().into(),
        other => return Err(format!("{} is not a number", describe(other))),
    };
    // Fast path: plain decimal text that needs no rounding, or rounding on the stack.
    if let Some((_, _, frac)) = split_decimal(&text) {
        let mut buf = [0u8; 64];
        let plain: &str = match round {
            Some(places) if frac.len() > places as usize => {
                match round_decimal_into(&text, places as usize, &mut buf) {
                    Some(r) => r,
                    None => return parse_number_slow(&text, round),
                }
            }
            _ => &text,
        };
        return match plain.parse::<f64>() {
            Ok(v) if v.is_finite() => Ok(finish(v)),
            _ => Err(format!("{text:?} is out of range")),
        };
    }
    parse_number_slow(&text, round)
}

fn parse_number_slow(text: &str, round: Option<u8>) -> Result<f64, Reason> {
    // Exponent forms and the like: let f64 parse them, then continue in decimal.
    let plain = match text.parse::<f64>() {
        Ok(f) if f.is_finite() => format!("{f}"),
        _ => return Err(format!("{text:?} is not a number")),
    };
    let rounded = match round {
        Some(places) => round_decimal(&plain, places as usize).unwrap_or(plain),
        None => plain,
    };
    match rounded.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(if v == 0.0 { 0.0 } else { v }),
        _ => Err(format!("{text:?} is out of range")),
    }
}

/// Splits `[-+]digits[.digits]` into (negative, integer digits, fraction digits).
fn split_decimal(s: &str) -> Option<(bool, &str, &str)> {
    let (neg, body) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let (int, frac) = match body.split_once('.') {
        Some((i, f)) => (i, f),
        None => (body, ""),
    };
    if (int.is_empty() && frac.is_empty())
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    Some((neg, int, frac))
}

/// Rounds a plain decimal string to `places` fraction digits, half away from zero.
pub fn round_decimal(s: &str, places: usize) -> Option<String> {
    let mut buf = vec![0u8; s.len() + 3];
    round_decimal_into(s, places, &mut buf).map(str::to_string)
}

/// [`round_decimal`] into a caller's buffer (`None` when it is too small or `s` is not a
/// plain decimal).
pub fn round_decimal_into<'b>(s: &str, places: usize, buf: &'b mut [u8]) -> Option<&'b str> {
    let (neg, int, frac) = split_decimal(s)?;
    let keep = frac.len().min(places);
    // sign + carry digit + int + '.' + fraction
    let need = 1 + 1 + int.len() + 1 + keep.max(1);
    if buf.len() < need {
        return None;
    }
    // Digits (with one spare leading slot for a carry) at buf[1..].
    let digits_start = 1;
    let mut n = 0;
    buf[digits_start] = b'0';
    n += 1;
    for &b in int.as_bytes().iter().chain(frac.as_bytes()[..keep].iter()) {
        buf[digits_start + n] = b;
        n += 1;
    }
    if frac.len() > places && frac.as_bytes()[places] >= b'5' {
        let mut i = digits_start + n;
        loop {
            i -= 1;
            if buf[i] == b'9' {
                buf[i] = b'0';
            } else {
                buf[i] += 1;
                break;
            }
        }
    }
    let digits = &buf[digits_start..digits_start + n];
    let int_len = n - keep;
    // Strip leading zeros of the integer part (keep one).
    let lead = digits[..int_len - 1]
        .iter()
        .take_while(|&&b| b == b'0')
        .count();
    let mut out = [0u8; 96];
    if n + 2 > out.len() {
        return None;
    }
    let mut len = 0;
    if neg {
        out[0] = b'-';
        len = 1;
    }
    let int_part = &digits[lead..int_len];
    out[len..len + int_part.len()].copy_from_slice(int_part);
    len += int_part.len();
    if keep > 0 {
        out[len] = b'.';
        len += 1;
        out[len..len + keep].copy_from_slice(&digits[int_len..]);
        len += keep;
    }
    buf[..len].copy_from_slice(&out[..len]);
    std::str::from_utf8(&buf[..len]).ok()
}

/// Parses a date: `YYYY-MM-DD` (optionally followed by a time, which is ignored),
/// `YYYY/MM/DD`, `MM/DD/YYYY`, or a typed date/timestamp.
pub fn parse_date(cell: &Cell<'_>) -> Result<NaiveDate, Reason> {
    match cell {
        Cell::Date(d) => Ok(*d),
        Cell::Timestamp(t) => Ok(t.date_naive()),
        Cell::Str(s) => {
            let t = s.trim();
            if let Some(d) = fast_date(t.as_bytes())
                && (t.len() == 10 || (t.len() > 10 && fast_datetime(t.as_bytes()).is_some()))
            {
                return Ok(d);
            }
            let head = t.get(..10).unwrap_or(t);
            let rest = t.get(10..).unwrap_or("");
            if (rest.is_empty() || rest.starts_with('T') || rest.starts_with(' '))
                && let Ok(d) = NaiveDate::parse_from_str(head, "%Y-%m-%d")
                && (rest.is_empty() || parse_datetime(&Cell::Str(t)).is_ok())
            {
                return Ok(d);
            }
            for f in ["%Y/%m/%d", "%m/%d/%Y"] {
                if let Ok(d) = NaiveDate::parse_from_str(t, f) {
                    return Ok(d);
                }
            }
            Err(format!("{t:?} is not a date (YYYY-MM-DD)"))
        }
        other => Err(format!("{} is not a date", describe(other))),
    }
}

/// Parses an instant: RFC 3339 / ISO 8601 with an offset (converted to UTC), a naive
/// `YYYY-MM-DD[ T]HH:MM[:SS[.fff]]` (taken as UTC, as Amperity writes it), a date (midnight
/// UTC), or a typed timestamp.
pub fn parse_datetime(cell: &Cell<'_>) -> Result<DateTime<Utc>, Reason> {
    match cell {
        Cell::Timestamp(t) => Ok(*t),
        Cell::Date(d) => Ok(d.and_time(chrono::NaiveTime::MIN).and_utc()),
        Cell::Str(s) => {
            let t = s.trim();
            if let Some(dt) = fast_datetime(t.as_bytes()) {
                return Ok(dt);
            }
            if let Ok(dt) = DateTime::parse_from_rfc3339(t) {
                return Ok(dt.with_timezone(&Utc));
            }
            for f in [
                "%Y-%m-%dT%H:%M:%S%.f%z",
                "%Y-%m-%d %H:%M:%S%.f%z",
                "%Y-%m-%dT%H:%M:%S%.f %z",
                "%Y-%m-%d %H:%M:%S%.f %z",
            ] {
                if let Ok(dt) = DateTime::parse_from_str(t, f) {
                    return Ok(dt.with_timezone(&Utc));
                }
            }
            let naive = t.strip_suffix(" UTC").unwrap_or(t);
            for f in [
                "%Y-%m-%d %H:%M:%S%.f",
                "%Y-%m-%dT%H:%M:%S%.f",
                "%Y-%m-%d %H:%M",
                "%Y-%m-%dT%H:%M",
            ] {
                if let Ok(dt) = NaiveDateTime::parse_from_str(naive, f) {
                    return Ok(dt.and_utc());
                }
            }
            if let Ok(d) = NaiveDate::parse_from_str(t, "%Y-%m-%d") {
                return Ok(d.and_time(chrono::NaiveTime::MIN).and_utc());
            }
            Err(format!("{t:?} is not a datetime (ISO 8601)"))
        }
        other => Err(format!("{} is not a datetime", describe(other))),
    }
}

/// ISO 8601 UTC as sent to Braze: `2024-01-05T10:00:00Z`, with milliseconds (or finer) only
/// when present.
pub fn iso_utc(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

fn push_num(out: &mut String, v: u32, width: usize) {
    let mut buf = [b'0'; 10];
    let mut x = v;
    let mut i = buf.len();
    while x > 0 || buf.len() - i < width {
        i -= 1;
        buf[i] = b'0' + (x % 10) as u8;
        x /= 10;
        if x == 0 && buf.len() - i >= width {
            break;
        }
    }
    for &b in &buf[i..] {
        out.push(b as char);
    }
}

/// Appends `YYYY-MM-DD`.
pub fn write_date(out: &mut String, d: &NaiveDate) {
    use chrono::Datelike;
    let y = d.year();
    if !(0..=9999).contains(&y) {
        out.push_str(&d.format("%Y-%m-%d").to_string());
        return;
    }
    push_num(out, y as u32, 4);
    out.push('-');
    push_num(out, d.month(), 2);
    out.push('-');
    push_num(out, d.day(), 2);
}

/// Appends [`iso_utc`] of `t` without allocating.
pub fn write_iso_utc(out: &mut String, t: &DateTime<Utc>) {
    use chrono::Timelike;
    let d = t.date_naive();
    use chrono::Datelike;
    if !(0..=9999).contains(&d.year()) {
        out.push_str(&iso_utc(t));
        return;
    }
    write_date(out, &d);
    out.push('T');
    push_num(out, t.hour(), 2);
    out.push(':');
    push_num(out, t.minute(), 2);
    out.push(':');
    push_num(out, t.second(), 2);
    let nanos = t.nanosecond();
    if nanos != 0 {
        out.push('.');
        if nanos.is_multiple_of(1_000_000) {
            push_num(out, nanos / 1_000_000, 3);
        } else if nanos.is_multiple_of(1_000) {
            push_num(out, nanos / 1_000, 6);
        } else {
            push_num(out, nanos, 9);
        }
    }
    out.push('Z');
}

fn digits(b: &[u8]) -> Option<u32> {
    if b.is_empty() || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(b.iter().fold(0u32, |a, &c| a * 10 + u32::from(c - b'0')))
}

/// `YYYY-MM-DD` at the start of `b`.
fn fast_date(b: &[u8]) -> Option<NaiveDate> {
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    NaiveDate::from_ymd_opt(
        digits(&b[..4])? as i32,
        digits(&b[5..7])?,
        digits(&b[8..10])?,
    )
}

/// `YYYY-MM-DD[T ]HH:MM[:SS[.fff]][Z|+HH:MM|-HH:MM|+HHMM]`, the shapes Amperity and ISO 8601
/// writers use; anything else goes to the general parsers.
fn fast_datetime(b: &[u8]) -> Option<DateTime<Utc>> {
    let date = fast_date(b)?;
    if b.len() < 16 || !(b[10] == b'T' || b[10] == b' ') || b[13] != b':' {
        return None;
    }
    let (h, mi) = (digits(&b[11..13])?, digits(&b[14..16])?);
    let mut i = 16;
    let mut sec = 0;
    let mut nanos = 0u32;
    if b.get(i) == Some(&b':') {
        sec = digits(b.get(i + 1..i + 3)?)?;
        i += 3;
        if b.get(i) == Some(&b'.') {
            let start = i + 1;
            let mut end = start;
            while end < b.len() && b[end].is_ascii_digit() {
                end += 1;
            }
            let frac = &b[start..end];
            if frac.is_empty() || frac.len() > 9 {
                return None;
            }
            nanos = digits(frac)? * 10u32.pow(9 - frac.len() as u32);
            i = end;
        }
    }
    let naive = date.and_hms_nano_opt(h, mi, sec, nanos)?;
    let rest = &b[i..];
    let offset_s: i64 = match rest {
        [] | [b'Z'] | [b'z'] => 0,
        [sign @ (b'+' | b'-'), hh1, hh2, b':', mm1, mm2]
        | [sign @ (b'+' | b'-'), hh1, hh2, mm1, mm2] => {
            let hh = i64::from(digits(&[*hh1, *hh2])?);
            let mm = i64::from(digits(&[*mm1, *mm2])?);
            let v = hh * 3600 + mm * 60;
            if *sign == b'-' { -v } else { v }
        }
        _ => return None,
    };
    Some((naive - chrono::Duration::seconds(offset_s)).and_utc())
}

/// Appends a cell's text form (for String/Varchar columns that arrive typed).
pub fn text_of(cell: &Cell<'_>, out: &mut String) {
    use std::fmt::Write;
    match cell {
        Cell::Null => {}
        Cell::Str(s) => out.push_str(s.trim()),
        Cell::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Cell::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Cell::Float(f) => {
            let _ = write!(out, "{f}");
        }
        Cell::Decimal { unscaled, scale } => out.push_str(&decimal_text(*unscaled, *scale)),
        Cell::Date(d) => write_date(out, d),
        Cell::Timestamp(t) => write_iso_utc(out, t),
    }
}

/// Holds `out[start..]` to Braze's 255 characters: `Ok(false)` when it fits, `Ok(true)` when it
/// was cut (truncate policy), `Err` when the reject policy refuses it.
pub fn limit_string(out: &mut String, start: usize, reject: bool) -> Result<bool, Reason> {
    let s = &out[start..];
    if s.len() <= MAX_STRING_CHARS {
        return Ok(false);
    }
    match s.char_indices().nth(MAX_STRING_CHARS) {
        None => Ok(false),
        Some(_) if reject => Err(format!(
            "the value is {} characters, over Braze's {MAX_STRING_CHARS}",
            s.chars().count()
        )),
        Some((cut, _)) => {
            out.truncate(start + cut);
            Ok(true)
        }
    }
}

fn describe(c: &Cell<'_>) -> String {
    match c {
        Cell::Null => "an empty value".into(),
        Cell::Str(s) => format!("{s:?}"),
        Cell::Bool(b) => format!("boolean {b}"),
        Cell::Int(i) => format!("integer {i}"),
        Cell::Float(f) => format!("number {f}"),
        Cell::Decimal { unscaled, scale } => format!("decimal {}", decimal_text(*unscaled, *scale)),
        Cell::Date(d) => format!("date {d}"),
        Cell::Timestamp(t) => format!("timestamp {}", iso_utc(t)),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn booleans_from_amperity_spellings() {
        for t in ["true", "TRUE", "True", "t", "yes", "Y", "1", " on "] {
            assert!(parse_bool(&Cell::Str(t)).unwrap(), "{t}");
        }
        for f in ["false", "FALSE", "f", "no", "N", "0", "off"] {
            assert!(!parse_bool(&Cell::Str(f)).unwrap(), "{f}");
        }
        assert!(parse_bool(&Cell::Str("maybe")).is_err());
    }

    #[test]
    fn decimals_round_in_decimal_without_float_noise() {
        assert_eq!(parse_number(&Cell::Str("2.675"), Some(2)).unwrap(), 2.68);
        assert_eq!(parse_number(&Cell::Str("1.005"), Some(2)).unwrap(), 1.01);
        assert_eq!(parse_number(&Cell::Str("-0.004"), Some(2)).unwrap(), 0.0);
        assert_eq!(parse_number(&Cell::Str("9.999"), Some(2)).unwrap(), 10.0);
        assert_eq!(
            parse_number(&Cell::Float(0.1 + 0.2), Some(2))
                .unwrap()
                .to_string(),
            "0.3"
        );
        assert_eq!(
            parse_number(
                &Cell::Decimal {
                    unscaled: 12345,
                    scale: 3
                },
                None
            )
            .unwrap(),
            12.345
        );
        assert_eq!(parse_number(&Cell::Str("1e3"), None).unwrap(), 1000.0);
        assert!(parse_number(&Cell::Str("NaN"), None).is_err());
        assert!(parse_number(&Cell::Str("12abc"), None).is_err());
    }

    #[test]
    fn integers_accept_integral_decimals_only() {
        assert_eq!(parse_int(&Cell::Str(" 42 ")).unwrap(), 42);
        assert_eq!(parse_int(&Cell::Str("-7.000")).unwrap(), -7);
        assert!(parse_int(&Cell::Str("4.5")).is_err());
        assert!(parse_int(&Cell::Str("forty")).is_err());
    }

    #[test]
    fn dates_and_datetimes_become_iso_utc() {
        let d = parse_date(&Cell::Str("1980-12-21")).unwrap();
        assert_eq!(d.to_string(), "1980-12-21");
        assert_eq!(
            parse_date(&Cell::Str("12/21/1980")).unwrap().to_string(),
            "1980-12-21"
        );
        assert_eq!(
            parse_date(&Cell::Str("1980-12-21 00:00:00.000"))
                .unwrap()
                .to_string(),
            "1980-12-21"
        );
        assert!(parse_date(&Cell::Str("1980-13-01")).is_err());
        let t = parse_datetime(&Cell::Str("2024-03-01T10:00:00+02:00")).unwrap();
        assert_eq!(iso_utc(&t), "2024-03-01T08:00:00Z");
        let t = parse_datetime(&Cell::Str("2024-03-01 10:00:00.250")).unwrap();
        assert_eq!(iso_utc(&t), "2024-03-01T10:00:00.250Z");
        assert!(parse_datetime(&Cell::Str("yesterday")).is_err());
    }

    #[test]
    fn fast_datetime_agrees_with_the_general_parsers() {
        for (input, want) in [
            ("2024-03-01T10:00:00Z", "2024-03-01T10:00:00Z"),
            ("2024-03-01 10:00:00.000", "2024-03-01T10:00:00Z"),
            ("2024-03-01 10:00:00.5", "2024-03-01T10:00:00.500Z"),
            (
                "2024-03-01T10:00:00.123456+02:00",
                "2024-03-01T08:00:00.123456Z",
            ),
            ("2024-03-01T10:00:00-0130", "2024-03-01T11:30:00Z"),
            ("2024-03-01T10:00", "2024-03-01T10:00:00Z"),
            ("2024-12-31T23:30:00-01:00", "2025-01-01T00:30:00Z"),
        ] {
            let t = parse_datetime(&Cell::Str(input)).unwrap();
            assert_eq!(iso_utc(&t), want, "{input}");
            let mut w = String::new();
            write_iso_utc(&mut w, &t);
            assert_eq!(w, want, "{input}");
        }
        assert!(parse_datetime(&Cell::Str("2024-03-01T25:00:00Z")).is_err());
        assert!(parse_date(&Cell::Str("2024-02-30")).is_err());
    }

    #[test]
    fn stack_rounding_matches_the_rules() {
        for (s, p, want) in [
            ("2.675", 2, "2.68"),
            ("-2.675", 2, "-2.68"),
            ("0.995", 2, "1.00"),
            ("99.5", 0, "100"),
            (".5", 0, "1"),
            ("007.123", 1, "7.1"),
            ("-0.004", 2, "-0.00"),
        ] {
            assert_eq!(round_decimal(s, p).unwrap(), want, "{s} {p}");
        }
    }

    #[test]
    fn strings_are_cut_at_255_characters_or_refused() {
        let mut s = "é".repeat(300);
        assert!(limit_string(&mut s.clone(), 0, true).is_err());
        assert!(limit_string(&mut s, 0, false).unwrap());
        assert_eq!(s.chars().count(), 255);
    }

    #[test]
    fn decimal_text_places_the_point() {
        assert_eq!(decimal_text(5, 3), "0.005");
        assert_eq!(decimal_text(-12345, 2), "-123.45");
        assert_eq!(decimal_text(12, -2), "1200");
    }
}
