use super::*;
use apache_avro::types::Value as Avro;
use serde_json::json;

fn schema(text: serde_json::Value) -> PayloadSchema {
    PayloadSchema::parse(7, &text.to_string()).expect("schema parses")
}

fn encode(s: &PayloadSchema, json: serde_json::Value) -> Result<Vec<u8>, Mismatch> {
    let mut out = Vec::new();
    s.encode_json(json.to_string().as_bytes(), &mut out)?;
    Ok(out)
}

/// What apache-avro reads from the datum of `wire` (the reference implementation).
fn read_back(s: &PayloadSchema, wire: &[u8]) -> Avro {
    let (id, mut datum) = split_wire(wire).expect("wire format");
    assert_eq!(id, s.id());
    let reader = apache_avro::reader::datum::GenericDatumReader::builder(s.schema())
        .build()
        .unwrap();
    let v = reader.read_value(&mut datum).expect("apache-avro reads it");
    assert!(datum.is_empty(), "apache-avro used every byte");
    v
}

fn reading() -> PayloadSchema {
    schema(json!({
        "type": "record", "name": "Reading", "namespace": "org.example",
        "fields": [
            {"name": "temp", "type": "double"},
            {"name": "count", "type": "long"},
            {"name": "label", "type": ["null", "string"], "default": null},
            {"name": "ok", "type": "boolean", "default": true},
            {"name": "tags", "type": {"type": "array", "items": "string"}, "default": []},
            {"name": "extra", "type": {"type": "map", "values": "int"}, "default": {}},
            {"name": "unit", "type": {"type": "enum", "name": "Unit", "symbols": ["C", "F"]}, "default": "C"},
        ]
    }))
}

#[test]
fn a_plain_json_object_becomes_the_record_apache_avro_reads() {
    let s = reading();
    let wire = encode(
        &s,
        json!({"temp": 21.5, "count": 3, "label": "kitchen", "tags": ["a", "b"],
               "extra": {"x": -1}, "unit": "F"}),
    )
    .unwrap();
    assert_eq!(
        &wire[..5],
        &[0, 0, 0, 0, 7],
        "magic byte, then the id big-endian"
    );
    let Avro::Record(fields) = read_back(&s, &wire) else {
        panic!("not a record")
    };
    let get = |n: &str| fields.iter().find(|(k, _)| k == n).unwrap().1.clone();
    assert_eq!(get("temp"), Avro::Double(21.5));
    assert_eq!(get("count"), Avro::Long(3));
    assert_eq!(
        get("label"),
        Avro::Union(1, Box::new(Avro::String("kitchen".into())))
    );
    assert_eq!(get("ok"), Avro::Boolean(true), "the default filled in");
    assert_eq!(
        get("tags"),
        Avro::Array(vec![Avro::String("a".into()), Avro::String("b".into())])
    );
    assert_eq!(get("unit"), Avro::Enum(1, "F".into()));
}

#[test]
fn decoding_gives_the_same_values_back() {
    let s = reading();
    let sent = json!({"temp": 21.5, "count": 3, "label": null, "ok": false, "tags": ["x"],
                      "extra": {"a": 1, "b": 2}, "unit": "C"});
    let wire = encode(&s, sent.clone()).unwrap();
    let (_, datum) = split_wire(&wire).unwrap();
    assert_eq!(s.decode(datum).unwrap(), sent);
}

#[test]
fn known_bytes_of_the_specification() {
    // The specification's examples: long 64 is 0x80 0x01, -3 is 0x05, "foo" is 06 66 6f 6f.
    let s = schema(json!({"type": "record", "name": "R", "fields": [
        {"name": "a", "type": "long"}, {"name": "b", "type": "long"},
        {"name": "c", "type": "string"}]}));
    let wire = encode(&s, json!({"a": 64, "b": -3, "c": "foo"})).unwrap();
    assert_eq!(&wire[5..], &[0x80, 0x01, 0x05, 0x06, b'f', b'o', b'o']);
}

