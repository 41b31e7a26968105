//! Every kernel variant (each op, each scheme and layout, raw f16/f32, ragged K, several tuning
//! records) generates WGSL that naga validates and compiles to SPIR-V, MSL and WGSL.

use super::gpu::{compile, validate};
use super::wgsl::launch::Tuning;
use super::wgsl::spec::{matrix_spec, Binary, KernelSpec, Phase, Unary};
use super::wgsl::{entry_point, generate};
use crate::formats::dtype::DType;
use crate::formats::model_lib::plan::WeightStorage;
use crate::quant::scheme::{Encoding, SCHEMES};

fn tunings() -> Vec<Tuning> {
    vec![
        Tuning {
            workgroup_size: 64,
            rows_per_workgroup: 1,
            vector_width: 4,
            max_binding_bytes: crate::codegen::wgsl::launch::DEFAULT_MAX_BINDING_BYTES,
            subgroups: false,
        },
        Tuning {
            workgroup_size: 32,
            rows_per_workgroup: 3,
            vector_width: 1,
            max_binding_bytes: crate::codegen::wgsl::launch::DEFAULT_MAX_BINDING_BYTES,
            subgroups: true,
        },
        Tuning {
            workgroup_size: 256,
            rows_per_workgroup: 2,
            vector_width: 2,
            max_binding_bytes: 256,
            subgroups: true,
        },
    ]
}

/// Every kernel spec family over every scheme and layout, at regular and ragged shapes; the CUDA
/// tests use it too.
pub(super) fn all_specs() -> Vec<KernelSpec> {
    let mut specs = Vec::new();
    // K = 70: not a multiple of any group (ragged last group) nor of 2 (odd f16 pairs per row).
    for (n, k) in [(64usize, 64usize), (37, 70)] {
        for s in SCHEMES {
            let storages: Vec<WeightStorage> = match s.encoding {
                Encoding::None => vec![WeightStorage::Raw {
                    dtype: s.model_dtype,
                }],
                _ => [s.linear_layout, s.embedding_layout]
                    .iter()
                    .map(|l| WeightStorage::Quantized {
                        scheme: s.name.to_string(),
                        layout: *l,
                    })
                    .collect(),
            };
            for st in storages {
                let m = matrix_spec(&st, n, k, s.model_dtype).unwrap();
                specs.push(KernelSpec::Embedding { m });
                for phase in [Phase::Prefill, Phase::Decode] {
                    for (bias, logits) in
                        [(None, false), (Some(s.model_dtype), false), (None, true)]
                    {
                        specs.push(KernelSpec::Matmul {
                            m,
                            bias,
                            phase,
                            logits,
                            fusion: Default::default(),
                        });
                    }
                }
            }
        }
    }
    for d in [DType::F16, DType::F32, DType::BF16] {
        specs.push(KernelSpec::RmsNorm {
            cols: 70,
            weight: d,
        });
        specs.push(KernelSpec::LayerNorm {
            cols: 300,
            weight: d,
            bias: d,
        });
        specs.push(KernelSpec::TokenShift {
            hidden: 70,
            mixes: vec![d; 3],
        });
        specs.push(KernelSpec::Wkv {
            hidden: 70,
            time_decay: DType::F32,
            time_first: d,
        });
    }
    specs.push(KernelSpec::Rotary {
        n_q_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
        rotary_dim: 64,
    });
    specs.push(KernelSpec::Rotary {
        n_q_heads: 4,
        n_kv_heads: 4,
        head_dim: 80,
        rotary_dim: 20,
    });
    for (q, kv, hd) in [(4, 2, 64), (4, 4, 80), (32, 8, 128), (2, 1, 300)] {
        specs.push(KernelSpec::Attention {
            n_q_heads: q,
            n_kv_heads: kv,
            head_dim: hd,
            rotary_dim: None,
        });
    }
    specs.push(KernelSpec::SiluMul { cols: 704 });
    for op in [Unary::Gelu, Unary::ReluSquare, Unary::Sigmoid, Unary::Scale] {
        specs.push(KernelSpec::Unary { op, cols: 70 });
    }
    for op in [Binary::Add, Binary::Mul] {
        specs.push(KernelSpec::Binary { op, cols: 70 });
    }
    specs
}

