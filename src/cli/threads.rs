//! `--threads` of the commands that run a model: how many workers the CPU runtime's kernels split
//! their rows over. Every kernel sums in an order that does not depend on it, so neither do the
//! results.

use crate::user_bail;
use anyhow::Result;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct ThreadsArg {
    /// Worker threads for the CPU kernels (default: one per core, or RAYON_NUM_THREADS).
    #[arg(long)]
    pub threads: Option<usize>,
}

impl ThreadsArg {
    /// Runs `f` on a pool of that many workers, passing it the pool's size.
    pub fn install<R: Send>(&self, f: impl FnOnce(usize) -> Result<R> + Send) -> Result<R> {
        if self.threads == Some(0) {
            user_bail!("--threads must be at least 1");
        }
        let mut pool = rayon::ThreadPoolBuilder::new();
        if let Some(n) = self.threads {
            pool = pool.num_threads(n);
        }
        let pool = pool
            .build()
            .map_err(|e| crate::error::env(format!("cannot start the thread pool: {e}")))?;
        let size = pool.current_num_threads();
        pool.install(|| f(size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{class_of, ErrorClass};

    #[test]
    fn runs_on_a_pool_of_the_asked_size_and_refuses_zero() {
        let two = ThreadsArg { threads: Some(2) };
        assert_eq!(
            two.install(|n| Ok((n, rayon::current_num_threads())))
                .unwrap(),
            (2, 2)
        );
        let zero = ThreadsArg { threads: Some(0) };
        let err = zero.install(|_| Ok(())).unwrap_err();
        assert_eq!(class_of(&err), ErrorClass::User);
        assert!(err.to_string().contains("--threads must be at least 1"));
    }
}
