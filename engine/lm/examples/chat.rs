//! A multi-turn chat that keeps its KV cache between turns.
//!
//! ```sh
//! cargo run -p lmspec-lm --example chat -- MODEL
//! ```
use lmspec_engine::LoadOptions;
use lmspec_hub::{HubOptions, ModelSource};
use lmspec_lm::generate::GenerateParams;
use lmspec_lm::{ChatSession, LanguageModel};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let model = std::env::args().nth(1).ok_or("usage: chat MODEL")?;
    let lm = LanguageModel::load_source(
        &ModelSource::parse(&model),
        &HubOptions::from_env(),
        &LoadOptions::default(),
    )?;
    let params = GenerateParams {
        max_tokens: 96,
        ..Default::default()
    };
    let mut session = ChatSession::new(&lm, Some("You are a concise assistant."), params);
    for question in ["What is the capital of France?", "And of Italy?"] {
        println!("> {question}");
        println!("{}", session.respond(question)?);
    }
    println!("({} messages in the history)", session.history().len());
    Ok(())
}
