//! Tests of the PyTorch reader: the fixtures written by real torch, and hand-built archives.
//!
//! Expected fixture values were read independently with Python's `zipfile` + `struct` (no torch).
//! They are exact float16 values, printed in full by Python, hence the clippy allowance.
#![allow(clippy::excessive_precision)]

use super::*;
use crate::error::{class_of, ErrorClass};
use crate::formats::dtype::DType;
use std::io::Write;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn config(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(name).join("config.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn dim(cfg: &serde_json::Value, key: &str) -> usize {
    cfg[key].as_u64().unwrap() as usize
}

fn shape_of(src: &dyn TensorSource, name: &str) -> Vec<usize> {
    src.info(name)
        .unwrap_or_else(|| panic!("no tensor {name}"))
        .shape
        .clone()
}

fn values(src: &dyn TensorSource, name: &str) -> Vec<f32> {
    src.read(name).unwrap().to_f32().unwrap()
}

fn mean_std(v: &[f32]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[test]
fn reads_tiny_neox_fixture() {
    let f = PyTorchFile::open(&fixture("tiny-neox").join(PYTORCH_WEIGHTS)).unwrap();
    let cfg = config("tiny-neox");
    let (h, inter, vocab, layers) = (
        dim(&cfg, "hidden_size"),
        dim(&cfg, "intermediate_size"),
        dim(&cfg, "vocab_size"),
        dim(&cfg, "num_hidden_layers"),
    );
    // 2 embeddings + final norm (2) + 12 per layer.
    assert_eq!(f.infos().len(), 4 + 12 * layers);
    assert!(f.infos().iter().all(|i| i.dtype == DType::F16));
    assert_eq!(f.infos()[0].name, "gpt_neox.embed_in.weight");
    assert_eq!(shape_of(&f, "gpt_neox.embed_in.weight"), vec![vocab, h]);
    assert_eq!(shape_of(&f, "lm_head.weight"), vec![vocab, h]);
    for l in 0..layers {
        let p = format!("gpt_neox.layers.{l}");
        assert_eq!(
            shape_of(&f, &format!("{p}.attention.query_key_value.weight")),
            vec![3 * h, h]
        );
        assert_eq!(
            shape_of(&f, &format!("{p}.attention.query_key_value.bias")),
            vec![3 * h]
        );
        assert_eq!(
            shape_of(&f, &format!("{p}.mlp.dense_h_to_4h.weight")),
            vec![inter, h]
        );
        assert_eq!(
            shape_of(&f, &format!("{p}.mlp.dense_4h_to_h.weight")),
            vec![h, inter]
        );
        assert_eq!(
            shape_of(&f, &format!("{p}.input_layernorm.weight")),
            vec![h]
        );
    }
    // Values read with Python zipfile + struct.
    let emb = values(&f, "gpt_neox.embed_in.weight");
    assert_eq!(emb.len(), vocab * h);
    assert_eq!(
        &emb[..3],
        &[-0.0643310546875, -0.0038814544677734375, -0.030364990234375]
    );
    assert_eq!(*emb.last().unwrap(), 0.045440673828125);
    let qkv = values(&f, "gpt_neox.layers.1.attention.query_key_value.weight");
    assert_eq!(
        &qkv[..3],
        &[0.04400634765625, 0.1024169921875, 0.034149169921875]
    );
    assert!(qkv.iter().all(|x| x.is_finite()));
    // initializer_range 0.05.
    let (mean, std) = mean_std(&qkv);
    assert!(
        mean.abs() < 0.005 && (std - 0.05).abs() < 0.002,
        "{mean} {std}"
    );
    assert!(values(&f, "gpt_neox.layers.0.input_layernorm.weight")
        .iter()
        .all(|&x| x == 1.0));
    // Contiguous tensors are borrowed from the map, not copied.
    assert!(matches!(
        f.read("lm_head.weight").unwrap().data,
        Cow::Borrowed(_)
    ));
}

#[test]
fn reads_tiny_rwkv_fixture() {
    let f = PyTorchFile::open(&fixture("tiny-rwkv").join(PYTORCH_WEIGHTS)).unwrap();
    let cfg = config("tiny-rwkv");
    let (h, inter, vocab, layers) = (
        dim(&cfg, "hidden_size"),
        dim(&cfg, "intermediate_size"),
        dim(&cfg, "vocab_size"),
        dim(&cfg, "num_hidden_layers"),
    );
    // embeddings, pre_ln (2, block 0 only), ln_out (2), head; per block: ln1, ln2 (4),
    // attention (2 + 3 mixes + 4 linears), feed-forward (2 mixes + 3 linears) = 18.
    assert_eq!(f.infos().len(), 1 + 2 + 2 + 1 + 18 * layers);
    assert_eq!(shape_of(&f, "rwkv.embeddings.weight"), vec![vocab, h]);
    assert_eq!(shape_of(&f, "head.weight"), vec![vocab, h]);
    assert_eq!(shape_of(&f, "rwkv.blocks.0.pre_ln.weight"), vec![h]);
    for l in 0..layers {
        let p = format!("rwkv.blocks.{l}");
        assert_eq!(shape_of(&f, &format!("{p}.attention.time_decay")), vec![h]);
        assert_eq!(
            shape_of(&f, &format!("{p}.attention.time_mix_key")),
            vec![1, 1, h]
        );
        assert_eq!(
            shape_of(&f, &format!("{p}.attention.key.weight")),
            vec![h, h]
        );
        assert_eq!(
            shape_of(&f, &format!("{p}.feed_forward.key.weight")),
            vec![inter, h]
        );
        assert_eq!(
            shape_of(&f, &format!("{p}.feed_forward.value.weight")),
            vec![h, inter]
        );
    }
    let td = values(&f, "rwkv.blocks.0.attention.time_decay");
    assert_eq!(&td[..3], &[0.76220703125, 0.6865234375, -0.65673828125]);
    assert_eq!(*td.last().unwrap(), -0.2783203125);
    // [1, 1, 256] with strides (256, 256, 1): contiguous despite the odd outer strides.
    let mix = values(&f, "rwkv.blocks.1.feed_forward.time_mix_receptance");
    assert_eq!(&mix[..3], &[0.0242156982421875, 0.8564453125, 0.74609375]);
    assert_eq!(*mix.last().unwrap(), 0.7255859375);
    assert!(mix.iter().all(|&x| (0.0..=1.0).contains(&x)));
    let w = values(&f, "rwkv.blocks.1.feed_forward.value.weight");
    let (mean, std) = mean_std(&w);
    assert!(
        mean.abs() < 0.003 && (std - 0.03125).abs() < 0.002,
        "{mean} {std}"
    );
    assert!(f.skipped().is_empty());
}

#[test]
fn truncated_fixture_is_a_user_error_naming_the_file() {
    let bytes = std::fs::read(fixture("tiny-neox").join(PYTORCH_WEIGHTS)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for keep in [bytes.len() - 100, bytes.len() / 2, 1000, 10, 0] {
        let p = dir.path().join("pytorch_model.bin");
        std::fs::write(&p, &bytes[..keep]).unwrap();
        let e = PyTorchFile::open(&p).unwrap_err();
        assert_eq!(class_of(&e), ErrorClass::User, "{keep}: {e:#}");
        assert!(e.to_string().contains(&p.display().to_string()), "{e}");
    }
}

#[test]
fn legacy_and_foreign_files_are_user_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pytorch_model.bin");
    std::fs::write(&p, b"\x80\x02\x8a\x0alegacy magic...").unwrap();
    let e = PyTorchFile::open(&p).unwrap_err();
    assert_eq!(class_of(&e), ErrorClass::User);
    assert!(
        e.to_string().contains("re-save it with a newer torch"),
        "{e}"
    );
    std::fs::write(&p, b"<html>not found</html>").unwrap();
    let e = PyTorchFile::open(&p).unwrap_err();
    assert_eq!(class_of(&e), ErrorClass::User);
    std::fs::write(&p, b"version https://git-lfs.github.com/spec/v1\noid x\n").unwrap();
    let e = PyTorchFile::open(&p).unwrap_err();
    assert!(e.to_string().contains("Git LFS pointer"), "{e}");
}

/// Builds protocol-2 pickles by hand.
#[derive(Default)]
struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.extend_from_slice(bytes);
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.0.push(b'X');
        self.0.extend((s.len() as u32).to_le_bytes());
        self.op(s.as_bytes())
    }
    fn int(&mut self, i: i32) -> &mut Self {
        self.0.push(b'J');
        self.op(&i.to_le_bytes())
    }
    fn global(&mut self, module: &str, name: &str) -> &mut Self {
        self.op(format!("c{module}\n{name}\n").as_bytes())
    }
    fn ints(&mut self, v: &[i32]) -> &mut Self {
        self.op(b"(");
        for &i in v {
            self.int(i);
        }
        self.op(b"t")
    }
    /// `name: _rebuild_tensor_v2(storage(key), offset, shape, strides, False, OrderedDict())`.
    #[allow(clippy::too_many_arguments)]
    fn tensor(
        &mut self,
        name: &str,
        class: &str,
        key: &str,
        numel: i32,
        offset: i32,
        shape: &[i32],
        strides: &[i32],
    ) -> &mut Self {
        self.str(name)
            .global("torch._utils", "_rebuild_tensor_v2")
            .op(b"((")
            .str("storage")
            .global("torch", class)
            .str(key)
            .str("cpu")
            .int(numel)
            .op(b"tQ")
            .int(offset)
            .ints(shape)
            .ints(strides)
            .op(b"\x89")
            .global("collections", "OrderedDict")
            .op(b")Rt")
            .op(b"R")
    }
}

