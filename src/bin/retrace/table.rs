//! Text tables and the formatting of times, durations and payloads for people.

use serde_json::Value;

/// A table of text cells with a header, rendered with aligned columns.
#[derive(Debug, Default)]
pub(crate) struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    /// Columns whose cells are never cut (errors are shown in full).
    uncut: Vec<bool>,
    /// The widest a cut column may be.
    width_max: usize,
}

impl Table {
    /// A table with these column titles; cells wider than `width_max` are cut, except in the
    /// last column, which is never cut (it holds messages and errors).
    pub(crate) fn new(header: &[&str], width_max: usize) -> Self {
        let mut uncut = vec![false; header.len()];
        if let Some(last) = uncut.last_mut() {
            *last = true;
        }
        Table {
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
            uncut,
            width_max,
        }
    }

    /// Adds a row; missing cells are empty.
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text, one line per row, columns separated by two spaces.
    pub(crate) fn render(&self) -> String {
        let columns = self.header.len();
        let cell = |row: &[String], c: usize| -> String {
            let text = row.get(c).cloned().unwrap_or_default();
            if self.uncut[c] {
                text
            } else {
                cut(&text, self.width_max)
            }
        };
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (c, width) in widths.iter_mut().enumerate() {
                *width = (*width).max(cell(row, c).chars().count());
            }
        }
        let mut out = String::new();
        let mut line = |cells: Vec<String>| {
            let mut text = String::new();
            for (c, value) in cells.iter().enumerate() {
                if c + 1 == columns {
                    text.push_str(value);
                } else {
                    text.push_str(value);
                    let pad = widths[c] - value.chars().count() + 2;
                    text.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        };
        line(self.header.clone());
        for row in &self.rows {
            line((0..columns).map(|c| cell(row, c)).collect());
        }
        out
    }
}

/// `text` cut to `max` characters, with `…` marking the cut.
pub(crate) fn cut(text: &str, max: usize) -> String {
    let one_line = text.replace('\n', " ");
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut s: String = one_line.chars().take(max.saturating_sub(1)).collect();
    s.push('…');
    s
}

/// A JSON payload on one line, cut to `max` characters.
pub(crate) fn payload(value: &Value, max: usize) -> String {
    cut(&value.to_string(), max)
}

/// A UTC time as `2026-11-26 22:04:05.123`.
pub(crate) fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// The calendar date of a day count since 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// A duration for people: `850ms`, `2.35s`, `4m05s`, `3h12m`.
pub(crate) fn duration(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=59_999 => format!("{:.2}s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{}m{:02}s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{}h{:02}m", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

/// An offset from the start of a run: `+0.012s`.
pub(crate) fn offset(ms: u64) -> String {
    format!("+{}.{:03}s", ms / 1000, ms % 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_times() {
        assert_eq!(utc(0), "1970-01-01 00:00:00.000");
        assert_eq!(utc(1_764_195_845_123), "2025-11-26 22:24:05.123");
        assert_eq!(duration(12), "12ms");
        assert_eq!(duration(2_345), "2.35s");
        assert_eq!(duration(245_000), "4m05s");
        assert_eq!(offset(1_012), "+1.012s");
    }

    #[test]
    fn aligns_and_cuts() {
        let mut t = Table::new(&["A", "B"], 4);
        t.row(vec!["long value".into(), "never cut here".into()]);
        let text = t.render();
        assert!(text.contains("lon…  never cut here"), "{text}");
    }
}
