//! A hand-written SVG chart: one panel per policy, live sequences (step line) and tp degree over
//! time, switches shaded. Panels share the time axis so their lengths compare directly.

use std::fmt::Write as _;

use super::run::SimResult;

const W: f64 = 960.0;
const PANEL_H: f64 = 150.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 50.0;
const TOP: f64 = 40.0;
const GAP: f64 = 45.0;

/// A "nice" tick step (1, 2 or 5 times a power of ten) giving about `n` ticks over `span`.
fn tick_step(span: f64, n: f64) -> f64 {
    if span <= 0.0 || !span.is_finite() {
        return 1.0;
    }
    let raw = span / n;
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * p)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The chart for `runs` on a `world`-GPU node with `requests` sequences at the start.
pub fn chart(runs: &[SimResult], world: usize, requests: usize, title: &str) -> String {
    let t_max = runs
        .iter()
        .map(|r| r.total_ms)
        .fold(0.0, f64::max)
        .max(1e-9)
        / 1e3;
    let pw = W - LEFT - RIGHT;
    let h = TOP + runs.len() as f64 * (PANEL_H + GAP) + 10.0;
    let x = |t_ms: f64| LEFT + pw * (t_ms / 1e3) / t_max;
    let log_world = (world.max(2) as f64).log2();
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" viewBox="0 0 {W} {h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="20" font-size="14">{}</text>"#,
        esc(title)
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="20" text-anchor="end"><tspan fill="#1f77b4">&#9644; live sequences</tspan>  <tspan fill="#d62728">&#9644; tp (right axis, log2)</tspan>  <tspan fill="#ff9896">&#9632; switch</tspan></text>"##,
        W - RIGHT
    );
    let step = tick_step(t_max, 8.0);
    for (i, r) in runs.iter().enumerate() {
        let y0 = TOP + i as f64 * (PANEL_H + GAP);
        let y_live = |n: usize| y0 + PANEL_H * (1.0 - n as f64 / requests.max(1) as f64);
        let y_tp = |tp: usize| y0 + PANEL_H * (1.0 - (tp.max(1) as f64).log2() / log_world);
        let _ = writeln!(
            s,
            r#"<text x="{LEFT}" y="{}" font-size="12">{} — {:.1} s, {} switch(es)</text>"#,
            y0 - 6.0,
            esc(&r.policy),
            r.total_ms / 1e3,
            r.switches.len()
        );
        let _ = writeln!(
            s,
            r##"<rect x="{LEFT}" y="{y0}" width="{pw}" height="{PANEL_H}" fill="none" stroke="#999"/>"##
        );
        // Time ticks.
        let mut t = 0.0;
        while t <= t_max + 1e-9 {
            let xt = LEFT + pw * t / t_max;
            let _ = writeln!(
                s,
                r##"<line x1="{xt:.1}" y1="{y0}" x2="{xt:.1}" y2="{:.1}" stroke="#eee"/><text x="{xt:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                y0 + PANEL_H,
                y0 + PANEL_H + 13.0,
                format_tick(t, step)
            );
            t += step;
        }
        // Left axis: live; right axis: tp.
        for n in [0, requests / 2, requests] {
            let _ = writeln!(
                s,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{n}</text>"#,
                LEFT - 4.0,
                y_live(n) + 4.0
            );
        }
        let mut tp = 1;
        while tp <= world {
            let _ = writeln!(
                s,
                r##"<text x="{:.1}" y="{:.1}" fill="#d62728">tp{tp}</text>"##,
                W - RIGHT + 4.0,
                y_tp(tp) + 4.0
            );
            tp *= 2;
        }
        for e in &r.switches {
            let _ = writeln!(
                s,
                r##"<rect x="{:.1}" y="{y0}" width="{:.1}" height="{PANEL_H}" fill="#ff9896" opacity="0.6"/>"##,
                x(e.t_ms),
                (x(e.t_ms + e.cost_ms) - x(e.t_ms)).max(1.0)
            );
        }
        s.push_str(&polyline(
            &r.timeline,
            r.total_ms,
            &x,
            |p| y_live(p.live),
            "#1f77b4",
        ));
        s.push_str(&polyline(
            &r.timeline,
            r.total_ms,
            &x,
            |p| y_tp(p.tp),
            "#d62728",
        ));
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{:.1}" text-anchor="middle">time (s)</text>"#,
        LEFT + pw / 2.0,
        h - 4.0
    );
    s.push_str("</svg>\n");
    s
}

fn format_tick(t: f64, step: f64) -> String {
    if step >= 1.0 {
        format!("{t:.0}")
    } else {
        format!("{t:.1}")
    }
}

/// A step line through the timeline points, held to `end_ms`.
fn polyline(
    pts: &[super::run::TimelinePoint],
    end_ms: f64,
    x: &dyn Fn(f64) -> f64,
    y: impl Fn(&super::run::TimelinePoint) -> f64,
    color: &str,
) -> String {
    let mut d = String::new();
    let mut prev_y: Option<f64> = None;
    for p in pts {
        let (px, py) = (x(p.t_ms), y(p));
        if prev_y == Some(py) {
            continue; // a step line only needs the points where it moves
        }
        if let Some(yy) = prev_y {
            let _ = write!(d, "{px:.1},{yy:.1} ");
        }
        let _ = write!(d, "{px:.1},{py:.1} ");
        prev_y = Some(py);
    }
    if let Some(yy) = prev_y {
        let _ = write!(d, "{:.1},{yy:.1}", x(end_ms));
    }
    format!(
        r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="1.5"/>"#,
        d.trim_end()
    ) + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_nice() {
        assert_eq!(tick_step(100.0, 8.0), 20.0);
        assert_eq!(tick_step(7.0, 8.0), 1.0);
        assert_eq!(tick_step(0.3, 8.0), 0.05);
    }
}
