//! Resuming from a checkpoint continues exactly where an uninterrupted run would be.
//!
//! One test in its own binary on purpose: libtorch's CPU reductions split work by the threads available, so two
//! identical runs only agree bit for bit when no other test competes for the cores.

use lineguard::model::config::{Preset, Recipe};
use lineguard::model::train::Trainer;
use tch::{Device, Kind, Tensor};

fn tiny_recipe(preset: Preset, steps: u64) -> Recipe {
    let mut recipe = Recipe::preset(preset);
    recipe.image_size = 128;
    recipe.channels = 8;
    recipe.train.steps = steps;
    recipe
}

fn images(n: i64) -> Tensor {
    tch::manual_seed(3);
    Tensor::randn([n, 3, 128, 128], (Kind::Float, Device::Cpu))
}

fn run_to_end(mut trainer: Trainer) -> Trainer {
    while !trainer.is_done() {
        trainer.step().unwrap();
    }
    trainer
}

#[test]
fn resumed_training_equals_uninterrupted_training() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = dir.path().join("ckpt.safetensors");
    for preset in [Preset::Dfsc, Preset::EfficientadS] {
        let recipe = tiny_recipe(preset, 4);
        let straight = run_to_end(Trainer::new(recipe.clone(), images(3), Device::Cpu).unwrap());

        let mut first_half = Trainer::new(recipe, images(3), Device::Cpu).unwrap();
        first_half.step().unwrap();
        first_half.step().unwrap();
        first_half.save_checkpoint(&checkpoint).unwrap();
        drop(first_half);
        let resumed = Trainer::resume(&checkpoint, images(3), Device::Cpu).unwrap();
        assert_eq!(resumed.step, 2);
        let resumed = run_to_end(resumed);

        let (a, b) = (straight.parameters(), resumed.parameters());
        assert_eq!(a.len(), b.len());
        for (name, value) in &a {
            assert!(value.equal(&b[name]), "{preset:?}: {name} differs after resuming");
        }
        // The EMA student and the optimiser moments were restored too: the served models agree.
        let validation = images(2);
        let fa = straight.finish(&validation, 1).unwrap();
        let fb = resumed.finish(&validation, 1).unwrap();
        assert_eq!(fa.map_quantiles, fb.map_quantiles);
        let x = images(1);
        assert!(fa.anomaly_maps(&x, 64, 64).unwrap().equal(&fb.anomaly_maps(&x, 64, 64).unwrap()));

        // A finished model is no checkpoint: resuming it is refused with a reason.
        let model_path = dir.path().join("model.safetensors");
        fa.save(&model_path).unwrap();
        let err = Trainer::resume(&model_path, images(1), Device::Cpu).err().unwrap().to_string();
        assert!(err.contains("not a training checkpoint"), "{err}");
    }
}
