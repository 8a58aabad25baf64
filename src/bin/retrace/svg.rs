//! The SVG rendering of a [`Timeline`]: a standalone image that opens in a browser.
//!
//! Lanes are rows with their name on the left; time runs left to right from the run's first
//! event. Green bars completed, red bars failed, dashed outlines have no outcome yet, hatched
//! orange bars are compensations, a dark border marks calls that needed more than one attempt.
//! When the store journals attempts, each attempt is its own bar (failed ones red, the gaps
//! between them the retry backoffs), its tooltip naming the attempt's error.
//! Hovering a bar shows everything known about the call.

use crate::table::duration;
use crate::timeline::{Bar, BarState, LaneKind, Timeline};
use std::fmt::Write;

const WIDTH: u32 = 1100;
const LABEL_WIDTH: u32 = 190;
const RIGHT_MARGIN: u32 = 30;
const TOP: u32 = 86;
const LANE_HEIGHT: u32 = 30;
const BAR_HEIGHT: u32 = 18;
const LEGEND_HEIGHT: u32 = 44;
/// Roughly how wide a character of the 11px label font is.
const CHAR_WIDTH: f64 = 6.2;

/// The timeline as an SVG document.
pub(crate) fn render(t: &Timeline) -> String {
    let chart_width = f64::from(WIDTH - LABEL_WIDTH - RIGHT_MARGIN);
    let span_ms = t.end_ms.saturating_sub(t.start_ms).max(1);
    let x_of = |ms: u64| -> f64 {
        f64::from(LABEL_WIDTH)
            + (ms.saturating_sub(t.start_ms) as f64 / span_ms as f64) * chart_width
    };
    let lanes_height = LANE_HEIGHT * t.lanes.len() as u32;
    let height = TOP + lanes_height + LEGEND_HEIGHT;
    let mut s = String::new();
    let _ = writeln!(s, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="system-ui, -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r##"<defs><pattern id="hatch" width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)"><rect width="3" height="6" fill="#ffffff" fill-opacity="0.45"/></pattern></defs>"##
    );
    let _ = writeln!(
        s,
        r##"<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>"##
    );
    let _ = writeln!(
        s,
        r##"<text x="16" y="26" font-size="16" font-weight="bold" fill="#212121">{}</text>"##,
        escape(&t.title)
    );
    let _ = writeln!(
        s,
        r##"<text x="16" y="46" fill="#616161">{}</text>"##,
        escape(&t.subtitle)
    );
    // The time axis: gridlines at round offsets from the start.
    let step = tick_step(span_ms);
    let mut tick = 0;
    while tick <= span_ms {
        let x = x_of(t.start_ms + tick);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{}" x2="{x:.1}" y2="{}" stroke="#e0e0e0"/><text x="{x:.1}" y="{}" text-anchor="middle" font-size="10" fill="#757575">+{}</text>"##,
            TOP - 12,
            TOP + lanes_height,
            TOP - 16,
            escape(&duration(tick))
        );
        tick += step;
    }
    for (i, lane) in t.lanes.iter().enumerate() {
        let y = TOP + LANE_HEIGHT * i as u32;
        let band = if i % 2 == 0 { "#fafafa" } else { "#f0f0f0" };
        let _ = writeln!(s, r#"<g class="lane" data-lane="{}">"#, escape(&lane.name));
        let _ = writeln!(
            s,
            r#"<rect x="0" y="{y}" width="{WIDTH}" height="{LANE_HEIGHT}" fill="{band}" fill-opacity="0.6"/>"#
        );
        let weight = if lane.kind == LaneKind::Run {
            "bold"
        } else {
            "normal"
        };
        let _ = writeln!(
            s,
            r##"<text x="12" y="{}" font-weight="{weight}" fill="#212121">{}</text>"##,
            y + LANE_HEIGHT / 2 + 4,
            escape(&crate::table::cut(&lane.name, 28))
        );
        for bar in &lane.bars {
            render_bar(&mut s, bar, lane.kind, y, &x_of);
        }
        let _ = writeln!(s, "</g>");
    }
    render_legend(&mut s, TOP + lanes_height + 14);
    let _ = writeln!(s, "</svg>");
    s
}

