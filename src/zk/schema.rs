//! The JSON of nodepool's znodes, byte for byte (wire spec §2.3, §2.4, §2.8, §2.12, §2.13).
//!
//! Only this module knows record layouts. Writing reproduces Python's `json.dumps` with default
//! arguments: `", "` and `": "` separators, insertion key order, non-ASCII escaped as `\uXXXX`,
//! floats as Python's `repr`. Reading is tolerant: unknown keys are ignored, missing keys get
//! nodepool's defaults, and empty, unparsable or wrongly typed data is an `Err` that callers
//! log once and skip — never a panic.

use std::fmt::{self, Write as _};

use serde_json::{Map, Value};

use crate::model::{BuildState, UploadState};

/// An ImageBuild record (`/nodepool/images/<image>/builds/<build_id>`). The id and image name
/// come from the path and are not serialized.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageBuild {
    pub state: BuildState,
    pub state_time: f64,
    pub builder: Option<String>,
    pub builder_id: Option<String>,
    /// Formats of the build; written sorted and comma-joined, omitted when empty.
    pub formats: Vec<String>,
    pub username: Option<String>,
    pub python_path: Option<String>,
    pub shell_type: Option<String>,
}

/// An ImageUpload record (`…/providers/<provider>/images/<upload_id>`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageUpload {
    pub state: UploadState,
    pub state_time: f64,
    pub external_id: Option<String>,
    pub external_name: Option<String>,
    pub format: Option<String>,
    pub username: Option<String>,
    pub python_path: Option<String>,
    pub shell_type: Option<String>,
}

/// Why a znode's data could not be read as a record.
#[derive(Debug, Clone, PartialEq)]
pub enum SchemaError {
    /// Zero bytes: a structural node, or a record re-created empty by a lock acquisition.
    Empty,
    /// Not JSON (or not UTF-8).
    Json(String),
    /// JSON, but not an object.
    NotObject,
    /// A state string nodepool does not know.
    UnknownState(String),
    /// A field with the wrong JSON type.
    BadField(&'static str),
}

impl fmt::Display for SchemaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SchemaError::Empty => f.write_str("empty znode data"),
            SchemaError::Json(e) => write!(f, "invalid json: {e}"),
            SchemaError::NotObject => f.write_str("json is not an object"),
            SchemaError::UnknownState(s) => write!(f, "unknown state {s:?}"),
            SchemaError::BadField(k) => write!(f, "field {k:?} has the wrong type"),
        }
    }
}

impl std::error::Error for SchemaError {}

impl ImageBuild {
    /// The `building` record written when a build starts.
    pub fn building(builder: &str, builder_id: &str, formats: &[String], now: f64) -> ImageBuild {
        ImageBuild {
            state: BuildState::Building,
            state_time: now,
            builder: Some(builder.to_string()),
            builder_id: Some(builder_id.to_string()),
            formats: formats.to_vec(),
            username: None,
            python_path: None,
            shell_type: None,
        }
    }

    /// Serializes exactly as nodepool 11 does.
    pub fn to_json(&self) -> Vec<u8> {
        let mut w = DictWriter::new();
        w.str("state", Some(self.state.as_str()));
        w.float("state_time", self.state_time);
        if let Some(b) = &self.builder {
            w.str("builder", Some(b));
        }
        if let Some(b) = &self.builder_id {
            w.str("builder_id", Some(b));
        }
        if !self.formats.is_empty() {
            let mut formats = self.formats.clone();
            formats.sort();
            formats.dedup();
            w.str("formats", Some(&formats.join(",")));
        }
        w.str("username", self.username.as_deref());
        w.str("python_path", self.python_path.as_deref());
        w.str("shell_type", self.shell_type.as_deref());
        w.finish()
    }

    /// Parses a build record tolerantly (see the module docs).
    pub fn from_json(data: &[u8]) -> Result<ImageBuild, SchemaError> {
        let obj = parse_object(data)?;
        let state = state_field(&obj, BuildState::parse)?;
        let formats = match obj.get("formats") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => s
                .split(',')
                .filter(|f| !f.is_empty())
                .map(str::to_string)
                .collect(),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or(SchemaError::BadField("formats"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(SchemaError::BadField("formats")),
        };
        Ok(ImageBuild {
            state,
            state_time: time_field(&obj)?,
            builder: opt_str(&obj, "builder")?,
            builder_id: opt_str(&obj, "builder_id")?,
            formats,
            // Upstream's reader defaults for records written before these keys existed.
            username: opt_str_default(&obj, "username", "zuul")?,
            python_path: opt_str_default(&obj, "python_path", "/usr/bin/python2")?,
            shell_type: opt_str(&obj, "shell_type")?,
        })
    }
}

impl ImageUpload {
    /// The `uploading` record created before the cloud is touched.
    pub fn uploading(
        username: Option<&str>,
        python_path: Option<&str>,
        shell_type: Option<&str>,
        now: f64,
    ) -> ImageUpload {
        ImageUpload {
            state: UploadState::Uploading,
            state_time: now,
            external_id: None,
            external_name: None,
            format: None,
            username: username.map(str::to_string),
            python_path: python_path.map(str::to_string),
            shell_type: shell_type.map(str::to_string),
        }
    }

