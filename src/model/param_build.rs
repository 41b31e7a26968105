//! Building one artifact parameter from its source tensors: read, check shapes, apply the
//! [`Transform`]. The quantize stage and the tests both go through here, so what a `ParamSpec` means
//! is defined once.

use super::{ParamSpec, Transform};
use crate::error::user;
use crate::formats::tensor::TensorSource;
use anyhow::Result;

/// Reads the sources of `spec` from `source`, checks their shapes and applies the transform.
/// Returns the parameter's values, row-major in its logical shape.
///
/// A source name may list alternatives separated by `|` (`embed_out.weight|lm_head.weight`): the
/// first one present is read. A missing source or a shape mismatch is a user error naming the
/// tensor, the expected and the found shape.
pub fn build_param(spec: &ParamSpec, source: &dyn TensorSource) -> Result<Vec<f32>> {
    let numel = spec.shape.iter().product::<usize>();
    let mut inputs = Vec::with_capacity(spec.sources.len());
    for name in &spec.sources {
        inputs.push(read_source(spec, name, source)?);
    }
    let single = |inputs: &mut Vec<Loaded>| -> Result<Loaded> {
        if inputs.len() != 1 {
            anyhow::bail!(
                "param {} has {} sources; its transform {:?} takes one",
                spec.name,
                inputs.len(),
                spec.transform
            );
        }
        let one = inputs.pop().expect("length checked");
        if squeeze(&one.shape) != squeeze(&spec.shape) {
            return Err(mismatch(spec, &one.name, &spec.shape, &one.shape));
        }
        Ok(one)
    };
    let values = match &spec.transform {
        Transform::Identity => single(&mut inputs)?.values,
        Transform::NegExp => {
            let mut v = single(&mut inputs)?.values;
            v.iter_mut().for_each(|x| *x = -x.exp());
            v
        }
        Transform::Scale { factor } => {
            let mut v = single(&mut inputs)?.values;
            v.iter_mut().for_each(|x| *x *= factor);
            v
        }
        Transform::ConcatRows => concat_rows(spec, inputs)?,
        Transform::NeoxQkv { heads, head_dim } => {
            let one = single(&mut inputs)?;
            neox_qkv(spec, one, *heads, *head_dim)?
        }
    };
    if values.len() != numel {
        anyhow::bail!(
            "param {}: built {} values for shape {:?}",
            spec.name,
            values.len(),
            spec.shape
        );
    }
    Ok(values)
}

struct Loaded {
    name: String,
    shape: Vec<usize>,
    values: Vec<f32>,
}

fn read_source(spec: &ParamSpec, names: &str, source: &dyn TensorSource) -> Result<Loaded> {
    let Some(name) = names.split('|').find(|n| source.info(n).is_some()) else {
        let shown = names.replace('|', "` or `");
        return Err(user(format!(
            "tensor `{shown}` (needed for parameter {}) is missing from the model weights ({} tensors present); \
             check that the model folder matches its config.json",
            spec.name,
            source.infos().len()
        )));
    };
    let tensor = source.read(name)?;
    if tensor.data.len() != tensor.numel() * tensor.dtype.size() {
        return Err(user(format!(
            "tensor `{name}` holds {} bytes but its shape {:?} of {} needs {}",
            tensor.data.len(),
            tensor.shape,
            tensor.dtype,
            tensor.numel() * tensor.dtype.size()
        )));
    }
    if !tensor.dtype.is_float() {
        return Err(user(format!(
            "tensor `{name}` has dtype {}; parameter {} needs floating-point weights",
            tensor.dtype, spec.name
        )));
    }
    Ok(Loaded {
        name: name.to_string(),
        shape: tensor.shape.clone(),
        values: tensor.to_f32()?,
    })
}

/// The shape without its size-1 axes: Hugging Face stores RWKV `time_mix_*` as `[1, 1, H]` for a
/// logical `[H]`, while a transposed `[K, N]` for `[N, K]` must still be refused.
fn squeeze(shape: &[usize]) -> Vec<usize> {
    shape.iter().copied().filter(|&d| d != 1).collect()
}

fn mismatch(spec: &ParamSpec, tensor: &str, expected: &[usize], found: &[usize]) -> anyhow::Error {
    user(format!(
        "tensor `{tensor}` (for parameter {}) has shape {found:?}, expected {expected:?}; \
         the weights do not match config.json",
        spec.name
    ))
}

