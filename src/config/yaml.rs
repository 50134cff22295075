//! nodepool.yaml (and its secure file) into the document tree, with a position for every node.
//!
//! # Parser
//!
//! The events come from libyaml, through `unsafe-libyaml` (its transliteration to Rust), the
//! crate `serde_yaml_ng` already builds for `clouds.yaml`: no new crate, hardly any new
//! code in the binary, and the same parser design as PyYAML, which nodepool reads its files
//! with, so what one accepts the other does. Every event carries the byte offset where it
//! starts, which `Source` maps to `line:col` in the file as written. Its API is C's: the
//! only `unsafe` code is [`Parser`], which owns the parser and copies each event out.
//!
//! # What a scalar is
//!
//! nodepool loads with PyYAML's `SafeLoader`, i.e. YAML 1.1 rules, and so do we for plain
//! (unquoted, untagged) scalars: `yes`/`no`/`on`/`off`/`true`/`false` in three spellings are
//! booleans, `~`, `null` and nothing are null, integers may be written `0x1f`, `0o17` or
//! `017` (octal), `0b101`, with `_` separators and in base 60 (`1:30`), and a float needs a
//! dot (`1e3` is a string, `1.0e+3` a float), or is `.inf`/`.nan`. Timestamps stay strings.
//! A quoted scalar, a block scalar and one tagged `!!str` are strings. `!!int`, `!!float`,
//! `!!bool` and `!!null` resolve as plain scalars; any other tag is an error.
//! Anchors and aliases work, and so do merge keys (`<<: *base`), as in PyYAML; a file whose
//! aliases would expand past [`MAX_NODES`] values is refused (the "billion laughs").
//! A value reached through an alias keeps the positions where its anchor was written, so
//! an error in it points there.
//! A second document in the file is an error, as for `yaml.safe_load`.

use std::collections::HashMap;
use std::ffi::CStr;
use std::mem::MaybeUninit;

use unsafe_libyaml as unsafe_sys;

use super::doc::{Key, MAX_DEPTH, Node, Table, Value};
use super::raw::Sink;
use super::source::{Pos, Source};

/// The most values a file may expand to through aliases.
pub(crate) const MAX_NODES: usize = 100_000;

/// Parses `src.text`; `None` after recording the error when it is not valid YAML.
/// An empty document is an empty mapping.
pub(crate) fn parse(src: &Source, sink: &mut Sink) -> Option<Node> {
    match Builder::new(src).run() {
        Ok(node) => Some(node.unwrap_or(Node {
            value: Value::Table(Table::default()),
            pos: src.start(),
        })),
        Err((pos, message)) => {
            sink.error(pos, message);
            None
        }
    }
}

type Failure = (Pos, String);

/// One event, copied out of libyaml.
enum Event {
    StreamStart,
    StreamEnd,
    DocumentStart,
    DocumentEnd,
    Alias {
        anchor: String,
    },
    Scalar {
        anchor: Option<String>,
        tag: Option<String>,
        value: String,
        plain: bool,
    },
    SequenceStart {
        anchor: Option<String>,
        tag: Option<String>,
    },
    SequenceEnd,
    MappingStart {
        anchor: Option<String>,
        tag: Option<String>,
    },
    MappingEnd,
}

/// A libyaml parser over one string.
struct Parser<'a> {
    raw: Box<unsafe_sys::yaml_parser_t>,
    _input: std::marker::PhantomData<&'a str>,
}

