//! Row → typed Braze attributes. A [`Binding`] ties a route's columns to a source's header
//! (refusing a header without the identifier or a mapped column, and listing the columns the
//! route ignores); a [`Mapper`] turns each row into a [`MappedRow`]: the user's identifier and
//! key, and one normalized value per route slot, exactly as Braze will receive it.
//!
//! The hot path allocates nothing per row: values live in a reused [`MappedRow`] (text in
//! one arena), fingerprints are computed from their JSON text in a reused buffer, and a
//! `serde_json::Value` is built only for attributes that changed. [`MappedUser`] is the
//! owned, simple form for tests and callers that want values.

pub mod fields;
pub mod types;

use serde_json::Value;
use xxhash_rust::xxh3::Xxh3Default;

use crate::config::route::Route;
use crate::model::{Fingerprint, Identifier, RowPos, UserKey};
#[cfg(test)]
use crate::read::row_codec::put_varint;
use crate::read::{ReadError, Row};
use crate::vocab::AmperityType;
use crate::vocab::{Cell, IdentifierKind, OnLeave, SlotKind, StringPolicy};
use fields::StdValue;

/// Where each column the route reads sits in a source's header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub(crate) id: usize,
    pub(crate) label: Option<usize>,
    pub(crate) slots: Vec<Option<usize>>,
    /// Header columns the route does not read (warned about once per run).
    pub unknown_columns: Vec<String>,
}

/// The header position of `name`: the exact name, else a unique case-insensitive match.
/// A name that several header fields carry (exactly, or case-insensitively with no exact
/// one) is ambiguous: `Err(count)`.
fn find_column(header: &[String], name: &str) -> Result<Option<usize>, usize> {
    let exact: Vec<usize> = (0..header.len()).filter(|&i| header[i] == name).collect();
    match exact.len() {
        1 => return Ok(Some(exact[0])),
        0 => {}
        n => return Err(n),
    }
    let hits: Vec<usize> = (0..header.len())
        .filter(|&i| header[i].eq_ignore_ascii_case(name))
        .collect();
    match hits.len() {
        0 => Ok(None),
        1 => Ok(Some(hits[0])),
        n => Err(n),
    }
}

impl Binding {
    /// Binds `route` to `header` (exact names, else a unique case-insensitive match). A missing
    /// identifier or mapped column fails: sending nulls for a column that is not there would
    /// erase data in Braze.
    pub fn new(route: &Route, header: &[String], source: &str) -> Result<Binding, ReadError> {
        let find = |c: &str| match find_column(header, c) {
            Ok(Some(i)) => Ok(i),
            Ok(None) => Err(ReadError::MissingColumn {
                source_name: source.to_string(),
                column: c.to_string(),
            }),
            Err(count) => Err(ReadError::AmbiguousColumn {
                source_name: source.to_string(),
                column: c.to_string(),
                count,
            }),
        };
        let idc = &route.config.identifier;
        let id = find(&idc.column)?;
        let label = match &idc.alias_label_column {
            Some(c) => Some(find(c)?),
            None => None,
        };
        let mut slots = Vec::with_capacity(route.slots.len());
        for s in &route.slots {
            slots.push(match &s.column {
                Some(c) => Some(find(c)?),
                None => None,
            });
        }
        let used: Vec<usize> = std::iter::once(id)
            .chain(label)
            .chain(slots.iter().flatten().copied())
            .collect();
        let unknown_columns = header
            .iter()
            .enumerate()
            .filter(|(i, _)| !used.contains(i))
            .map(|(_, h)| h.clone())
            .collect();
        Ok(Binding {
            id,
            label,
            slots,
            unknown_columns,
        })
    }

    /// The header columns a row's mapping reads (identifier, alias label, slots).
    pub fn columns(&self) -> impl Iterator<Item = usize> + '_ {
        std::iter::once(self.id)
            .chain(self.label)
            .chain(self.slots.iter().flatten().copied())
    }
}

/// A normalized value in a [`MappedRow`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Norm {
    /// Empty: `null` in Braze (removes the attribute when it was set).
    Null,
    /// Nothing to say (an audience left with `on_leave = "keep"`): never sent, never diffed.
    Skip,
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A number.
    Float(f64),
    /// Text at `start..end` of the row's arena.
    Text(u32, u32),
}

