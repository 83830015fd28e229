//! The Helm chart, checked by Helm 4's own engine and the Kubernetes schemas: `scripts/check-chart.py`
//! (lint, every values combination rendered and validated, pod security, no credential in any
//! manifest, values.schema.json refusing wrong values, the PrometheusRule equal to the plain rules file).
//! Its Python environment comes from `scripts/setup.sh chart`.

use std::path::Path;
use std::process::Command;

#[test]
fn the_chart_renders_valid_secure_manifests_for_every_combination_that_matters() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".tools/chart-venv/bin/python");
    if !python.is_file() {
        assert!(std::env::var_os("CI").is_none(), "{} is missing: scripts/setup.sh chart", python.display());
        eprintln!("SKIPPED: {} is missing (scripts/setup.sh chart installs it)", python.display());
        return;
    }
    let output = Command::new(&python).arg(root.join("scripts/check-chart.py")).output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    eprintln!("{report}");
    assert!(output.status.success() && report.contains("SUCCESS"), "{report}");
}
