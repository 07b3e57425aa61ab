//! Offer a typed tool: the model calls it, the handler runs, the model
//! answers with the result.
//!
//! ```sh
//! cargo run -p lmspec-lm --example tools -- MODEL
//! ```
use lmspec_engine::LoadOptions;
use lmspec_hub::{HubOptions, ModelSource};
use lmspec_lm::generate::GenerateParams;
use lmspec_lm::tools::{ToolEvent, ToolFormat};
use lmspec_lm::{ChatSession, LanguageModel, Tool};
use lmspec_spec::library::SpecRoot;

#[derive(serde::Deserialize)]
struct WeatherArgs {
    city: String,
}

#[derive(serde::Serialize)]
struct Weather {
    city: String,
    sky: String,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let model = std::env::args().nth(1).ok_or("usage: tools MODEL")?;
    let lm = LanguageModel::load_source(
        &ModelSource::parse(&model),
        &HubOptions::from_env(),
        &LoadOptions::default(),
    )?;
    let weather = Tool::typed(
        "get_weather",
        "Current weather for a city.",
        |a: WeatherArgs| {
            Ok(Weather {
                city: a.city,
                sky: "sunny".into(),
            })
        },
    )?;
    let tools = [weather];

    // The call format this model speaks (tokenizer config, chat template,
    // registry or spec), checked against the tools' schemas.
    let formats = ToolFormat::load_all(&SpecRoot::from_env())?;
    let output = lm.output_format(&formats, None, &tools, None)?;
    let format = output.tools.clone().ok_or("no tool-call format")?;

    let params = GenerateParams {
        max_tokens: 128,
        output,
        ..Default::default()
    };
    let mut session = ChatSession::new(&lm, None, params);
    let answer = session.respond_with_tools(
        "What is the weather in Paris?",
        &tools,
        &format,
        3,
        &mut |event| {
            if let ToolEvent::Call(call) = event {
                eprintln!("[calls {}({})]", call.name, call.arguments);
            }
        },
    )?;
    println!("{answer}");
    Ok(())
}