#[test]
fn unions_take_the_branch_of_the_values_type() {
    let s = schema(json!({"type": "record", "name": "R", "fields": [
        {"name": "v", "type": ["null", "double", "long", "string", "boolean",
                                {"type": "array", "items": "int"},
                                {"type": "map", "values": "string"}]}]}));
    let branch = |v: serde_json::Value| {
        let wire = encode(&s, json!({ "v": v })).unwrap();
        let Avro::Record(f) = read_back(&s, &wire) else {
            panic!()
        };
        match &f[0].1 {
            Avro::Union(i, _) => *i,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(branch(json!(null)), 0);
    assert_eq!(branch(json!(1.5)), 1);
    assert_eq!(branch(json!(7)), 2, "an integer prefers long over double");
    assert_eq!(branch(json!("x")), 3);
    assert_eq!(branch(json!(true)), 4);
    assert_eq!(branch(json!([1, 2])), 5);
    assert_eq!(branch(json!({"k": "v"})), 6);
    let only_double = schema(json!({"type": "record", "name": "R", "fields": [
        {"name": "v", "type": ["null", "double"]}]}));
    assert!(
        encode(&only_double, json!({"v": 7})).is_ok(),
        "an integer fits a double"
    );
}

#[test]
fn records_in_unions_are_told_apart_by_their_fields() {
    let s = schema(
        json!({"type": "record", "name": "Outer", "namespace": "n", "fields": [
        {"name": "v", "type": [
            {"type": "record", "name": "A", "fields": [{"name": "a", "type": "int"}]},
            {"type": "record", "name": "B", "fields": [{"name": "b", "type": "string"}]}]},
        {"name": "w", "type": ["null", "B"]}]}),
    );
    let wire = encode(&s, json!({"v": {"b": "x"}, "w": {"b": "y"}})).unwrap();
    let Avro::Record(f) = read_back(&s, &wire) else {
        panic!()
    };
    assert!(matches!(f[0].1, Avro::Union(1, _)), "{:?}", f[0].1);
    assert!(
        matches!(f[1].1, Avro::Union(1, _)),
        "a named reference resolves"
    );
    let (_, datum) = split_wire(&wire).unwrap();
    assert_eq!(
        s.decode(datum).unwrap(),
        json!({"v": {"b": "x"}, "w": {"b": "y"}})
    );
}

#[test]
fn what_does_not_fit_is_refused_with_where() {
    let s = reading();
    let err = |v| encode(&s, v).unwrap_err().to_string();
    assert_eq!(
        err(json!({"temp": "warm", "count": 1})),
        "$.temp: expected a number, got a string"
    );
    assert_eq!(
        err(json!({"count": 1})),
        "$.temp: missing, and the field has no default"
    );
    assert_eq!(
        err(json!({"temp": 1.0, "count": 1, "humidity": 3})),
        "$: `humidity` is not a field of record `org.example.Reading`"
    );
    assert_eq!(
        err(json!({"temp": 1.0, "count": 1.5})),
        "$.count: expected an integer, got 1.5"
    );
    assert_eq!(
        err(json!({"temp": 1.0, "count": 1, "tags": ["a", 2]})),
        "$.tags[1]: expected a string, got an integer"
    );
    assert_eq!(
        err(json!({"temp": 1.0, "count": 1, "unit": "K"})),
        "$.unit: `K` is not a symbol of enum `org.example.Unit`"
    );
    assert_eq!(
        err(json!({"temp": 1.0, "count": 1, "label": 5})),
        "$.label: no branch of the union takes an integer"
    );
    assert!(err(json!([1])).starts_with("$: expected an object"));
    let mut out = Vec::new();
    let e = s.encode_json(b"{not json", &mut out).unwrap_err();
    assert!(e.problem.starts_with("not JSON"), "{e}");
}

#[test]
fn floats_are_held_to_their_range() {
    let s =
        schema(json!({"type": "record", "name": "R", "fields": [{"name": "f", "type": "float"}]}));
    assert!(encode(&s, json!({"f": 3.4e38})).is_ok());
    assert_eq!(
        encode(&s, json!({"f": 1e300})).unwrap_err().to_string(),
        "$.f: 1e300 is out of a float's range"
    );
}

#[test]
fn ints_are_held_to_32_bits() {
    let s =
        schema(json!({"type": "record", "name": "R", "fields": [{"name": "i", "type": "int"}]}));
    assert!(encode(&s, json!({"i": 2147483647})).is_ok());
    assert_eq!(
        encode(&s, json!({"i": 2147483648u64})).unwrap_err().problem,
        "2147483648 is not a 32-bit int"
    );
}

#[test]
fn bytes_fixed_decimals_uuids_and_logical_types() {
    let s = schema(json!({"type": "record", "name": "R", "fields": [
        {"name": "raw", "type": "bytes"},
        {"name": "mac", "type": {"type": "fixed", "name": "Mac", "size": 2}},
        {"name": "price", "type": {"type": "bytes", "logicalType": "decimal", "precision": 6, "scale": 2}},
        {"name": "big", "type": {"type": "fixed", "name": "D", "size": 4, "logicalType": "decimal", "precision": 8, "scale": 1}},
        {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}}]}));
    let sent = json!({"raw": "\u{0}\u{ff}A", "mac": "\u{1}\u{2}", "price": "-12.5", "big": 3,
                      "id": "123e4567-e89b-12d3-a456-426614174000", "at": 1764000000123i64,
                      "day": 20000});
    let wire = encode(&s, sent).unwrap();
    let Avro::Record(f) = read_back(&s, &wire) else {
        panic!()
    };
    assert_eq!(f[0].1, Avro::Bytes(vec![0, 0xff, b'A']));
    assert_eq!(f[1].1, Avro::Fixed(2, vec![1, 2]));
    match &f[2].1 {
        Avro::Decimal(d) => assert_eq!(Vec::<u8>::try_from(d.clone()).unwrap(), vec![0xfb, 0x1e]),
        other => panic!("{other:?}"),
    }
    assert_eq!(f[5].1, Avro::TimestampMillis(1764000000123));
    assert_eq!(f[6].1, Avro::Date(20000));
    let (_, datum) = split_wire(&wire).unwrap();
    assert_eq!(
        s.decode(datum).unwrap(),
        json!({"raw": "\u{0}\u{ff}A", "mac": "\u{1}\u{2}", "price": "-12.50", "big": "3.0",
               "id": "123e4567-e89b-12d3-a456-426614174000", "at": 1764000000123i64,
               "day": 20000}),
        "decimals come back as decimal strings"
    );
    let bad = |field: &str, v: serde_json::Value| {
        let mut m = json!({"raw": "", "mac": "\u{1}\u{2}", "price": 1, "big": 1,
                           "id": "123e4567-e89b-12d3-a456-426614174000", "at": 1, "day": 1});
        m[field] = v;
        encode(&s, m).unwrap_err().to_string()
    };
    assert!(bad("price", json!(1.234)).contains("not a decimal of scale 2"));
    assert!(bad("price", json!(12345.6)).contains("more than 6 digits"));
    assert!(bad("mac", json!("\u{1}")).contains("expected 2 bytes"));
    assert!(bad("raw", json!("\u{100}")).contains("U+00FF"));
    assert!(bad("id", json!("not-a-uuid")).contains("not a UUID"));
}

#[test]
fn apache_avro_written_data_decodes_and_checks() {
    let s = reading();
    let record = Avro::Record(vec![
        ("temp".into(), Avro::Double(-4.0)),
        ("count".into(), Avro::Long(1 << 40)),
        ("label".into(), Avro::Union(0, Box::new(Avro::Null))),
        ("ok".into(), Avro::Boolean(false)),
        ("tags".into(), Avro::Array(vec![])),
        (
            "extra".into(),
            Avro::Map([("q".to_owned(), Avro::Int(9))].into()),
        ),
        ("unit".into(), Avro::Enum(0, "C".into())),
    ]);
    let writer = apache_avro::writer::datum::GenericDatumWriter::builder(s.schema())
        .build()
        .unwrap();
    let datum = writer.write_value_to_vec(record).unwrap();
    s.check(&datum).unwrap();
    assert_eq!(
        s.decode(&datum).unwrap(),
        json!({"temp": -4.0, "count": 1i64 << 40, "label": null, "ok": false, "tags": [],
               "extra": {"q": 9}, "unit": "C"})
    );
    let e = s.check(&datum[..datum.len() - 1]).unwrap_err();
    assert_eq!(e.problem, "the datum ends early");
    let mut longer = datum.clone();
    longer.push(0);
    assert_eq!(
        s.check(&longer).unwrap_err().problem,
        "1 bytes after the value"
    );
}

#[test]
fn hostile_datums_are_refused_without_allocating_for_their_claims() {
    let list = schema(json!({"type": "record", "name": "Node", "fields": [
        {"name": "next", "type": ["null", "Node"]}]}));
    // Nested a thousand deep: refused at the depth limit, not by the stack.
    let deep: Vec<u8> = std::iter::repeat_n(2u8, 1000).chain([0]).collect();
    assert!(
        list.check(&deep)
            .unwrap_err()
            .problem
            .contains("deeper than 64")
    );
    let nulls = schema(json!({"type": "array", "items": "null"}));
    // A block that claims 2^62 null items in 9 bytes.
    let mut claim = Vec::new();
    encode::put_long(1 << 62, &mut claim);
    assert!(nulls.check(&claim).unwrap_err().problem.contains("items"));
    let strings = schema(json!({"type": "array", "items": "string"}));
    let mut huge = Vec::new();
    encode::put_long(1, &mut huge);
    encode::put_long(1 << 40, &mut huge);
    assert!(strings.check(&huge).unwrap_err().problem.contains("length"));
}

#[test]
fn the_wire_format_is_told_from_json() {
    assert_eq!(split_wire(&[0, 0, 0, 1, 2, 9]), Some((258, &[9u8][..])));
    assert_eq!(split_wire(&[0, 0, 1]), None);
    assert_eq!(split_wire(b"{\"a\":1}"), None);
    assert!(is_wire_format(&[0]));
    assert!(!is_wire_format(b" {}"));
    assert!(!is_wire_format(b""));
}
