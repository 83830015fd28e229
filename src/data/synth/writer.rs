//! Writing the dataset to disk in the MVTec LOCO AD layout: images, masks, `defects_config.json` and
//! the `synth.json` that records the configuration.

use std::fs;
use std::io::Cursor;
use std::path::Path;

use image::{ImageBuffer, ImageFormat, Pixel, PixelWithColorType};
use serde::Serialize;

use super::scene::build;
use super::{defect_specs, DefectKind, Split, SynthConfig, SynthError, SynthReport};

/// Writes the dataset under `out` (created if needed; it must not exist or be
/// empty). Calls `on_image` once per image written.
pub fn generate(config: &SynthConfig, out: &Path, on_image: &mut dyn FnMut()) -> Result<SynthReport, SynthError> {
    config.validate()?;
    prepare_output(out)?;

    let specs = defect_specs(config.image_size);
    write_json(&out.join("defects_config.json"), &specs)?;
    write_json(&out.join("synth.json"), config)?;

    let mut report = SynthReport::default();
    for kind in DefectKind::ALL {
        report.defects.insert(kind.name().to_string(), 0);
    }
    for split in Split::ALL {
        let count = config.count(split);
        let dir = out.join(split.dir());
        create_dir(&dir)?;
        for index in 0..count {
            let sample = build(config.seed, split, index, config.image_size).render(config.image_size);
            write_png(&dir.join(format!("{index:03}.png")), &sample.image)?;
            report.images += 1;
            if let Some(mask_dir) = split.mask_dir() {
                let dir = out.join(mask_dir).join(format!("{index:03}"));
                create_dir(&dir)?;
                for (n, defect) in sample.defects.iter().enumerate() {
                    write_png(&dir.join(format!("{n:03}.png")), &defect.mask)?;
                    report.masks += 1;
                    *report.defects.entry(defect.kind.name().to_string()).or_default() += 1;
                }
            }
            on_image();
        }
    }
    Ok(report)
}

// ---------------------------------------------------------------------------
// Output helpers

fn prepare_output(out: &Path) -> Result<(), SynthError> {
    if out.exists() {
        let mut entries =
            fs::read_dir(out).map_err(|source| SynthError::ReadDir { path: out.to_path_buf(), source })?;
        if entries.next().is_some() {
            return Err(SynthError::OutputNotEmpty { path: out.to_path_buf() });
        }
    }
    create_dir(out)
}

fn create_dir(path: &Path) -> Result<(), SynthError> {
    fs::create_dir_all(path).map_err(|source| SynthError::CreateDir { path: path.to_path_buf(), source })
}

fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<(), SynthError> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|source| SynthError::Serialize { path: path.to_path_buf(), source })?;
    text.push('\n');
    fs::write(path, text).map_err(|source| SynthError::Write { path: path.to_path_buf(), source })
}

fn write_png<P>(path: &Path, img: &ImageBuffer<P, Vec<u8>>) -> Result<(), SynthError>
where
    P: Pixel<Subpixel = u8> + PixelWithColorType,
{
    let mut buf = Vec::new();
    img.write_to(&mut Cursor::new(&mut buf), ImageFormat::Png)
        .map_err(|source| SynthError::Encode { path: path.to_path_buf(), source })?;
    fs::write(path, buf).map_err(|source| SynthError::Write { path: path.to_path_buf(), source })
}