impl<'a> Parser<'a> {
    fn new(input: &'a str) -> Parser<'a> {
        let mut raw: Box<MaybeUninit<unsafe_sys::yaml_parser_t>> = Box::new_uninit();
        // SAFETY: `yaml_parser_initialize` fully initialises the struct (it zeroes it first
        // and fails only when an allocation fails, which aborts in Rust anyway). The input
        // outlives the parser (`'a`), and the boxed parser never moves.
        unsafe {
            let parser = raw.as_mut_ptr();
            if unsafe_sys::yaml_parser_initialize(parser).fail {
                panic!("libyaml could not allocate its parser");
            }
            unsafe_sys::yaml_parser_set_encoding(parser, unsafe_sys::YAML_UTF8_ENCODING);
            unsafe_sys::yaml_parser_set_input_string(parser, input.as_ptr(), input.len() as u64);
            Parser {
                raw: raw.assume_init(),
                _input: std::marker::PhantomData,
            }
        }
    }

    /// The next event and the byte offset where it starts, or the error and its offset.
    fn next(&mut self) -> Result<(Event, usize), (usize, String)> {
        let mut event = MaybeUninit::<unsafe_sys::yaml_event_t>::uninit();
        // SAFETY: the parser is initialised; after a successful `yaml_parser_parse` the event
        // is initialised, its strings are NUL-terminated (the scalar's value has `length`
        // bytes), and it is deleted exactly once after being copied.
        unsafe {
            if self.raw.error != unsafe_sys::YAML_NO_ERROR
                || unsafe_sys::yaml_parser_parse(&mut *self.raw, event.as_mut_ptr()).fail
            {
                return Err(self.error());
            }
            let event = event.as_mut_ptr();
            let copied = copy_event(&*event);
            let offset = (*event).start_mark.index as usize;
            unsafe_sys::yaml_event_delete(event);
            Ok((copied, offset))
        }
    }

    fn error(&self) -> (usize, String) {
        let p = &*self.raw;
        // SAFETY: libyaml's problem and context are NULL or static NUL-terminated strings.
        let text = |s: *const std::ffi::c_char| {
            (!s.is_null()).then(|| unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned())
        };
        let problem = text(p.problem).unwrap_or_else(|| "unknown error".to_owned());
        let offset = if p.error == unsafe_sys::YAML_READER_ERROR {
            p.problem_offset as usize
        } else {
            p.problem_mark.index as usize
        };
        let message = match text(p.context) {
            Some(context) => format!(
                "invalid YAML: {problem} ({context} at line {})",
                p.context_mark.line + 1
            ),
            None => format!("invalid YAML: {problem}"),
        };
        (offset, message)
    }
}

impl Drop for Parser<'_> {
    fn drop(&mut self) {
        // SAFETY: initialised in `new`, deleted once.
        unsafe { unsafe_sys::yaml_parser_delete(&mut *self.raw) }
    }
}

/// SAFETY: `event` must be an event `yaml_parser_parse` produced and not yet deleted.
unsafe fn copy_event(event: &unsafe_sys::yaml_event_t) -> Event {
    unsafe fn string(s: *const u8) -> Option<String> {
        (!s.is_null()).then(|| {
            // SAFETY: libyaml's anchors and tags are NUL-terminated.
            unsafe { CStr::from_ptr(s.cast()) }
                .to_string_lossy()
                .into_owned()
        })
    }
    // SAFETY: each union field is read only for the event type that sets it.
    unsafe {
        match event.type_ {
            unsafe_sys::YAML_STREAM_START_EVENT => Event::StreamStart,
            unsafe_sys::YAML_DOCUMENT_START_EVENT => Event::DocumentStart,
            unsafe_sys::YAML_DOCUMENT_END_EVENT => Event::DocumentEnd,
            unsafe_sys::YAML_ALIAS_EVENT => Event::Alias {
                anchor: string(event.data.alias.anchor).unwrap_or_default(),
            },
            unsafe_sys::YAML_SCALAR_EVENT => {
                let s = &event.data.scalar;
                let bytes = std::slice::from_raw_parts(s.value, s.length as usize);
                Event::Scalar {
                    anchor: string(s.anchor),
                    tag: string(s.tag),
                    value: String::from_utf8_lossy(bytes).into_owned(),
                    plain: s.style == unsafe_sys::YAML_PLAIN_SCALAR_STYLE,
                }
            }
            unsafe_sys::YAML_SEQUENCE_START_EVENT => Event::SequenceStart {
                anchor: string(event.data.sequence_start.anchor),
                tag: string(event.data.sequence_start.tag),
            },
            unsafe_sys::YAML_SEQUENCE_END_EVENT => Event::SequenceEnd,
            unsafe_sys::YAML_MAPPING_START_EVENT => Event::MappingStart {
                anchor: string(event.data.mapping_start.anchor),
                tag: string(event.data.mapping_start.tag),
            },
            unsafe_sys::YAML_MAPPING_END_EVENT => Event::MappingEnd,
            _ => Event::StreamEnd,
        }
    }
}

/// A collection being read.
enum Frame {
    Sequence {
        pos: Pos,
        anchor: Option<String>,
        items: Vec<Node>,
    },
    Mapping {
        pos: Pos,
        anchor: Option<String>,
        entries: Vec<(Key, Node)>,
        /// The key whose value comes next; `merge` when it is `<<`.
        key: Option<(Key, bool)>,
    },
}

/// Builds the tree from the events with an explicit stack (no recursion).
struct Builder<'a> {
    src: &'a Source,
    parser: Parser<'a>,
    stack: Vec<Frame>,
    anchors: HashMap<String, Node>,
    nodes: usize,
    root: Option<Node>,
    documents: usize,
}