/// Why a row is rejected while mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapError {
    /// The column at fault.
    pub column: Option<String>,
    /// Why.
    pub reason: String,
}

/// One row, mapped: reused from row to row.
#[derive(Debug, Clone)]
pub struct MappedRow {
    /// The snapshot key of the row's user.
    pub key: UserKey,
    kind: Option<IdentifierKind>,
    id: (u32, u32),
    label: (u32, u32),
    /// One value per route slot.
    pub values: Vec<Norm>,
    text: String,
    key_buf: Vec<u8>,
}

impl Default for MappedRow {
    fn default() -> Self {
        Self {
            key: UserKey(0),
            kind: None,
            id: (0, 0),
            label: (0, 0),
            values: Vec::new(),
            text: String::new(),
            key_buf: Vec::new(),
        }
    }
}

impl MappedRow {
    fn span(&self, (a, b): (u32, u32)) -> &str {
        self.text.get(a as usize..b as usize).unwrap_or("")
    }

    /// The identifier as Braze receives it.
    pub fn identifier(&self) -> Identifier {
        let id = self.span(self.id).to_string();
        match self.kind {
            Some(IdentifierKind::BrazeId) => Identifier::BrazeId(id),
            Some(IdentifierKind::UserAlias) => Identifier::UserAlias {
                name: id,
                label: self.span(self.label).to_string(),
            },
            _ => Identifier::ExternalId(id),
        }
    }

    /// The value of `slot` as Braze receives it (`Null` for nothing).
    pub fn value(&self, slot: usize) -> Value {
        match self.values.get(slot) {
            None | Some(Norm::Null | Norm::Skip) => Value::Null,
            Some(Norm::Bool(b)) => Value::Bool(*b),
            Some(Norm::Int(i)) => Value::from(*i),
            Some(Norm::Float(f)) => Value::from(*f),
            Some(Norm::Text(a, b)) => Value::String(self.span((*a, *b)).to_string()),
        }
    }

    /// The fingerprint of `slot`'s value, identical to [`crate::model::fingerprint`] of
    /// [`MappedRow::value`], computed without building the value (`buf` is scratch). `None` for
    /// null.
    pub fn fingerprint(&self, slot: usize, buf: &mut Vec<u8>) -> Option<Fingerprint> {
        buf.clear();
        match self.values.get(slot)? {
            Norm::Null | Norm::Skip => return None,
            Norm::Bool(b) => buf.extend_from_slice(if *b { b"true" } else { b"false" }),
            Norm::Int(i) => {
                let _ = serde_json::to_writer(&mut *buf, i);
            }
            Norm::Float(f) => {
                let _ = serde_json::to_writer(&mut *buf, &Value::from(*f));
            }
            Norm::Text(a, b) => {
                let s = self.span((*a, *b));
                // JSON escapes only control bytes, quotes and backslashes: text without any
                // is its JSON string as is, between quotes.
                if s.bytes().all(|c| c >= 0x20 && c != b'"' && c != b'\\') {
                    buf.push(b'"');
                    buf.extend_from_slice(s.as_bytes());
                    buf.push(b'"');
                } else {
                    let _ = serde_json::to_writer(&mut *buf, s);
                }
            }
        }
        Some(xxhash_rust::xxh3::xxh3_64(buf))
    }

