//! The rows both braze-sync benches generate (`sync-diff-bench`, `sync-scale-bench`): a
//! 20-column Amperity customer table, deterministic per user id, so the two benches and their
//! runs measure the same data.

pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[self.below(xs.len() as u64) as usize]
    }
}

pub const HEADER: &str = "amperity_id,given_name,surname,email,phone,birthdate,gender,city,country,language,time_zone,email_opt_in,lifetime_value,order_count,loyalty_tier,is_vip,first_order_date,last_order_at,churn_score,in_winback\n";

/// One row of user `id`; `version` changes a few of its values.
pub fn row(out: &mut String, id: u64, version: u64) {
    use std::fmt::Write;
    let mut r = Rng(id.wrapping_mul(7919));
    let first = r.pick(&["Ada", "Bob", "Cyd", "Dana", "Eve", "Finn", "Gus", "Hana"]);
    let last = r.pick(&["Lovelace", "Smith", "Garcia", "Nguyen", "Okafor", "Rossi"]);
    let city = r.pick(&["Seattle", "Paris", "Lagos", "Lyon", "Osaka", "Austin"]);
    let country = r.pick(&["US", "FR", "NG", "JP", "GB", "DE"]);
    let lang = r.pick(&["en", "fr", "ja", "de"]);
    let tz = r.pick(&[
        "America/Los_Angeles",
        "Europe/Paris",
        "Africa/Lagos",
        "Asia/Tokyo",
    ]);
    let gender = r.pick(&["F", "M", "O", "", "female", "male"]);
    let optin = r.pick(&["opted_in", "subscribed", "unsubscribed"]);
    let tier = r.pick(&["bronze", "silver", "gold", "platinum"]);
    let ltv_cents = r.below(10_000_000) + version * 1234;
    let orders = r.below(200) + version;
    let (y, m, d) = (1950 + r.below(55), 1 + r.below(12), 1 + r.below(28));
    let (fy, fm, fd) = (2015 + r.below(9), 1 + r.below(12), 1 + r.below(28));
    let (hh, mm, ss) = (r.below(24), r.below(60), r.below(60));
    let churn = r.below(1000);
    let vip = r.below(10) == 0;
    let winback = r.below(5) == 0;
    let _ = writeln!(
        out,
        "{id},{first},{last},{}{id}@example.com,+1206555{:04},{y}-{m:02}-{d:02},{gender},{city},{country},{lang},{tz},{optin},{}.{:04},{orders},{tier},{vip},{fy}-{fm:02}-{fd:02},2024-{fm:02}-{fd:02} {hh:02}:{mm:02}:{ss:02}.000,0.{churn:03}7,{winback}",
        first.to_ascii_lowercase(),
        id % 10_000,
        ltv_cents / 10_000,
        ltv_cents % 10_000,
    );
}

/// Both exports of the benches, user by user: `emit(id, first, second)` with the user's line
/// in export 1 (`None`: a new user) and in export 2 (`None`: gone). Export 2 has 0.5% of the
/// users gone, 2% changed and the rest unchanged, then 0.5% new users.
pub fn both_exports(rows: u64, mut emit: impl FnMut(u64, Option<&str>, Option<&str>)) {
    let mut first = String::with_capacity(512);
    let mut changed = String::with_capacity(512);
    let mut pick = Rng(42);
    for id in 0..rows {
        first.clear();
        row(&mut first, id, 0);
        let p = pick.below(1000);
        if p < 5 {
            emit(id, Some(&first), None);
            continue;
        }
        if p < 25 {
            changed.clear();
            row(&mut changed, id, 1);
            emit(id, Some(&first), Some(&changed));
        } else {
            emit(id, Some(&first), Some(&first));
        }
    }
    for id in rows..rows + rows / 200 {
        first.clear();
        row(&mut first, id, 0);
        emit(id, None, Some(&first));
    }
}
