//! Decoding and normalising images into network inputs, shared by the offline commands and the streaming
//! pipeline so that a frame is prepared identically for training and serving. The service's stage that
//! runs this on consumed frames is [`crate::service::preprocess`].

use std::io::Cursor;
use std::path::Path;

use image::{imageops::FilterType, DynamicImage, ImageReader, RgbImage};
use tch::{Device, Kind, Tensor};

use crate::error::ImageError;

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Smallest image we accept: below it a 4-px feature grid has nothing to say.
pub const MIN_IMAGE_SIDE: u32 = 16;

/// Bounds on an image's declared size, checked against its header before any pixel is allocated: a
/// small compressed file can declare gigapixels (a 16384x16384 16-bit PNG of zeros is 0.5 MB and took
/// 4.4 GB to decode), so the byte limit on messages alone does not bound memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    pub max_width: u32,
    pub max_height: u32,
    pub max_pixels: u64,
}

impl DecodeLimits {
    /// Bytes a decoder may allocate for an image within the limits: the widest pixel the formats we read
    /// produce (16-bit RGBA, 8 bytes) plus the 8-bit RGB copy, with room for the decoders' own buffers.
    fn max_alloc(&self) -> u64 {
        self.max_pixels.saturating_mul(11).saturating_add(16 << 20)
    }

    /// Which limit `width`x`height` exceeds, if any, in the words of an error message.
    pub fn exceeded(&self, width: u32, height: u32) -> Option<String> {
        let pixels = width as u64 * height as u64;
        if width > self.max_width {
            Some(format!("width over {}", self.max_width))
        } else if height > self.max_height {
            Some(format!("height over {}", self.max_height))
        } else if pixels > self.max_pixels {
            Some(format!("{pixels} pixels, over {}", self.max_pixels))
        } else {
            None
        }
    }
}

impl Default for DecodeLimits {
    /// 24 megapixels (a 6000x4000 camera) and sides up to 8192: at most about 260 MB per decode.
    fn default() -> Self {
        DecodeLimits { max_width: 8192, max_height: 8192, max_pixels: 24_000_000 }
    }
}

/// Decodes PNG or JPEG bytes within the default [`DecodeLimits`]; `origin` names the source in errors (a
/// path, a Kafka key).
pub fn decode(bytes: &[u8], origin: &str) -> Result<RgbImage, ImageError> {
    decode_within(bytes, origin, &DecodeLimits::default())
}

/// Decodes PNG or JPEG bytes, refusing from the header alone an image whose declared size exceeds
/// `limits` ([`ImageError::TooLarge`]), before anything is allocated for its pixels.
pub fn decode_within(bytes: &[u8], origin: &str, limits: &DecodeLimits) -> Result<RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty { origin: origin.to_string() });
    }
    if is_truncated_jpeg(bytes) {
        return Err(ImageError::Truncated { origin: origin.to_string() });
    }
    let decode_error = |source| ImageError::Decode { origin: origin.to_string(), source };
    // Guessing the format reads a few magic bytes of an in-memory cursor: it cannot fail with I/O.
    let reader = || ImageReader::new(Cursor::new(bytes)).with_guessed_format().map_err(image::ImageError::IoError);
    let (width, height) = reader().and_then(|header| header.into_dimensions()).map_err(decode_error)?;
    if let Some(limit) = limits.exceeded(width, height) {
        return Err(ImageError::TooLarge { origin: origin.to_string(), width, height, limit });
    }
    let mut reader = reader().map_err(decode_error)?;
    // A second guard inside the decoders, should a format allocate more than its header suggests.
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_image_width = Some(limits.max_width);
    decoder_limits.max_image_height = Some(limits.max_height);
    decoder_limits.max_alloc = Some(limits.max_alloc());
    reader.limits(decoder_limits);
    let image = reader.decode().map_err(decode_error)?;
    let (width, height) = (image.width(), image.height());
    if width < MIN_IMAGE_SIDE || height < MIN_IMAGE_SIDE {
        return Err(ImageError::TooSmall { origin: origin.to_string(), width, height, min: MIN_IMAGE_SIDE });
    }
    Ok(match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    })
}

/// A JPEG whose end-of-image marker (FF D9) is missing from its tail. JPEG decoders fill a cut-off scan
/// with grey and report success; scored, such a frame is a false alarm or, worse, a product never
/// inspected. Inside the entropy-coded data an FF byte is always followed by 00 or a restart marker, so
/// FF D9 in the tail means the file ended properly (cameras may pad after it).
fn is_truncated_jpeg(bytes: &[u8]) -> bool {
    const TAIL: usize = 4096;
    bytes.starts_with(&[0xFF, 0xD8]) && !bytes[bytes.len().saturating_sub(TAIL)..].windows(2).any(|w| w == [0xFF, 0xD9])
}