    #[cfg(test)]
    /// Appends this row's compact binary form (key, identifier, values) to `out`, for
    /// [`crate::state::spill`]; [`MappedRow::decode_from`] reads it back into an equal row. Text
    /// spans are written as varints relative to the previous span's end (mapped text is laid
    /// out in order, so most are one byte each), integers as zigzag varints.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.key.0.to_le_bytes());
        out.push(match self.kind {
            None => 0,
            Some(IdentifierKind::ExternalId) => 1,
            Some(IdentifierKind::BrazeId) => 2,
            Some(IdentifierKind::UserAlias) => 3,
        });
        put_varint(out, self.text.len() as u64);
        out.extend_from_slice(self.text.as_bytes());
        let mut end = 0u32;
        put_span(out, &mut end, self.id);
        put_span(out, &mut end, self.label);
        put_varint(out, self.values.len() as u64);
        for v in &self.values {
            match v {
                Norm::Null => out.push(0),
                Norm::Skip => out.push(1),
                Norm::Bool(false) => out.push(2),
                Norm::Bool(true) => out.push(3),
                Norm::Int(i) => {
                    out.push(4);
                    put_varint(out, zigzag(*i));
                }
                Norm::Float(f) => {
                    out.push(5);
                    out.extend_from_slice(&f.to_bits().to_le_bytes());
                }
                Norm::Text(a, b) => {
                    out.push(6);
                    put_span(out, &mut end, (*a, *b));
                }
            }
        }
    }

    #[cfg(test)]
    /// Reads a row written by [`MappedRow::encode_into`] from the front of `b`, reusing this
    /// row's buffers; returns the bytes consumed, `None` when `b` is truncated or not a row.
    pub fn decode_from(&mut self, b: &[u8]) -> Option<usize> {
        let mut r = SpillCursor { b, at: 0 };
        self.key = UserKey(u128::from_le_bytes(r.array()?));
        self.kind = match r.byte()? {
            0 => None,
            1 => Some(IdentifierKind::ExternalId),
            2 => Some(IdentifierKind::BrazeId),
            3 => Some(IdentifierKind::UserAlias),
            _ => return None,
        };
        let n = usize::try_from(r.varint()?).ok()?;
        self.text.clear();
        self.text.push_str(std::str::from_utf8(r.take(n)?).ok()?);
        let mut end = 0u32;
        self.id = r.span(&mut end)?;
        self.label = r.span(&mut end)?;
        let count = usize::try_from(r.varint()?).ok()?;
        self.values.clear();
        for _ in 0..count {
            let v = match r.byte()? {
                0 => Norm::Null,
                1 => Norm::Skip,
                2 => Norm::Bool(false),
                3 => Norm::Bool(true),
                4 => Norm::Int(unzigzag(r.varint()?)),
                5 => Norm::Float(f64::from_bits(u64::from_le_bytes(r.array()?))),
                6 => {
                    let (a, b) = r.span(&mut end)?;
                    Norm::Text(a, b)
                }
                _ => return None,
            };
            self.values.push(v);
        }
        Some(r.at)
    }

    /// The owned form, with nulls and without skipped slots.
    pub fn to_user(&self, pos: RowPos) -> MappedUser {
        MappedUser {
            identifier: self.identifier(),
            pos,
            attrs: self
                .values
                .iter()
                .enumerate()
                .filter(|(_, v)| !matches!(v, Norm::Skip))
                .map(|(i, _)| (i as u16, self.value(i)))
                .collect(),
        }
    }
}

#[cfg(test)]
struct SpillCursor<'b> {
    b: &'b [u8],
    at: usize,
}

#[cfg(test)]
impl<'b> SpillCursor<'b> {
    fn take(&mut self, n: usize) -> Option<&'b [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N)?.try_into().ok()
    }

    fn byte(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn varint(&mut self) -> Option<u64> {
        let first = self.byte()?;
        if first < 0x80 {
            return Some(u64::from(first));
        }
        self.at -= 1;
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    /// A span written by [`put_span`] after the span that ended at `end`.
    fn span(&mut self, end: &mut u32) -> Option<(u32, u32)> {
        let start = i64::from(*end).checked_add(unzigzag(self.varint()?))?;
        let start = u32::try_from(start).ok()?;
        let stop = start.checked_add(u32::try_from(self.varint()?).ok()?)?;
        *end = stop;
        Some((start, stop))
    }
}

#[cfg(test)]
fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

#[cfg(test)]
fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

#[cfg(test)]
/// Appends the text span `(a, b)` as its start relative to `end` (the previous span's end;
/// then `end` is this one's) and its length.
fn put_span(out: &mut Vec<u8>, end: &mut u32, (a, b): (u32, u32)) {
    put_varint(out, zigzag(i64::from(a) - i64::from(*end)));
    put_varint(out, u64::from(b.saturating_sub(a)));
    *end = a + b.saturating_sub(a);
}

/// A mapped user in owned form: every slot's value (`Value::Null` for empty).
#[derive(Debug, Clone, PartialEq)]
pub struct MappedUser {
    /// Who.
    pub identifier: Identifier,
    /// Where the row came from.
    pub pos: RowPos,
    /// `(slot, value)` in slot order; skipped slots are absent.
    pub attrs: Vec<(u16, Value)>,
}

/// The snapshot key of an identifier, computed without allocating; equal to
/// [`Identifier::user_key`].
pub fn user_key(kind: IdentifierKind, id: &str, label: &str) -> UserKey {
    let mut h = Xxh3Default::new();
    match kind {
        IdentifierKind::ExternalId => {
            h.update(b"e\x1f");
            h.update(id.as_bytes());
        }
        IdentifierKind::BrazeId => {
            h.update(b"b\x1f");
            h.update(id.as_bytes());
        }
        IdentifierKind::UserAlias => {
            h.update(b"a\x1f");
            h.update(label.as_bytes());
            h.update(b"\x1f");
            h.update(id.as_bytes());
        }
    }
    UserKey(h.digest128())
}

/// Braze's limit on an `external_id`, in bytes of UTF-8.
pub const MAX_EXTERNAL_ID_BYTES: usize = 987;

/// Maps rows of one route.
#[derive(Debug, Clone)]
pub struct Mapper<'r> {
    route: &'r Route,
    truncate: bool,
}

