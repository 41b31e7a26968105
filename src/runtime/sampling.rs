//! Choosing the next token from logits: greedy, or temperature + top-p sampling, with an optional
//! CTRL-style repetition penalty. Reproducible: the same seed gives the same tokens.
//!
//! The random numbers come from SplitMix64, written here rather than pulling in `rand`: sampling
//! needs one uniform number per token, and a fixed, documented generator keeps seeded runs
//! identical across platforms and crate upgrades.

/// Sampling settings (defaults come from `mlc-chat-config.json`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Always take the most likely token. Also implied by `temperature <= 0`.
    pub greedy: bool,
    pub temperature: f32,
    /// Keep the smallest set of most likely tokens whose probabilities add up to at least this.
    pub top_p: f32,
    /// > 1 discourages tokens already seen (prompt and generated); 1 disables.
    pub repetition_penalty: f32,
}

impl SamplingParams {
    pub fn greedy() -> SamplingParams {
        SamplingParams {
            greedy: true,
            temperature: 1.0,
            top_p: 1.0,
            repetition_penalty: 1.0,
        }
    }

    /// A user error for values that make no sense.
    pub fn validate(&self) -> anyhow::Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            crate::user_bail!("--temperature must be ≥ 0 (got {})", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            crate::user_bail!("--top-p must be in (0, 1] (got {})", self.top_p);
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            crate::user_bail!(
                "--repetition-penalty must be > 0 (got {})",
                self.repetition_penalty
            );
        }
        Ok(())
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): a 64-bit state advanced by a constant and mixed.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64 { state: seed }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), from the top 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Picks tokens; owns the random state.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub params: SamplingParams,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Sampler {
        Sampler {
            params,
            rng: SplitMix64::new(seed),
        }
    }

    /// The next token from one row of logits; `seen` are the ids the penalty applies to. The
    /// logits are modified in place (penalty).
    pub fn sample(&mut self, logits: &mut [f32], seen: &[u32]) -> u32 {
        apply_repetition_penalty(logits, seen, self.params.repetition_penalty);
        if self.params.greedy || self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let probs = softmax_with_temperature(logits, self.params.temperature);
        let kept = top_p_filter(&probs, self.params.top_p);
        let total: f64 = kept.iter().map(|&(_, p)| p as f64).sum();
        let mut r = self.rng.next_f64() * total;
        for &(id, p) in &kept {
            r -= p as f64;
            if r < 0.0 {
                return id;
            }
        }
        kept.last().map_or(0, |&(id, _)| id)
    }
}

/// Index of the largest logit (the first one on ties); NaN never wins.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

/// CTRL / Hugging Face `RepetitionPenaltyLogitsProcessor`: for each distinct seen token, a positive
/// logit is divided by `penalty`, a negative one multiplied. Ids outside the row are ignored.
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut done = vec![false; logits.len()];
    for &id in seen {
        let i = id as usize;
        if i < logits.len() && !done[i] {
            done[i] = true;
            let l = &mut logits[i];
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

/// `softmax(logits / temperature)`, computed stably in f32.
pub fn softmax_with_temperature(logits: &[f32], temperature: f32) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<f32> = logits
        .iter()
        .map(|&l| ((l - max) / temperature).exp())
        .collect();
    let sum: f32 = probs.iter().sum();
    if sum > 0.0 && sum.is_finite() {
        probs.iter_mut().for_each(|p| *p /= sum);
    }
    probs
}

/// The most likely tokens, best first, until their probabilities reach `top_p` (at least one).
pub fn top_p_filter(probs: &[f32], top_p: f32) -> Vec<(u32, f32)> {
    let mut order: Vec<(u32, f32)> = probs
        .iter()
        .enumerate()
        .filter(|(_, p)| p.is_finite())
        .map(|(i, &p)| (i as u32, p))
        .collect();
    order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut cum = 0f32;
    let mut n = 0;
    for &(_, p) in &order {
        n += 1;
        cum += p;
        if cum >= top_p {
            break;
        }
    }
    order.truncate(n.max(1));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_reference_values() {
        // First outputs for seed 1234567, as published with the algorithm's reference code.
        let mut r = SplitMix64::new(1234567);
        assert_eq!(r.next_u64(), 6457827717110365317);
        assert_eq!(r.next_u64(), 3203168211198807973);
        assert_eq!(r.next_u64(), 9817491932198370423);
    }

    #[test]
    fn same_seed_same_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let params = SamplingParams {
            greedy: false,
            temperature: 1.0,
            top_p: 0.9,
            repetition_penalty: 1.0,
        };
        let run = |seed| {
            let mut s = Sampler::new(params, seed);
            (0..40)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        // Sampling really varies: more than one distinct token in 40 draws.
        let a = run(7);
        assert!(a.iter().any(|&t| t != a[0]));
    }

    #[test]
    fn top_p_keeps_the_smallest_sufficient_set() {
        let probs = [0.1, 0.5, 0.05, 0.3, 0.05];
        let ids = |v: Vec<(u32, f32)>| v.into_iter().map(|(i, _)| i).collect::<Vec<_>>();
        assert_eq!(ids(top_p_filter(&probs, 0.5)), vec![1]);
        assert_eq!(ids(top_p_filter(&probs, 0.79)), vec![1, 3]);
        assert_eq!(ids(top_p_filter(&probs, 0.85)), vec![1, 3, 0]);
        assert_eq!(ids(top_p_filter(&probs, 1.0)).len(), 5);
        assert_eq!(ids(top_p_filter(&probs, 0.01)), vec![1]);
    }

    #[test]
    fn tiny_top_p_sampling_is_greedy() {
        let mut s = Sampler::new(
            SamplingParams {
                greedy: false,
                temperature: 2.0,
                top_p: 0.01,
                repetition_penalty: 1.0,
            },
            3,
        );
        for _ in 0..20 {
            assert_eq!(s.sample(&mut [0.0, 2.0, 1.9, -1.0], &[]), 1);
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_multiplies_negative() {
        let mut l = vec![2.0, -2.0, 3.0, -1.0];
        apply_repetition_penalty(&mut l, &[0, 1, 1, 1, 9], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 3.0, -1.0]);
        // And it changes the greedy choice: 0 was best, seen, so 2 wins after the penalty.
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 1.5,
                ..SamplingParams::greedy()
            },
            0,
        );
        assert_eq!(s.sample(&mut [3.0, 0.0, 2.5], &[0]), 2);
    }

    #[test]
    fn temperature_softmax_is_normalised() {
        let p = softmax_with_temperature(&[1.0, 2.0, 3.0], 0.5);
        let e: Vec<f32> = [-4.0f32, -2.0, 0.0].iter().map(|x| x.exp()).collect();
        let s: f32 = e.iter().sum();
        for (a, b) in p.iter().zip(e.iter().map(|x| x / s)) {
            assert!((a - b).abs() < 1e-6);
        }
    }

    #[test]
    fn argmax_takes_first_of_ties_and_ignores_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.1]), 1);
    }

    #[test]
    fn bad_params_are_user_errors() {
        let mut p = SamplingParams::greedy();
        p.top_p = 0.0;
        assert!(p.validate().is_err());
        p.top_p = 1.0;
        p.temperature = -1.0;
        assert!(p.validate().is_err());
    }
}