/// A torch-like zip: `archive/data.pkl`, `archive/byteorder`, `archive/data/<key>`.
fn write_checkpoint(path: &Path, pickle: &[u8], storages: &[(&str, Vec<u8>)]) {
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).unwrap();
    zip.write_all(pickle).unwrap();
    zip.start_file("archive/byteorder", opts).unwrap();
    zip.write_all(b"little").unwrap();
    for (key, bytes) in storages {
        zip.start_file(format!("archive/data/{key}"), opts).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
}

fn f32_bytes(v: impl IntoIterator<Item = f32>) -> Vec<u8> {
    v.into_iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn strided_offset_and_shared_storage_views() {
    // One storage of 0..24 (f32) shared by three tensors, and an int64 buffer, a Python int.
    let mut p = Pickle::default();
    p.op(b"\x80\x02")
        .global("collections", "OrderedDict")
        .op(b")R(")
        // rows 1..3 of a 4x6 matrix: offset 6, contiguous.
        .tensor("rows", "FloatStorage", "0", 24, 6, &[2, 6], &[6, 1])
        // transpose of the 4x6 matrix: [6, 4] strides [1, 6].
        .tensor("t", "FloatStorage", "0", 24, 0, &[6, 4], &[1, 6])
        // every other column of row 2, from column 1: offset 13, stride 2.
        .tensor("cols", "FloatStorage", "0", 24, 13, &[3], &[2])
        .tensor("pos", "LongStorage", "1", 3, 0, &[3], &[1])
        .str("step")
        .int(7)
        .op(b"u.");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.bin");
    let longs: Vec<u8> = [5i64, -1, 9].iter().flat_map(|x| x.to_le_bytes()).collect();
    write_checkpoint(
        &path,
        &p.0,
        &[("0", f32_bytes((0..24).map(|i| i as f32))), ("1", longs)],
    );
    let f = PyTorchFile::open(&path).unwrap();
    let names: Vec<&str> = f.infos().iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, ["rows", "t", "cols", "pos"]);
    let rows = f.read("rows").unwrap();
    assert_eq!(rows.shape, vec![2, 6]);
    assert_eq!(
        rows.to_f32().unwrap(),
        (6..18).map(|i| i as f32).collect::<Vec<_>>()
    );
    let t = f.read("t").unwrap();
    assert_eq!(t.shape, vec![6, 4]);
    let tv = t.to_f32().unwrap();
    for r in 0..6 {
        for c in 0..4 {
            assert_eq!(tv[r * 4 + c], (c * 6 + r) as f32);
        }
    }
    assert_eq!(
        f.read("cols").unwrap().to_f32().unwrap(),
        vec![13.0, 15.0, 17.0]
    );
    let pos = f.read("pos").unwrap();
    assert_eq!(pos.dtype, DType::I64);
    let pos: Vec<i64> = pos
        .data
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(pos, vec![5, -1, 9]);
    assert_eq!(f.skipped().len(), 1);
    assert_eq!(f.skipped()[0].name, "step");
    let e = f.read("step").unwrap_err();
    assert!(e.to_string().contains("int, not a tensor"), "{e}");
    assert_eq!(class_of(&f.read("nope").unwrap_err()), ErrorClass::User);
}

