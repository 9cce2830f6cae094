//! The report as one self-contained HTML page: inline SVG charts drawn
//! with plotters' SVG backend, every chart's figures in a table beside it,
//! inline styles for light and dark and for print, and a
//! Content-Security-Policy that forbids anything from outside the page
//! (no script, font, image or style can be fetched).

use std::fmt::Write as _;

use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use super::compare::Comparison;
use super::figures::{ChurnDay, Figures};

/// Colours of the tiers, lowest first (cycled past eight).
const PALETTE: [RGBColor; 8] = [
    RGBColor(0xd6, 0x45, 0x45),
    RGBColor(0xe8, 0x9f, 0x3c),
    RGBColor(0x3c, 0x9d, 0x5a),
    RGBColor(0x2f, 0x6f, 0xb5),
    RGBColor(0x7b, 0x4f, 0xb0),
    RGBColor(0x6b, 0x6b, 0x6b),
    RGBColor(0x1f, 0x9e, 0xa8),
    RGBColor(0xa8, 0x36, 0x7c),
];

const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; img-src data:";

const STYLE: &str = "
:root { color-scheme: light dark; --fg: #1d1d1f; --bg: #ffffff; --muted: #6b6b70; --line: #d8d8dc; --shade: 47, 111, 181; }
@media (prefers-color-scheme: dark) { :root { --fg: #ececf0; --bg: #16161a; --muted: #a0a0a8; --line: #3a3a40; } }
body { font: 15px/1.45 system-ui, sans-serif; color: var(--fg); background: var(--bg); margin: 2rem auto; max-width: 72rem; padding: 0 1rem; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2.5rem; border-bottom: 1px solid var(--line); }
.chart { display: flex; flex-wrap: wrap; gap: 1.5rem; align-items: flex-start; }
.chart svg { background: #fff; border: 1px solid var(--line); border-radius: 4px; max-width: 100%; height: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; margin: 0.5rem 0; }
.wide { overflow-x: auto; max-width: 100%; }
th, td { border: 1px solid var(--line); padding: 0.2rem 0.5rem; text-align: right; }
th { background: rgba(var(--shade), 0.08); } td:first-child, th:first-child { text-align: left; }
.muted { color: var(--muted); }
details { margin: 0.5rem 0; }
@media print { body { margin: 0; max-width: none; } details { display: block; } details > summary { display: none; } .chart { break-inside: avoid; } }
";

/// The page for `figures`.
pub fn render(figures: &Figures, title: &str) -> String {
    let mut page = String::with_capacity(64 * 1024);
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{STYLE}</style></head><body>\n<h1>{}</h1>\n",
        escape(title),
        escape(title)
    );
    summary(&mut page, figures);
    tiers_over_time(&mut page, figures);
    distribution(&mut page, figures);
    separation(&mut page, figures);
    movement(&mut page, figures);
    if let Some(comparison) = &figures.comparison {
        compared(&mut page, comparison);
    }
    page.push_str("</body></html>\n");
    page
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn summary(page: &mut String, f: &Figures) {
    let s = &f.summary;
    page.push_str("<h2>Summary</h2>\n");
    if s.events == 0 {
        page.push_str("<p>The history holds no event: there is nothing to report.</p>\n");
    }
    let period = match (&s.period_start, &s.period_end) {
        (Some(a), Some(b)) => format!("{a} to {b}"),
        _ => "(no event)".into(),
    };
    let _ = write!(
        page,
        "<table id=\"summary\"><tr><th>period</th><td>{}</td></tr>\
         <tr><th>events read</th><td>{}</td></tr><tr><th>accepted</th><td>{}</td></tr>\
         <tr><th>erasure requests</th><td>{}</td></tr><tr><th>customers at the end</th><td>{}</td></tr>",
        escape(&period),
        s.events,
        s.accepted,
        s.erasures,
        s.customers
    );
    for (reason, n) in &s.dead_lettered {
        let _ = write!(
            page,
            "<tr><th>dead-lettered: {}</th><td>{n}</td></tr>",
            escape(reason)
        );
    }
    for (reason, n) in &s.ignored {
        let _ = write!(
            page,
            "<tr><th>ignored: {}</th><td>{n}</td></tr>",
            escape(reason)
        );
    }
    for (kind, n) in &s.signals {
        let _ = write!(
            page,
            "<tr><th>signals: {}</th><td>{n}</td></tr>",
            escape(kind)
        );
    }
    page.push_str("</table>\n");
}

/// An SVG chart drawn by `draw` on a plotters area, as a string.
fn svg(
    width: u32,
    height: u32,
    draw: impl FnOnce(&DrawingArea<SVGBackend<'_>, plotters::coord::Shift>),
) -> String {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (width, height)).into_drawing_area();
        let _ = root.fill(&WHITE);
        draw(&root);
        let _ = root.present();
    }
    out
}

/// A chart over consecutive days: `labels` name the points (0, 1, ...),
/// the y axis runs to `top` with `headroom` above it; `draw` adds the
/// series, and the legend is drawn after them.
fn day_chart(
    size: (u32, u32),
    labels: &[String],
    top: f64,
    y_desc: &str,
    draw: impl FnOnce(
        &mut ChartContext<'_, SVGBackend<'_>, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    ),
) -> String {
    let n = labels.len();
    svg(size.0, size.1, |root| {
        let Ok(mut chart) = ChartBuilder::on(root)
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..(n.max(2) - 1) as f64, 0f64..top)
        else {
            return;
        };
        let _ = chart
            .configure_mesh()
            .x_labels(6)
            .x_label_formatter(&|x| labels.get(x.round() as usize).cloned().unwrap_or_default())
            .y_desc(y_desc)
            .draw();
        draw(&mut chart);
        let _ = chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw();
    })
}

/// Bars of 10-point bins (`bins` are their lower bounds) over `x_range`.
fn bars_chart(
    size: (u32, u32),
    x_range: std::ops::Range<f64>,
    bins: &[f64],
    counts: &[u64],
    x_desc: &str,
    colour: RGBColor,
) -> String {
    let top = counts.iter().copied().max().unwrap_or(0).max(1) as f64;
    svg(size.0, size.1, |root| {
        let Ok(mut chart) = ChartBuilder::on(root)
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(56)
            .build_cartesian_2d(x_range, 0f64..top * 1.05)
        else {
            return;
        };
        let _ = chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc("customers")
            .draw();
        let _ = chart.draw_series(bins.iter().zip(counts).map(|(lo, n)| {
            Rectangle::new([(*lo + 0.5, 0.0), (*lo + 9.5, *n as f64)], colour.filled())
        }));
    })
}

fn tiers_over_time(page: &mut String, f: &Figures) {
    let points = &f.tiers_over_time.points;
    let _ = write!(
        page,
        "<h2>Tiers over time</h2>\n<p class=\"muted\">Customers per tier at the start of each {}; churn signals per day.</p>\n<div class=\"chart\">",
        escape(&f.tiers_over_time.period)
    );
    if !points.is_empty() {
        let top = points
            .iter()
            .map(|p| p.customers.iter().sum::<u64>())
            .max()
            .unwrap_or(0)
            .max(1) as f64;
        let labels: Vec<String> = points.iter().map(|p| p.at[..10].to_string()).collect();
        let chart = day_chart((720, 320), &labels, top * 1.05, "customers", |chart| {
            // Stacked: each tier's band from the sum below it.
            for tier in (0..f.tiers.len()).rev() {
                let colour = PALETTE[tier % PALETTE.len()];
                let upper: Vec<(f64, f64)> = points
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        (
                            i as f64,
                            p.customers.iter().take(tier + 1).sum::<u64>() as f64,
                        )
                    })
                    .collect();
                let _ = chart
                    .draw_series(AreaSeries::new(upper, 0.0, colour.mix(0.85)).border_style(colour))
                    .map(|s| {
                        s.label(f.tiers[tier].clone()).legend(move |(x, y)| {
                            Rectangle::new([(x, y - 5), (x + 10, y + 5)], colour.filled())
                        })
                    });
            }
        });
        page.push_str(&chart);
    }
    page.push_str(
        "<details><summary>figures</summary><table id=\"tiers-over-time\"><tr><th>from</th>",
    );
    for t in &f.tiers {
        let _ = write!(page, "<th>{}</th>", escape(t));
    }
    page.push_str("</tr>");
    for p in points {
        let _ = write!(page, "<tr><td>{}</td>", escape(&p.at));
        for n in &p.customers {
            let _ = write!(page, "<td>{n}</td>");
        }
        page.push_str("</tr>");
    }
    page.push_str("</table></details></div>\n<div class=\"chart\">");
    churn_chart(page, f);
    page.push_str("<details><summary>figures</summary><table id=\"churn-per-day\"><tr><th>day</th><th>churn_risk</th><th>churn_risk_cleared</th></tr>");
    for d in &f.churn_per_day {
        let _ = write!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&d.day),
            d.churn_risk,
            d.churn_risk_cleared
        );
    }
    page.push_str("</table></details></div>\n");
}