pub fn load_image(path: &Path) -> Result<RgbImage, ImageError> {
    let bytes = std::fs::read(path).map_err(|source| ImageError::Read { path: path.to_path_buf(), source })?;
    decode(&bytes, &path.display().to_string())
}

/// Resizes to `side`x`side` (bilinear), scales to [0, 1] and normalises with ImageNet statistics:
/// a [3, side, side] float tensor on the CPU.
pub fn to_input(image: &RgbImage, side: u32) -> Tensor {
    Tensor::from_slice(&to_planar(image, side)).reshape([3, side as i64, side as i64])
}

/// The same values as [`to_input`] as a plain channel-major vector (thread-friendly, no libtorch).
pub fn to_planar(image: &RgbImage, side: u32) -> Vec<f32> {
    let resized = resized_rgb(image, side);
    let pixels = (side * side) as usize;
    let mut planar = vec![0f32; 3 * pixels];
    let (red, rest) = planar.split_at_mut(pixels);
    let (green, blue) = rest.split_at_mut(pixels);
    let levels = &*NORMALISED_LEVELS;
    for (i, rgb) in resized.chunks_exact(3).enumerate() {
        red[i] = levels[0][rgb[0] as usize];
        green[i] = levels[1][rgb[1] as usize];
        blue[i] = levels[2][rgb[2] as usize];
    }
    planar
}

/// Each channel's 256 possible values, normalised: a table lookup instead of a division per value.
static NORMALISED_LEVELS: std::sync::LazyLock<[[f32; 256]; 3]> = std::sync::LazyLock::new(|| {
    std::array::from_fn(|c| std::array::from_fn(|level| (level as f32 / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]))
});

thread_local! {
    /// The resizer keeps its coefficient and scratch buffers between frames of the same size.
    static RESIZER: std::cell::RefCell<fast_image_resize::Resizer> =
        std::cell::RefCell::new(fast_image_resize::Resizer::new());
}

/// RGB bytes of `image` resized to `side`x`side` with a bilinear (triangle) convolution whose support
/// widens with the reduction, as `image`'s `FilterType::Triangle` (it was the resizer before; values
/// agree within a level or two, see the tests), in SIMD: about 10 times faster on a 400x800 frame.
pub fn resized_rgb(image: &RgbImage, side: u32) -> Vec<u8> {
    if image.width() == side && image.height() == side {
        return image.as_raw().clone();
    }
    use fast_image_resize::{images::Image, images::ImageRef, FilterType as Filter, PixelType, ResizeAlg};
    let options = fast_image_resize::ResizeOptions::new().resize_alg(ResizeAlg::Convolution(Filter::Bilinear));
    let resized = ImageRef::new(image.width(), image.height(), image.as_raw(), PixelType::U8x3)
        .map_err(|err| err.to_string())
        .and_then(|source| {
            let mut target = Image::new(side, side, PixelType::U8x3);
            RESIZER
                .with_borrow_mut(|resizer| resizer.resize(&source, &mut target, &options))
                .map(|()| target.into_vec())
                .map_err(|err| err.to_string())
        });
    match resized {
        Ok(bytes) => bytes,
        // An RgbImage always has a valid 3-byte-per-pixel buffer, so this is not expected; if the SIMD
        // resizer ever refuses one, the portable one gives the same picture.
        Err(err) => {
            log::warn!(
                "fast resize refused a {}x{} image ({err}); using the portable one",
                image.width(),
                image.height()
            );
            image::imageops::resize(image, side, side, FilterType::Triangle).into_raw()
        }
    }
}

fn channel_stats(device: Device) -> (Tensor, Tensor) {
    let mean = Tensor::from_slice(&IMAGENET_MEAN).reshape([1, 3, 1, 1]).to_device(device);
    let std = Tensor::from_slice(&IMAGENET_STD).reshape([1, 3, 1, 1]).to_device(device);
    (mean, std)
}

/// Back to [0, 1] pixel values, for augmentation and pictures. Input [B, 3, H, W].
pub fn denormalise(images: &Tensor) -> Tensor {
    let (mean, std) = channel_stats(images.device());
    images * std + mean
}

/// Interleaved RGB bytes [B, side, side, 3] (from [`resized_rgb`]) to normalised inputs [B, 3, side,
/// side], on the bytes' device: the same values as [`to_planar`]. The streaming service moves frames to
/// the model's device as bytes, a quarter of the f32 input's size, and normalises them there.
pub fn normalise_bytes(bytes: &Tensor) -> Tensor {
    normalise(&(bytes.permute([0, 3, 1, 2]).to_kind(Kind::Float) / 255.0))
}