impl<'a> Builder<'a> {
    fn new(src: &'a Source) -> Self {
        Builder {
            src,
            parser: Parser::new(&src.text),
            stack: Vec::new(),
            anchors: HashMap::new(),
            nodes: 0,
            root: None,
            documents: 0,
        }
    }

    fn run(mut self) -> Result<Option<Node>, Failure> {
        loop {
            let (event, offset) = self
                .parser
                .next()
                .map_err(|(offset, message)| (self.src.pos(offset), message))?;
            let pos = self.src.pos(offset);
            match event {
                Event::StreamStart | Event::DocumentEnd => {}
                Event::StreamEnd => return Ok(self.root),
                Event::DocumentStart => {
                    self.documents += 1;
                    if self.documents > 1 {
                        return Err((
                            pos,
                            "invalid YAML: a second document in the file (expected one)".into(),
                        ));
                    }
                }
                Event::Alias { anchor } => {
                    let Some(node) = self.anchors.get(&anchor) else {
                        return Err((pos, format!("invalid YAML: unknown anchor `{anchor}`")));
                    };
                    let node = node.clone();
                    self.count(count_nodes(&node), pos)?;
                    self.complete(node, None, pos)?;
                }
                Event::Scalar {
                    anchor,
                    tag,
                    value,
                    plain,
                } => {
                    self.count(1, pos)?;
                    let is_merge_key = plain && tag.is_none() && value == "<<";
                    if let Some(Frame::Mapping {
                        key: key @ None, ..
                    }) = self.stack.last_mut()
                    {
                        *key = Some((Key { name: value, pos }, is_merge_key));
                        continue;
                    }
                    let value = resolve(&value, plain, tag.as_deref())
                        .ok_or_else(|| (pos, unsupported_tag(tag.as_deref())))?;
                    self.complete(Node { value, pos }, anchor, pos)?;
                }
                Event::SequenceStart { anchor, tag } => {
                    self.open(pos, tag.as_deref(), "tag:yaml.org,2002:seq")?;
                    self.stack.push(Frame::Sequence {
                        pos,
                        anchor,
                        items: Vec::new(),
                    });
                }
                Event::MappingStart { anchor, tag } => {
                    self.open(pos, tag.as_deref(), "tag:yaml.org,2002:map")?;
                    self.stack.push(Frame::Mapping {
                        pos,
                        anchor,
                        entries: Vec::new(),
                        key: None,
                    });
                }
                Event::SequenceEnd | Event::MappingEnd => match self.stack.pop() {
                    Some(Frame::Sequence { pos, anchor, items }) => {
                        let node = Node {
                            value: Value::Array(items),
                            pos,
                        };
                        self.complete(node, anchor, pos)?;
                    }
                    Some(Frame::Mapping {
                        pos,
                        anchor,
                        entries,
                        ..
                    }) => {
                        let node = Node {
                            value: Value::Table(Table { entries }),
                            pos,
                        };
                        self.complete(node, anchor, pos)?;
                    }
                    None => return Err((pos, "invalid YAML: unbalanced collection".into())),
                },
            }
        }
    }

    /// Checks a collection's tag and the nesting depth before it is opened.
    fn open(&mut self, pos: Pos, tag: Option<&str>, plain_tag: &str) -> Result<(), Failure> {
        if tag.is_some_and(|t| t != plain_tag) {
            return Err((pos, unsupported_tag(tag)));
        }
        if self.stack.len() >= MAX_DEPTH {
            return Err((
                pos,
                format!("invalid YAML: nested more than {MAX_DEPTH} levels deep"),
            ));
        }
        self.count(1, pos)
    }

    fn count(&mut self, more: usize, pos: Pos) -> Result<(), Failure> {
        self.nodes += more;
        if self.nodes > MAX_NODES {
            return Err((
                pos,
                format!("invalid YAML: more than {MAX_NODES} values (aliases expanding too far?)"),
            ));
        }
        Ok(())
    }

    /// Hands a finished node to its parent (or makes it the root) and records its anchor.
    fn complete(&mut self, node: Node, anchor: Option<String>, pos: Pos) -> Result<(), Failure> {
        if let Some(anchor) = anchor {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Frame::Sequence { items, .. }) => items.push(node),
            Some(Frame::Mapping { key, entries, .. }) => match key.take() {
                None => {
                    // A collection, or an alias to one, as a key.
                    let name = match node.value {
                        Value::String(s) => s,
                        _ => {
                            return Err((
                                pos,
                                "invalid YAML: only scalars can be mapping keys here".into(),
                            ));
                        }
                    };
                    *key = Some((Key { name, pos }, false));
                }
                Some((_, true)) => merge(entries, node, pos)?,
                Some((key, false)) => entries.push((key, node)),
            },
        }
        Ok(())
    }
}

