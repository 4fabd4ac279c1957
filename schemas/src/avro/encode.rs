//! Plain JSON → Avro binary, walking the schema and the value together.

use super::json::Json;
use super::{Mismatch, json_key, json_name};
use apache_avro::Schema;
use apache_avro::schema::{
    DecimalSchema, InnerDecimalSchema, NamespaceRef, RecordSchema, UuidSchema,
};

pub(super) struct Encoder<'a> {
    names: &'a super::Names,
}

/// How well a union branch suits a JSON value: branches of the value's own type are tried
/// before those it converts to (an integer for a `double`, a string for `bytes`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Affinity {
    Exact,
    Convertible,
    None,
}

impl<'a> Encoder<'a> {
    pub(super) fn new(names: &'a super::Names) -> Self {
        Encoder { names }
    }

    fn fail<T>(&self, problem: impl Into<String>) -> Result<T, Mismatch> {
        Err(Mismatch::here(problem))
    }

    /// The schema a named reference stands for.
    fn deref<'s>(&self, schema: &'s Schema, ns: NamespaceRef<'s>) -> Result<&'s Schema, Mismatch>
    where
        'a: 's,
    {
        match schema {
            Schema::Ref { name } => super::named(self.names, name, ns),
            other => Ok(other),
        }
    }

    /// Appends `value` encoded as `schema` to `out`; `ns` is the enclosing namespace.
    pub(super) fn put(
        &self,
        schema: &Schema,
        ns: NamespaceRef,
        value: &Json,
        out: &mut Vec<u8>,
    ) -> Result<(), Mismatch> {
        match schema {
            Schema::Null => match value {
                Json::Null => Ok(()),
                _ => self.fail(format!("expected null, got {}", kind(value))),
            },
            Schema::Boolean => match value {
                Json::Bool(b) => {
                    out.push(u8::from(*b));
                    Ok(())
                }
                _ => self.fail(format!("expected a boolean, got {}", kind(value))),
            },
            Schema::Int | Schema::Date | Schema::TimeMillis => {
                let n = self.integer(value)?;
                let n =
                    i32::try_from(n).or_else(|_| self.fail(format!("{n} is not a 32-bit int")))?;
                put_long(i64::from(n), out);
                Ok(())
            }
            Schema::Long
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => {
                let n = self.integer(value)?;
                put_long(n, out);
                Ok(())
            }
            Schema::Float => {
                let f = self.number(value)?;
                let narrow = f as f32;
                if narrow.is_infinite() {
                    return self.fail(format!("{f:e} is out of a float's range"));
                }
                out.extend_from_slice(&narrow.to_le_bytes());
                Ok(())
            }
            Schema::Double => {
                let f = self.number(value)?;
                out.extend_from_slice(&f.to_le_bytes());
                Ok(())
            }
            Schema::String | Schema::Uuid(UuidSchema::String) => {
                let s = self.string(value)?;
                if matches!(schema, Schema::Uuid(_)) {
                    self.uuid(s)?;
                }
                put_bytes(s.as_bytes(), out);
                Ok(())
            }
            Schema::Uuid(UuidSchema::Bytes) => {
                let u = self.uuid(self.string(value)?)?;
                put_bytes(&u, out);
                Ok(())
            }
            Schema::Uuid(UuidSchema::Fixed(_)) => {
                let u = self.uuid(self.string(value)?)?;
                out.extend_from_slice(&u);
                Ok(())
            }
            Schema::Bytes => {
                let b = self.octets(value)?;
                put_bytes(&b, out);
                Ok(())
            }
            Schema::Fixed(f) => {
                let b = self.octets(value)?;
                if b.len() != f.size {
                    return self.fail(format!("expected {} bytes, got {}", f.size, b.len()));
                }
                out.extend_from_slice(&b);
                Ok(())
            }
            Schema::Enum(e) => {
                let s = self.string(value)?;
                match e.symbols.iter().position(|sym| sym == s) {
                    Some(i) => {
                        put_long(i as i64, out);
                        Ok(())
                    }
                    None => self.fail(format!("`{s}` is not a symbol of enum `{}`", e.name)),
                }
            }
            Schema::Decimal(d) => self.decimal(d, value, out),
            Schema::BigDecimal => self.fail("the big-decimal logical type is not supported"),
            Schema::Duration(_) => self.duration(value, out),
            Schema::Array(a) => {
                let Json::Array(items) = value else {
                    return self.fail(format!("expected an array, got {}", kind(value)));
                };
                if !items.is_empty() {
                    put_long(items.len() as i64, out);
                    for (i, item) in items.iter().enumerate() {
                        self.put(&a.items, ns, item, out)
                            .map_err(|e| e.within(format_args!("[{i}]")))?;
                    }
                }
                out.push(0);
                Ok(())
            }
            Schema::Map(m) => {
                let Json::Object(entries) = value else {
                    return self.fail(format!("expected an object (map), got {}", kind(value)));
                };
                if !entries.is_empty() {
                    put_long(entries.len() as i64, out);
                    for (k, v) in entries {
                        put_bytes(k.as_bytes(), out);
                        self.put(&m.types, ns, v, out)
                            .map_err(|e| e.within(format_args!(".{k}")))?;
                    }
                }
                out.push(0);
                Ok(())
            }
            Schema::Record(r) => self.record(r, value, out),
            Schema::Union(u) => {
                let mut tried = false;
                for wanted in [Affinity::Exact, Affinity::Convertible] {
                    for (i, branch) in u.variants().iter().enumerate() {
                        let branch_schema = self.deref(branch, ns)?;
                        if affinity(branch_schema, value) != wanted {
                            continue;
                        }
                        tried = true;
                        let mark = out.len();
                        put_long(i as i64, out);
                        match self.put(branch, ns, value, out) {
                            Ok(()) => return Ok(()),
                            Err(_) => out.truncate(mark),
                        }
                    }
                }
                let what = if tried { "fits" } else { "takes" };
                self.fail(format!("no branch of the union {what} {}", kind(value)))
            }
            Schema::Ref { .. } => {
                let target = self.deref(schema, ns)?;
                // A named type's own namespace is the enclosing one of what it holds.
                let inner_ns = target.namespace().or(ns);
                self.put(target, inner_ns, value, out)
            }
        }
    }

