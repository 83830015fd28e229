//! The replay buffer on disk: what the trainer learns from and what the promotion gate judges with.
//!
//! Four parts, each a folder of encoded images exactly as they arrived (`<seq>-<frame id hash>.img`):
//! - `recent/`: accepted frames, a sliding window of `buffer_frames` (the line as it looks now);
//! - `marked/`: frames operators marked normal, a window of `marked_frames` of their own, so the steady
//!   flow of accepted frames cannot push out the few frames a person judged; training draws them with a
//!   fixed share (see [`ReplayBuffer::training_set`]);
//! - `held_out/`: every `holdout_every`-th candidate (accepted or marked) instead, a window of
//!   `holdout_frames`, never trained on, so the gate sees frames the candidate has not memorised;
//! - `pinned/`: a fixed sample of the original training images, copied once. Even-numbered ones are
//!   replayed in training (the model must keep knowing the line it was built for), odd-numbered ones only
//!   judge candidates.
//!
//! Files are written atomically and the folders are the whole state, so a restarted trainer reopens the
//! same buffer. Frame ids are remembered (as hashes) so a redelivered frame is not stored twice.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::Tensor;

use super::RetrainError;
use crate::service::metrics::{CandidateOutcome, CandidateSource};

const PARTS: [&str; 4] = ["recent", "marked", "held_out", "pinned"];

#[derive(Debug, Clone, Copy)]
pub struct BufferLimits {
    /// The model's input side.
    pub side: u32,
    pub recent: usize,
    pub marked: usize,
    pub held_out: usize,
    pub holdout_every: usize,
}

/// Frames per part of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferCounts {
    pub recent: usize,
    pub marked: usize,
    pub held_out: usize,
    pub pinned: usize,
}

impl BufferCounts {
    /// Frames training may draw from besides the pinned originals.
    pub fn trainable(&self) -> usize {
        self.recent + self.marked
    }
}

/// The images training draws from, [N, 3, S, S], and how often each is drawn (relative weights, one per
/// image; None: all alike).
pub struct TrainingSet {
    pub images: Tensor,
    pub weights: Option<Vec<f64>>,
}

struct Entry {
    seq: u64,
    id: u64,
    path: PathBuf,
    /// Preprocessed [3, side, side], kept in memory so a training batch never waits for decoding.
    input: Tensor,
}

pub struct ReplayBuffer {
    root: PathBuf,
    limits: BufferLimits,
    recent: VecDeque<Entry>,
    marked: VecDeque<Entry>,
    held_out: VecDeque<Entry>,
    pinned: Vec<Entry>,
    ids: HashSet<u64>,
    next_seq: u64,
    changed: bool,
}

/// FNV-1a: stable across runs and platforms (std's hasher is neither).
pub fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3))
}

