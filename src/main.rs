use clap::Parser;
use mlcb::error::class_of;

fn main() {
    // reqwest (under object_store) is built without a crypto provider of its own, so TLS to a
    // remote cache uses ring: install it before any client is made. Err = already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = mlcb::cli::Cli::parse();
    let default = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    if let Err(e) = mlcb::cli::dispatch(cli) {
        let class = class_of(&e);
        eprintln!("error: {e:#}");
        std::process::exit(class.exit_code());
    }
}
