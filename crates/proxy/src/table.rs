//! The per-tool table `toolwarden demo` prints at its end and
//! `toolwarden top` redraws live: one renderer, right-aligned columns of
//! fixed widths under a header and a rule.

use std::fmt::Write as _;

/// A column: its header and its width in characters. Cells wider than the
/// column push the row out rather than being cut (a number is never
/// truncated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    /// The header.
    pub name: &'static str,
    /// The width, in characters.
    pub width: usize,
}

impl Column {
    /// A column `name` of `width` characters.
    #[must_use]
    pub const fn new(name: &'static str, width: usize) -> Self {
        Column { name, width }
    }
}

/// Renders `rows` under `columns`: the header, a rule as wide as the
/// header, then one line per row, each cell right-aligned in its column
/// and columns separated by two spaces. A row with fewer cells than
/// columns leaves the rest empty; extra cells are ignored.
///
/// ```
/// use toolwarden_proxy::table::{render, Column};
/// let text = render(
///     &[Column::new("tool", 6), Column::new("calls", 5)],
///     &[vec!["echo".into(), "12".into()]],
/// );
/// assert_eq!(text, "  tool  calls\n─────────────\n  echo     12\n");
/// ```
#[must_use]
pub fn render(columns: &[Column], rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    let header = columns
        .iter()
        .map(|c| format!("{:>w$}", c.name, w = c.width))
        .collect::<Vec<_>>()
        .join("  ");
    let _ = writeln!(out, "{header}");
    let _ = writeln!(out, "{}", "─".repeat(header.chars().count()));
    for row in rows {
        let cells = columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let cell = row.get(i).map_or("", String::as_str);
                format!("{cell:>w$}", w = c.width)
            })
            .collect::<Vec<_>>()
            .join("  ");
        let _ = writeln!(out, "{cells}");
    }
    out
}