impl ReplayBuffer {
    /// Opens (or creates) the buffer under `root`, reloading every stored frame. Stored files that no
    /// longer decode are removed with a warning rather than stopping the trainer.
    pub fn open(root: &Path, limits: BufferLimits) -> Result<ReplayBuffer, RetrainError> {
        let mut buffer = ReplayBuffer {
            root: root.to_path_buf(),
            limits,
            recent: VecDeque::new(),
            marked: VecDeque::new(),
            held_out: VecDeque::new(),
            pinned: Vec::new(),
            ids: HashSet::new(),
            next_seq: 0,
            changed: true,
        };
        for part in PARTS {
            let folder = root.join(part);
            std::fs::create_dir_all(&folder).map_err(|source| RetrainError::Io { path: folder.clone(), source })?;
            crate::model::weights::remove_interrupted_writes(&folder);
            let mut files: Vec<(u64, u64, PathBuf)> = std::fs::read_dir(&folder)
                .map_err(|source| RetrainError::Io { path: folder.clone(), source })?
                .flatten()
                .filter_map(|entry| {
                    let path = entry.path();
                    let stem = path.file_stem()?.to_str()?.to_string();
                    let (seq, id) = stem.split_once('-')?;
                    Some((seq.parse().ok()?, u64::from_str_radix(id, 16).ok()?, path))
                })
                .collect();
            files.sort();
            for (seq, id, path) in files {
                match load_input(&path, limits.side) {
                    Ok(input) => {
                        buffer.next_seq = buffer.next_seq.max(seq + 1);
                        buffer.ids.insert(id);
                        let entry = Entry { seq, id, path, input };
                        match part {
                            "recent" => buffer.recent.push_back(entry),
                            "marked" => buffer.marked.push_back(entry),
                            "held_out" => buffer.held_out.push_back(entry),
                            _ => buffer.pinned.push(entry),
                        }
                    }
                    Err(err) => {
                        log::warn!("replay buffer: dropping {} ({err})", path.display());
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
        }
        buffer.trim();
        Ok(buffer)
    }

    /// Copies a seeded sample of `count` images of `folder` into the pinned part, once: a buffer that
    /// already has pinned images keeps them (the sample must not change under a running trainer).
    pub fn pin_originals(&mut self, folder: &Path, count: usize, seed: u64) -> Result<(), RetrainError> {
        if !self.pinned.is_empty() || count == 0 {
            return Ok(());
        }
        let mut images = crate::data::loco::list_images(folder).map_err(|e| RetrainError::Data(e.to_string()))?;
        if images.is_empty() {
            return Err(RetrainError::Data(format!("retrain.originals: {} holds no images", folder.display())));
        }
        images.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        for image in images.into_iter().take(count) {
            let bytes = std::fs::read(&image).map_err(|source| RetrainError::Io { path: image.clone(), source })?;
            let input = decode_input(&bytes, &image.display().to_string(), self.limits.side)?;
            let id = fnv64(image.display().to_string().as_bytes());
            // Numbered like every other frame: `gate_sequence` relies on a number naming one image.
            let seq = self.next_seq;
            self.next_seq += 1;
            let path = Self::write_to(&self.root, "pinned", seq, id, &bytes)?;
            self.pinned.push(Entry { seq, id, path, input });
        }
        log::info!("replay buffer: pinned {} original images from {}", self.pinned.len(), folder.display());
        self.changed = true;
        Ok(())
    }

    /// Stores a candidate frame (encoded image bytes), accepted or marked normal by an operator. A frame
    /// that does not decode is refused as `Invalid` and never reaches training. A frame already stored
    /// is a `Duplicate` whatever its source (an accepted frame an operator also marks stays accepted).
    pub fn add(
        &mut self,
        frame_id: &str,
        bytes: &[u8],
        source: CandidateSource,
    ) -> Result<CandidateOutcome, RetrainError> {
        let id = fnv64(frame_id.as_bytes());
        if self.ids.contains(&id) {
            return Ok(CandidateOutcome::Duplicate);
        }
        let input = match decode_input(bytes, frame_id, self.limits.side) {
            Ok(input) => input,
            Err(err) => {
                log::warn!("retraining candidate {frame_id} refused: {err}");
                return Ok(CandidateOutcome::Invalid);
            }
        };
        let seq = self.next_seq;
        self.next_seq += 1;
        let held_out = seq.is_multiple_of(self.limits.holdout_every as u64);
        let (part, queue) = match (held_out, source) {
            (true, _) => ("held_out", &mut self.held_out),
            (false, CandidateSource::Auto) => ("recent", &mut self.recent),
            (false, CandidateSource::Feedback) => ("marked", &mut self.marked),
        };
        let path = Self::write_to(&self.root, part, seq, id, bytes)?;
        queue.push_back(Entry { seq, id, path, input });
        self.ids.insert(id);
        self.trim();
        self.changed = true;
        Ok(if held_out { CandidateOutcome::HeldOut } else { CandidateOutcome::Buffered })
    }

    fn write_to(root: &Path, part: &str, seq: u64, id: u64, bytes: &[u8]) -> Result<PathBuf, RetrainError> {
        let path = root.join(part).join(format!("{seq:012}-{id:016x}.img"));
        crate::model::weights::write_atomically(&path, bytes)
            .map_err(|e| RetrainError::Io { path: path.clone(), source: std::io::Error::other(e.to_string()) })?;
        Ok(path)
    }

    /// Drops the oldest frames beyond the window sizes (their ids are forgotten too: a frame that old
    /// coming back is new evidence).
    fn trim(&mut self) {
        let windows = [
            (&mut self.recent, self.limits.recent),
            (&mut self.marked, self.limits.marked),
            (&mut self.held_out, self.limits.held_out),
        ];
        for (queue, limit) in windows {
            while queue.len() > limit {
                if let Some(old) = queue.pop_front() {
                    self.ids.remove(&old.id);
                    let _ = std::fs::remove_file(&old.path);
                }
            }
        }
    }

    /// What training draws from: recent and marked frames and the replayed half of the pinned originals;
    /// None when empty. While there are marked frames and others, the marked ones together take
    /// `marked_share` of the draws, the others the rest, each alike within its group.
    pub fn training_set(&self, marked_share: f64) -> Option<TrainingSet> {
        let replayed: Vec<&Entry> = self.pinned.iter().filter(|e| e.seq % 2 == 0).collect();
        let others = self.recent.len() + replayed.len();
        let marked = self.marked.len();
        let images = stack(self.marked.iter().chain(&self.recent).chain(replayed))?;
        let weights = (marked > 0 && others > 0 && marked_share > 0.0).then(|| {
            let (each_marked, each_other) = (marked_share / marked as f64, (1.0 - marked_share) / others as f64);
            std::iter::repeat_n(each_marked, marked).chain(std::iter::repeat_n(each_other, others)).collect()
        });
        Some(TrainingSet { images, weights })
    }

    /// (calibration, evaluation) images of the gate. With pinned originals, a candidate's map scale is
    /// set on the originals alone (the half that is replayed), and it is judged on every held-out frame
    /// and the other half: otherwise a candidate could pass by rescaling its scores on drifted frames
    /// instead of modelling them, and go blind (measured: README, "Continuous retraining"). Without
    /// originals, held-out frames are split alternately. No image both sets the scale and is judged.
    pub fn gate_images(&self) -> (Option<Tensor>, Option<Tensor>) {
        let replayed: Vec<&Entry> = self.pinned.iter().filter(|e| e.seq % 2 == 0).collect();
        let judging = self.pinned.iter().filter(|e| e.seq % 2 == 1);
        if !replayed.is_empty() {
            return (stack(replayed), stack(self.held_out.iter().chain(judging)));
        }
        let held: Vec<&Entry> = self.held_out.iter().collect();
        let calibration = held.iter().step_by(2).copied().collect::<Vec<_>>();
        let evaluation = held.iter().skip(1).step_by(2).copied().chain(judging).collect::<Vec<_>>();
        (stack(calibration), stack(evaluation))
    }

    /// The sequence numbers of the images [`ReplayBuffer::gate_images`] returns now: equal lists, equal
    /// images (sequence numbers are never reused).
    pub fn gate_sequence(&self) -> Vec<u64> {
        self.held_out.iter().chain(&self.pinned).map(|e| e.seq).collect()
    }

    pub fn counts(&self) -> BufferCounts {
        BufferCounts {
            recent: self.recent.len(),
            marked: self.marked.len(),
            held_out: self.held_out.len(),
            pinned: self.pinned.len(),
        }
    }

    /// Whether frames arrived or left since the last call.
    pub fn take_changed(&mut self) -> bool {
        std::mem::replace(&mut self.changed, false)
    }
}

fn stack<'a>(entries: impl IntoIterator<Item = &'a Entry>) -> Option<Tensor> {
    let inputs: Vec<&Tensor> = entries.into_iter().map(|e| &e.input).collect();
    (!inputs.is_empty()).then(|| Tensor::stack(&inputs, 0))
}

fn load_input(path: &Path, side: u32) -> Result<Tensor, RetrainError> {
    let bytes = std::fs::read(path).map_err(|source| RetrainError::Io { path: path.to_path_buf(), source })?;
    decode_input(&bytes, &path.display().to_string(), side)
}

fn decode_input(bytes: &[u8], origin: &str, side: u32) -> Result<Tensor, RetrainError> {
    let image = crate::data::preprocess::decode(bytes, origin).map_err(|e| RetrainError::Data(e.to_string()))?;
    Ok(crate::data::preprocess::to_input(&image, side))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(shade: u8) -> Vec<u8> {
        let image = image::RgbImage::from_pixel(40, 40, image::Rgb([shade, 100, 50]));
        let mut bytes = Vec::new();
        image.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).unwrap();
        bytes
    }

    /// `dir/originals/`, one PNG per shade.
    fn originals_folder(dir: &Path, shades: &[u8]) -> PathBuf {
        let originals = dir.join("originals");
        std::fs::create_dir_all(&originals).unwrap();
        for (i, shade) in shades.iter().enumerate() {
            std::fs::write(originals.join(format!("{i:03}.png")), png(*shade)).unwrap();
        }
        originals
    }

    fn limits() -> BufferLimits {
        BufferLimits { side: 32, recent: 3, marked: 2, held_out: 2, holdout_every: 3 }
    }

    #[test]
    fn windows_holdout_duplicates_and_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let mut buffer = ReplayBuffer::open(dir.path(), limits()).unwrap();
        assert_eq!(buffer.add("f0", &png(0), AUTO).unwrap(), CandidateOutcome::HeldOut, "seq 0 is held out");
        assert_eq!(buffer.add("f1", &png(1), AUTO).unwrap(), CandidateOutcome::Buffered);
        assert_eq!(buffer.add("f1", &png(1), AUTO).unwrap(), CandidateOutcome::Duplicate, "redelivery");
        assert_eq!(buffer.add("bad", b"not an image", AUTO).unwrap(), CandidateOutcome::Invalid);
        for i in 2..10 {
            buffer.add(&format!("f{i}"), &png(i as u8), AUTO).unwrap();
        }
        // seq 0..9: held out 0, 3, 6, 9 (window 2 keeps 6, 9); recent keeps the last three of the rest.
        assert_eq!(buffer.counts(), counts(3, 0, 2, 0));
        let set = buffer.training_set(0.5).unwrap();
        assert_eq!(set.images.size(), vec![3, 3, 32, 32]);
        assert!(set.weights.is_none(), "no marked frames: all drawn alike");
        let (calibration, evaluation) = buffer.gate_images();
        assert_eq!((calibration.unwrap().size()[0], evaluation.unwrap().size()[0]), (1, 1));
        assert!(buffer.take_changed());
        assert!(!buffer.take_changed());

        // A restart sees the same frames and keeps numbering after them.
        let mut reopened = ReplayBuffer::open(dir.path(), limits()).unwrap();
        assert_eq!(reopened.counts(), counts(3, 0, 2, 0));
        assert_eq!(reopened.add("f9", &png(9), AUTO).unwrap(), CandidateOutcome::Duplicate);
        assert_eq!(reopened.add("f10", &png(10), AUTO).unwrap(), CandidateOutcome::Buffered);
        let stored = std::fs::read_dir(dir.path().join("recent")).unwrap().count();
        assert_eq!(stored, 3, "evicted frames leave the disk too");
    }

