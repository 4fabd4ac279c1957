//! A JSON value parsed for encoding only: strings borrowed from the payload where they have no
//! escapes, objects as a list of members rather than a sorted map. Parsing a payload this way
//! costs about half of building a `serde_json::Value`, and the encoder reads each value once.

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use std::borrow::Cow;

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Json<'a> {
    Null,
    Bool(bool),
    Int(i64),
    /// An integer above `i64::MAX`.
    UInt(u64),
    Float(f64),
    Str(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    /// Members in the order they came; a repeated key's last value counts.
    Object(Vec<(Cow<'a, str>, Json<'a>)>),
}

impl<'a> Json<'a> {
    pub(super) fn parse(text: &'a [u8]) -> Result<Json<'a>, serde_json::Error> {
        let mut de = serde_json::Deserializer::from_slice(text);
        let value = Json::deserialize(&mut de)?;
        de.end()?;
        Ok(value)
    }

    /// A default value of a schema (kept by apache-avro as a `serde_json::Value`).
    pub(super) fn from_value(v: &'a serde_json::Value) -> Json<'a> {
        use serde_json::Value as V;
        match v {
            V::Null => Json::Null,
            V::Bool(b) => Json::Bool(*b),
            V::Number(n) => match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => Json::Int(i),
                (None, Some(u)) => Json::UInt(u),
                _ => Json::Float(n.as_f64().unwrap_or(f64::NAN)),
            },
            V::String(s) => Json::Str(Cow::Borrowed(s)),
            V::Array(a) => Json::Array(a.iter().map(Json::from_value).collect()),
            V::Object(o) => Json::Object(
                o.iter()
                    .map(|(k, v)| (Cow::Borrowed(k.as_str()), Json::from_value(v)))
                    .collect(),
            ),
        }
    }

    /// The value of member `key` of an object.
    pub(super) fn member<'s>(
        members: &'s [(Cow<'a, str>, Json<'a>)],
        key: &str,
    ) -> Option<&'s Json<'a>> {
        members.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

impl<'de> Deserialize<'de> for Json<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }
    fn visit_none<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }
    fn visit_bool<E>(self, b: bool) -> Result<Json<'de>, E> {
        Ok(Json::Bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Json<'de>, E> {
        Ok(Json::Int(n))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Json<'de>, E> {
        Ok(i64::try_from(n).map_or(Json::UInt(n), Json::Int))
    }
    fn visit_f64<E>(self, n: f64) -> Result<Json<'de>, E> {
        Ok(Json::Float(n))
    }
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Json<'de>, E> {
        Ok(Json::Str(Cow::Borrowed(s)))
    }
    fn visit_str<E>(self, s: &str) -> Result<Json<'de>, E> {
        Ok(Json::Str(Cow::Owned(s.to_owned())))
    }
    fn visit_string<E>(self, s: String) -> Result<Json<'de>, E> {
        Ok(Json::Str(Cow::Owned(s)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'de>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(v) = seq.next_element()? {
            items.push(v);
        }
        Ok(Json::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'de>, A::Error> {
        let mut members = Vec::with_capacity(map.size_hint().unwrap_or(8).min(64));
        while let Some((k, v)) = map.next_entry::<Key<'de>, Json<'de>>()? {
            members.push((k.0, v));
        }
        Ok(Json::Object(members))
    }
}

/// An object key, borrowed where it has no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E>(self, s: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s)))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_like_serde_json_and_borrows_plain_strings() {
        let v = Json::parse(br#"{"a": [1, -2, 1.5, 18446744073709551615, null, true], "b\n": "x\"y", "c": "plain"}"#).unwrap();
        let Json::Object(m) = &v else { panic!() };
        assert_eq!(
            Json::member(m, "a"),
            Some(&Json::Array(vec![
                Json::Int(1),
                Json::Int(-2),
                Json::Float(1.5),
                Json::UInt(u64::MAX),
                Json::Null,
                Json::Bool(true)
            ]))
        );
        assert_eq!(Json::member(m, "b\n"), Some(&Json::Str("x\"y".into())));
        assert!(matches!(
            Json::member(m, "c"),
            Some(Json::Str(Cow::Borrowed("plain")))
        ));
        assert!(Json::parse(b"{} x").is_err(), "trailing bytes");
        assert!(Json::parse(b"{\"a\":").is_err());
    }

    #[test]
    fn a_repeated_key_takes_its_last_value() {
        let v = Json::parse(br#"{"a": 1, "a": 2}"#).unwrap();
        let Json::Object(m) = &v else { panic!() };
        assert_eq!(Json::member(m, "a"), Some(&Json::Int(2)));
    }
}