    /// A bare `failed` record: every field null but the state and its time, as upstream.
    pub fn bare_failed(now: f64) -> ImageUpload {
        ImageUpload {
            state: UploadState::Failed,
            state_time: now,
            external_id: None,
            external_name: None,
            format: None,
            username: None,
            python_path: None,
            shell_type: None,
        }
    }

    /// Serializes exactly as nodepool 11 does: all eight keys, nulls included.
    pub fn to_json(&self) -> Vec<u8> {
        let mut w = DictWriter::new();
        w.str("state", Some(self.state.as_str()));
        w.float("state_time", self.state_time);
        w.str("external_id", self.external_id.as_deref());
        w.str("external_name", self.external_name.as_deref());
        w.str("format", self.format.as_deref());
        w.str("username", self.username.as_deref());
        w.str("python_path", self.python_path.as_deref());
        w.str("shell_type", self.shell_type.as_deref());
        w.finish()
    }

    /// Parses an upload record tolerantly (see the module docs).
    pub fn from_json(data: &[u8]) -> Result<ImageUpload, SchemaError> {
        let obj = parse_object(data)?;
        Ok(ImageUpload {
            state: state_field(&obj, UploadState::parse)?,
            state_time: time_field(&obj)?,
            external_id: opt_str(&obj, "external_id")?,
            external_name: opt_str(&obj, "external_name")?,
            format: opt_str(&obj, "format")?,
            username: opt_str(&obj, "username")?,
            python_path: opt_str(&obj, "python_path")?,
            shell_type: opt_str(&obj, "shell_type")?,
        })
    }
}

/// The component registration record, keys sorted as `json.dumps(sort_keys=True)` writes them.
/// The builder never changes `state` from `stopped`, like upstream.
pub fn builder_component_json(hostname: &str, version: &str) -> Vec<u8> {
    let mut w = DictWriter::new();
    w.str("hostname", Some(hostname));
    w.str("kind", Some("builder"));
    w.raw("model_api", "0");
    w.str("state", Some("stopped"));
    w.str("version", Some(version));
    w.finish()
}

/// Python's `repr(float)`: shortest round-trip digits, fixed notation for decimal exponents in
/// [-4, 16), scientific (`1e+16`, `1.5e-05`) outside, and always a `.0` on integral values.
pub fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let sci = format!("{x:e}");
    let (mantissa, exp) = sci.split_once('e').expect("{:e} always has an exponent");
    let exp: i32 = exp.parse().expect("{:e} exponent is an integer");
    let neg = mantissa.starts_with('-');
    let digits: String = mantissa.chars().filter(|c| c.is_ascii_digit()).collect();
    let mut out = String::new();
    if neg {
        out.push('-');
    }
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let point = exp as usize + 1;
            if digits.len() <= point {
                out.push_str(&digits);
                out.extend(std::iter::repeat_n('0', point - digits.len()));
                out.push_str(".0");
            } else {
                out.push_str(&digits[..point]);
                out.push('.');
                out.push_str(&digits[point..]);
            }
        } else {
            out.push_str("0.");
            out.extend(std::iter::repeat_n('0', (-exp - 1) as usize));
            out.push_str(&digits);
        }
    } else {
        out.push_str(&digits[..1]);
        if digits.len() > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        let _ = write!(out, "e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    out
}

/// A JSON string as Python's `json.dumps` writes it with `ensure_ascii=True`.
pub fn py_json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
    out
}

/// Writes one flat JSON object with Python's default separators.
struct DictWriter {
    out: String,
    first: bool,
}

impl DictWriter {
    fn new() -> DictWriter {
        DictWriter {
            out: String::from("{"),
            first: true,
        }
    }

    fn raw(&mut self, key: &str, value: &str) {
        if !self.first {
            self.out.push_str(", ");
        }
        self.first = false;
        self.out.push_str(&py_json_string(key));
        self.out.push_str(": ");
        self.out.push_str(value);
    }

    fn str(&mut self, key: &str, value: Option<&str>) {
        match value {
            Some(v) => self.raw(key, &py_json_string(v)),
            None => self.raw(key, "null"),
        }
    }

