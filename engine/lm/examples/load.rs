//! Load a model (a folder, a `.gguf` file or a hub id) and answer one prompt.
//!
//! ```sh
//! cargo run -p lmspec-lm --example load -- MODEL "What is the capital of France?"
//! ```
use lmspec_engine::LoadOptions;
use lmspec_hub::{HubOptions, ModelSource};
use lmspec_lm::generate::GenerateParams;
use lmspec_lm::template::ChatContext;
use lmspec_lm::LanguageModel;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model = args.next().ok_or("usage: load MODEL [PROMPT]")?;
    let prompt = args
        .next()
        .unwrap_or_else(|| "What is the capital of France?".into());

    // A path, or ORG/NAME[@REVISION] fetched into the Hugging Face cache.
    let source = ModelSource::parse(&model);
    let lm = LanguageModel::load_source(&source, &HubOptions::from_env(), &LoadOptions::default())?;

    let messages = serde_json::json!([{"role": "user", "content": prompt}]);
    let ctx = ChatContext {
        add_generation_prompt: true,
        ..Default::default()
    };
    let ids = lm.chat_prompt(&messages, &ctx)?;
    let params = GenerateParams {
        max_tokens: 64,
        ..Default::default()
    };
    let out = lm.generate(&ids, &params, None, None, &mut |_| {})?;
    println!("{}", out.text);
    Ok(())
}
