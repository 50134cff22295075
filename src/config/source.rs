//! One configuration file's text: `%(NODEPOOL_*)` substitution and byte offset to line/column.
//!
//! Like upstream nodepool, every `%(NAME)` whose `NAME` starts with `NODEPOOL_` is replaced by
//! that environment variable's value before the parser sees the text.
//! Other `%(...)` text and references to unset variables are left exactly as written.
//!
//! The same happens for YAML, with libyaml's offsets.
//!
//! Substitution changes lengths, so the parser's byte offsets refer to the substituted text.
//! Line numbers would stay right as long as no substituted value contains a newline, and
//! columns would drift on a line holding a substitution; to avoid both, every substitution is
//! recorded and offsets are mapped back to the file as written before they become
//! `line:col`.
//! A position inside a substituted value maps to the start of its `%(NAME)` reference.

use super::doc::Format;

/// Which of the two configuration files a position belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum FileId {
    /// The main file (`-c`).
    Main,
    /// The secure file (`-s`), which holds credentials.
    Secure,
}

/// A 1-based line and column (counted in characters) in one of the files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Pos {
    pub file: FileId,
    pub line: usize,
    pub col: usize,
}

/// One replaced `%(NAME)` reference.
struct Substitution {
    /// Byte range of the value in the substituted text.
    new: std::ops::Range<usize>,
    /// Byte range of the `%(NAME)` reference in the original text.
    orig: std::ops::Range<usize>,
}

/// The text of one file, before and after substitution.
pub(crate) struct Source {
    pub file: FileId,
    /// The file's syntax.
    pub format: Format,
    /// The text handed to the parser.
    pub text: String,
    original: String,
    line_starts: Vec<usize>,
    substitutions: Vec<Substitution>,
}

impl Source {
    /// Substitutes `%(NODEPOOL_*)` references using `env` to look variables up.
    pub fn new(
        file: FileId,
        format: Format,
        original: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Source {
        let mut text = String::with_capacity(original.len());
        let mut substitutions = Vec::new();
        let mut rest = 0;
        let mut search = 0;
        while let Some(found) = original[search..].find("%(") {
            let start = search + found;
            let name_start = start + 2;
            let Some(len) = original[name_start..].find([')', '\n']) else {
                break;
            };
            let name_end = name_start + len;
            let name = &original[name_start..name_end];
            let closed = original[name_end..].starts_with(')');
            let value = if closed && name.starts_with("NODEPOOL_") {
                env(name)
            } else {
                None
            };
            match value {
                Some(value) => {
                    text.push_str(&original[rest..start]);
                    let new_start = text.len();
                    text.push_str(&value);
                    substitutions.push(Substitution {
                        new: new_start..text.len(),
                        orig: start..name_end + 1,
                    });
                    rest = name_end + 1;
                    search = rest;
                }
                None => search = name_start,
            }
        }
        text.push_str(&original[rest..]);
        let line_starts = std::iter::once(0)
            .chain(original.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Source {
            file,
            format,
            text,
            original: original.to_owned(),
            line_starts,
            substitutions,
        }
    }

    /// Converts a byte offset in the substituted text into a position in the original file.
    pub fn pos(&self, offset: usize) -> Pos {
        let offset = self.original_offset(offset).min(self.original.len());
        let line = self.line_starts.partition_point(|&start| start <= offset) - 1;
        let start = self.line_starts[line];
        let col = match self.original.get(start..offset) {
            Some(prefix) => prefix.chars().count(),
            None => offset - start,
        };
        Pos {
            file: self.file,
            line: line + 1,
            col: col + 1,
        }
    }

    /// The position of the first character of the file, used for keys missing at top level.
    pub fn start(&self) -> Pos {
        Pos {
            file: self.file,
            line: 1,
            col: 1,
        }
    }

    fn original_offset(&self, offset: usize) -> usize {
        let mut delta: isize = 0;
        for sub in &self.substitutions {
            if offset < sub.new.start {
                break;
            }
            if offset < sub.new.end {
                return sub.orig.start;
            }
            delta = sub.orig.end as isize - sub.new.end as isize;
        }
        (offset as isize + delta) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "NODEPOOL_A" => Some("xy".to_owned()),
            "NODEPOOL_LONG" => Some("a\nb\nc".to_owned()),
            "OTHER" => Some("no".to_owned()),
            _ => None,
        }
    }

    #[test]
    fn substitutes_only_nodepool_variables() {
        let s = Source::new(
            FileId::Main,
            Format::Toml,
            "%(NODEPOOL_A) %(OTHER) %(NODEPOOL_UNSET) %(",
            &env,
        );
        assert_eq!(s.text, "xy %(OTHER) %(NODEPOOL_UNSET) %(");
    }

    #[test]
    fn positions_refer_to_the_original_text() {
        let original = "a = \"%(NODEPOOL_LONG)\" # x\nb = 1\n";
        let s = Source::new(FileId::Main, Format::Toml, original, &env);
        let b = s.text.find("b = 1").unwrap();
        assert_eq!((s.pos(b).line, s.pos(b).col), (2, 1));
        let hash = s.text.find('#').unwrap();
        assert_eq!((s.pos(hash).line, s.pos(hash).col), (1, 24));
        let inside = s.text.find("b\nc").unwrap();
        assert_eq!((s.pos(inside).line, s.pos(inside).col), (1, 6));
    }
}