impl<'r> Mapper<'r> {
    /// A mapper for `route`.
    pub fn new(route: &'r Route) -> Self {
        Self {
            route,
            truncate: route.config.string_policy == StringPolicy::Truncate,
        }
    }

    #[cfg(test)]
    /// Maps `row` into `out`, or says why the row is rejected. When the identifier was read
    /// before the failure, `out.key` and [`MappedRow::identifier`] are valid: see
    /// [`MapOutcome`].
    pub fn map_row(
        &self,
        binding: &Binding,
        header: &[String],
        row: &Row<'_>,
        out: &mut MappedRow,
    ) -> Result<(), (MapOutcome, MapError)> {
        self.map_key(binding, header, row, out)?;
        self.map_values(binding, header, row, out)
    }

    /// The first half of [`Mapper::map_row`]: the identifier and `out.key` only (so the
    /// caller can look the user up while the values are mapped).
    pub fn map_key(
        &self,
        binding: &Binding,
        header: &[String],
        row: &Row<'_>,
        out: &mut MappedRow,
    ) -> Result<(), (MapOutcome, MapError)> {
        out.text.clear();
        out.values.clear();
        let col_name = |i: usize| header.get(i).cloned();
        let idc = &self.route.config.identifier;
        out.kind = Some(idc.kind);
        let external_id = idc.kind == IdentifierKind::ExternalId;
        out.id = self
            .identifier_text(row, binding.id, external_id, out)
            .map_err(|reason| {
                (
                    MapOutcome::NoIdentifier,
                    MapError {
                        column: col_name(binding.id),
                        reason,
                    },
                )
            })?;
        out.label = match (binding.label, &idc.alias_label) {
            (Some(i), _) => self.identifier_text(row, i, false, out).map_err(|reason| {
                (
                    MapOutcome::NoIdentifier,
                    MapError {
                        column: col_name(i),
                        reason: reason.replace("identifier", "alias label"),
                    },
                )
            })?,
            (None, Some(l)) => {
                let a = out.text.len() as u32;
                out.text.push_str(l);
                (a, out.text.len() as u32)
            }
            (None, None) => (0, 0),
        };
        out.key = {
            let text = &out.text;
            let span = |(a, b): (u32, u32)| text.get(a as usize..b as usize).unwrap_or("");
            let (id, label) = (span(out.id), span(out.label));
            let k = &mut out.key_buf;
            k.clear();
            match idc.kind {
                IdentifierKind::ExternalId => k.extend_from_slice(b"e\x1f"),
                IdentifierKind::BrazeId => k.extend_from_slice(b"b\x1f"),
                IdentifierKind::UserAlias => {
                    k.extend_from_slice(b"a\x1f");
                    k.extend_from_slice(label.as_bytes());
                    k.push(0x1f);
                }
            }
            k.extend_from_slice(id.as_bytes());
            UserKey(xxhash_rust::xxh3::xxh3_128(k))
        };
        Ok(())
    }

