//! The CRD YAML checked in under `manifests/` and `charts/kord/crds/` is generated from the Rust
//! types (`kord-operator crd`); this fails when they drift. `KORD_UPDATE_GENERATED=1` rewrites
//! them instead.

use std::path::PathBuf;

const GENERATED: [&str; 2] = [
    "manifests/crd.yaml",
    "charts/kord/crds/kordclusters.kord.io.yaml",
];

#[test]
fn crd_yaml_matches_the_rust_types() {
    // Run-time value: the compile-time one can name another clone that shared the target dir.
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    let root = manifest.join("..");
    let want = kord_operator::crd::crd_yaml().expect("CRD serializes");
    let update = std::env::var_os("KORD_UPDATE_GENERATED").is_some();
    for rel in GENERATED {
        let path = root.join(rel);
        if update {
            std::fs::write(&path, &want).expect("write generated CRD");
            continue;
        }
        let have = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{rel}: {e}; run KORD_UPDATE_GENERATED=1 cargo test -p kord-operator --test generated"));
        assert!(
            have == want,
            "{rel} differs from the CRD generated from operator/src/crd.rs; \
             regenerate with KORD_UPDATE_GENERATED=1 cargo test -p kord-operator --test generated"
        );
    }
}
