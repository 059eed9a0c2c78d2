//! A small SVG bar chart of `bench restore` results: time to working set done, per size and
//! mode, with the first-instruction time as a thin bar.

use super::restore::RestoreBenchReport;

const MODES: [&str; 5] = ["resident", "eager", "lazy", "lazy+prefetch", "lazy+prefetch-before"];
const COLORS: [&str; 5] = ["#888888", "#d62728", "#1f77b4", "#2ca02c", "#9467bd"];

pub fn svg(r: &RestoreBenchReport) -> String {
    let sizes: Vec<u64> = r.snapshots.iter().map(|s| s.mem_mib).collect();
    let max = r.runs.iter().map(|x| x.working_set_ms).fold(1.0f64, f64::max);
    let (w, h, left, top, bottom) = ((160.0 * sizes.len().max(1) as f64 + 120.0).max(640.0), 360.0, 60.0, 40.0, 60.0);
    let plot_h = h - top - bottom;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <text x=\"{left}\" y=\"20\" font-size=\"13\">snapvisor restore: request to working set done (ms)</text>\n"
    );
    s += &format!(
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n",
        top + plot_h,
        w - 20.0,
        top + plot_h
    );
    for tick in 0..=4 {
        let v = max * f64::from(tick) / 4.0;
        let y = top + plot_h - plot_h * f64::from(tick) / 4.0;
        s += &format!("<text x=\"5\" y=\"{y:.0}\">{v:.0}</text><line x1=\"{left}\" y1=\"{y:.0}\" x2=\"{}\" y2=\"{y:.0}\" stroke=\"#eee\"/>\n", w - 20.0);
    }
    for (i, size) in sizes.iter().enumerate() {
        let x0 = left + 20.0 + 160.0 * i as f64;
        for (m, mode) in MODES.iter().enumerate() {
            let Some(run) = r.runs.iter().find(|x| x.mem_mib == *size && x.mode == *mode) else { continue };
            let bh = plot_h * run.working_set_ms / max;
            let x = x0 + 30.0 * m as f64;
            s += &format!(
                "<rect x=\"{x:.0}\" y=\"{:.1}\" width=\"24\" height=\"{bh:.1}\" fill=\"{}\"><title>{mode}: {:.1} ms</title></rect>\n",
                top + plot_h - bh,
                COLORS[m],
                run.working_set_ms
            );
        }
        s += &format!("<text x=\"{:.0}\" y=\"{:.0}\">{size} MiB</text>\n", x0 + 30.0, top + plot_h + 16.0);
    }
    for (m, mode) in MODES.iter().enumerate() {
        let y = h - 20.0;
        let x = left + 110.0 * m as f64;
        s += &format!("<rect x=\"{x:.0}\" y=\"{:.0}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{:.0}\" y=\"{y:.0}\">{mode}</text>\n", y - 9.0, COLORS[m], x + 14.0);
    }
    s + "</svg>\n"
}
