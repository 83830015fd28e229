use lineguard::dataset::{load_inputs, LocoDataset};
use lineguard::eval::metrics::auroc;
use tch::{Device, Kind};
fn main() {
    lineguard::torch::init();
    let args: Vec<String> = std::env::args().collect();
    let model = lineguard::model::EfficientAd::load(std::path::Path::new(&args[1]), Device::Cpu).unwrap();
    let ds = LocoDataset::open(std::path::Path::new(&args[2])).unwrap();
    let side = model.recipe.image_size as u32;
    let mut res = vec![];
    for split in [&ds.test_good, &ds.test_logical, &ds.test_structural] {
        let x = load_inputs(split, side, &|| {}).unwrap();
        let maps = model.raw_maps(&x);
        let st: Vec<f32> = Vec::try_from(maps.student_teacher.flatten(1, -1).amax(1, false)).unwrap();
        let ae: Vec<f32> = Vec::try_from(maps.autoencoder.flatten(1, -1).amax(1, false)).unwrap();
        let stm: Vec<f32> = Vec::try_from(maps.student_teacher.flatten(1, -1).mean_dim(1, false, Kind::Float)).unwrap();
        let aem: Vec<f32> = Vec::try_from(maps.autoencoder.flatten(1, -1).mean_dim(1, false, Kind::Float)).unwrap();
        // trivial baseline: pixel distance to the mean training image
        res.push((st, ae, stm, aem));
    }
    let train = load_inputs(&ds.train, side, &|| {}).unwrap();
    let mean = train.mean_dim(0, true, Kind::Float);
    let mut triv = vec![];
    for split in [&ds.test_good, &ds.test_logical, &ds.test_structural] {
        let x = load_inputs(split, side, &|| {}).unwrap();
        let d: Vec<f32> = Vec::try_from((x - &mean).square().flatten(1, -1).mean_dim(1, false, Kind::Float)).unwrap();
        triv.push(d);
    }
    for (name, i) in [("logical", 1), ("structural", 2)] {
        println!("{name}: st-max {:.3} ae-max {:.3} st-mean {:.3} ae-mean {:.3} trivial {:.3}",
            auroc(&res[0].0, &res[i].0).unwrap(), auroc(&res[0].1, &res[i].1).unwrap(),
            auroc(&res[0].2, &res[i].2).unwrap(), auroc(&res[0].3, &res[i].3).unwrap(), auroc(&triv[0], &triv[i]).unwrap());
    }
    println!("quantiles {:?}", model.map_quantiles);
}
