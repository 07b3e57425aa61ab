//! Self-contained HTML report of a `port diff`: a per-layer error plot (SVG)
//! and the node table, with the first divergent node highlighted.
use std::fmt::Write;

use indexmap::IndexMap;

use crate::diff::DiffReport;

const PALETTE: [&str; 20] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
    "#bcbd22", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d",
    "#31a354", "#756bb1", "#636363", "#9c9ede",
];

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// log10 of the relative error, floored so exact matches stay on the plot.
fn level(x: f64) -> f64 {
    x.max(1e-12).log10()
}

/// The per-layer plot: one line per tap kind (layer output, attention, MLP,
/// ...), x = layer, y = log10(max_rel), with the tolerance as a dashed line.
pub fn svg_plot(report: &DiffReport) -> String {
    let (w, h, left, right, top, bottom) = (720.0, 320.0, 60.0, 170.0, 20.0, 40.0);
    let mut series: IndexMap<String, Vec<(usize, f64, bool)>> = IndexMap::new();
    for r in &report.rows {
        if let (Some(layer), Some(s)) = (r.layer(), &r.stats) {
            series
                .entry(r.kind())
                .or_default()
                .push((layer, s.max_rel(), r.passed));
        }
    }
    let layers = series
        .values()
        .flatten()
        .map(|p| p.0)
        .max()
        .map_or(1, |m| m + 1);
    let tol = level(report.tolerance.max_rel().max(1e-12));
    let values: Vec<f64> = series
        .values()
        .flatten()
        .map(|p| level(p.1))
        .chain([tol])
        .collect();
    let ymin = values.iter().cloned().fold(f64::INFINITY, f64::min).floor();
    let ymax = values
        .iter()
        .cloned()
        .fold(f64::NEG_INFINITY, f64::max)
        .ceil()
        .max(ymin + 1.0);
    let px = |l: usize| left + (w - left - right) * (l as f64 + 0.5) / layers as f64;
    let py = |v: f64| top + (h - top - bottom) * (ymax - v) / (ymax - ymin);
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"11\">"
    );
    let _ = write!(s, "<rect x=\"{left}\" y=\"{top}\" width=\"{}\" height=\"{}\" fill=\"#fafafa\" stroke=\"#ccc\"/>", w - left - right, h - top - bottom);
    let mut tick = ymin;
    while tick <= ymax {
        let y = py(tick);
        let _ = write!(s, "<line x1=\"{left}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#eee\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">1e{tick}</text>", w - right, left - 4.0, y + 4.0);
        tick += 1.0;
    }
    for l in 0..layers {
        let _ = write!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{l}</text>",
            px(l),
            h - bottom + 14.0
        );
    }
    let _ = write!(
        s,
        "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">layer</text>",
        (left + w - right) / 2.0,
        h - 6.0
    );
    let _ = write!(s, "<text x=\"12\" y=\"{:.1}\" transform=\"rotate(-90 12 {:.1})\" text-anchor=\"middle\">max |err| / max |ref|</text>", h / 2.0, h / 2.0);
    let ty = py(tol);
    let _ = write!(s, "<line class=\"tolerance\" x1=\"{left}\" x2=\"{}\" y1=\"{ty:.1}\" y2=\"{ty:.1}\" stroke=\"#d62728\" stroke-dasharray=\"5,4\"/>", w - right);
    let first = report.first_failure().map(|f| f.name.clone());
    for (k, (kind, points)) in series.iter().enumerate() {
        let color = PALETTE[k % PALETTE.len()];
        let path: Vec<String> = points
            .iter()
            .map(|(l, v, _)| format!("{:.1},{:.1}", px(*l), py(level(*v))))
            .collect();
        let _ = write!(s, "<polyline class=\"series\" data-kind=\"{}\" points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\"/>", escape(kind), path.join(" "));
        for (l, v, ok) in points {
            let _ = write!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"{}\"/>",
                px(*l),
                py(level(*v)),
                if *ok { color } else { "#d62728" }
            );
        }
        let ly = top + 14.0 * k as f64 + 10.0;
        let _ = write!(s, "<line x1=\"{}\" x2=\"{}\" y1=\"{ly}\" y2=\"{ly}\" stroke=\"{color}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">{}</text>", w - right + 10.0, w - right + 28.0, w - right + 32.0, ly + 4.0, escape(kind));
    }
    if let Some(f) = report.rows.iter().find(|r| Some(&r.name) == first.as_ref()) {
        if let (Some(l), Some(st)) = (f.layer(), &f.stats) {
            let _ = write!(s, "<circle class=\"first-divergent\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"7\" fill=\"none\" stroke=\"#d62728\" stroke-width=\"2\"><title>first divergent: {}</title></circle>", px(l), py(level(st.max_rel())), escape(&f.name));
        }
    }
    s.push_str("</svg>");
    s
}

