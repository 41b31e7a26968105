//! Device-to-device copy bandwidth of GPU 0 (the memory-bound floor for decode: a decode step
//! reads every weight once, so `weight bytes / bandwidth` bounds its time from below).
//!
//! `cargo run --release --example cuda_bandwidth -- [MiB per buffer, default 1024] [repeats, default 20]`
//! prints one JSON line: `{"device": …, "bytes": …, "d2d_gb_s": …}` where a copy of B bytes
//! counts 2·B bytes moved (read + write). Without a GPU it exits 3 with mlcb's message.

use cudarc::driver::result;
use mlcb::runtime::cuda::driver::{open_device, DeviceMem, Stream};

fn main() {
    if let Err(e) = run() {
        eprintln!("cuda_bandwidth: {e:#}");
        std::process::exit(mlcb::error::class_of(&e).exit_code());
    }
}

fn run() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mib: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1024);
    let repeats: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(20);
    let dev = open_device()?;
    dev.ctx
        .bind_to_thread()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let bytes = mib << 20;
    let a = DeviceMem::zeroed(bytes, "source")?;
    let b = DeviceMem::zeroed(bytes, "destination")?;
    let stream = Stream::new()?;
    let copy = || -> anyhow::Result<()> {
        // SAFETY: both allocations hold `bytes` bytes.
        unsafe { result::memcpy_dtod_async(b.ptr, a.ptr, bytes, stream.0) }
            .map_err(|e| anyhow::anyhow!("copy: {e:?}"))
    };
    copy()?;
    stream.synchronize()?;
    let t0 = std::time::Instant::now();
    for _ in 0..repeats {
        copy()?;
    }
    stream.synchronize()?;
    let s = t0.elapsed().as_secs_f64();
    let gb_s = 2.0 * (bytes * repeats) as f64 / s / 1e9;
    println!(
        "{}",
        serde_json::json!({"device": dev.name, "sm": dev.sm, "bytes": bytes, "repeats": repeats, "seconds": s, "d2d_gb_s": gb_s})
    );
    Ok(())
}