#[test]
fn every_variant_validates_and_cross_compiles() {
    let mut count = 0;
    for spec in all_specs() {
        // f32 kernels under every tuning; f16 kernels under the default and the subgroup one.
        let variants = tunings()
            .into_iter()
            .map(|t| (t, false))
            .chain(tunings().into_iter().take(2).map(|t| (t, true)));
        for (tuning, f16) in variants {
            let k = generate("test", &spec, tuning, f16).unwrap();
            if let Err(e) = validate(&k) {
                panic!("{spec:?} {tuning:?}:\n{e}\n{}", k.source);
            }
            for lang in ["wgsl", "spirv", "msl"] {
                let c =
                    compile(&k, lang).unwrap_or_else(|e| panic!("{spec:?} f16 {f16} {lang}: {e}"));
                assert_eq!(c.entry.len as usize, c.blob.len());
                match lang {
                    "spirv" => {
                        assert_eq!(&c.blob[..4], &0x0723_0203u32.to_le_bytes());
                        // SPIR-V 1.3 in the header's version word.
                        assert_eq!(&c.blob[4..8], &0x0001_0300u32.to_le_bytes());
                    }
                    "msl" => {
                        let src = String::from_utf8(c.blob.clone()).unwrap();
                        assert!(
                            src.contains(&format!("kernel void {}(", c.entry.entry_point)),
                            "{src}"
                        );
                        let n = k.launch.bindings.len() + 1;
                        for i in 0..=n {
                            assert!(
                                src.contains(&format!("[[buffer({i})]]")),
                                "buffer({i}) in {src}"
                            );
                        }
                    }
                    _ => assert_eq!(c.blob, k.source.as_bytes()),
                }
                count += 1;
            }
        }
    }
    assert!(count > 800, "{count}");
}

/// `OpCapability` operands of a SPIR-V module.
fn spirv_capabilities(blob: &[u8]) -> Vec<u32> {
    let words: Vec<u32> = blob
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let mut caps = Vec::new();
    let mut i = 5;
    while i < words.len() {
        let (count, opcode) = ((words[i] >> 16) as usize, words[i] & 0xFFFF);
        if opcode == 17 {
            caps.push(words[i + 1]);
        }
        i += count.max(1);
    }
    caps
}

/// f16 kernels: only attention and the prefill matrix kernels use f16 (the others stay f32 and
/// need no shader-f16); the KV cache binds as f16; the SPIR-V declares Float16 but not
/// StorageInputOutput16, which wgpu's SPIR-V reader refuses.
#[test]
fn f16_kernels_enable_f16_where_they_use_it() {
    const FLOAT16: u32 = 9;
    const STORAGE_INPUT_OUTPUT_16: u32 = 4436;
    let attention = KernelSpec::Attention {
        n_q_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
        rotary_dim: None,
    };
    let k = generate("a", &attention, tunings()[0], true).unwrap();
    assert!(k.launch.shader_f16 && k.source.starts_with("enable f16;"));
    let kv: Vec<&str> = k
        .launch
        .bindings
        .iter()
        .filter(|b| b.role == "state")
        .map(|b| b.elem.as_str())
        .collect();
    assert_eq!(kv, ["f16", "f16"]);
    let caps = spirv_capabilities(&compile(&k, "spirv").unwrap().blob);
    assert!(caps.contains(&FLOAT16), "{caps:?}");
    assert!(!caps.contains(&STORAGE_INPUT_OUTPUT_16), "{caps:?}");
    let f32_attention = generate("a", &attention, tunings()[0], false).unwrap();
    assert!(!f32_attention.launch.shader_f16 && !f32_attention.source.contains("f16"));
    assert!(
        !spirv_capabilities(&compile(&f32_attention, "spirv").unwrap().blob).contains(&FLOAT16)
    );

    let decode = q4_decode_matmul_with_bias();
    let KernelSpec::Matmul { m, bias, .. } = decode else {
        unreachable!()
    };
    let prefill = KernelSpec::Matmul {
        m,
        bias,
        phase: Phase::Prefill,
        logits: false,
        fusion: Default::default(),
    };
    let k = generate("m", &prefill, tunings()[0], true).unwrap();
    assert!(k.launch.shader_f16);
    assert!(k
        .source
        .contains("dot(xs[lt * TK4 + kk], ws[ln * TK4 + kk])"));
    let k = generate("m", &decode, tunings()[0], true).unwrap();
    assert!(!k.launch.shader_f16, "decode matmuls stay f32");
    let norm = KernelSpec::RmsNorm {
        cols: 64,
        weight: DType::F16,
    };
    let k = generate("n", &norm, tunings()[0], true).unwrap();
    assert!(!k.launch.shader_f16 && !k.source.contains("enable f16"));
}

