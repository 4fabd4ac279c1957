//! Compatibility levels as Confluent's registry names them, checked with apache-avro's
//! schema resolution: "BACKWARD" means data written with the earlier schema can be read with
//! the new one, "FORWARD" the reverse, "FULL" both; the `_TRANSITIVE` forms hold the new
//! schema to every live version of the subject rather than the latest alone.

use apache_avro::Schema;
use apache_avro::schema_compatibility::{Compatibility, SchemaCompatibility};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    None,
    Backward,
    BackwardTransitive,
    Forward,
    ForwardTransitive,
    Full,
    FullTransitive,
}

/// The level of a subject that has none of its own and of a registry nobody configured.
pub const DEFAULT: Level = Level::Backward;

impl Level {
    pub const fn name(self) -> &'static str {
        match self {
            Level::None => "NONE",
            Level::Backward => "BACKWARD",
            Level::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Level::Forward => "FORWARD",
            Level::ForwardTransitive => "FORWARD_TRANSITIVE",
            Level::Full => "FULL",
            Level::FullTransitive => "FULL_TRANSITIVE",
        }
    }

    /// A level from its name, in any case.
    pub fn parse(name: &str) -> Option<Level> {
        [
            Level::None,
            Level::Backward,
            Level::BackwardTransitive,
            Level::Forward,
            Level::ForwardTransitive,
            Level::Full,
            Level::FullTransitive,
        ]
        .into_iter()
        .find(|l| l.name().eq_ignore_ascii_case(name))
    }

    fn transitive(self) -> bool {
        matches!(
            self,
            Level::BackwardTransitive | Level::ForwardTransitive | Level::FullTransitive
        )
    }

    /// Why `new` may not follow `existing` (oldest first) at this level; empty when it may.
    pub fn problems(self, new: &Schema, existing: &[Schema]) -> Vec<String> {
        if self == Level::None {
            return Vec::new();
        }
        let against: &[Schema] = if self.transitive() {
            existing
        } else {
            existing
                .last()
                .map(std::slice::from_ref)
                .unwrap_or_default()
        };
        let (backward, forward) = match self {
            Level::Backward | Level::BackwardTransitive => (true, false),
            Level::Forward | Level::ForwardTransitive => (false, true),
            _ => (true, true),
        };
        let mut problems = Vec::new();
        for old in against {
            if backward && let Some(p) = cannot_read(old, new) {
                problems.push(format!(
                    "the new schema cannot read data written with an earlier one: {p}"
                ));
            }
            if forward && let Some(p) = cannot_read(new, old) {
                problems.push(format!(
                    "an earlier schema cannot read data written with the new one: {p}"
                ));
            }
        }
        problems
    }
}

/// Why `reader` cannot read everything `writer` wrote. Partial compatibility (a reader union
/// or enum missing some of the writer's branches or symbols) is refused, as Avro's Java
/// resolution rules, which Confluent's registry applies, refuse it.
fn cannot_read(writer: &Schema, reader: &Schema) -> Option<String> {
    match SchemaCompatibility::can_read(writer, reader) {
        Ok(Compatibility::Full) => None,
        Ok(Compatibility::Partial) => {
            Some("some values the writer may write have no counterpart in the reader".into())
        }
        Err(e) => Some(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(s: &Schema) -> &[Schema] {
        std::slice::from_ref(s)
    }

    fn s(text: &str) -> Schema {
        Schema::parse_str(text).unwrap()
    }

    #[test]
    fn levels_apply_as_confluent_names_them() {
        let v1 = s(r#"{"type":"record","name":"R","fields":[{"name":"a","type":"int"}]}"#);
        // A field with a default: readable both ways.
        let v2 = s(
            r#"{"type":"record","name":"R","fields":[{"name":"a","type":"int"},
                      {"name":"b","type":"string","default":""}]}"#,
        );
        // A new field without a default: the new schema cannot read old data.
        let v3 = s(
            r#"{"type":"record","name":"R","fields":[{"name":"a","type":"int"},
                      {"name":"c","type":"string"}]}"#,
        );
        // `a` dropped: new data lacks what v1 readers need.
        let v4 = s(r#"{"type":"record","name":"R","fields":[]}"#);
        assert!(Level::Backward.problems(&v2, one(&v1)).is_empty());
        assert!(Level::Full.problems(&v2, one(&v1)).is_empty());
        assert!(!Level::Backward.problems(&v3, one(&v1)).is_empty());
        assert!(Level::Forward.problems(&v3, one(&v1)).is_empty());
        assert!(Level::Backward.problems(&v4, one(&v1)).is_empty());
        assert!(!Level::Forward.problems(&v4, one(&v1)).is_empty());
        assert!(Level::None.problems(&v3, one(&v1)).is_empty());
        // Transitive levels look past the latest version: `a` as a string with a default
        // reads the latest (no `a`) but not the first (`a` an int).
        let z = s(
            r#"{"type":"record","name":"R","fields":[{"name":"a","type":"string","default":"x"}]}"#,
        );
        let history = [v1.clone(), v4.clone()];
        assert!(Level::Backward.problems(&z, &history).is_empty());
        assert!(!Level::BackwardTransitive.problems(&z, &history).is_empty());
    }

    #[test]
    fn names_parse_in_any_case() {
        assert_eq!(Level::parse("full_transitive"), Some(Level::FullTransitive));
        assert_eq!(Level::parse("BACKWARD"), Some(Level::Backward));
        assert_eq!(Level::parse("SIDEWAYS"), None);
    }
}
