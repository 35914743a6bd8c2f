//! Braze standard profile fields: which ones a route may map, how each value is normalized
//! to what Braze accepts (`dob` as `YYYY-MM-DD`, `gender` and subscription states to Braze's
//! enumerations, `country` to ISO-3166 alpha-2, `language` to ISO-639-1, `time_zone` to an
//! IANA name), and the other names people give them (`birthday`, `e-mail`, `first name`,
//! `phone_number`, ...) so a custom attribute cannot duplicate one by accident.

use std::str::FromStr;

use chrono_tz::Tz;

use super::types::{self, Reason};
use crate::vocab::Cell;
pub use crate::vocab::{StandardField, reserved_key, squash, standard_synonym};

/// What a normalized standard value is.
#[derive(Debug, Clone, PartialEq)]
pub enum StdValue {
    /// Nothing (the field is removed when it was set).
    Null,
    /// A boolean.
    Bool(bool),
    /// Text appended to the caller's buffer.
    Text,
}

impl StandardField {
    /// Normalizes a cell for this field. Text goes to the end of `out`; `truncate` says
    /// whether an over-long string is cut (else refused).
    pub fn normalize(
        self,
        cell: &Cell<'_>,
        out: &mut String,
        truncate: bool,
    ) -> Result<StdValue, Reason> {
        if matches!(cell, Cell::Null) {
            return Ok(StdValue::Null);
        }
        let start = out.len();
        match self {
            StandardField::FirstName
            | StandardField::LastName
            | StandardField::HomeCity
            | StandardField::Phone => {
                types::text_of(cell, out);
            }
            StandardField::Email => {
                types::text_of(cell, out);
                if !plausible_email(&out[start..]) {
                    let bad = out[start..].to_string();
                    out.truncate(start);
                    return Err(format!("{bad:?} is not a valid email address"));
                }
            }
            StandardField::Dob => {
                let d = types::parse_date(cell)?;
                types::check_dob(&d)?;
                types::write_date(out, &d);
            }
            StandardField::DateOfFirstSession
            | StandardField::DateOfLastSession
            | StandardField::MarkedEmailAsSpamAt => {
                let t = types::parse_datetime(cell)?;
                types::check_braze_year(&t.date_naive())?;
                types::write_iso_utc(out, &t);
            }
            StandardField::EmailOpenTrackingDisabled
            | StandardField::EmailClickTrackingDisabled => {
                return types::parse_bool(cell).map(StdValue::Bool);
            }
            StandardField::Gender => match gender(&text(cell))? {
                Some(g) => out.push_str(g),
                None => return Ok(StdValue::Null),
            },
            StandardField::EmailSubscribe | StandardField::PushSubscribe => {
                out.push_str(subscription(cell)?);
            }
            StandardField::Country => out.push_str(country(&text(cell))?),
            StandardField::Language => out.push_str(language(&text(cell))?),
            StandardField::TimeZone => out.push_str(time_zone(&text(cell))?),
        }
        if out.len() == start {
            return Ok(StdValue::Null);
        }
        // A value with a format (an email address, a phone number) is never cut: a cut email
        // has no domain left. `string_policy = "truncate"` applies to free text only.
        let formatted = matches!(self, StandardField::Email | StandardField::Phone);
        types::limit_string(out, start, formatted || !truncate)?;
        Ok(StdValue::Text)
    }
}

fn text<'c>(cell: &Cell<'c>) -> std::borrow::Cow<'c, str> {
    match cell {
        Cell::Str(s) => std::borrow::Cow::Borrowed(types::trim(s)),
        other => {
            let mut s = String::new();
            types::text_of(other, &mut s);
            std::borrow::Cow::Owned(s)
        }
    }
}

/// A short key squashed on the stack (lowercase ASCII letters and digits), `None` when `s` is
/// long or not ASCII.
struct Squashed {
    buf: [u8; 32],
    len: usize,
}

impl Squashed {
    fn new(s: &str) -> Option<Squashed> {
        let mut q = Squashed {
            buf: [0; 32],
            len: 0,
        };
        for &b in s.as_bytes() {
            if !b.is_ascii() {
                return None;
            }
            if b.is_ascii_alphanumeric() {
                *q.buf.get_mut(q.len)? = b.to_ascii_lowercase();
                q.len += 1;
            }
        }
        Some(q)
    }

    fn as_str(&self) -> &str {
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }
}

