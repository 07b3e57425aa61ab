//! Pillow's 8-bit image operations, reproduced exactly: resampling
//! (`Image.resize` with the nearest, bilinear, bicubic and Lanczos filters: a
//! horizontal and a vertical pass in Pillow's order, each in 22-bit fixed
//! point rounded to 8 bits) and compositing onto white (`alpha_composite`), so that image
//! processors give the pixels the Python processors give.

/// Pillow's resampling filters by their number in processor configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Nearest,
    Bilinear,
    Bicubic,
    /// Pillow's `LANCZOS` (1): a sinc windowed by a sinc of three lobes.
    Lanczos,
}

/// An 8-bit RGB image, row-major `[height, width, 3]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// One channel of Pillow's `alpha_composite(white, src)`: 7-bit fixed
/// point blend weights and its rounded division by 255.
pub(crate) fn over_white(c: u32, a: u32) -> u8 {
    if a == 0 {
        return 255;
    }
    const PRECISION_BITS: u32 = 7;
    let shift_div255 = |v: u32| ((v >> 8) + v) >> 8;
    let blend = 255 * (255 - a);
    let outa255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << PRECISION_BITS) / outa255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let tmp = c * coef1 + 255 * coef2;
    (shift_div255(tmp + (0x80 << PRECISION_BITS)) >> PRECISION_BITS) as u8
}

/// Pillow's fixed-point precision of 8-bit resampling coefficients.
const PRECISION_BITS: u32 = 32 - 8 - 2;

fn filter_support(f: Filter) -> f64 {
    match f {
        Filter::Nearest => 0.0,
        Filter::Bilinear => 1.0,
        Filter::Bicubic => 2.0,
        Filter::Lanczos => 3.0,
    }
}

fn filter_weight(f: Filter, x: f64) -> f64 {
    let x = x.abs();
    match f {
        Filter::Nearest => 0.0,
        Filter::Bilinear => {
            if x < 1.0 {
                1.0 - x
            } else {
                0.0
            }
        }
        Filter::Bicubic => {
            let a = -0.5;
            if x < 1.0 {
                ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
            } else if x < 2.0 {
                (((x - 5.0) * x + 8.0) * x - 4.0) * a
            } else {
                0.0
            }
        }
        Filter::Lanczos => {
            if x < 3.0 {
                sinc(x) * sinc(x / 3.0)
            } else {
                0.0
            }
        }
    }
}

/// `sin(πx) / (πx)`, 1 at 0 (Pillow's `sinc_filter`).
fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

