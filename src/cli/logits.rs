//! `mlcb logits DIST_DIR --input-ids 1,2,3 --out FILE.safetensors`: the logits of every position
//! from one prefill, for comparison with a reference implementation.

use crate::cli::threads::ThreadsArg;
use crate::runtime::artifact::Artifact;
use crate::runtime::backend::{resolve_device, with_session};
use crate::runtime::Session;
use crate::user_bail;
use anyhow::Result;
use safetensors::tensor::{Dtype, TensorView};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct LogitsArgs {
    /// The artifact folder `mlcb build` wrote (dist/<model>-<quant>).
    pub dist_dir: PathBuf,
    /// Comma-separated token ids, e.g. `1,2,3`.
    #[arg(long)]
    pub input_ids: String,
    /// Output safetensors file; holds "logits", float32 [seq, vocab].
    #[arg(long)]
    pub out: PathBuf,
    /// Backend to run on: cpu or wgpu (default: the library's target).
    #[arg(long)]
    pub device: Option<String>,
    /// wgpu only: the adapter to use, by a part of its name (e.g. `llvmpipe`, `nvidia`);
    /// default: the best GPU of the library's backend.
    #[arg(long)]
    pub adapter: Option<String>,
    /// Feed the ids one per call (the decode path: single-token kernels, KV cache, on CUDA the
    /// replayed graph) instead of one prefill; the logits mean the same.
    #[arg(long)]
    pub decode: bool,
    #[command(flatten)]
    pub threads: ThreadsArg,
}

/// Parses `1,2, 3` into ids; every id must be below `vocab`.
pub fn parse_ids(text: &str, vocab: usize) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for (i, part) in text.split(',').enumerate() {
        let part = part.trim();
        let id: u32 = match part.parse() {
            Ok(id) => id,
            Err(_) => user_bail!(
                "--input-ids: item {} ({part:?}) is not a token id; give comma-separated integers like 1,2,3",
                i + 1
            ),
        };
        if id as usize >= vocab {
            user_bail!(
                "--input-ids: id {id} (item {}) is not below the vocabulary size {vocab}",
                i + 1
            );
        }
        ids.push(id);
    }
    Ok(ids)
}

/// One prefill from a fresh state with every position's logits: `[ids.len() * vocab]`.
pub fn all_logits(session: &mut dyn Session, ids: &[u32], vocab: usize) -> Result<Vec<f32>> {
    if ids.len() > session.max_seq_len() {
        user_bail!(
            "{} input ids do not fit the context of {} tokens",
            ids.len(),
            session.max_seq_len()
        );
    }
    session.reset();
    let logits = session.forward(ids, true)?;
    if logits.len() != ids.len() * vocab {
        anyhow::bail!(
            "the backend returned {} logits for {} positions × {vocab}",
            logits.len(),
            ids.len()
        );
    }
    Ok(logits)
}

/// The same logits as [`all_logits`], computed with one call per token (the decode path).
pub fn stepwise_logits(session: &mut dyn Session, ids: &[u32], vocab: usize) -> Result<Vec<f32>> {
    if ids.len() > session.max_seq_len() {
        user_bail!(
            "{} input ids do not fit the context of {} tokens",
            ids.len(),
            session.max_seq_len()
        );
    }
    session.reset();
    let mut out = Vec::with_capacity(ids.len() * vocab);
    for id in ids {
        let l = session.forward(&[*id], false)?;
        if l.len() != vocab {
            anyhow::bail!(
                "the backend returned {} logits for one position × {vocab}",
                l.len()
            );
        }
        out.extend_from_slice(&l);
    }
    Ok(out)
}

/// Writes `logits` as tensor "logits" f32 `[seq, vocab]`, the ids as metadata.
pub fn write_logits(path: &Path, ids: &[u32], vocab: usize, logits: &[f32]) -> Result<()> {
    // safetensors is little-endian whatever the host.
    let bytes: Vec<u8> = logits.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = TensorView::new(Dtype::F32, vec![ids.len(), vocab], &bytes)
        .map_err(|e| anyhow::anyhow!("building the logits tensor: {e}"))?;
    let ids_text = ids
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let meta = std::collections::HashMap::from([("input_ids".to_string(), ids_text)]);
    safetensors::tensor::serialize_to_file([("logits", view)], Some(meta), path)
        .map_err(|e| crate::error::env(format!("cannot write {}: {e}", path.display())))?;
    Ok(())
}

