//! The three networks of EfficientAD-S: the patch description network (PDN) that serves as teacher and
//! student, and the autoencoder in EfficientAD's plain and DFSC's InstanceNorm variants.

use tch::nn::{self, Module};
use tch::Tensor;

use super::config::AutoencoderVariant;

/// PDN-S without padding: each output feature sees a 33x33 patch.
#[derive(Debug)]
pub struct Pdn {
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    conv3: nn::Conv2D,
    conv4: nn::Conv2D,
}

impl Pdn {
    pub fn new(p: &nn::Path, out_channels: i64) -> Pdn {
        let plain = nn::ConvConfig::default();
        Pdn {
            conv1: nn::conv2d(p / "conv1", 3, 128, 4, plain),
            conv2: nn::conv2d(p / "conv2", 128, 256, 4, plain),
            conv3: nn::conv2d(p / "conv3", 256, 256, 3, plain),
            conv4: nn::conv2d(p / "conv4", 256, out_channels, 4, plain),
        }
    }
}

impl Module for Pdn {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let pool = |t: Tensor| t.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>);
        let xs = pool(xs.apply(&self.conv1).relu());
        let xs = pool(xs.apply(&self.conv2).relu());
        let xs = xs.apply(&self.conv3).relu();
        xs.apply(&self.conv4)
    }
}

/// Encoder to a 64-channel 1x1 code, decoder by bilinear upsampling back to the feature side.
#[derive(Debug)]
pub struct Autoencoder {
    encoder: Vec<nn::Conv2D>,
    decoder: Vec<nn::Conv2D>,
    head_conv: nn::Conv2D,
    output_conv: nn::Conv2D,
    variant: AutoencoderVariant,
    upsample_sides: [i64; 7],
}

impl Autoencoder {
    pub fn new(p: &nn::Path, out_channels: i64, image_side: i64, variant: AutoencoderVariant) -> Autoencoder {
        let strided = nn::ConvConfig { stride: 2, padding: 1, ..Default::default() };
        let enc = p / "encoder";
        let encoder = vec![
            nn::conv2d(&enc / "conv1", 3, 32, 4, strided),
            nn::conv2d(&enc / "conv2", 32, 32, 4, strided),
            nn::conv2d(&enc / "conv3", 32, 64, 4, strided),
            nn::conv2d(&enc / "conv4", 64, 64, 4, strided),
            nn::conv2d(&enc / "conv5", 64, 64, 4, strided),
            // Kernel 8 at 256 px; scaled with the input so the code stays 1x1 at other sizes.
            nn::conv2d(&enc / "conv6", 64, 64, image_side / 32, nn::ConvConfig::default()),
        ];
        let dec = p / "decoder";
        let padded = nn::ConvConfig { padding: 2, ..Default::default() };
        let decoder = (1..=6).map(|i| nn::conv2d(&dec / format!("conv{i}"), 64, 64, 4, padded)).collect();
        let same = nn::ConvConfig { padding: 1, ..Default::default() };
        Autoencoder {
            encoder,
            decoder,
            head_conv: nn::conv2d(&dec / "conv7", 64, 64, 3, same),
            output_conv: nn::conv2d(&dec / "conv8", 64, out_channels, 3, same),
            variant,
            upsample_sides: upsample_sides(image_side),
        }
    }

    fn activate(&self, xs: Tensor) -> Tensor {
        match self.variant {
            AutoencoderVariant::Plain => xs.relu(),
            AutoencoderVariant::InstanceNorm => instance_norm(&xs).relu(),
        }
    }

    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let last = self.encoder.len() - 1;
        let mut xs = xs.shallow_clone();
        for (i, conv) in self.encoder.iter().enumerate() {
            xs = xs.apply(conv);
            if i < last {
                xs = self.activate(xs);
            }
        }
        if self.variant == AutoencoderVariant::InstanceNorm {
            xs = xs.relu();
        }
        for (conv, side) in self.decoder.iter().zip(self.upsample_sides) {
            xs = upsample(&xs, side).apply(conv);
            xs = self.activate(xs).dropout(0.2, train);
        }
        xs = upsample(&xs, self.upsample_sides[6]).apply(&self.head_conv);
        self.activate(xs).apply(&self.output_conv)
    }
}

/// Decoder upsampling sides for a square input (anomalib's generalisation of 3, 8, 15, 32, 63, 127, 56).
pub fn upsample_sides(image_side: i64) -> [i64; 7] {
    let h = image_side;
    [h / 64 - 1, h / 32, h / 16 - 1, h / 8, h / 4 - 1, h / 2 - 1, (h + 3) / 4 - 8]
}

fn upsample(xs: &Tensor, side: i64) -> Tensor {
    xs.upsample_bilinear2d([side, side], false, None::<f64>, None::<f64>)
}

/// Affine-free instance normalisation, as `nn.InstanceNorm2d` with its defaults.
fn instance_norm(xs: &Tensor) -> Tensor {
    xs.instance_norm(None::<Tensor>, None, None, None, true, 0.1, 1e-5, false)
}

/// Number of parameters under a variable store (used to assert the published sizes).
pub fn parameter_count(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables().iter().map(Tensor::numel).map(|n| n as i64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn teacher_and_student_have_the_published_parameter_counts() {
        let teacher = nn::VarStore::new(Device::Cpu);
        let _ = Pdn::new(&teacher.root(), 384);
        assert_eq!(parameter_count(&teacher), 2_694_144);
        let student = nn::VarStore::new(Device::Cpu);
        let _ = Pdn::new(&student.root(), 768);
        assert_eq!(parameter_count(&student), 4_267_392);
    }

    #[test]
    fn shapes_follow_the_reference_table() {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let pdn = Pdn::new(&vs.root(), 384);
        for (side, feature) in [(256_i64, 56_i64), (128, 24)] {
            let x = Tensor::randn([1, 3, side, side], (Kind::Float, Device::Cpu));
            assert_eq!(pdn.forward(&x).size(), vec![1, 384, feature, feature]);
            for variant in [AutoencoderVariant::Plain, AutoencoderVariant::InstanceNorm] {
                let ae_vs = nn::VarStore::new(Device::Cpu);
                let ae = Autoencoder::new(&ae_vs.root(), 384, side, variant);
                assert_eq!(ae.forward_t(&x, false).size(), vec![1, 384, feature, feature], "{variant:?} {side}");
            }
        }
        assert_eq!(upsample_sides(256), [3, 8, 15, 32, 63, 127, 56]);
    }

    #[test]
    fn instance_norm_variant_has_no_extra_parameters_but_behaves_differently() {
        tch::manual_seed(1);
        let a = nn::VarStore::new(Device::Cpu);
        let plain = Autoencoder::new(&a.root(), 8, 128, AutoencoderVariant::Plain);
        let mut b = nn::VarStore::new(Device::Cpu);
        let normed = Autoencoder::new(&b.root(), 8, 128, AutoencoderVariant::InstanceNorm);
        assert_eq!(parameter_count(&a), parameter_count(&b));
        b.copy(&a).unwrap();
        let x = Tensor::randn([1, 3, 128, 128], (Kind::Float, Device::Cpu));
        let diff = (plain.forward_t(&x, false) - normed.forward_t(&x, false)).abs().max().double_value(&[]);
        assert!(diff > 1e-4, "the InstanceNorm variant must change the output, diff {diff}");
    }
}