    /// The second half of [`Mapper::map_row`]: one value per slot (after
    /// [`Mapper::map_key`] on the same row and `out`).
    pub fn map_values(
        &self,
        binding: &Binding,
        header: &[String],
        row: &Row<'_>,
        out: &mut MappedRow,
    ) -> Result<(), (MapOutcome, MapError)> {
        let col_name = |i: usize| header.get(i).cloned();
        for (slot, s) in self.route.slots.iter().enumerate() {
            let col = binding.slots.get(slot).copied().flatten();
            let cell = match col {
                Some(i) => row.cells.cell(i).map_err(|e| {
                    (
                        MapOutcome::Identified,
                        MapError {
                            column: col_name(i),
                            reason: e.to_string(),
                        },
                    )
                })?,
                None => Cell::Null,
            };
            let cell = match cell {
                Cell::Str(s) if types::trim(s).is_empty() => Cell::Null,
                c => c,
            };
            let v = self
                .value(s.kind, col.is_none(), &cell, out)
                .map_err(|reason| {
                    (
                        MapOutcome::Identified,
                        MapError {
                            column: col.and_then(col_name),
                            reason: format!("{}: {reason}", s.name),
                        },
                    )
                })?;
            out.values.push(v);
        }
        Ok(())
    }

    /// The fingerprint `slot` would hold for `value` (a JSON value from elsewhere, e.g. a
    /// Braze Currents profile update), mapped as a cell of this route's column would be:
    /// `Ok(None)` for null, `Err` when the route would refuse it.
    pub fn value_fingerprint(
        &self,
        slot: usize,
        value: &Value,
    ) -> Result<Option<Fingerprint>, String> {
        let Some(s) = self.route.slots.get(slot) else {
            return Ok(None);
        };
        let text;
        let cell = match value {
            Value::Null => Cell::Null,
            Value::Bool(b) => Cell::Bool(*b),
            Value::Number(n) => match n.as_i64() {
                Some(i) => Cell::Int(i),
                None => Cell::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            Value::String(t) if types::trim(t).is_empty() => Cell::Null,
            Value::String(t) => Cell::Str(t),
            other => {
                text = other.to_string();
                Cell::Str(&text)
            }
        };
        let mut row = MappedRow::default();
        let v = self.value(s.kind, false, &cell, &mut row)?;
        row.values.push(v);
        Ok(row.fingerprint(0, &mut Vec::new()))
    }

    /// The text of the identifier (or alias label) in column `index`, appended to `out.text`;
    /// `external_id` when it is an `external_id` (Braze's byte limit applies).
    fn identifier_text(
        &self,
        row: &Row<'_>,
        index: usize,
        external_id: bool,
        out: &mut MappedRow,
    ) -> Result<(u32, u32), String> {
        let cell = row.cells.cell(index).map_err(|e| e.to_string())?;
        let start = out.text.len();
        // An identifier is text or an integer (README): a boolean, decimal, date or timestamp
        // would become an id like "true" that names nobody.
        match cell {
            Cell::Null => return Err("missing identifier".into()),
            Cell::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => {
                out.text.push_str(&(f as i64).to_string());
            }
            Cell::Str(s) if s.contains('\0') => {
                return Err("a NUL byte in the identifier".into());
            }
            c @ (Cell::Str(_) | Cell::Int(_)) => types::text_of(&c, &mut out.text),
            other => {
                return Err(format!(
                    "identifier is {}: an identifier must be text or an integer",
                    types::describe(&other)
                ));
            }
        }
        if out.text.len() == start {
            return Err("empty identifier".into());
        }
        let text = &out.text[start..];
        // Braze's limit on an external_id is in bytes; aliases and Braze ids stay within the
        // 255 characters of any string value.
        if external_id {
            if text.len() > MAX_EXTERNAL_ID_BYTES {
                return Err(format!(
                    "external_id of {} bytes: Braze accepts at most {MAX_EXTERNAL_ID_BYTES}",
                    text.len()
                ));
            }
        } else if text.chars().count() > types::MAX_STRING_CHARS {
            return Err("identifier longer than 255 characters".into());
        }
        Ok((start as u32, out.text.len() as u32))
    }

    fn value(
        &self,
        kind: SlotKind,
        no_column: bool,
        cell: &Cell<'_>,
        out: &mut MappedRow,
    ) -> Result<Norm, String> {
        let start = out.text.len();
        let text_norm = |out: &MappedRow| {
            if out.text.len() == start {
                Norm::Null
            } else {
                Norm::Text(start as u32, out.text.len() as u32)
            }
        };
        Ok(match kind {
            // A consent state is never removed: an empty cell says nothing about it.
            _ if kind.is_consent() && matches!(cell, Cell::Null) => Norm::Skip,
            SlotKind::SubscriptionGroup => {
                out.text.push_str(fields::group_state(cell)?);
                text_norm(out)
            }
            SlotKind::Standard(f) => match f.normalize(cell, &mut out.text, self.truncate)? {
                StdValue::Null => Norm::Null,
                StdValue::Bool(b) => Norm::Bool(b),
                StdValue::Text => text_norm(out),
            },
            SlotKind::Audience { on_leave } => {
                let member = no_column || (!matches!(cell, Cell::Null) && types::parse_bool(cell)?);
                match (member, on_leave) {
                    (true, _) => Norm::Bool(true),
                    (false, OnLeave::False) => Norm::Bool(false),
                    (false, OnLeave::Null) => Norm::Null,
                    (false, OnLeave::Keep) => Norm::Skip,
                }
            }
            SlotKind::Custom { .. } if matches!(cell, Cell::Null) => Norm::Null,
            SlotKind::Custom { ty, round } => match ty {
                AmperityType::Boolean => Norm::Bool(types::parse_bool(cell)?),
                AmperityType::Integer => Norm::Int(types::parse_int(cell)?),
                AmperityType::Decimal | AmperityType::Float => {
                    Norm::Float(types::parse_number(cell, round)?)
                }
                AmperityType::Date => {
                    let d = types::parse_date(cell)?;
                    types::check_braze_year(&d)?;
                    types::write_date(&mut out.text, &d);
                    out.text.push_str("T00:00:00Z");
                    text_norm(out)
                }
                AmperityType::Datetime => {
                    let t = types::parse_datetime(cell)?;
                    types::check_braze_year(&t.date_naive())?;
                    types::write_iso_utc(&mut out.text, &t);
                    text_norm(out)
                }
                AmperityType::String | AmperityType::Varchar => {
                    types::text_of(cell, &mut out.text);
                    types::limit_string(&mut out.text, start, !self.truncate)?;
                    text_norm(out)
                }
            },
        })
    }
}

/// How far mapping got before a row was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapOutcome {
    /// The identifier itself is missing or bad.
    NoIdentifier,
    /// The identifier was read (the user is known) but a value is bad.
    Identified,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::fingerprint;
    use crate::read::{CellError, Cells};
    use serde_json::json;