/// `<<: *base` or `<<: [*a, *b]`: adds the keys the mapping does not have yet, the earlier
/// mappings in the list winning, as PyYAML does.
fn merge(entries: &mut Vec<(Key, Node)>, node: Node, pos: Pos) -> Result<(), Failure> {
    let sources = match node.value {
        Value::Table(table) => vec![table],
        Value::Array(items) => items
            .into_iter()
            .map(|item| match item.value {
                Value::Table(table) => Ok(table),
                _ => Err(()),
            })
            .collect::<Result<Vec<_>, ()>>()
            .map_err(|()| (pos, "invalid YAML: `<<` merges mappings only".to_owned()))?,
        _ => {
            return Err((pos, "invalid YAML: `<<` merges mappings only".into()));
        }
    };
    for table in sources {
        for (key, value) in table.entries {
            if !entries.iter().any(|(k, _)| k.name == key.name) {
                entries.push((key, value));
            }
        }
    }
    Ok(())
}

fn count_nodes(node: &Node) -> usize {
    let mut count = 0;
    let mut pending = vec![node];
    while let Some(node) = pending.pop() {
        count += 1;
        match &node.value {
            Value::Array(items) => pending.extend(items),
            Value::Table(table) => pending.extend(table.entries.iter().map(|(_, v)| v)),
            _ => {}
        }
    }
    count
}

fn unsupported_tag(tag: Option<&str>) -> String {
    format!(
        "invalid YAML: the tag `{}` is not supported here",
        tag.unwrap_or("")
    )
}

/// A scalar's value; `None` for a tag we do not support.
fn resolve(text: &str, plain: bool, tag: Option<&str>) -> Option<Value> {
    match tag {
        None if plain => Some(resolve_plain(text)),
        None | Some("tag:yaml.org,2002:str") => Some(Value::String(text.to_owned())),
        Some(
            "tag:yaml.org,2002:int"
            | "tag:yaml.org,2002:float"
            | "tag:yaml.org,2002:bool"
            | "tag:yaml.org,2002:null",
        ) => Some(resolve_plain(text)),
        Some(_) => None,
    }
}

/// YAML 1.1's implicit types, as PyYAML's `SafeLoader` resolves them.
pub(crate) fn resolve_plain(text: &str) -> Value {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "yes" | "Yes" | "YES" | "true" | "True" | "TRUE" | "on" | "On" | "ON" => {
            return Value::Boolean(true);
        }
        "no" | "No" | "NO" | "false" | "False" | "FALSE" | "off" | "Off" | "OFF" => {
            return Value::Boolean(false);
        }
        _ => {}
    }
    if let Some(n) = int_1_1(text) {
        return Value::Integer(n);
    }
    if let Some(f) = float_1_1(text) {
        return Value::Float(f);
    }
    Value::String(text.to_owned())
}

fn split_sign(text: &str) -> (f64, &str) {
    match text.as_bytes().first() {
        Some(b'-') => (-1.0, &text[1..]),
        Some(b'+') => (1.0, &text[1..]),
        _ => (1.0, text),
    }
}

/// `Some(None)`: an integer too large for an `i64`.
fn int_1_1(text: &str) -> Option<Option<i64>> {
    let (sign, body) = split_sign(text);
    let negative = sign < 0.0;
    let digits = |s: &str, radix: u32| {
        !s.is_empty()
            && s.chars().all(|c| c == '_' || c.is_digit(radix))
            && s.chars().any(|c| c != '_')
    };
    let parse = |s: &str, radix: u32| {
        let cleaned: String = s.chars().filter(|&c| c != '_').collect();
        let signed = if negative {
            format!("-{cleaned}")
        } else {
            cleaned
        };
        i64::from_str_radix(&signed, radix).ok()
    };
    if let Some(rest) = body.strip_prefix("0b") {
        return digits(rest, 2).then(|| parse(rest, 2));
    }
    if let Some(rest) = body.strip_prefix("0x") {
        return digits(rest, 16).then(|| parse(rest, 16));
    }
    if let Some(rest) = body.strip_prefix("0o") {
        // YAML 1.2's octal, which PyYAML does not know either: a string there.
        let _ = rest;
        return None;
    }
    if body == "0" {
        return Some(Some(0));
    }
    if let Some(rest) = body.strip_prefix('0') {
        return digits(rest, 8).then(|| parse(rest, 8));
    }
    if body.starts_with(|c: char| c.is_ascii_digit()) && digits(body, 10) {
        return Some(parse(body, 10));
    }
    // Base 60: 1:30 is 90.
    if body.starts_with(|c: char| matches!(c, '1'..='9')) && body.contains(':') {
        let mut parts = body.split(':');
        let first = parts.next()?;
        if !digits(first, 10) {
            return None;
        }
        let mut total = parse(first, 10).map(i64::unsigned_abs)?;
        for part in parts {
            if part.is_empty() || part.len() > 2 || !part.chars().all(|c| c.is_ascii_digit()) {
                return None;
            }
            let n: u64 = part.parse().ok()?;
            if n > 59 {
                return None;
            }
            total = total.checked_mul(60)?.checked_add(n)?;
        }
        let total = i64::try_from(total).ok();
        return Some(total.map(|t| if negative { -t } else { t }));
    }
    None
}

