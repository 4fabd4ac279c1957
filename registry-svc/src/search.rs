//! `filterJson` / `sortJson` / paging of the search operations, turned into a parameterised
//! SQL query over the stored JSON documents.

use crate::model::Invalid;
use serde::Deserialize;
use serde_json::Value;
use tokio_postgres::types::ToSql;

/// A parsed search request.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchQuery {
    pub page_size: i64,
    pub page_offset: i64,
    pub filters: Vec<Filter>,
    pub sorts: Vec<Sort>,
    /// `isGateway`: when present, filters are ignored (as in Hono).
    pub is_gateway: Option<bool>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    pub path: Vec<String>,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Sort {
    pub path: Vec<String>,
    pub descending: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FilterJson {
    field: String,
    #[serde(default = "eq")]
    op: String,
    value: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SortJson {
    field: String,
    #[serde(default = "asc")]
    direction: String,
}

fn eq() -> String {
    "eq".into()
}
fn asc() -> String {
    "asc".into()
}

pub const DEFAULT_PAGE_SIZE: i64 = 30;
pub const MAX_PAGE_SIZE: i64 = 200;

impl SearchQuery {
    pub fn parse(
        page_size: Option<&str>,
        page_offset: Option<&str>,
        filters: &[String],
        sorts: &[String],
        is_gateway: Option<&str>,
    ) -> Result<Self, Invalid> {
        let page_size = match page_size {
            None => DEFAULT_PAGE_SIZE,
            Some(s) => s
                .parse::<i64>()
                .ok()
                .filter(|n| (0..=MAX_PAGE_SIZE).contains(n))
                .ok_or_else(|| Invalid::new(format!("pageSize must be 0..={MAX_PAGE_SIZE}")))?,
        };
        let page_offset = match page_offset {
            None => 0,
            Some(s) => s
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| Invalid::new("pageOffset must be a non-negative integer"))?,
        };
        let filters = filters
            .iter()
            .map(|f| {
                let f: FilterJson = serde_json::from_str(f)
                    .map_err(|e| Invalid::new(format!("malformed filterJson: {e}")))?;
                if f.op != "eq" {
                    return Err(Invalid::new(format!("unsupported filter op `{}`", f.op)));
                }
                if !(f.value.is_string() || f.value.is_number() || f.value.is_boolean()) {
                    return Err(Invalid::new(
                        "filter value must be a string, number or boolean",
                    ));
                }
                Ok(Filter {
                    path: pointer(&f.field)?,
                    value: f.value,
                })
            })
            .collect::<Result<_, _>>()?;
        let sorts = sorts
            .iter()
            .map(|s| {
                let s: SortJson = serde_json::from_str(s)
                    .map_err(|e| Invalid::new(format!("malformed sortJson: {e}")))?;
                let descending = match s.direction.as_str() {
                    "asc" => false,
                    "desc" => true,
                    d => return Err(Invalid::new(format!("unknown sort direction `{d}`"))),
                };
                Ok(Sort {
                    path: pointer(&s.field)?,
                    descending,
                })
            })
            .collect::<Result<_, _>>()?;
        let is_gateway = match is_gateway {
            None => None,
            Some("true") => Some(true),
            Some("false") => Some(false),
            Some(_) => return Err(Invalid::new("isGateway must be true or false")),
        };
        Ok(SearchQuery {
            page_size,
            page_offset,
            filters,
            sorts,
            is_gateway,
        })
    }
}

/// Splits an RFC 6901 JSON pointer into its unescaped segments.
pub fn pointer(p: &str) -> Result<Vec<String>, Invalid> {
    let rest = p
        .strip_prefix('/')
        .ok_or_else(|| Invalid::new(format!("`{p}` is not a JSON pointer")))?;
    Ok(rest
        .split('/')
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect())
}

/// Hono's `*` and `?` wildcards as a SQL LIKE pattern, with LIKE's own characters escaped.
pub fn like_pattern(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' | '%' | '_' => {
                out.push('\\');
                out.push(c);
            }
            '*' => out.push('%'),
            '?' => out.push('_'),
            c => out.push(c),
        }
    }
    out
}

/// SQL text plus parameters for one search; `id_col` is the key column that `/id` refers to
/// and `extra` an already-built condition (with its own parameters first).
pub struct SqlSearch {
    pub sql: String,
    pub params: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl SqlSearch {
    pub fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect()
    }
}