    struct V(Vec<Option<&'static str>>);
    impl Cells for V {
        fn len(&self) -> usize {
            self.0.len()
        }
        fn cell(&self, i: usize) -> Result<Cell<'_>, CellError> {
            Ok(match self.0.get(i).copied().flatten() {
                Some(s) => Cell::Str(s),
                None => Cell::Null,
            })
        }
    }

    fn route() -> Route {
        Route::from_toml(
            r#"
name = "c"
prefix = "p/"
[identifier]
kind = "external_id"
column = "id"
[fields]
email = "email"
birthdate = "dob"
[attributes.ltv]
type = "Decimal"
round = 2
[attributes.visits]
type = "Integer"
[attributes.vip]
type = "Boolean"
[attributes.seen]
type = "Datetime"
[[audiences]]
attribute = "aud_winback"
column = "winback"
on_leave = "null"
"#,
            "t",
        )
        .unwrap()
    }

    fn header() -> Vec<String> {
        [
            "id",
            "email",
            "birthdate",
            "ltv",
            "visits",
            "vip",
            "seen",
            "winback",
            "extra",
        ]
        .map(String::from)
        .to_vec()
    }

    #[test]
    fn binding_lists_unknown_columns_and_refuses_missing_ones() {
        let r = route();
        let b = Binding::new(&r, &header(), "s").unwrap();
        assert_eq!(b.unknown_columns, ["extra"]);
        let err = Binding::new(&r, &header()[1..], "s").unwrap_err();
        assert!(err.to_string().contains("\"id\""), "{err}");
    }