fn float_1_1(text: &str) -> Option<f64> {
    match text {
        ".nan" | ".NaN" | ".NAN" => return Some(f64::NAN),
        _ => {}
    }
    let (sign, body) = split_sign(text);
    if matches!(body, ".inf" | ".Inf" | ".INF") {
        return Some(sign * f64::INFINITY);
    }
    let (mantissa, exponent) = match body.find(['e', 'E']) {
        Some(at) => (&body[..at], Some(&body[at + 1..])),
        None => (body, None),
    };
    let (whole, fraction) = mantissa.split_once('.')?;
    let whole_ok = (whole.is_empty() && !fraction.is_empty() && !fraction.starts_with('_'))
        || (whole.starts_with(|c: char| c.is_ascii_digit())
            && whole.chars().all(|c| c.is_ascii_digit() || c == '_'));
    let fraction_ok = fraction.chars().all(|c| c.is_ascii_digit() || c == '_');
    let exponent_ok = exponent.is_none_or(|e| {
        e.len() > 1 && e.starts_with(['-', '+']) && e[1..].chars().all(|c| c.is_ascii_digit())
    });
    if !(whole_ok && fraction_ok && exponent_ok) || (whole.is_empty() && exponent.is_some()) {
        return None;
    }
    let cleaned: String = format!(
        "{}.{}0{}",
        if whole.is_empty() { "0" } else { whole },
        fraction,
        exponent.map(|e| format!("e{e}")).unwrap_or_default()
    )
    .chars()
    .filter(|&c| c != '_')
    .collect();
    cleaned.parse::<f64>().ok().map(|f| sign * f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int(text: &str) -> Option<i64> {
        match resolve_plain(text) {
            Value::Integer(n) => n,
            other => panic!("{text:?} resolved to {other:?}"),
        }
    }

    fn float(text: &str) -> f64 {
        match resolve_plain(text) {
            Value::Float(f) => f,
            other => panic!("{text:?} resolved to {other:?}"),
        }
    }

    fn is_string(text: &str) -> bool {
        matches!(resolve_plain(text), Value::String(s) if s == text)
    }

    #[test]
    fn plain_scalars_resolve_like_pyyaml_safe_loader() {
        assert!(matches!(resolve_plain("yes"), Value::Boolean(true)));
        assert!(matches!(resolve_plain("Off"), Value::Boolean(false)));
        assert!(matches!(resolve_plain("~"), Value::Null));
        assert!(matches!(resolve_plain(""), Value::Null));
        assert_eq!(int("42"), Some(42));
        assert_eq!(int("-1"), Some(-1));
        assert_eq!(int("1_000"), Some(1000));
        assert_eq!(int("0x1f"), Some(31));
        assert_eq!(int("017"), Some(15));
        assert_eq!(int("0b101"), Some(5));
        assert_eq!(int("1:30"), Some(90));
        assert_eq!(int("99999999999999999999"), None);
        assert_eq!(float("10.0"), 10.0);
        assert_eq!(float("1."), 1.0);
        assert_eq!(float(".5"), 0.5);
        assert_eq!(float("-1.5e+3"), -1500.0);
        assert!(float(".inf").is_infinite());
        assert!(float(".nan").is_nan());
        for text in [
            "1e3",
            "0o17",
            "22.04a",
            "noble",
            "08",
            "1.5e3",
            "2024-01-01",
            "-",
        ] {
            assert!(is_string(text), "{text:?} should stay a string");
        }
    }
}
