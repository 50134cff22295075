//! The small document tree both configuration formats are read into.
//!
//! `raw` checks keys, types and ranges once, for TOML and YAML alike, by walking this tree:
//! every node carries the position (`file:line:col` in the file as written) of its value,
//! every key the position of the key. The TOML parser's spanned document is converted here
//! (`from_toml`); `yaml` builds the tree from libyaml's events.
//!
//! The tree keeps a mapping's entries in file order, duplicates included (TOML rejects
//! duplicates while parsing; YAML loaders let the last one win, and `raw` reports them in the
//! mappings it reads), and the type words of the format for messages ("table" and "array" in
//! TOML, "mapping" and "list" in YAML).
//!
//! Nesting is capped at [`MAX_DEPTH`] while converting: no configuration needs more, and a
//! deeper value is kept as [`Value::TooDeep`] (a type error wherever a key is read) so that
//! walking or dropping the tree can never exhaust the stack.

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::source::{Pos, Source};

/// Deeper values are cut off (see the module essay).
pub(crate) const MAX_DEPTH: usize = 64;

/// Which syntax a file is written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Toml,
    Yaml,
}

/// A value and where it starts.
#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub value: Value,
    pub pos: Pos,
}

/// A mapping key and where it is written.
#[derive(Clone, Debug)]
pub(crate) struct Key {
    pub name: String,
    pub pos: Pos,
}

#[derive(Clone, Debug)]
pub(crate) enum Value {
    /// YAML's null (`~`, `null` or nothing after the colon).
    Null,
    Boolean(bool),
    /// `None` when the literal does not fit an `i64`.
    Integer(Option<i64>),
    /// NaN when the literal could not be read.
    Float(f64),
    String(String),
    Array(Vec<Node>),
    Table(Table),
    /// A TOML date or time; no key takes one.
    Datetime,
    /// Nested deeper than [`MAX_DEPTH`].
    TooDeep,
}

/// A table (TOML) or mapping (YAML), in file order.
#[derive(Clone, Debug, Default)]
pub(crate) struct Table {
    pub entries: Vec<(Key, Node)>,
}

impl Table {
    /// The value of `key`; the last one when a YAML mapping repeats it, as YAML loaders do.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.get_key_value(key).map(|(_, v)| v)
    }

    pub fn get_key_value(&self, key: &str) -> Option<(&Key, &Node)> {
        self.entries
            .iter()
            .rev()
            .find(|(k, _)| k.name == key)
            .map(|(k, v)| (k, v))
    }
}

impl Value {
    /// The value's type, in the words of the file's format; never the value itself.
    pub fn type_name(&self, format: Format) -> &'static str {
        match (self, format) {
            (Value::Null, _) => "null",
            (Value::Boolean(_), _) => "boolean",
            (Value::Integer(_), _) => "integer",
            (Value::Float(_), _) => "float",
            (Value::String(_), _) => "string",
            (Value::Array(_), Format::Toml) => "array",
            (Value::Array(_), Format::Yaml) => "list",
            (Value::Table(_), Format::Toml) => "table",
            (Value::Table(_), Format::Yaml) => "mapping",
            (Value::Datetime, _) => "datetime",
            (Value::TooDeep, _) => "a value nested too deeply",
        }
    }
}

/// Converts the TOML parser's spanned document; `pos` is where the root table starts.
pub(crate) fn from_toml(src: &Source, root: &DeTable<'_>) -> Node {
    Node {
        value: Value::Table(toml_table(src, root, 1)),
        pos: src.start(),
    }
}

fn toml_table(src: &Source, table: &DeTable<'_>, depth: usize) -> Table {
    Table {
        entries: table
            .iter()
            .map(|(key, value)| {
                let key = Key {
                    name: key.get_ref().to_string(),
                    pos: src.pos(key.span().start),
                };
                (key, toml_node(src, value, depth))
            })
            .collect(),
    }
}

fn toml_node(src: &Source, spanned: &Spanned<DeValue<'_>>, depth: usize) -> Node {
    let pos = src.pos(spanned.span().start);
    let value = match spanned.get_ref() {
        _ if depth >= MAX_DEPTH => Value::TooDeep,
        DeValue::String(s) => Value::String(s.to_string()),
        DeValue::Integer(i) => Value::Integer(i64::from_str_radix(i.as_str(), i.radix()).ok()),
        DeValue::Float(f) => Value::Float(f.as_str().parse::<f64>().unwrap_or(f64::NAN)),
        DeValue::Boolean(b) => Value::Boolean(*b),
        DeValue::Datetime(_) => Value::Datetime,
        DeValue::Array(items) => Value::Array(
            items
                .iter()
                .map(|item| toml_node(src, item, depth + 1))
                .collect(),
        ),
        DeValue::Table(table) => Value::Table(toml_table(src, table, depth + 1)),
    };
    Node { value, pos }
}