    fn float(&mut self, key: &str, value: f64) {
        self.raw(key, &py_float_repr(value));
    }

    fn finish(mut self) -> Vec<u8> {
        self.out.push('}');
        self.out.into_bytes()
    }
}

fn parse_object(data: &[u8]) -> Result<Map<String, Value>, SchemaError> {
    if data.iter().all(u8::is_ascii_whitespace) {
        return Err(SchemaError::Empty);
    }
    match serde_json::from_slice::<Value>(data) {
        Ok(Value::Object(obj)) => Ok(obj),
        Ok(_) => Err(SchemaError::NotObject),
        Err(e) => Err(SchemaError::Json(e.to_string())),
    }
}

fn state_field<S>(
    obj: &Map<String, Value>,
    parse: fn(&str) -> Option<S>,
) -> Result<S, SchemaError> {
    match obj.get("state") {
        Some(Value::String(s)) => {
            parse(s).ok_or_else(|| SchemaError::UnknownState(s.chars().take(64).collect()))
        }
        _ => Err(SchemaError::BadField("state")),
    }
}

fn time_field(obj: &Map<String, Value>) -> Result<f64, SchemaError> {
    match obj.get("state_time") {
        None | Some(Value::Null) => Ok(0.0),
        Some(Value::Number(n)) => n.as_f64().ok_or(SchemaError::BadField("state_time")),
        Some(_) => Err(SchemaError::BadField("state_time")),
    }
}

fn opt_str(obj: &Map<String, Value>, key: &'static str) -> Result<Option<String>, SchemaError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(SchemaError::BadField(key)),
    }
}

