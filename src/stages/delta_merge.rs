//! delta-merge: a Vicuna-style release = base + delta, tensor by tensor, summed in float32.
//!
//! The v1.1 rule: every base tensor has a delta of the same shape. The v0 rule: the delta's
//! embedding / lm_head may have extra vocabulary rows; the base is added into the first rows and
//! the extra rows are the delta's. Anything else (a missing tensor, another shape mismatch) is an
//! error naming the tensor and both shapes. The merged weights are written as one float32
//! safetensors file, streamed: one tensor in memory at a time. Config and tokenizer come from the
//! delta folder (as FastChat does since 2023-04-29).

use super::{cached_or_run, load, temp_output, weights::ModelSource, BuildContext, StageOutput};
use crate::cache::key::KeyInputs;
use crate::formats::tensor::TensorSource;
use anyhow::Result;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Mutex;

pub const VERSION: u32 = 1;

pub fn run(
    ctx: &BuildContext,
    base: &StageOutput,
    delta: &StageOutput,
    scope: &[String],
) -> Result<StageOutput> {
    let inputs = KeyInputs::new("delta-merge", VERSION)
        .with("base", base.digest())
        .with("delta", delta.digest());
    let delta_source = ModelSource::from_local(&delta.local)?;
    let mut out = cached_or_run(ctx, inputs, scope, || {
        let base_w = ModelSource::from_local(&base.local)?.open_weights()?;
        let delta_w = delta_source.open_weights()?;
        let plan = merge_plan(base_w.as_ref(), delta_w.as_ref())?;
        // The safetensors writer puts its own `.tmpXXXXXX` sibling next to the file: keep both
        // in a folder named after this process, so a killed build's leftovers are swept.
        let dir = ctx.cache.blobs.temp_path("merge")?;
        std::fs::create_dir_all(&dir)?;
        let merged = dir.join("merged.safetensors");
        write_merged(base_w.as_ref(), delta_w.as_ref(), &plan, &merged)?;
        let mut desc = load::read_description(ctx, delta)?;
        desc.weights_format = "merged".into();
        let mut files = BTreeMap::new();
        files.insert("merged.safetensors".to_string(), merged);
        files.insert(
            "model.json".to_string(),
            temp_output(ctx, "model", &serde_json::to_vec_pretty(&desc)?)?,
        );
        for (name, o) in &delta.outputs {
            if name.starts_with("tokenizer/") {
                let bytes = ctx.cache.blobs.read_verified(&o.digest)?;
                files.insert(name.clone(), temp_output(ctx, "tok", &bytes)?);
            }
        }
        Ok(files)
    })?;
    out.local.insert(
        "merged".into(),
        ctx.cache
            .blobs
            .path(&out.output("merged.safetensors")?.digest),
    );
    out.local.insert(
        "source_dir".into(),
        delta.local.get("source_dir").cloned().unwrap_or_default(),
    );
    Ok(out)
}

/// (name, shape of the result) for every base tensor, validated against the delta.
fn merge_plan(
    base: &dyn TensorSource,
    delta: &dyn TensorSource,
) -> Result<Vec<(String, Vec<usize>)>> {
    let mut plan = Vec::new();
    for b in base.infos() {
        let Some(d) = delta.info(&b.name) else {
            crate::user_bail!("delta weights have no tensor `{}` (base shape {:?}); is this the delta for this base model?", b.name, b.shape);
        };
        if !b.dtype.is_float() || !d.dtype.is_float() {
            crate::user_bail!("tensor `{}` is {} in the base and {} in the delta: only floating tensors can be merged", b.name, b.dtype, d.dtype);
        }
        let extra_rows = b.shape.len() == 2
            && d.shape.len() == 2
            && d.shape[1] == b.shape[1]
            && d.shape[0] > b.shape[0];
        if d.shape != b.shape && !extra_rows {
            crate::user_bail!(
                "tensor `{}` has shape {:?} in the base but {:?} in the delta",
                b.name,
                b.shape,
                d.shape
            );
        }
        plan.push((b.name.clone(), d.shape.clone()));
    }
    Ok(plan)
}

/// A merged tensor computed when the safetensors writer asks for its bytes.
struct LazySum<'a> {
    name: &'a str,
    shape: &'a [usize],
    base: &'a dyn TensorSource,
    delta: &'a dyn TensorSource,
    error: &'a Mutex<Option<anyhow::Error>>,
}

impl LazySum<'_> {
    fn compute(&self) -> Result<Vec<u8>> {
        let b = self.base.read(self.name)?.to_f32()?;
        let mut d = self.delta.read(self.name)?.to_f32()?;
        // v0 rule: base adds into the first rows; v1.1: same shape, so this is every element.
        for (x, y) in d.iter_mut().zip(&b) {
            *x += *y;
        }
        Ok(bytemuck::cast_slice(&d).to_vec())
    }
}

impl safetensors::View for LazySum<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self.compute() {
            Ok(v) => Cow::Owned(v),
            Err(e) => {
                // The View API cannot fail: remember the error, write zeros, fail after writing.
                self.error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get_or_insert(e);
                Cow::Owned(vec![0u8; self.data_len()])
            }
        }
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * 4
    }
}

fn write_merged(
    base: &dyn TensorSource,
    delta: &dyn TensorSource,
    plan: &[(String, Vec<usize>)],
    dest: &std::path::Path,
) -> Result<()> {
    let error = Mutex::new(None);
    let views: Vec<(String, LazySum)> = plan
        .iter()
        .map(|(name, shape)| {
            (
                name.clone(),
                LazySum {
                    name,
                    shape,
                    base,
                    delta,
                    error: &error,
                },
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, dest).map_err(|e| {
        crate::error::env(format!("writing merged weights to {}: {e}", dest.display()))
    })?;
    if let Some(e) = error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        std::fs::remove_file(dest).ok();
        return Err(e.context("merging base and delta weights"));
    }
    Ok(())
}
