//! Sentence embeddings from an encoder folder (or hub id), and their
//! cosine similarities.
//!
//! ```sh
//! cargo run -p lmspec-lm --example embed -- ENCODER "A cat sits." "A kitten rests." "Stocks fell."
//! ```
use lmspec_engine::LoadOptions;
use lmspec_hub::{HubOptions, ModelSource};
use lmspec_lm::embed::cosine;
use lmspec_lm::Embedder;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let model = args.next().ok_or("usage: embed ENCODER TEXT...")?;
    let texts: Vec<String> = args.collect();
    let texts: Vec<&str> = if texts.is_empty() {
        vec![
            "A cat sits on the mat.",
            "A kitten rests on a rug.",
            "Stocks fell sharply.",
        ]
    } else {
        texts.iter().map(String::as_str).collect()
    };
    let dir = lmspec_hub::resolve(&ModelSource::parse(&model), &HubOptions::from_env())?;
    let embedder = Embedder::load(&dir, &LoadOptions::default())?;
    let vectors = embedder.embed(&texts)?;
    for (i, a) in texts.iter().enumerate() {
        for (j, b) in texts.iter().enumerate().skip(i + 1) {
            println!("{:.3}  {a:?} ~ {b:?}", cosine(&vectors[i], &vectors[j]));
        }
    }
    Ok(())
}
