//! Decoding and normalising images into network inputs, shared by the offline commands and the streaming
//! pipeline so that a frame is prepared identically for training and serving. The service's stage that
//! runs this on consumed frames is [`crate::service::preprocess`].

use std::path::Path;

use image::{imageops::FilterType, DynamicImage, RgbImage};
use tch::{Device, Kind, Tensor};

use crate::error::ImageError;

pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Smallest image we accept: below it a 4-px feature grid has nothing to say.
pub const MIN_IMAGE_SIDE: u32 = 16;

/// Decodes PNG or JPEG bytes; `origin` names the source in errors (a path, a Kafka key).
pub fn decode(bytes: &[u8], origin: &str) -> Result<RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty { origin: origin.to_string() });
    }
    let image =
        image::load_from_memory(bytes).map_err(|source| ImageError::Decode { origin: origin.to_string(), source })?;
    let (width, height) = (image.width(), image.height());
    if width < MIN_IMAGE_SIDE || height < MIN_IMAGE_SIDE {
        return Err(ImageError::TooSmall { origin: origin.to_string(), width, height, min: MIN_IMAGE_SIDE });
    }
    Ok(match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    })
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
    let resized = if image.width() == side && image.height() == side {
        image.clone()
    } else {
        image::imageops::resize(image, side, side, FilterType::Triangle)
    };
    let pixels = (side * side) as usize;
    let mut planar = vec![0f32; 3 * pixels];
    for (i, pixel) in resized.pixels().enumerate() {
        for c in 0..3 {
            planar[c * pixels + i] = (pixel[c] as f32 / 255.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c];
        }
    }
    planar
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
