use super::*;

#[test]
fn a_date_of_birth_in_the_future_is_refused_on_every_call() {
    // The clock is read once per CLOCK_EVERY calls: every call still judges by it.
    let today = Utc::now().date_naive();
    let next_week = today + chrono::Duration::days(7);
    for _ in 0..(2 * CLOCK_EVERY + 3) {
        assert!(check_dob(&today).is_ok());
        let e = check_dob(&next_week).unwrap_err();
        assert!(e.contains("in the future"), "{e}");
    }
    assert!(check_dob(&NaiveDate::from_ymd_opt(1799, 12, 31).unwrap()).is_err());
}

#[test]
fn the_fast_trim_is_str_trim() {
    for s in [
        "",
        " ",
        "a",
        " a",
        "a ",
        "\u{a0}x\u{3000}",
        "é",
        " é ",
        "\tx\n",
        "x\u{2003}",
        "ab",
        "\u{85}",
        "~!",
        "a b",
    ] {
        assert_eq!(trim(s), s.trim(), "{s:?}");
    }
}

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