/// The same values [B, C, H, W] stored channels-last (strides of [B, H, W, C]). oneDNN and cuDNN keep a
/// convolution's input order through the network, and on CPUs their channels-last kernels are faster
/// (`bench-serving` measures inference, `cargo bench --bench model` training).
pub fn channels_last(images: &Tensor) -> Tensor {
    images.permute([0, 2, 3, 1]).contiguous().permute([0, 3, 1, 2])
}

pub fn normalise(pixels: &Tensor) -> Tensor {
    let (mean, std) = channel_stats(pixels.device());
    (pixels - mean) / std
}

/// Colour jitter of EfficientAD's autoencoder branch: one of brightness, contrast or saturation, with a
/// factor in [0.8, 1.2]. `choice` in 0..3 and `factor` come from the caller's seeded RNG so training
/// stays reproducible.
pub fn jitter(images: &Tensor, choice: u32, factor: f64) -> Tensor {
    let pixels = denormalise(images);
    let gray = (pixels.select(1, 0) * 0.299 + pixels.select(1, 1) * 0.587 + pixels.select(1, 2) * 0.114).unsqueeze(1);
    let jittered = match choice {
        0 => &pixels * factor,
        1 => {
            let mean = gray.mean_dim([1, 2, 3].as_slice(), true, Kind::Float);
            (&pixels - &mean) * factor + mean
        }
        _ => (&pixels - &gray) * factor + gray,
    };
    normalise(&jittered.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_bytes(image: &RgbImage) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        image.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    /// Models trained before the SIMD resizer see the same inputs within rounding: it is compared with
    /// the portable triangle filter it replaced, on a frame with edges, gradients and noise, reduced
    /// unevenly (400x800 to 256, as juice_bottle frames) and enlarged.
    #[test]
    fn the_simd_resize_matches_the_portable_triangle_filter() {
        let mut state = 12345u32;
        let frame = RgbImage::from_fn(400, 800, |x, y| {
            state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let noise = (state >> 24) as u8 / 8;
            let edge = if (x / 37 + y / 53) % 2 == 0 { 200 } else { 30 };
            image::Rgb([edge + noise, (x * 255 / 400) as u8, (y * 255 / 800) as u8])
        });
        for (source, side) in [(&frame, 256), (&image::imageops::crop_imm(&frame, 0, 0, 100, 100).to_image(), 128)] {
            let portable = image::imageops::resize(source, side, side, FilterType::Triangle).into_raw();
            let simd = resized_rgb(source, side);
            assert_eq!(simd.len(), portable.len());
            let largest = simd.iter().zip(&portable).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
            let mean = simd.iter().zip(&portable).map(|(a, b)| a.abs_diff(*b) as f64).sum::<f64>() / simd.len() as f64;
            eprintln!("{}x{} to {side}: largest difference {largest}, mean {mean:.3}", source.width(), source.height());
            assert!(largest <= 2 && mean < 0.5, "largest {largest}, mean {mean}");
        }
        let same = RgbImage::from_pixel(64, 64, image::Rgb([1, 2, 3]));
        assert_eq!(resized_rgb(&same, 64), same.into_raw(), "the right size is not resampled");
    }

    /// The service's path (bytes, normalised by libtorch on the model's device) and the offline one
    /// (`to_planar`) give the model the same input.
    #[test]
    fn bytes_normalised_by_libtorch_equal_the_planar_input() {
        let image =
            RgbImage::from_fn(90, 70, |x, y| image::Rgb([(x * 3) as u8, (y * 3) as u8, ((x + y) * 7 % 256) as u8]));
        let side = 64;
        let bytes = Tensor::from_slice(&resized_rgb(&image, side)).reshape([1, side as i64, side as i64, 3]);
        let normalised = normalise_bytes(&bytes);
        let planar = to_input(&image, side).unsqueeze(0);
        assert_eq!(normalised.size(), planar.size());
        let difference = (normalised - planar).abs().max().double_value(&[]);
        assert!(difference < 1e-6, "{difference}");
    }

    #[test]
    fn normalised_levels_are_imagenet_statistics() {
        let one = RgbImage::from_pixel(1, 1, image::Rgb([0, 128, 255]));
        let planar = to_planar(&one, 1);
        for (c, level) in [0u8, 128, 255].into_iter().enumerate() {
            let expected = (level as f32 / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
            assert!((planar[c] - expected).abs() < 1e-6, "channel {c}: {} vs {expected}", planar[c]);
        }
    }

    #[test]
    fn input_is_normalised_planar_rgb() {
        let image = RgbImage::from_pixel(32, 32, image::Rgb([255, 0, 128]));
        let x = to_input(&decode(&png_bytes(&image), "test").unwrap(), 32);
        assert_eq!(x.size(), vec![3, 32, 32]);
        let red = x.double_value(&[0, 5, 5]);
        assert!((red - (1.0 - 0.485) / 0.229).abs() < 1e-5);
        let back = denormalise(&x.unsqueeze(0));
        assert!((back.double_value(&[0, 2, 0, 0]) - 128.0 / 255.0).abs() < 1e-5);
    }

    #[test]
    fn bad_bytes_are_named_errors() {
        assert!(decode(b"", "frame-1").unwrap_err().to_string().contains("frame-1"));
        let err = decode(b"\x89PNG\r\n\x1a\ngarbage", "frame-2").unwrap_err().to_string();
        assert!(err.contains("frame-2") && err.contains("decode"), "{err}");
        let bytes = png_bytes(&RgbImage::new(64, 64));
        assert!(decode(&bytes[..bytes.len() / 2], "truncated").is_err());
        let tiny = png_bytes(&RgbImage::new(4, 4));
        assert!(decode(&tiny, "tiny").unwrap_err().to_string().contains("too small"));
    }

    #[test]
    fn declared_size_over_the_limits_is_refused_before_decoding() {
        let bytes = png_bytes(&RgbImage::new(64, 48));
        let limits = |max_width, max_height, max_pixels| DecodeLimits { max_width, max_height, max_pixels };
        assert!(decode_within(&bytes, "fits", &limits(64, 48, 64 * 48)).is_ok());
        for (limits, words) in [
            (limits(63, 1000, 1 << 20), "width over 63"),
            (limits(1000, 47, 1 << 20), "height over 47"),
            (limits(1000, 1000, 3000), "3072 pixels, over 3000"),
        ] {
            let err = decode_within(&bytes, "frame-7", &limits).unwrap_err();
            assert!(matches!(err, ImageError::TooLarge { width: 64, height: 48, .. }), "{err:?}");
            let message = err.to_string();
            assert!(message.contains("frame-7") && message.contains(words), "{message}");
        }
    }

    /// A JPEG header may declare up to 65535x65535 pixels whatever the file's size: the baseline
    /// start-of-frame marker of a small real JPEG, rewritten to declare 60000x60000, must be refused by
    /// its header, and the real image must still decode.
    #[test]
    fn a_jpeg_declaring_gigapixels_is_too_large() {
        let mut out = std::io::Cursor::new(Vec::new());
        RgbImage::new(32, 32).write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
        let mut bytes = out.into_inner();
        assert!(decode(&bytes, "real").is_ok());
        let sof = bytes.windows(2).position(|w| w == [0xFF, 0xC0]).expect("a baseline JPEG has SOF0");
        // SOF0: marker, 2-byte length, precision, height, width.
        bytes[sof + 5..sof + 7].copy_from_slice(&60000u16.to_be_bytes());
        bytes[sof + 7..sof + 9].copy_from_slice(&60000u16.to_be_bytes());
        let err = decode(&bytes, "bomb.jpg").unwrap_err();
        assert!(matches!(err, ImageError::TooLarge { width: 60000, height: 60000, .. }), "{err:?}");
    }

    /// JPEG decoders grey-fill a scan cut short and report success; the cut must be refused instead, a
    /// complete file (also one padded after its end marker) must decode.
    #[test]
    fn a_truncated_jpeg_is_refused_and_a_padded_one_decodes() {
        let image = RgbImage::from_fn(96, 96, |x, y| image::Rgb([(x * 2) as u8, (y * 2) as u8, ((x * y) % 251) as u8]));
        let mut out = std::io::Cursor::new(Vec::new());
        image.write_to(&mut out, image::ImageFormat::Jpeg).unwrap();
        let bytes = out.into_inner();
        assert!(decode(&bytes, "whole").is_ok());
        for cut in [bytes.len() / 3, bytes.len() - 2] {
            let err = decode(&bytes[..cut], "cut.jpg").unwrap_err();
            assert!(matches!(err, ImageError::Truncated { .. }), "cut at {cut}: {err:?}");
            assert!(err.to_string().contains("cut.jpg"), "{err}");
        }
        let mut padded = bytes.clone();
        padded.extend([0u8; 300]);
        assert!(decode(&padded, "padded").is_ok());
    }

    #[test]
    fn jitter_keeps_pixels_in_range_and_changes_the_image() {
        let image = RgbImage::from_fn(32, 32, |x, y| image::Rgb([(x * 8) as u8, (y * 8) as u8, 100]));
        let x = to_input(&image, 32).unsqueeze(0);
        for choice in 0..3 {
            let j = denormalise(&jitter(&x, choice, 1.2));
            assert!(j.min().double_value(&[]) >= -1e-6 && j.max().double_value(&[]) <= 1.0 + 1e-6);
            assert!((&j - denormalise(&x)).abs().max().double_value(&[]) > 1e-3);
        }
    }
}
