//! Writes a Llama-shaped Hugging Face folder with random fp16 weights, for benchmarks (speed does
//! not depend on the values). Streams one tensor at a time.
//!
//! `cargo run --release --example synth_model -- OUT_DIR [--hidden 2048] [--intermediate 5632]
//!  [--layers 22] [--heads 32] [--kv-heads 4] [--vocab 32000]` (the defaults are TinyLlama-1.1B's
//! shape, about 1.1 billion parameters; Llama-2-7B is 4096/11008/32/32/32/32000).

use std::borrow::Cow;
use std::path::PathBuf;

struct Random {
    shape: Vec<usize>,
    seed: u64,
    scale: f32,
}

impl safetensors::View for Random {
    fn dtype(&self) -> safetensors::Dtype {
        safetensors::Dtype::F16
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let n: usize = self.shape.iter().product();
        let mut s = self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut out = Vec::with_capacity(n * 2);
        for _ in 0..n {
            // xorshift64*: cheap, deterministic, uniform enough for timing runs.
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let r = (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 24) as f32;
            out.extend_from_slice(&half::f16::from_f32((r * 2.0 - 1.0) * self.scale).to_le_bytes());
        }
        Cow::Owned(out)
    }
    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * 2
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(
        args.next()
            .expect("usage: synth_model OUT_DIR [--hidden N] …"),
    );
    let mut get = std::collections::HashMap::new();
    while let (Some(k), Some(v)) = (args.next(), args.next()) {
        get.insert(
            k.trim_start_matches("--").to_string(),
            v.parse::<usize>().expect("numeric option"),
        );
    }
    let h = *get.get("hidden").unwrap_or(&2048);
    let inter = *get.get("intermediate").unwrap_or(&5632);
    let layers = *get.get("layers").unwrap_or(&22);
    let heads = *get.get("heads").unwrap_or(&32);
    let kv = *get.get("kv-heads").unwrap_or(&4);
    let vocab = *get.get("vocab").unwrap_or(&32000);
    let hd = h / heads;
    std::fs::create_dir_all(&out).unwrap();
    let mut tensors: Vec<(String, Random)> = Vec::new();
    let mut seed = 1u64;
    let mut add = |name: String, shape: Vec<usize>, scale: f32| {
        seed += 1;
        tensors.push((name, Random { shape, seed, scale }));
    };
    add("model.embed_tokens.weight".into(), vec![vocab, h], 0.02);
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        add(format!("{p}.input_layernorm.weight"), vec![h], 1.0);
        add(format!("{p}.post_attention_layernorm.weight"), vec![h], 1.0);
        add(
            format!("{p}.self_attn.q_proj.weight"),
            vec![heads * hd, h],
            0.02,
        );
        add(
            format!("{p}.self_attn.k_proj.weight"),
            vec![kv * hd, h],
            0.02,
        );
        add(
            format!("{p}.self_attn.v_proj.weight"),
            vec![kv * hd, h],
            0.02,
        );
        add(
            format!("{p}.self_attn.o_proj.weight"),
            vec![h, heads * hd],
            0.02,
        );
        add(format!("{p}.mlp.gate_proj.weight"), vec![inter, h], 0.02);
        add(format!("{p}.mlp.up_proj.weight"), vec![inter, h], 0.02);
        add(format!("{p}.mlp.down_proj.weight"), vec![h, inter], 0.02);
    }
    add("model.norm.weight".into(), vec![h], 1.0);
    add("lm_head.weight".into(), vec![vocab, h], 0.02);
    let params: usize = tensors
        .iter()
        .map(|(_, t)| t.shape.iter().product::<usize>())
        .sum();
    safetensors::serialize_to_file(tensors, None, &out.join("model.safetensors")).unwrap();
    let config = serde_json::json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": h, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": false,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16"
    });
    std::fs::write(
        out.join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
    eprintln!("wrote {} ({params} parameters)", out.display());
}
