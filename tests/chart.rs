//! The Helm chart, checked by Helm 4's own engine and the Kubernetes schemas: `scripts/check-chart.py`
//! (lint, every values combination rendered and validated, pod security, no credential in any
//! manifest, values.schema.json refusing wrong values, the PrometheusRule equal to the plain rules file).
//! Its Python environment comes from `scripts/setup.sh chart`.

mod common;

use std::path::Path;
use std::process::Command;

#[test]
fn the_chart_renders_valid_secure_manifests_for_every_combination_that_matters() {
    let Some(python) = common::setup_tool("chart-venv/bin/python", None, "chart") else { return };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check-chart.py");
    let output = Command::new(&python).arg(script).output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    eprintln!("{report}");
    assert!(output.status.success() && report.contains("SUCCESS"), "{report}");
}
