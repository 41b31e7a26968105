//! `mlcb quantize --quantization Q IN.safetensors OUT.safetensors`: the quantize stage on one file.
//!
//! Every 2-D floating tensor named `*.weight` that is not a norm is quantized with the scheme's
//! linear layout (embeddings and output heads, recognised by name, with theirs) and written as
//! `NAME.q_weight` + `NAME.q_scale` (or `.q_scale_min`); other tensors are copied in the model dtype.

use crate::formats::tensor::{TensorInfo, TensorSource};
use crate::quant::scheme::{scheme, scheme_names, TensorRole};
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct QuantizeArgs {
    #[arg(long)]
    pub quantization: String,
    /// Scale rule of symmetric schemes: `mse` (default) or `absmax` (build.py's bits).
    #[arg(long, default_value = "mse", value_parser = ["mse", "absmax"])]
    pub quantization_scales: String,
    pub input: PathBuf,
    pub output: PathBuf,
}

/// MLC's ParamManager kinds, by name.
pub fn role_by_name(info: &TensorInfo) -> TensorRole {
    let n = info.name.as_str();
    let float2d = info.shape.len() == 2 && info.dtype.is_float();
    let is_norm =
        n.contains("norm") || n.contains(".ln") || n.starts_with("ln") || n.contains("layernorm");
    if !float2d || !n.ends_with(".weight") || is_norm {
        return TensorRole::Raw;
    }
    if n.contains("embed_tokens")
        || n.contains("embed_in")
        || n.contains("embeddings")
        || n.contains("wte")
    {
        TensorRole::Embedding
    } else if n == "lm_head.weight"
        || n.ends_with("embed_out.weight")
        || n == "head.weight"
        || n.ends_with(".head.weight")
    {
        TensorRole::LmHead
    } else {
        TensorRole::Linear
    }
}

pub fn execute(args: QuantizeArgs) -> Result<()> {
    let scheme = scheme(&args.quantization).ok_or_else(|| {
        crate::error::user(format!(
            "unknown --quantization {}; valid: {}",
            args.quantization,
            scheme_names().join(", ")
        ))
    })?;
    // clap's value_parser already limited the names.
    let rule = crate::quant::ScaleRule::from_name(&args.quantization_scales).unwrap_or_default();
    let source = crate::formats::safetensors::SafetensorsFile::open(&args.input)?;
    let mut keep: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for info in source.infos() {
        let role = role_by_name(info);
        let t = source.read(&info.name)?;
        if !info.dtype.is_float() {
            keep.push((
                info.name.clone(),
                st_dtype(info.dtype)?,
                info.shape.clone(),
                t.data.into_owned(),
            ));
            continue;
        }
        let values = t.to_f32()?;
        for rec in
            crate::quant::quantize_param_with(scheme, rule, role, &info.name, &info.shape, &values)?
        {
            keep.push((rec.name, st_dtype(rec.dtype)?, rec.shape, rec.bytes));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = keep
        .iter()
        .map(|(n, d, s, b)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b)
                    .map_err(|e| anyhow::anyhow!("{n}: {e}"))?,
            ))
        })
        .collect::<Result<_>>()?;
    let tmp = args.output.with_extension("safetensors.tmp");
    safetensors::serialize_to_file(views, None, &tmp)
        .map_err(|e| crate::error::env(format!("writing {}: {e}", args.output.display())))?;
    std::fs::rename(&tmp, &args.output)
        .map_err(|e| crate::error::env(format!("writing {}: {e}", args.output.display())))?;
    eprintln!(
        "wrote {} ({} tensors, {})",
        args.output.display(),
        keep.len(),
        scheme.name
    );
    Ok(())
}

fn st_dtype(d: crate::formats::dtype::DType) -> Result<safetensors::Dtype> {
    use crate::formats::dtype::DType::*;
    Ok(match d {
        F32 => safetensors::Dtype::F32,
        F16 => safetensors::Dtype::F16,
        BF16 => safetensors::Dtype::BF16,
        U32 => safetensors::Dtype::U32,
        U16 => safetensors::Dtype::U16,
        U8 => safetensors::Dtype::U8,
        I32 => safetensors::Dtype::I32,
        I64 => safetensors::Dtype::I64,
    })
}
