//! Avro writer schemas as this crate needs them: the JSON schema embedded in a container file,
//! parsed into a small arena of nodes (named types resolved, recursion allowed, logical types
//! reduced to their encoding) that the plan checks against the registry, a one-line
//! description of a field's type for the registry, and the same schema prepared for
//! `arrow-avro`, which decodes the records ([`WriterSchema::arrow_avro_json`]).

use std::collections::HashMap;

use serde_json::Value;

/// Index of a node in a [`WriterSchema`].
pub type NodeId = usize;

/// A record's fields: names and types in writer order.
pub type Fields = [(String, NodeId)];

/// The most nodes a schema may have; Currents schemas have about 40.
const MAX_NODES: usize = 10_000;
/// The deepest nesting accepted while parsing.
const MAX_DEPTH: usize = 64;

/// One Avro type, by how it is encoded.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// `null`: no bytes.
    Null,
    /// `boolean`: one byte.
    Boolean,
    /// `int` (and logical types over it): zig-zag varint, 32 bits.
    Int,
    /// `long` (and logical types over it): zig-zag varint, 64 bits.
    Long,
    /// `float`: 4 bytes little-endian.
    Float,
    /// `double`: 8 bytes little-endian.
    Double,
    /// `bytes`: length-prefixed bytes.
    Bytes,
    /// `string`: length-prefixed UTF-8.
    String,
    /// `enum`: an int indexing the symbols.
    Enum {
        /// Full name.
        name: String,
        /// Symbols in order.
        symbols: Vec<String>,
    },
    /// `fixed`: exactly `size` bytes.
    Fixed {
        /// Full name.
        name: String,
        /// Byte count.
        size: usize,
    },
    /// `array`: blocks of items.
    Array(NodeId),
    /// `map`: blocks of string keys and values.
    Map(NodeId),
    /// A union: a long branch index, then the branch.
    Union(Vec<NodeId>),
    /// A record: its fields in order.
    Record {
        /// Full name (`namespace.name`).
        name: String,
        /// Field names and types, in writer order.
        fields: Vec<(String, NodeId)>,
    },
}

/// A parsed writer schema.
#[derive(Debug, Clone)]
pub struct WriterSchema {
    nodes: Vec<Node>,
    root: NodeId,
    /// The schema as given to `arrow-avro`, which decodes the records: logical types
    /// removed, so every value arrives as its encoding (a `timestamp-millis` long as a long,
    /// a `uuid` string as a string), as Braze's decoded JSON shows them.
    arrow_json: String,
    /// Per top-level field: its type is recursive (a named type that contains itself), which
    /// `arrow-avro` cannot decode; such a field reaches `arrow-avro` as a `string` holding
    /// the value rendered as JSON ([`crate::datum::rewrite`]).
    rendered: Vec<bool>,
}

/// Why a schema cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemaError {
    /// The text is not JSON.
    #[error("writer schema is not JSON: {0}")]
    NotJson(String),
    /// The JSON is not a valid Avro schema.
    #[error("writer schema is invalid at {path}: {reason}")]
    Invalid {
        /// Where in the schema (`fields[3].type`).
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The top level is not a record (every Currents file holds records).
    #[error("writer schema's top level is {0}, not a record")]
    NotRecord(String),
}