/// The whole report as one HTML page (no external resources).
pub fn html(report: &DiffReport) -> String {
    let mut rows = String::new();
    let first = report.first_failure().map(|f| f.name.clone());
    for r in &report.rows {
        let class = if Some(&r.name) == first.as_ref() {
            "first-divergent"
        } else if r.passed {
            "ok"
        } else {
            "fail"
        };
        let cells = match &r.stats {
            Some(s) => format!(
                "<td>{:.3e}</td><td>{:.3e}</td><td>{:.3e}</td><td>{:.9}</td>",
                s.max_abs,
                s.max_rel(),
                s.nmse,
                s.cosine
            ),
            None => "<td colspan=\"4\">shape differs from the golden</td>".to_string(),
        };
        let _ = write!(
            rows,
            "<tr class=\"{class}\"><td>{}</td><td>{:?}</td>{cells}<td>{}</td></tr>",
            escape(&r.name),
            r.shape,
            if r.passed { "ok" } else { "FAIL" }
        );
    }
    let verdict = match &first {
        Some(n) => format!(
            "<p class=\"verdict fail\">First divergent node: <code>{}</code></p>",
            escape(n)
        ),
        None => format!(
            "<p class=\"verdict ok\">All {} nodes within tolerance.</p>",
            report.rows.len()
        ),
    };
    let unmatched = if report.unmatched.is_empty() {
        String::new()
    } else {
        format!(
            "<p>Golden taps with no engine node: {}</p>",
            report
                .unmatched
                .iter()
                .map(|u| format!("<code>{}</code>", escape(u)))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>lmspec port diff: {spec}</title>\
<style>body{{font-family:sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse;font-size:13px}}\
td,th{{border:1px solid #ddd;padding:3px 8px;text-align:right}}td:first-child{{text-align:left;font-family:monospace}}\
tr.fail{{background:#fde8e8}}tr.first-divergent{{background:#f8b4b4;font-weight:bold}}\
.verdict.fail{{color:#b91c1c;font-weight:bold}}.verdict.ok{{color:#15803d;font-weight:bold}}</style></head>\
<body><h1>lmspec port diff</h1><p>spec <b>{spec}</b>, model <code>{model}</code>, golden <code>{golden}</code>, \
tolerance <b>{tol}</b> (max_rel &le; {maxrel:.0e}, cosine &ge; {cos})</p>{verdict}<h2>Error per layer</h2>{plot}\
<h2>Nodes in execution order</h2><table><tr><th>node</th><th>shape</th><th>max abs</th><th>max rel</th><th>NMSE</th>\
<th>cosine</th><th></th></tr>{rows}</table>{unmatched}</body></html>\n",
        spec = escape(&report.spec),
        model = escape(&report.model.display().to_string()),
        golden = escape(&report.golden.display().to_string()),
        tol = report.tolerance.name(),
        maxrel = report.tolerance.max_rel(),
        cos = report.tolerance.min_cosine(),
        plot = svg_plot(report),
    )
}
