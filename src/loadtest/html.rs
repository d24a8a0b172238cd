//! `--report FILE.html`: the run as one self-contained page, for people who read a load test
//! by its shape (a long tail, a stall halfway, one backend doing all the work) rather than by
//! three percentiles. Everything is inline, CSS and SVG drawn here ([`super::svg`]), and a
//! Content-Security-Policy forbids the page any fetch, so it opens the same from a CI artifact,
//! a mail attachment or a machine without network.
//!
//! Three charts, each a `<section class="chart" id=…>` with its `<svg>` and a table of the same
//! numbers: `latency` (histogram and CDF of submit → end seconds of succeeded prompts, p50/p95/p99
//! marked), `throughput` (succeeded prompts per second in equal time buckets over the run) and
//! `backends` (prompts per backend; by outcome instead when the run did not know the backends,
//! see [`super::Options::admin_url`]). Every string from outside (URL, error kinds, backend
//! names) is escaped.

use std::fmt::Write;

use super::report::{Percentiles, Report, Status};
use super::svg::{Plot, hbars, nice_step, num};

/// At most this many bins in the latency histogram (fewer with few samples: √n).
const MAX_BINS: f64 = 40.0;
/// About this many time buckets in the throughput chart (fewer are too coarse to show a stall;
/// more are mostly noise at the rates a GPU fleet runs).
const TIME_BUCKETS: f64 = 24.0;

