//! Training is a pure function of its state: resuming from a checkpoint continues exactly where an
//! uninterrupted run would be, and reading the losses late (`step_deferred`, as `train` does) changes nothing.
//!
//! One test in its own binary on purpose: libtorch's CPU reductions split work by the threads available, and
//! the autoencoder's dropout draws from libtorch's global generator, so two identical runs only agree bit
//! for bit when no other test runs beside them.

use lineguard::model::config::{Preset, Recipe};
use lineguard::model::train::{PendingLosses, StepLosses, Trainer};
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
fn training_is_a_pure_function_of_its_state() {
    resumed_training_equals_uninterrupted_training();
    deferred_reads_train_exactly_as_reads_after_every_step();
}

fn deferred_reads_train_exactly_as_reads_after_every_step() {
    let mut recipe = tiny_recipe(Preset::Dfsc, 6);
    recipe.train.augmentation = true;
    let mut read_each = Trainer::new(recipe.clone(), images(3), Device::Cpu).unwrap();
    let mut deferred = Trainer::new(recipe, images(3), Device::Cpu).unwrap();
    for trainer in [&mut read_each, &mut deferred] {
        trainer.dfsc_activity_every = 2;
    }
    let expected: Vec<StepLosses> = (0..6).map(|_| read_each.step().unwrap()).collect();
    let pending: Vec<PendingLosses> = (0..6).map(|_| deferred.step_deferred().unwrap()).collect();
    assert_eq!(pending.iter().map(PendingLosses::step).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4, 5]);
    let got: Vec<StepLosses> = pending.into_iter().map(|p| deferred.read(p).unwrap()).collect();
    for (step, (e, g)) in expected.iter().zip(&got).enumerate() {
        assert_eq!((e.total, e.dfsc, e.dfsc_activity), (g.total, g.dfsc, g.dfsc_activity), "step {step}");
    }
    assert!(got[4].dfsc_activity.is_some() && got[5].dfsc_activity.is_some() && got[3].dfsc_activity.is_none());
    let (a, b) = (read_each.parameters(), deferred.parameters());
    for (name, value) in &a {
        assert!(value.equal(&b[name]), "{name} differs when the losses are read late");
    }
    let (a, b) = (read_each.finish(&images(1), 1).unwrap(), deferred.finish(&images(1), 1).unwrap());
    assert!(b.info.dfsc_activity.is_some());
    assert_eq!(a.info.dfsc_activity, b.info.dfsc_activity, "the activity summary is recorded at read time");
}

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
