//! The PNG chart of `shoal bench`: a grouped bar chart of the time to first output, one group
//! per scenario and one bar per run, the median written above each group. Drawn on an RGB
//! canvas with a built-in 5x7 font and encoded here (zlib from flate2, CRC from crc32fast), so
//! that no font file or plotting library is needed on the node.

use std::io::Write as _;

use super::table::{by_scenario, median, Run};

pub const WIDTH: u32 = 800;
pub const HEIGHT: u32 = 400;

type Rgb = [u8; 3];
const WHITE: Rgb = [255, 255, 255];
const BLACK: Rgb = [0, 0, 0];
const GRID: Rgb = [220, 220, 220];
/// One colour per run, repeated after the fifth.
const RUN_COLOURS: [Rgb; 5] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
];

struct Canvas {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
}

impl Canvas {
    fn new(width: u32, height: u32) -> Canvas {
        Canvas {
            width,
            height,
            pixels: WHITE.repeat((width * height) as usize),
        }
    }

    fn fill(&mut self, x: i64, y: i64, w: i64, h: i64, colour: Rgb) {
        let x0 = x.clamp(0, self.width as i64);
        let y0 = y.clamp(0, self.height as i64);
        let x1 = (x + w).clamp(0, self.width as i64);
        let y1 = (y + h).clamp(0, self.height as i64);
        for row in y0..y1 {
            for column in x0..x1 {
                let at = ((row * self.width as i64 + column) * 3) as usize;
                self.pixels[at..at + 3].copy_from_slice(&colour);
            }
        }
    }

    /// `text` at (x, y) top left, each font pixel `scale` pixels wide.
    fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, colour: Rgb) {
        for (i, c) in text.chars().enumerate() {
            let rows = glyph(c);
            let left = x + i as i64 * 6 * scale;
            for (r, bits) in rows.iter().enumerate() {
                for b in 0..5 {
                    if bits & (0x10 >> b) != 0 {
                        self.fill(left + b * scale, y + r as i64 * scale, scale, scale, colour);
                    }
                }
            }
        }
    }

    fn text_width(text: &str, scale: i64) -> i64 {
        text.chars().count() as i64 * 6 * scale - scale
    }

    fn centred(&mut self, centre: i64, y: i64, text: &str, scale: i64, colour: Rgb) {
        self.text(
            centre - Self::text_width(text, scale) / 2,
            y,
            text,
            scale,
            colour,
        );
    }
}

/// Draws the chart of `runs` under `title`; returns the PNG's bytes.
pub fn render(runs: &[Run], title: &str) -> Vec<u8> {
    let mut canvas = Canvas::new(WIDTH, HEIGHT);
    let (left, right, top, bottom) = (70_i64, WIDTH as i64 - 20, 50_i64, HEIGHT as i64 - 50);
    canvas.centred(WIDTH as i64 / 2, 12, title, 2, BLACK);
    let groups = by_scenario(runs);
    let highest = runs
        .iter()
        .map(|run| run.first_output_s)
        .fold(0.0_f64, f64::max);
    let axis_max = nice_ceiling(highest);
    // Grid lines and their labels: five steps up to the axis maximum.
    for step in 0..=5 {
        let value = axis_max * step as f64 / 5.0;
        let y = bottom - ((bottom - top) as f64 * step as f64 / 5.0) as i64;
        canvas.fill(left, y, right - left, 1, GRID);
        let label = format!("{value:.1}");
        canvas.text(
            left - 8 - Canvas::text_width(&label, 1),
            y - 3,
            &label,
            1,
            BLACK,
        );
    }
    canvas.text(8, top - 20, "first output (s)", 1, BLACK);
    canvas.fill(left, top, 1, bottom - top + 1, BLACK);
    canvas.fill(left, bottom, right - left, 1, BLACK);
    if groups.is_empty() {
        return encode(&canvas);
    }
    let slot = (right - left) / groups.len() as i64;
    for (g, (name, group)) in groups.iter().enumerate() {
        let group_left = left + g as i64 * slot + slot / 8;
        let group_width = slot - slot / 4;
        let bar_width = (group_width / group.len() as i64).max(1);
        for (i, run) in group.iter().enumerate() {
            let height = ((bottom - top) as f64 * (run.first_output_s / axis_max)).round() as i64;
            let x = group_left + i as i64 * bar_width;
            canvas.fill(
                x + 1,
                bottom - height,
                bar_width - 2,
                height,
                RUN_COLOURS[i % RUN_COLOURS.len()],
            );
        }
        let centre = group_left + group_width / 2;
        canvas.centred(centre, bottom + 10, name, 2, BLACK);
        let times: Vec<f64> = group.iter().map(|run| run.first_output_s).collect();
        if let Some(m) = median(&times) {
            let bar_top = bottom - ((bottom - top) as f64 * (m / axis_max)) as i64;
            let label = format!("median {m:.2} s");
            canvas.centred(centre, (bar_top - 12).max(top - 12), &label, 1, BLACK);
        }
    }
    let runs_label = format!(
        "one bar per run, in order ({} runs each)",
        groups[0].1.len()
    );
    canvas.text(left, HEIGHT as i64 - 16, &runs_label, 1, BLACK);
    encode(&canvas)
}

/// The smallest of 1, 2 or 5 times a power of ten at or above `value` (1 for nothing).
fn nice_ceiling(value: f64) -> f64 {
    if value.is_nan() || value <= 0.0 {
        return 1.0;
    }
    let power = 10f64.powf(value.log10().floor());
    for factor in [1.0, 2.0, 5.0, 10.0] {
        if factor * power >= value {
            return factor * power;
        }
    }
    10.0 * power
}

