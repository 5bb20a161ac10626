//! The loss curve as a self-contained SVG, written beside metrics.jsonl so
//! a run can be judged at a glance without plotting tools.

use std::fmt::Write;

/// An SVG line chart of (step, loss), with a smoothed line (a trailing mean
/// over about 2% of the run) over the raw points.
pub fn loss_curve_svg(points: &[(u64, f64)], title: &str) -> String {
    let (w, h, left, right, top, bottom) = (720.0, 400.0, 64.0, 16.0, 36.0, 44.0);
    let finite: Vec<(f64, f64)> = points.iter().filter(|(_, l)| l.is_finite()).map(|&(s, l)| (s as f64, l)).collect();
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>
"##,
        w / 2.0,
        escape(title)
    );
    if finite.is_empty() {
        svg.push_str(r#"<text x="360" y="200" text-anchor="middle">no steps recorded</text>"#);
        svg.push_str("\n</svg>\n");
        return svg;
    }
    let (x0, x1) = (finite[0].0, finite.iter().map(|p| p.0).fold(f64::MIN, f64::max));
    let y1 = finite.iter().map(|p| p.1).fold(f64::MIN, f64::max);
    let y0 = finite.iter().map(|p| p.1).fold(f64::MAX, f64::min).min(0.0);
    let (xs, ys) = ((x1 - x0).max(1.0), (y1 - y0).max(1e-12));
    let px = |x: f64| left + (x - x0) / xs * (w - left - right);
    let py = |y: f64| top + (1.0 - (y - y0) / ys) * (h - top - bottom);
    // Axes, ticks and labels.
    let _ = writeln!(svg, r##"<path d="M{left},{top} V{} H{}" fill="none" stroke="#333"/>"##, h - bottom, w - right);
    for i in 0..=4 {
        let y = y0 + ys * i as f64 / 4.0;
        let x = x0 + xs * i as f64 / 4.0;
        let _ = writeln!(
            svg,
            r##"<text x="{}" y="{}" text-anchor="end">{}</text><line x1="{left}" x2="{}" y1="{}" y2="{}" stroke="#ddd"/>"##,
            left - 6.0,
            py(y) + 4.0,
            format_loss(y),
            w - right,
            py(y),
            py(y)
        );
        let _ =
            writeln!(svg, r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#, px(x), h - bottom + 18.0, x.round());
    }
    let _ = writeln!(svg, r#"<text x="{}" y="{}" text-anchor="middle">step</text>"#, w / 2.0, h - 6.0);
    let _ = writeln!(
        svg,
        r#"<text x="14" y="{}" text-anchor="middle" transform="rotate(-90 14 {})">loss</text>"#,
        h / 2.0,
        h / 2.0
    );
    let line = |pts: &[(f64, f64)]| {
        pts.iter()
            .enumerate()
            .map(|(i, &(x, y))| format!("{}{:.1},{:.1}", if i == 0 { "M" } else { "L" }, px(x), py(y)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let _ = writeln!(svg, r##"<path d="{}" fill="none" stroke="#9ecae1" stroke-width="1"/>"##, line(&finite));
    let window = (finite.len() / 50).max(1);
    let smooth: Vec<(f64, f64)> = (0..finite.len())
        .map(|i| {
            let lo = i.saturating_sub(window - 1);
            let mean = finite[lo..=i].iter().map(|p| p.1).sum::<f64>() / (i - lo + 1) as f64;
            (finite[i].0, mean)
        })
        .collect();
    let _ = writeln!(svg, r##"<path d="{}" fill="none" stroke="#08519c" stroke-width="2"/>"##, line(&smooth));
    svg.push_str("</svg>\n");
    svg
}

fn format_loss(y: f64) -> String {
    if y.abs() >= 100.0 {
        format!("{y:.0}")
    } else if y.abs() >= 1.0 {
        format!("{y:.2}")
    } else {
        format!("{y:.3}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_both_lines_scaled_into_the_frame() {
        let pts: Vec<(u64, f64)> = (1..=100).map(|s| (s, 5.0 / s as f64)).collect();
        let svg = loss_curve_svg(&pts, "demo <tiny>");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("demo &lt;tiny&gt;"));
        assert_eq!(svg.matches("<path d=\"M").count(), 3, "axes, raw and smoothed lines");
        // Every plotted coordinate lies inside the 720 x 400 canvas.
        for part in svg.split(['M', 'L']).skip(1) {
            let coords: Vec<f64> =
                part.split([',', ' ', '"']).take(2).filter_map(|t| t.parse().ok()).collect::<Vec<_>>();
            if coords.len() == 2 {
                assert!((0.0..=720.0).contains(&coords[0]) && (0.0..=400.0).contains(&coords[1]), "{coords:?}");
            }
        }
        // The first (highest) loss sits at the top of the plot area.
        assert!(svg.contains("M64.0,36.0"), "{}", &svg[..600]);
    }

    #[test]
    fn survives_empty_and_non_finite_input() {
        assert!(loss_curve_svg(&[], "x").contains("no steps recorded"));
        let svg = loss_curve_svg(&[(1, f64::NAN), (2, 1.0)], "x");
        assert!(!svg.contains("NaN"));
    }
}