impl WriterSchema {
    /// Parses schema JSON text.
    pub fn parse(text: &str) -> Result<Self, SchemaError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| SchemaError::NotJson(e.to_string()))?;
        Self::from_json(&value)
    }

    /// Parses a schema from JSON.
    pub fn from_json(value: &Value) -> Result<Self, SchemaError> {
        let mut p = Parser {
            nodes: Vec::new(),
            names: HashMap::new(),
        };
        let root = p.parse(value, "", "$", 0)?;
        let mut schema = Self {
            nodes: p.nodes,
            root,
            arrow_json: String::new(),
            rendered: Vec::new(),
        };
        if let Node::Record { fields, .. } = schema.node(root) {
            schema.rendered = fields
                .iter()
                .map(|(_, f)| schema.recursive(*f, &mut Vec::new()))
                .collect();
        }
        let mut plain = if schema.rendered.iter().any(|r| *r) {
            schema.emit_rendered()
        } else {
            value.clone()
        };
        strip_logical_types(&mut plain, 0);
        let mut substituted = 0usize;
        substitute_null_items(&mut plain, 0, &mut substituted);
        schema.arrow_json = plain.to_string();
        Ok(schema)
    }

    /// Whether top-level field `i`'s value reaches `arrow-avro` rendered as JSON text (its
    /// type is recursive).
    pub fn is_rendered(&self, i: usize) -> bool {
        self.rendered.get(i).copied().unwrap_or(false)
    }

    /// Whether some top-level field is rendered as JSON text ([`Self::is_rendered`]).
    pub fn has_rendered_fields(&self) -> bool {
        self.rendered.iter().any(|r| *r)
    }

    /// True when the type at `id` reaches a named record that contains itself. `stack`: the
    /// records on the way here.
    fn recursive(&self, id: NodeId, stack: &mut Vec<NodeId>) -> bool {
        if stack.contains(&id) {
            return true;
        }
        if stack.len() > MAX_DEPTH {
            return false;
        }
        let children: Vec<NodeId> = match self.node(id) {
            Node::Array(i) | Node::Map(i) => vec![*i],
            Node::Union(bs) => bs.clone(),
            Node::Record { fields, .. } => fields.iter().map(|(_, f)| *f).collect(),
            _ => return false,
        };
        stack.push(id);
        let r = children.into_iter().any(|c| self.recursive(c, stack));
        stack.pop();
        r
    }

    /// The schema for `arrow-avro` written out from the nodes, with each recursive top-level
    /// field as a `string` (each named type defined where it first occurs).
    fn emit_rendered(&self) -> Value {
        let mut defined = std::collections::HashSet::new();
        let Node::Record { name, fields } = self.node(self.root) else {
            return Value::Null;
        };
        defined.insert(name.clone());
        let fields: Vec<Value> = fields
            .iter()
            .enumerate()
            .map(|(i, (n, f))| {
                let ty = if self.is_rendered(i) {
                    Value::from("string")
                } else {
                    self.emit(*f, &mut defined, 0)
                };
                serde_json::json!({"name": n, "type": ty})
            })
            .collect();
        serde_json::json!({"type": "record", "name": name, "fields": fields})
    }

    fn emit(
        &self,
        id: NodeId,
        defined: &mut std::collections::HashSet<String>,
        depth: usize,
    ) -> Value {
        use serde_json::json;
        if depth > MAX_DEPTH {
            return Value::from("null");
        }
        match self.node(id) {
            Node::Enum { name, symbols } => {
                if defined.insert(name.clone()) {
                    json!({"type": "enum", "name": name, "symbols": symbols})
                } else {
                    Value::from(name.clone())
                }
            }
            Node::Fixed { name, size } => {
                if defined.insert(name.clone()) {
                    json!({"type": "fixed", "name": name, "size": size})
                } else {
                    Value::from(name.clone())
                }
            }
            Node::Array(i) => json!({"type": "array", "items": self.emit(*i, defined, depth + 1)}),
            Node::Map(i) => json!({"type": "map", "values": self.emit(*i, defined, depth + 1)}),
            Node::Union(bs) => Value::Array(
                bs.iter()
                    .map(|b| self.emit(*b, defined, depth + 1))
                    .collect(),
            ),
            Node::Record { name, fields } => {
                if !defined.insert(name.clone()) {
                    return Value::from(name.clone());
                }
                let fields: Vec<Value> = fields
                    .iter()
                    .map(|(n, f)| json!({"name": n, "type": self.emit(*f, defined, depth + 1)}))
                    .collect();
                json!({"type": "record", "name": name, "fields": fields})
            }
            other => Value::from(self.kind_name(other)),
        }
    }

    /// The schema JSON `arrow-avro` decodes with: logical types removed, and `null` array
    /// items and map values written as empty records named [`NULL_ITEM`]`<n>` (which encode
    /// the same, in no bytes): `arrow-avro` 60 builds a non-nullable list of nulls for
    /// `{"type":"array","items":"null"}` and then refuses its own array. The JSON rendering
    /// writes such items as `null`.
    pub fn arrow_avro_json(&self) -> &str {
        &self.arrow_json
    }

    /// True when some array's items cost no input bytes and are not plain `null`s (a `fixed`
    /// of size 0, a record of only such fields): refused, as Currents never writes them.
    pub fn has_free_array_items_other_than_null(&self) -> bool {
        self.nodes.iter().any(|n| {
            matches!(n, Node::Array(item)
                if !matches!(self.node(*item), Node::Null) && self.costs_nothing(*item))
        })
    }

    /// True when some array's items cost no input bytes (`null`, `fixed` of size 0, or a
    /// record of only such fields): the decoder then spends time per item that the input
    /// does not pay for, so such files are decoded one record at a time and the item limit is
    /// checked after each.
    pub fn has_free_array_items(&self) -> bool {
        self.nodes
            .iter()
            .any(|n| matches!(n, Node::Array(item) if self.costs_nothing(*item)))
    }

    /// True when a value of this type is encoded in no bytes (`null`, `fixed` of size 0, a
    /// record of only such fields).
    pub fn costs_nothing(&self, id: NodeId) -> bool {
        self.costs_nothing_at(id, 0)
    }

    fn costs_nothing_at(&self, id: NodeId, depth: usize) -> bool {
        if depth > MAX_DEPTH {
            return false;
        }
        match self.node(id) {
            Node::Null => true,
            Node::Fixed { size, .. } => *size == 0,
            Node::Record { fields, .. } => fields
                .iter()
                .all(|(_, f)| self.costs_nothing_at(*f, depth + 1)),
            _ => false,
        }
    }

    /// The root node.
    pub fn root(&self) -> NodeId {
        self.root
    }

    /// A node by id.
    pub fn node(&self, id: NodeId) -> &Node {
        // Ids come only from this schema, so they are always in range; fall back to Null
        // rather than panic if one ever is not.
        self.nodes.get(id).unwrap_or(&Node::Null)
    }

    /// The root record's full name and fields.
    pub fn record(&self) -> Result<(&str, &Fields), SchemaError> {
        match self.node(self.root) {
            Node::Record { name, fields } => Ok((name, fields)),
            other => Err(SchemaError::NotRecord(self.kind_name(other))),
        }
    }

    /// A short name for a node's kind (`string`, `array`, ...).
    pub fn kind_name(&self, node: &Node) -> String {
        match node {
            Node::Null => "null".into(),
            Node::Boolean => "boolean".into(),
            Node::Int => "int".into(),
            Node::Long => "long".into(),
            Node::Float => "float".into(),
            Node::Double => "double".into(),
            Node::Bytes => "bytes".into(),
            Node::String => "string".into(),
            Node::Enum { .. } => "enum".into(),
            Node::Fixed { .. } => "fixed".into(),
            Node::Array(_) => "array".into(),
            Node::Map(_) => "map".into(),
            Node::Union(_) => "union".into(),
            Node::Record { .. } => "record".into(),
        }
    }

    /// Describes a type in one line: `string`, `string?` (nullable), `array<string>`,
    /// `array<string?>`, `map<long>`, `record:Name`, `enum:Name`, `union<int,string>`.
    pub fn describe(&self, id: NodeId) -> String {
        self.describe_depth(id, 0)
    }

    fn describe_depth(&self, id: NodeId, depth: usize) -> String {
        if depth > 8 {
            return "...".into();
        }
        let node = self.node(id);
        match node {
            Node::Array(i) => format!("array<{}>", self.describe_depth(*i, depth + 1)),
            Node::Map(v) => format!("map<{}>", self.describe_depth(*v, depth + 1)),
            Node::Record { name, .. } => format!("record:{name}"),
            Node::Enum { name, .. } => format!("enum:{name}"),
            Node::Fixed { name, size } => format!("fixed:{name}:{size}"),
            Node::Union(branches) => {
                let non_null: Vec<NodeId> = branches
                    .iter()
                    .copied()
                    .filter(|b| !matches!(self.node(*b), Node::Null))
                    .collect();
                let nullable = non_null.len() < branches.len();
                match (non_null.as_slice(), nullable) {
                    ([one], true) => format!("{}?", self.describe_depth(*one, depth + 1)),
                    _ => {
                        let parts: Vec<String> = branches
                            .iter()
                            .map(|b| self.describe_depth(*b, depth + 1))
                            .collect();
                        format!("union<{}>", parts.join(","))
                    }
                }
            }
            other => self.kind_name(other),
        }
    }

    /// The non-null branches of a type and whether it admits null (a plain type is its own
    /// single branch).
    pub fn branches(&self, id: NodeId) -> (Vec<NodeId>, bool) {
        match self.node(id) {
            Node::Null => (Vec::new(), true),
            Node::Union(bs) => {
                let non_null: Vec<NodeId> = bs
                    .iter()
                    .copied()
                    .filter(|b| !matches!(self.node(*b), Node::Null))
                    .collect();
                let nullable = non_null.len() < bs.len();
                (non_null, nullable)
            }
            _ => (vec![id], false),
        }
    }
}

