//! The workload one seed draws: two routes (`people`: one object per export, the in-memory or
//! bounded diff; `members`: marker mode, multi-part) and, per route, a sequence of exports
//! with changed values, reverted values, new users, departures under and over the guard's
//! cap, duplicate notifications, a forced replay, a stale export and a future-dated one,
//! uploaded at times that make runs overlap, hand over and fan out.

use std::collections::BTreeMap;

use crate::rng::Rng;

/// One user's values in an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// `tier` / `level`.
    pub tier: String,
    /// `score` / `points`.
    pub score: i64,
    /// `vip` (people; members' rows are all members).
    pub vip: bool,
}

/// What kind of upload an export is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular export.
    Regular,
    /// Dated before an export uploaded earlier: skipped once the newer one applied.
    Stale,
    /// Dated beyond `max_future_skew`: refused.
    Future,
    /// The newest export uploaded again with `bridge-force-full=true`.
    ForcedReplay,
}

/// One export of a route.
#[derive(Debug, Clone)]
pub struct Export {
    /// Route name.
    pub route: &'static str,
    /// Sequence number within the route.
    pub seq: usize,
    /// Declared export time, ms after the world's epoch (`exported-at`).
    pub dated_ms: i64,
    /// When it lands, ms after the world's epoch.
    pub upload_ms: i64,
    /// Users and values.
    pub rows: BTreeMap<String, Row>,
    /// Kind.
    pub kind: Kind,
    /// Extra notifications of the same object (duplicates, plain replays).
    pub duplicates: u32,
    /// Marker mode: parts.
    pub parts: usize,
}

impl Export {
    /// The trigger object's key.
    pub fn trigger_key(&self) -> String {
        match self.route {
            "people" => format!("people/export-{:03}.csv", self.seq),
            _ => format!("members/run-{:03}/.DONE", self.seq),
        }
    }

    /// The CSV of `rows` (one part of `parts`), header first.
    pub fn csv_part(&self, part: usize) -> String {
        let mut s = match self.route {
            "people" => String::from("id,tier,score,vip\n"),
            _ => String::from("id,level,points\n"),
        };
        for (i, (id, r)) in self.rows.iter().enumerate() {
            if i % self.parts.max(1) != part {
                continue;
            }
            match self.route {
                "people" => s.push_str(&format!("{id},{},{},{}\n", r.tier, r.score, r.vip)),
                _ => s.push_str(&format!("{id},{},{}\n", r.tier, r.score)),
            }
        }
        s
    }
}

/// The route configurations.
pub fn route_toml(route: &str) -> String {
    match route {
        "people" => r#"
name = "people"
prefix = "people/"
update_existing_only = false
order_by = "metadata"
max_departure_share = 0.2
[identifier]
kind = "external_id"
column = "id"
[attributes.tier]
type = "String"
[attributes.score]
type = "Integer"
[[audiences]]
attribute = "vip"
column = "vip"
"#
        .to_string(),
        _ => r#"
name = "members"
prefix = "members/"
mode = "marker"
update_existing_only = false
order_by = "metadata"
max_departure_share = 0.2
[identifier]
kind = "external_id"
column = "id"
[attributes.level]
type = "String"
[attributes.points]
type = "Integer"
[[audiences]]
attribute = "club"
"#
        .to_string(),
    }
}

const TIERS: [&str; 4] = ["Gold", "Silver", "Bronze", "Platinum"];

