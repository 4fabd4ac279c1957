//! Avro binary → plain JSON, the inverse of `encode`: unions unwrapped, records as objects,
//! `bytes` and `fixed` as strings of U+0000–U+00FF, decimals as decimal strings.

use super::{Mismatch, json_key, named};
use apache_avro::Schema;
use apache_avro::schema::{DecimalSchema, InnerDecimalSchema, NamespaceRef, UuidSchema};
use serde_json::{Map, Value as Json};

/// Deepest nesting read: a datum cannot make the reader recurse without bound (a recursive
/// schema, such as a linked list, could otherwise).
const MAX_DEPTH: usize = 64;

pub(super) struct Decoder<'a, 'b> {
    names: &'a super::Names,
    input: &'b [u8],
    depth: usize,
}

impl<'a, 'b> Decoder<'a, 'b> {
    pub(super) fn new(names: &'a super::Names, input: &'b [u8]) -> Self {
        Decoder {
            names,
            input,
            depth: 0,
        }
    }

    /// One value of `schema` that uses up the input exactly.
    pub(super) fn whole(mut self, schema: &Schema) -> Result<Json, Mismatch> {
        let value = self.get(schema, None)?;
        if !self.input.is_empty() {
            return self.fail(format!("{} bytes after the value", self.input.len()));
        }
        Ok(value)
    }

    fn fail<T>(&self, problem: impl Into<String>) -> Result<T, Mismatch> {
        Err(Mismatch::here(problem))
    }

