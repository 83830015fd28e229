use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use image::GrayImage;

use super::raster::*;
use super::scene::*;
use super::*;

fn small(seed: u64) -> SynthConfig {
    SynthConfig { seed, image_size: 128, train: 3, validation: 2, test_good: 2, test_logical: 8, test_structural: 6 }
}

fn png_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn all_files(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("read dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(root).expect("prefix").to_path_buf();
                out.insert(rel, fs::read(&path).expect("read file"));
            }
        }
    }
    out
}

#[test]
fn writes_loco_layout_and_counts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("synth");
    let config = small(7);
    let mut calls = 0;
    let report = generate(&config, &root, &mut || calls += 1).expect("generate");
    assert_eq!(calls, 21);
    assert_eq!(report.images, 21);

    for split in Split::ALL {
        let n = config.count(split);
        let expected: Vec<String> = (0..n).map(|i| format!("{i:03}.png")).collect();
        assert_eq!(png_names(&root.join(split.dir())), expected, "{}", split.dir());
        for name in &expected {
            let img = image::open(root.join(split.dir()).join(name)).expect("open image");
            assert_eq!((img.width(), img.height()), (128, 128));
            assert!(matches!(img, image::DynamicImage::ImageRgb8(_)));
        }
    }

    let specs: Vec<DefectSpec> = serde_json::from_slice(&fs::read(root.join("defects_config.json")).expect("read"))
        .expect("parse defects_config.json");
    let values: BTreeSet<u8> = specs.iter().map(|s| s.pixel_value).collect();
    assert_eq!(values.len(), specs.len(), "pixel values must be distinct");
    for spec in &specs {
        assert!(spec.saturation_threshold > 0.0);
        if spec.relative_saturation {
            assert!(spec.saturation_threshold <= 1.0);
        }
    }

    let saved: SynthConfig =
        serde_json::from_slice(&fs::read(root.join("synth.json")).expect("read")).expect("parse synth.json");
    assert_eq!(saved, config);

    let mut masks = 0;
    let mut names_seen = BTreeSet::new();
    for split in [Split::TestLogical, Split::TestStructural] {
        let mask_root = root.join(split.mask_dir().expect("mask dir"));
        let expected: Vec<String> = (0..config.count(split)).map(|i| format!("{i:03}")).collect();
        assert_eq!(png_names(&mask_root), expected);
        for folder in &expected {
            let files = png_names(&mask_root.join(folder));
            assert!(!files.is_empty(), "no mask for {folder}");
            for (n, file) in files.iter().enumerate() {
                assert_eq!(file, &format!("{n:03}.png"));
                let mask = image::open(mask_root.join(folder).join(file)).expect("open mask");
                let image::DynamicImage::ImageLuma8(mask) = mask else {
                    panic!("mask is not 8-bit grey");
                };
                assert_eq!(mask.dimensions(), (128, 128));
                let used: BTreeSet<u8> = mask.pixels().map(|p| p.0[0]).filter(|&v| v != 0).collect();
                assert_eq!(used.len(), 1, "one defect type per mask file");
                let value = *used.iter().next().expect("non-empty mask");
                let spec = specs.iter().find(|s| s.pixel_value == value).expect("listed pixel value");
                let kind = DefectKind::ALL.iter().find(|k| k.pixel_value() == value).expect("kind");
                assert_eq!(kind.is_logical(), split == Split::TestLogical);
                names_seen.insert(spec.defect_name.clone());
                masks += 1;
            }
        }
    }
    assert_eq!(report.masks, masks);
    assert_eq!(report.defects.values().sum::<usize>(), masks);
    // 8 logical images cycle all four kinds, 6 structural all three.
    assert_eq!(names_seen.len(), 7, "{names_seen:?}");
}

#[test]
fn same_config_same_bytes_and_images_independent() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = SynthConfig { train: 2, validation: 1, test_good: 1, test_logical: 4, test_structural: 3, ..small(3) };
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let c = tmp.path().join("c");
    generate(&config, &a, &mut || {}).expect("a");
    generate(&config, &b, &mut || {}).expect("b");
    let more = SynthConfig { train: 4, test_logical: 5, ..config.clone() };
    generate(&more, &c, &mut || {}).expect("c");
    let (fa, fb, fc) = (all_files(&a), all_files(&b), all_files(&c));
    assert_eq!(fa, fb);
    // A split's images do not depend on how many others are generated.
    for (path, bytes) in &fa {
        if path != Path::new("synth.json") {
            assert_eq!(fc.get(path), Some(bytes), "{}", path.display());
        }
    }
}

#[test]
fn seeds_and_indices_differ() {
    let a = render_sample(&small(1), Split::Train, 0).expect("a").image;
    let b = render_sample(&small(2), Split::Train, 0).expect("b").image;
    let c = render_sample(&small(1), Split::Train, 1).expect("c").image;
    let d = render_sample(&small(1), Split::Validation, 0).expect("d").image;
    assert_ne!(a, b);
    assert_ne!(a, c);
    assert_ne!(a, d);
}

#[test]
fn invalid_config_rejected() {
    for bad in [
        SynthConfig { image_size: 64, ..small(0) },
        SynthConfig { image_size: 1024, ..small(0) },
        SynthConfig { train: 0, ..small(0) },
        SynthConfig { test_logical: MAX_SPLIT_COUNT + 1, ..small(0) },
    ] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let err = generate(&bad, tmp.path(), &mut || {}).expect_err("must reject");
        assert!(matches!(err, SynthError::InvalidConfig(_)), "{err}");
        assert_eq!(fs::read_dir(tmp.path()).expect("read").count(), 0, "nothing written");
    }
    assert!(SynthConfig { image_size: 512, ..small(0) }.validate().is_ok());
    assert!(SynthConfig::default().validate().is_ok());

    let tmp = tempfile::tempdir().expect("tempdir");
    fs::write(tmp.path().join("old.txt"), "x").expect("write");
    let err = generate(&small(0), tmp.path(), &mut || {}).expect_err("must refuse");
    assert!(matches!(err, SynthError::OutputNotEmpty { .. }), "{err}");
    assert!(err.to_string().contains(&tmp.path().display().to_string()));
}

