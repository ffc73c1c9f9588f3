//! How read commands print: an aligned table by default, `--json` (one JSON
//! document) or `--csv` (RFC 4180 quoting).

use std::borrow::Cow;

/// The output switches every read command takes.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct OutputArgs {
    /// Print one JSON document.
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// Print CSV rows (with a header line).
    #[arg(long)]
    pub csv: bool,
}

/// The chosen output form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Csv,
}

impl OutputArgs {
    pub fn format(&self) -> Format {
        if self.json {
            Format::Json
        } else if self.csv {
            Format::Csv
        } else {
            Format::Table
        }
    }
}

/// Rows under named columns, rendered as an aligned table or as CSV.
#[derive(Debug, Clone)]
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Table {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (one cell per header).
    pub fn push(&mut self, row: Vec<String>) {
        debug_assert_eq!(row.len(), self.headers.len());
        self.rows.push(row);
    }

    /// Columns padded to their widest cell, two spaces apart; line breaks in
    /// a cell are shown as spaces so one row stays one line.
    pub fn render(&self) -> String {
        let cells: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| r.iter().map(|c| one_line(c)).collect())
            .collect();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &cells {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, row: Vec<&str>| {
            let last = row.len().saturating_sub(1);
            let mut text = String::new();
            for (i, (cell, w)) in row.iter().zip(&widths).enumerate() {
                text.push_str(cell);
                if i < last {
                    let pad = w - cell.chars().count() + 2;
                    text.extend(std::iter::repeat(' ').take(pad));
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        };
        line(&mut out, self.headers.clone());
        for row in &cells {
            line(&mut out, row.iter().map(String::as_str).collect());
        }
        if self.rows.is_empty() {
            out.push_str("(none)\n");
        }
        out
    }

    /// A header line and one line per row, each field quoted when needed.
    pub fn csv(&self) -> String {
        let mut out = String::new();
        let line = |out: &mut String, row: &mut dyn Iterator<Item = &str>| {
            let fields: Vec<Cow<str>> = row.map(csv_field).collect();
            out.push_str(&fields.join(","));
            out.push_str("\r\n");
        };
        line(&mut out, &mut self.headers.iter().copied());
        for row in &self.rows {
            line(&mut out, &mut row.iter().map(String::as_str));
        }
        out
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\r', '\n', '\t'], " ")
}

/// One CSV field: quoted (inner quotes doubled) when it holds a comma, a
/// quote, a line break or edge spaces.
pub fn csv_field(s: &str) -> Cow<'_, str> {
    let needs = s.contains([',', '"', '\n', '\r']) || s.starts_with(' ') || s.ends_with(' ');
    if needs {
        Cow::Owned(format!("\"{}\"", s.replace('"', "\"\"")))
    } else {
        Cow::Borrowed(s)
    }
}

/// A value for a cell: `-` when absent.
pub fn cell(value: Option<&str>) -> String {
    value.unwrap_or("-").to_string()
}

/// A value for a CSV field: empty when absent.
pub fn field(value: Option<&str>) -> String {
    value.unwrap_or_default().to_string()
}

/// One pretty JSON document with a final newline.
pub fn json<T: serde::Serialize>(value: &T) -> anyhow::Result<String> {
    let mut s = serde_json::to_string_pretty(value)?;
    s.push('\n');
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_only_when_needed() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
        assert_eq!(csv_field(" edge"), "\" edge\"");
    }

    #[test]
    fn table_columns_align() {
        let mut t = Table::new(&["ID", "STATUS"]);
        t.push(vec!["1".into(), "canceled".into()]);
        t.push(vec!["1234".into(), "posted".into()]);
        assert_eq!(t.render(), "ID    STATUS\n1     canceled\n1234  posted\n");
        assert_eq!(Table::new(&["A"]).render(), "A\n(none)\n");
    }
}
