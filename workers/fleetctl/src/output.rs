//! How a command prints: aligned tables for people (the default), JSON for scripts
//! (`--output json`, one document on stdout, stable field names).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::ValueEnum;
use serde::Serialize;
use serde_json::Value;

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum Output {
    /// Aligned columns.
    #[default]
    Table,
    /// One JSON document (`tail`: one JSON object per line).
    Json,
}

/// Rows under headers, printed with each column as wide as its widest cell.
#[derive(Debug)]
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Self {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text; the last column is not padded.
    pub fn render(&self) -> String {
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
            let cells: Vec<&str> = cells.collect();
            let last = cells.len().saturating_sub(1);
            for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
                if i == last {
                    out.push_str(cell);
                } else {
                    out.push_str(cell);
                    out.push_str(&" ".repeat(w - cell.chars().count() + 2));
                }
            }
            out.push('\n');
        };
        line(&mut out, &mut self.headers.iter().copied());
        for row in &self.rows {
            line(&mut out, &mut row.iter().map(String::as_str));
        }
        out
    }
}

/// Whether the command printed its JSON document: a command that fails afterwards (reconcile
/// finding gaps, a redrive with refusals) has said everything, and must not print a second one.
static DOCUMENT_PRINTED: AtomicBool = AtomicBool::new(false);

/// Prints `json` or `table` (with `empty` instead of a table without rows).
pub fn print(output: Output, json: &Value, table: &Table, empty: &str) {
    if output == Output::Json {
        return self::json(json);
    }
    let mut stdout = std::io::stdout().lock();
    let _ = match table.is_empty() {
        true => writeln!(stdout, "{empty}"),
        false => write!(stdout, "{}", table.render()),
    };
}

/// Prints the JSON document of a command whose human text is written otherwise (`--output json`).
/// Written as it is serialised: a long document (reconcile's gaps) is never held as text.
pub fn json(doc: &impl Serialize) {
    DOCUMENT_PRINTED.store(true, Ordering::Relaxed);
    let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
    let _ = serde_json::to_writer_pretty(&mut stdout, doc);
    let _ = writeln!(stdout);
}

/// Under `--output json`, the document of a command that failed before printing its own: a
/// script reading stdout gets `{"error": …}` (one line, so that it also fits `tail`'s JSON
/// lines) rather than nothing. The error's line is on stderr too, as in every output.
pub fn error_document(output: Output, error: &anyhow::Error) {
    if output == Output::Json && !DOCUMENT_PRINTED.load(Ordering::Relaxed) {
        println!("{}", serde_json::json!({"error": format!("{error:#}")}));
    }
}

/// A value cut to `max` characters (an error text in a table), with an ellipsis.
pub fn cut(text: &str, max: usize) -> String {
    let one_line = text.replace('\n', " ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut out: String = one_line.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let mut t = Table::new(&["ID", "REASON", "ERROR"]);
        t.row(vec![
            "1-0".into(),
            "invalid".into(),
            "id: not a UUID".into(),
        ]);
        t.row(vec!["1700000000000-12".into(), "x".into(), "".into()]);
        assert_eq!(
            t.render(),
            "ID                REASON   ERROR\n1-0               invalid  id: not a UUID\n1700000000000-12  x        \n"
        );
        assert_eq!(cut("abcdef", 4), "abc…");
        assert_eq!(cut("a\nb", 4), "a b");
    }
}
