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
            let t = trim(s);
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
            let t = trim(s);
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
        Cell::Str(s) => trim(s).into(),
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
    // sign + carry digit + digits + '.' + at least one fraction digit (`"0"` with 0 places
    // needs 5 bytes).
    let mut buf = vec![0u8; s.len() + 4];
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
            let t = trim(s);
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
    let t = parse_datetime_any(cell)?;
    // chrono keeps a leap second as second 59 with a nanosecond count past 10^9; Braze has
    // no leap seconds and `…:59.1000Z` would be a wrong instant, so refuse it.
    if chrono::Timelike::nanosecond(&t) >= 1_000_000_000 {
        return Err(format!(
            "{} is a leap second (23:59:60), which Braze cannot store",
            describe(cell)
        ));
    }
    Ok(t)
}

/// Largest UTC offset any time zone uses (±14:00); a larger one is a typo or garbage.
pub const MAX_OFFSET_SECONDS: i32 = 14 * 3600;

fn offset_ok(dt: DateTime<chrono::FixedOffset>, text: &str) -> Result<DateTime<Utc>, Reason> {
    if dt.offset().local_minus_utc().abs() > MAX_OFFSET_SECONDS {
        return Err(format!("{text:?} has a UTC offset beyond ±14:00"));
    }
    Ok(dt.with_timezone(&Utc))
}

fn parse_datetime_any(cell: &Cell<'_>) -> Result<DateTime<Utc>, Reason> {
    match cell {
        Cell::Timestamp(t) => Ok(*t),
        Cell::Date(d) => Ok(d.and_time(chrono::NaiveTime::MIN).and_utc()),
        Cell::Str(s) => {
            let t = trim(s);
            if let Some(dt) = fast_datetime(t.as_bytes()) {
                return Ok(dt);
            }
            general_datetime(t)
        }
        other => Err(format!("{} is not a datetime", describe(other))),
    }
}

/// The general (chrono) datetime parsers, after the fast path.
fn general_datetime(t: &str) -> Result<DateTime<Utc>, Reason> {
    {
        {
            if let Ok(dt) = DateTime::parse_from_rfc3339(t) {
                return offset_ok(dt, t);
            }
            for f in [
                "%Y-%m-%dT%H:%M:%S%.f%z",
                "%Y-%m-%d %H:%M:%S%.f%z",
                "%Y-%m-%dT%H:%M:%S%.f %z",
                "%Y-%m-%d %H:%M:%S%.f %z",
            ] {
                if let Ok(dt) = DateTime::parse_from_str(t, f) {
                    return offset_ok(dt, t);
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
    // ASCII digits: one copy, not a char push per digit.
    out.push_str(std::str::from_utf8(&buf[i..]).unwrap_or_default());
}

/// [`str::trim`], without decoding characters when both ends are visible ASCII (the common
/// case: then nothing is trimmed).
pub fn trim(s: &str) -> &str {
    match (s.as_bytes().first(), s.as_bytes().last()) {
        (Some(a), Some(b)) if a.is_ascii_graphic() && b.is_ascii_graphic() => s,
        _ => s.trim(),
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
    // Years past four digits, and a leap second (never produced by `parse_datetime`, which
    // chrono renders as `:60`), take chrono's path.
    if !(0..=9999).contains(&d.year()) || t.nanosecond() >= 1_000_000_000 {
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
            if mm > 59 || v > i64::from(MAX_OFFSET_SECONDS) {
                // Out of range: the general parsers refuse it with the reason.
                return None;
            }
            if *sign == b'-' { -v } else { v }
        }
        _ => return None,
    };
    Some((naive - chrono::Duration::seconds(offset_s)).and_utc())
}

/// Years Braze stores as dates: outside them a date custom attribute is stored as a string
/// (or not at all), so such a value is refused rather than sent.
pub const BRAZE_YEARS: std::ops::RangeInclusive<i32> = 1..=3000;

/// Refuses a date Braze would not store as a date.
pub fn check_braze_year(d: &NaiveDate) -> Result<(), Reason> {
    use chrono::Datelike;
    if BRAZE_YEARS.contains(&d.year()) {
        Ok(())
    } else {
        Err(format!(
            "{d} is outside the years Braze stores as dates ({}..={})",
            BRAZE_YEARS.start(),
            BRAZE_YEARS.end()
        ))
    }
}

/// Calls of [`latest_dob`] between two reads of the clock.
const CLOCK_EVERY: u32 = 4096;

thread_local! {
    static LATEST_DOB: std::cell::Cell<(u32, NaiveDate)> =
        const { std::cell::Cell::new((0, NaiveDate::MIN)) };
}

/// Tomorrow (UTC), the latest date of birth accepted; the clock is read once per
/// [`CLOCK_EVERY`] rows of a thread, not per row.
fn latest_dob() -> NaiveDate {
    LATEST_DOB.with(|c| {
        let (left, latest) = c.get();
        if left > 0 {
            c.set((left - 1, latest));
            return latest;
        }
        let latest = (Utc::now() + chrono::Duration::days(1)).date_naive();
        c.set((CLOCK_EVERY - 1, latest));
        latest
    })
}

/// Earliest date of birth accepted: anything before is a placeholder (`0000-01-01`,
/// `0001-01-01`), not a birth date.
pub const MIN_DOB_YEAR: i32 = 1800;

/// Refuses a date of birth that is a placeholder or in the future (a day of slack for time
/// zones).
pub fn check_dob(d: &NaiveDate) -> Result<(), Reason> {
    use chrono::Datelike;
    let latest = latest_dob();
    if d.year() < MIN_DOB_YEAR {
        return Err(format!(
            "{d} is not a plausible date of birth (before {MIN_DOB_YEAR})"
        ));
    }
    if *d > latest {
        return Err(format!("{d} is a date of birth in the future"));
    }
    Ok(())
}

/// Appends a cell's text form (for String/Varchar columns that arrive typed).
pub fn text_of(cell: &Cell<'_>, out: &mut String) {
    use std::fmt::Write;
    match cell {
        Cell::Null => {}
        Cell::Str(s) => out.push_str(trim(s)),
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

/// A cell described for a reject reason (`boolean true`, `date 2024-01-01`, ...).
pub fn describe(c: &Cell<'_>) -> String {
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
mod tests;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod props;
