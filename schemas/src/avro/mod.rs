//! Tenants' payload schemas (docs/analytics.md): a device's plain JSON object becomes an Avro
//! record in the Confluent wire format, and back.
//!
//! The mapping is Ferrule's own, not Avro's JSON encoding: a record is a JSON object keyed by
//! field name, and a union takes the branch the JSON value's type names (`null`, a boolean, an
//! integer, a number, a string, an array, an object), with no `{"type": value}` wrapper.
//! `encode` writes Avro's binary encoding (Avro 1.11 specification, "Binary Encoding") straight
//! from the JSON value; `decode` reads it back into JSON. Schemas are parsed by `apache-avro`.
//!
//! The Confluent wire format (Confluent's Schema Registry documentation, "Wire format"): magic
//! byte 0, the schema id as a 4-byte big-endian integer, then the Avro binary datum.

mod decode;
mod encode;
mod json;
pub mod own;

use apache_avro::Schema;
use apache_avro::schema::{Name, NamespaceRef};
use std::collections::HashMap;

/// The content type of a record the gateway encoded (the Avro specification's name for Avro
/// binary over HTTP).
pub const AVRO_CONTENT_TYPE: &str = "avro/binary";

/// The first byte of the Confluent wire format.
pub const MAGIC_BYTE: u8 = 0;

/// Length of the wire format's header: the magic byte and the schema id.
pub const WIRE_HEADER_LEN: usize = 5;

/// A registered schema, parsed once, with the named types its references resolve to.
pub struct PayloadSchema {
    id: u32,
    schema: Schema,
    names: Names,
}

/// Every named type of a schema by its full name.
pub(crate) type Names = HashMap<Name, Schema>;

/// The named type a reference stands for, seen from namespace `ns`.
fn named<'n>(names: &'n Names, name: &Name, ns: NamespaceRef) -> Result<&'n Schema, Mismatch> {
    let full = name.fully_qualified_name(ns);
    names
        .get(full.as_ref())
        .ok_or_else(|| Mismatch::here(format!("unknown type `{full}`")))
}

/// The JSON key of a field whose key is not a legal Avro name (`remote-id`): its `json-name`
/// attribute (docs/analytics.md).
fn json_name(field: &apache_avro::schema::RecordField) -> Option<&str> {
    field
        .custom_attributes
        .get("json-name")
        .and_then(serde_json::Value::as_str)
}

/// The JSON key of a field: its `json-name`, else its name.
fn json_key(field: &apache_avro::schema::RecordField) -> &str {
    json_name(field).unwrap_or(&field.name)
}

/// Collects the named types of `schema` (records, enums, fixed) under their full names.
fn collect_names(schema: &Schema, ns: NamespaceRef, names: &mut Names) {
    match schema {
        Schema::Record(r) => {
            let name = r.name.fully_qualified_name(ns).into_owned();
            let inner = name.namespace().map(str::to_owned);
            names.insert(name, schema.clone());
            for f in &r.fields {
                collect_names(&f.schema, inner.as_deref(), names);
            }
        }
        Schema::Enum(e) => {
            names.insert(e.name.fully_qualified_name(ns).into_owned(), schema.clone());
        }
        Schema::Fixed(f) => {
            names.insert(f.name.fully_qualified_name(ns).into_owned(), schema.clone());
        }
        Schema::Array(a) => collect_names(&a.items, ns, names),
        Schema::Map(m) => collect_names(&m.types, ns, names),
        Schema::Union(u) => u
            .variants()
            .iter()
            .for_each(|v| collect_names(v, ns, names)),
        _ => {}
    }
}

impl std::fmt::Debug for PayloadSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PayloadSchema")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Why a payload does not fit its schema: where (a JSON path such as `$.readings[2].value`) and
/// what was wrong there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct Mismatch {
    pub path: String,
    pub problem: String,
}

impl Mismatch {
    /// A mismatch at the value being looked at; enclosing values add their steps as the error
    /// travels out ([`Mismatch::within`]), so a value that fits costs no path at all.
    fn here(problem: impl Into<String>) -> Self {
        Mismatch {
            path: "$".into(),
            problem: problem.into(),
        }
    }

    /// This mismatch inside the field or index `step` (`.name`, `[2]`) of the enclosing value.
    fn within(mut self, step: std::fmt::Arguments) -> Self {
        self.path.insert_str(1, &step.to_string());
        self
    }
}

impl PayloadSchema {
    /// Parses a schema's JSON text (as the registry stores it) under its registry id.
    pub fn parse(id: u32, text: &str) -> Result<Self, apache_avro::Error> {
        let schema = Schema::parse_str(text)?;
        let mut names = Names::new();
        collect_names(&schema, None, &mut names);
        Ok(PayloadSchema { id, schema, names })
    }

    /// The schema's id in the registry (the wire format's 4 bytes).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The parsed schema.
    pub fn schema(&self) -> &Schema {
        &self.schema
    }

    /// A JSON payload as a record in the wire format, appended to `out`.
    pub fn encode_json(&self, json: &[u8], out: &mut Vec<u8>) -> Result<(), Mismatch> {
        let value =
            json::Json::parse(json).map_err(|e| Mismatch::here(format!("not JSON: {e}")))?;
        out.reserve(WIRE_HEADER_LEN + json.len());
        out.push(MAGIC_BYTE);
        out.extend_from_slice(&self.id.to_be_bytes());
        encode::Encoder::new(&self.names).put(self.schema(), None, &value, out)
    }

    /// Checks that `datum` (the Avro binary after the wire header) is one whole value of this
    /// schema, nothing missing and nothing left over.
    pub fn check(&self, datum: &[u8]) -> Result<(), Mismatch> {
        self.decode(datum).map(drop)
    }

    /// The Avro binary `datum` as plain JSON (the inverse of [`Self::encode_json`]).
    pub fn decode(&self, datum: &[u8]) -> Result<serde_json::Value, Mismatch> {
        decode::Decoder::new(&self.names, datum).whole(self.schema())
    }
}

/// The schema id and the datum of a payload in the wire format; `None` when it is not in it.
pub fn split_wire(payload: &[u8]) -> Option<(u32, &[u8])> {
    match payload {
        [MAGIC_BYTE, a, b, c, d, datum @ ..] => Some((u32::from_be_bytes([*a, *b, *c, *d]), datum)),
        _ => None,
    }
}

/// Whether a payload claims the wire format. JSON text never starts with a zero byte, so this
/// tells a device's Avro from its JSON without a content type.
pub fn is_wire_format(payload: &[u8]) -> bool {
    payload.first() == Some(&MAGIC_BYTE)
}

#[cfg(test)]
mod tests;
