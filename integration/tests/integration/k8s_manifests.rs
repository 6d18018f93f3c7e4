//! Every manifest in `deploy/kubernetes/` against the Kubernetes OpenAPI schemas, with
//! `kubernetes-validate` (PyPI; it ships the schemas, so it runs offline), installed by
//! scripts/install-deps.sh into its own virtual environment.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::fixture::{in_ci, test_name, Fixture};
use crate::process;

/// Where scripts/install-deps.sh installs the validator.
const VALIDATOR: &str = "/opt/shoal-tools/validate/bin/kubernetes-validate";
/// The oldest Kubernetes the manifests promise to work with (DaemonSet `maxSurge`: 1.25 GA).
const KUBERNETES_VERSIONS: &[&str] = &["1.25.0", "1.37.0"];

fn manifests() -> Result<Vec<PathBuf>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        if path
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml")
        {
            found.push(path);
        }
    }
    found.sort();
    anyhow::ensure!(!found.is_empty(), "no manifests in {}", dir.display());
    Ok(found)
}

fn validate(path: &Path, version: &str) -> Result<String> {
    process::run(
        Command::new(VALIDATOR)
            .args(["--strict", "--kubernetes-version", version])
            .arg(path),
        Duration::from_secs(120),
    )
}

/// Skips (or, under CI, fails) when the validator is not installed.
fn validator_missing() -> bool {
    if Path::new(VALIDATOR).is_file() {
        return false;
    }
    let test = test_name();
    if in_ci() {
        panic!("{test}: {VALIDATOR} is missing; run scripts/install-deps.sh");
    }
    eprintln!("SKIP: {test} needs {VALIDATOR} (scripts/install-deps.sh)");
    true
}

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    if validator_missing() {
        return;
    }
    Fixture::run(|_| {
        for path in manifests()? {
            for version in KUBERNETES_VERSIONS {
                let out = validate(&path, version)?;
                anyhow::ensure!(!out.contains("ERROR"), "{}: {out}", path.display());
            }
        }
        Ok(())
    });
}

#[test]
fn the_validator_rejects_a_misspelt_field() {
    if validator_missing() {
        return;
    }
    Fixture::run(|fixture| {
        let manifest =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/shoal.yaml");
        let text = std::fs::read_to_string(&manifest)?;
        anyhow::ensure!(
            text.contains("readinessProbe:"),
            "no readinessProbe in shoal.yaml"
        );
        let broken = fixture.path("broken.yaml");
        std::fs::write(
            &broken,
            text.replacen("readinessProbe:", "readynessProbe:", 1),
        )?;
        let error = format!(
            "{:#}",
            validate(&broken, "1.37.0")
                .err()
                .context("a misspelt field passed")?
        );
        anyhow::ensure!(error.contains("readynessProbe"), "{error}");
        Ok(())
    });
}

#[test]
fn the_manifests_run_only_shoals_own_image() {
    Fixture::run(|_| {
        for path in manifests()? {
            let text = std::fs::read_to_string(&path)?;
            let images: Vec<&str> = text
                .lines()
                .filter_map(|line| line.trim().strip_prefix("image: "))
                .collect();
            for image in &images {
                anyhow::ensure!(
                    image.contains("/shoal:"),
                    "{}: third-party image {image}",
                    path.display()
                );
            }
        }
        Ok(())
    });
}
