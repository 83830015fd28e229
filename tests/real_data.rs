//! The loaders on real MVTec LOCO images (juice_bottle at half resolution, ../shared/datasets).

mod common;

use lineguard::data::loco::{load_inputs, LocoDataset, Split};
use lineguard::eval::metrics;
use lineguard::model::config::{Preset, Recipe};
use lineguard::model::train::Trainer;
use tch::Device;

#[test]
fn juice_bottle_layout_ground_truth_and_scoring() {
    let Some(root) = common::shared_dataset("mvtec_loco_juice_bottle") else { return };
    let dataset = LocoDataset::open(&root).unwrap();
    assert_eq!(dataset.train.len(), 250);
    assert_eq!(dataset.validation.len(), 54);
    assert_eq!(dataset.test_good.len(), 42);
    assert_eq!(dataset.test_logical.len(), 71);
    assert!(dataset.test_structural.is_empty(), "this copy has no structural anomalies");

    // Every logical anomaly has a region; absolute saturations are scaled for the half-size masks.
    let defects = metrics::load_defects_config(&dataset.defects_config()).unwrap();
    let (width, height) = image::image_dimensions(&dataset.test_logical[0]).unwrap();
    assert_eq!((width, height), (400, 800));
    for image in &dataset.test_logical {
        let dir = dataset.ground_truth_dir(Split::TestLogical, image).unwrap();
        let regions = metrics::load_regions(&dir, &defects, 0.25, (width, height)).unwrap();
        assert!(!regions.is_empty(), "{}", dir.display());
        for region in &regions {
            assert!(region.saturation <= 70_400.0 * 0.25 && region.saturation <= region.pixels.len() as f64);
        }
    }

    // Real JPEGs through preprocessing and a (barely trained) model: finite maps at the original size.
    let train = load_inputs(&dataset.train[..4], 128, &|| {}).unwrap();
    assert_eq!(train.size(), vec![4, 3, 128, 128]);
    let validation = load_inputs(&dataset.validation[..2], 128, &|| {}).unwrap();
    let mut recipe = Recipe { image_size: 128, ..Recipe::preset(Preset::Dfsc) };
    recipe.train.steps = 1;
    let mut trainer = Trainer::new(recipe, train, Device::Cpu).unwrap();
    trainer.step().unwrap();
    let model = trainer.finish(&validation, 1).unwrap();
    let scored = lineguard::eval::score_image(&model, &dataset.test_logical[0]).unwrap();
    assert_eq!(scored.map.len(), (width * height) as usize);
    assert!(scored.map.iter().all(|v| v.is_finite()) && scored.score.is_finite());
}
