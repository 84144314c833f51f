//! A latency chart per scenario, as PNG: one group of bars per quantile (p50, p90, p99, p99.9),
//! scenario beside baseline (and references), on a linear scale with the values written out.
//! Drawn by hand on an RGB canvas with the 8x8 bitmap font of `font8x8`: a chart this simple
//! needs no plotting library.

use std::io::BufWriter;
use std::path::Path;

use font8x8::legacy::BASIC_LEGACY;

use crate::report::{Figures, Pair};

type Rgb = [u8; 3];
/// A quantile's label and how to read it from figures.
type Quantile = (&'static str, fn(&Figures) -> f64);

const WHITE: Rgb = [255, 255, 255];
const INK: Rgb = [33, 33, 33];
const GRID: Rgb = [225, 225, 225];
/// Scenario, baseline, then references.
const SERIES: [Rgb; 5] = [[52, 101, 164], [237, 125, 49], [112, 173, 71], [128, 100, 162], [160, 160, 160]];

const WIDTH: usize = 900;
const MARGIN: usize = 16;
/// Where bars start (quantile labels sit left of it).
const AXIS_X: usize = 80;
/// Room right of the longest bar for its value.
const VALUE_ROOM: usize = 110;
const BAR_HEIGHT: usize = 12;
const BAR_GAP: usize = 3;
const GROUP_GAP: usize = 14;
const LINE: usize = 14;

struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    fn new(width: usize, height: usize) -> Self {
        Canvas { width, height, pixels: WHITE.repeat(width * height) }
    }

    fn fill(&mut self, x: usize, y: usize, width: usize, height: usize, color: Rgb) {
        for row in y..(y + height).min(self.height) {
            for column in x..(x + width).min(self.width) {
                let at = (row * self.width + column) * 3;
                self.pixels[at..at + 3].copy_from_slice(&color);
            }
        }
    }

    /// ASCII text with its top-left corner at (x, y), each font pixel `scale` pixels wide.
    fn text(&mut self, x: usize, y: usize, text: &str, color: Rgb, scale: usize) {
        for (index, character) in text.chars().enumerate() {
            let glyph = BASIC_LEGACY[if character.is_ascii() { character as usize } else { '?' as usize }];
            let left = x + index * 8 * scale;
            for (row, bits) in glyph.iter().enumerate() {
                for column in 0..8 {
                    if bits & (1 << column) != 0 {
                        self.fill(left + column * scale, y + row * scale, scale, scale, color);
                    }
                }
            }
        }
    }

    fn save(&self, path: &Path) -> anyhow::Result<()> {
        let file = BufWriter::new(std::fs::File::create(path)?);
        let mut encoder = png::Encoder::new(file, u32::try_from(self.width)?, u32::try_from(self.height)?);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&self.pixels)?;
        writer.finish()?;
        Ok(())
    }
}

/// A round step for about four grid lines up to `max`.
fn grid_step(max: f64) -> f64 {
    let rough = max / 4.0;
    let magnitude = 10f64.powf(rough.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0].iter().map(|m| m * magnitude).find(|step| *step >= rough).unwrap_or(rough)
}

fn milliseconds(value: f64) -> String {
    if value >= 100.0 { format!("{value:.0} ms") } else { format!("{value:.2} ms") }
}

/// Draws `pair`'s latency quantiles into a PNG at `path`.
pub fn latency_chart(pair: &Pair, path: &Path) -> anyhow::Result<()> {
    let rows: Vec<(&Figures, String)> = pair.rows();
    let quantiles: [Quantile; 4] =
        [("p50", |f| f.p50_ms), ("p90", |f| f.p90_ms), ("p99", |f| f.p99_ms), ("p99.9", |f| f.p999_ms)];
    let legend_top = MARGIN + 16 + 6 + LINE + LINE / 2;
    let bars_top = legend_top + rows.len() * LINE + LINE;
    let group_height = rows.len() * (BAR_HEIGHT + BAR_GAP) + GROUP_GAP;
    let bars_bottom = bars_top + quantiles.len() * group_height;
    let height = bars_bottom + LINE + MARGIN;
    let mut canvas = Canvas::new(WIDTH, height);

    canvas.text(MARGIN, MARGIN, &pair.scenario.name, INK, 2);
    canvas.text(MARGIN, MARGIN + 16 + 6, &format!("latency, ms; {}", pair.headline()), INK, 1);
    for (index, (figures, role)) in rows.iter().enumerate() {
        let y = legend_top + index * LINE;
        canvas.fill(MARGIN, y, 10, 10, SERIES[index % SERIES.len()]);
        let role = role.split(':').next().unwrap_or_default();
        let label = format!(
            "{} ({role}): {:.0}/s, {} errors, {} dropped; {}",
            figures.name,
            figures.per_second,
            figures.errors,
            figures.dropped,
            figures.load.describe()
        );
        canvas.text(MARGIN + 16, y + 1, &label, INK, 1);
    }

    let max = rows.iter().flat_map(|(f, _)| quantiles.iter().map(|(_, of)| of(f))).fold(0.0, f64::max);
    let span = (WIDTH - AXIS_X - VALUE_ROOM - MARGIN) as f64;
    let step = if max > 0.0 { grid_step(max) } else { 1.0 };
    let scale_max = (max / step).ceil().max(1.0) * step;
    let x_of = |value: f64| AXIS_X + (value / scale_max * span).round() as usize;
    let mut tick = 0.0;
    while tick <= scale_max + step / 2.0 {
        let x = x_of(tick);
        canvas.fill(x, bars_top - 4, 1, bars_bottom - bars_top, GRID);
        let label = if step >= 1.0 { format!("{tick:.0}") } else { format!("{tick:.2}") };
        canvas.text(x.saturating_sub(label.len() * 4), bars_bottom, &label, INK, 1);
        tick += step;
    }
    canvas.fill(AXIS_X, bars_top - 4, 1, bars_bottom - bars_top, INK);
    for (group, (label, of)) in quantiles.iter().enumerate() {
        let top = bars_top + group * group_height;
        canvas.text(MARGIN, top + (rows.len() * (BAR_HEIGHT + BAR_GAP)) / 2 - 4, label, INK, 1);
        for (index, (figures, _)) in rows.iter().enumerate() {
            let y = top + index * (BAR_HEIGHT + BAR_GAP);
            let end = x_of(of(figures));
            canvas.fill(AXIS_X + 1, y, end.saturating_sub(AXIS_X).max(1), BAR_HEIGHT, SERIES[index % SERIES.len()]);
            canvas.text(end + 6, y + 2, &milliseconds(of(figures)), INK, 1);
        }
    }
    canvas.save(path)
}