/// The name (prefix) of the empty records that stand for `null` array items and map values in
/// the schema `arrow-avro` decodes with.
pub const NULL_ITEM: &str = "CurrentsNullItem";

fn is_null_type(v: &Value) -> bool {
    match v {
        Value::String(s) => s == "null",
        Value::Object(o) => o.get("type").and_then(Value::as_str) == Some("null"),
        _ => false,
    }
}

fn substitute_null_items(v: &mut Value, depth: usize, n: &mut usize) {
    if depth > MAX_DEPTH * 4 {
        return;
    }
    match v {
        Value::Object(o) => {
            let slot = match o.get("type").and_then(Value::as_str) {
                Some("array") => Some("items"),
                Some("map") => Some("values"),
                _ => None,
            };
            if let Some(slot) = slot
                && o.get(slot).is_some_and(is_null_type)
            {
                *n += 1;
                o.insert(
                    slot.into(),
                    serde_json::json!({
                        "type": "record",
                        "name": format!("currents_bridge.{NULL_ITEM}{n}"),
                        "fields": [],
                    }),
                );
            }
            for child in o.values_mut() {
                substitute_null_items(child, depth + 1, n);
            }
        }
        Value::Array(a) => {
            for child in a {
                substitute_null_items(child, depth + 1, n);
            }
        }
        _ => {}
    }
}