    #[test]
    fn a_row_maps_to_braze_values_and_fast_fingerprints_match_the_model() {
        let r = route();
        let h = header();
        let b = Binding::new(&r, &h, "s").unwrap();
        let cells = V(vec![
            Some("00042"),
            Some("ada@example.com"),
            Some("1815-12-10"),
            Some("1234.5678"),
            Some("7"),
            Some("Y"),
            Some("2024-05-01 12:30:00"),
            Some("false"),
            Some("x"),
        ]);
        let row = Row {
            row: 1,
            line: Some(2),
            cells: &cells,
        };
        let mut out = MappedRow::default();
        Mapper::new(&r).map_row(&b, &h, &row, &mut out).unwrap();
        let u = out.to_user(RowPos::default());
        assert_eq!(u.identifier, Identifier::ExternalId("00042".into()));
        assert_eq!(out.key, u.identifier.user_key());
        let vals: Vec<Value> = u.attrs.iter().map(|(_, v)| v.clone()).collect();
        assert_eq!(
            vals,
            vec![
                json!("1815-12-10"),
                json!("ada@example.com"),
                json!(1234.57),
                json!("2024-05-01T12:30:00Z"),
                json!(true),
                json!(7),
                Value::Null
            ]
        );
        let mut buf = Vec::new();
        for (i, v) in vals.iter().enumerate() {
            let fp = out.fingerprint(i, &mut buf);
            if v.is_null() {
                assert_eq!(fp, None);
            } else {
                assert_eq!(fp, Some(fingerprint(v)), "slot {i}");
            }
        }
    }

    #[test]
    fn text_fingerprints_match_the_model_with_and_without_escapes() {
        let texts = [
            "plain",
            "quo\"te",
            "back\\slash",
            "tab\tx",
            "nl\n",
            "\u{1}",
            "\u{7f}",
            "é ünï \u{1f600}",
            "",
        ];
        let mut row = MappedRow::default();
        for t in texts {
            let a = row.text.len() as u32;
            row.text.push_str(t);
            row.values.push(Norm::Text(a, row.text.len() as u32));
        }
        let mut buf = Vec::new();
        for (i, t) in texts.iter().enumerate() {
            assert_eq!(
                row.fingerprint(i, &mut buf),
                Some(fingerprint(&Value::String((*t).into()))),
                "{t:?}"
            );
        }
    }

    #[test]
    fn the_spill_form_reads_back_into_an_equal_row() {
        let row = MappedRow {
            key: UserKey(u128::MAX - 7),
            kind: Some(IdentifierKind::UserAlias),
            id: (0, 3),
            label: (3, 8),
            values: vec![
                Norm::Null,
                Norm::Skip,
                Norm::Bool(false),
                Norm::Bool(true),
                Norm::Int(-5),
                Norm::Int(i64::MIN),
                Norm::Int(i64::MAX),
                Norm::Float(-0.5),
                Norm::Float(f64::MAX),
                Norm::Text(8, 12),
                Norm::Text(12, 12),
                // Out of order (never written so, still read back).
                Norm::Text(0, 3),
                Norm::Text(12, 400),
            ],
            text: "ann\u{e9}lab\"x\"\u{1f600}".into(),
            key_buf: Vec::new(),
        };
        let mut out = vec![9u8];
        row.encode_into(&mut out);
        let mut back = MappedRow::default();
        assert_eq!(back.decode_from(&out[1..]), Some(out.len() - 1));
        assert_eq!(back.key, row.key);
        assert_eq!(back.kind, row.kind);
        assert_eq!((back.id, back.label), (row.id, row.label));
        assert_eq!(back.values, row.values);
        assert_eq!(back.text, row.text);
        assert_eq!(back.identifier(), row.identifier());
        for cut in 0..out.len() - 1 {
            assert_eq!(back.decode_from(&out[1..1 + cut]), None, "cut at {cut}");
        }
    }

