//! A short, fixed-seed fuzzing pass over every target (the long runs are
//! `make fuzz`). A crash found by either becomes a case here or in the
//! hostile-input corpus.
use lmspec_fuzz::{run_seeded, seeds, TARGETS};

#[test]
fn every_target_survives_seeded_mutations() {
    // Templates are bounded by fuel; a small budget keeps mutated loops short.
    std::env::set_var("LMSPEC_TEMPLATE_FUEL", "200000");
    for (name, target) in TARGETS {
        let iterations = match *name {
            "config_bind" => 150,
            "spec_yaml" => 400,
            // Each image input is decoded and resized: fewer, slower runs.
            "image" | "image_processor" => 200,
            _ => 2000,
        };
        let ran = run_seeded(*target, &seeds(name), iterations, 0x5eed_0001);
        assert!(ran >= iterations, "{name}: {ran} inputs");
    }
}

#[test]
fn inputs_found_by_fuzzing_stay_fixed() {
    // Each is an input a fuzzer once crashed or hung on.
    let cases: &[(&str, &[u8])] = &[
        ("expr", b"(-9223372036854775807 - 1) % -1"),
        ("expr", b"abs(-9223372036854775807 - 1)"),
        ("expr", "1 \u{85} 2".as_bytes()),
        // The tokenizers library panics on a decoder that is not an object.
        ("tokenizer", br#"{"version":"1.0","added_tokens":[],"normalizer":null,"pre_tokenizer":null,"post_processor":null,"decoder":5,"model":{"type":"WordLevel","vocab":{"a":0},"unk_token":"a"}}"#),
        ("tool_calls", b"<|tool_call_start|>[f(a=[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1"),
    ];
    for (name, input) in cases {
        let (_, target) = TARGETS
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no target {name}"));
        target(input);
    }
}