fn strip_logical_types(v: &mut Value, depth: usize) {
    if depth > MAX_DEPTH * 4 {
        return;
    }
    match v {
        Value::Object(o) => {
            o.remove("logicalType");
            for child in o.values_mut() {
                strip_logical_types(child, depth + 1);
            }
        }
        Value::Array(a) => {
            for child in a {
                strip_logical_types(child, depth + 1);
            }
        }
        _ => {}
    }
}

struct Parser {
    nodes: Vec<Node>,
    names: HashMap<String, NodeId>,
}

fn invalid(path: &str, reason: impl Into<String>) -> SchemaError {
    SchemaError::Invalid {
        path: path.to_string(),
        reason: reason.into(),
    }
}

fn primitive(name: &str) -> Option<Node> {
    Some(match name {
        "null" => Node::Null,
        "boolean" => Node::Boolean,
        "int" => Node::Int,
        "long" => Node::Long,
        "float" => Node::Float,
        "double" => Node::Double,
        "bytes" => Node::Bytes,
        "string" => Node::String,
        _ => return None,
    })
}

fn full_name(name: &str, namespace: Option<&str>, enclosing: &str) -> String {
    if name.contains('.') {
        return name.to_string();
    }
    let ns = namespace.unwrap_or(enclosing);
    if ns.is_empty() {
        name.to_string()
    } else {
        format!("{ns}.{name}")
    }
}

impl Parser {
    fn push(&mut self, node: Node, path: &str) -> Result<NodeId, SchemaError> {
        if self.nodes.len() >= MAX_NODES {
            return Err(invalid(path, format!("more than {MAX_NODES} types")));
        }
        self.nodes.push(node);
        Ok(self.nodes.len() - 1)
    }

    fn define(&mut self, name: &str, id: NodeId, path: &str) -> Result<(), SchemaError> {
        if self.names.insert(name.to_string(), id).is_some() {
            return Err(invalid(path, format!("type {name} is defined twice")));
        }
        Ok(())
    }

    fn parse(
        &mut self,
        v: &Value,
        namespace: &str,
        path: &str,
        depth: usize,
    ) -> Result<NodeId, SchemaError> {
        if depth > MAX_DEPTH {
            return Err(invalid(path, format!("nested deeper than {MAX_DEPTH}")));
        }
        match v {
            Value::String(s) => {
                if let Some(node) = primitive(s) {
                    return self.push(node, path);
                }
                self.named(s, namespace, path)
            }
            Value::Array(branches) => self.parse_union(branches, namespace, path, depth),
            Value::Object(o) => self.parse_object(o, namespace, path, depth),
            other => Err(invalid(path, format!("unexpected JSON {other}"))),
        }
    }

    /// A type defined earlier, by its full name or as written.
    fn named(&self, name: &str, namespace: &str, path: &str) -> Result<NodeId, SchemaError> {
        let full = full_name(name, None, namespace);
        self.names
            .get(&full)
            .or_else(|| self.names.get(name))
            .copied()
            .ok_or_else(|| invalid(path, format!("unknown type {name:?}")))
    }