fn with_squashed<T>(s: &str, f: impl FnOnce(&str) -> T) -> T {
    match Squashed::new(s) {
        Some(q) => f(q.as_str()),
        None => f(&squash(s)),
    }
}

fn plausible_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !s.chars().any(char::is_whitespace)
}

/// Braze's gender letters: `M`, `F`, `O` (other), `N` (not applicable), `P` (prefer not to
/// say); `U`/`unknown` is no value.
pub fn gender(s: &str) -> Result<Option<&'static str>, Reason> {
    Ok(Some(match with_squashed(s, gender_word) {
        Some(Some(g)) => g,
        Some(None) => return Ok(None),
        None => {
            return Err(format!(
                "{s:?} is not a gender Braze accepts (M, F, O, N, P or unknown)"
            ));
        }
    }))
}

fn gender_word(w: &str) -> Option<Option<&'static str>> {
    Some(Some(match w {
        "m" | "male" | "man" => "M",
        "f" | "female" | "woman" => "F",
        "o" | "other" | "x" | "nonbinary" | "diverse" => "O",
        "n" | "na" | "notapplicable" => "N",
        "p" | "prefernottosay" | "declined" | "prefernot" => "P",
        "u" | "unknown" | "" => return Some(None),
        _ => return None,
    }))
}

/// `email_subscribe` / `push_subscribe`: `opted_in`, `subscribed` or `unsubscribed`, in any
/// case and with any punctuation (`Opted-In`, `opt in`, `OPTIN`); a yes is an explicit
/// opt-in (`true`, `yes`, `y`, `t`, `1` → `opted_in`), a no an opt-out (`false`, `no`, `n`,
/// `f`, `0`, `opted_out`, `opt-out`, `unsubscribe` → `unsubscribed`). Anything else is refused.
pub fn subscription(cell: &Cell<'_>) -> Result<&'static str, Reason> {
    if let Cell::Bool(b) = cell {
        return Ok(if *b { "opted_in" } else { "unsubscribed" });
    }
    let s = text(cell);
    with_squashed(&s, |w| match w {
        "optedin" | "optin" | "true" | "yes" | "y" | "t" | "1" => Some("opted_in"),
        "subscribed" => Some("subscribed"),
        w if is_no(w) => Some("unsubscribed"),
        _ => None,
    })
    .ok_or_else(|| {
        format!(
            "{s:?} is not a subscription state (opted_in, subscribed or unsubscribed; also true/false, yes/no, opt-in/opt-out)"
        )
    })
}

/// A subscription group's state: `subscribed` (also `true`, `yes`, `y`, `t`, `1`, `opted_in`,
/// `opt-in`, `subscribe`) or `unsubscribed` (also `false`, `no`, `n`, `f`, `0`, `opted_out`,
/// `opt-out`, `unsubscribe`), in any case and punctuation. Anything else is refused.
pub fn group_state(cell: &Cell<'_>) -> Result<&'static str, Reason> {
    if let Cell::Bool(b) = cell {
        return Ok(if *b { "subscribed" } else { "unsubscribed" });
    }
    let s = text(cell);
    with_squashed(&s, |w| match w {
        "subscribed" | "subscribe" | "optedin" | "optin" | "true" | "yes" | "y" | "t" | "1" => {
            Some("subscribed")
        }
        w if is_no(w) => Some("unsubscribed"),
        _ => None,
    })
    .ok_or_else(|| {
        format!(
            "{s:?} is not a subscription group state (subscribed or unsubscribed; also true/false, yes/no, opt-in/opt-out)"
        )
    })
}

/// The squashed spellings of an opt-out.
fn is_no(w: &str) -> bool {
    matches!(
        w,
        "unsubscribed" | "unsubscribe" | "optedout" | "optout" | "false" | "no" | "n" | "f" | "0"
    )
}

/// Slots of [`memo`]'s table (per thread).
const MEMO_SLOTS: usize = 256;
/// Longest spelling [`memo`] keeps.
const MEMO_MAX_LEN: usize = 48;

type MemoSlot = Option<(u8, Box<str>, &'static str)>;

thread_local! {
    static MEMO: std::cell::RefCell<Vec<MemoSlot>> =
        std::cell::RefCell::new(vec![None; MEMO_SLOTS]);
}

/// `lookup(s)`, remembered per thread for recent spellings: an export repeats a few country,
/// language and time-zone spellings millions of times, and each lookup hashes the text
/// through a table (and may copy it). `table` names the lookup; only successes are kept.
fn memo(
    table: u8,
    s: &str,
    lookup: fn(&str) -> Result<&'static str, Reason>,
) -> Result<&'static str, Reason> {
    if s.len() > MEMO_MAX_LEN {
        return lookup(s);
    }
    let at = (xxhash_rust::xxh3::xxh3_64(s.as_bytes()) as usize ^ usize::from(table)) % MEMO_SLOTS;
    let hit = MEMO.with(|m| {
        m.borrow()
            .get(at)
            .and_then(|e| e.as_ref())
            .filter(|(t, key, _)| *t == table && &**key == s)
            .map(|(_, _, v)| *v)
    });
    if let Some(v) = hit {
        return Ok(v);
    }
    let v = lookup(s)?;
    MEMO.with(|m| {
        if let Some(e) = m.borrow_mut().get_mut(at) {
            *e = Some((table, s.into(), v));
        }
    });
    Ok(v)
}

/// ISO-3166-1 alpha-2 from an alpha-2, alpha-3, numeric code or English name.
pub fn country(s: &str) -> Result<&'static str, Reason> {
    memo(0, s, country_lookup)
}

fn country_lookup(s: &str) -> Result<&'static str, Reason> {
    let t = types::trim(s);
    if t.eq_ignore_ascii_case("uk") {
        return Ok("GB");
    }
    let found = celes::Country::from_alpha2(t)
        .or_else(|_| celes::Country::from_alpha3(t))
        .or_else(|_| celes::Country::from_str(t))
        .or_else(|_| celes::Country::from_str(&squash(t)));
    match found {
        Ok(c) => Ok(c.alpha2),
        Err(_) => Err(format!("{t:?} is not an ISO-3166 country")),
    }
}

