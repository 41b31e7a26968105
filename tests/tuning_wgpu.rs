//! Measured tuning on the local Vulkan device (lavapipe without a GPU): `--tune=on` times the
//! candidate configurations of every kernel signature (each first checked against the default's
//! results), stores the fastest in the cache's tuning database and marks the artifact tuned; a
//! second build reuses the records without measuring; `--tune=off` stays on the preset defaults.
//! Skips loudly without a Vulkan adapter.

mod common;
use common::*;
use std::path::Path;
use std::process::Output;

fn build(w: &Work, recipe: &Path, dist: &str, tune: &str) -> Output {
    let out = w.mlcb(&[
        "build",
        recipe.to_str().unwrap(),
        "--tune",
        tune,
        "--cache-dir",
        w.cache().to_str().unwrap(),
        "--artifact-path",
        w.path().join(dist).to_str().unwrap(),
    ]);
    assert_success(&out);
    out
}

fn manifest(w: &Work, dist: &str) -> serde_json::Value {
    let p = w
        .path()
        .join(dist)
        .join("tiny-llama-q4f16_1/build-manifest.json");
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn database(w: &Work) -> Vec<std::path::PathBuf> {
    match std::fs::read_dir(w.cache().join("tuning")) {
        Ok(d) => d
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect(),
        Err(_) => vec![],
    }
}

#[test]
fn measured_records_are_stored_then_reused() {
    let w = Work::new();
    let recipe = w.recipe(
        "llama-vulkan.toml",
        &recipe_text("tiny-llama", &fixture("tiny-llama"), "q4f16_1", "vulkan"),
    );

    let first = build(&w, &recipe, "dist-on", "on");
    let err = stderr(&first);
    if !err.contains("tune: measured") {
        assert!(database(&w).is_empty());
        assert_eq!(manifest(&w, "dist-on")["tuned"], false);
        eprintln!(
            "SKIPPED measured_records_are_stored_then_reused: no local Vulkan adapter \
             (install mesa-vulkan-drivers libvulkan1). mlcb said: {err}"
        );
        return;
    }
    assert_eq!(manifest(&w, "dist-on")["tuned"], true, "{err}");
    let db = database(&w);
    assert_eq!(db.len(), 1, "one database for the one device");
    let records: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&db[0]).unwrap()).unwrap();
    let n = records["records"].as_object().unwrap().len();
    assert!(n > 10, "{n} signatures measured");
    for (sig, r) in records["records"].as_object().unwrap() {
        assert!(r["seconds"].as_f64().unwrap() > 0.0, "{sig}");
        assert!(r["candidates"].as_u64().unwrap() >= 4, "{sig}");
        // Every candidate ran on the probe inputs first, and computed the default's results.
        assert_eq!(r["checked"], true, "{sig}");
        assert!(r.get("refused").is_none(), "{sig}: {r}");
    }
    assert!(!err.contains("computes other results"), "{err}");
    let stamp = std::fs::metadata(&db[0]).unwrap().modified().unwrap();

    // A second build (new dist, same cache): records come from the database, nothing is timed.
    let second = build(&w, &recipe, "dist-again", "on");
    let err2 = stderr(&second);
    assert!(!err2.contains("tune: measured"), "{err2}");
    assert!(
        err2.contains(&format!(
            "tune: {n} of {n} kernel signatures from the tuning database"
        )),
        "{err2}"
    );
    assert_eq!(
        std::fs::metadata(&db[0]).unwrap().modified().unwrap(),
        stamp
    );
    assert_eq!(manifest(&w, "dist-again")["tuned"], true);
    assert_eq!(
        manifest(&w, "dist-again")["artifact_digest"],
        manifest(&w, "dist-on")["artifact_digest"],
        "the same records give the same artifact"
    );

    // Off: the preset defaults, untuned, another library.
    build(&w, &recipe, "dist-off", "off");
    let off = manifest(&w, "dist-off");
    assert_eq!(off["tuned"], false);
    assert_ne!(
        off["artifact_digest"],
        manifest(&w, "dist-on")["artifact_digest"]
    );
}