    fn parse_union(
        &mut self,
        branches: &[Value],
        namespace: &str,
        path: &str,
        depth: usize,
    ) -> Result<NodeId, SchemaError> {
        let mut ids = Vec::with_capacity(branches.len());
        for (i, b) in branches.iter().enumerate() {
            let id = self.parse(b, namespace, &format!("{path}[{i}]"), depth + 1)?;
            if matches!(self.nodes.get(id), Some(Node::Union(_))) {
                return Err(invalid(path, "a union may not directly contain a union"));
            }
            ids.push(id);
        }
        if ids.is_empty() {
            return Err(invalid(path, "empty union"));
        }
        self.push(Node::Union(ids), path)
    }

    /// A schema object: `{"type": ...}` with the keys its type takes.
    fn parse_object(
        &mut self,
        o: &serde_json::Map<String, Value>,
        namespace: &str,
        path: &str,
        depth: usize,
    ) -> Result<NodeId, SchemaError> {
        let ty = o
            .get("type")
            .ok_or_else(|| invalid(path, "object without \"type\""))?;
        let ty_str = match ty {
            Value::String(s) => s.as_str(),
            // {"type": {...}} or {"type": [...]}: the inner schema is the type.
            other => return self.parse(other, namespace, path, depth + 1),
        };
        if let Some(node) = primitive(ty_str) {
            // Logical types (date, timestamp-millis, uuid, decimal on bytes...) are read
            // as their underlying encoding.
            return self.push(node, path);
        }
        let name_of = |o: &serde_json::Map<String, Value>| -> Result<String, SchemaError> {
            let name = o
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid(path, format!("{ty_str} without a name")))?;
            Ok(full_name(
                name,
                o.get("namespace").and_then(Value::as_str),
                namespace,
            ))
        };
        match ty_str {
            "record" | "error" => self.parse_record(o, name_of(o)?, path, depth),
            "enum" => {
                let name = name_of(o)?;
                let symbols: Vec<String> = o
                    .get("symbols")
                    .and_then(Value::as_array)
                    .ok_or_else(|| invalid(path, "enum without symbols"))?
                    .iter()
                    .map(|s| s.as_str().map(str::to_string))
                    .collect::<Option<_>>()
                    .ok_or_else(|| invalid(path, "enum symbol is not a string"))?;
                let node = Node::Enum {
                    name: name.clone(),
                    symbols,
                };
                self.push_named(node, &name, path)
            }
            "fixed" => {
                let name = name_of(o)?;
                let size = o
                    .get("size")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| invalid(path, "fixed without a size"))?;
                let size = usize::try_from(size)
                    .ok()
                    .filter(|s| *s <= 1 << 20)
                    .ok_or_else(|| invalid(path, "fixed size over 1 MiB"))?;
                let node = Node::Fixed {
                    name: name.clone(),
                    size,
                };
                self.push_named(node, &name, path)
            }
            "array" => {
                let items = o
                    .get("items")
                    .ok_or_else(|| invalid(path, "array without items"))?;
                let item = self.parse(items, namespace, &format!("{path}.items"), depth + 1)?;
                self.push(Node::Array(item), path)
            }
            "map" => {
                let values = o
                    .get("values")
                    .ok_or_else(|| invalid(path, "map without values"))?;
                let value = self.parse(values, namespace, &format!("{path}.values"), depth + 1)?;
                self.push(Node::Map(value), path)
            }
            other => self.named(other, namespace, path),
        }
    }

    fn push_named(&mut self, node: Node, name: &str, path: &str) -> Result<NodeId, SchemaError> {
        let id = self.push(node, path)?;
        self.define(name, id, path)?;
        Ok(id)
    }

    /// A record: defined under its name before its fields are read, so a field may name
    /// the record itself (a recursive type).
    fn parse_record(
        &mut self,
        o: &serde_json::Map<String, Value>,
        name: String,
        path: &str,
        depth: usize,
    ) -> Result<NodeId, SchemaError> {
        let inner_ns = name.rsplit_once('.').map(|(ns, _)| ns).unwrap_or("");
        let id = self.push_named(
            Node::Record {
                name: name.clone(),
                fields: Vec::new(),
            },
            &name,
            path,
        )?;
        let fields_json = o
            .get("fields")
            .and_then(Value::as_array)
            .ok_or_else(|| invalid(path, "record without a fields array"))?;
        let mut fields = Vec::with_capacity(fields_json.len());
        for (i, f) in fields_json.iter().enumerate() {
            let fpath = format!("{path}.fields[{i}]");
            let fname = f
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid(&fpath, "field without a name"))?;
            if fields.iter().any(|(n, _): &(String, NodeId)| n == fname) {
                return Err(invalid(&fpath, format!("field {fname} appears twice")));
            }
            let ftype = f
                .get("type")
                .ok_or_else(|| invalid(&fpath, "field without a type"))?;
            let fid = self.parse(ftype, inner_ns, &fpath, depth + 1)?;
            fields.push((fname.to_string(), fid));
        }
        if let Some(Node::Record { fields: slot, .. }) = self.nodes.get_mut(id) {
            *slot = fields;
        }
        Ok(id)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    const CLICK: &str = r#"{"type":"record","name":"Click","namespace":"dataexport.S3.inner.users.messages.email",
      "fields":[{"name":"id","type":"string"},
                {"name":"time","type":"int"},
                {"name":"is_amp","type":["null","boolean"],"default":null},
                {"name":"reasons","type":["null",{"type":"array","items":"string"}],"default":null},
                {"name":"media","type":["null",{"type":"array","items":["null","string"]}]},
                {"name":"at","type":{"type":"long","logicalType":"timestamp-millis"}}]}"#;

    #[test]
    fn record_fields_keep_writer_order_and_full_name() {
        let s = WriterSchema::parse(CLICK).unwrap();
        let (name, fields) = s.record().unwrap();
        assert_eq!(name, "dataexport.S3.inner.users.messages.email.Click");
        let names: Vec<&str> = fields.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["id", "time", "is_amp", "reasons", "media", "at"]);
    }

    #[test]
    fn describe_marks_nullable_and_nested_types() {
        let s = WriterSchema::parse(CLICK).unwrap();
        let (_, fields) = s.record().unwrap();
        let d: Vec<String> = fields.iter().map(|(_, id)| s.describe(*id)).collect();
        assert_eq!(
            d,
            [
                "string",
                "int",
                "boolean?",
                "array<string>?",
                "array<string?>?",
                "long"
            ]
        );
    }

    #[test]
    fn named_types_can_be_referenced_and_recursive() {
        let s = WriterSchema::parse(
            r#"{"type":"record","name":"Node","namespace":"t","fields":[
                {"name":"v","type":{"type":"enum","name":"Color","symbols":["RED","BLUE"]}},
                {"name":"w","type":"Color"},
                {"name":"next","type":["null","Node"]}]}"#,
        )
        .unwrap();
        let (_, fields) = s.record().unwrap();
        assert_eq!(s.describe(fields[1].1), "enum:t.Color");
        assert_eq!(s.describe(fields[2].1), "record:t.Node?");
    }

    #[test]
    fn unknown_type_names_are_rejected_with_their_path() {
        let err = WriterSchema::parse(
            r#"{"type":"record","name":"R","fields":[{"name":"a","type":"Nope"}]}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("fields[0]"), "{err}");
    }

    #[test]
    fn top_level_must_be_a_record() {
        let s = WriterSchema::parse(r#""string""#).unwrap();
        assert!(matches!(s.record(), Err(SchemaError::NotRecord(_))));
    }

    #[test]
    fn arrow_avro_gets_encodings_and_null_items_as_empty_records() {
        let s = WriterSchema::parse(
            r#"{"type":"record","name":"R","fields":[
                {"name":"t","type":{"type":"long","logicalType":"timestamp-millis"}},
                {"name":"u","type":["null",{"type":"string","logicalType":"uuid"}]},
                {"name":"a","type":{"type":"array","items":"null"}},
                {"name":"m","type":{"type":"map","values":{"type":"null"}}}]}"#,
        )
        .unwrap();
        let j: Value = serde_json::from_str(s.arrow_avro_json()).unwrap();
        assert!(!s.arrow_avro_json().contains("logicalType"), "{j}");
        assert_eq!(j["fields"][0]["type"]["type"], "long");
        assert_eq!(j["fields"][2]["type"]["items"]["type"], "record");
        assert_eq!(
            j["fields"][2]["type"]["items"]["name"],
            format!("currents_bridge.{NULL_ITEM}1")
        );
        assert_eq!(
            j["fields"][3]["type"]["values"]["name"],
            format!("currents_bridge.{NULL_ITEM}2")
        );
        assert!(s.has_free_array_items());
        assert!(!s.has_free_array_items_other_than_null());
    }
}
