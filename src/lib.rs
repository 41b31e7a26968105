//! mlcb: compiles large language models for deployment (recipes → stage DAG → content-addressed
//! cache → `dist/`), and runs what it built.
//!
//! Layers, each a folder: `recipe` (TOML recipes), `graph` (stage DAG and scheduler), `cache`
//! (keys, blobs, index), `stages` (fetch, load, delta-merge, quantize, tune, codegen, link),
//! `formats` (file formats), `model` (architectures → execution plan), `quant` (schemes),
//! `codegen` (kernel languages), `runtime` (backends; reads only the artifact), `cli`.

pub mod cache;
pub mod cli;
pub mod codegen;
pub mod error;
pub mod formats;
pub mod graph;
pub mod model;
pub mod quant;
pub mod recipe;
pub mod runtime;
pub mod safe_path;
pub mod stages;