pub fn execute(args: LogitsArgs) -> Result<()> {
    args.threads.clone().install(|_| logits_on_pool(args))
}

fn logits_on_pool(args: LogitsArgs) -> Result<()> {
    let artifact = Artifact::open_for(&args.dist_dir, args.device.as_deref())?;
    let device = resolve_device(&artifact, args.device.as_deref())?;
    let vocab = artifact.vocab_size();
    let ids = parse_ids(&args.input_ids, vocab)?;
    let ctx = artifact.context_len();
    if ids.len() > ctx {
        user_bail!(
            "{} input ids do not fit the context of {ctx} tokens",
            ids.len()
        );
    }
    if let Some(parent) = args.out.parent() {
        if !parent.as_os_str().is_empty() && !parent.is_dir() {
            user_bail!(
                "--out {}: folder {} does not exist",
                args.out.display(),
                parent.display()
            );
        }
    }
    let logits = with_session(&artifact, device, args.adapter.as_deref(), |s| {
        if args.decode {
            stepwise_logits(s, &ids, vocab)
        } else {
            all_logits(s, &ids, vocab)
        }
    })?;
    write_logits(&args.out, &ids, vocab, &logits)?;
    eprintln!(
        "wrote logits [{}, {vocab}] to {}",
        ids.len(),
        args.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{class_of, ErrorClass};
    use crate::runtime::generate::tests::ScriptSession;

    #[test]
    fn parses_ids_and_refuses_bad_ones() {
        assert_eq!(parse_ids("1,2, 3", 10).unwrap(), vec![1, 2, 3]);
        for bad in ["", "1,,2", "1,x", "-1", "10", "1,99999999999"] {
            let e = parse_ids(bad, 10).unwrap_err();
            assert_eq!(class_of(&e), ErrorClass::User, "{bad:?}: {e}");
        }
    }

    #[test]
    fn decode_mode_feeds_one_token_per_call() {
        let mut s = ScriptSession::new(vec![2], 4, 8);
        let logits = stepwise_logits(&mut s, &[1, 3, 0], 4).unwrap();
        assert_eq!(s.calls, vec![vec![1], vec![3], vec![0]]);
        assert_eq!(logits.len(), 12);
    }

    #[test]
    fn writes_every_position_as_safetensors() {
        let mut s = ScriptSession::new(vec![2], 4, 8);
        let logits = all_logits(&mut s, &[1, 3, 0], 4).unwrap();
        assert_eq!(s.calls, vec![vec![1, 3, 0]]);
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("l.safetensors");
        write_logits(&path, &[1, 3, 0], 4, &logits).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor("logits").unwrap();
        assert_eq!(t.dtype(), Dtype::F32);
        assert_eq!(t.shape(), &[3, 4]);
        let got: Vec<f32> = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        // ScriptSession puts 10.0 at the scripted id (2) of the last row only.
        let mut want = vec![0f32; 12];
        want[2 * 4 + 2] = 10.0;
        assert_eq!(got, want);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            meta.metadata().as_ref().unwrap().get("input_ids").unwrap(),
            "1,3,0"
        );
    }

    #[test]
    fn too_many_ids_is_a_user_error() {
        let mut s = ScriptSession::new(vec![], 4, 2);
        let e = all_logits(&mut s, &[1, 2, 3], 4).unwrap_err();
        assert_eq!(class_of(&e), ErrorClass::User);
        assert!(s.calls.is_empty());
    }

    #[test]
    fn execute_writes_the_synthetic_artifacts_logits() {
        use crate::runtime::artifact::tests::{write_tiny_artifact, VOCAB};
        let tmp = tempfile::tempdir().unwrap();
        write_tiny_artifact(tmp.path());
        let out = tmp.path().join("out.safetensors");
        let args = |ids: &str| LogitsArgs {
            dist_dir: tmp.path().to_path_buf(),
            input_ids: ids.into(),
            out: out.clone(),
            device: None,
            adapter: None,
            decode: false,
            threads: ThreadsArg::default(),
        };
        execute(args("3,1")).unwrap();
        let bytes = std::fs::read(&out).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("logits").unwrap().shape(), &[2, VOCAB]);
        for bad in ["1,6", "1,1,1,1,1,1,1,1,1", "a"] {
            let e = execute(args(bad)).unwrap_err();
            assert_eq!(class_of(&e), ErrorClass::User, "{bad}: {e}");
        }
    }
}