/// One of a day's counts.
type DayCount = fn(&ChurnDay) -> u64;

/// Churn signals per day: two lines.
fn churn_chart(page: &mut String, f: &Figures) {
    let days = &f.churn_per_day;
    if days.is_empty() {
        page.push_str("<p class=\"muted\">No churn signal in this history.</p>");
        return;
    }
    let top = days
        .iter()
        .map(|d| d.churn_risk.max(d.churn_risk_cleared))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let labels: Vec<String> = days.iter().map(|d| d.day[..10].to_string()).collect();
    let chart = day_chart((720, 240), &labels, top * 1.1, "signals per day", |chart| {
        let counts: [(&str, RGBColor, DayCount); 2] = [
            ("churn_risk", PALETTE[0], |d| d.churn_risk),
            ("churn_risk_cleared", PALETTE[2], |d| d.churn_risk_cleared),
        ];
        for (name, colour, count) in counts {
            let series = days
                .iter()
                .enumerate()
                .map(|(i, d)| (i as f64, count(d) as f64));
            let _ = chart
                .draw_series(LineSeries::new(series, colour.stroke_width(2)))
                .map(|s| {
                    s.label(name).legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 14, y)], colour.stroke_width(2))
                    })
                });
        }
    });
    page.push_str(&chart);
}

