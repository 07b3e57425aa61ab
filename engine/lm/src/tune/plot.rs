//! The loss curve as a small self-contained SVG: training loss per report
//! and validation loss per evaluation against the iteration.

/// Renders the curves; `train` and `valid` are (iteration, loss) points.
pub fn loss_svg(train: &[(u64, f32)], valid: &[(u64, f32)]) -> String {
    let (w, h, pad) = (640.0f64, 360.0f64, 48.0f64);
    let all = train.iter().chain(valid.iter());
    let max_it = all.clone().map(|p| p.0).max().unwrap_or(1).max(1) as f64;
    let finite = || all.clone().map(|p| p.1 as f64).filter(|v| v.is_finite());
    let lo = finite().fold(f64::INFINITY, f64::min);
    let hi = finite().fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = if lo.is_finite() && hi > lo {
        (lo, hi)
    } else if lo.is_finite() {
        (lo - 1.0, lo + 1.0)
    } else {
        (0.0, 1.0)
    };
    let x = |it: u64| pad + (it as f64 / max_it) * (w - 2.0 * pad);
    let y = |v: f32| h - pad - ((v as f64 - lo) / (hi - lo)) * (h - 2.0 * pad);
    let line = |pts: &[(u64, f32)], color: &str| -> String {
        let d: Vec<String> = pts
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(i, v)| format!("{:.1},{:.1}", x(i), y(v)))
            .collect();
        let dots: String = d
            .iter()
            .map(|p| {
                let (cx, cy) = p.split_once(',').unwrap_or(("0", "0"));
                format!("<circle cx=\"{cx}\" cy=\"{cy}\" r=\"2.5\" fill=\"{color}\"/>")
            })
            .collect();
        format!(
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>{dots}",
            d.join(" ")
        )
    };
    format!(
        concat!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">",
            "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>",
            "<line x1=\"{p}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/>",
            "<line x1=\"{p}\" y1=\"{p}\" x2=\"{p}\" y2=\"{b}\" stroke=\"black\"/>",
            "<text x=\"{p}\" y=\"{t}\">loss {hi:.3}</text>",
            "<text x=\"4\" y=\"{b}\">{lo:.3}</text>",
            "<text x=\"{r}\" y=\"{xl}\" text-anchor=\"end\">iteration {max_it}</text>",
            "<text x=\"{lx}\" y=\"{t}\" fill=\"#1f77b4\">train</text>",
            "<text x=\"{lx2}\" y=\"{t}\" fill=\"#d62728\">validation</text>",
            "{train}{valid}</svg>\n"
        ),
        w = w,
        h = h,
        p = pad,
        b = h - pad,
        r = w - pad,
        t = pad - 12.0,
        xl = h - pad + 24.0,
        lx = w - 200.0,
        lx2 = w - 150.0,
        hi = hi,
        lo = lo,
        max_it = max_it,
        train = line(train, "#1f77b4"),
        valid = line(valid, "#d62728"),
    )
}
