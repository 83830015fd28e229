//! How much the DFSC term acts during training. A margin loss can be present in the total and still do
//! nothing: when the selected features are already further apart than the margin its hinge is zero and
//! so is its gradient. These readings make that visible in the training log and keep a summary in the
//! model file, so every run says whether its DFSC term shaped the autoencoder.

use serde::{Deserialize, Serialize};

/// One step's reading.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct DfscActivity {
    /// Share of the selected locations whose hinge is positive.
    pub active_share: f64,
    /// L2 norm of the gradient that α·L_dfsc sends into the autoencoder's output.
    pub gradient_norm: f64,
    /// L2 norm of the gradient that the autoencoder loss (MSE to the teacher) sends into the same output:
    /// the force DFSC works against.
    pub autoencoder_gradient_norm: f64,
}

/// Means over the readings of the last quarter of a run's steps (the state the served model was trained
/// into), stored in the model file's `info`. The trainer reads the term every few steps (see
/// `Trainer::dfsc_activity_every`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DfscActivitySummary {
    /// First and last step read, and how many readings the means hold.
    pub from_step: u64,
    pub to_step: u64,
    pub readings: u64,
    /// Mean DFSC term before α.
    pub mean_loss: f64,
    pub mean_active_share: f64,
    pub mean_gradient_norm: f64,
    pub mean_autoencoder_gradient_norm: f64,
}

impl DfscActivitySummary {
    /// First step of the last quarter (rounded so that a short run has one).
    pub fn last_quarter_from(total_steps: u64) -> u64 {
        total_steps - total_steps.div_ceil(4)
    }

    /// Adds step `step` of a run of `total_steps` to `summary`, which starts at the first reading of the
    /// last quarter. Steps before it are not counted; when the run grows (a resumed run with more steps)
    /// the last quarter moves and the tally starts over.
    pub fn record(summary: &mut Option<Self>, step: u64, total_steps: u64, loss: f64, reading: &DfscActivity) {
        let last_quarter_from = Self::last_quarter_from(total_steps);
        if step < last_quarter_from {
            return;
        }
        let tally = summary.get_or_insert_with(Self::default);
        tally.add(step, last_quarter_from, loss, reading);
    }

    fn add(&mut self, step: u64, last_quarter_from: u64, loss: f64, reading: &DfscActivity) {
        if self.readings == 0 || self.from_step < last_quarter_from {
            *self = DfscActivitySummary { from_step: step, ..DfscActivitySummary::default() };
        }
        let n = self.readings as f64;
        let mean = |old: f64, new: f64| (old * n + new) / (n + 1.0);
        self.mean_loss = mean(self.mean_loss, loss);
        self.mean_active_share = mean(self.mean_active_share, reading.active_share);
        self.mean_gradient_norm = mean(self.mean_gradient_norm, reading.gradient_norm);
        self.mean_autoencoder_gradient_norm =
            mean(self.mean_autoencoder_gradient_norm, reading.autoencoder_gradient_norm);
        self.readings += 1;
        self.to_step = step;
    }

    /// One line for logs and reports.
    pub fn describe(&self) -> String {
        format!(
            "DFSC over steps {}..={} ({} readings): term {:.4}, hinge active at {:.0}% of the selected \
             locations, gradient {:.3e} vs the autoencoder loss's {:.3e}",
            self.from_step,
            self.to_step,
            self.readings,
            self.mean_loss,
            100.0 * self.mean_active_share,
            self.mean_gradient_norm,
            self.mean_autoencoder_gradient_norm
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(active_share: f64) -> DfscActivity {
        DfscActivity { active_share, gradient_norm: 2.0 * active_share, autoencoder_gradient_norm: 1.0 }
    }

    #[test]
    fn summary_averages_only_the_last_quarter() {
        let mut summary = None;
        for step in 0..8 {
            // Steps 0..6 are outside the last quarter of 8 and would drag the means to 1.0.
            let share = if step < 6 { 1.0 } else { 0.25 * (step - 5) as f64 };
            DfscActivitySummary::record(&mut summary, step, 8, share, &reading(share));
            assert_eq!(summary.is_some(), step >= 6, "no summary before the last quarter");
        }
        let summary = summary.unwrap();
        assert_eq!((summary.from_step, summary.to_step, summary.readings), (6, 7, 2));
        assert!((summary.mean_active_share - 0.375).abs() < 1e-12);
        assert!((summary.mean_loss - 0.375).abs() < 1e-12);
        assert!((summary.mean_gradient_norm - 0.75).abs() < 1e-12);
        assert_eq!(summary.mean_autoencoder_gradient_norm, 1.0);
    }

    #[test]
    fn a_longer_run_restarts_the_tally_at_its_new_last_quarter() {
        let mut summary = None;
        for step in 6..8 {
            DfscActivitySummary::record(&mut summary, step, 8, 1.0, &reading(1.0));
        }
        // Resumed with 16 steps in all: the last quarter now starts at 12.
        for step in 8..16 {
            DfscActivitySummary::record(&mut summary, step, 16, 0.0, &reading(0.0));
        }
        let summary = summary.unwrap();
        assert_eq!((summary.from_step, summary.to_step, summary.readings), (12, 15, 4));
        assert_eq!(summary.mean_active_share, 0.0);
    }

    #[test]
    fn a_short_run_has_a_last_quarter() {
        assert_eq!(DfscActivitySummary::last_quarter_from(3), 2);
        assert_eq!(DfscActivitySummary::last_quarter_from(8), 6);
        assert_eq!(DfscActivitySummary::last_quarter_from(600), 450);
        assert_eq!(DfscActivitySummary::last_quarter_from(0), 0);
    }
}