fn concat_rows(spec: &ParamSpec, inputs: Vec<Loaded>) -> Result<Vec<f32>> {
    let Some((&rows, tail)) = spec.shape.split_first() else {
        anyhow::bail!("param {} concatenates rows but is a scalar", spec.name);
    };
    let mut total = 0usize;
    for inp in &inputs {
        let ok = inp.shape.len() == spec.shape.len() && inp.shape[1..] == *tail;
        if !ok {
            let mut expected = vec![0usize];
            expected.extend_from_slice(tail);
            return Err(user(format!(
                "tensor `{}` (for parameter {}) has shape {:?}, expected [rows, {}]; \
                 the weights do not match config.json",
                inp.name,
                spec.name,
                inp.shape,
                tail.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        total += inp.shape[0];
    }
    if total != rows {
        let found: Vec<String> = inputs
            .iter()
            .map(|i| format!("`{}` {:?}", i.name, i.shape))
            .collect();
        return Err(user(format!(
            "parameter {} needs {rows} rows in all but its tensors have {total}: {}; \
             the weights do not match config.json",
            spec.name,
            found.join(", ")
        )));
    }
    Ok(inputs.into_iter().flat_map(|i| i.values).collect())
}

/// Rows ordered `(head, {q,k,v}, head_dim)` → `[q all heads | k all heads | v all heads]`.
fn neox_qkv(spec: &ParamSpec, one: Loaded, heads: usize, head_dim: usize) -> Result<Vec<f32>> {
    let rows = 3 * heads * head_dim;
    if spec.shape.first() != Some(&rows) {
        anyhow::bail!(
            "param {} of shape {:?} is not a fused qkv of {heads} heads × {head_dim}",
            spec.name,
            spec.shape
        );
    }
    let cols: usize = spec.shape[1..].iter().product();
    let mut out = vec![0f32; one.values.len()];
    for h in 0..heads {
        for j in 0..3 {
            for d in 0..head_dim {
                let src = (h * 3 + j) * head_dim + d;
                let dst = (j * heads + h) * head_dim + d;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&one.values[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{class_of, ErrorClass};
    use crate::formats::tensor::{Tensor, TensorInfo};
    use crate::quant::scheme::TensorRole;

    struct MemSource(Vec<(TensorInfo, Vec<f32>)>);

    impl MemSource {
        fn new(items: &[(&str, Vec<usize>, Vec<f32>)]) -> Self {
            MemSource(
                items
                    .iter()
                    .map(|(n, s, v)| {
                        let info = TensorInfo {
                            name: n.to_string(),
                            dtype: crate::formats::dtype::DType::F32,
                            shape: s.clone(),
                        };
                        (info, v.clone())
                    })
                    .collect(),
            )
        }
    }

    impl TensorSource for MemSource {
        fn infos(&self) -> &[TensorInfo] {
            // Tests only ever call `info`, which we override.
            &[]
        }
        fn info(&self, name: &str) -> Option<&TensorInfo> {
            self.0.iter().map(|(i, _)| i).find(|i| i.name == name)
        }
        fn read(&self, name: &str) -> Result<Tensor<'_>> {
            let (i, v) = self.0.iter().find(|(i, _)| i.name == name).unwrap();
            Ok(Tensor::from_f32(i.shape.clone(), v))
        }
    }

    fn spec(shape: Vec<usize>, sources: &[&str], transform: Transform) -> ParamSpec {
        ParamSpec {
            name: "p.weight".into(),
            role: TensorRole::Linear,
            shape,
            sources: sources.iter().map(|s| s.to_string()).collect(),
            transform,
        }
    }

    #[test]
    fn concat_rows_stacks_sources() {
        let src = MemSource::new(&[
            ("a", vec![1, 2], vec![1.0, 2.0]),
            ("b", vec![2, 2], vec![3.0, 4.0, 5.0, 6.0]),
        ]);
        let v = build_param(&spec(vec![3, 2], &["a", "b"], Transform::ConcatRows), &src).unwrap();
        assert_eq!(v, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let e =
            build_param(&spec(vec![4, 2], &["a", "b"], Transform::ConcatRows), &src).unwrap_err();
        assert_eq!(class_of(&e), ErrorClass::User);
    }

    #[test]
    fn neox_qkv_reorders_rows() {
        // 2 heads × head_dim 1: source rows (h0 q, h0 k, h0 v, h1 q, h1 k, h1 v).
        let src = MemSource::new(&[("qkv", vec![6], vec![10.0, 20.0, 30.0, 11.0, 21.0, 31.0])]);
        let t = Transform::NeoxQkv {
            heads: 2,
            head_dim: 1,
        };
        let v = build_param(&spec(vec![6], &["qkv"], t), &src).unwrap();
        assert_eq!(v, vec![10.0, 11.0, 20.0, 21.0, 30.0, 31.0]);
    }

    #[test]
    fn elementwise_transforms_and_squeeze() {
        let src = MemSource::new(&[("t", vec![1, 1, 2], vec![0.0, 1.0])]);
        let v = build_param(&spec(vec![2], &["t"], Transform::NegExp), &src).unwrap();
        assert_eq!(v, vec![-1.0, -std::f32::consts::E]);
        let v = build_param(
            &spec(vec![2], &["t"], Transform::Scale { factor: 0.25 }),
            &src,
        )
        .unwrap();
        assert_eq!(v, vec![0.0, 0.25]);
    }

    #[test]
    fn missing_and_misshapen_sources_are_user_errors() {
        let src = MemSource::new(&[("w", vec![3, 2], vec![0.0; 6])]);
        let e = build_param(&spec(vec![2, 3], &["w"], Transform::Identity), &src).unwrap_err();
        assert_eq!(class_of(&e), ErrorClass::User);
        let msg = e.to_string();
        assert!(
            msg.contains("`w`") && msg.contains("[3, 2]") && msg.contains("[2, 3]"),
            "{msg}"
        );
        let e = build_param(&spec(vec![3, 2], &["nope"], Transform::Identity), &src).unwrap_err();
        assert_eq!(class_of(&e), ErrorClass::User);
        assert!(e.to_string().contains("`nope`"));
        // Alternatives: the first present one is read.
        let v = build_param(&spec(vec![3, 2], &["nope|w"], Transform::Identity), &src).unwrap();
        assert_eq!(v.len(), 6);
    }
}
