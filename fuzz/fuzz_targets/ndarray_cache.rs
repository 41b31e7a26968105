#![no_main]
//! cargo fuzz run ndarray_cache — see mlcb_fuzz::ndarray_cache for what the input is.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mlcb_fuzz::ndarray_cache(data);
});