fn distribution(page: &mut String, f: &Figures) {
    let d = &f.distribution;
    let _ = write!(
        page,
        "<h2>Distribution</h2>\n<p class=\"muted\">Scores at {} in bins of 10 points; mean {:.2}.</p>\n<div class=\"chart\">",
        escape(d.at.as_deref().unwrap_or("(no event)")),
        d.mean_score
    );
    let chart = bars_chart(
        (520, 300),
        0.0..100.0,
        &d.bins,
        &d.customers,
        "score",
        PALETTE[3],
    );
    page.push_str(&chart);
    page.push_str("<table id=\"distribution\"><tr><th>score</th><th>customers</th></tr>");
    for (lo, n) in d.bins.iter().zip(&d.customers) {
        let _ = write!(
            page,
            "<tr><td>{lo:.0}-{:.0}</td><td>{n}</td></tr>",
            lo + 10.0
        );
    }
    page.push_str("</table></div>\n");
    if let Some(segments) = &f.segments {
        segments_table(page, segments, &d.bins);
    }
}

/// The distribution per segment: a row each, its bins shaded.
fn segments_table(page: &mut String, s: &super::figures::Segments, bins: &[f64]) {
    let _ = writeln!(page, "<h3>By {}</h3>", escape(&s.by));
    if let Some(note) = &s.note {
        let _ = writeln!(page, "<p>{}</p>", escape(note));
    }
    page.push_str("<div class=\"wide\"><table id=\"segments\"><tr><th>segment</th><th>customers</th><th>mean score</th>");
    for lo in bins {
        let _ = write!(page, "<th>{lo:.0}-{:.0}</th>", lo + 10.0);
    }
    page.push_str("</tr>");
    for row in &s.rows {
        let _ = write!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{:.2}</td>",
            escape(&row.segment),
            row.customers,
            row.mean_score
        );
        let most = row.bins.iter().copied().max().unwrap_or(0).max(1) as f64;
        for n in &row.bins {
            page.push_str(&shaded(&n.to_string(), *n as f64 / most));
        }
        page.push_str("</tr>");
    }
    page.push_str("</table></div>\n");
}

/// A cell shaded by `share` (0..1) of the row's or table's largest value.
fn shaded(value: &str, share: f64) -> String {
    format!(
        "<td style=\"background: rgba(var(--shade), {:.3})\">{value}</td>",
        (share.clamp(0.0, 1.0) * 0.6)
    )
}

fn separation(page: &mut String, f: &Figures) {
    page.push_str("<h2>What separates the tiers</h2>\n<p class=\"muted\">Per tier at the end: the mean contribution of each activity (points), and each channel's share of the tier's events.</p>\n");
    let Some(first) = f.separation.first() else {
        return;
    };
    let top = f
        .separation
        .iter()
        .flat_map(|t| t.mean_contribution.iter().map(|(_, v)| v.abs()))
        .fold(0.0f64, f64::max)
        .max(1e-9);
    page.push_str("<div class=\"wide\"><table id=\"separation-contributions\"><tr><th>tier</th><th>customers</th>");
    for (activity, _) in &first.mean_contribution {
        let _ = write!(page, "<th>{}</th>", escape(activity));
    }
    page.push_str("</tr>");
    for t in &f.separation {
        let _ = write!(
            page,
            "<tr><td>{}</td><td>{}</td>",
            escape(&t.tier),
            t.customers
        );
        for (_, v) in &t.mean_contribution {
            page.push_str(&shaded(&format!("{v:.2}"), v.abs() / top));
        }
        page.push_str("</tr>");
    }
    page.push_str(
        "</table></div>\n<div class=\"wide\"><table id=\"separation-channels\"><tr><th>tier</th>",
    );
    for (channel, _) in &first.channel_share {
        let _ = write!(page, "<th>{}</th>", escape(channel));
    }
    page.push_str("</tr>");
    for t in &f.separation {
        let _ = write!(page, "<tr><td>{}</td>", escape(&t.tier));
        for (_, share) in &t.channel_share {
            page.push_str(&shaded(&format!("{:.1}%", share * 100.0), *share));
        }
        page.push_str("</tr>");
    }
    page.push_str("</table></div>\n");
}