/// Escapes `s` for HTML text and quoted attribute values.
pub(super) fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1200px;\
padding:0 16px;color:#222}h1{font-size:22px}h2{font-size:17px;margin:0 0 6px}\
table{border-collapse:collapse;font-variant-numeric:tabular-nums}td,th{padding:2px 10px;\
border-bottom:1px solid #ddd;text-align:left}td.n,th.n{text-align:right}\
section{margin:24px 0}.chart{display:grid;grid-template-columns:minmax(0,3fr) minmax(0,2fr);\
gap:20px;align-items:start}.chart>.scroll{max-height:340px;overflow:auto}\
svg{width:100%;height:auto;font-size:11px}.axis line{stroke:#555}.axis .grid{stroke:#eee}\
.label{font-size:12px;fill:#333}rect.bar{fill:#4a7bd0}rect.bar:hover{fill:#2b5aa8}\
path.cdf{fill:none;stroke:#d0742a;stroke-width:2}.marker line{stroke:#b22;stroke-dasharray:4 3}\
.marker text{fill:#b22}.note{fill:#888;font-size:14px}p.why{color:#666;margin:4px 0}";

/// The page for `r`: summary, then the three charts.
pub(super) fn render(r: &Report) -> String {
    let mut page = String::new();
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">\
<meta name=\"viewport\" content=\"width=device-width\">\
<title>comfy-gate loadtest: {url}</title><style>{STYLE}</style></head><body>\n\
<h1>Load test of {url}</h1>\n",
        url = esc(&r.url)
    );
    page += &summary(r);
    page += &latency(r);
    page += &throughput(r);
    page += &backends(r);
    page += "</body></html>\n";
    page
}

/// `<tr>` of cells; a cell starting with `#` is a number (right-aligned, the `#` dropped).
fn row(cells: &[String], head: bool) -> String {
    let tag = if head { "th" } else { "td" };
    let mut s = String::from("<tr>");
    for c in cells {
        match c.strip_prefix('#') {
            Some(n) => {
                let _ = write!(s, "<{tag} class=\"n\">{}</{tag}>", esc(n));
            }
            None => {
                let _ = write!(s, "<{tag}>{}</{tag}>", esc(c));
            }
        }
    }
    s + "</tr>"
}

/// A table of `head` and `rows` (cells as [`row`] takes them).
fn table(head: &[&str], rows: &[Vec<String>]) -> String {
    let head: Vec<String> = head.iter().map(|h| h.to_string()).collect();
    let mut s = format!("<table><thead>{}</thead><tbody>", row(&head, true));
    for r in rows {
        s += &row(r, false);
    }
    s + "</tbody></table>"
}

/// One chart's section: its title, an optional explanation, the drawing and its table.
fn chart(id: &str, title: &str, why: &str, svg: &str, table: &str) -> String {
    let why = if why.is_empty() {
        String::new()
    } else {
        format!("<p class=\"why\">{}</p>", esc(why))
    };
    format!(
        "<section class=\"chart\" id=\"{id}\"><div><h2>{}</h2>{why}{svg}</div>\
<div class=\"scroll\">{table}</div></section>\n",
        esc(title)
    )
}

fn summary(r: &Report) -> String {
    let mut rows = vec![
        vec!["target".to_string(), r.url.clone()],
        vec!["mode".into(), format!("{} loop", r.mode)],
    ];
    rows.extend(r.settings.iter().map(|(k, v)| vec![k.clone(), v.clone()]));
    let per_s = if r.wall_time_s > 0.0 {
        r.succeeded as f64 / r.wall_time_s
    } else {
        0.0
    };
    rows.extend([
        vec!["prompts".into(), r.total.to_string()],
        vec!["succeeded".into(), r.succeeded.to_string()],
        vec!["failed".into(), r.failed.to_string()],
        vec!["timed out".into(), r.timed_out.to_string()],
        vec!["duration".into(), format!("{} s", num(r.wall_time_s))],
        vec![
            "throughput".into(),
            format!(
                "{} prompts/s ({} /min)",
                num(per_s),
                num(r.throughput_per_min)
            ),
        ],
    ]);
    let settings = table(&["", ""], &rows);
    let p = |name: &str, p: &Option<Percentiles>| match p {
        Some(p) => vec![
            name.to_string(),
            format!("#{}", p.samples),
            format!("#{}", num(p.p50)),
            format!("#{}", num(p.p95)),
            format!("#{}", num(p.p99)),
        ],
        None => vec![
            name.into(),
            "#0".into(),
            "#-".into(),
            "#-".into(),
            "#-".into(),
        ],
    };
    let percentiles = table(
        &["seconds", "samples", "p50", "p95", "p99"],
        &[
            p("queue wait", &r.queue_wait_s),
            p("run time", &r.run_time_s),
            p("latency", &r.latency_s),
        ],
    );
    let errors: Vec<Vec<String>> = r
        .errors
        .iter()
        .map(|(k, n)| vec![k.clone(), format!("#{n}")])
        .collect();
    let errors = if errors.is_empty() {
        String::new()
    } else {
        format!(
            "<h2>Errors by kind</h2>{}",
            table(&["kind", "prompts"], &errors)
        )
    };
    format!(
        "<section id=\"summary\" class=\"chart\"><div><h2>Summary</h2>{settings}</div>\
<div><h2>Percentiles</h2>{percentiles}{errors}</div></section>\n"
    )
}

/// Histogram and CDF of succeeded prompts' submit → end seconds.
fn latency(r: &Report) -> String {
    let mut v: Vec<f64> = r
        .outcomes
        .iter()
        .filter_map(|o| o.latency)
        .map(|d| d.as_secs_f64())
        .collect();
    v.sort_by(f64::total_cmp);
    let title = "Latency: submit to end, succeeded prompts";
    let head = ["from s", "to s", "prompts", "cumulative"];
    let (Some(&min), Some(&max)) = (v.first(), v.last()) else {
        let mut plot = Plot::new(title, (0.0, 1.0), (0.0, 1.0));
        plot.axes("seconds", "prompts");
        plot.note("no prompt succeeded");
        return chart("latency", title, "", &plot.finish(), &table(&head, &[]));
    };
    let bins = (v.len() as f64).sqrt().ceil().clamp(5.0, MAX_BINS);
    let width = nice_step(((max - min).max(max * 0.02)).max(1e-3) / bins);
    let lo = (min / width).floor() * width;
    let n = ((max - lo) / width).floor() as usize + 1;
    let mut counts = vec![0u64; n];
    for x in &v {
        counts[(((x - lo) / width).floor() as usize).min(n - 1)] += 1;
    }
    let top = nice_step(*counts.iter().max().unwrap_or(&1) as f64 / 5.0) * 5.0;
    let hi = lo + n as f64 * width;
    let mut plot = Plot::new(title, (lo, hi), (0.0, top));
    plot.axes("seconds from submit to end", "prompts");
    plot.percent_axis("cumulative share");
    let (mut rows, mut seen) = (Vec::new(), 0);
    for (i, c) in counts.iter().enumerate() {
        let (a, b) = (lo + i as f64 * width, lo + (i + 1) as f64 * width);
        seen += c;
        let cumulative = 100.0 * seen as f64 / v.len() as f64;
        if *c > 0 {
            let tip = format!("{}–{} s: {c} prompts", num(a), num(b));
            plot.bar((a, b), *c as f64, *c, &tip);
        }
        rows.push(vec![
            format!("#{}", num(a)),
            format!("#{}", num(b)),
            format!("#{c}"),
            format!("#{cumulative:.1}%"),
        ]);
    }
    // The CDF as a step line over every sample, on the right-hand 0–100 % axis.
    let mut cdf = vec![(plot.px(lo), plot.py(0.0))];
    for (i, x) in v.iter().enumerate() {
        let (share_before, share) = (i as f64 / v.len() as f64, (i + 1) as f64 / v.len() as f64);
        cdf.push((plot.px(*x), plot.py(top * share_before)));
        cdf.push((plot.px(*x), plot.py(top * share)));
    }
    plot.line("cdf", &cdf);
    if let Some(p) = &r.latency_s {
        for (i, (name, x)) in [("p50", p.p50), ("p95", p.p95), ("p99", p.p99)]
            .into_iter()
            .enumerate()
        {
            plot.marker(x, i, &format!("{name} {} s", num(x)));
        }
    }
    let why = format!(
        "{} prompts in bins of {} s; the line is the share that ended within x seconds",
        v.len(),
        num(width)
    );
    chart("latency", title, &why, &plot.finish(), &table(&head, &rows))
}

/// Succeeded prompts per second in equal buckets of the run's wall time (by when they ended).
fn throughput(r: &Report) -> String {
    let wall = r
        .outcomes
        .iter()
        .map(|o| o.ended_at.as_secs_f64())
        .fold(r.wall_time_s, f64::max)
        .max(1e-3);
    let width = nice_step(wall / TIME_BUCKETS);
    let n = ((wall / width).ceil() as usize).max(1);
    let (mut ok, mut failed) = (vec![0u64; n], vec![0u64; n]);
    for o in &r.outcomes {
        let i = ((o.ended_at.as_secs_f64() / width).floor() as usize).min(n - 1);
        match o.status {
            Status::Succeeded => ok[i] += 1,
            _ => failed[i] += 1,
        }
    }
    let title = "Throughput: succeeded prompts per second";
    let top_rate = *ok.iter().max().unwrap_or(&0) as f64 / width;
    let top = nice_step(top_rate.max(1e-3) / 5.0) * 5.0;
    let mut plot = Plot::new(title, (0.0, n as f64 * width), (0.0, top));
    plot.axes("seconds into the run", "prompts per second");
    let mut rows = Vec::new();
    for i in 0..n {
        let (a, b) = (i as f64 * width, (i + 1) as f64 * width);
        let rate = ok[i] as f64 / width;
        if ok[i] > 0 {
            let tip = format!(
                "{}–{} s: {} prompts, {}/s",
                num(a),
                num(b),
                ok[i],
                num(rate)
            );
            plot.bar((a, b), rate, ok[i], &tip);
        }
        rows.push(vec![
            format!("#{}", num(a)),
            format!("#{}", num(b)),
            format!("#{}", ok[i]),
            format!("#{}", failed[i]),
            format!("#{}", num(rate)),
        ]);
    }
    if r.succeeded == 0 {
        plot.note("no prompt succeeded");
    }
    let why = format!("buckets of {} s, by when each prompt ended", num(width));
    let head = ["from s", "to s", "succeeded", "failed", "per second"];
    chart(
        "throughput",
        title,
        &why,
        &plot.finish(),
        &table(&head, &rows),
    )
}

/// Prompts per backend, or per outcome when the backends are unknown.
fn backends(r: &Report) -> String {
    if r.backends.is_empty() {
        let mut rows = vec![("succeeded".to_string(), r.succeeded)];
        rows.extend(r.errors.iter().map(|(k, n)| (k.clone(), *n)));
        let table_rows: Vec<Vec<String>> = rows
            .iter()
            .map(|(k, n)| vec![k.clone(), format!("#{n}"), share(*n, r.total)])
            .collect();
        let why = "Which backend ran each prompt is unknown: the gate's client API does not say \
(its history entries and events are the backend's own). Run with --admin-url (the gate's \
admin listener) to read it from /admin/decisions. Shown instead: prompts by outcome.";
        let title = "Prompts by outcome";
        let svg = hbars(title, &rows);
        let head = ["outcome", "prompts", "share"];
        return chart("backends", title, why, &svg, &table(&head, &table_rows));
    }
    let rows: Vec<(String, u64)> = r.backends.iter().map(|(k, n)| (k.clone(), *n)).collect();
    let table_rows: Vec<Vec<String>> = rows
        .iter()
        .map(|(name, n)| {
            let ok = r
                .outcomes
                .iter()
                .filter(|o| o.backend.as_deref() == Some(name) && o.status == Status::Succeeded)
                .count();
            vec![
                name.clone(),
                format!("#{n}"),
                format!("#{ok}"),
                share(*n, r.total),
            ]
        })
        .collect();
    let title = "Prompts per backend";
    let why = "by the gate's placement decisions (/admin/decisions); a retried prompt counts \
where it ran last";
    let head = ["backend", "prompts", "succeeded", "share"];
    let svg = hbars(title, &rows);
    chart("backends", title, why, &svg, &table(&head, &table_rows))
}

fn share(n: u64, total: u64) -> String {
    format!("#{:.1}%", 100.0 * n as f64 / total.max(1) as f64)
}

impl Report {
    /// The report as one self-contained HTML page (inline CSS and SVG, no script, no fetch):
    /// the summary and charts of latency, throughput over time and prompts per backend.
    pub fn to_html(&self) -> String {
        render(self)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::report::Outcome;
    use super::*;

    fn outcome(id: &str, status: Status, at_ms: u64, backend: Option<&str>) -> Outcome {
        let ok = status == Status::Succeeded;
        Outcome {
            prompt_id: id.into(),
            status,
            submitted_at: Duration::ZERO,
            ended_at: Duration::from_millis(at_ms),
            backend: backend.map(str::to_string),
            queue_wait: None,
            run_time: None,
            latency: ok.then(|| Duration::from_millis(at_ms)),
        }
    }

    fn marks(page: &str, id: &str) -> usize {
        let start = page.find(&format!("id=\"{id}\"")).expect(id);
        let end = page[start..].find("</section>").unwrap() + start;
        page[start..end].matches("<rect class=\"bar\"").count()
    }

    #[test]
    fn an_empty_run_still_has_every_chart() {
        let r = Report::from_outcomes("http://h:1", "closed", 1, &[], Duration::ZERO);
        let page = r.to_html();
        for id in ["summary", "latency", "throughput", "backends"] {
            assert!(page.contains(&format!("id=\"{id}\"")), "{id}");
            assert_eq!(marks(&page, id), 0, "{id}");
        }
        assert!(page.contains("no prompt succeeded"));
        assert!(!page.contains("NaN") && !page.contains("inf\""), "{page}");
    }

    #[test]
    fn outside_strings_are_escaped() {
        let evil = "<script>alert('x')</script>&\"";
        let outcomes = [
            outcome("a", Status::Succeeded, 100, Some(evil)),
            outcome("b", Status::Failed(evil.into()), 150, Some("gpu-1")),
        ];
        let mut r = Report::from_outcomes(evil, "closed", 1, &outcomes, Duration::from_secs(1));
        r.settings.push((evil.into(), evil.into()));
        let page = r.to_html();
        assert!(!page.contains("<script"), "{page}");
        assert!(page.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"));
        assert_eq!(esc("a<b>&\"'"), "a&lt;b&gt;&amp;&quot;&#39;");
    }

    #[test]
    fn marks_follow_the_data() {
        // Three prompts in the first second, one at 2.5 s on another backend, one failure.
        let outcomes = [
            outcome("a", Status::Succeeded, 200, Some("one")),
            outcome("b", Status::Succeeded, 210, Some("one")),
            outcome("c", Status::Succeeded, 900, Some("two")),
            outcome("d", Status::Succeeded, 2500, Some("two")),
            outcome("e", Status::TimedOut, 2600, Some("(unknown)")),
        ];
        let r = Report::from_outcomes("http://h:1", "open", 2, &outcomes, Duration::from_secs(3));
        let page = r.to_html();
        assert_eq!(marks(&page, "backends"), 3, "{page}");
        assert!(marks(&page, "latency") >= 3, "{page}");
        // Buckets of 0.2 s over 3 s: those from 0.2, 0.8 and 2.4 s hold the succeeded ones.
        assert_eq!(marks(&page, "throughput"), 3, "{page}");
        assert_eq!(page.matches("class=\"marker\"").count(), 3);
        assert!(page.contains("<path class=\"cdf\""));
        // Without backends, the share is by outcome.
        let outcomes: Vec<Outcome> = outcomes
            .into_iter()
            .map(|o| Outcome { backend: None, ..o })
            .collect();
        let r = Report::from_outcomes("http://h:1", "open", 2, &outcomes, Duration::from_secs(3));
        let page = r.to_html();
        assert!(page.contains("Prompts by outcome"));
        assert_eq!(marks(&page, "backends"), 2, "{page}");
    }
}