    /// Before: operator-marked frames shared the accepted frames' window, and a line's steady flow of
    /// accepted frames pushed them out within minutes; among hundreds of accepted frames they were also
    /// drawn as rarely as any.
    #[test]
    fn marked_frames_keep_a_window_of_their_own_and_a_fixed_share_of_the_draws() {
        let dir = tempfile::tempdir().unwrap();
        let originals = originals_folder(dir.path(), &[200, 201, 202, 203]);
        let root = dir.path().join("buffer");
        let mut buffer = ReplayBuffer::open(&root, limits()).unwrap();
        buffer.pin_originals(&originals, 4, 1).unwrap();
        // seq 4, 5 (pinned took 0..3): a marked frame and an accepted one; seq 6 is held out.
        assert_eq!(buffer.add("m0", &png(10), MARKED).unwrap(), CandidateOutcome::Buffered);
        assert_eq!(buffer.add("a0", &png(11), AUTO).unwrap(), CandidateOutcome::Buffered);
        assert_eq!(buffer.add("m1", &png(12), MARKED).unwrap(), CandidateOutcome::HeldOut);
        for i in 0..10 {
            buffer.add(&format!("a{}", i + 1), &png(20 + i), AUTO).unwrap();
        }
        // The flood of accepted frames filled its own window and the held-out one, not the marked one.
        let after_flood = buffer.counts();
        assert_eq!((after_flood.recent, after_flood.marked, after_flood.pinned), (3, 1, 4));
        assert_eq!(buffer.add("a10", &png(29), MARKED).unwrap(), CandidateOutcome::Duplicate, "stored once");

        // One marked frame, three accepted ones and two replayed originals: the marked one takes the share.
        let set = buffer.training_set(0.5).unwrap();
        assert_eq!(set.images.size()[0], 6);
        let weights = set.weights.unwrap();
        let total: f64 = weights.iter().sum();
        assert!((weights[0] / total - 0.5).abs() < 1e-12, "{weights:?}");
        assert!(weights[1..].iter().all(|w| (w / total - 0.1).abs() < 1e-12), "{weights:?}");
        assert!(buffer.training_set(0.0).unwrap().weights.is_none(), "share 0: all alike");

        // The marked window keeps its newest frames, and survives a restart.
        for i in 0..4 {
            buffer.add(&format!("m{}", i + 2), &png(40 + i), MARKED).unwrap();
        }
        let reopened = ReplayBuffer::open(&root, limits()).unwrap();
        assert_eq!(reopened.counts().marked, 2);
        assert_eq!(reopened.counts(), buffer.counts());
        assert_eq!(std::fs::read_dir(root.join("marked")).unwrap().count(), 2);
    }

