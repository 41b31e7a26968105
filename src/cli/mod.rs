//! The command line (clap): one file per command.

pub mod build;
pub mod quantize;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "mlcb", version, about = "Compile LLMs for deployment, and run what was built")]
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
}

/// Run the parsed command.
pub fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Build(a) => build::execute(a),
        Command::Explain(a) => build::explain(a),
        Command::Clean(a) => build::clean(a),
        Command::Quantize(a) => quantize::execute(a),
    }
}
