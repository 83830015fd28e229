//! The three networks of EfficientAD-S: the patch description network (PDN) that serves as teacher and
//! student, and the autoencoder in EfficientAD's plain and DFSC's InstanceNorm variants.

use tch::nn::{self, Module};
use tch::{Kind, Tensor};

use super::config::AutoencoderVariant;

/// A 2-D convolution that can also compute in a narrower format than its weights (mixed-precision
/// training): input and a cast copy of the weights go in as `compute`, the output comes back as f32, and
/// gradients flow back through the casts to the f32 weights, which the optimiser keeps updating in f32.
#[derive(Debug)]
struct Conv {
    layer: nn::Conv2D,
    stride: i64,
    padding: i64,
}

impl Conv {
    fn new(p: nn::Path, in_channels: i64, out_channels: i64, kernel: i64, stride: i64, padding: i64) -> Conv {
        let config = nn::ConvConfig { stride, padding, ..Default::default() };
        Conv { layer: nn::conv2d(p, in_channels, out_channels, kernel, config), stride, padding }
    }

    /// `compute` = `Kind::Float`: in the weights' own format (f32, or the narrower format a scoring model
    /// was converted to).
    fn forward(&self, xs: &Tensor, compute: Kind) -> Tensor {
        if compute == Kind::Float {
            return xs.apply(&self.layer);
        }
        let bias = self.layer.bs.as_ref().map(|b| b.to_kind(compute));
        xs.to_kind(compute)
            .conv2d(&self.layer.ws.to_kind(compute), bias, [self.stride; 2], [self.padding; 2], [1, 1], 1)
            .to_kind(Kind::Float)
    }
}

/// PDN-S without padding: each output feature sees a 33x33 patch.
#[derive(Debug)]
pub struct Pdn {
    conv1: Conv,
    conv2: Conv,
    conv3: Conv,
    conv4: Conv,
}

impl Pdn {
    pub fn new(p: &nn::Path, out_channels: i64) -> Pdn {
        Pdn {
            conv1: Conv::new(p / "conv1", 3, 128, 4, 1, 0),
            conv2: Conv::new(p / "conv2", 128, 256, 4, 1, 0),
            conv3: Conv::new(p / "conv3", 256, 256, 3, 1, 0),
            conv4: Conv::new(p / "conv4", 256, out_channels, 4, 1, 0),
        }
    }

    /// The forward pass with its convolutions computing in `compute` (see [`Conv`]); f32 out.
    pub fn forward_in(&self, xs: &Tensor, compute: Kind) -> Tensor {
        let pool = |t: Tensor| t.avg_pool2d([2, 2], [2, 2], [0, 0], false, true, None::<i64>);
        let xs = pool(self.conv1.forward(xs, compute).relu());
        let xs = pool(self.conv2.forward(&xs, compute).relu());
        let xs = self.conv3.forward(&xs, compute).relu();
        self.conv4.forward(&xs, compute)
    }
}

impl Module for Pdn {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.forward_in(xs, Kind::Float)
    }
}

/// Encoder to a 64-channel 1x1 code, decoder by bilinear upsampling back to the feature side.
#[derive(Debug)]
pub struct Autoencoder {
    encoder: Vec<Conv>,
    decoder: Vec<Conv>,
    head_conv: Conv,
    output_conv: Conv,
    variant: AutoencoderVariant,
    upsample_sides: [i64; 7],
}

impl Autoencoder {
    pub fn new(p: &nn::Path, out_channels: i64, image_side: i64, variant: AutoencoderVariant) -> Autoencoder {
        let enc = p / "encoder";
        let encoder = vec![
            Conv::new(&enc / "conv1", 3, 32, 4, 2, 1),
            Conv::new(&enc / "conv2", 32, 32, 4, 2, 1),
            Conv::new(&enc / "conv3", 32, 64, 4, 2, 1),
            Conv::new(&enc / "conv4", 64, 64, 4, 2, 1),
            Conv::new(&enc / "conv5", 64, 64, 4, 2, 1),
            // Kernel 8 at 256 px; scaled with the input so the code stays 1x1 at other sizes.
            Conv::new(&enc / "conv6", 64, 64, image_side / 32, 1, 0),
        ];
        let dec = p / "decoder";
        let decoder = (1..=6).map(|i| Conv::new(&dec / format!("conv{i}"), 64, 64, 4, 1, 2)).collect();
        Autoencoder {
            encoder,
            decoder,
            head_conv: Conv::new(&dec / "conv7", 64, 64, 3, 1, 1),
            output_conv: Conv::new(&dec / "conv8", 64, out_channels, 3, 1, 1),
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
        self.forward_in(xs, train, Kind::Float)
    }

    /// The forward pass with its convolutions computing in `compute` (see [`Conv`]); f32 out.
    pub fn forward_in(&self, xs: &Tensor, train: bool, compute: Kind) -> Tensor {
        let last = self.encoder.len() - 1;
        let mut xs = xs.shallow_clone();
        for (i, conv) in self.encoder.iter().enumerate() {
            xs = conv.forward(&xs, compute);
            if i < last {
                xs = self.activate(xs);
            }
        }
        if self.variant == AutoencoderVariant::InstanceNorm {
            xs = xs.relu();
        }
        for (conv, side) in self.decoder.iter().zip(self.upsample_sides) {
            xs = conv.forward(&upsample(&xs, side), compute);
            xs = self.activate(xs).dropout(0.2, train);
        }
        xs = self.head_conv.forward(&upsample(&xs, self.upsample_sides[6]), compute);
        self.output_conv.forward(&self.activate(xs), compute)
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
    fn mixed_precision_convolutions_follow_f32_and_train_the_f32_weights() {
        tch::manual_seed(2);
        let vs = nn::VarStore::new(Device::Cpu);
        let pdn = Pdn::new(&vs.root(), 16);
        let ae = Autoencoder::new(&(&vs.root() / "ae"), 16, 128, AutoencoderVariant::InstanceNorm);
        // One image: on CPUs without native bf16 (AVX2 only) libtorch emulates it, many times slower.
        let x = Tensor::randn([1, 3, 128, 128], (Kind::Float, Device::Cpu));
        for (f32_out, bf16_out) in [
            (pdn.forward(&x), pdn.forward_in(&x, Kind::BFloat16)),
            (ae.forward_in(&x, false, Kind::Float), ae.forward_in(&x, false, Kind::BFloat16)),
        ] {
            assert_eq!(bf16_out.kind(), Kind::Float);
            let range = (f32_out.max() - f32_out.min()).double_value(&[]);
            let difference = (&bf16_out - &f32_out).abs();
            let (mean, max) = (difference.mean(Kind::Float).double_value(&[]), difference.max().double_value(&[]));
            // bf16 keeps 8 significant bits; through 14 random layers and instance norms the largest
            // error reaches a few hundredths of the range, the mean stays far below.
            assert!(mean > 0.0 && mean < 0.01 * range && max < 0.1 * range, "mean {mean}, max {max} of {range}");
        }
        pdn.forward_in(&x, Kind::BFloat16).square().sum(Kind::Float).backward();
        for (name, weight) in vs.variables() {
            if name.starts_with("conv") {
                let grad = weight.grad();
                assert!(grad.defined() && grad.kind() == Kind::Float, "{name}");
                assert!(grad.abs().sum(Kind::Float).double_value(&[]) > 0.0, "{name}");
            }
        }
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
