//! The report's charts as inline SVG strings, drawn here rather than by a charting script so
//! the page needs nothing but itself: no script to fetch or trust, and it prints and archives as
//! it is. Two shapes cover the report: a [`Plot`] (two linear axes, bars, a line, markers) and
//! [`hbars`] (one labelled bar per category). Every data mark carries a `<title>` (its numbers on
//! hover) and a `data-count`, and the text in it is escaped.

use std::fmt::Write;

use super::html::esc;

/// The drawing's size in SVG units (it scales to the page's width).
const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 300.0;
/// Room for the axes' ticks and labels: left, right (a second axis), top, bottom.
const MARGIN: (f64, f64, f64, f64) = (64.0, 56.0, 16.0, 48.0);

/// The step of 1, 2 or 5 × 10ⁿ nearest above `raw` (a positive span per tick or per bin).
pub(super) fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|s| *s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * magnitude)
}

/// `v` as an axis or table shows it: no more digits than its magnitude needs.
pub(super) fn num(v: f64) -> String {
    let a = v.abs();
    let s = if a == 0.0 || a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// A chart with linear x and y axes over data ranges; marks are added in data units.
pub(super) struct Plot {
    x: (f64, f64),
    y: (f64, f64),
    svg: String,
}

impl Plot {
    /// An empty plot of `x` and `y` (data ranges; an empty range is widened), with `label` as
    /// the image's accessible name.
    pub fn new(label: &str, x: (f64, f64), y: (f64, f64)) -> Self {
        let widen = |(a, b): (f64, f64)| if b > a { (a, b) } else { (a, a + 1.0) };
        let mut svg = String::new();
        let _ = write!(
            svg,
            r#"<svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{}">"#,
            esc(label)
        );
        Self {
            x: widen(x),
            y: widen(y),
            svg,
        }
    }

    /// The horizontal position of data `x`.
    pub fn px(&self, x: f64) -> f64 {
        let (l, r) = (MARGIN.0, WIDTH - MARGIN.1);
        l + (x - self.x.0) / (self.x.1 - self.x.0) * (r - l)
    }

    /// The vertical position of data `y`.
    pub fn py(&self, y: f64) -> f64 {
        let (t, b) = (MARGIN.2, HEIGHT - MARGIN.3);
        b - (y - self.y.0) / (self.y.1 - self.y.0) * (b - t)
    }

    /// Both axes with about six ticks each, and their labels.
    pub fn axes(&mut self, x_label: &str, y_label: &str) {
        let (l, r, t, b) = (MARGIN.0, WIDTH - MARGIN.1, MARGIN.2, HEIGHT - MARGIN.3);
        let mut s = format!(
            r#"<g class="axis"><line x1="{l}" y1="{b}" x2="{r}" y2="{b}"/><line x1="{l}" y1="{t}" x2="{l}" y2="{b}"/>"#
        );
        for v in ticks(self.x) {
            let x = self.px(v);
            let _ = write!(
                s,
                r#"<line x1="{x:.1}" y1="{b}" x2="{x:.1}" y2="{}"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"#,
                b + 4.0,
                b + 16.0,
                num(v)
            );
        }
        for v in ticks(self.y) {
            let y = self.py(v);
            let _ = write!(
                s,
                r#"<line class="grid" x1="{l}" y1="{y:.1}" x2="{r}" y2="{y:.1}"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
                l - 6.0,
                y + 4.0,
                num(v)
            );
        }
        let _ = write!(
            s,
            r#"<text class="label" x="{:.1}" y="{}" text-anchor="middle">{}</text><text class="label" transform="translate(14 {:.1}) rotate(-90)" text-anchor="middle">{}</text></g>"#,
            (l + r) / 2.0,
            HEIGHT - 8.0,
            esc(x_label),
            (t + b) / 2.0,
            esc(y_label)
        );
        self.svg += &s;
    }

    /// A second y axis on the right, labelled 0–100 % over the plot's height.
    pub fn percent_axis(&mut self, label: &str) {
        let (r, t, b) = (WIDTH - MARGIN.1, MARGIN.2, HEIGHT - MARGIN.3);
        let mut s = format!(r#"<g class="axis"><line x1="{r}" y1="{t}" x2="{r}" y2="{b}"/>"#);
        for p in [0, 25, 50, 75, 100] {
            let y = b - (b - t) * f64::from(p) / 100.0;
            let _ = write!(s, r#"<text x="{}" y="{:.1}">{p}%</text>"#, r + 6.0, y + 4.0);
        }
        let _ = write!(
            s,
            r#"<text class="label" transform="translate({} {:.1}) rotate(90)" text-anchor="middle">{}</text></g>"#,
            WIDTH - 10.0,
            (t + b) / 2.0,
            esc(label)
        );
        self.svg += &s;
    }

    /// A bar over `[x0, x1]` from 0 up to `y`, counting `count` things; `tip` on hover.
    pub fn bar(&mut self, (x0, x1): (f64, f64), y: f64, count: u64, tip: &str) {
        let (left, right, top, base) = (self.px(x0), self.px(x1), self.py(y), self.py(0.0));
        let _ = write!(
            self.svg,
            r#"<rect class="bar" x="{:.2}" y="{top:.2}" width="{:.2}" height="{:.2}" data-count="{count}"><title>{}</title></rect>"#,
            left + 0.5,
            (right - left - 1.0).max(0.5),
            (base - top).max(0.5),
            esc(tip)
        );
    }

    /// A line through `points` (already in SVG units: see [`Plot::px`], [`Plot::py`]).
    pub fn line(&mut self, class: &str, points: &[(f64, f64)]) {
        let mut d = String::new();
        for (i, (x, y)) in points.iter().enumerate() {
            let _ = write!(d, "{}{x:.2},{y:.2}", if i == 0 { "M" } else { " L" });
        }
        let _ = write!(
            self.svg,
            r#"<path class="{}" d="{d}" data-count="{}"/>"#,
            esc(class),
            points.len()
        );
    }

    /// A vertical marker at data `x` with `label` near its top, on text line `line` (0, 1, …:
    /// markers close together keep their labels apart).
    pub fn marker(&mut self, x: f64, line: usize, label: &str) {
        let (t, b, x) = (MARGIN.2, HEIGHT - MARGIN.3, self.px(x));
        let _ = write!(
            self.svg,
            r#"<g class="marker"><line x1="{x:.2}" y1="{t}" x2="{x:.2}" y2="{b}"/><text x="{:.2}" y="{:.1}">{}</text></g>"#,
            x + 3.0,
            t + 10.0 + 13.0 * line as f64,
            esc(label)
        );
    }

    /// `text` in the middle of the plot (for a chart without data).
    pub fn note(&mut self, text: &str) {
        let _ = write!(
            self.svg,
            r#"<text class="note" x="{}" y="{}" text-anchor="middle">{}</text>"#,
            WIDTH / 2.0,
            HEIGHT / 2.0,
            esc(text)
        );
    }

    /// The finished `<svg>` element.
    pub fn finish(mut self) -> String {
        self.svg += "</svg>";
        self.svg
    }
}

/// About six round values covering `range`.
fn ticks((lo, hi): (f64, f64)) -> Vec<f64> {
    let step = nice_step((hi - lo) / 6.0);
    let first = (lo / step).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    (first..=last).map(|i| i as f64 * step).collect()
}

/// One horizontal bar per `(label, count)`, the longest the full width; `label` names the
/// image. Categories with a zero count get a row and no bar.
pub(super) fn hbars(label: &str, rows: &[(String, u64)]) -> String {
    const ROW: f64 = 28.0;
    const NAME: f64 = 200.0;
    let height = (rows.len().max(1) as f64) * ROW + 36.0;
    let max = rows.iter().map(|r| r.1).max().unwrap_or(0).max(1) as f64;
    let total: u64 = rows.iter().map(|r| r.1).sum();
    let span = WIDTH - NAME - 90.0;
    let mut s = format!(
        r#"<svg viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{}">"#,
        esc(label)
    );
    for (i, (name, n)) in rows.iter().enumerate() {
        let y = 12.0 + i as f64 * ROW;
        let w = span * (*n as f64) / max;
        let share = 100.0 * (*n as f64) / (total.max(1) as f64);
        let _ = write!(
            s,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#,
            NAME - 8.0,
            y + 15.0,
            esc(&shorten(name, 30))
        );
        if *n > 0 {
            let _ = write!(
                s,
                r#"<rect class="bar" x="{NAME}" y="{y:.1}" width="{w:.2}" height="{:.1}" data-count="{n}"><title>{}: {n} ({share:.1}%)</title></rect>"#,
                ROW - 8.0,
                esc(name)
            );
        }
        let _ = write!(
            s,
            r#"<text x="{:.2}" y="{:.1}">{n} · {share:.1}%</text>"#,
            NAME + w + 6.0,
            y + 15.0
        );
    }
    let _ = write!(
        s,
        r#"<text class="label" x="{:.1}" y="{:.1}" text-anchor="middle">prompts</text></svg>"#,
        NAME + span / 2.0,
        height - 6.0
    );
    s
}

/// At most `max` characters of `s`, with an ellipsis when cut.
fn shorten(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut out: String = s.chars().take(max - 1).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_round() {
        assert_eq!(nice_step(0.7), 1.0);
        assert_eq!(nice_step(1.0), 1.0);
        assert_eq!(nice_step(1.3), 2.0);
        assert_eq!(nice_step(3.0), 5.0);
        assert_eq!(nice_step(0.013), 0.02);
        assert_eq!(nice_step(0.0), 1.0);
        assert_eq!(
            ticks((0.0, 12.0)),
            vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0]
        );
        assert_eq!(
            (num(0.125), num(12.34), num(250.0)),
            ("0.125".into(), "12.3".into(), "250".into())
        );
    }

    #[test]
    fn bars_only_for_nonzero_rows() {
        let svg = hbars("x", &[("a<b".into(), 3), ("c".into(), 0), ("d".into(), 1)]);
        assert_eq!(svg.matches("<rect").count(), 2, "{svg}");
        assert!(svg.contains("a&lt;b") && !svg.contains("a<b"), "{svg}");
    }
}
