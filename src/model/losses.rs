//! The training losses of EfficientAD-S and the DFSC margin loss. Inputs are feature maps [B, C, H, W];
//! the reference trains at batch 1, and larger batches pool their elements into one quantile.

use tch::{Kind, Tensor};

use super::config::{DfscConfig, DfscOrder, DfscSelection};

/// Norms below this are treated as zero when L2-normalising (as `F.normalize`'s eps).
const NORMALISE_EPS: f64 = 1e-8;

/// Mean of the squared differences at or above their `quantile`: the student only chases the hardest
/// features, so it cannot spend its capacity on regions it already imitates well.
pub fn hard_feature_loss(teacher: &Tensor, student: &Tensor, quantile: f64) -> Tensor {
    let squared = (teacher - student).square();
    let threshold = quantile_of(&squared.detach(), quantile);
    let hardest = squared.detach().ge_tensor(&threshold);
    mean_where(&squared, &hardest, squared.device().is_cuda())
}

/// Mean of `values` where `mask` is set. With `fixed_shape` (GPUs), a masked mean: `masked_select`'s size
/// is data-dependent, and reading it would make CUDA wait for the forward pass in the middle of every
/// training step. It sums in another order, so CPUs keep `masked_select` (see `optim::AdamW::fused` for
/// why CPU runs keep their rounding).
fn mean_where(values: &Tensor, mask: &Tensor, fixed_shape: bool) -> Tensor {
    if fixed_shape {
        let weights = mask.to_kind(Kind::Float);
        (values * &weights).sum(Kind::Float) / weights.sum(Kind::Float)
    } else {
        values.masked_select(mask).mean(Kind::Float)
    }
}

/// Plain mean squared error, used for the autoencoder (target: teacher) and the student's autoencoder
/// channels (target: autoencoder).
pub fn mse(target: &Tensor, prediction: &Tensor) -> Tensor {
    (target - prediction).square().mean(Kind::Float)
}

/// EfficientAD's penalty on natural images: keeps the student from reproducing the teacher off-domain.
pub fn imagenet_penalty(student_on_natural_image: &Tensor) -> Tensor {
    student_on_natural_image.square().mean(Kind::Float)
}

/// The DFSC term of one step and how much of it acts.
pub struct DfscTerm {
    /// The hinge averaged over the locations that keep at least one distinctive feature (before α).
    pub loss: Tensor,
    /// Share of those locations whose hinge is positive (0-d): where the margin still pushes. A term whose
    /// share falls to zero has stopped shaping the autoencoder, whatever its weight.
    pub active_share: Tensor,
}

/// The Distinctive Feature Separation Constraint: at the "distinctive" features, push the directions of
/// the pair at least `margin` apart, so the autoencoder cannot learn to copy novel teacher features and
/// logical anomalies stay visible in the autoencoder map.
///
/// `target` is the first member of the pair (normalised teacher output by default) and `prediction` the
/// second (the autoencoder output). `distinctiveness` ([B, C, H, W], detached) is the squared difference
/// map whose top quantile marks the distinctive features: the pair's own difference
/// ([`pair_distinctiveness`]) or the teacher–student one, as `config.source` says.
pub fn dfsc_loss(target: &Tensor, prediction: &Tensor, distinctiveness: &Tensor, config: &DfscConfig) -> DfscTerm {
    let delta = distinctiveness.detach();
    // Mask [B, C, H, W] (element selection) or [B, 1, H, W] (location selection), 1.0 where distinctive.
    let mask = match config.selection {
        DfscSelection::Element => {
            let tau = quantile_of(&delta, config.quantile);
            delta.ge_tensor(&tau).to_kind(Kind::Float)
        }
        DfscSelection::Location => {
            let per_location = delta.mean_dim(1, true, Kind::Float);
            let tau = quantile_of(&per_location, config.quantile);
            per_location.ge_tensor(&tau).to_kind(Kind::Float)
        }
    };
    let (t, a) = match config.order {
        DfscOrder::NormaliseThenMask => {
            (l2_normalise_channels(target) * &mask, l2_normalise_channels(prediction) * &mask)
        }
        DfscOrder::MaskThenNormalise => {
            (l2_normalise_channels(&(target * &mask)), l2_normalise_channels(&(prediction * &mask)))
        }
    };
    // The clamp keeps sqrt's gradient finite at locations where everything was masked out; those
    // locations are excluded from the mean below anyway.
    let distance = (t - a).square().sum_dim_intlist(1, true, Kind::Float).clamp_min(1e-12).sqrt();
    let kept = mask.amax(1, true).gt(0.0).to_kind(Kind::Float);
    let hinge = (config.margin - distance).relu() * &kept;
    let kept_count = kept.sum(Kind::Float).clamp_min(1.0);
    let active = hinge.detach().gt(0.0).to_kind(Kind::Float).sum(Kind::Float);
    DfscTerm { loss: hinge.sum(Kind::Float) / &kept_count, active_share: active / kept_count }
}