    fn take(&mut self, n: usize) -> Result<&'b [u8], Mismatch> {
        if self.input.len() < n {
            return self.fail("the datum ends early");
        }
        let (head, rest) = self.input.split_at(n);
        self.input = rest;
        Ok(head)
    }

    fn long(&mut self) -> Result<i64, Mismatch> {
        let mut z: u64 = 0;
        for shift in (0..64).step_by(7) {
            let [b] = self.take(1)? else { unreachable!() };
            z |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok((z >> 1) as i64 ^ -((z & 1) as i64));
            }
        }
        self.fail("a variable-length integer longer than 10 bytes")
    }

    fn int(&mut self) -> Result<i32, Mismatch> {
        let n = self.long()?;
        i32::try_from(n).or_else(|_| self.fail(format!("{n} is out of an int's range")))
    }

    fn len(&mut self) -> Result<usize, Mismatch> {
        let n = self.long()?;
        match usize::try_from(n) {
            Ok(n) if n <= self.input.len() => Ok(n),
            _ => self.fail(format!(
                "a length of {n} with {} bytes left",
                self.input.len()
            )),
        }
    }

    fn bytes(&mut self) -> Result<&'b [u8], Mismatch> {
        let n = self.len()?;
        self.take(n)
    }

    fn string(&mut self) -> Result<String, Mismatch> {
        let b = self.bytes()?;
        match std::str::from_utf8(b) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => self.fail("a string that is not UTF-8"),
        }
    }

    /// The count of the next block of an array or map; a negative count is followed by the
    /// block's size in bytes (Avro specification, "Complex Types" in "Binary Encoding").
    fn block(&mut self) -> Result<usize, Mismatch> {
        let n = self.long()?;
        let count = if n < 0 {
            self.long()?;
            n.unsigned_abs()
        } else {
            n as u64
        };
        // Items of most types take a byte or more; `null` items take none, so a few bytes
        // could claim billions of them: the count is held to 8 per byte left.
        match usize::try_from(count) {
            Ok(c) if c <= self.input.len().max(1) * 8 => Ok(c),
            _ => self.fail(format!(
                "a block of {count} items with {} bytes left",
                self.input.len()
            )),
        }
    }

    fn get(&mut self, schema: &Schema, ns: NamespaceRef) -> Result<Json, Mismatch> {
        if self.depth >= MAX_DEPTH {
            return self.fail("nested deeper than 64 levels");
        }
        self.depth += 1;
        let value = self.value(schema, ns);
        self.depth -= 1;
        value
    }

    fn value(&mut self, schema: &Schema, ns: NamespaceRef) -> Result<Json, Mismatch> {
        Ok(match schema {
            Schema::Null => Json::Null,
            Schema::Boolean => match self.take(1)? {
                [0] => Json::Bool(false),
                [1] => Json::Bool(true),
                _ => return self.fail("a boolean byte other than 0 or 1"),
            },
            Schema::Int | Schema::Date | Schema::TimeMillis => Json::from(self.int()?),
            Schema::Long
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => Json::from(self.long()?),
            Schema::Float => {
                let b = self.take(4)?;
                float(f64::from(f32::from_le_bytes(
                    b.try_into().unwrap_or_default(),
                )))
            }
            Schema::Double => {
                let b = self.take(8)?;
                float(f64::from_le_bytes(b.try_into().unwrap_or_default()))
            }
            Schema::String | Schema::Uuid(UuidSchema::String) => Json::String(self.string()?),
            Schema::Uuid(UuidSchema::Bytes) => {
                let b = self.bytes()?;
                Json::String(
                    uuid_text(b).map_or_else(|| self.fail("a UUID of other than 16 bytes"), Ok)?,
                )
            }
            Schema::Uuid(UuidSchema::Fixed(_)) => {
                Json::String(uuid_text(self.take(16)?).unwrap_or_default())
            }
            Schema::Bytes => Json::String(latin1(self.bytes()?)),
            Schema::Fixed(f) => Json::String(latin1(self.take(f.size)?)),
            Schema::Duration(_) => {
                let b = self.take(12)?;
                let part = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
                serde_json::json!({"months": part(0), "days": part(4), "millis": part(8)})
            }
            Schema::Enum(e) => {
                let i = self.long()?;
                match usize::try_from(i).ok().and_then(|i| e.symbols.get(i)) {
                    Some(s) => Json::String(s.clone()),
                    None => return self.fail(format!("enum index {i} out of range")),
                }
            }
            Schema::Decimal(d) => self.decimal(d)?,
            Schema::BigDecimal => {
                return self.fail("the big-decimal logical type is not supported");
            }
            Schema::Array(a) => {
                let mut items = Vec::new();
                loop {
                    let n = self.block()?;
                    if n == 0 {
                        break;
                    }
                    for _ in 0..n {
                        let i = items.len();
                        items.push(
                            self.get(&a.items, ns)
                                .map_err(|e| e.within(format_args!("[{i}]")))?,
                        );
                    }
                }
                Json::Array(items)
            }
            Schema::Map(m) => {
                let mut entries = Map::new();
                loop {
                    let n = self.block()?;
                    if n == 0 {
                        break;
                    }
                    for _ in 0..n {
                        let k = self.string()?;
                        let v = self
                            .get(&m.types, ns)
                            .map_err(|e| e.within(format_args!(".{k}")))?;
                        entries.insert(k, v);
                    }
                }
                Json::Object(entries)
            }
            Schema::Record(r) => {
                let inner = r.name.namespace();
                let mut fields = Map::new();
                for field in &r.fields {
                    let key = json_key(field);
                    let v = self
                        .get(&field.schema, inner)
                        .map_err(|e| e.within(format_args!(".{key}")))?;
                    fields.insert(key.to_owned(), v);
                }
                Json::Object(fields)
            }
            Schema::Union(u) => {
                let i = self.long()?;
                match usize::try_from(i).ok().and_then(|i| u.variants().get(i)) {
                    Some(branch) => self.get(branch, ns)?,
                    None => return self.fail(format!("union branch {i} out of range")),
                }
            }
            Schema::Ref { name } => {
                let target = named(self.names, name, ns)?;
                self.get(target, target.namespace().or(ns))?
            }
        })
    }

    fn decimal(&mut self, d: &DecimalSchema) -> Result<Json, Mismatch> {
        let raw = match &d.inner {
            InnerDecimalSchema::Bytes => self.bytes()?,
            InnerDecimalSchema::Fixed(f) => self.take(f.size)?,
        };
        if raw.len() > 16 {
            return self.fail("a decimal wider than 128 bits");
        }
        let fill = if raw.first().is_some_and(|b| b & 0x80 != 0) {
            0xff
        } else {
            0
        };
        let mut full = [fill; 16];
        full[16 - raw.len()..].copy_from_slice(raw);
        let n = i128::from_be_bytes(full);
        Ok(Json::String(decimal_text(n, d.scale)))
    }
}

/// A float as JSON: non-finite values, which JSON cannot hold, as Avro's JSON names them.
fn float(f: f64) -> Json {
    serde_json::Number::from_f64(f).map_or_else(
        || {
            Json::String(if f.is_nan() {
                "NaN".into()
            } else if f > 0.0 {
                "Infinity".into()
            } else {
                "-Infinity".into()
            })
        },
        Json::Number,
    )
}

fn latin1(b: &[u8]) -> String {
    b.iter().map(|&c| char::from(c)).collect()
}

fn uuid_text(b: &[u8]) -> Option<String> {
    if b.len() != 16 {
        return None;
    }
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    Some(format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    ))
}

/// 1250 at scale 2 is `12.50`.
fn decimal_text(n: i128, scale: usize) -> String {
    let digits = n.unsigned_abs().to_string();
    let sign = if n < 0 { "-" } else { "" };
    if scale == 0 {
        return format!("{sign}{digits}");
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{sign}{int}.{frac}")
}