    fn record(&self, r: &RecordSchema, value: &Json, out: &mut Vec<u8>) -> Result<(), Mismatch> {
        let Json::Object(members) = value else {
            return self.fail(format!(
                "expected an object (record `{}`), got {}",
                r.name,
                kind(value)
            ));
        };
        let known = |k: &str| {
            r.lookup
                .get(k)
                .is_some_and(|&i| json_name(&r.fields[i]).is_none())
                || r.fields.iter().any(|f| json_name(f) == Some(k))
        };
        if let Some((unknown, _)) = members.iter().find(|(k, _)| !known(k)) {
            return self.fail(format!("`{unknown}` is not a field of record `{}`", r.name));
        }
        let ns = r.name.namespace();
        for field in &r.fields {
            let key = json_key(field);
            let written = match (Json::member(members, key), &field.default) {
                (Some(v), _) => self.put(&field.schema, ns, v, out),
                (None, Some(default)) => {
                    self.put_default(&field.schema, ns, &Json::from_value(default), out)
                }
                (None, None) => self.fail("missing, and the field has no default"),
            };
            written.map_err(|e| e.within(format_args!(".{key}")))?;
        }
        Ok(())
    }

    /// A field's default: for a union it is a value of the first branch (Avro specification,
    /// "Schema Declaration: Complex Types").
    fn put_default(
        &self,
        schema: &Schema,
        ns: NamespaceRef,
        default: &Json,
        out: &mut Vec<u8>,
    ) -> Result<(), Mismatch> {
        match schema {
            Schema::Union(u) => {
                let Some(first) = u.variants().first() else {
                    return self.fail("an empty union has no default");
                };
                put_long(0, out);
                self.put(first, ns, default, out)
            }
            _ => self.put(schema, ns, default, out),
        }
    }

    fn integer(&self, value: &Json) -> Result<i64, Mismatch> {
        match value {
            Json::Int(n) => Ok(*n),
            Json::UInt(n) => self.fail(format!("{n} is out of a long's range")),
            Json::Float(f) => self.fail(format!("expected an integer, got {f}")),
            _ => self.fail(format!("expected an integer, got {}", kind(value))),
        }
    }

