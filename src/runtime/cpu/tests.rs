//! Executor tests on a hand-written plan whose outputs are computed by hand. (The architectures'
//! plans are checked against Hugging Face in `model::*::tests`.)

use super::kernels::WeightView;
use super::CpuModel;
use crate::error::{class_of, ErrorClass};
use crate::formats::dtype::DType;
use crate::formats::model_lib::plan::{
    BufferDecl, Op, Plan, WeightDecl, WeightStorage, PLAN_FORMAT_VERSION,
};

fn decl(name: &str, shape: Vec<usize>) -> WeightDecl {
    WeightDecl {
        name: name.into(),
        shape,
        storage: WeightStorage::Raw { dtype: DType::F32 },
        records: vec![name.into()],
    }
}

/// vocab 3, hidden 2: h = embed[tok]; h = h + h; y = W·h + b; logits = embed · y.
fn plan() -> Plan {
    let ops = vec![
        Op::Embedding { weight: 0, out: 0 },
        Op::Add { a: 0, b: 0, out: 0 },
        Op::matmul(0, 1, Some(2), 1),
        Op::Logits {
            input: 1,
            weight: 0,
        },
    ];
    Plan {
        format_version: PLAN_FORMAT_VERSION,
        arch: "hand".into(),
        quantization: "q0f32".into(),
        model_dtype: DType::F32,
        vocab_size: 3,
        hidden_size: 2,
        max_seq_len: 4,
        stop_tokens: vec![0],
        weights: vec![
            decl("embed", vec![3, 2]),
            decl("w", vec![2, 2]),
            decl("b", vec![2]),
        ],
        buffers: vec![
            BufferDecl {
                name: "h".into(),
                cols: 2,
            },
            BufferDecl {
                name: "y".into(),
                cols: 2,
            },
            BufferDecl {
                name: "logits".into(),
                cols: 3,
            },
        ],
        states: vec![],
        decode: ops.clone(),
        prefill: ops,
        logits: 2,
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

fn weight_bytes() -> Vec<Vec<u8>> {
    vec![
        f32_bytes(&[1.0, 0.0, 0.0, 2.0, 3.0, 4.0]),
        f32_bytes(&[1.0, 0.0, 1.0, 1.0]),
        f32_bytes(&[0.5, -1.0]),
    ]
}

fn with<R>(plan: &Plan, bytes: &[Vec<u8>], f: impl FnOnce(anyhow::Result<CpuModel>) -> R) -> R {
    let recs: Vec<[&[u8]; 1]> = bytes.iter().map(|b| [b.as_slice()]).collect();
    let views = WeightView::for_plan(plan, &recs);
    f(CpuModel::new(plan, views))
}

// Token 2: h = [3,4]·2 = [6,8]; y = [6.5, 13]; logits = [6.5, 26, 71.5].
// Token 1: h = [0,4]; y = [0.5, 3]; logits = [0.5, 6, 13.5].
const TOKEN2: [f32; 3] = [6.5, 26.0, 71.5];
const TOKEN1: [f32; 3] = [0.5, 6.0, 13.5];

#[test]
fn forward_by_hand() {
    let p = plan();
    with(&p, &weight_bytes(), |m| {
        let m = m.unwrap();
        let mut s = m.session();
        let all = s.forward(&[2, 1], true).unwrap();
        assert_eq!(all, [TOKEN2, TOKEN1].concat());
        assert_eq!(s.position(), 2);
        assert_eq!(s.forward(&[2], false).unwrap(), TOKEN2);
        assert_eq!(s.position(), 3);
        s.reset();
        assert_eq!(s.position(), 0);
        assert_eq!(s.forward(&[2, 1], false).unwrap(), TOKEN1);
    });
}

#[test]
fn f16_weights_give_the_same_values() {
    let mut p = plan();
    p.model_dtype = DType::F16;
    for w in &mut p.weights {
        w.storage = WeightStorage::Raw { dtype: DType::F16 };
    }
    let bytes: Vec<Vec<u8>> = weight_bytes()
        .iter()
        .map(|b| {
            bytemuck::cast_slice::<u8, f32>(b)
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes())
                .collect()
        })
        .collect();
    with(&p, &bytes, |m| {
        assert_eq!(m.unwrap().session().forward(&[2], true).unwrap(), TOKEN2);
    });
}

#[test]
fn forward_refuses_bad_input() {
    let p = plan();
    with(&p, &weight_bytes(), |m| {
        let m = m.unwrap();
        let mut s = m.session();
        for bad in [&[3u32][..], &[]] {
            let e = s.forward(bad, false).unwrap_err();
            assert_eq!(class_of(&e), ErrorClass::User);
        }
        s.forward(&[1, 1, 1], false).unwrap();
        let e = s.forward(&[1, 1], false).unwrap_err();
        assert!(e.to_string().contains("max_seq_len 4"), "{e}");
        assert_eq!(s.position(), 3);
        s.forward(&[1], false).unwrap();
    });
}

#[test]
fn new_refuses_mismatched_weights() {
    let p = plan();
    // Too few bytes for `w`.
    let mut bytes = weight_bytes();
    bytes[1].pop();
    with(&p, &bytes, |m| {
        let e = m.err().unwrap();
        assert_eq!(class_of(&e), ErrorClass::User);
        assert!(e.to_string().contains("weight w"), "{e}");
    });
    // A view whose shape differs from the declaration.
    let bytes = weight_bytes();
    let recs: Vec<[&[u8]; 1]> = bytes.iter().map(|b| [b.as_slice()]).collect();
    let shape = [4usize, 1];
    let mut views = WeightView::for_plan(&p, &recs);
    views[1].shape = &shape;
    let e = CpuModel::new(&p, views.clone()).err().unwrap();
    assert!(
        e.to_string().contains("[4, 1]") && e.to_string().contains("[2, 2]"),
        "{e}"
    );
    views.pop();
    assert_eq!(
        class_of(&CpuModel::new(&p, views).err().unwrap()),
        ErrorClass::User
    );
}

#[test]
fn new_refuses_inconsistent_plans() {
    type Mutation = Box<dyn Fn(&mut Plan)>;
    let cases: Vec<Mutation> = vec![
        // Matmul may not write its input.
        Box::new(|p| p.prefill[2] = Op::matmul(0, 1, None, 0)),
        // Buffer id out of range.
        Box::new(|p| p.decode[0] = Op::Embedding { weight: 0, out: 9 }),
        // Bias of the wrong length.
        Box::new(|p| p.prefill[2] = Op::matmul(0, 1, Some(0), 1)),
        // Must end with Logits.
        Box::new(|p| {
            p.prefill.pop();
        }),
        // Width mismatch.
        Box::new(|p| p.buffers[1].cols = 3),
        Box::new(|p| p.format_version = PLAN_FORMAT_VERSION + 1),
    ];
    for (i, mutate) in cases.iter().enumerate() {
        let mut p = plan();
        mutate(&mut p);
        with(&p, &weight_bytes(), |m| {
            let e = m.err().unwrap_or_else(|| panic!("case {i} accepted"));
            assert_eq!(class_of(&e), ErrorClass::User, "case {i}: {e}");
        });
    }
}
