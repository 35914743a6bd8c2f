//! Amperity's column types (Boolean, Date, Datetime, Decimal, Float, Integer, String, Varchar)
//! and how a cell of each becomes the value Braze receives: booleans from every spelling
//! Amperity writes, integers as JSON integers, decimals and floats rounded in *decimal* (so
//! `2.675` rounds to `2.68` and nothing prints as `0.30000000000000004`), dates and datetimes
//! as ISO 8601 UTC, strings trimmed and held to 255 characters.

use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, Utc};
use serde::Deserialize;

use crate::read::Cell;

/// An Amperity column type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AmperityType {
    /// true/false.
    #[serde(alias = "boolean", alias = "BOOLEAN")]
    Boolean,
    /// A calendar date, sent as `YYYY-MM-DDT00:00:00Z`.
    #[serde(alias = "date", alias = "DATE")]
    Date,
    /// An instant, sent as ISO 8601 UTC.
    #[serde(alias = "datetime", alias = "DATETIME", alias = "Timestamp", alias = "timestamp")]
    Datetime,
    /// An exact decimal number, sent as a JSON number without float noise.
    #[serde(alias = "decimal", alias = "DECIMAL")]
    Decimal,
    /// A floating-point number.
    #[serde(alias = "float", alias = "FLOAT", alias = "Double", alias = "double")]
    Float,
    /// A 64-bit integer.
    #[serde(alias = "integer", alias = "INTEGER", alias = "Int", alias = "int")]
    Integer,
    /// Text.
    #[serde(alias = "string", alias = "STRING")]
    String,
    /// Text (Amperity's name for bounded strings).
    #[serde(alias = "varchar", alias = "VARCHAR")]
    Varchar,
}

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
                Err(format!("{t:?} is not a boolean (true/false, t/f, yes/no, y/n, 1/0)"))
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
    let text: std::borrow::Cow<'_, str> = match cell {
        Cell::Int(i) => return Ok(*i as f64),
        Cell::Float(f) => {
            if !f.is_finite() {
                return Err(format!("{f} is not a finite number"));
            }
            format!("{f}").into()
        }
        Cell::Decimal { unscaled, scale } => decimal_text(*unscaled, *scale).into(),
        Cell::Str(s) => s.trim().into(),
        other => return Err(format!("{} is not a number", describe(other))),
    };
    let mut plain: String = text.to_string();
    if split_decimal(&plain).is_none() {
        // Exponent forms and the like: let f64 parse them, then continue in decimal.
        match plain.parse::<f64>() {
            Ok(f) if f.is_finite() => plain = format!("{f}"),
            _ => return Err(format!("{text:?} is not a number")),
        }
    }
    let rounded = match round {
        Some(places) => round_decimal(&plain, places as usize).unwrap_or(plain),
        None => plain,
    };
    let v: f64 = rounded
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if !v.is_finite() {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(if v == 0.0 { 0.0 } else { v })
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
    let (neg, int, frac) = split_decimal(s)?;
    if frac.len() <= places {
        return Some(s.to_string());
    }
    let mut digits: Vec<u8> = int.bytes().chain(frac.bytes().take(places)).collect();
    let round_up = frac.as_bytes()[places] >= b'5';
    if round_up {
        let mut i = digits.len();
        loop {
            if i == 0 {
                digits.insert(0, b'1');
                break;
            }
            i -= 1;
            if digits[i] == b'9' {
                digits[i] = b'0';
            } else {
                digits[i] += 1;
                break;
            }
        }
    }
    let int_len = digits.len() - places;
    let mut out = String::with_capacity(digits.len() + 2);
    if neg {
        out.push('-');
    }
    if int_len == 0 {
        out.push('0');
    } else {
        out.push_str(std::str::from_utf8(&digits[..int_len]).ok()?);
    }
    if places > 0 {
        out.push('.');
        out.push_str(std::str::from_utf8(&digits[int_len..]).ok()?);
    }
    Some(out)
}

/// The text of `unscaled × 10^-scale`.
pub fn decimal_text(unscaled: i128, scale: i8) -> String {
    if scale <= 0 {
        let mut s = unscaled.to_string();
        if unscaled != 0 {
            s.extend(std::iter::repeat_n('0', (-scale) as usize));
        }
        return s;
    }
    let scale = scale as usize;
    let neg = unscaled < 0;
    let digits = unscaled.unsigned_abs().to_string();
    let padded = if digits.len() <= scale {
        format!("{}{digits}", "0".repeat(scale + 1 - digits.len()))
    } else {
        digits
    };
    let (i, f) = padded.split_at(padded.len() - scale);
    format!("{}{i}.{f}", if neg { "-" } else { "" })
}

/// Parses a date: `YYYY-MM-DD` (optionally followed by a time, which is ignored),
/// `YYYY/MM/DD`, `MM/DD/YYYY`, or a typed date/timestamp.
pub fn parse_date(cell: &Cell<'_>) -> Result<NaiveDate, Reason> {
    match cell {
        Cell::Date(d) => Ok(*d),
        Cell::Timestamp(t) => Ok(t.date_naive()),
        Cell::Str(s) => {
            let t = s.trim();
            let head = t.get(..10).unwrap_or(t);
            let rest = t.get(10..).unwrap_or("");
            if (rest.is_empty() || rest.starts_with('T') || rest.starts_with(' '))
                && let Ok(d) = NaiveDate::parse_from_str(head, "%Y-%m-%d")
            {
                if rest.is_empty() || parse_datetime(&Cell::Str(t)).is_ok() {
                    return Ok(d);
                }
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
        Cell::Date(d) => {
            let _ = write!(out, "{}", d.format("%Y-%m-%d"));
        }
        Cell::Timestamp(t) => out.push_str(&iso_utc(t)),
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
            parse_number(&Cell::Float(0.1 + 0.2), Some(2)).unwrap().to_string(),
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
            parse_date(&Cell::Str("1980-12-21 00:00:00.000")).unwrap().to_string(),
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