#[test]
fn normal_scenes_obey_the_rules() {
    for split in [Split::Train, Split::Validation, Split::TestGood] {
        for index in 0..40 {
            let built = build(11, split, index, 128);
            let scene = &built.scene;
            assert!(built.defects.is_empty());
            assert_eq!(scene.items.len(), 4);
            for (slot, item) in scene.items.iter().enumerate() {
                assert_eq!(item.kind, SLOT_KINDS[slot]);
                let off = item.centre - comp_centre(scene.tray_centre, slot);
                assert!(off.x.abs() <= POS_JITTER && off.y.abs() <= POS_JITTER);
            }
            let (cap, ring) = (scene.items[CAP_SLOT].colour, scene.items[RING_SLOT].colour);
            assert!(colour_distance(cap, ring) < 0.05, "pair must match");
            assert!(colour_distance(cap, PALETTE[scene.pair]) < 0.05);
        }
    }
}

#[test]
fn logical_anomalies_use_normal_parts() {
    for index in 0..40 {
        let built = build(5, Split::TestLogical, index, 128);
        let scene = &built.scene;
        let kind = built.defects[0].0;
        for item in &scene.items {
            let c = item.colour;
            let normal_colour = match item.kind {
                ItemKind::Cap | ItemKind::Ring => PALETTE.iter().any(|p| colour_distance(c, *p) < 0.05),
                ItemKind::Block => colour_distance(c, BLOCK_COLOUR) < 0.06,
                ItemKind::Bar => colour_distance(c, BAR_COLOUR) < 0.06,
            };
            assert!(normal_colour, "{kind:?}: abnormal colour on a part");
            assert!(item.bite.is_none() && scene.overlays.is_empty());
        }
        let expected_items = match kind {
            DefectKind::MissingItem => 3,
            DefectKind::ExtraItem => 5,
            _ => 4,
        };
        assert_eq!(scene.items.len(), expected_items, "{kind:?}");
        if kind == DefectKind::ColourMismatch {
            let (cap, ring) = (scene.items[CAP_SLOT].colour, scene.items[RING_SLOT].colour);
            assert!(colour_distance(cap, ring) > 0.3);
        }
    }
}

fn dilate(mask: &GrayImage, radius: i64) -> Vec<bool> {
    let size = mask.width() as i64;
    let mut out = vec![false; (size * size) as usize];
    for (x, y, p) in mask.enumerate_pixels() {
        if p.0[0] == 0 {
            continue;
        }
        for dy in -radius..=radius {
            for dx in -radius..=radius {
                let (nx, ny) = (x as i64 + dx, y as i64 + dy);
                if (0..size).contains(&nx) && (0..size).contains(&ny) {
                    out[(ny * size + nx) as usize] = true;
                }
            }
        }
    }
    out
}

/// Each mask covers the pixels that differ from the normal counterpart
/// (same noise, lighting and placement), up to shadows and edge
/// anti-aliasing, and a good share of the mask really is changed.
#[test]
fn masks_lie_where_the_image_differs() {
    let size = 128;
    for split in [Split::TestLogical, Split::TestStructural] {
        for index in 0..24 {
            let built = build(21, split, index, size);
            let sample = built.render(size);
            let normal = render_scene(&built.normal, size);
            let changed: Vec<bool> = sample
                .image
                .pixels()
                .zip(normal.pixels())
                .map(|(a, b)| (0..3).any(|c| (a.0[c] as i32 - b.0[c] as i32).abs() > 12))
                .collect();
            let mut union = GrayImage::new(size, size);
            for defect in &sample.defects {
                let inside: Vec<bool> = defect.mask.pixels().map(|p| p.0[0] > 0).collect();
                let area = inside.iter().filter(|&&v| v).count();
                let hit = inside.iter().zip(&changed).filter(|(m, c)| **m && **c).count();
                assert!(area > 20, "{:?} #{index}: tiny mask ({area} px)", defect.kind);
                assert!(
                    hit as f32 >= 0.25 * area as f32,
                    "{:?} #{index}: only {hit} of {area} mask px changed",
                    defect.kind
                );
                for (u, m) in union.pixels_mut().zip(defect.mask.pixels()) {
                    u.0[0] = u.0[0].max(m.0[0]);
                }
            }
            // Shadows reach ~0.03 of the side beyond a part.
            let near = dilate(&union, (0.035 * size as f32).ceil() as i64);
            let stray = changed.iter().zip(&near).filter(|(c, n)| **c && !**n).count();
            assert_eq!(stray, 0, "{split:?} #{index}: {stray} changed px outside the masks");
        }
    }
}

#[test]
fn thresholds_scale_with_size() {
    let small_area = smallest_part_area(128) as f64;
    let big_area = smallest_part_area(256) as f64;
    assert!((big_area / small_area - 4.0).abs() < 0.01, "{small_area} {big_area}");
    let spec = defect_specs(256);
    let missing = spec.iter().find(|s| s.defect_name == "missing_item").expect("missing_item");
    assert!(!missing.relative_saturation);
    assert_eq!(missing.saturation_threshold, big_area);
}
