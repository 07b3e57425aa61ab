//! Train a LoRA adapter on a model (a folder, a `.gguf` file or a hub id)
//! with a data folder in mlx-lm's format, then answer a prompt with it.
//!
//! ```sh
//! cargo run --release -p lmspec-lm --example lora -- MODEL tests/data/lora ADAPTER_DIR
//! ```
use std::path::PathBuf;

use lmspec_engine::adapter::{AdapterConfig, AdapterSource};
use lmspec_engine::LoadOptions;
use lmspec_hub::{HubOptions, ModelSource};
use lmspec_lm::generate::GenerateParams;
use lmspec_lm::template::ChatContext;
use lmspec_lm::tune::{self, Features, Schedule, TrainEvent, TrainParams};
use lmspec_lm::LanguageModel;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: lora MODEL DATA_DIR ADAPTER_DIR";
    let model = args.next().ok_or(usage)?;
    let data = PathBuf::from(args.next().ok_or(usage)?);
    let out = PathBuf::from(args.next().ok_or(usage)?);

    // A new adapter on the last 4 layers' linear nodes, mlx-lm's init.
    let adapter = AdapterSource::New {
        config: AdapterConfig {
            rank: 8,
            num_layers: 4,
            ..AdapterConfig::default()
        },
        seed: 0,
    };
    let opts = LoadOptions {
        adapter: Some(adapter),
        ..LoadOptions::default()
    };
    let lm =
        LanguageModel::load_source(&ModelSource::parse(&model), &HubOptions::from_env(), &opts)?;
    let sets = tune::data::load(&lm, &data, &Features::default(), true)?;

    let params = TrainParams {
        schedule: Schedule::Constant(1e-4),
        iters: 30,
        batch_size: 4,
        steps_per_report: 10,
        steps_per_eval: 10,
        val_batches: 4,
        adapter_path: Some(out.clone()),
        ..TrainParams::default()
    };
    tune::train(&lm.model, &sets, &params, &mut |e| match e {
        TrainEvent::Report(r) => println!(
            "iter {}: loss {:.3}, {:.0} tokens/s, peak {:.2} GB",
            r.iteration,
            r.loss,
            r.tokens_per_second,
            r.peak_memory_bytes as f64 / 1e9
        ),
        TrainEvent::Validation {
            iteration, loss, ..
        } => {
            println!("iter {iteration}: validation loss {loss:.3}")
        }
        _ => {}
    })?;
    println!("adapter saved in {}", out.display());

    // The adapter stays attached: generate with it.
    let messages = serde_json::json!([{"role": "user", "content":
        "It is 12 degrees Celsius in Oslo. What is that in Fahrenheit?"}]);
    let ctx = ChatContext {
        add_generation_prompt: true,
        ..Default::default()
    };
    let ids = lm.chat_prompt(&messages, &ctx)?;
    let params = GenerateParams {
        max_tokens: 40,
        ..Default::default()
    };
    let answer = lm.generate(&ids, &params, None, None, &mut |_| {})?;
    println!("{}", answer.text);
    Ok(())
}