/// Per output position: the first input position and its integer weights
/// (Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`).
fn coefficients(in_size: usize, out_size: usize, f: Filter) -> Vec<(usize, Vec<i64>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter_support(f) * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let ws: Vec<f64> = (xmin..xmax.max(xmin))
                .map(|x| filter_weight(f, (x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = ws.iter().sum();
            let fixed = ws
                .iter()
                .map(|w| {
                    let k = if total != 0.0 { w / total } else { *w };
                    let v = k * f64::from(1u32 << PRECISION_BITS);
                    if k < 0.0 {
                        (v - 0.5) as i64
                    } else {
                        (v + 0.5) as i64
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes as Pillow's `Image.resize` does for 8-bit RGB: two passes (the
/// horizontal one first unless the height shrinks much more), each rounded
/// to 8 bits; nearest picks `floor((x + 0.5) · scale)`.
pub fn resize(img: &RgbImage, out_w: usize, out_h: usize, f: Filter) -> RgbImage {
    let (w, h) = (img.width, img.height);
    if f == Filter::Nearest {
        let mut data = Vec::with_capacity(out_w * out_h * 3);
        for y in 0..out_h {
            let sy = (((y as f64 + 0.5) * h as f64 / out_h as f64) as usize).min(h - 1);
            for x in 0..out_w {
                let sx = (((x as f64 + 0.5) * w as f64 / out_w as f64) as usize).min(w - 1);
                let k = (sy * w + sx) * 3;
                data.extend_from_slice(&img.data[k..k + 3]);
            }
        }
        return RgbImage {
            width: out_w,
            height: out_h,
            data,
        };
    }
    // Pillow (13) runs the vertical pass first when the height shrinks by
    // more than twice as many pixels as the width; the order changes the
    // 8-bit rounding between the passes.
    let vertical_first = h > out_h && h - out_h > 2 * (w as i64 - out_w as i64).max(0) as usize;
    let (mut cur, mut done) = (img.clone(), false);
    if vertical_first {
        cur = vertical(&cur, out_h, f);
        done = true;
    }
    if out_w != w {
        cur = horizontal(&cur, out_w, f);
    }
    if !done && out_h != h {
        cur = vertical(&cur, out_h, f);
    }
    cur
}

/// One horizontal pass of [`resize`] to `out_w` columns.
fn horizontal(cur: &RgbImage, out_w: usize, f: Filter) -> RgbImage {
    let (w, h) = (cur.width, cur.height);
    let round = 1i64 << (PRECISION_BITS - 1);
    let coeffs = coefficients(w, out_w, f);
    let mut data = Vec::with_capacity(out_w * h * 3);
    for y in 0..h {
        let row = &cur.data[y * w * 3..(y + 1) * w * 3];
        for (xmin, ks) in &coeffs {
            for c in 0..3 {
                let mut acc = round;
                for (j, k) in ks.iter().enumerate() {
                    acc += i64::from(row[(xmin + j) * 3 + c]) * k;
                }
                data.push(clip8(acc));
            }
        }
    }
    RgbImage {
        width: out_w,
        height: h,
        data,
    }
}

/// One vertical pass of [`resize`] to `out_h` rows.
fn vertical(cur: &RgbImage, out_h: usize, f: Filter) -> RgbImage {
    let (cw, h) = (cur.width, cur.height);
    let round = 1i64 << (PRECISION_BITS - 1);
    let coeffs = coefficients(h, out_h, f);
    let mut data = Vec::with_capacity(cw * out_h * 3);
    for (ymin, ks) in &coeffs {
        for x in 0..cw {
            for c in 0..3 {
                let mut acc = round;
                for (j, k) in ks.iter().enumerate() {
                    acc += i64::from(cur.data[((ymin + j) * cw + x) * 3 + c]) * k;
                }
                data.push(clip8(acc));
            }
        }
    }
    RgbImage {
        width: cw,
        height: out_h,
        data,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pass_order_follows_pillows_rule() {
        let img = RgbImage {
            width: 33,
            height: 90,
            data: (0..33 * 90 * 3).map(|v| (v * 37 % 251) as u8).collect(),
        };
        let f = Filter::Bicubic;
        // The height shrinks by 58 rows, more than twice the width's 1:
        // vertical first.
        let v_first = resize(&resize(&img, 33, 32, f), 32, 32, f);
        let h_first = resize(&resize(&img, 32, 90, f), 32, 32, f);
        assert_ne!(v_first, h_first, "the order must matter for this image");
        assert_eq!(resize(&img, 32, 32, f), v_first);
        // Shrinking the height by 2, the width by 1: horizontal first.
        assert_eq!(
            resize(&img, 32, 88, f),
            resize(&resize(&img, 32, 90, f), 32, 88, f)
        );
    }

    #[test]
    fn resizing_to_the_same_size_with_bicubic_weights_is_the_identity() {
        let img = RgbImage {
            width: 3,
            height: 2,
            data: (0..18).map(|v| (v * 13) as u8).collect(),
        };
        assert_eq!(resize(&img, 3, 2, Filter::Bicubic), img);
        // A constant image stays constant at any size.
        let flat = RgbImage {
            width: 5,
            height: 4,
            data: vec![77; 60],
        };
        let r = resize(&flat, 9, 3, Filter::Bicubic);
        assert!(r.data.iter().all(|&v| v == 77));
    }

    #[test]
    fn transparency_goes_onto_white() {
        assert_eq!(over_white(10, 0), 255);
        assert_eq!(over_white(10, 255), 10);
        let half = over_white(0, 128);
        assert!((126..=128).contains(&half), "{half}");
    }
}