    #[test]
    fn originals_are_pinned_once_and_split_between_training_and_judging() {
        let dir = tempfile::tempdir().unwrap();
        let originals = originals_folder(dir.path(), &[0, 20, 40, 60, 80, 100]);
        let root = dir.path().join("buffer");
        let mut buffer = ReplayBuffer::open(&root, limits()).unwrap();
        buffer.pin_originals(&originals, 4, 1).unwrap();
        assert_eq!(buffer.counts(), counts(0, 0, 0, 4));
        assert_eq!(buffer.training_set(0.5).unwrap().images.size()[0], 2);
        let (calibration, evaluation) = buffer.gate_images();
        assert_eq!((calibration.unwrap().size()[0], evaluation.unwrap().size()[0]), (2, 2));
        let mut reopened = ReplayBuffer::open(&root, limits()).unwrap();
        reopened.pin_originals(&originals, 4, 2).unwrap();
        assert_eq!(reopened.counts(), counts(0, 0, 0, 4), "a second call keeps the first sample");
        let empty = dir.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let err = ReplayBuffer::open(&dir.path().join("b2"), limits()).unwrap().pin_originals(&empty, 4, 1);
        assert!(err.unwrap_err().to_string().contains("holds no images"));
    }

    const AUTO: CandidateSource = CandidateSource::Auto;
    const MARKED: CandidateSource = CandidateSource::Feedback;

    fn counts(recent: usize, marked: usize, held_out: usize, pinned: usize) -> BufferCounts {
        BufferCounts { recent, marked, held_out, pinned }
    }
}