fn opt_str_default(
    obj: &Map<String, Value>,
    key: &'static str,
    default: &str,
) -> Result<Option<String>, SchemaError> {
    if obj.contains_key(key) {
        opt_str(obj, key)
    } else {
        Ok(Some(default.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUILDER_ID: &str = "3944b9cd-b957-4139-810a-3a54f033edae";

    #[test]
    fn building_record_is_byte_exact() {
        let b = ImageBuild::building(
            "localhost",
            BUILDER_ID,
            &["qcow2".into()],
            1795536810.9756422,
        );
        assert_eq!(
            String::from_utf8(b.to_json()).unwrap(),
            r#"{"state": "building", "state_time": 1795536810.9756422, "builder": "localhost", "builder_id": "3944b9cd-b957-4139-810a-3a54f033edae", "formats": "qcow2", "username": null, "python_path": null, "shell_type": null}"#
        );
        assert_eq!(b.to_json().len(), 212);
    }

    #[test]
    fn ready_and_deleting_records_are_byte_exact() {
        let golden = r#"{"state": "ready", "state_time": 1795536817.301367, "builder": "localhost", "builder_id": "3944b9cd-b957-4139-810a-3a54f033edae", "formats": "qcow2", "username": "zuul", "python_path": "auto", "shell_type": null}"#;
        let parsed = ImageBuild::from_json(golden.as_bytes()).unwrap();
        assert_eq!(parsed.state, BuildState::Ready);
        assert_eq!(parsed.to_json(), golden.as_bytes());
        let deleting = r#"{"state": "deleting", "state_time": 1795536897.412558, "builder": "localhost", "builder_id": "3944b9cd-b957-4139-810a-3a54f033edae", "formats": "qcow2", "username": "zuul", "python_path": "auto", "shell_type": null}"#;
        assert_eq!(
            ImageBuild::from_json(deleting.as_bytes())
                .unwrap()
                .to_json(),
            deleting.as_bytes()
        );
    }

    #[test]
    fn failed_build_has_no_formats_key_and_formats_are_sorted() {
        let mut b = ImageBuild::building("localhost", BUILDER_ID, &[], 1.5);
        b.state = BuildState::Failed;
        b.username = Some("zuul".into());
        b.python_path = Some("auto".into());
        assert_eq!(
            String::from_utf8(b.to_json()).unwrap(),
            r#"{"state": "failed", "state_time": 1.5, "builder": "localhost", "builder_id": "3944b9cd-b957-4139-810a-3a54f033edae", "username": "zuul", "python_path": "auto", "shell_type": null}"#
        );
        b.formats = vec!["vhd".into(), "qcow2".into(), "raw".into()];
        assert!(
            String::from_utf8(b.to_json())
                .unwrap()
                .contains(r#""formats": "qcow2,raw,vhd""#)
        );
    }

    #[test]
    fn upload_records_are_byte_exact() {
        let uploading = r#"{"state": "uploading", "state_time": 1795536901.0334203, "external_id": null, "external_name": null, "format": null, "username": "zuul", "python_path": "auto", "shell_type": null}"#;
        let u = ImageUpload::uploading(Some("zuul"), Some("auto"), None, 1795536901.0334203);
        assert_eq!(String::from_utf8(u.to_json()).unwrap(), uploading);
        let ready = r#"{"state": "ready", "state_time": 1795536820.7704952, "external_id": "ab1f6b3464d147e28a759f6d5570997a", "external_name": "test-image-2-1795536820", "format": "qcow2", "username": "zuul", "python_path": "auto", "shell_type": null}"#;
        let r = ImageUpload::from_json(ready.as_bytes()).unwrap();
        assert_eq!(r.to_json(), ready.as_bytes());
        assert_eq!(r.to_json().len(), 229);
        assert_eq!(
            String::from_utf8(ImageUpload::bare_failed(2.25).to_json()).unwrap(),
            r#"{"state": "failed", "state_time": 2.25, "external_id": null, "external_name": null, "format": null, "username": null, "python_path": null, "shell_type": null}"#
        );
    }

    #[test]
    fn component_record_is_byte_exact() {
        let c = builder_component_json("vm", "11.0.0");
        assert_eq!(
            String::from_utf8(c.clone()).unwrap(),
            r#"{"hostname": "vm", "kind": "builder", "model_api": 0, "state": "stopped", "version": "11.0.0"}"#
        );
        assert_eq!(c.len(), 94);
    }

    #[test]
    fn seventeen_digit_state_times_survive_a_read_and_a_write() {
        let golden = br#"{"state": "ready", "state_time": 1795545975.9448047, "external_id": "x", "external_name": "y", "format": "qcow2", "username": "zuul", "python_path": "auto", "shell_type": null}"#;
        assert_eq!(
            ImageUpload::from_json(golden).unwrap().to_json(),
            golden.to_vec()
        );
    }

    #[test]
    fn floats_follow_python_repr() {
        assert_eq!(py_float_repr(1795536810.9756422), "1795536810.9756422");
        assert_eq!(py_float_repr(1795536760.865047), "1795536760.865047");
        assert_eq!(py_float_repr(1795536760.0), "1795536760.0");
        assert_eq!(py_float_repr(0.0), "0.0");
        assert_eq!(py_float_repr(0.0001), "0.0001");
        assert_eq!(py_float_repr(0.00001), "1e-05");
        assert_eq!(py_float_repr(1.5e-5), "1.5e-05");
        assert_eq!(py_float_repr(1e16), "1e+16");
        assert_eq!(py_float_repr(123456789012345.6), "123456789012345.6");
        assert_eq!(py_float_repr(-2.5), "-2.5");
    }

    #[test]
    fn strings_escape_like_python_ensure_ascii() {
        assert_eq!(py_json_string("a\"b\\c\n"), r#""a\"b\\c\n""#);
        assert_eq!(py_json_string("é"), r#""\u00e9""#);
        assert_eq!(py_json_string("😀"), r#""\ud83d\ude00""#);
        assert_eq!(py_json_string("\u{1}\u{7f}"), r#""\u0001\u007f""#);
    }

    #[test]
    fn readers_tolerate_old_odd_and_bad_data() {
        // Missing keys get upstream's defaults; unknown keys are ignored; lists are accepted.
        let b = ImageBuild::from_json(
            br#"{"state": "ready", "state_time": 5, "formats": ["raw", "qcow2"], "x": 1}"#,
        )
        .unwrap();
        assert_eq!(b.username.as_deref(), Some("zuul"));
        assert_eq!(b.python_path.as_deref(), Some("/usr/bin/python2"));
        assert_eq!(b.formats, vec!["raw", "qcow2"]);
        assert_eq!(b.state_time, 5.0);
        assert_eq!(ImageBuild::from_json(b""), Err(SchemaError::Empty));
        assert!(matches!(
            ImageBuild::from_json(b"{\"state\": "),
            Err(SchemaError::Json(_))
        ));
        assert_eq!(ImageBuild::from_json(b"[1]"), Err(SchemaError::NotObject));
        assert_eq!(
            ImageBuild::from_json(br#"{"state": "paused"}"#),
            Err(SchemaError::UnknownState("paused".into()))
        );
        assert_eq!(
            ImageBuild::from_json(br#"{"state": 3}"#),
            Err(SchemaError::BadField("state"))
        );
        assert_eq!(
            ImageUpload::from_json(br#"{"state": "ready", "external_id": 7}"#),
            Err(SchemaError::BadField("external_id"))
        );
        assert!(ImageUpload::from_json(&[0xff, 0xfe]).is_err());
    }
}