fn movement(page: &mut String, f: &Figures) {
    let m = &f.movement;
    let _ = write!(
        page,
        "<h2>Movement</h2>\n<p class=\"muted\">Tier at {} (rows) against tier at the end (columns), in customers: (new) were not held then, (gone) were erased or forgotten since.</p>\n",
        escape(m.since.as_deref().unwrap_or("(no event)"))
    );
    let top = m.counts.iter().flatten().copied().max().unwrap_or(0).max(1) as f64;
    page.push_str("<table id=\"movement\"><tr><th>from \\ to</th>");
    for to in &m.to {
        let _ = write!(page, "<th>{}</th>", escape(to));
    }
    page.push_str("</tr>");
    for (from, row) in m.from.iter().zip(&m.counts) {
        let _ = write!(page, "<tr><td>{}</td>", escape(from));
        for n in row {
            page.push_str(&shaded(&n.to_string(), *n as f64 / top));
        }
        page.push_str("</tr>");
    }
    page.push_str("</table>\n");
}

fn compared(page: &mut String, c: &Comparison) {
    page.push_str("<h2>Against the other model</h2>\n<p class=\"muted\">The same events under the model of <code>--compare</code>. Tier migration at the end: this model's tier (rows) against the other's (columns).</p>\n");
    let top = c
        .migration
        .iter()
        .flatten()
        .copied()
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    page.push_str("<div class=\"wide\"><table id=\"migration\"><tr><th>this \\ other</th>");
    for t in &c.other_tiers {
        let _ = write!(page, "<th>{}</th>", escape(t));
    }
    page.push_str("</tr>");
    for (tier, row) in c.tiers.iter().zip(&c.migration) {
        let _ = write!(page, "<tr><td>{}</td>", escape(tier));
        for n in row {
            page.push_str(&shaded(&n.to_string(), *n as f64 / top));
        }
        page.push_str("</tr>");
    }
    page.push_str("</table></div>\n");
    if c.only_this + c.only_other > 0 {
        let _ = writeln!(
            page,
            "<p>{} customers only this model holds at the end, {} only the other.</p>",
            c.only_this, c.only_other
        );
    }
    page.push_str("<div class=\"chart\">");
    let chart = bars_chart(
        (520, 280),
        -100.0..100.0,
        &c.difference_bins,
        &c.difference_customers,
        "other score - this score",
        PALETTE[4],
    );
    page.push_str(&chart);
    page.push_str("<details><summary>figures</summary><table id=\"difference\"><tr><th>difference</th><th>customers</th></tr>");
    for (lo, n) in c.difference_bins.iter().zip(&c.difference_customers) {
        let _ = write!(
            page,
            "<tr><td>{lo:.0} to {:.0}</td><td>{n}</td></tr>",
            lo + 10.0
        );
    }
    page.push_str("</table></details></div>\n");
    page.push_str("<table id=\"churn-per-week\"><tr><th>week from</th><th>churn_risk, this model</th><th>churn_risk, other model</th></tr>");
    for w in &c.churn_per_week {
        let _ = write!(
            page,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&w.week),
            w.this_model,
            w.other_model
        );
    }
    page.push_str("</table>\n<h3>The customers whose score moves most</h3>\n<div class=\"wide\"><table id=\"top-movers\"><tr><th>customer</th><th>this score</th><th>other score</th><th>this model's contributions</th><th>the other's</th></tr>");
    let list = |items: &[(String, f64)]| {
        items
            .iter()
            .map(|(name, v)| format!("{} {v:.2}", escape(name)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for m in &c.top_movers {
        let _ = write!(
            page,
            "<tr><td>{}</td><td>{:.2}</td><td>{:.2}</td><td>{}</td><td>{}</td></tr>",
            escape(&m.customer_id),
            m.score,
            m.other_score,
            list(&m.contributions),
            list(&m.other_contributions)
        );
    }
    page.push_str("</table></div>\n");
}