/// The pair's own squared difference, detached: DFSC's distinctiveness map for `DfscSource::Pair`.
pub fn pair_distinctiveness(target: &Tensor, prediction: &Tensor) -> Tensor {
    (target.detach() - prediction.detach()).square()
}

/// Unit vectors along the channel dimension at every location.
pub fn l2_normalise_channels(xs: &Tensor) -> Tensor {
    // Clamping before the square root keeps the gradient finite for all-zero vectors.
    let squared_norm = xs.square().sum_dim_intlist(1, true, Kind::Float).clamp_min(NORMALISE_EPS * NORMALISE_EPS);
    xs * squared_norm.rsqrt()
}

/// Linear-interpolation quantile over all elements, as a 0-d tensor. torch.quantile refuses inputs above
/// 16M elements, so large inputs fall back to an exact sort.
pub fn quantile_of(xs: &Tensor, q: f64) -> Tensor {
    let flat = xs.flatten(0, -1);
    let n = flat.size()[0];
    if n <= 16_000_000 {
        return flat.quantile_scalar(q, None::<i64>, false, "linear");
    }
    let (sorted, _) = flat.sort(0, false);
    let position = q * (n - 1) as f64;
    let low = position.floor() as i64;
    let high = (low + 1).min(n - 1);
    let weight = position - low as f64;
    sorted.get(low) * (1.0 - weight) + sorted.get(high) * weight
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::DfscPair;
    use tch::Device;

    fn t(values: &[f32], shape: &[i64]) -> Tensor {
        Tensor::from_slice(values).reshape(shape)
    }

    fn scalar(x: &Tensor) -> f64 {
        x.double_value(&[])
    }

    /// The DFSC loss with the pair's own difference as the distinctiveness map (the `pair` source).
    fn pair_loss(target: &Tensor, prediction: &Tensor, config: &DfscConfig) -> Tensor {
        dfsc_loss(target, prediction, &pair_distinctiveness(target, prediction), config).loss
    }

    fn config(margin: f64, quantile: f64) -> DfscConfig {
        DfscConfig { margin, quantile, pair: DfscPair::TeacherAutoencoder, ..DfscConfig::default() }
    }

    #[test]
    fn hard_loss_averages_only_the_hardest_differences() {
        // Squared differences 0, 1, 4, 9. quantile(0.5) with linear interpolation = 2.5, so 4 and 9 count:
        // mean = 6.5.
        let teacher = t(&[0.0, 1.0, 2.0, 3.0], &[1, 4, 1, 1]);
        let student = Tensor::zeros([1, 4, 1, 1], (Kind::Float, Device::Cpu));
        assert!((scalar(&hard_feature_loss(&teacher, &student, 0.5)) - 6.5).abs() < 1e-6);
        // At quantile 0 every element counts: (0+1+4+9)/4 = 3.5.
        assert!((scalar(&hard_feature_loss(&teacher, &student, 0.0)) - 3.5).abs() < 1e-6);
    }

    /// The GPU's fixed-shape reading, checked here since no GPU runs the tests: same value and gradient.
    #[test]
    fn the_masked_mean_equals_masked_select_in_value_and_gradient() {
        tch::manual_seed(3);
        let values = Tensor::randn([2, 8, 5, 5], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let mask = values.detach().gt(0.7);
        let gradient_of = |fixed_shape: bool| {
            let loss = mean_where(&values.square(), &mask, fixed_shape);
            let gradient = Tensor::run_backward(&[&loss], &[&values], false, false).remove(0);
            (loss.double_value(&[]), gradient)
        };
        let ((select, select_gradient), (masked, masked_gradient)) = (gradient_of(false), gradient_of(true));
        assert!((select - masked).abs() < 1e-6, "{select} vs {masked}");
        assert!(select_gradient.allclose(&masked_gradient, 1e-6, 1e-7, false));
        assert!(masked_gradient.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    #[test]
    fn mse_and_penalty_are_plain_means() {
        let a = t(&[1.0, 2.0], &[1, 2, 1, 1]);
        let b = t(&[0.0, 0.0], &[1, 2, 1, 1]);
        assert!((scalar(&mse(&a, &b)) - 2.5).abs() < 1e-6);
        assert!((scalar(&imagenet_penalty(&a)) - 2.5).abs() < 1e-6);
    }

    #[test]
    fn normalisation_gives_unit_vectors_and_leaves_zero_vectors_at_zero() {
        // Two locations: (3, 4) → (0.6, 0.8); (0, 0) stays (0, 0) thanks to eps.
        let x = t(&[3.0, 0.0, 4.0, 0.0], &[1, 2, 1, 2]);
        let n = l2_normalise_channels(&x);
        let got: Vec<f32> = Vec::try_from(n.flatten(0, -1)).unwrap();
        assert_eq!(got, vec![0.6, 0.0, 0.8, 0.0]);
    }

    #[test]
    fn dfsc_hinge_is_zero_beyond_the_margin_and_linear_inside() {
        // One location, two channels. Target (1, 0), prediction (0, 1): unit vectors sqrt(2) apart.
        let target = t(&[1.0, 0.0], &[1, 2, 1, 1]);
        let prediction = t(&[0.0, 1.0], &[1, 2, 1, 1]);
        // Quantile 0: every element is distinctive. Margin 2 → 2 - sqrt(2).
        let loss = pair_loss(&target, &prediction, &config(2.0, 0.0));
        assert!((scalar(&loss) - (2.0 - 2f64.sqrt())).abs() < 1e-6);
        // Margin 1 < sqrt(2): already separated, no loss.
        assert_eq!(scalar(&pair_loss(&target, &prediction, &config(1.0, 0.0))), 0.0);
        // Identical directions: distance 0, loss = margin.
        let same = t(&[2.0, 0.0], &[1, 2, 1, 1]);
        assert!((scalar(&pair_loss(&target, &same, &config(0.4, 0.0))) - 0.4).abs() < 1e-5);
    }

    #[test]
    fn dfsc_mask_keeps_only_distinctive_elements_and_their_locations() {
        // Two locations, two channels, laid out [B=1, C=2, H=1, W=2]:
        //   location 0: target (1, 0), prediction (1, 0)   → squared diffs (0, 0)
        //   location 1: target (1, 0), prediction (0, 1)   → squared diffs (1, 1)
        // With quantile 0.5 over the four diffs (0, 0, 1, 1) τ = 0.5, so only location 1 survives.
        // Normalise then mask: t̃ = (1, 0), ã = (0, 1) at location 1, distance sqrt(2).
        // Margin 2: loss = (2 - sqrt(2)) averaged over the one kept location (location 0 is excluded,
        // although its hinge would have been 2).
        let target = t(&[1.0, 1.0, 0.0, 0.0], &[1, 2, 1, 2]);
        let prediction = t(&[1.0, 0.0, 0.0, 1.0], &[1, 2, 1, 2]);
        let loss = pair_loss(&target, &prediction, &config(2.0, 0.5));
        assert!((scalar(&loss) - (2.0 - 2f64.sqrt())).abs() < 1e-6, "{}", scalar(&loss));

        // Location selection reads the channel mean of the diffs (0, 1): τ = 0.5 keeps location 1 again.
        let by_location = DfscConfig { selection: DfscSelection::Location, ..config(2.0, 0.5) };
        assert!((scalar(&pair_loss(&target, &prediction, &by_location)) - (2.0 - 2f64.sqrt())).abs() < 1e-6);
    }

    #[test]
    fn dfsc_from_the_teacher_student_map_binds_where_the_pair_is_close() {
        // Two locations, two channels [B=1, C=2, H=1, W=2]:
        //   location 0: target (1, 0), prediction (1, 0)   → the autoencoder copies the teacher
        //   location 1: target (1, 0), prediction (0, 1)   → already sqrt(2) apart
        let target = t(&[1.0, 1.0, 0.0, 0.0], &[1, 2, 1, 2]);
        let prediction = t(&[1.0, 0.0, 0.0, 1.0], &[1, 2, 1, 2]);
        // The pair's own difference selects location 1, where the margin already holds: nothing acts.
        let own = dfsc_loss(&target, &prediction, &pair_distinctiveness(&target, &prediction), &config(0.4, 0.5));
        assert_eq!(scalar(&own.loss), 0.0);
        assert_eq!(scalar(&own.active_share), 0.0);
        // A teacher–student map that finds location 0 distinctive (both channels) selects the copied
        // features: the hinge is the whole margin there.
        let teacher_student = t(&[1.0, 0.0, 1.0, 0.0], &[1, 2, 1, 2]);
        let bound = dfsc_loss(&target, &prediction, &teacher_student, &config(0.4, 0.5));
        assert!((scalar(&bound.loss) - 0.4).abs() < 1e-5, "{}", scalar(&bound.loss));
        assert_eq!(scalar(&bound.active_share), 1.0);
    }

    #[test]
    fn dfsc_active_share_counts_the_kept_locations_that_still_push() {
        // Same pair; quantile 0 keeps both locations. Margin 1: location 0 (distance 0) pushes with 1,
        // location 1 (distance sqrt 2) does not. Loss (1 + 0) / 2, active share 1 / 2.
        let target = t(&[1.0, 1.0, 0.0, 0.0], &[1, 2, 1, 2]);
        let prediction = t(&[1.0, 0.0, 0.0, 1.0], &[1, 2, 1, 2]);
        let term = dfsc_loss(&target, &prediction, &pair_distinctiveness(&target, &prediction), &config(1.0, 0.0));
        assert!((scalar(&term.loss) - 0.5).abs() < 1e-6);
        assert_eq!(scalar(&term.active_share), 0.5);
    }

    #[test]
    fn dfsc_mask_order_matters_when_some_channels_are_dropped() {
        // One location, three channels. Squared diffs (0, 1, 4): quantile 0.5 → τ = 1 keeps channels 1, 2.
        // target (1, 1, 2), prediction (1, 0, 0).
        // Normalise then mask: t = (1,1,2)/√6 → (0, 1/√6, 2/√6); a = (1,0,0) → (0, 0, 0);
        //   distance = sqrt(5/6).
        // Mask then normalise: t = (0,1,2)/√5; a = (0,0,0) stays 0; distance = 1.
        let target = t(&[1.0, 1.0, 2.0], &[1, 3, 1, 1]);
        let prediction = t(&[1.0, 0.0, 0.0], &[1, 3, 1, 1]);
        let first = pair_loss(&target, &prediction, &config(2.0, 0.5));
        assert!((scalar(&first) - (2.0 - (5.0f64 / 6.0).sqrt())).abs() < 1e-5, "{}", scalar(&first));
        let mask_first = DfscConfig { order: DfscOrder::MaskThenNormalise, ..config(2.0, 0.5) };
        assert!((scalar(&pair_loss(&target, &prediction, &mask_first)) - 1.0).abs() < 1e-5);
    }

    #[test]
    fn dfsc_gradient_pushes_the_prediction_away_and_stays_finite() {
        let target = t(&[1.0, 0.0, 0.0, 0.0], &[1, 2, 1, 2]);
        let prediction = t(&[0.9, 0.0, 0.1, 0.0], &[1, 2, 1, 2]).set_requires_grad(true);
        let loss = pair_loss(&target, &prediction, &config(1.0, 0.0));
        loss.backward();
        let grad = prediction.grad();
        assert!(bool::try_from(grad.isfinite().all()).unwrap(), "gradient must be finite: {grad:?}");
        // Moving the prediction along its gradient would shrink the distance: the step -grad grows it.
        let stepped = prediction.detach() - grad * 0.1;
        let after = pair_loss(&target, &stepped, &config(1.0, 0.0));
        assert!(scalar(&after) < scalar(&loss));
    }

    #[test]
    fn quantile_interpolates_linearly() {
        let xs = Tensor::arange(11, (Kind::Float, Device::Cpu));
        assert!((scalar(&quantile_of(&xs, 0.95)) - 9.5).abs() < 1e-6);
    }
}