fn render_bar(s: &mut String, bar: &Bar, kind: LaneKind, lane_y: u32, x_of: &dyn Fn(u64) -> f64) {
    let x = x_of(bar.start_ms);
    let width = (x_of(bar.end_ms) - x).max(3.0);
    let y = lane_y + (LANE_HEIGHT - BAR_HEIGHT) / 2;
    let fill = match (bar.state, kind) {
        (BarState::Failed, _) => "#e53935",
        (BarState::Pending, _) => "#ffffff",
        (BarState::Dropped, _) => "#bdbdbd",
        (BarState::Done, _) if bar.compensation => "#ef6c00",
        (BarState::Done, LaneKind::Run) => "#1e88e5",
        (BarState::Done, LaneKind::Activity) => "#43a047",
        (BarState::Done, LaneKind::Timer) => "#8e24aa",
        (BarState::Done, LaneKind::Signal) => "#f9a825",
        (BarState::Done, LaneKind::Child) => "#00897b",
    };
    let stroke = match bar.state {
        BarState::Pending => r##"stroke="#1e88e5" stroke-width="1.5" stroke-dasharray="4 3""##,
        BarState::Dropped => r##"stroke="#757575" stroke-width="1" stroke-dasharray="2 2""##,
        _ if bar.retried => r##"stroke="#3e2723" stroke-width="2""##,
        _ => r##"stroke="none""##,
    };
    let _ = writeln!(s, r#"<g class="bar">"#);
    let _ = writeln!(s, "<title>{}</title>", escape(&bar.detail));
    let _ = writeln!(
        s,
        r#"<rect x="{x:.1}" y="{y}" width="{width:.1}" height="{BAR_HEIGHT}" rx="3" fill="{fill}" {stroke}/>"#
    );
    if bar.compensation {
        let _ = writeln!(
            s,
            r#"<rect x="{x:.1}" y="{y}" width="{width:.1}" height="{BAR_HEIGHT}" rx="3" fill="url(#hatch)"/>"#
        );
    }
    let label_width = bar.label.chars().count() as f64 * CHAR_WIDTH;
    let text_y = y + BAR_HEIGHT / 2 + 4;
    let right_edge = f64::from(WIDTH - RIGHT_MARGIN);
    let inside_color = match bar.state {
        BarState::Pending | BarState::Dropped => "#212121",
        _ => "#ffffff",
    };
    let (tx, anchor, color) = if label_width + 8.0 <= width {
        (x + 4.0, "start", inside_color)
    } else if x + width + 4.0 + label_width <= right_edge {
        (x + width + 4.0, "start", "#212121")
    } else {
        ((x - 4.0).max(f64::from(LABEL_WIDTH)), "end", "#212121")
    };
    let _ = writeln!(
        s,
        r#"<text x="{tx:.1}" y="{text_y}" text-anchor="{anchor}" font-size="11" fill="{color}">{}</text>"#,
        escape(&bar.label)
    );
    let _ = writeln!(s, "</g>");
}

fn render_legend(s: &mut String, y: u32) {
    let items: [(&str, &str, &str); 6] = [
        ("#43a047", "none", "activity call completed"),
        ("#e53935", "none", "failed (call or attempt)"),
        ("#ffffff", "#1e88e5", "no outcome yet"),
        ("#ef6c00", "none", "compensation"),
        ("#8e24aa", "none", "timer"),
        ("#f9a825", "none", "signal wait"),
    ];
    let _ = writeln!(s, r#"<g class="legend">"#);
    let mut x = 16.0;
    for (fill, stroke, text) in items {
        let _ = writeln!(
            s,
            r##"<rect x="{x:.1}" y="{y}" width="14" height="12" rx="2" fill="{fill}" stroke="{stroke}"/><text x="{:.1}" y="{}" font-size="11" fill="#424242">{}</text>"##,
            x + 18.0,
            y + 10,
            escape(text)
        );
        x += 18.0 + text.len() as f64 * CHAR_WIDTH + 18.0;
    }
    let _ = writeln!(
        s,
        r##"<text x="{x:.1}" y="{}" font-size="11" fill="#424242">dark border: more than one attempt; hover a bar for details</text>"##,
        y + 10
    );
    let _ = writeln!(s, "</g>");
}

/// A round gridline spacing giving about eight lines over `span_ms`.
fn tick_step(span_ms: u64) -> u64 {
    let raw = (span_ms / 8).max(1);
    let mut magnitude = 1;
    while magnitude * 10 <= raw {
        magnitude *= 10;
    }
    for m in [1, 2, 5, 10] {
        if m * magnitude >= raw {
            return m * magnitude;
        }
    }
    10 * magnitude
}

/// Text safe inside an XML element or attribute.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(80), 10);
        assert_eq!(tick_step(1000), 200);
        assert_eq!(tick_step(7), 1);
        assert_eq!(tick_step(3_000), 500);
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(escape(r#"<a & "b">"#), "&lt;a &amp; &quot;b&quot;&gt;");
    }
}