/// Builds `SELECT count(*) OVER (), <id_col>, data, ... FROM <from> WHERE <base> AND filters
/// ORDER BY sorts LIMIT/OFFSET`. `base` may refer to `$1..$n` for the first `base_params`.
pub fn build(
    q: &SearchQuery,
    select: &str,
    from: &str,
    id_col: &str,
    base: &str,
    base_params: Vec<Box<dyn ToSql + Sync + Send>>,
    gateway_condition: Option<&str>,
) -> SqlSearch {
    let mut params = base_params;
    let mut conds = vec![base.to_owned()];
    match (q.is_gateway, gateway_condition) {
        (Some(true), Some(g)) => conds.push(g.to_owned()),
        (Some(false), Some(g)) => conds.push(format!("NOT ({g})")),
        _ => {
            for f in &q.filters {
                let is_id = f.path.len() == 1 && f.path[0] == "id";
                let cond = match (&f.value, is_id) {
                    (Value::String(s), true) => {
                        params.push(Box::new(like_pattern(s)));
                        format!("{id_col} LIKE ${}", params.len())
                    }
                    (_, true) => "false".to_owned(),
                    (Value::String(s), false) => {
                        params.push(Box::new(f.path.clone()));
                        params.push(Box::new(like_pattern(s)));
                        format!("(data #>> ${}) LIKE ${}", params.len() - 1, params.len())
                    }
                    (v, false) => {
                        params.push(Box::new(f.path.clone()));
                        params.push(Box::new(v.clone()));
                        format!("(data #> ${}) = ${}", params.len() - 1, params.len())
                    }
                };
                conds.push(cond);
            }
        }
    }
    let mut order = Vec::new();
    for s in &q.sorts {
        let dir = if s.descending { "DESC" } else { "ASC" };
        if s.path.len() == 1 && s.path[0] == "id" {
            order.push(format!("{id_col} {dir}"));
        } else {
            params.push(Box::new(s.path.clone()));
            order.push(format!("(data #> ${}) {dir} NULLS LAST", params.len()));
        }
    }
    order.push(format!("{id_col} ASC"));
    params.push(Box::new(q.page_size));
    params.push(Box::new(q.page_offset));
    let n = params.len();
    let sql = format!(
        "SELECT count(*) OVER () AS total, {select} FROM {from} WHERE {} ORDER BY {} LIMIT ${} OFFSET ${}",
        conds.join(" AND "),
        order.join(", "),
        n - 1,
        n
    );
    SqlSearch { sql, params }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paging_defaults_and_limits() {
        let q = SearchQuery::parse(None, None, &[], &[], None).unwrap();
        assert_eq!((q.page_size, q.page_offset), (30, 0));
        assert!(SearchQuery::parse(Some("201"), None, &[], &[], None).is_err());
        assert!(SearchQuery::parse(Some("-1"), None, &[], &[], None).is_err());
        assert!(SearchQuery::parse(None, Some("-1"), &[], &[], None).is_err());
        assert!(SearchQuery::parse(Some("x"), None, &[], &[], None).is_err());
        assert!(SearchQuery::parse(None, None, &[], &[], Some("maybe")).is_err());
    }

    #[test]
    fn filters_and_sorts() {
        let q = SearchQuery::parse(
            None,
            None,
            &[r#"{"field": "/ext/a~1b", "value": "x*"}"#.into()],
            &[r#"{"field": "/enabled", "direction": "desc"}"#.into()],
            None,
        )
        .unwrap();
        assert_eq!(q.filters[0].path, vec!["ext", "a/b"]);
        assert!(q.sorts[0].descending);
        assert!(
            SearchQuery::parse(None, None, &[r#"{"field": "ext"}"#.into()], &[], None).is_err()
        );
        assert!(
            SearchQuery::parse(
                None,
                None,
                &[r#"{"field": "/a", "value": 1, "op": "gt"}"#.into()],
                &[],
                None
            )
            .is_err()
        );
        assert!(
            SearchQuery::parse(
                None,
                None,
                &[],
                &[r#"{"field": "/a", "direction": "up"}"#.into()],
                None
            )
            .is_err()
        );
    }

    #[test]
    fn wildcards_become_like() {
        assert_eq!(like_pattern("a*b?c"), "a%b_c");
        assert_eq!(like_pattern("50%_\\"), "50\\%\\_\\\\");
    }

    #[test]
    fn sql_shape() {
        let q = SearchQuery::parse(
            Some("10"),
            Some("5"),
            &[
                r#"{"field": "/enabled", "value": true}"#.into(),
                r#"{"field": "/id", "value": "d*"}"#.into(),
            ],
            &[],
            None,
        )
        .unwrap();
        let s = build(
            &q,
            "device_id, data",
            "devices",
            "device_id",
            "tenant_id = $1",
            vec![Box::new("t".to_owned())],
            None,
        );
        assert_eq!(s.params.len(), 6);
        assert!(s.sql.contains("(data #> $2) = $3"), "{}", s.sql);
        assert!(s.sql.contains("device_id LIKE $4"), "{}", s.sql);
        assert!(s.sql.ends_with("LIMIT $5 OFFSET $6"), "{}", s.sql);
    }
}
