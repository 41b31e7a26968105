//! The command line (clap): one file per command.

pub mod bench;
pub mod build;
pub mod chat;
pub mod lock;
pub mod logits;
pub mod quantize;
pub mod run;
pub mod threads;
pub mod verify;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "mlcb",
    version,
    about = "Compile LLMs for deployment, and run what was built"
)]
pub struct Cli {
    /// More log output (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Build recipes (or build.py's --model/--hf-path form) into dist/<model>-<quant>/.
    Build(build::BuildArgs),
    /// Say, for each stage that would run, which key input changed since the last build.
    Explain(build::BuildArgs),
    /// Remove recipes' dist outputs, or empty the cache.
    Clean(build::CleanArgs),
    /// The quantize stage as a standalone tool: safetensors in, quantized safetensors out.
    Quantize(quantize::QuantizeArgs),
    /// Generate text from a built artifact.
    Run(run::RunArgs),
    /// Chat with a built artifact (multi-turn; /reset, /stats, /exit).
    Chat(chat::ChatArgs),
    /// Measure prefill and decode tokens/s and peak memory of a built artifact.
    Bench(bench::BenchArgs),
    /// Write float32 logits for every position of a token sequence (the evaluation interface).
    Logits(logits::LogitsArgs),
    /// Check a built artifact folder against its build-manifest.json (exit 2 when it differs).
    Verify(verify::VerifyArgs),
}

/// Run the parsed command.
pub fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Build(a) => build::execute(a),
        Command::Explain(a) => build::explain(a),
        Command::Clean(a) => build::clean(a),
        Command::Quantize(a) => quantize::execute(a),
        Command::Run(a) => run::execute(a),
        Command::Chat(a) => chat::execute(a),
        Command::Bench(a) => bench::execute(a),
        Command::Logits(a) => logits::execute(a),
        Command::Verify(a) => verify::execute(a),
    }
}