/// ISO-639-1 from a 639-1 or 639-3 code, a locale (`en_US`, `pt-BR`) or an English name.
pub fn language(s: &str) -> Result<&'static str, Reason> {
    memo(1, s, language_lookup)
}

fn language_lookup(s: &str) -> Result<&'static str, Reason> {
    let t = types::trim(s);
    let primary = t.split(['-', '_', '.']).next().unwrap_or(t);
    let mut low = [0u8; 3];
    let primary: &str = if primary.len() <= 3 && primary.is_ascii() {
        low[..primary.len()].copy_from_slice(primary.as_bytes());
        low.make_ascii_lowercase();
        std::str::from_utf8(&low[..primary.len()]).unwrap_or("")
    } else {
        ""
    };
    let lang = isolang::Language::from_639_1(primary)
        .or_else(|| isolang::Language::from_639_3(primary))
        .or_else(|| {
            let mut name: String = t.to_lowercase();
            if let Some(first) = name.get(..1) {
                name = first.to_uppercase() + name.get(1..).unwrap_or("");
            }
            isolang::Language::from_name(&name)
        });
    match lang.and_then(|l| l.to_639_1()) {
        Some(code) => Ok(code),
        None => Err(format!("{t:?} is not a language with an ISO-639-1 code")),
    }
}

/// The IANA name of a time zone (exact, else case-insensitive).
pub fn time_zone(s: &str) -> Result<&'static str, Reason> {
    memo(2, s, time_zone_lookup)
}