    #[test]
    fn external_id_over_987_bytes_is_refused_and_987_bytes_pass() {
        let r = route();
        let h = header();
        let b = Binding::new(&r, &h, "s").unwrap();
        let map = |id: String| {
            let id: &'static str = Box::leak(id.into_boxed_str());
            let mut cells = vec![None; h.len()];
            cells[0] = Some(id);
            let cells = V(cells);
            let row = Row {
                row: 4,
                line: Some(5),
                cells: &cells,
            };
            let mut out = MappedRow::default();
            Mapper::new(&r)
                .map_row(&b, &h, &row, &mut out)
                .map(|()| out)
        };
        // 987 bytes of ASCII (more than 255 characters) is a valid external_id.
        let ok = map("x".repeat(MAX_EXTERNAL_ID_BYTES)).unwrap();
        assert_eq!(
            ok.identifier(),
            Identifier::ExternalId("x".repeat(MAX_EXTERNAL_ID_BYTES))
        );
        // 247 four-byte characters: 988 bytes, fewer than 255 characters.
        let (outcome, e) = map("\u{1f600}".repeat(247)).unwrap_err();
        assert_eq!(outcome, MapOutcome::NoIdentifier);
        assert_eq!(e.column.as_deref(), Some("id"));
        assert!(e.reason.contains("988 bytes"), "{}", e.reason);
        assert!(e.reason.contains("987"), "{}", e.reason);
    }

    #[test]
    fn bad_values_name_their_column() {
        let r = route();
        let h = header();
        let b = Binding::new(&r, &h, "s").unwrap();
        let cells = V(vec![
            Some("1"),
            None,
            None,
            None,
            Some("seven"),
            None,
            None,
            None,
            None,
        ]);
        let row = Row {
            row: 1,
            line: None,
            cells: &cells,
        };
        let mut out = MappedRow::default();
        let (outcome, e) = Mapper::new(&r).map_row(&b, &h, &row, &mut out).unwrap_err();
        assert_eq!(outcome, MapOutcome::Identified);
        assert_eq!(e.column.as_deref(), Some("visits"));
        assert!(e.reason.contains("not an integer"), "{}", e.reason);
    }

    #[test]
    fn alias_keys_match_the_model() {
        assert_eq!(
            user_key(IdentifierKind::UserAlias, "n", "l"),
            Identifier::UserAlias {
                name: "n".into(),
                label: "l".into()
            }
            .user_key()
        );
        assert_eq!(
            user_key(IdentifierKind::BrazeId, "b1", ""),
            Identifier::BrazeId("b1".into()).user_key()
        );
    }

    #[test]
    fn consent_cells_map_to_braze_states_and_empty_ones_say_nothing() {
        let r = Route::from_toml(
            "name = \"c\"\nprefix = \"p/\"\n[identifier]\nkind = \"external_id\"\ncolumn = \"id\"\n[fields]\nmail = \"email_subscribe\"\n[subscription_groups]\nnews = \"sg-1\"\n",
            "t",
        )
        .unwrap();
        let h: Vec<String> = ["id", "mail", "news"].map(String::from).to_vec();
        let b = Binding::new(&r, &h, "s").unwrap();
        let map = |cells: Vec<Option<&'static str>>| {
            let cells = V(cells);
            let row = Row {
                row: 3,
                line: Some(4),
                cells: &cells,
            };
            let mut out = MappedRow::default();
            Mapper::new(&r)
                .map_row(&b, &h, &row, &mut out)
                .map(|()| out.to_user(RowPos::default()).attrs)
        };
        assert_eq!(
            map(vec![Some("1"), Some("Opted-In"), Some("NO")]).unwrap(),
            vec![(0, json!("opted_in")), (1, json!("unsubscribed"))]
        );
        assert_eq!(map(vec![Some("1"), None, Some(" ")]).unwrap(), vec![]);
        let (outcome, e) = map(vec![Some("1"), None, Some("maybe")]).unwrap_err();
        assert_eq!(outcome, MapOutcome::Identified);
        assert_eq!(e.column.as_deref(), Some("news"));
        assert!(e.reason.contains("subscription_group:sg-1"), "{}", e.reason);
        assert!(
            e.reason.contains("not a subscription group state"),
            "{}",
            e.reason
        );
    }
}
