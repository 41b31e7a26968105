use super::config::RwkvParams;
use super::Rwkv;
use crate::error::{class_of, ErrorClass};
use crate::formats::dtype::DType;
use crate::formats::model_lib::plan::{Op, WeightStorage};
use crate::model::plan_builder::arch_params;
use crate::model::testing::{check_fixture, open_weights, read_config};
use crate::model::{Architecture, Transform};
use crate::quant::scheme::scheme;
use serde_json::json;

#[test]
fn parses_config() {
    let c = Rwkv.parse_config(&read_config("tiny-rwkv")).unwrap();
    assert_eq!(
        (c.vocab_size, c.hidden_size, c.num_layers, c.context_length),
        (512, 256, 2, 512)
    );
    let p: RwkvParams = arch_params(&c, "rwkv").unwrap();
    assert_eq!(
        (p.intermediate_size, p.rescale_every, p.layer_norm_epsilon),
        (1024, 6, 1e-5)
    );
    let mut cfg = read_config("tiny-rwkv");
    cfg["attention_hidden_size"] = json!(128);
    let e = Rwkv.parse_config(&cfg).unwrap_err();
    assert_eq!(class_of(&e), ErrorClass::User);
    assert!(e.to_string().contains("attention_hidden_size"), "{e}");
}

#[test]
fn rescaling_halves_weights_and_residual() {
    let mut cfg = read_config("tiny-rwkv");
    cfg["num_hidden_layers"] = json!(5);
    cfg["rescale_every"] = json!(2);
    let c = Rwkv.parse_config(&cfg).unwrap();
    let params = Rwkv.params(&c).unwrap();
    let factor = |l: usize| {
        params
            .iter()
            .find(|p| p.name == format!("rwkv.blocks.{l}.feed_forward.value.weight"))
            .unwrap()
            .transform
            .clone()
    };
    assert_eq!(factor(1), Transform::Scale { factor: 1.0 });
    assert_eq!(factor(2), Transform::Scale { factor: 0.5 });
    assert_eq!(factor(4), Transform::Scale { factor: 0.25 });
    let plan = Rwkv.lower(&c, scheme("q4f16_1").unwrap(), 64).unwrap();
    let scales = plan
        .prefill
        .iter()
        .filter(|o| matches!(o, Op::Scale { factor, .. } if *factor == 0.5))
        .count();
    assert_eq!(scales, 2); // after blocks 1 and 3
    let decay = &plan.weights[plan
        .weight_id("rwkv.blocks.0.attention.time_decay")
        .unwrap()];
    assert_eq!(decay.storage, WeightStorage::Raw { dtype: DType::F32 });
    assert_eq!(plan.stop_tokens, vec![0]);
}

#[test]
fn tiny_rwkv_matches_transformers() {
    let w = open_weights("tiny-rwkv");
    check_fixture(&Rwkv, "tiny-rwkv", &[w.as_ref()]);
}
