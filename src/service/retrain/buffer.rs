//! The replay buffer on disk: what the trainer learns from and what the promotion gate judges with.
//!
//! Three parts, each a folder of encoded images exactly as they arrived (`<seq>-<frame id hash>.img`):
//! - `recent/`: accepted frames, a sliding window of `buffer_frames` (the line as it looks now);
//! - `held_out/`: every `holdout_every`-th accepted frame instead, a window of `holdout_frames`, never
//!   trained on, so the gate sees frames the candidate has not memorised;
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
use crate::service::metrics::CandidateOutcome;

const PARTS: [&str; 3] = ["recent", "held_out", "pinned"];

#[derive(Debug, Clone, Copy)]
pub struct BufferLimits {
    /// The model's input side.
    pub side: u32,
    pub recent: usize,
    pub held_out: usize,
    pub holdout_every: usize,
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
        for (seq, image) in images.into_iter().take(count).enumerate() {
            let bytes = std::fs::read(&image).map_err(|source| RetrainError::Io { path: image.clone(), source })?;
            let input = decode_input(&bytes, &image.display().to_string(), self.limits.side)?;
            let id = fnv64(image.display().to_string().as_bytes());
            let path = self.write("pinned", seq as u64, id, &bytes)?;
            self.pinned.push(Entry { seq: seq as u64, id, path, input });
        }
        log::info!("replay buffer: pinned {} original images from {}", self.pinned.len(), folder.display());
        self.changed = true;
        Ok(())
    }

    /// Stores an accepted frame (encoded image bytes). A frame that does not decode is refused as
    /// `Invalid` and never reaches training.
    pub fn add(&mut self, frame_id: &str, bytes: &[u8]) -> Result<CandidateOutcome, RetrainError> {
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
        let part = if held_out { "held_out" } else { "recent" };
        let path = self.write(part, seq, id, bytes)?;
        let entry = Entry { seq, id, path, input };
        if held_out { &mut self.held_out } else { &mut self.recent }.push_back(entry);
        self.ids.insert(id);
        self.trim();
        self.changed = true;
        Ok(if held_out { CandidateOutcome::HeldOut } else { CandidateOutcome::Buffered })
    }

    fn write(&self, part: &str, seq: u64, id: u64, bytes: &[u8]) -> Result<PathBuf, RetrainError> {
        let path = self.root.join(part).join(format!("{seq:012}-{id:016x}.img"));
        crate::model::weights::write_atomically(&path, bytes)
            .map_err(|e| RetrainError::Io { path: path.clone(), source: std::io::Error::other(e.to_string()) })?;
        Ok(path)
    }

    /// Drops the oldest frames beyond the window sizes (their ids are forgotten too: a frame that old
    /// coming back is new evidence).
    fn trim(&mut self) {
        for (queue, limit) in [(&mut self.recent, self.limits.recent), (&mut self.held_out, self.limits.held_out)] {
            while queue.len() > limit {
                if let Some(old) = queue.pop_front() {
                    self.ids.remove(&old.id);
                    let _ = std::fs::remove_file(&old.path);
                }
            }
        }
    }

    /// Recent frames and the replayed half of the pinned originals, [N, 3, S, S]; None when empty.
    pub fn training_images(&self) -> Option<Tensor> {
        let replayed = self.pinned.iter().filter(|e| e.seq % 2 == 0);
        stack(self.recent.iter().chain(replayed))
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

    /// (recent, held out, pinned) frame counts.
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.recent.len(), self.held_out.len(), self.pinned.len())
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

    fn limits() -> BufferLimits {
        BufferLimits { side: 32, recent: 3, held_out: 2, holdout_every: 3 }
    }

    #[test]
    fn windows_holdout_duplicates_and_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let mut buffer = ReplayBuffer::open(dir.path(), limits()).unwrap();
        assert_eq!(buffer.add("f0", &png(0)).unwrap(), CandidateOutcome::HeldOut, "seq 0 is held out");
        assert_eq!(buffer.add("f1", &png(1)).unwrap(), CandidateOutcome::Buffered);
        assert_eq!(buffer.add("f1", &png(1)).unwrap(), CandidateOutcome::Duplicate, "redelivery");
        assert_eq!(buffer.add("bad", b"not an image").unwrap(), CandidateOutcome::Invalid);
        for i in 2..10 {
            buffer.add(&format!("f{i}"), &png(i as u8)).unwrap();
        }
        // seq 0..9: held out 0, 3, 6, 9 (window 2 keeps 6, 9); recent keeps the last three of the rest.
        assert_eq!(buffer.counts(), (3, 2, 0));
        assert_eq!(buffer.training_images().unwrap().size(), vec![3, 3, 32, 32]);
        let (calibration, evaluation) = buffer.gate_images();
        assert_eq!((calibration.unwrap().size()[0], evaluation.unwrap().size()[0]), (1, 1));
        assert!(buffer.take_changed());
        assert!(!buffer.take_changed());

        // A restart sees the same frames and keeps numbering after them.
        let mut reopened = ReplayBuffer::open(dir.path(), limits()).unwrap();
        assert_eq!(reopened.counts(), (3, 2, 0));
        assert_eq!(reopened.add("f9", &png(9)).unwrap(), CandidateOutcome::Duplicate);
        assert_eq!(reopened.add("f10", &png(10)).unwrap(), CandidateOutcome::Buffered);
        let stored = std::fs::read_dir(dir.path().join("recent")).unwrap().count();
        assert_eq!(stored, 3, "evicted frames leave the disk too");
    }

    #[test]
    fn originals_are_pinned_once_and_split_between_training_and_judging() {
        let dir = tempfile::tempdir().unwrap();
        let originals = dir.path().join("originals");
        std::fs::create_dir_all(&originals).unwrap();
        for i in 0..6 {
            std::fs::write(originals.join(format!("{i:03}.png")), png(i * 20)).unwrap();
        }
        let root = dir.path().join("buffer");
        let mut buffer = ReplayBuffer::open(&root, limits()).unwrap();
        buffer.pin_originals(&originals, 4, 1).unwrap();
        assert_eq!(buffer.counts(), (0, 0, 4));
        assert_eq!(buffer.training_images().unwrap().size()[0], 2);
        let (calibration, evaluation) = buffer.gate_images();
        assert_eq!((calibration.unwrap().size()[0], evaluation.unwrap().size()[0]), (2, 2));
        let mut reopened = ReplayBuffer::open(&root, limits()).unwrap();
        reopened.pin_originals(&originals, 4, 2).unwrap();
        assert_eq!(reopened.counts(), (0, 0, 4), "a second call keeps the first sample");
        let empty = dir.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let err = ReplayBuffer::open(&dir.path().join("b2"), limits()).unwrap().pin_originals(&empty, 4, 1);
        assert!(err.unwrap_err().to_string().contains("holds no images"));
    }
}
