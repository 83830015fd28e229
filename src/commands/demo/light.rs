//! The second act's trays: another day's production of the same line (another seed of the synthetic
//! line), photographed under stronger light. Nothing about the trays changes, so every tray keeps its
//! label; only the pictures are brighter, which a model trained under the old light first mistakes for
//! anomalies.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use lineguard::data::synth::SynthConfig;

use super::tally::SPLITS;

/// What the drifted trays were made with; a second run reuses them when this matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Recipe {
    synth: SynthConfig,
    /// Added to every channel (0..255, saturating): more light on everything, the highlights clipping.
    light: u8,
}

/// Before and after retraining: two disjoint batches of drifted trays, each shuffled like a real line.
pub struct DriftedTrays {
    pub before: Vec<PathBuf>,
    pub after: Vec<PathBuf>,
}

/// Normal trays per batch, and anomalies of each kind per batch.
const GOOD_PER_BATCH: usize = 24;
const ANOMALIES_PER_BATCH: usize = 6;

/// Writes (or reuses) the drifted trays under `folder`: `before/<split>/` and `after/<split>/`.
pub fn drifted_trays(folder: &Path, image_size: u32) -> anyhow::Result<DriftedTrays> {
    let recipe = Recipe {
        synth: SynthConfig {
            // The first act's line is seed 7: these are trays the model has never seen.
            seed: 8,
            image_size,
            train: 1,
            validation: 0,
            test_good: 2 * GOOD_PER_BATCH,
            test_logical: 2 * ANOMALIES_PER_BATCH,
            test_structural: 2 * ANOMALIES_PER_BATCH,
        },
        light: 20,
    };
    let marker = folder.join("drift.json");
    let existing: Option<Recipe> = std::fs::read_to_string(&marker).ok().and_then(|t| serde_json::from_str(&t).ok());
    if existing.as_ref() != Some(&recipe) {
        log::info!("act 2: photographing another day's trays under brighter light into {}", folder.display());
        if folder.exists() {
            std::fs::remove_dir_all(folder).with_context(|| format!("replacing {}", folder.display()))?;
        }
        let source = folder.join("source");
        super::super::synth::generate(&recipe.synth, &source)?;
        for split in SPLITS {
            let images = lineguard::data::loco::list_images(&source.join("test").join(split))?;
            let half = images.len() / 2;
            for (batch, images) in [("before", &images[..half]), ("after", &images[half..])] {
                let out = folder.join(batch).join(split);
                std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
                for path in images {
                    relight(path, &out.join(path.file_name().unwrap_or_default()), recipe.light)?;
                }
            }
        }
        std::fs::remove_dir_all(&source).with_context(|| format!("removing {}", source.display()))?;
        std::fs::write(&marker, serde_json::to_string_pretty(&recipe)?)?;
    }
    Ok(DriftedTrays {
        before: super::shuffled_trays(&folder.join("before"), 8)?,
        after: super::shuffled_trays(&folder.join("after"), 9)?,
    })
}

fn relight(from: &Path, to: &Path, light: u8) -> anyhow::Result<()> {
    let mut image = lineguard::data::preprocess::load_image(from)?;
    for channel in image.iter_mut() {
        *channel = channel.saturating_add(light);
    }
    image.save(to).with_context(|| format!("writing {}", to.display()))
}
