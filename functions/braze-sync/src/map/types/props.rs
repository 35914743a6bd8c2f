//! The hand-written fast paths against chrono and exact integer references.
use super::*;
use chrono::{Datelike, Timelike};
use proptest::prelude::*;

fn pow10(n: u32) -> i128 {
    10i128.pow(n)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn fast_datetime_equals_chrono_on_every_shape_it_takes(
        y in 1i32..=9999, mo in 1u32..=12, d in 1u32..=31, h in 0u32..=23,
        mi in 0u32..=59, sec in 0u32..=59, frac in proptest::option::of("[0-9]{1,9}"),
        sep in prop_oneof![Just('T'), Just(' ')], with_secs in any::<bool>(),
        off in prop_oneof![Just(None), Just(Some((0i32, 0u32, true))),
            (-14i32..=14, 0u32..=59, any::<bool>()).prop_map(Some)],
    ) {
        let Some(date) = NaiveDate::from_ymd_opt(y, mo, d) else { return Ok(()); };
        let frac = if with_secs { frac } else { None };
        let mut s = format!("{y:04}-{mo:02}-{d:02}{sep}{h:02}:{mi:02}");
        if with_secs {
            s.push_str(&format!(":{sec:02}"));
        }
        if let Some(f) = &frac {
            s.push('.');
            s.push_str(f);
        }
        let mut off_s = 0i64;
        match off {
            None => {}
            Some((0, 0, true)) => s.push('Z'),
            Some((hh, mm, colon)) => {
                let sign = if hh < 0 { '-' } else { '+' };
                let (hh, mm) = (hh.unsigned_abs(), mm);
                if colon { s.push_str(&format!("{sign}{hh:02}:{mm:02}")) }
                else { s.push_str(&format!("{sign}{hh:02}{mm:02}")) }
                off_s = i64::from(hh * 3600 + mm * 60) * if sign == '-' { -1 } else { 1 };
            }
        }
        let nanos = frac.as_ref().map_or(0, |f| {
            f.parse::<u32>().unwrap() * 10u32.pow(9 - f.len() as u32)
        });
        let secs = if with_secs { sec } else { 0 };
        let want = (date.and_hms_nano_opt(h, mi, secs, nanos).unwrap()
            - chrono::Duration::seconds(off_s)).and_utc();
        let fast = fast_datetime(s.as_bytes());
        if off_s.abs() > i64::from(MAX_OFFSET_SECONDS) {
            prop_assert_eq!(fast, None, "{}", s);
            prop_assert!(parse_datetime(&Cell::Str(&s)).is_err(), "{}", s);
            return Ok(());
        }
        prop_assert_eq!(fast, Some(want), "{}", s);
        // chrono's own parsers agree wherever they take the shape.
        if let Ok(g) = general_datetime(&s) {
            prop_assert_eq!(g, want, "{}", s);
        }
        // Rendering: the fast writer equals chrono's RFC 3339 text.
        let mut w = String::new();
        write_iso_utc(&mut w, &want);
        prop_assert_eq!(w, iso_utc(&want));
    }

    #[test]
    fn fast_and_general_datetime_never_disagree_on_any_text(s in "[0-9]{4}-[0-9]{2}-[0-9]{2}[T ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\\.[0-9]{0,10})?)?([Zz]|[+-][0-9]{2}:?[0-9]{2})?") {
        let fast = fast_datetime(s.as_bytes());
        if let (Some(f), Ok(g)) = (fast, general_datetime(&s)) {
            prop_assert_eq!(f, g, "{}", s);
        }
        if let Ok(t) = parse_datetime(&Cell::Str(&s)) {
            prop_assert!(t.nanosecond() < 1_000_000_000);
            prop_assert!(t.year() >= 0);
        }
    }

    #[test]
    fn fast_date_equals_chrono(s in "[0-9]{4}-[0-9]{2}-[0-9]{2}") {
        prop_assert_eq!(fast_date(s.as_bytes()), NaiveDate::parse_from_str(&s, "%Y-%m-%d").ok(), "{}", s);
    }

    #[test]
    fn stack_rounding_equals_exact_integer_rounding(
        neg in any::<bool>(), int in "[0-9]{0,12}", frac in "[0-9]{0,12}", places in 0usize..=12,
    ) {
        prop_assume!(!(int.is_empty() && frac.is_empty()));
        let s = format!("{}{int}{}{frac}", if neg { "-" } else { "" }, if frac.is_empty() { "" } else { "." });
        let v: i128 = format!("{int}{frac}").parse::<i128>().unwrap_or(0);
        let f = frac.len();
        let keep = f.min(places);
        let q = if f > places {
            let div = pow10((f - places) as u32);
            let (q, r) = (v / div, v % div);
            if r * 2 >= div { q + 1 } else { q }
        } else { v };
        let digits = format!("{q:0>width$}", width = keep + 1);
        let (i, fr) = digits.split_at(digits.len() - keep);
        let want = format!("{}{i}{}{fr}", if neg { "-" } else { "" }, if keep > 0 { "." } else { "" });
        prop_assert_eq!(round_decimal(&s, places).unwrap(), want, "{} {}", s, places);
    }

    #[test]
    fn decimal_text_is_exact(unscaled in any::<i64>(), scale in -6i8..=20) {
        let t = decimal_text(i128::from(unscaled), scale);
        if scale <= 0 {
            let want = if unscaled == 0 { 0 } else { i128::from(unscaled) * pow10(u32::from(scale.unsigned_abs())) };
            prop_assert_eq!(t, want.to_string());
        } else {
            let (i, f) = t.split_once('.').unwrap();
            prop_assert_eq!(f.len(), scale as usize);
            let back: i128 = format!("{i}{f}").parse().unwrap();
            prop_assert_eq!(back, i128::from(unscaled));
        }
    }

    #[test]
    fn number_fast_path_equals_exact_rounding_then_f64(
        neg in any::<bool>(), int in "[0-9]{1,10}", frac in "[0-9]{0,10}", places in proptest::option::of(0u8..=12),
    ) {
        let s = format!("{}{int}.{frac}0", if neg { "-" } else { "" });
        let fast = parse_number(&Cell::Str(&s), places).unwrap();
        let exact = match places {
            Some(p) => round_decimal(&s, p as usize).unwrap(),
            None => s.clone(),
        };
        let want = exact.parse::<f64>().unwrap();
        let want = if want == 0.0 { 0.0 } else { want };
        prop_assert_eq!(fast.to_bits(), want.to_bits(), "{} {:?}", s, places);
    }
}
