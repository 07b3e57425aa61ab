//! Stream a reply token by token, with sampling settings and statistics.
//!
//! ```sh
//! cargo run -p lmspec-lm --example stream -- MODEL "Write a haiku about the sea."
//! ```
use std::io::Write;

use lmspec_engine::LoadOptions;
use lmspec_hub::{HubOptions, ModelSource};
use lmspec_lm::generate::{Event, GenerateParams};
use lmspec_lm::template::ChatContext;
use lmspec_lm::LanguageModel;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model = args.next().ok_or("usage: stream MODEL [PROMPT]")?;
    let prompt = args
        .next()
        .unwrap_or_else(|| "Write a haiku about the sea.".into());
    let lm = LanguageModel::load_source(
        &ModelSource::parse(&model),
        &HubOptions::from_env(),
        &LoadOptions::default(),
    )?;

    let messages = serde_json::json!([{"role": "user", "content": prompt}]);
    let ctx = ChatContext {
        add_generation_prompt: true,
        ..Default::default()
    };
    let ids = lm.chat_prompt(&messages, &ctx)?;
    let mut params = GenerateParams {
        max_tokens: 128,
        ..Default::default()
    };
    params.sampling.temperature = 0.7;
    params.sampling.top_p = 0.9;
    params.sampling.seed = Some(1);
    params.validate()?;

    lm.generate(&ids, &params, None, None, &mut |event| match event {
        Event::Text(t) => {
            print!("{t}");
            let _ = std::io::stdout().flush();
        }
        Event::Reasoning(r) => eprint!("{r}"),
        Event::Info(i) => eprintln!(
            "\n[{} prompt tokens at {:.1} tok/s, {} generated at {:.1} tok/s]",
            i.prompt_tokens, i.prompt_tps, i.generated_tokens, i.generation_tps
        ),
        _ => {}
    })?;
    Ok(())
}