/// An 8-bit RGB PNG of `canvas`: every row unfiltered, one IDAT.
fn encode(canvas: &Canvas) -> Vec<u8> {
    let mut raw = Vec::with_capacity(canvas.pixels.len() + canvas.height as usize);
    let stride = canvas.width as usize * 3;
    for row in canvas.pixels.chunks(stride) {
        raw.push(0);
        raw.extend_from_slice(row);
    }
    let mut zlib = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    zlib.write_all(&raw).expect("writing to a Vec cannot fail");
    let data = zlib.finish().expect("writing to a Vec cannot fail");
    let mut header = Vec::with_capacity(13);
    header.extend_from_slice(&canvas.width.to_be_bytes());
    header.extend_from_slice(&canvas.height.to_be_bytes());
    // Bit depth 8, colour type 2 (RGB), deflate, adaptive filtering, no interlace.
    header.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    for (kind, body) in [
        (b"IHDR", &header[..]),
        (b"IDAT", &data[..]),
        (b"IEND", &[][..]),
    ] {
        png.extend_from_slice(&(body.len() as u32).to_be_bytes());
        let mut crc = crc32fast::Hasher::new();
        crc.update(kind);
        crc.update(body);
        png.extend_from_slice(kind);
        png.extend_from_slice(body);
        png.extend_from_slice(&crc.finalize().to_be_bytes());
    }
    png
}

/// Rows of a 5x7 glyph, the high bit of five on the left; lower case is drawn as upper case,
/// and a character without a glyph as a box.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_uppercase() {
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1E],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x0A, 0x04, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        ' ' => [0; 7],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        ',' => [0, 0, 0, 0, 0x0C, 0x04, 0x08],
        ':' => [0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0],
        '-' => [0, 0, 0, 0x1F, 0, 0, 0],
        '_' => [0, 0, 0, 0, 0, 0, 0x1F],
        '/' => [0x01, 0x01, 0x02, 0x04, 0x08, 0x10, 0x10],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '@' => [0x0E, 0x11, 0x17, 0x15, 0x17, 0x10, 0x0E],
        '=' => [0, 0, 0x1F, 0, 0x1F, 0, 0],
        _ => [0x1F, 0x11, 0x11, 0x11, 0x11, 0x11, 0x1F],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(scenario: &str, number: usize, first: f64) -> Run {
        Run {
            scenario: scenario.to_owned(),
            number,
            first_output_s: first,
            pull_s: 0.0,
            bytes: None,
            requests: None,
            daemon_cpu_s: None,
            daemon_peak_rss: None,
        }
    }

    /// Decodes the PNG back (chunk CRCs, zlib, row filters) into its size and RGB pixels.
    fn decode(png: &[u8]) -> (u32, u32, Vec<u8>) {
        use std::io::Read as _;
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        let mut at = 8;
        let (mut width, mut height, mut data) = (0, 0, Vec::new());
        while at < png.len() {
            let length = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
            let kind = &png[at + 4..at + 8];
            let body = &png[at + 8..at + 8 + length];
            let crc =
                u32::from_be_bytes(png[at + 8 + length..at + 12 + length].try_into().unwrap());
            assert_eq!(crc, crc32fast::hash(&png[at + 4..at + 8 + length]));
            match kind {
                b"IHDR" => {
                    width = u32::from_be_bytes(body[0..4].try_into().unwrap());
                    height = u32::from_be_bytes(body[4..8].try_into().unwrap());
                }
                b"IDAT" => data.extend_from_slice(body),
                _ => {}
            }
            at += 12 + length;
        }
        let mut raw = Vec::new();
        flate2::read::ZlibDecoder::new(&data[..])
            .read_to_end(&mut raw)
            .unwrap();
        let stride = width as usize * 3 + 1;
        assert_eq!(raw.len(), stride * height as usize);
        let pixels = raw
            .chunks(stride)
            .flat_map(|row| row[1..].to_vec())
            .collect();
        (width, height, pixels)
    }

    #[test]
    fn the_chart_is_a_png_of_its_size_with_a_bar_per_run() {
        let runs = [
            run("overlayfs", 1, 4.0),
            run("overlayfs", 2, 5.0),
            run("shoal", 1, 1.0),
            run("shoal", 2, 1.2),
        ];
        let (width, height, pixels) = decode(&render(&runs, "shoal bench"));
        assert_eq!((width, height), (WIDTH, HEIGHT));
        let colour = |c: Rgb| pixels.chunks(3).filter(|p| *p == c).count();
        // Two runs per scenario: the first and second run colours both appear.
        assert!(colour(RUN_COLOURS[0]) > 1000);
        assert!(colour(RUN_COLOURS[1]) > 1000);
        assert_eq!(colour(RUN_COLOURS[2]), 0);
        assert!(colour(BLACK) > 500, "axes and labels are drawn");
    }

    #[test]
    fn an_axis_ends_on_one_two_or_five_times_a_power_of_ten() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(0.7), 1.0);
        assert_eq!(nice_ceiling(1.3), 2.0);
        assert_eq!(nice_ceiling(3.2), 5.0);
        assert_eq!(nice_ceiling(34.5), 50.0);
        assert_eq!(nice_ceiling(100.0), 100.0);
    }
}