    fn number(&self, value: &Json) -> Result<f64, Mismatch> {
        match value {
            Json::Int(n) => Ok(*n as f64),
            Json::UInt(n) => Ok(*n as f64),
            Json::Float(f) => Ok(*f),
            _ => self.fail(format!("expected a number, got {}", kind(value))),
        }
    }

    fn string<'v>(&self, value: &'v Json) -> Result<&'v str, Mismatch> {
        match value {
            Json::Str(s) => Ok(s),
            _ => self.fail(format!("expected a string, got {}", kind(value))),
        }
    }

    /// `bytes` and `fixed` from a string whose characters are U+0000–U+00FF, one byte each (the
    /// rule of Avro's own JSON encoding).
    fn octets(&self, value: &Json) -> Result<Vec<u8>, Mismatch> {
        let s = self.string(value)?;
        s.chars()
            .map(|c| u8::try_from(u32::from(c)).ok())
            .collect::<Option<Vec<u8>>>()
            .map_or_else(
                || self.fail("bytes are a string of characters U+0000 to U+00FF"),
                Ok,
            )
    }

    fn uuid(&self, s: &str) -> Result<[u8; 16], Mismatch> {
        parse_uuid(s).map_or_else(|| self.fail(format!("`{s}` is not a UUID")), Ok)
    }

    /// A decimal from a JSON number or a decimal string, with at most `scale` fractional
    /// digits, as its unscaled two's-complement big-endian integer.
    fn decimal(&self, d: &DecimalSchema, value: &Json, out: &mut Vec<u8>) -> Result<(), Mismatch> {
        let text = match value {
            Json::Int(n) => n.to_string(),
            Json::UInt(n) => n.to_string(),
            Json::Float(f) => f.to_string(),
            Json::Str(s) => s.to_string(),
            _ => return self.fail(format!("expected a decimal, got {}", kind(value))),
        };
        let unscaled = unscaled(&text, d.scale).map_or_else(
            || self.fail(format!("`{text}` is not a decimal of scale {}", d.scale)),
            Ok,
        )?;
        if digits(unscaled) > d.precision {
            return self.fail(format!("`{text}` has more than {} digits", d.precision));
        }
        let full = unscaled.to_be_bytes();
        match &d.inner {
            InnerDecimalSchema::Bytes => {
                // The shortest form: drop leading bytes that only repeat the sign.
                let mut start = 0;
                while start < full.len() - 1
                    && ((full[start] == 0 && full[start + 1] & 0x80 == 0)
                        || (full[start] == 0xff && full[start + 1] & 0x80 != 0))
                {
                    start += 1;
                }
                put_bytes(&full[start..], out);
            }
            InnerDecimalSchema::Fixed(f) => {
                let size = f.size;
                if size >= full.len() {
                    let fill = if unscaled < 0 { 0xff } else { 0 };
                    out.extend(std::iter::repeat_n(fill, size - full.len()));
                    out.extend_from_slice(&full);
                } else {
                    let (cut, kept) = full.split_at(full.len() - size);
                    let sign_ok = cut
                        .iter()
                        .all(|b| *b == if unscaled < 0 { 0xff } else { 0 })
                        && (kept[0] & 0x80 != 0) == (unscaled < 0);
                    if !sign_ok {
                        return self.fail(format!("`{text}` does not fit {size} bytes"));
                    }
                    out.extend_from_slice(kept);
                }
            }
        }
        Ok(())
    }

    /// Avro's `duration`: an object of `months`, `days` and `millis`, each 0..2^32.
    fn duration(&self, value: &Json, out: &mut Vec<u8>) -> Result<(), Mismatch> {
        let Json::Object(o) = value else {
            return self.fail(format!("expected a duration object, got {}", kind(value)));
        };
        if let Some((k, _)) = o
            .iter()
            .find(|(k, _)| !["months", "days", "millis"].contains(&&**k))
        {
            return self.fail(format!("`{k}` is not a part of a duration"));
        }
        for part in ["months", "days", "millis"] {
            let n = match Json::member(o, part) {
                Some(Json::Int(n)) => u32::try_from(*n).ok(),
                _ => None,
            };
            let Some(n) = n else {
                return self.fail(format!("`{part}` must be an integer from 0 to 4294967295"));
            };
            out.extend_from_slice(&n.to_le_bytes());
        }
        Ok(())
    }
}

