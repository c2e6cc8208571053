//! How a span's fields are kept for the log lines inside it: one compact JSON object, written
//! straight into the span's buffer.
//!
//! The `sync` span opens once per sync (a thousand times a second at full rate) and almost
//! never has a line logged inside it, so what it costs to open is what matters. tracing's
//! `JsonFields` built a map of `serde_json::Value`s (a string of its own per Display field),
//! serialized it, and grew the span's buffer as it went: about four allocations and as many
//! reallocations per sync. Here the object is formatted into a stack buffer and copied into
//! the span's buffer in one write (one allocation of the right size). `CloudLoggingJson` reads
//! it back as JSON, as before.

use std::fmt::{self, Write as _};
use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FormatFields, FormattedFields};

/// Span fields as one JSON object (`{"mailbox":"…","from":7}`): strings and Debug/Display
/// values as JSON strings, integers and booleans as themselves, non-finite floats as `null`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SpanJsonFields;

impl<'writer> FormatFields<'writer> for SpanJsonFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut object = ObjectWriter::default();
        fields.record(&mut object);
        writer.write_str(object.finish())
    }

    /// Fields recorded after the span opened (`Span::record`) join its object.
    fn add_fields(
        &self,
        current: &'writer mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let mut object = ObjectWriter::default();
        fields.record(&mut object);
        let added = object.finish();
        if added == "{}" {
            return Ok(());
        }
        match current.fields.strip_suffix('}') {
            Some(open) if open.len() > 1 => {
                let len = open.len();
                current.fields.truncate(len);
                current.fields.push(',');
                current.fields.push_str(&added[1..]);
            }
            _ => {
                current.fields.clear();
                current.fields.push_str(added);
            }
        }
        Ok(())
    }
}

/// The size of the stack buffer: a `sync` span's object is about 70 bytes; a longer one
/// continues on the heap.
const INLINE: usize = 256;

/// Builds one JSON object from recorded fields.
struct ObjectWriter {
    buf: Buffer,
    fields: usize,
}

impl Default for ObjectWriter {
    fn default() -> Self {
        let mut buf = Buffer::default();
        buf.push_str("{");
        ObjectWriter { buf, fields: 0 }
    }
}

impl ObjectWriter {
    fn key(&mut self, field: &Field) {
        if self.fields > 0 {
            self.buf.push_str(",");
        }
        self.fields += 1;
        self.buf.push_str("\"");
        let _ = Escaped(&mut self.buf).write_str(field.name());
        self.buf.push_str("\":");
    }

    fn finish(&mut self) -> &str {
        self.buf.push_str("}");
        self.buf.as_str()
    }
}

impl Visit for ObjectWriter {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.key(field);
        self.buf.push_str("\"");
        let _ = Escaped(&mut self.buf).write_str(value);
        self.buf.push_str("\"");
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.key(field);
        self.buf.push_str("\"");
        let _ = write!(Escaped(&mut self.buf), "{value:?}");
        self.buf.push_str("\"");
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field);
        let _ = write!(self.buf, "{value}");
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field);
        let _ = write!(self.buf, "{value}");
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field);
        self.buf.push_str(if value { "true" } else { "false" });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.key(field);
        if value.is_finite() {
            let _ = write!(self.buf, "{value}");
        } else {
            self.buf.push_str("null");
        }
    }
}

/// Text in a stack array while it fits, on the heap once it does not.
struct Buffer {
    inline: [u8; INLINE],
    len: usize,
    spilled: Option<String>,
}

impl Default for Buffer {
    fn default() -> Self {
        Buffer {
            inline: [0; INLINE],
            len: 0,
            spilled: None,
        }
    }
}

impl Buffer {
    fn push_str(&mut self, s: &str) {
        if let Some(heap) = &mut self.spilled {
            heap.push_str(s);
        } else if self.len + s.len() <= INLINE {
            self.inline[self.len..self.len + s.len()].copy_from_slice(s.as_bytes());
            self.len += s.len();
        } else {
            let mut heap = String::with_capacity(2 * INLINE + s.len());
            heap.push_str(self.as_str());
            heap.push_str(s);
            self.spilled = Some(heap);
        }
    }

    fn as_str(&self) -> &str {
        match &self.spilled {
            Some(heap) => heap,
            // Only whole `&str`s are ever copied in, so the bytes are UTF-8 up to `len`.
            None => std::str::from_utf8(&self.inline[..self.len]).unwrap_or_default(),
        }
    }
}

impl fmt::Write for Buffer {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push_str(s);
        Ok(())
    }
}

/// Writes text as the inside of a JSON string (RFC 8259 §7: quote, backslash and control
/// characters escaped).
struct Escaped<'a>(&'a mut Buffer);

impl fmt::Write for Escaped<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let mut plain = 0;
        for (i, c) in s.char_indices() {
            let escape = match c {
                '"' => "\\\"",
                '\\' => "\\\\",
                '\n' => "\\n",
                '\r' => "\\r",
                '\t' => "\\t",
                c if (c as u32) < 0x20 => "",
                _ => continue,
            };
            self.0.push_str(&s[plain..i]);
            if escape.is_empty() {
                let _ = write!(self.0, "\\u{:04x}", c as u32);
            } else {
                self.0.push_str(escape);
            }
            plain = i + c.len_utf8();
        }
        self.0.push_str(&s[plain..]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::tests::log_lines;
    use serde_json::{Value, json};

    #[test]
    fn span_fields_reach_the_lines_inside_as_json_values() {
        let lines = log_lines(|| {
            let span = tracing::info_span!(
                "sync",
                mailbox = %"a\"b\\c\nd\u{1}é",
                from = 7u64,
                delta = -3i64,
                ok = true,
                ratio = 0.5f64,
                nan = f64::NAN,
                text = "plain",
                kind = ?Some(1),
            );
            span.in_scope(|| tracing::warn!(changes = 3u64, "inside"));
        });
        assert_eq!(lines.len(), 1);
        let line = &lines[0];
        assert_eq!(line["mailbox"], "a\"b\\c\nd\u{1}é");
        assert_eq!(line["from"], 7);
        assert_eq!(line["delta"], -3);
        assert_eq!(line["ok"], true);
        assert_eq!(line["ratio"], 0.5);
        assert_eq!(line["nan"], Value::Null);
        assert_eq!(line["text"], "plain");
        assert_eq!(line["kind"], "Some(1)");
        assert_eq!(line["changes"], 3);
        assert_eq!(line["span"], "sync");
    }

    #[test]
    fn fields_recorded_later_join_the_object_and_long_values_spill_to_the_heap() {
        let long = "x".repeat(3 * INLINE);
        let lines = log_lines(|| {
            let span = tracing::info_span!(
                "sync",
                from = 1u64,
                to = tracing::field::Empty,
                note = tracing::field::Empty
            );
            span.record("to", 9u64);
            span.record("note", long.as_str());
            span.in_scope(|| tracing::info!("after"));
            let empty = tracing::info_span!("empty", later = tracing::field::Empty);
            empty.record("later", 2u64);
            empty.in_scope(|| tracing::info!("late"));
        });
        assert_eq!(lines[0]["from"], 1);
        assert_eq!(lines[0]["to"], 9);
        assert_eq!(lines[0]["note"], json!(long));
        assert_eq!(lines[1]["later"], 2);
        assert_eq!(lines[1]["span"], "empty");
    }
}
