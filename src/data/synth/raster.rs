//! The drawing primitives of the synthetic line: 2-D geometry in units of the image side, shapes as
//! signed distances, hash noise, colour helpers, and a float canvas quantised once at the end.

use image::{GrayImage, Luma, Rgb, RgbImage};

// ---------------------------------------------------------------------------
// Geometry. All coordinates are in units of the image side (0..1), so the
// scene is the same at every resolution.

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct V2 {
    pub(super) x: f32,
    pub(super) y: f32,
}

pub(super) const fn v2(x: f32, y: f32) -> V2 {
    V2 { x, y }
}

impl std::ops::Add for V2 {
    type Output = V2;
    fn add(self, o: V2) -> V2 {
        v2(self.x + o.x, self.y + o.y)
    }
}

impl std::ops::Sub for V2 {
    type Output = V2;
    fn sub(self, o: V2) -> V2 {
        v2(self.x - o.x, self.y - o.y)
    }
}

impl std::ops::Mul<f32> for V2 {
    type Output = V2;
    fn mul(self, k: f32) -> V2 {
        v2(self.x * k, self.y * k)
    }
}

impl V2 {
    pub(super) fn len(self) -> f32 {
        self.x.hypot(self.y)
    }
    pub(super) fn dot(self, o: V2) -> f32 {
        self.x * o.x + self.y * o.y
    }
    pub(super) fn rotate(self, angle: f32) -> V2 {
        let (s, c) = angle.sin_cos();
        v2(c * self.x - s * self.y, s * self.x + c * self.y)
    }
    pub(super) fn from_angle(angle: f32) -> V2 {
        let (s, c) = angle.sin_cos();
        v2(c, s)
    }
}

/// Shapes as signed distance fields: one evaluation gives both the inside
/// test for masks and a cheap one-pixel anti-aliasing ramp for drawing, and
/// boolean operations (bites, clipping) come for free.
#[derive(Debug, Clone)]
pub(super) enum Shape {
    Circle {
        c: V2,
        r: f32,
    },
    Ring {
        c: V2,
        r_out: f32,
        r_in: f32,
    },
    RoundBox {
        c: V2,
        half: V2,
        round: f32,
        angle: f32,
    },
    Capsule {
        a: V2,
        b: V2,
        r: f32,
    },
    /// Disc with an angle-dependent radius, so a break looks torn, not machined.
    Jagged {
        c: V2,
        r: f32,
        phase: f32,
        amp: f32,
    },
    /// Smooth union of discs: an organic-looking stain.
    Blob {
        circles: Vec<(V2, f32)>,
        k: f32,
    },
    Intersect(Box<Shape>, Box<Shape>),
    Subtract(Box<Shape>, Box<Shape>),
    Union(Box<Shape>, Box<Shape>),
}

pub(super) fn smooth_min(a: f32, b: f32, k: f32) -> f32 {
    let h = (0.5 + 0.5 * (b - a) / k).clamp(0.0, 1.0);
    b + (a - b) * h - k * h * (1.0 - h)
}

impl Shape {
    pub(super) fn union(a: Shape, b: Shape) -> Shape {
        Shape::Union(Box::new(a), Box::new(b))
    }

    pub(super) fn sdf(&self, p: V2) -> f32 {
        match self {
            Shape::Circle { c, r } => (p - *c).len() - r,
            Shape::Ring { c, r_out, r_in } => {
                let mid = 0.5 * (r_out + r_in);
                let half_width = 0.5 * (r_out - r_in);
                ((p - *c).len() - mid).abs() - half_width
            }
            Shape::RoundBox { c, half, round, angle } => {
                let q = (p - *c).rotate(-angle);
                let dx = q.x.abs() - (half.x - round);
                let dy = q.y.abs() - (half.y - round);
                v2(dx.max(0.0), dy.max(0.0)).len() + dx.max(dy).min(0.0) - round
            }
            Shape::Capsule { a, b, r } => {
                let pa = p - *a;
                let ba = *b - *a;
                let h = (pa.dot(ba) / ba.dot(ba)).clamp(0.0, 1.0);
                (pa - ba * h).len() - r
            }
            Shape::Jagged { c, r, phase, amp } => {
                let d = p - *c;
                let ang = d.y.atan2(d.x);
                let wobble = 0.5 * (3.0 * ang + phase).sin()
                    + 0.3 * (7.0 * ang + 2.0 * phase).sin()
                    + 0.2 * (13.0 * ang + 3.0 * phase).sin();
                d.len() - r * (1.0 + amp * wobble)
            }
            Shape::Blob { circles, k } => circles
                .iter()
                .map(|(c, r)| (p - *c).len() - r)
                .reduce(|a, b| smooth_min(a, b, *k))
                .unwrap_or(f32::INFINITY),
            Shape::Intersect(a, b) => a.sdf(p).max(b.sdf(p)),
            Shape::Subtract(a, b) => a.sdf(p).max(-b.sdf(p)),
            Shape::Union(a, b) => a.sdf(p).min(b.sdf(p)),
        }
    }

