#![no_main]
//! cargo fuzz run pickle — see mlcb_fuzz::pickle for what the input is.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mlcb_fuzz::pickle(data);
});