/// How a union branch suits a value (see [`Affinity`]); references are resolved before.
fn affinity(branch: &Schema, value: &Json) -> Affinity {
    use Affinity::*;
    match (value, branch) {
        (Json::Null, Schema::Null) | (Json::Bool(_), Schema::Boolean) => Exact,
        (Json::Int(_) | Json::UInt(_), s) => match s {
            Schema::Int
            | Schema::Long
            | Schema::Date
            | Schema::TimeMillis
            | Schema::TimeMicros
            | Schema::TimestampMillis
            | Schema::TimestampMicros
            | Schema::TimestampNanos
            | Schema::LocalTimestampMillis
            | Schema::LocalTimestampMicros
            | Schema::LocalTimestampNanos => Exact,
            Schema::Float | Schema::Double | Schema::Decimal(_) => Convertible,
            _ => None,
        },
        (Json::Float(_), Schema::Float | Schema::Double) => Exact,
        (Json::Float(_), Schema::Decimal(_)) => Convertible,
        (Json::Str(_), Schema::String | Schema::Uuid(_) | Schema::Enum(_)) => Exact,
        (Json::Str(_), Schema::Bytes | Schema::Fixed(_) | Schema::Decimal(_)) => Convertible,
        (Json::Array(_), Schema::Array(_)) => Exact,
        (Json::Object(_), Schema::Record(_) | Schema::Map(_) | Schema::Duration(_)) => Exact,
        _ => None,
    }
}

/// What a JSON value is, for messages.
fn kind(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Int(_) | Json::UInt(_) => "an integer",
        Json::Float(_) => "a number",
        Json::Str(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// Avro's `long`: zig-zag, then 7 bits a byte, least significant first.
pub(super) fn put_long(n: i64, out: &mut Vec<u8>) {
    let mut z = ((n << 1) ^ (n >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn put_bytes(b: &[u8], out: &mut Vec<u8>) {
    put_long(b.len() as i64, out);
    out.extend_from_slice(b);
}

/// `8-4-4-4-12` hexadecimal digits as 16 bytes.
pub(super) fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
        return None;
    }
    let hex: Vec<u8> = b.iter().copied().filter(|c| *c != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

/// `12.5` at scale 2 is 1250; `None` when there are more fractional digits than the scale or
/// the text is not a plain decimal (an exponent is accepted when it leaves an exact value).
fn unscaled(text: &str, scale: usize) -> Option<i128> {
    let (mantissa, exp) = match text.find(['e', 'E']) {
        Some(i) => (&text[..i], text[i + 1..].parse::<i32>().ok()?),
        None => (text, 0),
    };
    let (negative, digits) = match mantissa.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, mantissa.strip_prefix('+').unwrap_or(mantissa)),
    };
    let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
    if int.is_empty() && frac.is_empty()
        || !int.bytes().chain(frac.bytes()).all(|c| c.is_ascii_digit())
    {
        return None;
    }
    // The value is all digits × 10^(exp - frac.len()); bring it to 10^-scale.
    let shift = i64::from(exp) - frac.len() as i64 + scale as i64;
    let mut n: i128 = 0;
    for c in int.bytes().chain(frac.bytes()) {
        n = n.checked_mul(10)?.checked_add(i128::from(c - b'0'))?;
    }
    if shift >= 0 {
        n = n.checked_mul(10i128.checked_pow(u32::try_from(shift).ok()?)?)?;
    } else {
        let div = 10i128.checked_pow(u32::try_from(-shift).ok()?)?;
        if n % div != 0 {
            return None;
        }
        n /= div;
    }
    Some(if negative { -n } else { n })
}

fn digits(n: i128) -> usize {
    n.unsigned_abs()
        .checked_ilog10()
        .map_or(1, |l| l as usize + 1)
}