    /// Axis-aligned bounds (may be loose, never too tight).
    pub(super) fn bounds(&self) -> (V2, V2) {
        match self {
            Shape::Circle { c, r } => (*c - v2(*r, *r), *c + v2(*r, *r)),
            Shape::Ring { c, r_out, .. } => (*c - v2(*r_out, *r_out), *c + v2(*r_out, *r_out)),
            Shape::RoundBox { c, half, angle, .. } => {
                let (s, co) = angle.sin_cos();
                let e = v2(co.abs() * half.x + s.abs() * half.y, s.abs() * half.x + co.abs() * half.y);
                (*c - e, *c + e)
            }
            Shape::Capsule { a, b, r } => {
                (v2(a.x.min(b.x) - r, a.y.min(b.y) - r), v2(a.x.max(b.x) + r, a.y.max(b.y) + r))
            }
            Shape::Jagged { c, r, amp, .. } => {
                let e = r * (1.0 + amp);
                (*c - v2(e, e), *c + v2(e, e))
            }
            Shape::Blob { circles, k } => {
                let mut lo = v2(f32::INFINITY, f32::INFINITY);
                let mut hi = v2(f32::NEG_INFINITY, f32::NEG_INFINITY);
                for (c, r) in circles {
                    // The smooth union bulges by at most k/4 between discs.
                    let e = r + k;
                    lo = v2(lo.x.min(c.x - e), lo.y.min(c.y - e));
                    hi = v2(hi.x.max(c.x + e), hi.y.max(c.y + e));
                }
                (lo, hi)
            }
            Shape::Intersect(a, b) => {
                let (alo, ahi) = a.bounds();
                let (blo, bhi) = b.bounds();
                (v2(alo.x.max(blo.x), alo.y.max(blo.y)), v2(ahi.x.min(bhi.x), ahi.y.min(bhi.y)))
            }
            Shape::Subtract(a, _) => a.bounds(),
            Shape::Union(a, b) => {
                let (alo, ahi) = a.bounds();
                let (blo, bhi) = b.bounds();
                (v2(alo.x.min(blo.x), alo.y.min(blo.y)), v2(ahi.x.max(bhi.x), ahi.y.max(bhi.y)))
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Hash noise: a pure function of (seed, position), so an anomalous image and
// its normal counterpart share exactly the same texture and sensor noise.

pub(super) fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub(super) fn hash01(seed: u64, x: i64, y: i64) -> f32 {
    let h = splitmix64(seed ^ splitmix64((x as u64).wrapping_mul(0x9E37_79B9) ^ (y as u64).rotate_left(32)));
    (h >> 40) as f32 / (1u64 << 24) as f32
}

/// Smooth value noise in `0..1`, one lattice cell per unit of (x, y).
pub(super) fn value_noise(seed: u64, x: f32, y: f32) -> f32 {
    let (xf, yf) = (x.floor(), y.floor());
    let (xi, yi) = (xf as i64, yf as i64);
    let (tx, ty) = (x - xf, y - yf);
    let (sx, sy) = (tx * tx * (3.0 - 2.0 * tx), ty * ty * (3.0 - 2.0 * ty));
    let a = hash01(seed, xi, yi);
    let b = hash01(seed, xi + 1, yi);
    let c = hash01(seed, xi, yi + 1);
    let d = hash01(seed, xi + 1, yi + 1);
    let top = a + (b - a) * sx;
    let bottom = c + (d - c) * sx;
    top + (bottom - top) * sy
}

pub(super) fn smoothstep(e0: f32, e1: f32, x: f32) -> f32 {
    let t = ((x - e0) / (e1 - e0)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

pub(super) fn scale(c: [f32; 3], k: f32) -> [f32; 3] {
    [c[0] * k, c[1] * k, c[2] * k]
}

pub(super) fn mix(a: [f32; 3], b: [f32; 3], t: f32) -> [f32; 3] {
    [a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t]
}

pub(super) fn luminance(c: [f32; 3]) -> f32 {
    0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
}

pub(super) fn colour_distance(a: [f32; 3], b: [f32; 3]) -> f32 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
}

// ---------------------------------------------------------------------------
// Raster canvas (linear float RGB, quantised once at the end).

pub(super) struct Canvas {
    pub(super) size: u32,
    pub(super) px: Vec<[f32; 3]>,
}

pub(super) fn pixel_centre(size: u32, x: u32, y: u32) -> V2 {
    let s = size as f32;
    v2((x as f32 + 0.5) / s, (y as f32 + 0.5) / s)
}

/// Pixel index ranges covering `bounds` plus a margin, clipped to the image.
pub(super) fn pixel_span(size: u32, (lo, hi): (V2, V2), margin_px: f32) -> Option<(u32, u32, u32, u32)> {
    let s = size as f32;
    let clip = |v: f32| v.clamp(0.0, s) as u32;
    let (x0, x1) = (clip((lo.x * s - margin_px).floor()), clip((hi.x * s + margin_px).ceil()));
    let (y0, y1) = (clip((lo.y * s - margin_px).floor()), clip((hi.y * s + margin_px).ceil()));
    (x0 < x1 && y0 < y1).then_some((x0, x1, y0, y1))
}

impl Canvas {
    pub(super) fn new(size: u32, background: impl Fn(V2) -> [f32; 3]) -> Self {
        let mut px = Vec::with_capacity((size * size) as usize);
        for y in 0..size {
            for x in 0..size {
                px.push(background(pixel_centre(size, x, y)));
            }
        }
        Self { size, px }
    }

    /// Composites `shape` with a one-pixel coverage ramp; `colour` gets the
    /// position and the signed distance (for edge shading).
    pub(super) fn paint(&mut self, shape: &Shape, opacity: f32, colour: impl Fn(V2, f32) -> [f32; 3]) {
        let s = self.size as f32;
        let Some((x0, x1, y0, y1)) = pixel_span(self.size, shape.bounds(), 2.0) else {
            return;
        };
        for y in y0..y1 {
            for x in x0..x1 {
                let p = pixel_centre(self.size, x, y);
                let d = shape.sdf(p);
                let alpha = (0.5 - d * s).clamp(0.0, 1.0) * opacity;
                if alpha > 0.0 {
                    let c = colour(p, d);
                    let dst = &mut self.px[(y * self.size + x) as usize];
                    *dst = mix(*dst, c, alpha);
                }
            }
        }
    }

    /// Darkens under `shape` moved by `offset`, with a soft edge: cheap
    /// contact shadows that make the parts read as objects on a floor.
    pub(super) fn shadow(&mut self, shape: &Shape, offset: V2, softness: f32, strength: f32) {
        let (lo, hi) = shape.bounds();
        let grow = v2(softness, softness);
        let span = pixel_span(self.size, (lo + offset - grow, hi + offset + grow), 1.0);
        let Some((x0, x1, y0, y1)) = span else {
            return;
        };
        for y in y0..y1 {
            for x in x0..x1 {
                let p = pixel_centre(self.size, x, y);
                let d = shape.sdf(p - offset);
                let a = (0.5 - d / softness).clamp(0.0, 1.0) * strength;
                if a > 0.0 {
                    let dst = &mut self.px[(y * self.size + x) as usize];
                    *dst = scale(*dst, 1.0 - a);
                }
            }
        }
    }

    pub(super) fn finish(self, brightness: f32, noise_seed: u64) -> RgbImage {
        let size = self.size;
        let seed_a = splitmix64(noise_seed ^ 0xA11CE);
        let seed_b = splitmix64(noise_seed ^ 0xB0B);
        let mut img = RgbImage::new(size, size);
        for (i, c) in self.px.iter().enumerate() {
            let (x, y) = ((i as u32 % size) as i64, (i as u32 / size) as i64);
            // Triangular sensor noise of about ±2 grey levels.
            let n = (hash01(seed_a, x, y) + hash01(seed_b, x, y) - 1.0) * 0.02;
            let q = |v: f32| ((v * brightness + n).clamp(0.0, 1.0) * 255.0).round() as u8;
            img.put_pixel(x as u32, y as u32, Rgb([q(c[0]), q(c[1]), q(c[2])]));
        }
        img
    }
}

pub(super) fn rasterize_mask(shape: &Shape, size: u32, value: u8) -> GrayImage {
    let mut mask = GrayImage::new(size, size);
    if let Some((x0, x1, y0, y1)) = pixel_span(size, shape.bounds(), 1.0) {
        for y in y0..y1 {
            for x in x0..x1 {
                if shape.sdf(pixel_centre(size, x, y)) < 0.0 {
                    mask.put_pixel(x, y, Luma([value]));
                }
            }
        }
    }
    mask
}
