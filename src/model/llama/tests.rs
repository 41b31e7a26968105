use super::config::LlamaParams;
use super::Llama;
use crate::error::{class_of, ErrorClass};
use crate::formats::model_lib::plan::{Op, WeightStorage};
use crate::model::plan_builder::arch_params;
use crate::model::testing::{check_fixture, open_weights, read_config};
use crate::model::Architecture;
use crate::quant::scheme::scheme;
use serde_json::json;

#[test]
fn parses_seed_era_config() {
    let c = Llama.parse_config(&read_config("tiny-llama")).unwrap();
    assert_eq!((c.vocab_size, c.hidden_size, c.num_layers), (512, 256, 2));
    assert_eq!(c.context_length, 512);
    assert_eq!(
        (c.bos_token_id, c.eos_token_ids.clone()),
        (Some(0), vec![0])
    );
    let p: LlamaParams = arch_params(&c, "llama").unwrap();
    assert_eq!(
        (p.num_heads, p.num_kv_heads, p.head_dim, p.rotary_dim),
        (4, 2, 64, 64)
    );
    assert_eq!(
        (p.intermediate_size, p.rope_theta, p.rms_norm_eps),
        (704, 10000.0, 1e-5)
    );
    assert_eq!(p.dtype.as_deref(), Some("float16"));
}

#[test]
fn parses_newer_spelling_and_defaults() {
    let cfg = json!({
        "model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 4, "dtype": "bfloat16",
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
        "max_sequence_length": 4096, "eos_token_id": [1, 7], "tie_word_embeddings": true
    });
    let c = Llama.parse_config(&cfg).unwrap();
    let p: LlamaParams = arch_params(&c, "llama").unwrap();
    assert_eq!(
        (p.num_kv_heads, p.head_dim, p.rope_theta),
        (4, 16, 500000.0)
    );
    assert_eq!(p.dtype.as_deref(), Some("bfloat16"));
    assert_eq!(
        (c.context_length, c.eos_token_ids.clone()),
        (4096, vec![1, 7])
    );
    // Tied: no lm_head param, logits read the embedding.
    let params = Llama.params(&c).unwrap();
    assert!(params.iter().all(|p| p.name != "lm_head.weight"));
    let plan = Llama.lower(&c, scheme("q4f16_1").unwrap(), 128).unwrap();
    let embed = plan.weight_id("model.embed_tokens.weight").unwrap();
    assert_eq!(
        plan.prefill.last(),
        Some(&Op::Logits {
            input: 1,
            weight: embed
        })
    );
    assert_eq!(
        plan.weights[embed].records,
        ["model.embed_tokens.q_weight", "model.embed_tokens.q_scale"]
    );
}

#[test]
fn config_errors_name_the_field() {
    let mut cfg = read_config("tiny-llama");
    cfg.as_object_mut().unwrap().remove("hidden_size");
    let e = Llama.parse_config(&cfg).unwrap_err();
    assert_eq!(class_of(&e), ErrorClass::User);
    assert!(
        e.to_string().contains("hidden_size") && e.to_string().contains("llama"),
        "{e}"
    );
    let mut cfg = read_config("tiny-llama");
    cfg["num_key_value_heads"] = json!(3);
    let e = Llama.parse_config(&cfg).unwrap_err();
    assert!(e.to_string().contains("num_key_value_heads"), "{e}");
    let mut cfg = read_config("tiny-llama");
    cfg["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
    assert_eq!(
        class_of(&Llama.parse_config(&cfg).unwrap_err()),
        ErrorClass::User
    );
    cfg["rope_scaling"] = json!(null);
    cfg["model_type"] = json!("gpt_neox");
    assert_eq!(
        class_of(&Llama.parse_config(&cfg).unwrap_err()),
        ErrorClass::User
    );
}

#[test]
fn lowering_declares_fused_weights_and_storage() {
    let c = Llama.parse_config(&read_config("tiny-llama")).unwrap();
    let params = Llama.params(&c).unwrap();
    let qkv = params
        .iter()
        .find(|p| p.name == "model.layers.1.self_attn.qkv_proj.weight")
        .unwrap();
    assert_eq!(qkv.shape, vec![256 + 2 * 128, 256]);
    assert_eq!(qkv.sources.len(), 3);
    let plan = Llama.lower(&c, scheme("q3f16_0").unwrap(), 256).unwrap();
    assert_eq!(plan.weights.len(), params.len());
    let w = &plan.weights[plan
        .weight_id("model.layers.0.mlp.gate_up_proj.weight")
        .unwrap()];
    assert_eq!(w.shape, vec![2 * 704, 256]);
    assert!(matches!(w.storage, WeightStorage::Quantized { .. }));
    let n = &plan.weights[plan.weight_id("model.norm.weight").unwrap()];
    assert_eq!(
        n.storage,
        WeightStorage::Raw {
            dtype: crate::formats::dtype::DType::F16
        }
    );
    assert_eq!(plan.states.len(), 2);
    assert_eq!(plan.prefill, plan.decode);
    assert_eq!((plan.max_seq_len, plan.stop_tokens.clone()), (256, vec![0]));
    for bad in [0, 1 << 30] {
        let e = Llama.lower(&c, scheme("q0f32").unwrap(), bad).unwrap_err();
        assert_eq!(class_of(&e), ErrorClass::User);
    }
}

#[test]
fn tiny_llama_matches_transformers() {
    let w = open_weights("tiny-llama");
    check_fixture(&Llama, "tiny-llama", &[w.as_ref()]);
}

#[test]
fn tiny_vicuna_delta_merge_matches_transformers() {
    let base = open_weights("tiny-vicuna-base");
    let delta = open_weights("tiny-vicuna-delta");
    check_fixture(
        &Llama,
        "tiny-vicuna-delta",
        &[base.as_ref(), delta.as_ref()],
    );
}

#[test]
fn results_do_not_depend_on_thread_count() {
    let w = open_weights("tiny-llama");
    let c = Llama.parse_config(&read_config("tiny-llama")).unwrap();
    let built = crate::model::testing::build(&Llama, &c, &[w.as_ref()], "q0f32", 64);
    let ids: Vec<u32> = (0..40).map(|i| (i * 37 % 512) as u32).collect();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            crate::model::testing::with_model(&built, |m| m.session().forward(&ids, true).unwrap())
        })
    };
    assert_eq!(run(1), run(4));
}