fn time_zone_lookup(s: &str) -> Result<&'static str, Reason> {
    let t = types::trim(s);
    if let Ok(tz) = Tz::from_str(t) {
        return Ok(tz.name());
    }
    chrono_tz::TZ_VARIANTS
        .iter()
        .find(|tz| tz.name().eq_ignore_ascii_case(t))
        .map(|tz| tz.name())
        .ok_or_else(|| format!("{t:?} is not an IANA time zone"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn remembered_lookups_answer_as_the_tables_do() {
        // Twice each (the second from the memo), mixed so slots are shared and replaced.
        let spellings = [
            "US",
            "usa",
            "France",
            "xx",
            "en",
            "en_US",
            "fr-FR",
            "klingon",
            "Europe/Paris",
            "america/los_angeles",
            "Mars/Base",
            " GB ",
            "uk",
        ];
        for _ in 0..2 {
            for s in spellings {
                assert_eq!(country(s), country_lookup(s), "{s:?}");
                assert_eq!(language(s), language_lookup(s), "{s:?}");
                assert_eq!(time_zone(s), time_zone_lookup(s), "{s:?}");
            }
        }
        assert_eq!(country("usa"), Ok("US"));
        assert_eq!(time_zone("america/los_angeles"), Ok("America/Los_Angeles"));
        assert!(language("klingon").is_err());
    }

    fn norm(f: StandardField, v: &str) -> Result<Option<String>, Reason> {
        let mut out = String::new();
        match f.normalize(&Cell::Str(v), &mut out, true)? {
            StdValue::Text => Ok(Some(out)),
            StdValue::Bool(b) => Ok(Some(b.to_string())),
            StdValue::Null => Ok(None),
        }
    }

    #[test]
    fn dob_is_yyyy_mm_dd() {
        assert_eq!(
            norm(StandardField::Dob, "1980-12-21T00:00:00Z").unwrap(),
            Some("1980-12-21".into())
        );
        assert!(norm(StandardField::Dob, "21st Dec").is_err());
    }

    #[test]
    fn enumerations_are_normalized() {
        assert_eq!(
            norm(StandardField::Gender, "Female").unwrap(),
            Some("F".into())
        );
        assert_eq!(
            norm(StandardField::Gender, "prefer not to say").unwrap(),
            Some("P".into())
        );
        assert_eq!(norm(StandardField::Gender, "unknown").unwrap(), None);
        assert!(norm(StandardField::Gender, "zebra").is_err());
        assert_eq!(
            norm(StandardField::EmailSubscribe, "Opted-In").unwrap(),
            Some("opted_in".into())
        );
        assert_eq!(
            norm(StandardField::PushSubscribe, "false").unwrap(),
            Some("unsubscribed".into())
        );
    }

    #[test]
    fn consent_spellings_are_normalized_and_others_refused() {
        for (v, want) in [
            ("OPTED_IN", "opted_in"),
            ("opted-in", "opted_in"),
            ("optin", "opted_in"),
            ("Yes", "opted_in"),
            ("Subscribed", "subscribed"),
            ("opt-out", "unsubscribed"),
            ("0", "unsubscribed"),
        ] {
            assert_eq!(subscription(&Cell::Str(v)), Ok(want), "{v}");
        }
        assert_eq!(subscription(&Cell::Bool(true)), Ok("opted_in"));
        let err = subscription(&Cell::Str("maybe")).unwrap_err();
        assert!(
            err.contains("\"maybe\" is not a subscription state"),
            "{err}"
        );
        for (v, want) in [
            ("SUBSCRIBED", "subscribed"),
            ("opt-in", "subscribed"),
            ("TRUE", "subscribed"),
            ("Unsubscribed", "unsubscribed"),
            ("no", "unsubscribed"),
        ] {
            assert_eq!(group_state(&Cell::Str(v)), Ok(want), "{v}");
        }
        assert_eq!(group_state(&Cell::Bool(false)), Ok("unsubscribed"));
        assert!(group_state(&Cell::Str("opted_in_maybe")).is_err());
    }

    #[test]
    fn country_language_and_time_zone_become_codes() {
        assert_eq!(
            norm(StandardField::Country, "usa").unwrap(),
            Some("US".into())
        );
        assert_eq!(
            norm(StandardField::Country, "United Kingdom").unwrap(),
            Some("GB".into())
        );
        assert_eq!(
            norm(StandardField::Country, "de").unwrap(),
            Some("DE".into())
        );
        assert!(norm(StandardField::Country, "Atlantis").is_err());
        assert_eq!(
            norm(StandardField::Language, "en_US").unwrap(),
            Some("en".into())
        );
        assert_eq!(
            norm(StandardField::Language, "French").unwrap(),
            Some("fr".into())
        );
        assert_eq!(
            norm(StandardField::Language, "deu").unwrap(),
            Some("de".into())
        );
        assert!(norm(StandardField::Language, "klingonish").is_err());
        assert_eq!(
            norm(StandardField::TimeZone, "america/new_york").unwrap(),
            Some("America/New_York".into())
        );
        assert!(norm(StandardField::TimeZone, "Mars/Base").is_err());
    }

    #[test]
    fn synonyms_name_the_standard_field() {
        for (n, f) in [
            ("birthday", "dob"),
            ("date_of_birth", "dob"),
            ("e-mail", "email"),
            ("first name", "first_name"),
            ("phone_number", "phone"),
            ("TimeZone", "time_zone"),
        ] {
            assert_eq!(standard_synonym(n).unwrap().name(), f, "{n}");
        }
        assert_eq!(standard_synonym("loyalty_tier"), None);
    }

    #[test]
    fn emails_are_checked() {
        assert_eq!(
            norm(StandardField::Email, " ada@example.com ").unwrap(),
            Some("ada@example.com".into())
        );
        assert!(norm(StandardField::Email, "not an email").is_err());
    }
}
