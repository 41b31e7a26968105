use super::config::NeoxParams;
use super::GptNeox;
use crate::error::{class_of, ErrorClass};
use crate::formats::model_lib::plan::Op;
use crate::model::plan_builder::arch_params;
use crate::model::testing::{check_fixture, open_weights, read_config};
use crate::model::{Architecture, Transform};
use crate::quant::scheme::scheme;
use serde_json::json;

#[test]
fn parses_seed_era_config() {
    let c = GptNeox.parse_config(&read_config("tiny-neox")).unwrap();
    assert_eq!(
        (c.vocab_size, c.hidden_size, c.num_layers, c.context_length),
        (512, 320, 2, 512)
    );
    let p: NeoxParams = arch_params(&c, "gpt_neox").unwrap();
    assert_eq!((p.num_heads, p.head_dim, p.rotary_dim), (4, 80, 80));
    assert_eq!((p.rope_theta, p.layer_norm_eps), (10000.0, 1e-5));
    assert!(!p.use_parallel_residual && p.attention_bias);
}

#[test]
fn parses_newer_spelling() {
    let mut cfg = read_config("tiny-neox");
    let o = cfg.as_object_mut().unwrap();
    o.remove("rotary_pct");
    o.remove("rotary_emb_base");
    o.remove("torch_dtype");
    o.insert("dtype".into(), json!("float16"));
    o.insert(
        "rope_parameters".into(),
        json!({"rope_type": "default", "rope_theta": 20000.0, "partial_rotary_factor": 0.25}),
    );
    let c = GptNeox.parse_config(&cfg).unwrap();
    let p: NeoxParams = arch_params(&c, "gpt_neox").unwrap();
    assert_eq!((p.rotary_dim, p.rope_theta), (20, 20000.0));
    cfg["hidden_act"] = json!("relu");
    let e = GptNeox.parse_config(&cfg).unwrap_err();
    assert_eq!(class_of(&e), ErrorClass::User);
    assert!(e.to_string().contains("hidden_act"), "{e}");
}

#[test]
fn parallel_residual_reads_the_block_input() {
    let mut cfg = read_config("tiny-neox");
    cfg["use_parallel_residual"] = json!(true);
    let c = GptNeox.parse_config(&cfg).unwrap();
    let plan = GptNeox.lower(&c, scheme("q0f16").unwrap(), 32).unwrap();
    // Both layer norms come before the attention residual add of layer 0.
    let first_add = plan
        .prefill
        .iter()
        .position(|o| matches!(o, Op::Add { .. }))
        .unwrap();
    let norms = plan.prefill[..first_add]
        .iter()
        .filter(|o| matches!(o, Op::LayerNorm { .. }))
        .count();
    assert_eq!(norms, 2);
    let params = GptNeox.params(&c).unwrap();
    let qkv = params
        .iter()
        .find(|p| p.name.ends_with("0.attention.query_key_value.bias"))
        .unwrap();
    assert_eq!(
        qkv.transform,
        Transform::NeoxQkv {
            heads: 4,
            head_dim: 80
        }
    );
}

#[test]
fn tiny_neox_matches_transformers() {
    let w = open_weights("tiny-neox");
    check_fixture(&GptNeox, "tiny-neox", &[w.as_ref()]);
}
