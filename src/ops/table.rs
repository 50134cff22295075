//! Tables in the layout of PrettyTable 0.7, which the nodepool CLI prints: `+---+` borders,
//! `| x |` cells padded by one space, left-aligned, one separator line under the header, no
//! lines between rows. A table without rows is its header plus two border lines.

use comfy_table::{
    CellAlignment, ContentArrangement, ContentLineStyle, LineStyle, Table, TableStyle,
};

/// PrettyTable's ASCII frame.
const PRETTY: TableStyle = TableStyle::new()
    .top_border(LineStyle::new('+', '-', '+', '+'))
    .header_lines(ContentLineStyle::new('|', '|', '|'))
    .header_separator(LineStyle::new('+', '-', '+', '+'))
    .content_lines(ContentLineStyle::new('|', '|', '|'))
    .bottom_border(LineStyle::new('+', '-', '+', '+'));

/// Renders `rows` under `headers` (no trailing newline).
pub fn render(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut table = Table::new();
    table
        .load_style(PRETTY)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(headers.to_vec());
    for row in rows {
        table.add_row(row.clone());
    }
    for column in table.column_iter_mut() {
        column.set_cell_alignment(CellAlignment::Left);
    }
    table.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(cells: &[&str]) -> Vec<String> {
        cells.iter().map(|c| c.to_string()).collect()
    }

    #[test]
    fn rows_look_like_prettytable() {
        let rows = vec![
            strings(&["test-image-1", "True", "", ""]),
            strings(&["test-image-2", "False", "building", "00:00:00:10"]),
        ];
        let expected = "\
+--------------+--------+---------------+-------------------+
| Image        | Paused | Build Request | Build Request Age |
+--------------+--------+---------------+-------------------+
| test-image-1 | True   |               |                   |
| test-image-2 | False  | building      | 00:00:00:10       |
+--------------+--------+---------------+-------------------+";
        assert_eq!(
            render(
                &["Image", "Paused", "Build Request", "Build Request Age"],
                &rows
            ),
            expected
        );
    }

    #[test]
    fn an_empty_table_is_header_and_borders() {
        let expected = "\
+-------+--------+
| Image | Paused |
+-------+--------+
+-------+--------+";
        assert_eq!(render(&["Image", "Paused"], &[]), expected);
    }

    #[test]
    fn wide_characters_count_by_display_width() {
        let expected = "\
+-------+---+
| Image | x |
+-------+---+
| é日本 | y |
+-------+---+";
        assert_eq!(
            render(&["Image", "x"], &[strings(&["é日本", "y"])]),
            expected
        );
    }
}
