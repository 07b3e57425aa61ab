#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| lmspec_fuzz::image(data));
