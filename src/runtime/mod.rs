//! Runtime: loads a built artifact (`dist/<model>-<quant>/`) and executes its plan. Reads only the
//! artifact: nothing here imports the build side (stages, graph, cache, recipe, model).
//!
//! Pieces: [`artifact`] (open a dist folder, map the shards, hand out weights), [`tokenizer`]
//! (text ↔ ids, streaming detokenisation), [`sampling`] (next-token choice), [`conversation`]
//! (chat templates), [`generate`] (the prefill/decode loop), [`backend`] (device choice, session
//! construction) and the backends themselves ([`cpu`], [`gpu`] through wgpu, [`cuda`]).

pub mod artifact;
pub mod backend;
pub mod chat_config;
pub mod conversation;
pub mod cpu;
pub mod cuda;
pub mod generate;
pub mod gpu;
pub mod sampling;
pub mod tokenizer;

/// One running instance of a model: its persistent state (KV cache or recurrent state) and the
/// number of tokens processed so far. Every backend implements it; generation code uses only this,
/// so it is object-safe.
pub trait Session {
    /// Processes `tokens` (at positions `position() .. position() + tokens.len()`) and returns
    /// logits `[rows, vocab]` row-major: `rows = tokens.len()` if `all_logits`, else 1 (the last).
    fn forward(&mut self, tokens: &[u32], all_logits: bool) -> anyhow::Result<Vec<f32>>;
    /// Forgets every processed token: position back to 0, state cleared.
    fn reset(&mut self);
    /// Number of tokens processed since creation or the last reset.
    fn position(&self) -> usize;
    /// Capacity in tokens: `position()` can never exceed it.
    fn max_seq_len(&self) -> usize;
}

/// The checks every backend's `Session::forward` makes before it runs anything: at least one
/// token, every id inside the vocabulary, and room in the context after `pos` processed tokens.
pub fn check_forward_input(
    plan: &crate::formats::model_lib::plan::Plan,
    pos: usize,
    tokens: &[u32],
) -> anyhow::Result<()> {
    use crate::error::user;
    let t = tokens.len();
    if t == 0 {
        return Err(user("forward needs at least one token"));
    }
    if let Some(bad) = tokens.iter().find(|&&id| id as usize >= plan.vocab_size) {
        return Err(user(format!(
            "token id {bad} is outside the vocabulary ({} tokens)",
            plan.vocab_size
        )));
    }
    if pos + t > plan.max_seq_len {
        return Err(user(format!(
            "context is full: {pos} tokens processed + {t} new exceed max_seq_len {}; \
             reset the session or build with a larger max_seq_len",
            plan.max_seq_len
        )));
    }
    Ok(())
}

/// Bytes per element of the KV cache a library's attention kernels were generated for, from
/// their state arguments' `(role, part, elem)`: 2 for f16, 4 for f32 (or no attention at all).
/// Kernels that disagree make a corrupt library (a user error: rebuild it).
pub fn kv_cache_elem_bytes<'a>(
    args: impl Iterator<Item = (&'a str, Option<&'a str>, &'a str)>,
) -> anyhow::Result<usize> {
    let mut elems: Vec<&str> = args
        .filter(|(role, part, _)| *role == "state" && matches!(part, Some("k" | "v")))
        .map(|(_, _, elem)| elem)
        .collect();
    elems.sort_unstable();
    elems.dedup();
    match elems[..] {
        [] | ["f32"] => Ok(4),
        ["f16"] => Ok(2),
        _ => Err(crate::error::user(format!(
            "the library's attention kernels bind the KV cache as {}; rebuild the model library",
            elems.join(" and ")
        ))),
    }
}

/// The tune stage's timer for a target: the local CUDA GPU of the target's architecture for cuda,
/// the local wgpu adapter of the target's API otherwise (see each backend's `timer`).
pub fn timer_for_target(
    target: &str,
    cuda_arch: Option<&str>,
) -> anyhow::Result<Option<Box<dyn crate::codegen::tune::KernelTimer>>> {
    if target == "cuda" {
        cuda::timer::open_for_target(target, cuda_arch)
    } else {
        gpu::timer::open_for_target(target)
    }
}

#[cfg(test)]
mod tests {
    use super::kv_cache_elem_bytes;

    #[test]
    fn the_kv_cache_element_comes_from_the_attention_kernels() {
        let k = |elem| ("state", Some("k"), elem);
        let v = |elem| ("state", Some("v"), elem);
        let rwkv = ("state", Some("rwkv"), "f32");
        let act = ("activation", None, "f32");
        assert_eq!(kv_cache_elem_bytes([act, rwkv].into_iter()).unwrap(), 4);
        assert_eq!(
            kv_cache_elem_bytes([act, k("f32"), v("f32")].into_iter()).unwrap(),
            4
        );
        assert_eq!(
            kv_cache_elem_bytes([k("f16"), v("f16"), rwkv].into_iter()).unwrap(),
            2
        );
        let e = kv_cache_elem_bytes([k("f16"), v("f32")].into_iter()).unwrap_err();
        assert!(e.to_string().contains("f16 and f32"), "{e}");
        assert_eq!(
            crate::error::class_of(&e).exit_code(),
            2,
            "a user error: rebuild it"
        );
    }
}