/// A decode matmul with a bias over a q4f16_1 weight: the argument-order tests of both kernel
/// languages use it.
pub(super) fn q4_decode_matmul_with_bias() -> KernelSpec {
    let m = matrix_spec(
        &WeightStorage::Quantized {
            scheme: "q4f16_1".into(),
            layout: crate::quant::scheme::Layout::NK,
        },
        64,
        64,
        DType::F16,
    )
    .unwrap();
    KernelSpec::Matmul {
        m,
        bias: Some(DType::F16),
        phase: Phase::Decode,
        logits: false,
        fusion: Default::default(),
    }
}

#[test]
fn bindings_follow_the_documented_order() {
    let spec = q4_decode_matmul_with_bias();
    let k = generate("decode:matmul[x]", &spec, tunings()[0], false).unwrap();
    let roles: Vec<(String, String, Option<usize>, String)> = k
        .launch
        .bindings
        .iter()
        .map(|b| {
            (
                b.role.clone(),
                b.op_field.clone(),
                b.record,
                b.access.clone(),
            )
        })
        .collect();
    let s = |x: &str| x.to_string();
    assert_eq!(
        roles,
        vec![
            (s("activation"), s("input"), None, s("read")),
            (s("weight"), s("weight"), Some(0), s("read")),
            (s("weight"), s("weight"), Some(1), s("read")),
            (s("weight"), s("bias"), Some(0), s("read")),
            (s("activation"), s("out"), None, s("read_write")),
        ]
    );
    assert_eq!(k.launch.params.binding, 5);
    assert_eq!(k.launch.bindings[2].packs.as_deref(), Some("f16x2"));
    assert_eq!(k.entry_point, entry_point(&spec));
    assert_eq!(k.entry_point, "mlcb_matmul_gemv_nk");
    // 64 rows, one per workgroup; no T dependence.
    assert_eq!(k.launch.grid[0].workgroups(1, 1), 64);
    assert_eq!(k.launch.grid[1].workgroups(1, 1), 1);
    for (i, b) in k.launch.bindings.iter().enumerate() {
        assert!(k.source.contains(&format!(
            "@binding({i}) var<storage, {}> {}:",
            b.access, b.name
        )));
    }
    assert!(k
        .source
        .contains("@binding(5) var<uniform> params: Params;"));
}

#[test]
fn compiled_bytes_are_deterministic() {
    let spec = KernelSpec::Attention {
        n_q_heads: 4,
        n_kv_heads: 2,
        head_dim: 64,
        rotary_dim: None,
    };
    let k = generate("a", &spec, tunings()[0], true).unwrap();
    for lang in ["spirv", "msl"] {
        assert_eq!(
            compile(&k, lang).unwrap().blob,
            compile(&k, lang).unwrap().blob
        );
    }
}

/// A dispatch above the per-dimension limit folds x into z when the kernel allows it, and says
/// what it needed when it cannot fit.
#[test]
fn dispatch_folds_or_reports_the_grid() {
    let k = generate("m", &q4_decode_matmul_with_bias(), tunings()[0], false).unwrap();
    let mut launch = k.launch;
    assert_eq!(launch.dispatch(1, 1, 65_535), Ok([64, 1, 1]));
    assert_eq!(launch.dispatch(1, 1, 48), Ok([32, 1, 2]));
    assert_eq!(launch.dispatch(1, 1, 7), Err([64, 1, 1]));
    launch.folds_x_into_z = false;
    assert_eq!(launch.dispatch(1, 1, 48), Err([64, 1, 1]));
}
