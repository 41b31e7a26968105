//! Reading what `mlcb logits` and `mlcb run --json` produce, and comparing logits.

use std::path::{Path, PathBuf};

/// f32 values of a little-endian tensor.
pub fn f32s(t: &safetensors::tensor::TensorView) -> Vec<f32> {
    t.data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// The arguments of `mlcb logits DIST --input-ids … --out FILE` and the file, named after the
/// dist, the ids and `tag` inside `dir`.
pub fn logits_args(dir: &Path, dist: &Path, ids: &[u32], tag: &str) -> (Vec<String>, PathBuf) {
    let out_file = dir.join(format!(
        "logits-{tag}-{}.safetensors",
        blake3::hash(format!("{dist:?}{ids:?}").as_bytes()).to_hex()
    ));
    let ids_arg = ids
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let args = vec![
        "logits".to_string(),
        dist.to_str().unwrap().to_string(),
        "--input-ids".into(),
        ids_arg,
        "--out".into(),
        out_file.to_str().unwrap().to_string(),
    ];
    (args, out_file)
}

/// The `logits` tensor of a file `mlcb logits` wrote.
pub fn read_logits(file: &Path) -> Vec<f32> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    f32s(&st.tensor("logits").unwrap())
}

/// The arguments of a greedy `mlcb run DIST --prompt P --max-tokens N --json`.
pub fn greedy_args(dist: &Path, prompt: &str, n: usize) -> Vec<String> {
    [
        "run",
        dist.to_str().unwrap(),
        "--prompt",
        prompt,
        "--greedy",
        "--max-tokens",
        &n.to_string(),
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `(prompt ids, generated ids)` from `mlcb run --json`'s stdout.
pub fn run_ids(stdout: &[u8]) -> (Vec<u32>, Vec<u32>) {
    let v: serde_json::Value = serde_json::from_slice(stdout).unwrap();
    let ids = |k: &str| {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect::<Vec<_>>()
    };
    (ids("prompt_ids"), ids("generated_ids"))
}

/// ‖a−b‖/‖b‖ of one position.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((*x - *y) as f64).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum::<f64>().sqrt();
    num / den
}

/// Max over positions (rows of `vocab`) of [`rel_err`].
pub fn max_rel_err(a: &[f32], b: &[f32], vocab: usize) -> f64 {
    assert_eq!(a.len(), b.len());
    a.chunks(vocab)
        .zip(b.chunks(vocab))
        .map(|(x, y)| rel_err(x, y))
        .fold(0.0, f64::max)
}

/// transformers' reference of a fixture folder: per prompt, the input ids, the logits `[seq, vocab]`
/// (shape and values) and the greedy continuation.
pub struct Reference {
    pub input_ids: Vec<Vec<u32>>,
    pub logits: Vec<(Vec<usize>, Vec<f32>)>,
    pub greedy: Vec<Vec<u32>>,
}

fn ints(t: &safetensors::tensor::TensorView) -> Vec<u32> {
    t.data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
        .collect()
}

/// Reads `reference.safetensors` of fixture `folder`.
pub fn reference(folder: &str) -> Reference {
    let bytes = std::fs::read(super::fixture(folder).join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut r = Reference {
        input_ids: vec![],
        logits: vec![],
        greedy: vec![],
    };
    for i in 0.. {
        let Ok(ids) = st.tensor(&format!("input_ids_{i}")) else {
            break;
        };
        r.input_ids.push(ints(&ids));
        let l = st.tensor(&format!("logits_{i}")).unwrap();
        r.logits.push((l.shape().to_vec(), f32s(&l)));
        r.greedy
            .push(ints(&st.tensor(&format!("greedy_{i}")).unwrap()));
    }
    assert!(!r.input_ids.is_empty());
    r
}