#[test]
fn forbidden_global_in_checkpoint_is_named() {
    let mut p = Pickle::default();
    p.op(b"\x80\x02")
        .global("os", "system")
        .op(b"(")
        .str("echo pwned")
        .op(b"tR.");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("evil.bin");
    write_checkpoint(&path, &p.0, &[]);
    let e = PyTorchFile::open(&path).unwrap_err();
    assert_eq!(class_of(&e), ErrorClass::User);
    let msg = e.to_string();
    assert!(
        msg.contains("pickle refers to global os.system, which mlcb refuses to load"),
        "{msg}"
    );
    assert!(msg.contains("evil.bin"), "{msg}");
}

#[test]
fn views_outside_their_storage_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.bin");
    // Claims 8 elements but the entry holds 4.
    let mut p = Pickle::default();
    p.op(b"\x80\x02}(")
        .tensor("w", "FloatStorage", "0", 8, 0, &[8], &[1])
        .op(b"u.");
    write_checkpoint(&path, &p.0, &[("0", f32_bytes([1.0; 4]))]);
    let e = PyTorchFile::open(&path).unwrap_err();
    assert_eq!(class_of(&e), ErrorClass::User);
    assert!(e.to_string().contains("truncated"), "{e}");
    // View reaching past the storage through its stride.
    let mut p = Pickle::default();
    p.op(b"\x80\x02}(")
        .tensor("w", "FloatStorage", "0", 4, 1, &[2], &[3])
        .op(b"u.");
    write_checkpoint(&path, &p.0, &[("0", f32_bytes([1.0; 4]))]);
    let e = PyTorchFile::open(&path).unwrap_err();
    assert!(e.to_string().contains("past the end of its storage"), "{e}");
    // Storage key missing from the archive.
    let mut p = Pickle::default();
    p.op(b"\x80\x02}(")
        .tensor("w", "FloatStorage", "9", 4, 0, &[4], &[1])
        .op(b"u.");
    write_checkpoint(&path, &p.0, &[("0", f32_bytes([1.0; 4]))]);
    let e = PyTorchFile::open(&path).unwrap_err();
    assert!(e.to_string().contains("archive/data/9"), "{e}");
    // A huge broadcast view is refused rather than allocated.
    let mut p = Pickle::default();
    p.op(b"\x80\x02}(")
        .tensor("w", "FloatStorage", "0", 4, 0, &[1 << 30, 1 << 30], &[0, 0])
        .op(b"u.");
    write_checkpoint(&path, &p.0, &[("0", f32_bytes([1.0; 4]))]);
    let e = PyTorchFile::open(&path).unwrap_err();
    assert!(e.to_string().contains("larger than the whole file"), "{e}");
}

#[test]
fn parse_checkpoint_from_bytes_matches_open() {
    let path = fixture("tiny-rwkv").join(PYTORCH_WEIGHTS);
    let bytes = std::fs::read(&path).unwrap();
    let (entries, skipped) = parse_checkpoint(&bytes, &path).unwrap();
    let f = PyTorchFile::open(&path).unwrap();
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    let opened: Vec<&str> = f.infos().iter().map(|i| i.name.as_str()).collect();
    assert_eq!(names, opened);
    assert_eq!(skipped.len(), f.skipped().len());
    // Three bytes are not a checkpoint: a user error naming the origin.
    let e = parse_checkpoint(b"PK\x03", Path::new("w.bin")).unwrap_err();
    assert_eq!(class_of(&e), ErrorClass::User);
    assert!(
        e.to_string().starts_with("w.bin: file is 3 bytes long"),
        "{e}"
    );
}
