//! Route configs: what is refused (unknown keys, custom attributes that duplicate a standard
//! field under another name, bad types, rounding, identifiers, delimiters), the demo routes
//! load, and the README's config reference matches the doc comments in `src/config/route.rs`
//! (regenerate it with `UPDATE_README=1 cargo test -p braze-sync --test it route_config`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use braze_sync::config::route::{Route, RouteError};

const BASE: &str =
    "name = \"c\"\nprefix = \"p/\"\n[identifier]\nkind = \"external_id\"\ncolumn = \"id\"\n";

fn refuse(extra: &str) -> RouteError {
    Route::from_toml(&format!("{BASE}{extra}"), "routes/c.toml").unwrap_err()
}

fn refuse_top(top: &str, rest: &str) -> RouteError {
    Route::from_toml(
        &format!("name = \"c\"\nprefix = \"p/\"\n{top}\n[identifier]\nkind = \"external_id\"\ncolumn = \"id\"\n{rest}"),
        "routes/c.toml",
    )
    .unwrap_err()
}

#[test]
fn a_custom_attribute_duplicating_a_standard_field_is_refused_naming_it() {
    for (attr, standard) in [
        ("[attributes.birthday]\ntype = \"Date\"\n", "dob"),
        (
            "[attributes.bd]\nname = \"date_of_birth\"\ntype = \"Date\"\n",
            "dob",
        ),
        (
            "[attributes.mail]\nname = \"e-mail\"\ntype = \"String\"\n",
            "email",
        ),
        (
            "[attributes.\"first name\"]\ntype = \"String\"\n",
            "first_name",
        ),
        ("[attributes.phone_number]\ntype = \"String\"\n", "phone"),
        ("[attributes.Surname]\ntype = \"String\"\n", "last_name"),
        (
            "[attributes.tz]\nname = \"timezone\"\ntype = \"String\"\n",
            "time_zone",
        ),
        ("[[audiences]]\nattribute = \"Email Address\"\n", "email"),
    ] {
        let err = refuse(attr);
        match &err {
            RouteError::DuplicatesStandardField { standard: s, .. } => {
                assert_eq!(s, standard, "{attr}")
            }
            other => panic!("{attr}: {other}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(&format!("`{standard}`")), "{msg}");
        assert!(msg.contains("routes/c.toml"), "{msg}");
    }
}

#[test]
fn unknown_keys_are_refused_naming_the_key() {
    for (extra, key) in [
        ("colour = \"red\"\n", "colour"),
        (
            "[attributes.x]\ntype = \"String\"\nrounding = 2\n",
            "rounding",
        ),
        (
            "[[audiences]]\nattribute = \"a\"\nwhen_leaving = \"false\"\n",
            "when_leaving",
        ),
    ] {
        let msg = refuse(extra).to_string();
        assert!(msg.contains(key), "{key}: {msg}");
    }
    let msg = Route::from_toml(
        "name = \"c\"\nprefix = \"p/\"\n[identifier]\nkind = \"external_id\"\ncolumn = \"id\"\nlabel = \"x\"\n",
        "t",
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("label"), "{msg}");
}

#[test]
fn invalid_values_are_refused_with_a_message_naming_the_key() {
    for (extra, needle) in [
        ("[fields]\nx = \"favourite_colour\"\n", "fields.x"),
        ("[attributes.x]\ntype = \"Money\"\n", "Money"),
        (
            "[attributes.x]\ntype = \"Integer\"\nround = 2\n",
            "attributes.x.round",
        ),
        (
            "[attributes.x]\ntype = \"Decimal\"\nround = 20\n",
            "out of range",
        ),
        (
            "[attributes.x]\nname = \"external_id\"\ntype = \"String\"\n",
            "reserved",
        ),
        ("[attributes.x]\nname = \"$x\"\ntype = \"String\"\n", "'$'"),
        (
            "[attributes.x]\nname = \"tier\"\ntype = \"String\"\n[attributes.y]\nname = \"tier\"\ntype = \"String\"\n",
            "more than one column",
        ),
        (
            "[[audiences]]\nattribute = \"a\"\non_leave = \"later\"\n",
            "later",
        ),
    ] {
        let msg = refuse(extra).to_string();
        assert!(msg.contains(needle), "{needle}: {msg}");
    }
    for (top, needle) in [
        ("format = \"delimited\"", "delimiter"),
        (
            "format = \"delimited\"\ndelimiter = \"||\"",
            "one ASCII character",
        ),
        ("delimiter = \";\"", "only used with"),
        ("format = \"xml\"", "xml"),
        ("compression = \"bzip2\"", "bzip2"),
        ("mode = \"sometimes\"", "sometimes"),
        ("string_policy = \"shout\"", "shout"),
    ] {
        let msg = refuse_top(top, "").to_string();
        assert!(msg.contains(needle), "{needle}: {msg}");
    }
    let msg = Route::from_toml(
        "name = \"Bad Name\"\nprefix = \"p/\"\n[identifier]\nkind = \"external_id\"\ncolumn = \"id\"\n",
        "t",
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("name"), "{msg}");
    let msg = Route::from_toml(
        "name = \"c\"\nprefix = \"p/\"\n[identifier]\nkind = \"user_alias\"\ncolumn = \"a\"\n",
        "t",
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("alias_label"), "{msg}");
    let msg = Route::from_toml(
        "name = \"c\"\nprefix = \"p/\"\n[identifier]\nkind = \"external_id\"\ncolumn = \"a\"\nalias_label = \"x\"\n",
        "t",
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("only for kind"), "{msg}");
}

#[test]
fn order_and_departure_settings_are_checked_naming_the_key() {
    for (top, rest, needle) in [
        ("order_by = \"key\"", "", "needs key_time_format"),
        (
            "order_by = \"key\"\nkey_time_format = \"x_%Y.csv\"",
            "",
            "full date",
        ),
        (
            "key_time_format = \"x_%Y%m%d.csv\"",
            "",
            "only used with order_by",
        ),
        ("max_future_skew = \"soon\"", "", "max_future_skew"),
        ("max_departure_share = 1.5", "", "max_departure_share = 1.5"),
        (
            "",
            "[[audiences]]\nattribute = \"aud_x\"\nmax_departure_share = -0.1\n",
            "aud_x",
        ),
    ] {
        let msg = refuse_top(top, rest).to_string();
        assert!(msg.contains(needle), "{top} {rest}: {msg}");
    }
    let ok = Route::from_toml(
        &format!("{BASE}order_by = \"metadata\"\nmax_future_skew = \"30m\"\n"),
        "t",
    );
    assert!(
        ok.is_err(),
        "top-level keys after [identifier] belong to it"
    );
    let r = Route::from_toml(
        "name = \"c\"\nprefix = \"p/\"\norder_by = \"metadata\"\nmax_future_skew = \"30m\"\nmax_departure_share = 0.05\n[identifier]\nkind = \"external_id\"\ncolumn = \"id\"\n",
        "t",
    )
    .unwrap();
    assert_eq!(r.export_order().max_future_skew.as_secs(), 1800);
    assert_eq!(r.config.max_departure_share, 0.05);
}

#[test]
fn every_demo_route_loads() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("routes");
    let routes = braze_sync::config::env::load_routes_dir(&dir).unwrap();
    let c = routes.iter().find(|r| r.name() == "customers").unwrap();
    assert_eq!(c.config.prefix, "amperity/customers/");
    assert!(c.slots.len() >= 15);
    assert!(c.binding().marker_suffix.is_none());
}

/// The doc comments of the config structs in `src/config/route.rs`, as markdown tables.
fn reference_from_source() -> String {
    let src = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/config/route.rs"),
    )
    .unwrap();
    let sections = [
        ("RouteConfig", "Top level"),
        ("IdentifierConfig", "`[identifier]`"),
        ("AttributeConfig", "`[attributes.<column>]`"),
        ("AudienceConfig", "`[[audiences]]`"),
        ("LimitsConfig", "`[limits]`"),
    ];
    let mut out = String::new();
    for (name, title) in sections {
        let start = src
            .find(&format!("pub struct {name} {{"))
            .unwrap_or_else(|| panic!("struct {name} not found"));
        let body = &src[start..];
        let body = &body[..body.find("\n}").unwrap()];
        out.push_str(&format!("\n#### {title}\n\n| key | meaning |\n|---|---|\n"));
        let mut doc: Vec<String> = Vec::new();
        let mut rename: Option<String> = None;
        for line in body.lines().skip(1) {
            let t = line.trim();
            if let Some(d) = t.strip_prefix("///") {
                doc.push(d.trim().to_string());
            } else if let Some(r) = t.strip_prefix("#[serde(rename = \"") {
                rename = Some(r.split('"').next().unwrap().to_string());
            } else if let Some(rest) = t.strip_prefix("pub ") {
                let field = rest.split(':').next().unwrap().trim().to_string();
                let key = rename.take().unwrap_or(field);
                out.push_str(&format!(
                    "| `{key}` | {} |\n",
                    doc.join(" ").replace('|', "\\|")
                ));
                doc.clear();
            }
        }
    }
    out
}

#[test]
fn the_readme_config_reference_matches_the_doc_comments() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("routes/README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let (begin, end) = (
        "<!-- config-reference:begin -->",
        "<!-- config-reference:end -->",
    );
    let a = readme.find(begin).expect("begin marker") + begin.len();
    let b = readme.find(end).expect("end marker");
    let expected = reference_from_source();
    if std::env::var_os("UPDATE_README").is_some() {
        let updated = format!("{}{}\n{}", &readme[..a], expected, &readme[b..]);
        std::fs::write(&path, updated).unwrap();
        return;
    }
    assert_eq!(
        readme[a..b].trim(),
        expected.trim(),
        "routes/README.md is out of date: run UPDATE_README=1 cargo test -p braze-sync --test it route_config"
    );
}