/// Draws a route's exports.
pub fn exports(rng: &mut Rng, route: &'static str, users: usize, start_ms: i64) -> Vec<Export> {
    let prefix = if route == "people" { "u" } else { "m" };
    let mut next_id = users;
    let mut rows: BTreeMap<String, Row> = (0..users)
        .map(|i| {
            (
                format!("{prefix}{i:04}"),
                Row {
                    tier: TIERS[rng.below(4) as usize].to_string(),
                    score: rng.below(100) as i64,
                    vip: route != "people" || rng.chance(500),
                },
            )
        })
        .collect();
    let n = rng.range(3, 5) as usize;
    let mut out: Vec<Export> = Vec::new();
    let mut upload = start_ms + rng.range(0, 600_000) as i64;
    let hour = 3_600_000;
    let parts = if route == "people" {
        1
    } else {
        rng.range(1, 3) as usize
    };
    let mut history: Vec<BTreeMap<String, Row>> = Vec::new();
    for seq in 0..n {
        if seq > 0 {
            let ids: Vec<String> = rows.keys().cloned().collect();
            for id in &ids {
                if rng.chance(200)
                    && let Some(r) = rows.get_mut(id)
                {
                    r.tier = TIERS[rng.below(4) as usize].to_string();
                }
                if rng.chance(100)
                    && let Some(r) = rows.get_mut(id)
                {
                    r.score = rng.below(100) as i64;
                }
                if route == "people"
                    && rng.chance(50)
                    && let Some(r) = rows.get_mut(id)
                {
                    r.vip = !r.vip;
                }
            }
            // Reverted values: some users take their values of two exports ago.
            if history.len() >= 2 && rng.chance(500) {
                let old = &history[history.len() - 2];
                for (id, r) in old {
                    if rng.chance(300) && rows.contains_key(id) {
                        rows.insert(id.clone(), r.clone());
                    }
                }
            }
            // Departures, under or over the cap.
            let share = if rng.chance(250) {
                300
            } else {
                rng.range(0, 120)
            };
            let ids: Vec<String> = rows.keys().cloned().collect();
            for id in ids {
                if rng.chance(share) {
                    rows.remove(&id);
                }
            }
            // New users, and some who left coming back.
            for _ in 0..rng.range(0, users as u64 / 10 + 1) {
                rows.insert(
                    format!("{prefix}{next_id:04}"),
                    Row {
                        tier: TIERS[rng.below(4) as usize].to_string(),
                        score: rng.below(100) as i64,
                        vip: route != "people" || rng.chance(500),
                    },
                );
                next_id += 1;
            }
            if let Some(first) = history.first() {
                for (id, r) in first {
                    if !rows.contains_key(id) && rng.chance(100) {
                        rows.insert(id.clone(), r.clone());
                    }
                }
            }
            // Gaps: some exports land while the previous one still runs.
            upload += if rng.chance(400) {
                rng.range(1_000, 120_000) as i64
            } else {
                rng.range(600_000, 2 * hour as u64) as i64
            };
        }
        history.push(rows.clone());
        out.push(Export {
            route,
            seq,
            dated_ms: upload,
            upload_ms: upload,
            rows: rows.clone(),
            kind: Kind::Regular,
            duplicates: if rng.chance(200) { 1 } else { 0 },
            parts,
        });
    }
    let last = out.len() - 1;
    let newest = out[last].clone();
    let mut seq = out.len();
    // A stale export: dated before the newest, uploaded well after it.
    if rng.chance(500) {
        let mut rows = newest.rows.clone();
        for r in rows.values_mut() {
            if rng.chance(300) {
                r.tier = TIERS[rng.below(4) as usize].to_string();
            }
        }
        out.push(Export {
            route,
            seq,
            dated_ms: newest.dated_ms - rng.range(60_000, hour as u64) as i64,
            upload_ms: newest.upload_ms + 6 * hour,
            rows,
            kind: Kind::Stale,
            duplicates: 0,
            parts,
        });
        seq += 1;
    }
    // A future-dated export: refused.
    if rng.chance(250) {
        let mut rows = newest.rows.clone();
        for r in rows.values_mut() {
            r.score += 1;
        }
        let upload_ms = newest.upload_ms + 7 * hour;
        out.push(Export {
            route,
            seq,
            dated_ms: upload_ms + 48 * hour,
            upload_ms,
            rows,
            kind: Kind::Future,
            duplicates: 0,
            parts,
        });
        seq += 1;
    }
    // A forced replay of the newest export (the same object, flagged).
    if rng.chance(250) {
        out.push(Export {
            route,
            seq,
            upload_ms: newest.upload_ms + 8 * hour,
            kind: Kind::ForcedReplay,
            ..newest
        });
    }
    out
}

/// The export whose values Braze must end with: the newest by declared date among those a
/// route may apply (not future-dated).
pub fn expected(exports: &[Export]) -> Option<&Export> {
    exports
        .iter()
        .filter(|e| e.kind != Kind::Future)
        .max_by_key(|e| (e.dated_ms, e.kind == Kind::ForcedReplay))
}

/// The attribute updates the exports need at least, applied in date order (new users in
/// full, changed values, one per departure; a forced replay resends everything).
pub fn minimal_updates(exports: &[Export]) -> u64 {
    let mut applicable: Vec<&Export> = exports
        .iter()
        .filter(|e| e.kind != Kind::Future && e.kind != Kind::ForcedReplay)
        .collect();
    applicable.sort_by_key(|e| e.dated_ms);
    let mut prev: BTreeMap<String, Row> = BTreeMap::new();
    let mut known: BTreeMap<String, Row> = BTreeMap::new();
    let mut total = 0;
    let mut newest = 0;
    for e in applicable {
        if e.dated_ms < newest {
            continue;
        }
        newest = e.dated_ms;
        for (id, r) in &e.rows {
            match known.get(id) {
                None => total += 3,
                Some(k) => {
                    total += u64::from(k.tier != r.tier)
                        + u64::from(k.score != r.score)
                        + u64::from(k.vip != r.vip || !prev.contains_key(id));
                }
            }
            known.insert(id.clone(), r.clone());
        }
        total += prev.keys().filter(|id| !e.rows.contains_key(*id)).count() as u64;
        prev = e.rows.clone();
    }
    let forced: u64 = exports
        .iter()
        .filter(|e| e.kind == Kind::ForcedReplay)
        .map(|e| 3 * e.rows.len() as u64)
        .sum();
    total + forced
}
