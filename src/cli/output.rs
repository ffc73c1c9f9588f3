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

    /// Columns padded to their widest cell, two spaces apart. On a
    /// terminal the table fits its width, long cells wrapped onto more
    /// lines; elsewhere (a pipe, a file) each row stays one line, for
    /// `grep` and `awk`.
    pub fn render(&self) -> String {
        self.render_within(terminal_width())
    }

    /// As [`Table::render`], within `width` columns when one is given.
    pub fn render_within(&self, width: Option<u16>) -> String {
        let mut table = comfy_table::Table::new();
        table.load_style(comfy_table::presets::NOTHING);
        table.set_header(self.headers.clone());
        for row in &self.rows {
            // Line breaks in a cell are shown as spaces: one row, one line
            // (unless the terminal's width wraps it).
            table.add_row(row.iter().map(|c| one_line(c)).collect::<Vec<_>>());
        }
        if let Some(width) = width {
            table.set_content_arrangement(comfy_table::ContentArrangement::Dynamic);
            table.set_width(width);
        }
        for column in table.column_iter_mut() {
            column.set_padding((0, 2));
        }
        let mut out = String::new();
        for line in table.lines() {
            out.push_str(line.trim_end());
            out.push('\n');
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

/// The width of the terminal stdout is, if it is one.
fn terminal_width() -> Option<u16> {
    let term = console::Term::stdout();
    term.is_term()
        .then(|| term.size_checked())
        .flatten()
        .map(|(_rows, columns)| columns)
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

    /// Within a width (a terminal's), a long cell is wrapped onto more lines,
    /// every word kept, and no line is wider; without one, each row stays
    /// one line however long.
    #[test]
    fn tables_fit_the_width_given() {
        let mut t = Table::new(&["ID", "SUMMARY"]);
        let summary = "2 of 5 transfers were not cancelled: they completed before the cancel reached the provider";
        t.push(vec!["alrt_1".into(), summary.into()]);
        let narrow = t.render_within(Some(40));
        assert!(narrow.lines().count() > 2, "{narrow}");
        for line in narrow.lines() {
            assert!(line.chars().count() <= 40, "{line:?} in\n{narrow}");
        }
        let words: Vec<&str> = narrow.split_whitespace().collect();
        for word in summary.split_whitespace() {
            assert!(words.contains(&word), "{word} lost in\n{narrow}");
        }
        let wide = t.render_within(None);
        assert_eq!(wide, format!("ID      SUMMARY\nalrt_1  {summary}\n"));
    }
}
